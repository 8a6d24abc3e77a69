"""Cell z-stacks from multi-focus slides: find cells, pick each one's in-focus plane, cut size x size x Z stacks.

Per slide, in tiles of :data:`TILE` pixels (each read with a margin of one stack side, so that a cell near a
tile edge is found whole and cut from the same read):

1. **In-focus composite** — an extended-depth-of-field image: each pixel taken from the plane where the local
   focus (absolute Laplacian of the grey image, box-averaged over 9 x 9 px) is highest.
2. **Cells** — nuclei are the darkest class of a three-class Otsu threshold (background / cytoplasm /
   nucleus) of the composite's grey image (smoothed, sigma 1 px), opened with a 3 x 3 cross; components of
   at least :data:`MIN_NUCLEUS_AREA` px are cells, centred on their centroid. A field with no contrast
   (grey range < 20 levels) has none.
3. **Best plane** — the plane whose variance of the Laplacian (grey, float) over the nucleus's bounding box,
   padded by 4 px, is highest: the nucleus's own window, so that a neighbour at another depth does not vote.
4. **Stack** — the size x size window centred on the cell in every plane. A cell whose window runs past the
   slide's edge is skipped, counted and logged (and recorded in report.json), never silently.

``max_cells`` keeps a seeded random subset of the cells found (over all slides); ``augment`` adds, per
cell, the paper's rotations by 90, 180 and 270 degrees and its up-down and left-right mirrors (the same
transform on every plane), as rows with ``source`` ``augmented`` and column ``augment`` naming the transform.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from histosynth.errors import HistosynthError
from histosynth.multifocus.stackset import StackSetWriter
from histosynth.multifocus.zstack import open_zstack

log = logging.getLogger(__name__)

TILE = 2048
MIN_NUCLEUS_AREA = 20
AUGMENTS = {
    "rot90": lambda s: np.rot90(s, 1, axes=(1, 2)),
    "rot180": lambda s: np.rot90(s, 2, axes=(1, 2)),
    "rot270": lambda s: np.rot90(s, 3, axes=(1, 2)),
    "flipud": lambda s: s[:, ::-1],
    "fliplr": lambda s: s[:, :, ::-1],
}


def _grey(stack: np.ndarray) -> np.ndarray:
    """(Z, H, W, 3) uint8 -> (Z, H, W) float32 grey."""
    return (stack.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))


def focus_composite(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The extended-depth-of-field composite (H, W, 3) and the per-pixel plane it came from (H, W)."""
    grey = _grey(stack)
    focus = np.stack([cv2.blur(np.abs(cv2.Laplacian(g, cv2.CV_32F)), (9, 9)) for g in grey])
    best = np.argmax(focus, axis=0)
    composite = np.take_along_axis(stack, best[None, :, :, None], axis=0)[0]
    return composite, best


def focus_measure(stack: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each plane of a (Z, h, w, 3) window: (Z,) float."""
    return np.array([cv2.Laplacian(g.astype(np.float64), cv2.CV_64F).var() for g in _grey(stack)])


def find_cells(composite: np.ndarray) -> list[tuple[float, float, tuple[int, int, int, int]]]:
    """Cells of an in-focus image: (cx, cy, nucleus bbox (x0, y0, x1, y1)) each (see the module's docstring)."""
    from skimage.filters import threshold_multiotsu

    grey = cv2.GaussianBlur(cv2.cvtColor(composite, cv2.COLOR_RGB2GRAY), (0, 0), 1.0)
    if int(grey.max()) - int(grey.min()) < 20:
        return []
    try:
        low, _high = threshold_multiotsu(grey, classes=3)
    except ValueError:  # too few grey levels for three classes
        return []
    nuclei = (grey <= low).astype(np.uint8)
    nuclei = cv2.morphologyEx(nuclei, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)))
    n, _labels, stats, centroids = cv2.connectedComponentsWithStats(nuclei, connectivity=8)
    cells = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= MIN_NUCLEUS_AREA:
            cells.append((float(centroids[i][0]), float(centroids[i][1]), (x, y, x + w, y + h)))
    return cells


def best_plane(stack: np.ndarray, bbox: tuple[int, int, int, int], pad: int = 4) -> int:
    """The plane of highest :func:`focus_measure` over ``bbox`` (padded, clipped to the stack) of (Z, H, W, 3)."""
    x0, y0, x1, y1 = bbox
    h, w = stack.shape[1:3]
    window = stack[:, max(y0 - pad, 0) : min(y1 + pad, h), max(x0 - pad, 0) : min(x1 + pad, w)]
    return int(np.argmax(focus_measure(window)))


def slide_cells(path: str | os.PathLike, size: int, *, planes: int | None = None,
                mpp_fallback: float | None = None, tile: int = TILE):
    """Yield ``(row, stack)`` for every cell of one z-stack slide, and count the skipped ones.

    A generator whose return value (``StopIteration.value``) is ``{"found", "skipped_border"}``; the
    first thing it yields is the slide's ``(planes, offsets, mpp)``.
    """
    with open_zstack(path, mpp_fallback=mpp_fallback) as zs:
        if planes is not None and zs.planes != planes:
            raise HistosynthError(f"{zs.planes} focal planes; {planes} were asked for (--planes)", path)
        yield zs.planes, zs.plane_offsets_um, zs.mpp
        w, h = zs.dimensions
        half = size // 2
        margin = size
        found = skipped = 0
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                cw, ch = min(tile, w - tx), min(tile, h - ty)
                rx, ry = tx - margin, ty - margin
                region = zs.read_region(rx, ry, cw + 2 * margin, ch + 2 * margin)
                composite, _ = focus_composite(region)
                for cx, cy, bbox in find_cells(composite):
                    gx, gy = int(round(cx)) + rx, int(round(cy)) + ry  # level-0 centre
                    if not (tx <= gx < tx + cw and ty <= gy < ty + ch):
                        continue  # found in the margin: the neighbouring tile owns it
                    found += 1
                    x0, y0 = gx - half, gy - half
                    if x0 < 0 or y0 < 0 or x0 + size > w or y0 + size > h:
                        skipped += 1
                        continue
                    lx, ly = x0 - rx, y0 - ry
                    stack = np.ascontiguousarray(region[:, ly : ly + size, lx : lx + size])
                    row = {"slide": zs.name, "x": gx, "y": gy, "best_plane": best_plane(region, bbox),
                           "source": "real", "augment": ""}
                    yield row, stack
        if skipped:
            log.info("%s: %d of %d cells skipped: their %d x %d window runs past the slide's edge",
                     path, skipped, found, size, size)
        return {"found": found, "skipped_border": skipped}


def extract_stacks(slides: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, size: int = 64,
                   planes: int | None = None, max_cells: int | None = None, min_cells: int = 1,
                   augment: bool = False, seed: int = 0, mpp_fallback: float | None = None) -> dict:
    """Write the cell stacks of ``slides`` as one stack set at ``out_dir``; returns its report."""
    if size < 8 or size % 2:
        raise HistosynthError(f"the stack side must be an even number of at least 8 pixels, got {size}")
    if not slides:
        raise HistosynthError("no slides given")
    cells: list[tuple[dict, np.ndarray]] = []
    per_slide: dict[str, dict] = {}
    planes_seen = offsets_seen = first = None
    for path in slides:
        gen = slide_cells(path, size, planes=planes, mpp_fallback=mpp_fallback)
        z, offsets, mpp = next(gen)
        if first is None:
            first, planes_seen, offsets_seen = path, z, offsets
        elif z != planes_seen:
            raise HistosynthError(f"{z} focal planes, but {first} has {planes_seen}: one stack set holds one "
                                  "plane count", path)
        elif any((a is None) != (b is None) or (a is not None and abs(a - b) > 1e-3)
                 for a, b in zip(offsets, offsets_seen)):
            raise HistosynthError(f"focal offsets {offsets} µm differ from {first}'s {offsets_seen}", path)
        n_before = len(cells)
        while True:
            try:
                cells.append(next(gen))
            except StopIteration as stop:
                counts = stop.value
                break
        counts["kept"] = len(cells) - n_before
        counts["mpp"] = mpp
        per_slide[str(path)] = counts
        log.info("%s: %d cells found, %d kept, %d skipped at the border", path, counts["found"], counts["kept"],
                 counts["skipped_border"])
    if len(cells) < min_cells:
        skipped = sum(c["skipped_border"] for c in per_slide.values())
        raise HistosynthError(f"{len(cells)} cells found in {len(slides)} slide(s) ({skipped} more skipped at the "
                              f"border); at least {min_cells} needed (--min-cells)", Path(slides[0]))
    if max_cells is not None and len(cells) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(len(cells), max_cells, replace=False))
        log.info("keeping %d of %d cells (--max-cells, seed %d)", max_cells, len(cells), seed)
        cells = [cells[i] for i in keep]
    with StackSetWriter(out_dir, planes=int(planes_seen), size=(size, size), plane_offsets_um=offsets_seen,
                        extra_columns=["augment"]) as writer:
        for row, stack in cells:
            writer.add(row, stack)
            if augment:
                for name, transform in AUGMENTS.items():
                    writer.add({**row, "source": "augmented", "augment": name},
                               np.ascontiguousarray(transform(stack)))
        writer.report.update(stage="extract_stacks", slides=per_slide, cells=len(cells), stacks=len(writer),
                             size=size, augment=augment, max_cells=max_cells, min_cells=min_cells, seed=seed,
                             best_plane="variance of the Laplacian over the nucleus box + 4 px",
                             composite="per-pixel plane of highest local |Laplacian| (9 x 9 box)")
        report = dict(writer.report)
    return report
