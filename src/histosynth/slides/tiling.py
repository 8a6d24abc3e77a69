"""Cut a slide into fixed-size tiles at a target resolution: the first stage of the DAG.

The grid
    Tiles are ``size`` output pixels square at ``target_mpp`` µm/px, so one
    tile covers ``size * d`` level-0 pixels where ``d = target_mpp / slide.mpp``.
    Tile origins step by ``stride * d`` level-0 pixels (``stride`` defaults to
    ``size``: no overlap) from the top-left of the slide, or of each region
    when the tiling is restricted to regions, until a tile reaches the far
    edge (a sliding window); origins are rounded to whole level-0 pixels. A tile whose footprint runs past the slide edge is padded
    with white background and flagged (``padded`` column) or, with
    ``edge="drop"``, left out.

Reading
    Each tile is read from the coarsest pyramid level whose downsample does
    not exceed ``d`` (within 1 %) and resized to ``size`` with area
    interpolation when the level does not match ``d`` exactly.

Tissue filter
    A pixel is background when its grey value (OpenCV's BT.601 luma) is above
    ``background_threshold`` (default 204); a tile with more than
    ``max_background`` (default 0.85) background is dropped. Before decoding
    anything at full resolution, the tissue mask of a low-resolution level
    (the coarsest one with at least 4x4 of its pixels per tile) rules out tiles
    that are background there; the rest are decoded and judged exactly. The
    pre-filter is conservative, so that it only saves time and never changes
    the result: a low-resolution pixel counts as possible tissue up to
    ``background_threshold + lowres_margin`` (averaging lifts pale tissue and
    small dark nuclei above the threshold), and the possible-tissue mask is
    dilated by one pixel so thin tissue is not lost. On slides without such a
    level (a single-level scan, say) the low-resolution view comes from
    1/8-scale DC-only decodes of the nearly blank JPEG tiles of the reading
    level (:meth:`~histosynth.io.slides.Slide.jpeg_overview`), with the other
    tiles counted as possible tissue; other slides are judged on the decoded
    tiles alone.

Memory
    Tiles stream one by one into ``images.npy``; what is held is the
    decoded-tile cache of the reader (bounded; with threads it also holds
    the tiles decoded ahead, at most half of it), the current tile, and the
    low-resolution mask with its integral image (the JPEG-probe view is
    capped at 4 M pixels; a pyramid level has 16-64 pixels per grid tile).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import cv2
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter
from histosynth.io.slides import MAX_PIXELS, Slide, open_slide

log = logging.getLogger(__name__)

#: columns the tiler adds to the patch-set index beyond the common ones
TILE_COLUMNS = ("padded",)


@dataclass
class TileParams:
    """Everything that decides which tiles come out and what they contain."""

    size: int = 256
    target_mpp: float | None = None  # None: the slide's own level-0 resolution
    stride: int | None = None  # in output pixels; None: equal to size (no overlap)
    background_threshold: int = 204
    max_background: float = 0.85
    edge: str = "pad"  # "pad" or "drop"
    regions: list[tuple[int, int, int, int]] = field(default_factory=list)  # level-0 (x, y, w, h)
    mpp_tolerance: float = 0.01
    lowres_min_pixels: int = 4  # low-res pixels per tile side needed for the pre-filter
    # averaging at low resolution lifts pale tissue and dark nuclei above the threshold:
    # the pre-filter counts a low-res pixel as possible tissue up to threshold + margin
    lowres_margin: int = 16

    def check(self) -> None:
        if self.size < 8:
            raise HistosynthError(f"tile size must be at least 8 px, got {self.size}")
        if self.stride is not None and self.stride < 1:
            raise HistosynthError(f"stride must be at least 1 px, got {self.stride}")
        if self.target_mpp is not None and not self.target_mpp > 0:
            raise HistosynthError(f"target mpp must be positive, got {self.target_mpp}")
        if not 0 <= self.background_threshold <= 255:
            raise HistosynthError(f"background threshold must be 0..255, got {self.background_threshold}")
        if not 0.0 <= self.max_background <= 1.0:
            raise HistosynthError(f"max background fraction must be 0..1, got {self.max_background}")
        if self.edge not in ("pad", "drop"):
            raise HistosynthError(f"edge must be 'pad' or 'drop', got {self.edge!r}")
        for r in self.regions:
            if len(r) != 4 or r[2] <= 0 or r[3] <= 0:
                raise HistosynthError(f"a region is (x, y, width, height) with positive size, got {r}")


class GridTile(NamedTuple):
    x: int  # level-0 origin
    y: int
    padded: bool


@dataclass
class TilePlan:
    """Where tiles come from: level, scale and the grid, for one slide."""

    level: int
    level_downsample: float
    downsample: float  # level-0 pixels per output pixel
    read_size: int  # pixels read at `level` for one tile (before resizing)
    footprint: float  # level-0 pixels covered by one tile
    mpp: float  # the resolution of the output tiles
    grid: list[GridTile]


def plan_tiles(slide: Slide, params: TileParams) -> TilePlan:
    """The reading level and the tile grid for ``slide`` (no pixels are read)."""
    params.check()
    width, height = slide.dimensions
    target = params.target_mpp if params.target_mpp is not None else slide.mpp
    downsample = target / slide.mpp
    if downsample < 1 - params.mpp_tolerance:
        log.warning(
            "%s: target %.4g um/px is finer than the slide's %.4g um/px; tiles are upsampled",
            slide.path,
            target,
            slide.mpp,
        )
    level = slide.best_level_for_downsample(downsample, params.mpp_tolerance)
    level_ds = slide.level_downsamples[level]
    scale = downsample / level_ds  # level pixels per output pixel
    if abs(scale - 1) <= params.mpp_tolerance:
        scale = 1.0
    read_size = max(1, int(round(params.size * scale)))
    footprint = params.size * downsample
    step = (params.stride or params.size) * downsample
    if footprint > width or footprint > height:
        raise HistosynthError(
            f"a {params.size}-px tile at {target:.4g} um/px covers {footprint:.0f} level-0 px, "
            f"more than the slide's {width}x{height}",
            slide.path,
        )
    boxes = params.regions or [(0, 0, width, height)]
    seen: set[tuple[int, int]] = set()
    grid: list[GridTile] = []
    for bx, by, bw, bh in boxes:
        bx0, by0 = max(0, bx), max(0, by)
        bx1, by1 = min(width, bx + bw), min(height, by + bh)
        if bx0 >= bx1 or by0 >= by1:
            log.warning("%s: region %s lies outside the slide; skipped", slide.path, (bx, by, bw, bh))
            continue
        # a sliding window: the last tile is the first one that reaches the far edge
        # (or, with a stride larger than the tile, the last that starts inside)
        ny = _n_steps(by1 - by0, footprint, step)
        nx = _n_steps(bx1 - bx0, footprint, step)
        for j in range(ny):
            y = int(round(by0 + j * step))
            for i in range(nx):
                x = int(round(bx0 + i * step))
                if x >= bx1 or y >= by1 or (x, y) in seen:  # rounded onto the far edge, or a repeat
                    continue
                seen.add((x, y))
                padded = x + footprint > width + 1e-6 or y + footprint > height + 1e-6
                if padded and params.edge == "drop":
                    continue
                grid.append(GridTile(x, y, padded))
    grid.sort(key=lambda t: (t.y, t.x))
    return TilePlan(
        level=level,
        level_downsample=level_ds,
        downsample=downsample,
        read_size=read_size,
        footprint=footprint,
        mpp=slide.mpp * downsample,
        grid=grid,
    )


def _n_steps(extent: float, footprint: float, step: float) -> int:
    reach_end = math.ceil((extent - footprint) / step - 1e-9) + 1
    start_inside = math.ceil(extent / step - 1e-9)
    return max(1, min(reach_end, start_inside))


def _background_pixels(rgb: np.ndarray, threshold: int, inside: tuple[int, int] | None = None) -> int:
    """Pixels of ``rgb`` whose grey value is above ``threshold``.

    With ``inside`` = (height, width), only the top-left part that lies on the
    slide is looked at and every pixel outside it counts as background.
    """
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    outside = 0
    if inside is not None:
        grey = grey[: inside[0], : inside[1]]
        outside = rgb.shape[0] * rgb.shape[1] - grey.size
    if grey.size == 0:
        return outside
    return cv2.countNonZero(cv2.threshold(grey, threshold, 1, cv2.THRESH_BINARY)[1]) + outside


def lowres_grey(
    slide: Slide, plan: TilePlan, params: TileParams, pool: Executor | None = None
) -> tuple[np.ndarray, float] | None:
    """A low-resolution grey image of the slide and its downsample, or None.

    The coarsest pyramid level with at least ``lowres_min_pixels`` pixels per
    tile side, when it is at least 4x coarser than the reading level;
    otherwise, on JPEG-tiled levels, 1/8-scale DC decodes of the reading
    level's nearly blank tiles (:meth:`Slide.jpeg_overview`; the tiles not
    probed read as possible tissue; probed on ``pool`` when given).
    """
    want = plan.footprint / params.lowres_min_pixels
    level = slide.best_level_for_downsample(want)
    ds = slide.level_downsamples[level]
    if ds >= 4 * plan.level_downsample:
        return cv2.cvtColor(slide.read_level(level), cv2.COLOR_RGB2GRAY), ds
    if plan.footprint / (8 * plan.level_downsample) >= params.lowres_min_pixels:
        overview = slide.jpeg_overview(plan.level, pool=pool)
        if overview is not None and plan.footprint / overview[1] >= params.lowres_min_pixels:
            return overview
    return None


def lowres_candidates(
    slide: Slide, plan: TilePlan, params: TileParams, pool: Executor | None = None
) -> np.ndarray | None:
    """Boolean per grid tile: may hold tissue (True) or is surely background (False).

    None when there is no low-resolution view that could save work.
    """
    if params.max_background >= 1.0:
        return None
    low = lowres_grey(slide, plan, params, pool)
    if low is None:
        return None
    grey, ds = low
    tissue = grey <= min(255, params.background_threshold + params.lowres_margin)
    tissue = cv2.dilate(tissue.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    # integral image: tissue pixels in any rectangle in O(1)
    count_type = np.int32 if tissue.size < 2**31 else np.int64
    integral = np.pad(tissue.astype(count_type).cumsum(0, dtype=count_type).cumsum(1, dtype=count_type), ((1, 0), (1, 0)))
    lh, lw = tissue.shape
    origins = np.array([(t.x, t.y) for t in plan.grid], dtype=np.float64).reshape(-1, 2)
    lo = origins / ds
    hi = (origins + plan.footprint) / ds
    x0 = np.clip(np.floor(lo[:, 0]), 0, lw).astype(np.int64)
    y0 = np.clip(np.floor(lo[:, 1]), 0, lh).astype(np.int64)
    x1 = np.clip(np.ceil(hi[:, 0]), x0, lw).astype(np.int64)
    y1 = np.clip(np.ceil(hi[:, 1]), y0, lh).astype(np.int64)
    area_total = (hi[:, 0] - lo[:, 0]) ** 2  # the footprint in low-res pixels
    n_tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    # outside-the-slide parts are background, as they are when padded
    return n_tissue / area_total >= (1.0 - params.max_background) - 1e-9


def read_tile(slide: Slide, plan: TilePlan, tile: GridTile, size: int) -> np.ndarray:
    """One output tile (size, size, 3) uint8, read and resized per the plan (may be read-only)."""
    region = slide.read_region(tile.x, tile.y, plan.level, plan.read_size, plan.read_size, copy=False)
    if plan.read_size != size:
        interp = cv2.INTER_AREA if plan.read_size > size else cv2.INTER_CUBIC
        region = cv2.resize(region, (size, size), interpolation=interp)
    return region


@dataclass
class TileStats:
    grid: int = 0
    ruled_out_lowres: int = 0
    decoded: int = 0
    dropped_background: int = 0
    kept: int = 0
    padded: int = 0
    seconds: float = 0.0


def iter_tiles(
    slide: Slide,
    params: TileParams,
    stats: TileStats | None = None,
    progress: bool = False,
    threads: int = 1,
) -> Iterator[tuple[dict, np.ndarray]]:
    """Yield ``(index_row, tile)`` for every kept tile, in row-major grid order.

    With ``threads`` > 1 the JPEG probes of the pre-filter run on that many
    worker threads, and the TIFF tiles of the coming grid tiles are decoded on
    them while the current one is judged and written (same output, same order).
    """
    stats = stats if stats is not None else TileStats()
    plan = plan_tiles(slide, params)
    stats.grid = len(plan.grid)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        candidates = lowres_candidates(slide, plan, params, pool)
        if candidates is None:
            candidates = np.ones(len(plan.grid), dtype=bool)
        yield from _iter_kept(slide, params, plan, candidates, stats, progress, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _iter_kept(slide, params, plan, candidates, stats, progress, pool):
    w, h = slide.dimensions
    bar = tqdm(plan.grid, desc=f"tile {slide.name}", unit="tile", disable=not progress, mininterval=5)
    # with a pool, the tiles of the next grid tiles decode in the background while this
    # one is judged and written; half the decoded-tile cache is the look-ahead
    read = plan.read_size
    n_pixels = params.size * params.size
    ahead = max(1, slide.cached_regions(plan.level, read, read) // 2) if pool is not None else 0
    submitted = 0
    for k, t in enumerate(bar):
        while pool is not None and submitted < min(k + ahead, len(plan.grid)):
            g = plan.grid[submitted]
            if candidates[submitted]:
                slide.prefetch([(g.x, g.y, plan.level, read, read)], pool)
            submitted += 1
        if not candidates[k]:
            stats.ruled_out_lowres += 1
            continue
        img = read_tile(slide, plan, t, params.size)
        stats.decoded += 1
        inside = None
        if t.padded:
            # pixels past the slide edge are background whatever the reader filled in
            img = np.array(img)
            inside_x = int(np.clip(round((w - t.x) / plan.downsample), 0, params.size))
            inside_y = int(np.clip(round((h - t.y) / plan.downsample), 0, params.size))
            img[inside_y:, :] = 255
            img[:, inside_x:] = 255
            inside = (inside_y, inside_x)
        bg_frac = _background_pixels(img, params.background_threshold, inside) / n_pixels
        if bg_frac > params.max_background:
            stats.dropped_background += 1
            continue
        stats.kept += 1
        stats.padded += int(t.padded)
        row = {
            "slide": slide.name,
            "x": t.x,
            "y": t.y,
            "level": plan.level,
            "downsample": plan.downsample,
            "mpp": plan.mpp,
            "width": params.size,
            "height": params.size,
            "tissue_fraction": round(1.0 - bg_frac, 4),
            "n_nuclei": None,
            "source": str(slide.path),
            "padded": bool(t.padded),
        }
        yield row, img


def tile_slide(
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    params: TileParams,
    *,
    mpp_fallback: float | None = None,
    max_pixels: int = MAX_PIXELS,
    slide_name: str | None = None,
    progress: bool = False,
    threads: int = 1,
) -> TileStats:
    """Tile one slide into a patch set at ``out_dir`` (written atomically).

    ``mpp_fallback`` and ``max_pixels`` are passed to :func:`histosynth.io.slides.open_slide`.
    """
    start = time.perf_counter()
    stats = TileStats()
    params.check()
    with open_slide(slide_path, mpp_fallback=mpp_fallback, max_pixels=max_pixels) as slide:
        if slide_name:
            slide.name = slide_name
        with PatchSetWriter(out_dir, arrays=("images",), patch_size=(params.size, params.size),
                            extra_columns=TILE_COLUMNS) as writer:
            for row, img in iter_tiles(slide, params, stats, progress=progress, threads=threads):
                writer.add(row, images=img)
            stats.seconds = time.perf_counter() - start
            writer.report = {
                "stage": "tile",
                "slide": slide.describe(),
                "params": asdict(params),
                "counts": asdict(stats),
            }
    if stats.kept == 0:
        log.warning("%s: no tile passed the tissue filter", slide_path)
    log.info(
        "%s: %d grid tiles, %d ruled out at low resolution, %d decoded, %d dropped as background, "
        "%d kept (%d padded) in %.1f s",
        slide_path, stats.grid, stats.ruled_out_lowres, stats.decoded, stats.dropped_background,
        stats.kept, stats.padded, stats.seconds,
    )
    return stats


def regions_from_boxes(boxes: Sequence[Sequence[float]], margin: float = 0.0) -> list[tuple[int, int, int, int]]:
    """Integer (x, y, w, h) regions from float (x0, y0, x1, y1) boxes grown by ``margin``."""
    out = []
    for x0, y0, x1, y1 in boxes:
        gx0, gy0 = math.floor(x0 - margin), math.floor(y0 - margin)
        gx1, gy1 = math.ceil(x1 + margin), math.ceil(y1 + margin)
        out.append((gx0, gy0, max(1, gx1 - gx0), max(1, gy1 - gy0)))
    return out


def annotation_regions(path: str | os.PathLike, cell: float = 512.0) -> list[tuple[int, int, int, int]]:
    """Regions to tile from an annotation file: one box per annotated area.

    Nuclei bounding boxes are marked on a grid of ``cell`` level-0 pixels;
    marked cells that touch (8-connectivity, after growing by one cell) form
    one area, whose region is the bounding box of its nuclei. Separate
    annotated areas of a slide thus give separate regions, and the space
    between them is not tiled.
    """
    from histosynth.io.annotations import read  # imported here: the parsers are heavy

    nuclei = read(path).nuclei
    if not nuclei:
        raise HistosynthError("no annotations to take regions from", path)
    bounds = np.array([n.polygon.bounds for n in nuclei], dtype=float)
    return regions_from_boxes(_group_boxes(bounds, cell))


def _group_boxes(bounds: np.ndarray, cell: float) -> list[tuple[float, float, float, float]]:
    """Bounding boxes of groups of nearby boxes (x0, y0, x1, y1), grouped on a coarse grid."""

    origin = bounds[:, :2].min(axis=0)
    cells = np.floor((bounds - np.tile(origin, 2)) / cell).astype(np.int64)
    shape = cells[:, 2:].max(axis=0) + 1
    grid = np.zeros((shape[1], shape[0]), dtype=bool)
    for cx0, cy0, cx1, cy1 in cells:
        grid[cy0 : cy1 + 1, cx0 : cx1 + 1] = True
    labels, _ = ndimage.label(ndimage.binary_dilation(grid, np.ones((3, 3), bool)), np.ones((3, 3), int))
    # each box belongs to the component of its first cell
    comp = labels[cells[:, 1], cells[:, 0]]
    out = []
    for c in np.unique(comp):
        b = bounds[comp == c]
        out.append((b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()))
    return out
