"""The nuclei library: every complete nucleus of the training patch sets, framed.

The β-VAE (:mod:`histosynth.models.dvae`) learns nucleus *shapes* from this
library, as in the seed's section 5.1. :func:`build_library` walks the typed
patch sets of the training slides and keeps each nucleus that is

- **complete**: its instance does not touch the patch border (a nucleus cut
  by the tile edge has a false, straight side);
- **large enough**: its bounding box (rows × columns, in patch pixels) is at
  least ``min_bbox_area``. The seed drops boxes under 800 px²; its resolution
  is not stated. At our 0.5 µm/px tiles a lymphocyte is 10–14 px across
  (box ≈ 100–200 px²), so a threshold of 800 px² (or the 200 px² it would be
  if the seed worked at 0.25 µm/px) would remove most lymphocytes. The default,
  :data:`DEFAULT_MIN_BBOX_AREA` = 64 px² (an 8 × 8 px box, 4 × 4 µm), removes
  slivers and annotation fragments but keeps every plausible nucleus. Pass
  ``--min-bbox-area 800`` for the seed's rule verbatim.

Each kept nucleus is stored as a binary shape in a ``frame`` × ``frame`` image
(default 64, the seed's size, which holds about 98 % of nuclei unscaled at
the seed's resolution and all but giant ones at ours). The shape is centred by
the **centre of its bounding box** (offset ``(frame - h) // 2`` rows,
``(frame - w) // 2`` columns), which guarantees that every nucleus whose box
fits the frame is stored unscaled. A nucleus with a box side larger than
``frame - 2`` is **downscaled** (area interpolation, threshold 0.5) to fit with
a one-pixel background margin; its scale (< 1) is recorded so the sampler can
undo it. Nothing is ever upscaled.

Overlapping tiles (stride < size) can hold the same nucleus twice. Copies are
found by slide and level-0 centroid (the same centroid up to
``dedup_tolerance`` level-0 pixels, i.e. the same rounded centroid, robust to
float rounding); the first one (patch-set order, then patch row, then instance
id) is kept and the others are counted as duplicates.

``nuclei.npz`` holds ``shapes`` uint8 (N, frame, frame) 0/1, ``types`` uint8,
``areas`` float32 (patch pixels, before any downscale), ``scales`` float32
(1 = not downscaled), ``slides`` (str), ``centroids`` float64 (N, 2) level-0
x, y (pixel-centre convention of :mod:`histosynth.patches.rasterize`), ``patch_rows``
int64 and ``inst_ids`` int32 (where each came from), ``patch_set_ids`` int32
into ``patch_sets`` (JSON list of paths), ``classes`` (JSON {type id: name}),
``mpp``, ``frame`` and ``min_bbox_area``. Read it back with
:func:`load_library`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.atomic import atomic_write
from histosynth.io.labels import class_map_to_json, classes_of_patch_sets, instance_types, read_class_map
from histosynth.io.patchset import read_patchset

log = logging.getLogger(__name__)

#: smallest bounding-box area (rows × columns, patch pixels) of a kept nucleus
DEFAULT_MIN_BBOX_AREA = 64
#: side of the square image each shape is stored in
DEFAULT_FRAME = 64
#: background pixels kept around a downscaled nucleus
MARGIN = 1
#: relative mpp difference tolerated between patch sets
MPP_TOLERANCE = 0.01


# -- arrays in, arrays out ----------------------------------------------------------
def frame_shape(mask: np.ndarray, frame: int = DEFAULT_FRAME) -> tuple[np.ndarray, float]:
    """A cropped binary shape (h, w) centred in a ``frame`` × ``frame`` uint8 0/1 image.

    Centred by the bounding-box centre; downscaled (never upscaled) when a side
    exceeds ``frame - 2`` so that a one-pixel margin stays background.
    Returns the framed shape and the scale applied (1.0 = unscaled).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError("frame_shape needs a non-empty 2-D mask")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = mask.shape
    fit = frame - 2 * MARGIN
    scale = 1.0
    if max(h, w) > fit:
        scale = fit / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        small = cv2.resize(mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
        resized = small >= 0.5
        if not resized.any():  # a thin sliver can vanish; keep its densest pixel
            resized[np.unravel_index(np.argmax(small), small.shape)] = True
        mask, (h, w) = resized, resized.shape
    out = np.zeros((frame, frame), dtype=np.uint8)
    r0, c0 = (frame - h) // 2, (frame - w) // 2
    out[r0 : r0 + h, c0 : c0 + w] = mask
    return out, float(scale)


@dataclass
class PatchNuclei:
    """The complete, large-enough nuclei of one patch (before de-duplication)."""

    shapes: np.ndarray  # uint8 (n, frame, frame)
    types: np.ndarray  # uint8 (n,)
    areas: np.ndarray  # float32 (n,) patch pixels
    scales: np.ndarray  # float32 (n,)
    centroids: np.ndarray  # float64 (n, 2) patch pixel x, y (pixel centres at integer coordinates)
    inst_ids: np.ndarray  # int32 (n,)
    n_instances: int
    n_cut: int
    n_small: int


def extract_nuclei(
    inst: np.ndarray,
    types: np.ndarray,
    *,
    min_bbox_area: float = DEFAULT_MIN_BBOX_AREA,
    frame: int = DEFAULT_FRAME,
) -> PatchNuclei:
    """Frame every complete nucleus of one patch's instance map (see the module docstring)."""
    inst = np.asarray(inst)
    types = np.asarray(types)
    height, width = inst.shape
    shapes, tys, areas, scales, cents, ids = [], [], [], [], [], []
    n_instances = n_cut = n_small = 0
    type_of = dict(zip(*(a.tolist() for a in instance_types(inst, types))))
    for k, sl in enumerate(ndi.find_objects(inst)):
        if sl is None:
            continue
        n_instances += 1
        rs, cs = sl
        if rs.start == 0 or cs.start == 0 or rs.stop == height or cs.stop == width:
            n_cut += 1
            continue
        if (rs.stop - rs.start) * (cs.stop - cs.start) < min_bbox_area:
            n_small += 1
            continue
        iid = k + 1
        mask = inst[sl] == iid
        shape, scale = frame_shape(mask, frame)
        rr, cc = np.nonzero(mask)
        shapes.append(shape)
        tys.append(type_of[iid])
        areas.append(float(mask.sum()))
        scales.append(scale)
        cents.append((cs.start + cc.mean(), rs.start + rr.mean()))
        ids.append(iid)
    return PatchNuclei(
        shapes=np.asarray(shapes, dtype=np.uint8).reshape(-1, frame, frame),
        types=np.asarray(tys, dtype=np.uint8),
        areas=np.asarray(areas, dtype=np.float32),
        scales=np.asarray(scales, dtype=np.float32),
        centroids=np.asarray(cents, dtype=np.float64).reshape(-1, 2),
        inst_ids=np.asarray(ids, dtype=np.int32),
        n_instances=n_instances,
        n_cut=n_cut,
        n_small=n_small,
    )


def find_duplicates(slides: np.ndarray, centroids: np.ndarray, tolerance: float = 1.0) -> np.ndarray:
    """Boolean mask of items that repeat an earlier one (same slide, centroid within ``tolerance``)."""
    dup = np.zeros(len(slides), dtype=bool)
    for slide in np.unique(slides):
        idx = np.flatnonzero(slides == slide)
        if len(idx) < 2:
            continue
        tree = cKDTree(centroids[idx])
        kept = np.zeros(len(idx), dtype=bool)
        for j in range(len(idx)):
            near = tree.query_ball_point(centroids[idx[j]], r=tolerance)
            if any(kept[i] for i in near if i < j):
                dup[idx[j]] = True
            else:
                kept[j] = True
    return dup


# -- the library file ---------------------------------------------------------------------
@dataclass
class Library:
    """A nuclei library read back from ``nuclei.npz``."""

    path: Path
    shapes: np.ndarray
    types: np.ndarray
    areas: np.ndarray
    scales: np.ndarray
    slides: np.ndarray
    centroids: np.ndarray
    classes: dict[int, str]
    mpp: float

    def __len__(self) -> int:
        return len(self.shapes)


LIBRARY_KEYS = ("shapes", "types", "areas", "scales", "slides", "centroids", "classes", "mpp")


def read_npz(path: str | os.PathLike, keys: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an .npz file (no pickles); missing, corrupt or incomplete is one error naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise HistosynthError(f"{what} not found", path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise HistosynthError(f"not a {what} (lacks {missing})", path)
            return {k: npz[k] for k in keys}
    except HistosynthError:
        raise
    except Exception as err:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise HistosynthError(f"unreadable {what}: {err}", path) from err


def load_library(path: str | os.PathLike) -> Library:
    """Read ``nuclei.npz``; a missing, corrupt, incomplete or empty file is a HistosynthError."""
    path = Path(path)
    data = read_npz(path, LIBRARY_KEYS, "nuclei library")
    shapes = data["shapes"]
    if shapes.ndim != 3 or shapes.shape[1] != shapes.shape[2]:
        raise HistosynthError(f"shapes has shape {shapes.shape}; expected (N, frame, frame)", path)
    if len(shapes) == 0:
        raise HistosynthError("empty library: it holds no nuclei", path)
    n = len(shapes)
    for key in ("types", "areas", "scales", "slides", "centroids"):
        if len(data[key]) != n:
            raise HistosynthError(f"{key} has {len(data[key])} entries for {n} shapes", path)
    try:
        classes = json.loads(str(data["classes"]))
    except ValueError as err:
        raise HistosynthError(f"classes is not a JSON object of type id → name: {err}", path) from err
    classes = read_class_map(classes, path)
    return Library(
        path=path,
        shapes=shapes.astype(np.uint8, copy=False),
        types=data["types"].astype(np.uint8, copy=False),
        areas=data["areas"].astype(np.float32, copy=False),
        scales=data["scales"].astype(np.float32, copy=False),
        slides=data["slides"].astype(str),
        centroids=data["centroids"].astype(np.float64, copy=False),
        classes=classes,
        mpp=float(data["mpp"]),
    )


def _class_names(sets: list, class_names: dict[int, str] | None, type_ids: set[int]) -> dict[int, str]:
    """Type id → name: ``class_names`` if given, else the patch sets' class maps; unnamed ids get a placeholder."""
    if class_names:
        names = read_class_map(class_names, "class_names")
    else:
        names = classes_of_patch_sets([ps.path for ps in sets])
    for tid in sorted(type_ids):
        names.setdefault(tid, "unknown" if tid == 0 else f"type{tid}")
    return dict(sorted(names.items()))


def build_library(
    patch_sets: list[str | os.PathLike],
    out_npz: str | os.PathLike,
    *,
    min_bbox_area: float = DEFAULT_MIN_BBOX_AREA,
    frame: int = DEFAULT_FRAME,
    class_names: dict[int, str] | None = None,
    montage: str | os.PathLike | None = None,
    dedup_tolerance: float = 1.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the nuclei library of ``patch_sets`` to ``out_npz`` (+ montage PNG); returns the report.

    ``montage`` defaults to ``montage.png`` beside ``out_npz``.
    """
    from tqdm import tqdm

    if not patch_sets:
        raise HistosynthError("no patch sets given for the nuclei library")
    if frame < 8:
        raise HistosynthError(f"frame must be at least 8 pixels, got {frame}")
    if min_bbox_area < 0:
        raise HistosynthError(f"min_bbox_area must be >= 0, got {min_bbox_area}")
    out_npz = Path(out_npz)
    montage = Path(montage) if montage is not None else out_npz.parent / "montage.png"
    sets = [read_patchset(p, require=("inst", "types")) for p in patch_sets]

    mpps = []
    for ps in sets:
        mpp = ps.index["mpp"].to_numpy(dtype=float) if len(ps) else np.array([])
        if len(mpp) and (not np.all(np.isfinite(mpp)) or np.any(mpp <= 0)):
            raise HistosynthError("index.csv has missing or non-positive mpp values", ps.path)
        if len(mpp) and np.ptp(mpp) > MPP_TOLERANCE * mpp.mean():
            raise HistosynthError(f"patches at different resolutions ({mpp.min():.4g}–{mpp.max():.4g} um/px)",
                                  ps.path)
        if len(mpp):
            mpps.append((ps.path, float(mpp.mean())))
    if mpps:
        ref_path, ref = mpps[0]
        for path, m in mpps[1:]:
            if abs(m / ref - 1) > MPP_TOLERANCE:
                raise HistosynthError(
                    f"patch set at {m:.4g} um/px but {ref_path} is at {ref:.4g} um/px; "
                    "a library needs one resolution (tile all slides with the same --mpp)",
                    path,
                )

    parts: list[PatchNuclei] = []
    slides: list[np.ndarray] = []
    level0: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    set_ids: list[np.ndarray] = []
    n_instances = n_cut = n_small = 0
    total = sum(len(ps) for ps in sets)
    with tqdm(total=total, desc="nuclei library", unit="patch", disable=not progress) as bar:
        for s, ps in enumerate(sets):
            index = ps.index
            for i in range(len(ps)):
                nuc = extract_nuclei(np.asarray(ps.inst[i]), np.asarray(ps.types[i]),
                                     min_bbox_area=min_bbox_area, frame=frame)
                n_instances += nuc.n_instances
                n_cut += nuc.n_cut
                n_small += nuc.n_small
                bar.update(1)
                n = len(nuc.inst_ids)
                if not n:
                    continue
                row = index.iloc[i]
                d = float(row["downsample"])
                xy = np.column_stack([float(row["x"]) + (nuc.centroids[:, 0] + 0.5) * d,
                                      float(row["y"]) + (nuc.centroids[:, 1] + 0.5) * d])
                parts.append(nuc)
                slides.append(np.full(n, str(row["slide"])))
                level0.append(xy)
                rows.append(np.full(n, i, dtype=np.int64))
                set_ids.append(np.full(n, s, dtype=np.int32))

    names = [str(ps.path) for ps in sets]
    if not parts:
        raise HistosynthError(
            f"empty library: no complete nucleus of bounding box >= {min_bbox_area} px² in "
            f"{', '.join(names)} ({n_instances} instances: {n_cut} cut by the patch border, "
            f"{n_small} too small)"
        )
    shapes = np.concatenate([p.shapes for p in parts])
    types = np.concatenate([p.types for p in parts])
    areas = np.concatenate([p.areas for p in parts])
    scales = np.concatenate([p.scales for p in parts])
    inst_ids = np.concatenate([p.inst_ids for p in parts])
    slide_arr = np.concatenate(slides).astype(str)
    centroids = np.concatenate(level0)
    patch_rows = np.concatenate(rows)
    patch_set_ids = np.concatenate(set_ids)
    n_complete = len(shapes)

    dup = find_duplicates(slide_arr, centroids, dedup_tolerance)
    keep = ~dup
    shapes, types, areas, scales = shapes[keep], types[keep], areas[keep], scales[keep]
    inst_ids, slide_arr, centroids = inst_ids[keep], slide_arr[keep], centroids[keep]
    patch_rows, patch_set_ids = patch_rows[keep], patch_set_ids[keep]

    classes = _class_names(sets, class_names, set(int(t) for t in np.unique(types)))
    mpp = float(np.mean([m for _, m in mpps]))
    per_type = Counter(int(t) for t in types)
    report: dict[str, Any] = {
        "stage": "nuclei_library",
        "patch_sets": names,
        "patches": total,
        "instances": n_instances,
        "cut_by_border": n_cut,
        "too_small": n_small,
        "complete": n_complete,
        "duplicates": int(dup.sum()),
        "kept": int(len(shapes)),
        "downscaled": int((scales < 1).sum()),
        "per_type": {classes[t]: per_type[t] for t in sorted(per_type)},
        "min_bbox_area": float(min_bbox_area),
        "frame": int(frame),
        "mpp": mpp,
        "out": str(out_npz),
        "montage": str(montage),
    }

    out_npz.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(
        shapes=shapes,
        types=types,
        areas=areas,
        scales=scales,
        slides=slide_arr,
        centroids=centroids,
        patch_rows=patch_rows,
        inst_ids=inst_ids,
        patch_set_ids=patch_set_ids,
        patch_sets=np.asarray(json.dumps(names)),
        classes=np.asarray(json.dumps(class_map_to_json(classes))),
        mpp=np.asarray(mpp),
        frame=np.asarray(frame),
        min_bbox_area=np.asarray(float(min_bbox_area)),
    )

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(out_npz, write)
    write_montage(shapes, types, classes, montage,
                  title=f"{len(shapes)} nuclei from {len(names)} patch set(s) at {mpp:.3g} um/px")
    log.info(
        "nuclei library %s: %d instances in %d patches; %d cut by the patch border, %d with a box under "
        "%g px², %d complete, %d duplicates (overlapping tiles) removed, %d kept (%d downscaled to fit %d px); "
        "per type %s",
        out_npz, n_instances, total, n_cut, n_small, min_bbox_area, n_complete, dup.sum(), len(shapes),
        report["downscaled"], frame, report["per_type"],
    )
    return report


# -- the montage ------------------------------------------------------------------------------
def write_montage(
    shapes: np.ndarray,
    types: np.ndarray,
    classes: dict[int, str],
    out_png: str | os.PathLike,
    *,
    max_items: int = 400,
    seed: int = 0,
    title: str = "",
) -> Path:
    """A grid of (up to ``max_items``, drawn at random) library shapes coloured by type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out_png = Path(out_png)
    n = len(shapes)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_items), replace=False))
    cols = int(np.ceil(np.sqrt(len(pick))))
    nrows = int(np.ceil(len(pick) / cols))
    f = shapes.shape[1]
    cmap = plt.get_cmap("tab10")
    tids = sorted(classes)
    colour = {t: np.array(cmap(k % 10)[:3]) for k, t in enumerate(tids)}
    canvas = np.ones((nrows * (f + 2), cols * (f + 2), 3))
    for k, i in enumerate(pick):
        r, c = divmod(k, cols)
        tile = np.ones((f, f, 3)) * 0.97
        tile[shapes[i] > 0] = colour.get(int(types[i]), np.zeros(3))
        canvas[r * (f + 2) + 1 : r * (f + 2) + 1 + f, c * (f + 2) + 1 : c * (f + 2) + 1 + f] = tile
    size = max(4.0, min(16.0, cols * 0.6))
    fig, ax = plt.subplots(figsize=(size, size * nrows / cols + 0.8))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    counts = Counter(int(t) for t in types)
    ax.legend(handles=[Patch(color=colour[t], label=f"{classes[t]} ({counts[t]})") for t in tids if counts[t]],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(tids)), frameon=False)
    ax.set_title(title or f"{n} nuclei", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)
