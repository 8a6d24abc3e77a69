"""Whole-slide nuclei segmentation with a trained HoVer-Net: the ``segment`` stage.

The slide is cut into core tiles of ``tile`` model pixels at the model's
resolution (its training tiles' µm/px; the slide is resampled to it). Only
tiles with tissue are read: the tiler's low-resolution pre-filter and
background threshold (:mod:`histosynth.slides.tiling`) decide, with a
tissue share of ``min_tissue`` enough to keep a tile.

Seams
    Each core tile is read with ``margin`` pixels around it, plus the
    network's input context around that (real slide pixels, not a mirror
    image). The network predicts the core and its margin; HoVer-Net's
    post-processing runs on that area; and a nucleus is reported by the
    tile whose core holds its centroid (mean pixel position). Every nucleus
    is therefore reported by exactly one tile, and whole as long as it
    reaches less than ``margin`` pixels past the core: the rule of
    HoVer-Net's whole-slide mode (instances kept by the tile that owns
    them, the others left to the neighbour that sees them whole) in its
    simplest form. A kept nucleus that touches the edge of its tile's
    predicted area was cut (larger than the margin allows); those are
    counted in ``segment.json`` (``cut``), never silently. Because each
    tile post-processes its own area, a nucleus on a seam can come out of
    both neighbours in slightly different shapes, with its two centroids on
    either side of the seam: two nuclei of neighbouring tiles that overlap
    by more than half the smaller one are one, and the larger is kept
    (``duplicates_removed``; :func:`find_duplicates`).

Resuming
    Every finished tile is saved at once, atomically, into a work folder
    beside the output (``.NAME.partial``), with a manifest of the slide,
    model and settings. A run killed part-way and started again with the
    same inputs takes the saved tiles and goes on; a work folder from other
    inputs is discarded with a warning. The folder is removed when the
    output is complete.

Output (one folder per slide, written under a temporary name and renamed
into place)
    - ``nuclei.geojson``: a QuPath FeatureCollection of detections, outlines
      in level-0 slide pixels, ``classification`` name and colour per type,
      measurements (area, type and nucleus probabilities);
    - ``nuclei.csv``: one row per nucleus: id, tile, centroid (level-0 px),
      area (model px and µm²), perimeter, eccentricity, solidity, type id and
      name, type probability (mean probability of the chosen type over the
      nucleus) and nucleus probability (mean NP probability);
    - ``labels.tif`` (``label_tiff``): the instance ids as a tiled, zlib-
      compressed uint32 TIFF at the model's resolution (one level);
    - ``segment.json``: slide, model, settings, counts and timings.

Memory is flat in the slide's size for the GeoJSON and CSV (tiles are
streamed to disk and the outputs written feature by feature); the label
TIFF holds one band of ``LABEL_BAND`` rows across the slide and the tiles
that overlap it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_write
from histosynth.io.labels import same_classes
from histosynth.io.slides import MAX_PIXELS, Slide, open_slide

log = logging.getLogger(__name__)

#: the name of the report every finished output folder holds (and that identifies it)
REPORT = "segment.json"
#: rows of the label TIFF assembled at a time
LABEL_BAND = 256
#: the columns of nuclei.csv, in order
CSV_COLUMNS = ("id", "tile", "centroid_x", "centroid_y", "area_px", "area_um2", "perimeter_px", "eccentricity",
               "solidity", "type", "type_name", "type_probability", "nucleus_probability")
_WORK_VERSION = 1
#: the GeoJSON measurements of a nucleus (QuPath's name: nuclei.csv's column), besides histosynth.io.qupath's own
MEASUREMENTS = {"nucleus_id": "id", "area_um2": "area_um2", "type_probability": "type_probability",
                "nucleus_probability": "nucleus_probability"}


@dataclass
class SegmentParams:
    """What decides the result of a whole-slide segmentation (recorded in the manifest and report)."""

    tile: int = 1024  # core tile side in model pixels
    margin: int = 48  # model pixels predicted around each core: the largest nucleus reach past it
    min_tissue: float = 0.01  # tissue share that makes a tile worth reading
    background_threshold: int = 204  # grey value above which a pixel is background (the tiler's)
    mpp_tolerance: float = 0.1  # relative difference of slide and model µm/px that is warned about
    batch: int = 4
    label_tiff: bool = False

    def check(self) -> None:
        if self.tile < 64:
            raise HistosynthError(f"segment tile must be at least 64 px, got {self.tile}")
        if not 0 <= self.margin <= self.tile // 2:
            raise HistosynthError(f"segment margin must be in 0..tile/2 = {self.tile // 2}, got {self.margin}")
        if not 0.0 < self.min_tissue <= 1.0:
            raise HistosynthError(f"min tissue must be in (0, 1], got {self.min_tissue}")
        if not 0 <= self.background_threshold <= 255:
            raise HistosynthError(f"background threshold must be 0..255, got {self.background_threshold}")
        if self.batch < 1:
            raise HistosynthError(f"batch must be at least 1, got {self.batch}")


@dataclass
class TileResult:
    """The nuclei one tile owns: labels of its predicted area (ids 1..n) and one table row per id."""

    origin: tuple[int, int]  # level-0 (x, y) of the predicted area's top-left
    labels: np.ndarray  # int32 (tile + 2 margin)^2, only the owned nuclei
    rows: list[dict[str, Any]]
    cut: int = 0
    outside: int = 0


# -- the parts ---------------------------------------------------------------------------------------
def resolve_mpp(model_mpp: float | None, slide: Slide, mpp: float | None, tolerance: float) -> float:
    """The µm/px to segment at: the model's (or ``mpp`` when given); warn when the slide's differs."""
    target = mpp or model_mpp
    if target is None:
        target = slide.mpp
        log.warning("%s: the model does not record the resolution it was trained at (an older checkpoint); "
                    "segmenting at the slide's own %.4g um/px - pass --mpp to choose", slide.path, target)
    if not (math.isfinite(target) and target > 0):
        raise HistosynthError(f"the resolution to segment at must be a positive number, got {target!r}")
    if abs(slide.mpp - target) > tolerance * target:
        log.warning("%s: the slide is at %.4g um/px, the model was trained at %.4g um/px: the slide is resampled "
                    "to the model's resolution", slide.path, slide.mpp, target)
    return float(target)


def own_nuclei(inst: np.ndarray, types: dict[int, int] | None, maps: dict[str, np.ndarray], *, margin: int,
               core: tuple[int, int], origin: tuple[int, int], scale: float, mpp: float,
               slide_size: tuple[int, int], tile_id: int) -> TileResult:
    """The nuclei of a tile's predicted area whose centroid lies in its core, relabelled 1..n, with their rows.

    ``inst`` covers the core plus ``margin`` on each side; ``core`` = (height, width) of the core;
    ``origin`` the level-0 position of ``inst[0, 0]``; ``scale`` level-0 pixels per model pixel.
    """
    from scipy import ndimage
    from skimage.measure import regionprops

    h, w = inst.shape
    n = int(inst.max(initial=0))
    empty = TileResult(origin=origin, labels=np.zeros_like(inst, dtype=np.int32), rows=[])
    if n == 0:
        return empty
    ids = np.arange(1, n + 1)
    counts = np.bincount(inst.ravel(), minlength=n + 1)[1:]
    yy, xx = np.indices(inst.shape, dtype=np.float64)
    cy = np.asarray(ndimage.sum_labels(yy, inst, ids)) / np.maximum(counts, 1)
    cx = np.asarray(ndimage.sum_labels(xx, inst, ids)) / np.maximum(counts, 1)
    in_core = (counts > 0) & (cy >= margin) & (cy < margin + core[0]) & (cx >= margin) & (cx < margin + core[1])
    # centroids on the slide (level-0); a core past the slide's edge owns nothing there
    gx, gy = origin[0] + (cx + 0.5) * scale, origin[1] + (cy + 0.5) * scale
    on_slide = (gx < slide_size[0]) & (gy < slide_size[1])
    outside = int((in_core & ~on_slide).sum())
    keep = in_core & on_slide
    if not keep.any():
        return TileResult(origin=origin, labels=empty.labels, rows=[], outside=outside)
    edge = np.zeros(n + 1, bool)
    edge[np.unique(np.concatenate([inst[0], inst[-1], inst[:, 0], inst[:, -1]]))] = True
    edge[0] = False
    lut = np.zeros(n + 1, np.int32)
    kept_ids = ids[keep]
    lut[kept_ids] = np.arange(1, len(kept_ids) + 1, dtype=np.int32)
    labels = lut[inst]
    np_mean = np.asarray(ndimage.mean(maps["np"], inst, kept_ids))
    tp = maps.get("tp")
    rows = []
    props = {p.label: p for p in regionprops(labels)}
    for new_id, old_id in enumerate(kept_ids, start=1):
        t = int(types.get(int(old_id), 0)) if types else 0
        p = props[new_id]
        row = {"tile": tile_id, "local_id": new_id,
               "centroid_x": float(gx[old_id - 1]), "centroid_y": float(gy[old_id - 1]),
               "area_px": int(counts[old_id - 1]), "area_um2": float(counts[old_id - 1] * mpp * mpp),
               "perimeter_px": float(p.perimeter), "eccentricity": float(p.eccentricity),
               "solidity": float(p.solidity), "type": t,
               "type_probability": float("nan"), "nucleus_probability": float(np_mean[new_id - 1])}
        if tp is not None and 0 < t < tp.shape[0]:
            sl = p.slice
            row["type_probability"] = float(tp[t][sl][p.image].mean())
        rows.append(row)
    return TileResult(origin=origin, labels=labels, rows=rows, cut=int(edge[kept_ids].sum()), outside=outside)


def _slide_identity(slide: Slide) -> dict[str, Any]:
    st = os.stat(slide.path)
    return {"path": os.path.abspath(slide.path), "name": slide.name, "size_bytes": st.st_size,
            "dimensions": list(slide.dimensions), "mpp": slide.mpp}


def _model_identity(path: str | os.PathLike, step: int) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "step": step}


class WorkFolder:
    """The finished tiles of a run in progress (``.NAME.partial`` beside the output), for resuming."""

    def __init__(self, out: Path, manifest: dict[str, Any]):
        self.path = out.parent / f".{out.name}.partial"
        self.manifest = {"version": _WORK_VERSION, **manifest}
        found = self.path / "manifest.json"
        if self.path.exists():
            try:
                old = json.loads(found.read_text())
            except (OSError, ValueError):
                old = None
            if old != json.loads(json.dumps(self.manifest)):
                log.warning("%s holds the tiles of another slide, model or settings (or is damaged): discarded",
                            self.path)
                shutil.rmtree(self.path)
        (self.path / "tiles").mkdir(parents=True, exist_ok=True)
        if not found.exists():
            atomic_write(found, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=2)))

    def tile_path(self, k: int) -> Path:
        return self.path / "tiles" / f"{k:07d}.npz"

    def done(self, k: int) -> bool:
        return self.tile_path(k).is_file()

    def save(self, k: int, result: TileResult) -> None:
        table = {c: np.array([r[c] for r in result.rows]) for c in result.rows[0]} if result.rows else {}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, labels=result.labels, origin=np.array(result.origin, np.int64),
                                    cut=result.cut, outside=result.outside,
                                    **{f"row_{c}": v for c, v in table.items()})

        atomic_write(self.tile_path(k), write)

    def load(self, k: int) -> TileResult:
        try:
            with np.load(self.tile_path(k)) as z:
                cols = {key[4:]: z[key] for key in z.files if key.startswith("row_")}
                n = len(next(iter(cols.values()))) if cols else 0
                rows = [{c: v[i].item() for c, v in cols.items()} for i in range(n)]
                return TileResult(origin=(int(z["origin"][0]), int(z["origin"][1])), labels=z["labels"],
                                  rows=rows, cut=int(z["cut"]), outside=int(z["outside"]))
        except (OSError, ValueError, KeyError, StopIteration) as err:
            raise HistosynthError(f"a saved tile of the run in progress is damaged ({err}); delete {self.path} "
                                  "to start again", self.tile_path(k)) from err

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def check_output(out: Path, slide: Slide) -> None:
    """Refuse an output folder that holds something else than this slide's earlier result."""
    if not out.exists():
        return
    if not out.is_dir():
        raise HistosynthError("the output exists and is not a folder", out)
    report = out / REPORT
    if not report.is_file():
        if any(out.iterdir()):
            raise HistosynthError(f"the output folder is not empty and holds no {REPORT}: not a segment result; "
                                  "choose another folder", out)
        return
    try:
        theirs = json.loads(report.read_text())["slide"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HistosynthError(f"the output folder's {REPORT} is unreadable ({err}); delete the folder", out) from err
    mine = _slide_identity(slide)
    if theirs.get("path") != mine["path"] or theirs.get("size_bytes") != mine["size_bytes"]:
        raise HistosynthError(f"the output folder holds the result of another slide ({theirs.get('path')}); "
                              f"choose another folder for {mine['path']} or delete it", out)
    log.info("%s holds an earlier result for this slide: it is replaced", out)


# -- the stage ---------------------------------------------------------------------------------------
def segment_slide(
    model_path: str | os.PathLike,
    slide_path: str | os.PathLike,
    out: str | os.PathLike,
    params: SegmentParams | None = None,
    *,
    classes: dict[int, str] | None = None,
    mpp: float | None = None,
    mpp_fallback: float | None = None,
    max_pixels: int = MAX_PIXELS,
    device: str = "auto",
    threads: int | None = 1,
    precision: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Segment the nuclei of one whole slide into ``out`` (see the module docstring); returns the report."""
    import torch
    from tqdm import tqdm

    from histosynth.device import select_device
    from histosynth.models.hovernet import postprocess, sizes_at
    from histosynth.segmentation.segmenter import load_segmenter, network_margin, predict
    from histosynth.training import autocast, choose_precision, precision_name

    params = params or SegmentParams()
    params.check()
    out = Path(out)
    t_start = time.perf_counter()
    dev = select_device(device, threads)
    seg = load_segmenter(model_path, dev)
    if classes is not None and not same_classes(classes, seg.classes):
        raise HistosynthError(f"the model's classes {seg.classes} differ from the requested mapping {classes}: "
                              "segment with the class map the model was trained with", model_path)
    with open_slide(slide_path, mpp_fallback=mpp_fallback, max_pixels=max_pixels) as slide:
        check_output(out, slide)
        target = resolve_mpp(seg.mpp, slide, mpp, params.mpp_tolerance)
        ctx = network_margin(seg)
        d = target / slide.mpp
        tile = min(params.tile, int(min(slide.dimensions) / d))  # a slide smaller than a tile is one tile
        if tile < 2 * params.margin or tile < 16:
            raise HistosynthError(f"the slide is {slide.dimensions[0]}x{slide.dimensions[1]} px at {slide.mpp:.3g} "
                                  f"um/px: too small to segment at {target:.3g} um/px with a {params.margin}-px margin",
                                  slide_path)
        plan, candidates = plan_segment_tiles(slide, tile, target, params)
        d = plan.downsample
        outer = params.margin + ctx  # model pixels read around each core

        def forward_probe(dtype: torch.dtype | None) -> None:
            x = torch.zeros(1, 3, seg.input_size, seg.input_size, device=dev)
            with torch.no_grad(), autocast(dev, dtype):
                seg.model(x)

        amp = choose_precision(precision, dev, forward_probe)
        manifest = {"slide": _slide_identity(slide), "model": _model_identity(model_path, seg.step),
                    "params": asdict(params), "tile_px": tile, "mpp": target, "precision": precision_name(amp)}
        work = WorkFolder(out, manifest)
        sizes = sizes_at(target)
        counts = {"grid_tiles": len(plan.grid), "ruled_out_lowres": int((~candidates).sum()), "background": 0,
                  "tissue_tiles": 0, "resumed_tiles": 0, "nuclei": 0, "cut": 0, "outside_slide": 0}
        t_forward = 0.0
        regions = tissue_regions(slide, plan, candidates, tile, outer, params, counts, skip=work.done)
        for k, t, image in tqdm(regions, desc=f"segment {slide.name}", unit="tile", total=int(candidates.sum()),
                                disable=not progress, mininterval=5):
            t0 = time.perf_counter()
            maps = predict(seg, image, batch=params.batch, amp_dtype=amp, context=ctx)
            t_forward += time.perf_counter() - t0
            inst, types = postprocess(maps["np"], maps["hv"], maps.get("tp"), **sizes)
            origin = (int(round(t.x - params.margin * d)), int(round(t.y - params.margin * d)))
            result = own_nuclei(inst, types, maps, margin=params.margin, core=(tile, tile),
                                origin=origin, scale=d, mpp=target, slide_size=slide.dimensions, tile_id=k)
            work.save(k, result)
        if counts["tissue_tiles"] == 0:
            raise HistosynthError(f"no tissue found: all {len(plan.grid)} tiles of {tile} px at {target:.3g} "
                                  f"um/px are background (grey > {params.background_threshold} over more than "
                                  f"{1 - params.min_tissue:.0%} of the tile)", slide_path)
        report = {"stage": "segment", "slide": _slide_identity(slide), "model": _model_identity(model_path, seg.step),
                  "arm": seg.arm, "seed": seg.seed, "classes": {str(k): v for k, v in seg.classes.items()},
                  "mpp": target, "model_mpp": seg.mpp, "slide_mpp": slide.mpp, "downsample": d,
                  "params": asdict(params), "tile_px": tile, "precision": precision_name(amp),
                  "device": str(dev), "counts": counts}

        def finish(rep: dict[str, Any]) -> None:
            rep["seconds"] = seconds = time.perf_counter() - t_start
            rep["forward_seconds"] = t_forward
            tiles_now = counts["tissue_tiles"] - counts["resumed_tiles"]
            rep["tiles_per_second"] = tiles_now / seconds if tiles_now else None

        write_outputs(work, out, plan, seg.classes, report, slide.dimensions, d, params, counts, finish)
    work.remove()
    seconds = report["seconds"]
    log.info("%s: %d nuclei in %d tissue tiles (%d resumed, %d background, %d ruled out at low resolution); "
             "%d cut by the margin, %d centroids past the slide edge; %.1f s", slide_path, counts["nuclei"],
             counts["tissue_tiles"], counts["resumed_tiles"], counts["background"], counts["ruled_out_lowres"],
             counts["cut"], counts["outside_slide"], seconds)
    if counts["cut"]:
        log.warning("%d nuclei reach further past their tile than the margin of %d px and are cut: raise --margin",
                    counts["cut"], params.margin)
    return report


def plan_segment_tiles(slide: Slide, tile: int, mpp: float, params: SegmentParams):
    """The tiler's grid of ``tile``-px cores at ``mpp`` and, per grid tile, whether the low-resolution view
    allows tissue there (all True without such a view)."""
    from histosynth.slides.tiling import TileParams, lowres_candidates, plan_tiles

    tile_params = TileParams(size=tile, target_mpp=mpp, background_threshold=params.background_threshold,
                             max_background=1.0 - params.min_tissue, mpp_tolerance=0.01)
    plan = plan_tiles(slide, tile_params)
    candidates = lowres_candidates(slide, plan, tile_params)
    return plan, (np.ones(len(plan.grid), bool) if candidates is None else candidates)


def tissue_regions(slide: Slide, plan, candidates: np.ndarray, tile: int, outer: int, params: SegmentParams,
                   counts: dict[str, int], skip: Callable[[int], bool] = lambda k: False,
                   ) -> Iterator[tuple[int, Any, np.ndarray]]:
    """``(k, grid tile, region)`` for every core with at least ``params.min_tissue`` tissue, in grid order.

    The region is the core with ``outer`` model pixels around it (the margin and the network's context).
    Tiles for which ``skip(k)`` holds (finished in an earlier run) are counted as resumed and not read;
    ``counts`` gains ``tissue_tiles``, ``resumed_tiles`` and ``background``.
    """
    d = plan.downsample
    for k, t in enumerate(plan.grid):
        if not candidates[k]:
            continue
        if skip(k):
            counts["resumed_tiles"] += 1
            counts["tissue_tiles"] += 1
            continue
        image = read_region_at(slide, plan.level, plan.level_downsample, t.x - outer * d, t.y - outer * d,
                               tile + 2 * outer, d)
        core = image[outer : outer + tile, outer : outer + tile]
        inside = (min(tile, int(round((slide.dimensions[1] - t.y) / d))),
                  min(tile, int(round((slide.dimensions[0] - t.x) / d))))
        if _tissue_share(core, params.background_threshold, inside) < params.min_tissue:
            counts["background"] += 1
            continue
        counts["tissue_tiles"] += 1
        yield k, t, image


def read_region_at(slide: Slide, level: int, level_ds: float, x0: float, y0: float, size: int,
                   downsample: float) -> np.ndarray:
    """A ``size``-pixel square at ``downsample`` level-0 px per pixel, top-left at level-0 (x0, y0)."""
    import cv2

    n = max(1, int(round(size * downsample / level_ds)))
    region = slide.read_region(int(round(x0)), int(round(y0)), level, n, n)
    if n != size:
        region = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA if n > size else cv2.INTER_CUBIC)
    return np.ascontiguousarray(region)


def _tissue_share(rgb: np.ndarray, threshold: int, inside: tuple[int, int]) -> float:
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgb[: inside[0], : inside[1]]), cv2.COLOR_RGB2GRAY)
    return float((grey <= threshold).sum()) / float(rgb.shape[0] * rgb.shape[1])


def find_duplicates(work: WorkFolder, plan, tile: int, d: float) -> dict[int, set[int]]:
    """The nuclei reported by two neighbouring tiles: ``{tile: {local ids to drop}}``.

    Each tile post-processes its own predicted area, so a nucleus on a seam can come out of two tiles
    in slightly different shapes with their centroids on either side of it. Two nuclei of neighbouring
    tiles that overlap by more than half the smaller one's area are one nucleus: the larger (the one
    seen more whole) is kept. Tiles are looked at with their 8 neighbours only, a row of tiles at a time.
    """
    margin = _margin(work)
    cell = {}
    for k, t in enumerate(plan.grid):
        if work.done(k):
            cell[(int(round(t.x / (tile * d))), int(round(t.y / (tile * d))))] = k
    cache: dict[int, TileResult] = {}

    def get(k: int) -> TileResult:
        if k not in cache:
            cache[k] = work.load(k)
        return cache[k]

    drops: dict[int, set[int]] = {}
    for (gx, gy), k in sorted(cell.items(), key=lambda kv: kv[1]):
        for dx, dy in ((1, 0), (-1, 1), (0, 1), (1, 1)):
            k2 = cell.get((gx + dx, gy + dy))
            if k2 is None:
                continue
            a, b = get(k), get(k2)
            if not a.rows or not b.rows:
                continue
            # the two predicted areas in model pixels (their origins are level-0)
            ay, ax = round(plan.grid[k].y / d) - margin, round(plan.grid[k].x / d) - margin
            by, bx = round(plan.grid[k2].y / d) - margin, round(plan.grid[k2].x / d) - margin
            y0, x0 = max(ay, by), max(ax, bx)
            y1 = min(ay + a.labels.shape[0], by + b.labels.shape[0])
            x1 = min(ax + a.labels.shape[1], bx + b.labels.shape[1])
            if y0 >= y1 or x0 >= x1:
                continue
            la = a.labels[y0 - ay : y1 - ay, x0 - ax : x1 - ax].astype(np.int64)
            lb = b.labels[y0 - by : y1 - by, x0 - bx : x1 - bx].astype(np.int64)
            both = (la > 0) & (lb > 0)
            if not both.any():
                continue
            pairs, overlap = np.unique(la[both] * (len(b.rows) + 1) + lb[both], return_counts=True)
            area_a = {r["local_id"]: r["area_px"] for r in a.rows}
            area_b = {r["local_id"]: r["area_px"] for r in b.rows}
            for code, n in zip(pairs.tolist(), overlap.tolist()):
                ia, ib = divmod(code, len(b.rows) + 1)
                if n > 0.5 * min(area_a[ia], area_b[ib]):
                    if area_a[ia] >= area_b[ib]:
                        drops.setdefault(k2, set()).add(ib)
                    else:
                        drops.setdefault(k, set()).add(ia)
        # tiles of rows above the current one are done with
        for old in [c for c in cache if plan.grid[c].y < plan.grid[k].y - tile * d * 1.5]:
            del cache[old]
    return drops


def without(result: TileResult, drop: set[int]) -> TileResult:
    """``result`` without the nuclei ``drop`` (local ids), the others renumbered 1..m in their order."""
    if not drop:
        return result
    lut = np.zeros(len(result.rows) + 1, np.int32)
    rows = []
    for r in result.rows:
        if r["local_id"] not in drop:
            rows.append({**r, "local_id": len(rows) + 1})
            lut[r["local_id"]] = len(rows)
    return TileResult(origin=result.origin, labels=lut[result.labels], rows=rows, cut=result.cut,
                      outside=result.outside)


def _tiles_in_order(work: WorkFolder, n_grid: int, drops: dict[int, set[int]]) -> Iterator[tuple[int, TileResult]]:
    for k in range(n_grid):
        if work.done(k):
            yield k, without(work.load(k), drops.get(k, set()))


def write_outputs(work: WorkFolder, out: Path, plan, class_map: dict[int, str],
                  report: dict[str, Any], dimensions: tuple[int, int], d: float, params: SegmentParams,
                  counts: dict[str, int], finish: Callable[[dict[str, Any]], None]) -> None:
    """nuclei.geojson, nuclei.csv (and labels.tif) from the saved tiles, then ``finish(report)`` and the
    report, into a temporary folder renamed to ``out`` when all is written."""
    from histosynth.io.qupath import instances_to_features, write_feature_collections

    drops = find_duplicates(work, plan, report["tile_px"], d)
    counts["duplicates_removed"] = sum(map(len, drops.values()))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        offsets: dict[int, int] = {}
        total = 0
        with open(tmp / "nuclei.csv", "w", newline="") as csv_fh:
            rows_out = csv.DictWriter(csv_fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            rows_out.writeheader()

            def features() -> Iterator[list[dict]]:
                # one tile's nuclei at a time: its CSV rows, then its GeoJSON features
                nonlocal total
                for k, result in _tiles_in_order(work, len(plan.grid), drops):
                    offsets[k] = total
                    counts["cut"] += result.cut
                    counts["outside_slide"] += result.outside
                    if not result.rows:
                        continue
                    measurements = {}
                    for r in result.rows:
                        r["id"] = total + r["local_id"]
                        r["type_name"] = class_map.get(int(r["type"]), "") if r["type"] else ""
                        # QuPath measurements are numbers: a model without a type branch has no type probability
                        measurements[r["local_id"]] = {k: r[v] for k, v in MEASUREMENTS.items()
                                                       if math.isfinite(r[v])}
                        rows_out.writerow({c: _csv_value(r[c]) for c in CSV_COLUMNS})
                    types = np.zeros(len(result.rows) + 1, np.uint8)
                    types[[r["local_id"] for r in result.rows]] = [r["type"] for r in result.rows]
                    yield instances_to_features(result.labels, types[result.labels], class_map, offset=result.origin,
                                                scale=d, measurements=measurements, object_type="detection",
                                                id_prefix=f"{report['slide']['name']}:{k}")
                    total += len(result.rows)

            write_feature_collections(features(), tmp / "nuclei.geojson")
        counts["nuclei"] = total
        if params.label_tiff:
            write_label_tiff(tmp / "labels.tif", work, plan, offsets, drops, dimensions, d, report["mpp"])
        report["outputs"] = sorted([p.name for p in tmp.iterdir()] + [REPORT])
        finish(report)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=float))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 4)
    return v


def write_label_tiff(path: Path, work: WorkFolder, plan, offsets: dict[int, int], drops: dict[int, set[int]],
                     dimensions: tuple[int, int], d: float, mpp: float) -> None:
    """The instance ids of the whole slide at the model's resolution, as a tiled uint32 TIFF.

    Band by band (``LABEL_BAND`` rows): each band is painted from the saved tiles whose area
    overlaps it (a pixel claimed by two neighbouring tiles' nuclei keeps the first).
    """
    import tifffile

    width, height = (int(math.ceil(v / d)) for v in dimensions)
    # the tiles' areas in model pixels, to find those that overlap a band
    spans = {}
    for k in offsets:
        x, y = plan.grid[k].x, plan.grid[k].y
        spans[k] = (int(round(x / d)), int(round(y / d)))
    cache: dict[int, TileResult] = {}

    def bands() -> Iterator[np.ndarray]:
        for y0 in range(0, height, LABEL_BAND):
            y1 = min(height, y0 + LABEL_BAND)
            band = np.zeros((y1 - y0, width), np.uint32)
            for k, offset in offsets.items():
                if k not in cache:
                    r_top = spans[k][1] - _margin(work)
                    if not (r_top < y1 and r_top + _area(work) > y0):
                        continue
                    cache[k] = without(work.load(k), drops.get(k, set()))
                res = cache[k]
                top, left = spans[k][1] - _margin(work), spans[k][0] - _margin(work)
                lab = res.labels
                ya, yb = max(y0, top), min(y1, top + lab.shape[0])
                xa, xb = max(0, left), min(width, left + lab.shape[1])
                if ya >= yb or xa >= xb:
                    continue
                piece = lab[ya - top : yb - top, xa - left : xb - left]
                dst = band[ya - y0 : yb - y0, xa:xb]
                free = (dst == 0) & (piece > 0)
                dst[free] = piece[free].astype(np.uint32) + offset
            for k in [k for k, res in cache.items() if spans[k][1] - _margin(work) + res.labels.shape[0] <= y1]:
                del cache[k]
            yield band

    res_cm = 1e4 / mpp  # pixels per centimetre
    tifffile.imwrite(path, _tiff_tiles(bands(), width), shape=(height, width), dtype=np.uint32, bigtiff=True,
                     tile=(LABEL_BAND, LABEL_BAND), compression="zlib",
                     resolution=(res_cm, res_cm), resolutionunit="CENTIMETER",
                     description=json.dumps({"histosynth": "segment labels", "mpp": mpp}))


def _margin(work: WorkFolder) -> int:
    return int(work.manifest["params"]["margin"])


def _area(work: WorkFolder) -> int:
    return int(work.manifest["tile_px"]) + 2 * _margin(work)


def _tiff_tiles(bands: Iterator[np.ndarray], width: int) -> Iterator[np.ndarray]:
    """The TIFF tiles of ``LABEL_BAND``-row bands, in tifffile's row-major tile order (edge tiles padded)."""
    for band in bands:
        for x0 in range(0, width, LABEL_BAND):
            tile = np.zeros((LABEL_BAND, LABEL_BAND), np.uint32)
            piece = band[:, x0 : x0 + LABEL_BAND]
            tile[: piece.shape[0], : piece.shape[1]] = piece
            yield tile
