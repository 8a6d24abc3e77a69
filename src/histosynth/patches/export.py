"""Exports of a patch set for people and other tools, and overlay pictures.

The patch set stays the working format; these are one-way copies into a
directory ``out`` (written under a temporary name and renamed into place, so a
failed export leaves nothing behind; an existing ``out`` is replaced). NAME is
``{row:06d}_{slide}_{x}_{y}`` for the patch of index.csv row ``row``.

- ``png``: ``images/NAME.png`` (RGB), ``inst/NAME.png`` (16-bit instance ids),
  ``types/NAME.png`` (8-bit type ids), and ``index.csv`` with a ``name``
  column;
- ``pannuke``: PanNuke's stacked arrays: ``images.npy`` float64 (N, H, W, 3),
  ``masks.npy`` float64 (N, H, W, T + 1) where channel t - 1 holds the
  instance ids of the nuclei of type t and the last channel is 1 on
  background, and ``types.npy`` (the slide name of each patch, as PanNuke
  stores the tissue type there);
- ``hovernet``: one ``NAME.npy`` per patch, int32 (H, W, 5) = RGB, instance
  map, type map — the layout HoVer-Net's patch extraction writes for training;
- ``hovernet-mat``: one ``NAME.mat`` per patch with the keys of the ``.mat``
  files HoVer-Net's inference writes (and its ``compute_stats.py`` reads):
  ``inst_map`` int32 (H, W); ``inst_uid`` int64 (N, 1), the instance ids
  present, ascending (not renumbered); ``inst_type`` int64 (N, 1), the type of
  each of those instances (majority of its typed pixels, 0 = untyped);
  ``inst_centroid`` float64 (N, 2), (x, y) = mean (column, row) of the
  instance's pixels (HoVer-Net's convention: pixel centres on integers); plus
  ``type_map`` int32 (H, W), the CoNSeP key that keeps every pixel's type.
  Without ``types.npy`` the type keys are left out (HoVer-Net leaves out
  ``inst_type`` when it has no types). Compressed MATLAB v5 files;
  ``scipy.io.loadmat`` and histosynth's ``mat`` annotation reader read them;
- ``geojson``: QuPath GeoJSON (:mod:`histosynth.io.qupath`): one
  ``SLIDE.geojson`` FeatureCollection per slide holding the nuclei of all its
  patches in level-0 slide coordinates (pixel (r, c) of a patch at level-0
  ``(x, y)`` with downsample ``d`` covers ``[x + c d, x + (c+1) d) x
  [y + r d, y + (r+1) d)``), to open over the slide in QuPath. Patches
  without slide coordinates — those of the slide ``synthetic``, which
  ``sample-masks`` and ``translate`` write with x = y = 0, and rows whose x, y
  or downsample is missing — go one file per patch, ``patches/NAME.geojson``,
  in the patch's own pixel coordinates (origin at its top-left corner), to
  open over that patch's image (e.g. ``images/NAME.png`` of the ``png``
  export). Outlines follow pixel edges, so the histosynth rasterizer gives
  back each instance's pixels exactly; objects are ``annotation`` by default
  (editable ground truth in QuPath; ``object_type="detection"`` for
  predictions or very many objects, which QuPath draws faster); each
  feature's ``metadata`` carries its patch's index.csv row (``patch`` = NAME,
  ``patch_row``, and the columns of :data:`~histosynth.io.patchset.INDEX_COLUMNS`).
  Exports are per patch: a nucleus cut by two overlapping patches of a slide
  is written once per patch (two overlapping outlines; their ``patch``
  metadata tells them apart). The class names come from the patch set's
  ``report.json``; an instance without a typed pixel is unclassified (no
  ``classification``). Feature ids are UUIDs derived from the patch's
  ``source``, NAME and instance id, so the same export gives the same bytes.

Both new formats also write ``index.csv`` with ``name`` (and for geojson
``file``) columns in front of the patch set's index.

:func:`overlay` draws instance outlines coloured by type on a few patches
per slide, so a person can check at a glance that masks sit on the nuclei.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.io.labels import classes_of_patch_sets, majority_types, read_class_map, relabel
from histosynth.io.patchset import INDEX_COLUMNS, PatchSet, read_patchset
from histosynth.io.qupath import OBJECT_TYPES, PALETTE, instances_to_features, type_colour, write_feature_collections
from histosynth.patches.formats import FORMATS

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "PALETTE", "SYNTHETIC_SLIDE", "export", "outline_image", "overlay"]

#: the slide name of patches without slide coordinates (``sample-masks`` writes it)
SYNTHETIC_SLIDE = "synthetic"


def _names(index: pd.DataFrame) -> list[str]:
    return [f"{i:06d}_{s}_{_int_text(x)}_{_int_text(y)}"
            for i, (s, x, y) in enumerate(zip(index["slide"], index["x"], index["y"]))]


def _int_text(v: Any) -> str:
    try:
        return str(int(v))
    except (TypeError, ValueError, OverflowError):  # NaN: a patch without coordinates
        return "na"


def _atomic_dir(out: Path):
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export(patch_set: str | os.PathLike, out: str | os.PathLike, fmt: str, n_types: int | None = None,
           object_type: str = "annotation") -> int:
    """Export ``patch_set`` to ``out`` in format ``fmt`` (one of :data:`FORMATS`); returns the number of patches.

    ``n_types`` is the type channel count of ``pannuke``; ``object_type`` the
    QuPath object type of ``geojson`` (``annotation`` or ``detection``). An
    unknown format, an empty patch set or a missing array the format needs is
    a :class:`HistosynthError`, and nothing is written.
    """
    if fmt not in FORMATS:
        raise HistosynthError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if object_type not in OBJECT_TYPES:
        raise HistosynthError(f"unknown QuPath object type {object_type!r}; choose from {', '.join(OBJECT_TYPES)}")
    ps = read_patchset(patch_set)
    if len(ps) == 0:
        raise HistosynthError("patch set is empty: nothing to export", ps.path)
    out = Path(out)
    tmp = _atomic_dir(out)
    try:
        if fmt == "geojson":
            _geojson(ps, tmp, object_type)
        else:
            {"png": _png, "pannuke": _pannuke, "hovernet": _hovernet, "hovernet-mat": _hovernet_mat}[fmt](
                ps, tmp, n_types)
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d patches of %s to %s (%s)", len(ps), patch_set, out, fmt)
    return len(ps)


def _require(ps: PatchSet, *names: str) -> None:
    missing = [n for n in names if getattr(ps, n) is None]
    if missing:
        raise HistosynthError(f"this export needs {', '.join(f'{m}.npy' for m in missing)}", ps.path)


def _png(ps: PatchSet, out: Path, n_types: int | None) -> None:
    names = _names(ps.index)
    for sub, arr in (("images", ps.images), ("inst", ps.inst), ("types", ps.types)):
        if arr is None:
            continue
        (out / sub).mkdir()
        if sub == "inst" and len(arr) and int(np.max(arr)) > 65535:
            raise HistosynthError("more than 65535 instances in a patch do not fit a 16-bit PNG", ps.path)
        for name, item in zip(names, arr):
            img = np.asarray(item)
            if sub == "images":
                img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            elif sub == "inst":
                img = img.astype(np.uint16)
            if not cv2.imwrite(str(out / sub / f"{name}.png"), img):
                raise HistosynthError(f"could not write {sub}/{name}.png", out)
    index = ps.index.copy()
    index.insert(0, "name", names)
    index.to_csv(out / "index.csv", index=False)


def _pannuke(ps: PatchSet, out: Path, n_types: int | None) -> None:
    _require(ps, "images", "inst", "types")
    n, h, w = ps.inst.shape
    t = n_types or int(max((int(np.max(ps.types)) if n else 0), 1))
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.float64, shape=(n, h, w, 3))
    masks = np.lib.format.open_memmap(out / "masks.npy", mode="w+", dtype=np.float64, shape=(n, h, w, t + 1))
    for i in range(n):
        images[i] = ps.images[i]
        inst, types = np.asarray(ps.inst[i]), np.asarray(ps.types[i])
        if types.max(initial=0) > t:
            raise HistosynthError(f"patch {i} has type {int(types.max())} > n_types {t}", ps.path)
        m = np.zeros((h, w, t + 1), np.float64)
        for k in range(1, t + 1):
            m[..., k - 1] = np.where(types == k, inst, 0)
        m[..., t] = inst == 0
        masks[i] = m
    images.flush()
    masks.flush()
    del images, masks
    np.save(out / "types.npy", np.array(ps.index["slide"].astype(str).tolist(), dtype=str))


def _hovernet(ps: PatchSet, out: Path, n_types: int | None) -> None:
    _require(ps, "images", "inst", "types")
    for name, img, inst, types in zip(_names(ps.index), ps.images, ps.inst, ps.types):
        arr = np.concatenate([np.asarray(img, np.int32), np.asarray(inst)[..., None],
                              np.asarray(types, np.int32)[..., None]], axis=-1)
        np.save(out / f"{name}.npy", arr)


def _instance_table(inst: np.ndarray, types: np.ndarray | None) -> dict[str, np.ndarray]:
    """HoVer-Net's per-instance keys of one patch: ``inst_uid``, ``inst_centroid`` and (with types) ``inst_type``."""
    ids, index, counts = relabel(inst)
    n = len(ids)
    h, w = inst.shape
    cx = np.bincount(index, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n + 1)[1:]
    cy = np.bincount(index, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=n + 1)[1:]
    table = {
        "inst_uid": ids.astype(np.int64).reshape(n, 1),
        "inst_centroid": np.column_stack([cx / np.maximum(counts, 1), cy / np.maximum(counts, 1)]).reshape(n, 2),
    }
    if types is not None:
        table["inst_type"] = majority_types(index, n, types).astype(np.int64).reshape(n, 1)
    return table


def _hovernet_mat(ps: PatchSet, out: Path, n_types: int | None) -> None:
    import scipy.io

    _require(ps, "inst")
    names = _names(ps.index)
    for i, name in enumerate(names):
        inst = np.asarray(ps.inst[i], dtype=np.int32)
        types = None if ps.types is None else np.asarray(ps.types[i])
        mat: dict[str, np.ndarray] = {"inst_map": inst, **_instance_table(inst, types)}
        if types is not None:
            mat["type_map"] = types.astype(np.int32)
        scipy.io.savemat(out / f"{name}.mat", mat, do_compression=True)
    index = ps.index.copy()
    index.insert(0, "name", names)
    index.to_csv(out / "index.csv", index=False)


def _has_slide_coordinates(index: pd.DataFrame) -> np.ndarray:
    """Per row: whether the patch can be placed on its slide (not ``synthetic``; finite x, y, downsample > 0)."""
    num = index[["x", "y", "downsample"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    ok = np.isfinite(num).all(axis=1) & (num[:, 2] > 0)
    return ok & (index["slide"].astype(str).to_numpy() != SYNTHETIC_SLIDE)


def _file_stem(slide: str, ps: PatchSet) -> str:
    if not slide or slide in (".", "..") or any(c in slide for c in "/\\\0"):
        raise HistosynthError(f"slide name {slide!r} cannot be a file name (index.csv 'slide')", ps.path)
    return slide


def _patch_metadata(index: pd.DataFrame, row: int, name: str) -> dict[str, str]:
    meta = {"patch": name, "patch_row": str(row)}
    for col in INDEX_COLUMNS:
        v = index[col].iloc[row]
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            continue
        meta[col] = str(v)
    return meta


def _geojson(ps: PatchSet, out: Path, object_type: str) -> None:
    _require(ps, "inst")
    classes = classes_of_patch_sets([ps.path])  # {} without a report.json: types named by their numbers
    index = ps.index
    names = _names(index)
    placed = _has_slide_coordinates(index)
    files: list[str] = [""] * len(index)

    def patch_features(rows: np.ndarray, on_slide: bool):
        for i in rows.tolist():
            types = None if ps.types is None else np.asarray(ps.types[i])
            if on_slide:
                offset = (float(index["x"].iloc[i]), float(index["y"].iloc[i]))
                scale = float(index["downsample"].iloc[i])
            else:
                offset, scale = (0.0, 0.0), 1.0
            # ids: uuid5 of (source, NAME, instance id) - reproducible, and distinct between the shards of a
            # synthetic set, whose NAMEs repeat
            feats = instances_to_features(np.asarray(ps.inst[i]), types, classes, offset=offset, scale=scale,
                                          object_type=object_type, id_prefix=f"{index['source'].iloc[i]}|{names[i]}")
            meta = _patch_metadata(index, i, names[i])
            for f in feats:
                f["properties"]["metadata"] = dict(meta)
            yield feats

    slides = index["slide"].astype(str).to_numpy()
    stems: dict[str, str] = {}
    for slide in dict.fromkeys(slides[placed].tolist()):
        stem = _file_stem(slide, ps)
        if stem.lower() in stems:
            raise HistosynthError(f"slides {stems[stem.lower()]!r} and {slide!r} would share one file name", ps.path)
        stems[stem.lower()] = slide
        rows = np.flatnonzero(placed & (slides == slide))
        n = write_feature_collections(patch_features(rows, True), out / f"{stem}.geojson")
        log.info("geojson: %s: %d nuclei from %d patches", slide, n, len(rows))
        for i in rows.tolist():
            files[i] = f"{stem}.geojson"
    loose = np.flatnonzero(~placed)
    if len(loose):
        (out / "patches").mkdir()
        for i in loose.tolist():
            write_feature_collections(patch_features(np.array([i]), False), out / "patches" / f"{names[i]}.geojson")
            files[i] = f"patches/{names[i]}.geojson"
        log.info("geojson: %d patches without slide coordinates, one file each in their own pixel coordinates",
                 len(loose))
    table = index.copy()
    table.insert(0, "file", files)
    table.insert(0, "name", names)
    table.to_csv(out / "index.csv", index=False)


def outline_image(image: np.ndarray, inst: np.ndarray, types: np.ndarray | None) -> np.ndarray:
    """``image`` with each instance's inner boundary drawn in its type's colour."""
    from skimage.segmentation import find_boundaries

    out = np.array(image, copy=True)
    edges = find_boundaries(inst, mode="inner") & (inst > 0)
    colour_ids = np.ones_like(inst, dtype=np.intp) if types is None else np.asarray(types, dtype=np.intp)
    top = int(colour_ids.max(initial=0))
    lut = np.array([PALETTE[0]] + [type_colour(t) for t in range(1, top + 1)], dtype=np.uint8)
    out[edges] = lut[colour_ids[edges]]
    return out


def overlay(
    patch_set: str | os.PathLike,
    out_png: str | os.PathLike,
    per_slide: int = 4,
    seed: int = 0,
    class_names: dict[int, str] | dict[str, int] | None = None,
) -> int:
    """A PNG grid: for each slide, ``per_slide`` patches with nucleus outlines (colour = type).

    Patches with the most nuclei are preferred (ties broken by ``seed``), so
    the picture shows nuclei rather than empty stroma. ``class_names`` (a class
    map in any form :func:`histosynth.io.labels.read_class_map` reads) adds a
    legend. Returns the patch count drawn.
    """
    ps = read_patchset(patch_set, require=("images", "inst"))
    out_png = Path(out_png)
    rng = np.random.default_rng(seed)
    rows = []
    for slide, group in ps.index.groupby("slide", sort=True):
        order = group.index.to_numpy()
        score = group["n_nuclei"].fillna(0).to_numpy() + rng.random(len(order)) * 0.5
        pick = order[np.argsort(-score, kind="stable")[:per_slide]]
        tiles = [outline_image(ps.images[i], ps.inst[i], None if ps.types is None else ps.types[i]) for i in pick]
        h, w = ps.images.shape[1:3]
        tiles += [np.full((h, w, 3), 255, np.uint8)] * (per_slide - len(tiles))
        label = np.full((24, w * per_slide + 2 * (per_slide - 1), 3), 255, np.uint8)
        cv2.putText(label, str(slide), (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        gap = np.full((h, 2, 3), 255, np.uint8)
        strip = np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1)
        rows.append(np.concatenate([label, strip], axis=0))
    if not rows:
        raise HistosynthError("patch set is empty: nothing to draw", patch_set)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    picture = np.concatenate(rows, axis=0)
    if class_names:
        legend = np.full((24, width, 3), 255, np.uint8)
        x = 4
        for tid, name in read_class_map(class_names, "class_names").items():
            colour = tuple(type_colour(tid))
            cv2.rectangle(legend, (x, 6), (x + 12, 18), colour, -1)
            cv2.putText(legend, name, (x + 16, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
            x += 24 + 9 * len(name)
        picture = np.concatenate([legend, picture], axis=0)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise HistosynthError("could not write the overlay", out_png)
    os.replace(tmp, out_png)
    return sum(min(per_slide, len(g)) for _, g in ps.index.groupby("slide"))
