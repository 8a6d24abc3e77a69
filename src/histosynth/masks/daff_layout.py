"""DAFF-GAN's first two stages (``sample_masks.method: daff``): a library of centroid-point images, new point
layouts made from it, and G1's typed masks turned into instances.

Seed "Deep Adversarial Image Synthesis for Nuclei Segmentation of Histopathology Image", section III.A.1:
"We first calculate the center point of each cell instance based on the segmentation mask labels in the
original training dataset. All the original point images will be collected and stored in a library. [...]
We extract images from the original point image library and randomize them using various image transform
operations including random cover, flip, rotation, random generate, random combination, and random affine
transformation." Section III.A.2: G1 "translate[s] centroid point images to different types of nuclei masks".

**The library** (:func:`build_centroid_library`, ``histosynth daff-library``): one entry per tile with at
least one nucleus — every patch of the given typed patch sets (each instance's centroid, the mean of its pixel
coordinates rounded to the nearest pixel, and its type, the majority type of its pixels; untyped instances
are left out), and every
``tile`` × ``tile`` window of a point-annotation file (GeoJSON ``Point`` / ``MultiPoint`` features, level-0
pixels, their class names mapped through the class map; windows on a grid from the points' bounding box).
Saved as an .npz (written atomically): ``points`` (P, 3) int32 rows (y, x, type), ``offsets`` (T + 1,)
int64 (entry t holds ``points[offsets[t]:offsets[t+1]]``), ``shapes`` (T, 2) int32 (height, width of each
tile), ``mpp`` (T,) float64 (NaN when unknown), ``sources`` (T,) str, ``classes`` (the one class-map JSON)
and ``min_distance`` (the 1st percentile of the nearest-neighbour distances between the library's
points, at least 1 px). A library without a single point is an error naming the file it would be written
to (and, at load, naming the file read).

**The layout operations** (:class:`LayoutSampler`), each a pure function of a numpy Generator. The paper
names them and says no more; what each does here:

- *take*: an entry of the library drawn uniformly, and a ``size`` × ``size`` window of it at a uniform
  offset (a tile smaller than ``size`` is placed at a uniform offset in the empty canvas);
- *flip*: with probability 1/2 a left-right flip, independently with 1/2 an up-down flip;
- *rotate*: a rotation by an angle uniform in [0°, 360°) about the canvas centre; points that leave the
  canvas are dropped;
- *affine*: a random affine map about the canvas centre: scale in [0.9, 1.1] per axis and shear in
  [−0.1, 0.1] (mild: nucleus spacing is a property of the tissue and stays near the real one);
- *cover*: "random cover" read as a cut-and-paste: the points inside a random axis-aligned rectangle
  (sides uniform in [size/4, size/2]) are removed and replaced by the points of the same rectangle of a
  second, independently taken (and flipped / rotated / transformed) layout;
- *combine*: "random combination" read as a half-plane mix of two layouts: a straight line through a
  uniform point of the canvas at a uniform angle; the points on one side come from the first layout, the
  others from a second, independently taken one.

"Random generate" (points from nothing) is not implemented: the library-based operations already make new
layouts, and points drawn from nothing would not keep the real spacing. One layout applies ``take`` and
then each enabled operation (``ops``; default all five) with probability 1/2, in the order flip, rotate,
affine, cover, combine. Wherever two layouts meet (cover, combine), a point closer than the library's
``min_distance`` to a point already kept is dropped, so that no two nuclei are seeded on top of each other.

**Instances from G1** (:func:`instances_from_g1`): G1 (:mod:`histosynth.models.daff_g1`) returns 1 + K
channels in [−1, 1]: the nucleus foreground and one channel per type. The foreground is the pixels where
channel 0 > 0 (foreground probability (x + 1)/2 > 0.5). Instances are the watershed
(``skimage.segmentation.watershed``) of the negated Euclidean distance transform of the foreground, with
the input points as markers (each point its own label) and the foreground as the mask: each point grows
its own nucleus and touching nuclei are split where the distance transform has its saddle. A point whose
pixel is not foreground gets no instance (counted as ``unseeded``); foreground that no point reaches is
dropped (counted as ``orphan_px``). Each instance takes its point's type (the layout decided it); how often
G1's own type channels agree (per-instance majority of the per-pixel argmax) is reported as
``type_agreement``. Instance ids are 1..n per mask, in the order of the points.

Determinism: shard k of seed K draws from ``SeedSequence(K, spawn_key=(k,))``; G1 runs in eval mode (its
BatchNorm running statistics; no dropout) on the CPU in float32, so the same inputs give the same masks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_write
from histosynth.io.labels import class_columns, class_map_to_json, classes_of_patch_sets, read_class_map

log = logging.getLogger(__name__)

#: the layout operations, in the order they are applied
OPS = ("flip", "rotate", "affine", "cover", "combine")
LIBRARY_KEYS = ("points", "offsets", "shapes", "mpp", "sources", "classes", "min_distance")
SCALE_RANGE = (0.9, 1.1)
SHEAR_RANGE = (-0.1, 0.1)


# -- the library ------------------------------------------------------------------------------------------
@dataclass
class CentroidLibrary:
    """Centroid-point images: entry t is ``points[offsets[t]:offsets[t+1]]`` (y, x, type) in a tile of
    ``shapes[t]`` (height, width)."""

    points: np.ndarray
    offsets: np.ndarray
    shapes: np.ndarray
    mpp: np.ndarray
    sources: np.ndarray
    classes: dict[int, str]
    min_distance: float

    def __len__(self) -> int:
        return len(self.shapes)

    def entry(self, t: int) -> np.ndarray:
        return self.points[self.offsets[t]:self.offsets[t + 1]]


def centroids(inst: np.ndarray, types: np.ndarray) -> np.ndarray:
    """(n, 3) int32 rows (y, x, type) of every instance of ``inst``: the mean of its pixel coordinates,
    rounded, and the majority type of its pixels (ascending instance ids)."""
    from histosynth.io.labels import instance_types

    inst = np.asarray(inst)
    ids, typ = instance_types(inst, types)
    if len(ids) == 0:
        return np.zeros((0, 3), np.int32)
    ys, xs = np.nonzero(inst)
    lab = np.searchsorted(ids, inst[ys, xs])
    count = np.bincount(lab, minlength=len(ids))
    cy = np.bincount(lab, ys, minlength=len(ids)) / count
    cx = np.bincount(lab, xs, minlength=len(ids)) / count
    return np.stack([np.rint(cy), np.rint(cx), typ], axis=1).astype(np.int32)


def read_point_annotations(path: str | os.PathLike, class_map: Mapping[int, str]) -> tuple[np.ndarray, int]:
    """Point annotations of a GeoJSON file: (n, 3) float rows (y, x, type id) and the number of non-point
    features skipped. A class name not in ``class_map`` (compared loosely) is an error naming the feature."""
    from histosynth.io.annotations import read_geojson_points
    from histosynth.io.labels import class_key

    found, skipped = read_geojson_points(path)
    by_key = {class_key(name): tid for tid, name in class_map.items()}
    rows: list[tuple[float, float, int]] = []
    for x, y, name, i in found:
        tid = by_key.get(class_key(name)) if name else None
        if tid is None:
            known = ", ".join(class_map.values())
            raise HistosynthError(f"feature {i}: class {name!r} is not in the class map ({known})", path)
        rows.append((y, x, int(tid)))
    return np.asarray(rows, np.float64).reshape(-1, 3), skipped


def _nn_distances(points: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    out = []
    for t in range(len(offsets) - 1):
        p = points[offsets[t]:offsets[t + 1], :2].astype(np.float64)
        if len(p) > 1:
            d, _ = cKDTree(p).query(p, k=2)
            out.append(d[:, 1])
    return np.concatenate(out) if out else np.zeros(0)


def build_centroid_library(patch_sets: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                           point_files: Sequence[str | os.PathLike] = (), tile: int = 256,
                           classes: Mapping[Any, Any] | None = None) -> dict[str, Any]:
    """The centroid library of ``patch_sets`` (typed patch sets) and ``point_files`` (GeoJSON points, cut into
    ``tile`` × ``tile`` windows) written to ``out`` (.npz); returns a report. See the module docstring."""
    from histosynth.io.patchset import read_patchset

    if not patch_sets and not point_files:
        raise HistosynthError("the centroid library needs at least one patch set or point-annotation file", out)
    if tile < 8:
        raise HistosynthError(f"--tile must be at least 8 px, got {tile}")
    if classes:
        class_map = read_class_map(classes, "classes")
    elif patch_sets:
        class_map = classes_of_patch_sets(patch_sets)
    else:
        raise HistosynthError("point-annotation files need a class map (--classes NAME=ID ...)", out)
    entries: list[np.ndarray] = []
    shapes: list[tuple[int, int]] = []
    mpps: list[float] = []
    sources: list[str] = []
    for ps_path in patch_sets:
        ps = read_patchset(ps_path, require=("inst", "types"))
        h, w = ps.inst.shape[1:3]
        mpp_col = ps.index["mpp"].to_numpy(np.float64) if "mpp" in ps.index.columns else np.full(len(ps), np.nan)
        for i in range(len(ps)):
            pts = centroids(ps.inst[i], ps.types[i])
            pts = pts[pts[:, 2] > 0]  # an untyped nucleus (no typed pixel) has no channel in G1's input
            if len(pts):
                entries.append(pts)
                shapes.append((h, w))
                mpps.append(float(mpp_col[i]))
                sources.append(f"{ps_path}#{i}")
    n_point_files = 0
    for pf in point_files:
        pts, skipped = read_point_annotations(pf, class_map)
        if skipped:
            log.info("%s: %d features that are not points skipped", pf, skipped)
        if not len(pts):
            continue
        n_point_files += 1
        y0, x0 = np.floor(pts[:, :2].min(axis=0))
        ty = ((pts[:, 0] - y0) // tile).astype(np.int64)
        tx = ((pts[:, 1] - x0) // tile).astype(np.int64)
        for cell in np.unique(np.stack([ty, tx], 1), axis=0):
            sel = (ty == cell[0]) & (tx == cell[1])
            local = pts[sel].copy()
            local[:, 0] -= y0 + cell[0] * tile
            local[:, 1] -= x0 + cell[1] * tile
            local[:, :2] = np.clip(np.floor(local[:, :2]), 0, tile - 1)
            entries.append(local.astype(np.int32))
            shapes.append((tile, tile))
            mpps.append(float("nan"))
            sources.append(f"{pf}@{int(x0 + cell[1] * tile)},{int(y0 + cell[0] * tile)}")
    n_points = int(sum(len(e) for e in entries))
    if n_points == 0:
        raise HistosynthError(
            f"the centroid library would hold no points: the {len(patch_sets)} patch set(s) have no nuclei and the "
            f"{len(point_files)} point file(s) no Point features", out)
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in entries])]).astype(np.int64)
    points = np.concatenate(entries).astype(np.int32)
    nn = _nn_distances(points, offsets)
    min_distance = float(max(1.0, np.percentile(nn, 1))) if len(nn) else 1.0
    arrays = {"points": points, "offsets": offsets, "shapes": np.asarray(shapes, np.int32),
              "mpp": np.asarray(mpps, np.float64), "sources": np.asarray(sources, dtype=np.str_),
              "classes": np.asarray(json.dumps(class_map_to_json(class_map))),
              "min_distance": np.asarray(min_distance)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(out, write)
    per_type = np.bincount(points[:, 2], minlength=max(class_map, default=0) + 1)
    report = {"entries": len(entries), "points": n_points, "point_files": n_point_files,
              "min_distance": min_distance, "per_type": {class_map.get(t, str(t)): int(per_type[t])
                                                         for t in range(1, len(per_type))}}
    log.info("centroid library %s: %d point images, %d points (%s), min distance %.1f px", out, len(entries),
             n_points, ", ".join(f"{k} {v}" for k, v in report["per_type"].items()), min_distance)
    return report


def load_centroid_library(path: str | os.PathLike) -> CentroidLibrary:
    """Read a library written by :func:`build_centroid_library`; one clear error naming the file otherwise."""
    from histosynth.masks.library import read_npz

    path = Path(path)
    data = read_npz(path, LIBRARY_KEYS, "centroid library")
    points = data["points"]
    offsets = data["offsets"]
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise HistosynthError(f"the centroid library holds no points (key 'points' has shape {points.shape})", path)
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(points) or np.any(np.diff(offsets) < 0) \
            or len(offsets) != len(data["shapes"]) + 1:
        raise HistosynthError("the centroid library's 'offsets' do not index its 'points'", path)
    try:
        classes = read_class_map(json.loads(str(data["classes"])), path)
    except ValueError as err:
        raise HistosynthError(f"classes is not a JSON class map: {err}", path) from err
    return CentroidLibrary(points.astype(np.int32), offsets.astype(np.int64), data["shapes"].astype(np.int32),
                           data["mpp"].astype(np.float64), data["sources"], classes, float(data["min_distance"]))


# -- the layout operations ----------------------------------------------------------------------------------
def flip(points: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Left-right with probability 1/2, then up-down with 1/2 (float (n, 3) rows y, x, type)."""
    p = points.copy()
    if rng.random() < 0.5:
        p[:, 1] = size - 1 - p[:, 1]
    if rng.random() < 0.5:
        p[:, 0] = size - 1 - p[:, 0]
    return p


def _about_centre(points: np.ndarray, size: int, matrix: np.ndarray) -> np.ndarray:
    c = (size - 1) / 2.0
    p = points.copy()
    p[:, :2] = (points[:, :2] - c) @ matrix.T + c
    return p


def rotate(points: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A rotation by a uniform angle about the canvas centre."""
    a = rng.uniform(0.0, 2 * math.pi)
    return _about_centre(points, size, np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]))


def affine(points: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Scale in :data:`SCALE_RANGE` per axis and shear in :data:`SHEAR_RANGE` about the canvas centre."""
    sy, sx = rng.uniform(*SCALE_RANGE, size=2)
    shear = rng.uniform(*SHEAR_RANGE)
    return _about_centre(points, size, np.array([[sy, shear], [0.0, sx]]))


def inside(points: np.ndarray, size: int) -> np.ndarray:
    """The points whose rounded position lies on the canvas."""
    r = np.rint(points[:, :2])
    return points[np.all((r >= 0) & (r <= size - 1), axis=1)]


def keep_apart(first: np.ndarray, second: np.ndarray, min_distance: float) -> np.ndarray:
    """``first`` and those of ``second`` at least ``min_distance`` from every point of ``first``."""
    if len(first) == 0 or len(second) == 0:
        return np.concatenate([first, second])
    from scipy.spatial import cKDTree

    d, _ = cKDTree(first[:, :2]).query(second[:, :2], k=1)
    return np.concatenate([first, second[d >= min_distance]])


class LayoutSampler:
    """New point layouts from a :class:`CentroidLibrary` (module docstring): :meth:`layout` gives one."""

    def __init__(self, library: CentroidLibrary, size: int, ops: Sequence[str] = OPS):
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise HistosynthError(f"unknown layout operation(s) {unknown}; known: {', '.join(OPS)}")
        if size < 8:
            raise HistosynthError(f"the layout side must be at least 8 px, got {size}")
        self.library, self.size, self.ops = library, int(size), tuple(o for o in OPS if o in ops)

    def take(self, rng: np.random.Generator) -> np.ndarray:
        """A library entry at a uniform offset in (or window of) the canvas: float (n, 3)."""
        lib, s = self.library, self.size
        t = int(rng.integers(len(lib)))
        p = lib.entry(t).astype(np.float64)
        h, w = (int(v) for v in lib.shapes[t])
        oy = -int(rng.integers(0, h - s + 1)) if h >= s else int(rng.integers(0, s - h + 1))
        ox = -int(rng.integers(0, w - s + 1)) if w >= s else int(rng.integers(0, s - w + 1))
        p[:, 0] += oy
        p[:, 1] += ox
        return inside(p, s)

    def transformed(self, rng: np.random.Generator) -> np.ndarray:
        """``take`` then flip / rotate / affine (those enabled), each with probability 1/2."""
        p = self.take(rng)
        for name, op in (("flip", flip), ("rotate", rotate), ("affine", affine)):
            if name in self.ops and rng.random() < 0.5:
                p = inside(op(p, self.size, rng), self.size)
        return p

    def cover(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        hh, ww = rng.integers(s // 4, s // 2 + 1, size=2)
        y0, x0 = int(rng.integers(0, s - hh + 1)), int(rng.integers(0, s - ww + 1))
        other = self.transformed(rng)

        def in_rect(q: np.ndarray) -> np.ndarray:
            return (q[:, 0] >= y0) & (q[:, 0] < y0 + hh) & (q[:, 1] >= x0) & (q[:, 1] < x0 + ww)

        return keep_apart(other[in_rect(other)], p[~in_rect(p)], self.library.min_distance)

    def combine(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        cy, cx = rng.uniform(0, s, size=2)
        a = rng.uniform(0, math.pi)
        other = self.transformed(rng)

        def side(q: np.ndarray) -> np.ndarray:
            return (q[:, 0] - cy) * math.cos(a) - (q[:, 1] - cx) * math.sin(a) >= 0

        return keep_apart(p[side(p)], other[~side(other)], self.library.min_distance)

    def layout(self, rng: np.random.Generator) -> np.ndarray:
        """One new layout: int32 (n, 3) rows (y, x, type), positions on the canvas, no two on one pixel."""
        p = self.transformed(rng)
        if "cover" in self.ops and rng.random() < 0.5:
            p = self.cover(p, rng)
        if "combine" in self.ops and rng.random() < 0.5:
            p = self.combine(p, rng)
        out = np.rint(p).astype(np.int32)
        _, first = np.unique(out[:, 0] * self.size + out[:, 1], return_index=True)
        return out[np.sort(first)]


# -- point images and instances ------------------------------------------------------------------------------
def point_image(points: np.ndarray, size: int | tuple[int, int], n_types: int, radius: int) -> np.ndarray:
    """G1's input: float32 (n_types, H, W) in {−1, 1}; +1 in a disk of ``radius`` px around each point, on the
    channel of its type (type t → channel t − 1; type 0 or > n_types: no channel)."""
    h, w = (size, size) if isinstance(size, int) else size
    img = np.full((n_types, h, w), -1.0, np.float32)
    r = int(radius)
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = dy**2 + dx**2 <= r * r
    dy, dx = dy[disk], dx[disk]
    for y, x, t in np.asarray(points, np.int64):
        if not 1 <= t <= n_types:
            continue
        yy, xx = y + dy, x + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        img[t - 1, yy[ok], xx[ok]] = 1.0
    return img


def instances_from_g1(output: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(inst int32, types uint8, counts) from G1's output (1 + K, H, W) and the layout's points (module
    docstring): marker watershed of the foreground's distance transform, one instance per seeded point."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    output = np.asarray(output, np.float32)
    h, w = output.shape[1:]
    fg = output[0] > 0
    markers = np.zeros((h, w), np.int32)
    pts = np.asarray(points, np.int64).reshape(-1, 3)
    seeded = fg[pts[:, 0], pts[:, 1]] if len(pts) else np.zeros(0, bool)
    markers[pts[seeded, 0], pts[seeded, 1]] = np.arange(1, int(seeded.sum()) + 1, dtype=np.int32)
    if seeded.any():
        dist = ndimage.distance_transform_edt(fg)
        inst = watershed(-dist, markers, mask=fg).astype(np.int32)
    else:
        inst = np.zeros((h, w), np.int32)
    lut = np.zeros(int(seeded.sum()) + 1, np.uint8)
    lut[1:] = pts[seeded, 2]
    types = lut[inst]
    agree = 0
    n = int(seeded.sum())
    if n and output.shape[0] > 1:
        pixel_type = output[1:].argmax(axis=0) + 1
        sel = inst > 0
        table = np.bincount(inst[sel] * output.shape[0] + pixel_type[sel],
                            minlength=(n + 1) * output.shape[0]).reshape(n + 1, output.shape[0])[1:]
        agree = int(np.sum(table.argmax(axis=1) == lut[1:]))
    counts = {"points": len(pts), "instances": n, "unseeded": int(len(pts) - n),
              "orphan_px": int(np.sum(fg & (inst == 0))), "type_agree": agree}
    return inst, types, counts


# -- the sample-masks method ----------------------------------------------------------------------------------
def sample_daff_masks(library: str | os.PathLike, g1: str | os.PathLike, n: int, size: int, seed: int,
                      out_dir: str | os.PathLike | None = None, *, shard: int = 0, n_shards: int = 1,
                      batch: int = 8, ops: Sequence[str] = OPS, threads: int = 1, progress: bool = False,
                      extra_report: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This shard's ``daff`` masks of ``n``: layouts from ``library`` → G1 (``g1``: g1.pt) → instances. Writes
    the patch set of sample-masks to ``out_dir`` (or returns ``inst``, ``types``, ``rows`` in the report)."""
    import torch
    from tqdm import tqdm

    from histosynth.io.patchset import PatchSetWriter
    from histosynth.models.daff_g1 import load_g1

    if n < 1:
        raise HistosynthError(f"--n must be at least 1, got {n}")
    if not (n_shards >= 1 and 0 <= shard < n_shards):
        raise HistosynthError(f"--shard must be in 0..{n_shards - 1} (--n-shards {n_shards}), got {shard}")
    lib = load_centroid_library(library)
    G, meta = load_g1(g1)
    n_types, radius = int(meta["n_types"]), int(meta["point_radius"])
    if size % G.multiple:
        raise HistosynthError(f"--size {size} is not divisible by {G.multiple} ({G.why_multiple})")
    beyond = sorted({int(t) for t in np.unique(lib.points[:, 2])} - set(range(1, n_types + 1)))
    if beyond:
        raise HistosynthError(f"the centroid library {library} has type(s) {beyond} that G1 ({n_types} types) has "
                              "no channel for: library and G1 come from different class maps", g1)
    sampler = LayoutSampler(lib, size, ops)
    classes = lib.classes
    cols = class_columns({name: tid for tid, name in classes.items()})
    # as sample-masks' other methods: contiguous shard ranges, SeedSequence(seed, spawn_key=(shard,))
    start, stop = n * shard // n_shards, n * (shard + 1) // n_shards
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(shard),)))
    mpps = lib.mpp[np.isfinite(lib.mpp)]
    mpp = float(np.median(mpps)) if len(mpps) else float("nan")
    src = f"sample-masks seed {seed} shard {shard}"
    totals = {"points": 0, "instances": 0, "unseeded": 0, "orphan_px": 0, "type_agree": 0}
    rows: list[dict[str, Any]] = []
    insts: list[np.ndarray] = []
    typs: list[np.ndarray] = []
    t0 = time.perf_counter()

    def masks():
        todo = stop - start
        with torch.no_grad():
            while todo > 0:
                b = min(batch, todo)
                layouts = [sampler.layout(rng) for _ in range(b)]
                x = torch.from_numpy(np.stack([point_image(p, size, n_types, radius) for p in layouts]))
                out = G(x).float().numpy()
                for p, o in zip(layouts, out):
                    yield instances_from_g1(o, p)
                todo -= b

    def row_of(inst: np.ndarray, typ: np.ndarray) -> dict[str, Any]:
        nmax = int(inst.max())
        row = {"slide": "synthetic", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": mpp,
               "width": int(size), "height": int(size), "tissue_fraction": 1.0, "n_nuclei": nmax, "source": src}
        first = np.zeros(nmax + 1, np.int64)
        sel = inst > 0
        first[inst[sel]] = typ[sel]
        per = np.bincount(first[1:], minlength=256)
        for tid, col in cols.items():
            row[col] = int(per[tid])
        return row

    from histosynth.device import select_device

    select_device("cpu", threads)
    report: dict[str, Any] = {
        "stage": "sample-masks", "method": "daff", "seed": int(seed), "shard": int(shard),
        "n_shards": int(n_shards), "n_total": int(n), "masks": int(stop - start), "first_mask": int(start),
        "size": int(size), "mpp": mpp, "classes": class_map_to_json(classes), "library": str(library),
        "g1": str(g1), "ops": list(sampler.ops), "library_entries": len(lib), "min_distance": lib.min_distance,
        "placement": "DAFF-GAN: library point layouts (histosynth.masks.daff_layout) -> G1 -> marker watershed",
        **(dict(extra_report) if extra_report else {}),
    }
    bar = tqdm(total=stop - start, desc="sample-masks daff", disable=not progress)

    def consume(add):
        for inst, typ, counts in masks():
            for k in totals:
                totals[k] += counts[k]
            row = row_of(inst, typ)
            rows.append(row)
            add(row, inst, typ)
            bar.update()

    def summary() -> dict[str, Any]:
        seconds = time.perf_counter() - t0
        return {"nuclei": totals["instances"], "points": totals["points"], "unseeded": totals["unseeded"],
                "orphan_px": totals["orphan_px"],
                "type_agreement": round(totals["type_agree"] / totals["instances"], 4) if totals["instances"] else None,
                "seconds": round(seconds, 3)}

    if out_dir is not None:
        with PatchSetWriter(out_dir, ("inst", "types"), (size, size), extra_columns=tuple(cols.values())) as w:
            consume(lambda row, inst, typ: w.add(row, inst=inst, types=typ))
            report.update(summary())
            w.report = report
    else:
        def keep(row, inst, typ):
            insts.append(inst)
            typs.append(typ)

        consume(keep)
        report.update(summary())
        report["inst"] = np.stack(insts)
        report["types"] = np.stack(typs)
        report["rows"] = rows
    bar.close()
    log.info("daff: %d masks, %d nuclei from %d points (%d unseeded: G1 grew no foreground there), "
             "G1's type agrees with the point's for %s of them, in %.1f s%s", len(rows), report["nuclei"],
             report["points"], report["unseeded"], report["type_agreement"], report["seconds"],
             f" → {out_dir}" if out_dir else "")
    return report
