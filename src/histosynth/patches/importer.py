"""The import-patches stage: a patch dataset (small images + instance maps + types) → one patch set per group.

Many labs and public sets (CoNSeP re-cut as patches, PanNuke-like folders) hold
many small images, each with an instance map and per-instance types, instead
of whole slides with outlines. :func:`import_patches` turns such a dataset into
the normal patch-set contract (:mod:`histosynth.io.patchset`), one set per
**group**, so that every later stage runs unchanged and the train / test split
works by group, never by patch (patches cut from one source tile overlap).

The dataset
    ``images``: a glob of RGB images (JPEG, PNG, TIFF, ...). For each image,
    ``inst`` and ``types`` are path patterns in which ``{stem}`` stands for
    the image's file name without its suffix:

    - ``inst``: an integer instance map of the image's size (.npy, .png, .tif,
      or a .mat with ``inst_map``); 0 = background, ids need not be contiguous;
    - ``types`` (optional): a .mat with ``inst_type`` (one entry per instance,
      in ascending id order — the CoNSeP / HoVer-Net convention; the count must
      equal the instances') or with ``type_map``, or a type-map image/.npy of
      the image's size (an instance's type is the majority of its typed
      pixels, :func:`histosynth.io.labels.instance_types`).

    ``group_regex`` is searched in each image's stem; its first group is the
    image's group (the patch set's name, the ``{slide}`` of the DAG). Every
    file must match.

Type ids
    A dataset's type values are the type ids of ``classes`` (the config's
    name → id map); with ``type_values`` (dataset value → class name) they are
    mapped through the names first, e.g. to merge CoNSeP's seven classes into
    four. A value that no class takes is an error. Without ``classes`` every
    nucleus is type 1 (``nucleus``), as in ``rasterize``; the dataset's types
    are then read, checked and counted in the report, but not kept.

Resolution and size
    ``mpp`` is the dataset's µm/px; patches are resampled to ``target_mpp``
    (the config's ``tile.target_mpp``; None keeps ``mpp``): images with area
    interpolation when shrinking and cubic when enlarging (as the tiler does),
    instance maps by nearest neighbour at pixel centres. An instance that
    keeps no pixel vanishes: counted per file in ``report.json`` and logged.
    The resampled patch is then cut into ``size`` × ``size`` windows (a grid
    of step ``size``; where the side is not a multiple, the last window is
    aligned with the far edge, overlapping its neighbour, so that no pixel is
    lost), or padded with white background to ``size`` (flagged in the
    ``padded`` column) where a side is shorter. CoNSeP's 256-pixel patches at
    0.25 µm/px become exactly one 128-pixel window at 0.5 µm/px.

The patch set
    ``images.npy``, ``inst.npy`` (ids 1..n per window, in ascending source
    id), ``types.npy``, ``index.csv`` and ``report.json``, as ``rasterize``
    writes them, atomically. Patches have no common slide coordinates: x, y
    place them on a virtual strip (the k-th image of a group starts where the
    previous one ends, y = 0; a window adds its offset), so that places are
    distinct and never overlap; ``source`` names the image file and ``patch``
    its stem. ``index.csv`` also has ``n_<class>`` per class and ``padded``.

Bad input is one :class:`~histosynth.errors.HistosynthError` naming the file
and the problem, before anything is written: no image, an image without its
instance map or types file, an instance map of another size than its image,
a types file whose count differs from the instances, a type outside
``classes``, a file name the group regex does not match.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.config import DEFAULT_GROUP_REGEX, companion, find_patch_groups
from histosynth.errors import HistosynthError
from histosynth.io.annotations.label import (
    as_label_2d,
    integer_values,
    load_label_array,
    load_mat,
)
from histosynth.io.labels import (
    DEFAULT_CLASS,
    class_columns,
    class_key,
    class_map_to_json,
    instance_types,
    read_class_map,
)
from histosynth.io.patchset import PatchSetWriter

log = logging.getLogger(__name__)

#: grey value above which a pixel is background (the schema's tile.background_threshold)
BACKGROUND_THRESHOLD = 204


# --------------------------------------------------------------------------- the dataset's files
# (find_patch_groups and companion live in histosynth.config, whose slide table lists the groups)
def check_files(files: list[Path], inst: str, types: str | None) -> None:
    """Every image has its instance map (and types file): else an error naming the first one missing."""
    for what, pattern in (("instance map", inst), ("types file", types)):
        if pattern is None:
            continue
        missing = [f for f in files if not companion(pattern, f, what).is_file()]
        if missing:
            raise HistosynthError(
                f"image without its {what}: {companion(pattern, missing[0], what)} not found "
                f"({len(missing)} of {len(files)} images lack one)", missing[0])


# --------------------------------------------------------------------------- reading one patch
def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise HistosynthError("cannot read the image (not an image OpenCV decodes, or empty)", path)
    return np.ascontiguousarray(img[..., ::-1])


def read_instances(path: Path) -> np.ndarray:
    """int64 (H, W) instance map of a .npy / .png / .tif, or of a .mat's ``inst_map``."""
    if path.suffix.lower() == ".mat":
        m = load_mat(path)
        if "inst_map" not in m:
            raise HistosynthError(f"no 'inst_map' in the .mat file (it has {sorted(k for k in m if k[:2] != '__')})",
                                  path)
        arr = m["inst_map"]
    else:
        arr = load_label_array(path)
    return as_label_2d(np.asarray(arr), path, "instance map").astype(np.int64)


def read_types(path: Path, inst: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The type value of each instance id in ``ids`` (ascending) from a types file (module docstring)."""
    if path.suffix.lower() == ".mat":
        m = load_mat(path)
        if "inst_type" in m:
            t = integer_values(np.asarray(m["inst_type"]).reshape(-1), path, "inst_type")
            if len(t) != len(ids):
                raise HistosynthError(
                    f"inst_type has {len(t)} entries but the instance map has {len(ids)} instances "
                    "(one entry per instance, in ascending id order)", path)
            return t
        if "type_map" not in m:
            raise HistosynthError("the .mat file has neither 'inst_type' nor 'type_map'", path)
        tmap = as_label_2d(np.asarray(m["type_map"]), path, "type_map")
    else:
        tmap = as_label_2d(load_label_array(path), path, "type map")
    if tmap.shape != inst.shape:
        raise HistosynthError(f"the type map is {tmap.shape[1]} x {tmap.shape[0]} but the instance map is "
                              f"{inst.shape[1]} x {inst.shape[0]}", path)
    all_ids, all_types = instance_types(inst, tmap)
    return np.asarray(all_types, dtype=np.int64)[np.searchsorted(all_ids, ids)]


# --------------------------------------------------------------------------- arrays
def resample(image: np.ndarray, inst: np.ndarray, downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """Image and instance map at 1/``downsample`` of their size (rounded; at least 1 pixel).

    The image by area interpolation when shrinking, cubic when enlarging; the instance map by nearest
    neighbour at pixel centres (output pixel r samples source row floor((r + 0.5) · H / H')).
    """
    import cv2

    h, w = inst.shape
    nh, nw = max(1, round(h / downsample)), max(1, round(w / downsample))
    if (nh, nw) == (h, w):
        return image, inst
    interp = cv2.INTER_AREA if nh * nw < h * w else cv2.INTER_CUBIC
    img = cv2.resize(image, (nw, nh), interpolation=interp)
    rows = np.minimum(((np.arange(nh) + 0.5) * (h / nh)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * (w / nw)).astype(np.int64), w - 1)
    return img, inst[np.ix_(rows, cols)]


def window_offsets(length: int, size: int) -> list[int]:
    """Offsets of ``size`` windows along a side of ``length``: a grid of step ``size``, the last one aligned
    with the far edge (overlapping) when ``length`` is not a multiple; [0] (then padded) when shorter."""
    if length <= size:
        return [0]
    offsets = list(range(0, length - size + 1, size))
    if offsets[-1] != length - size:
        offsets.append(length - size)
    return offsets


def relabel(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids 1..n in ascending source id, int32; the source id of each new id k at k-1)."""
    ids = np.unique(inst)
    ids = ids[ids != 0]
    out = np.searchsorted(ids, inst).astype(np.int32) + 1
    out[inst == 0] = 0
    return out, ids


# --------------------------------------------------------------------------- types → class ids
class TypeMapper:
    """Dataset type value → type id of ``classes`` (module docstring), or every nucleus type 1 without it."""

    def __init__(self, classes: Mapping[str, int] | None, type_values: Mapping[Any, str] | None = None):
        self.classes = dict(classes) if classes else None
        self.table: dict[int, int] | None = None
        self.by_values = bool(type_values)
        if self.classes is None:
            if type_values:
                raise HistosynthError("type values (slides.patches.type_values) map onto class names, which "
                                      "need classes in config.yaml (--classes)")
            return
        ids = sorted({int(v) for v in self.classes.values()})
        if type_values:
            by_key = {class_key(n): int(t) for n, t in self.classes.items()}
            self.table = {}
            for value, name in type_values.items():
                try:
                    v = int(value)
                except (TypeError, ValueError):
                    raise HistosynthError(f"type values map dataset type numbers to class names; "
                                          f"{value!r} is not a number") from None
                if class_key(name) not in by_key:
                    raise HistosynthError(f"type value {v} maps to {name!r}, which is not a class "
                                          f"(classes: {', '.join(self.classes)})")
                self.table[v] = by_key[class_key(name)]
        else:
            self.table = {i: i for i in ids}

    def __call__(self, values: np.ndarray, path: Path) -> np.ndarray:
        if self.table is None:
            return np.ones(len(values), dtype=np.int64)
        known = np.isin(values, list(self.table))
        if not known.all():
            bad = sorted(set(np.asarray(values)[~known].tolist()))
            what = ("the dataset values of slides.patches.type_values (--type-values)" if self.by_values
                    else "the type ids of classes")
            hint = "; type 0: an instance without a typed pixel in the type map" if 0 in bad else ""
            raise HistosynthError(
                f"type {bad[0]} of {int((~known).sum())} instance(s) (values {bad}) is not one of {what}: "
                f"{sorted(self.table)}; classes: {self.classes}{hint}", path)
        lut = np.zeros(max(self.table) + 1, dtype=np.int64)
        for v, t in self.table.items():
            lut[v] = t
        return lut[values]

    @property
    def class_map(self) -> dict[str, int]:
        return self.classes or {DEFAULT_CLASS: 1}


# --------------------------------------------------------------------------- the stage
@dataclass
class ImportParams:
    """How one dataset becomes patch sets (the schema's slides.patches.* and tile.size / target_mpp)."""

    images: str
    inst: str
    types: str | None = None
    group_regex: str = DEFAULT_GROUP_REGEX
    mpp: float | None = None
    target_mpp: float | None = 0.5
    size: int = 256
    background_threshold: int = BACKGROUND_THRESHOLD

    def check(self) -> None:
        if self.mpp is None or not self.mpp > 0:
            raise HistosynthError("the dataset's resolution is needed: slides.patches.mpp (--mpp, um/px; "
                                  "0.25 for 40x, 0.5 for 20x)")
        if self.target_mpp is not None and not self.target_mpp > 0:
            raise HistosynthError(f"the target resolution must be positive, got {self.target_mpp}")
        if self.size < 1:
            raise HistosynthError(f"the patch size must be at least 1 pixel, got {self.size}")
        companion(self.inst, Path("x"), "instance map")
        if self.types is not None:
            companion(self.types, Path("x"), "types file")

    @property
    def downsample(self) -> float:
        """Dataset pixels per output pixel."""
        return 1.0 if self.target_mpp is None else float(self.target_mpp) / float(self.mpp)


def import_patches(
    params: ImportParams,
    out: str | os.PathLike,
    classes: Mapping[str, int] | None = None,
    type_values: Mapping[Any, str] | None = None,
    group: str | None = None,
) -> dict[str, dict]:
    """Write the patch set of ``group`` at ``out``, or (``group`` None) one set per group at ``out/<group>``.

    Returns {group: report}. Every file of the dataset must match the group regex, whichever group is
    written. Raises a HistosynthError naming the file on bad input; nothing is left half-written.
    """
    params.check()
    mapper = TypeMapper(classes, type_values)
    groups = find_patch_groups(params.images, params.group_regex)
    out = Path(out)
    if group is not None:
        if group not in groups:
            listing = ", ".join(list(groups)[:10]) + (", ..." if len(groups) > 10 else "")
            raise HistosynthError(f"no image of group {group!r} (the dataset's groups: {listing})", params.images)
        check_files(groups[group], params.inst, params.types)
        return {group: write_group(group, groups[group], params, mapper, out)}  # atomic: PatchSetWriter
    for g in groups:
        check_files(groups[g], params.inst, params.types)
    # every group into a temporary folder renamed into place at the end: a bad file in the last group
    # leaves neither the earlier groups' sets nor an empty folder behind
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        reports = {g: write_group(g, files, params, mapper, tmp / g) for g, files in groups.items()}
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return reports


def write_group(name: str, files: list[Path], params: ImportParams, mapper: TypeMapper, out: Path) -> dict:
    """One group's patch set at ``out``; returns its report."""
    import cv2

    d = params.downsample
    size = params.size
    columns = class_columns(mapper.class_map)
    names = read_class_map(mapper.class_map)  # type id -> class name
    counts: Counter = Counter()
    class_counts: Counter = Counter()  # instances read, by class name (type id when without classes)
    vanished: dict[str, int] = {}
    source_types: Counter = Counter()
    x_strip = 0.0
    with PatchSetWriter(out, ("images", "inst", "types"), (size, size),
                        extra_columns=("padded", "patch", *columns.values())) as writer:
        for path in files:
            image = read_image(path)
            inst_path = companion(params.inst, path, "instance map")
            inst = read_instances(inst_path)
            if inst.shape != image.shape[:2]:
                raise HistosynthError(
                    f"the instance map is {inst.shape[1]} x {inst.shape[0]} but its image {path} is "
                    f"{image.shape[1]} x {image.shape[0]}", inst_path)
            ids = np.unique(inst)
            ids = ids[ids != 0]
            if params.types is not None:
                values = read_types(companion(params.types, path, "types file"), inst, ids)
                source_types.update(values.tolist())
                type_of = mapper(values, companion(params.types, path, "types file"))
            else:
                type_of = mapper(np.ones(len(ids), dtype=np.int64), inst_path)
            class_counts.update(names[t] for t in type_of.tolist())
            counts["files"] += 1
            counts["instances_read"] += len(ids)
            img, lab = resample(image, inst, d)
            kept = np.unique(lab)
            lost = len(ids) - int((kept != 0).sum())
            if lost:
                vanished[path.stem] = lost
                counts["instances_vanished"] += lost
            h, w = lab.shape
            ys, xs = window_offsets(h, size), window_offsets(w, size)
            if len(ys) * len(xs) > 1:
                counts["files_cut"] += 1
            for oy in ys:
                for ox in xs:
                    win_img = np.full((size, size, 3), 255, dtype=np.uint8)
                    win_lab = np.zeros((size, size), dtype=np.int64)
                    part_img = img[oy:oy + size, ox:ox + size]
                    ph, pw = part_img.shape[:2]
                    win_img[:ph, :pw] = part_img
                    win_lab[:ph, :pw] = lab[oy:oy + size, ox:ox + size]
                    padded = (ph, pw) != (size, size)
                    new, src = relabel(win_lab)
                    lut = np.zeros(len(src) + 1, dtype=np.uint8)
                    lut[1:] = type_of[np.searchsorted(ids, src)]
                    types = lut[new]
                    grey = cv2.cvtColor(win_img, cv2.COLOR_RGB2GRAY)
                    row = {
                        "slide": name, "x": x_strip + ox * d, "y": oy * d, "level": 0, "downsample": d,
                        "mpp": params.mpp * d, "width": size, "height": size,
                        "tissue_fraction": float((grey <= params.background_threshold).mean()),
                        "n_nuclei": len(src), "source": str(path), "padded": padded, "patch": path.stem,
                    }
                    per_type = np.bincount(lut[1:], minlength=256)
                    for tid, col in columns.items():
                        row[col] = int(per_type[tid])
                    writer.add(row, images=win_img, inst=new, types=types)
                    counts["patches"] += 1
                    counts["padded"] += int(padded)
                    counts["instances_written"] += len(src)
                    counts["empty_patches"] += int(len(src) == 0)
            x_strip += image.shape[1]
        report = {
            "stage": "import-patches",
            "slide": {"name": name, "source": "patch dataset", "mpp": [params.mpp, params.mpp],
                      "files": len(files)},
            "dataset": {"images": params.images, "inst": params.inst, "types": params.types,
                        "group_regex": params.group_regex, "group": name},
            "params": {"mpp": params.mpp, "target_mpp": params.target_mpp, "downsample": d, "size": size,
                       "background_threshold": params.background_threshold},
            "counts": {k: int(counts[k]) for k in ("files", "patches", "instances_read", "instances_written",
                                                   "instances_vanished", "files_cut", "padded", "empty_patches")},
            "vanished_by_file": vanished,
            "source_type_counts": {str(k): v for k, v in sorted(source_types.items())},
            "class_counts": dict(sorted(class_counts.items())),
            "types_kept": mapper.table is not None,
            "classes": class_map_to_json(mapper.class_map),
            "patches": int(counts["patches"]),
        }
        writer.report = report
    if counts["instances_vanished"]:
        log.warning("%s: %d of %d instances vanished when resampling to %s um/px (smaller than a pixel there), "
                    "in %d files: %s", name, counts["instances_vanished"], counts["instances_read"],
                    params.mpp * d, len(vanished), ", ".join(f"{k} ({v})" for k, v in list(vanished.items())[:5]))
    if params.types is not None and mapper.table is None:
        log.warning("%s: no classes given: the dataset's types (%s) are counted in report.json but every nucleus "
                    "is written as type 1", name, dict(source_types))
    log.info("%s: %d images, %d instances read -> %d patches of %d px at %.4g um/px (%d cut, %d padded, "
             "%d empty), %d instances written, %d vanished", name, counts["files"], counts["instances_read"],
             counts["patches"], size, params.mpp * d, counts["files_cut"], counts["padded"],
             counts["empty_patches"], counts["instances_written"], counts["instances_vanished"])
    return report

