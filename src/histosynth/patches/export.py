"""Exports of a patch set for people and other tools, and overlay pictures.

The patch set stays the working format; these are one-way copies:

- ``png``: ``images/NAME.png`` (RGB), ``inst/NAME.png`` (16-bit instance ids),
  ``types/NAME.png`` (8-bit type ids), and ``index.csv`` with a ``name``
  column, where NAME is ``{row:06d}_{slide}_{x}_{y}``;
- ``pannuke``: PanNuke's stacked arrays: ``images.npy`` float64 (N, H, W, 3),
  ``masks.npy`` float64 (N, H, W, T + 1) where channel t - 1 holds the
  instance ids of the nuclei of type t and the last channel is 1 on
  background, and ``types.npy`` (the slide name of each patch, as PanNuke
  stores the tissue type there);
- ``hovernet``: one ``NAME.npy`` per patch, int32 (H, W, 5) = RGB, instance
  map, type map — the layout HoVer-Net's patch extraction writes for training.

:func:`overlay` draws instance outlines coloured by type on a few patches
per slide, so a person can check at a glance that masks sit on the nuclei.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.io.labels import read_class_map
from histosynth.io.patchset import PatchSet, read_patchset

log = logging.getLogger(__name__)

FORMATS = ("png", "pannuke", "hovernet")

# outline colours by type id (1-based); 0 unused
PALETTE = np.array(
    [
        [0, 0, 0],
        [0, 200, 0],
        [230, 40, 40],
        [40, 90, 255],
        [255, 200, 0],
        [200, 0, 200],
        [0, 200, 200],
        [255, 128, 0],
        [128, 128, 128],
    ],
    dtype=np.uint8,
)


def _names(index: pd.DataFrame) -> list[str]:
    return [f"{i:06d}_{s}_{int(x)}_{int(y)}" for i, (s, x, y) in enumerate(zip(index["slide"], index["x"], index["y"]))]


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


def export(patch_set: str | os.PathLike, out: str | os.PathLike, fmt: str, n_types: int | None = None) -> int:
    """Export ``patch_set`` to ``out`` in format ``fmt``; returns the number of patches."""
    if fmt not in FORMATS:
        raise HistosynthError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    ps = read_patchset(patch_set)
    out = Path(out)
    tmp = _atomic_dir(out)
    try:
        {"png": _png, "pannuke": _pannuke, "hovernet": _hovernet}[fmt](ps, tmp, n_types)
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


def outline_image(image: np.ndarray, inst: np.ndarray, types: np.ndarray | None) -> np.ndarray:
    """``image`` with each instance's inner boundary drawn in its type's colour."""
    from skimage.segmentation import find_boundaries

    out = np.array(image, copy=True)
    edges = find_boundaries(inst, mode="inner") & (inst > 0)
    colour_ids = np.ones_like(inst, dtype=np.intp) if types is None else np.asarray(types, dtype=np.intp)
    out[edges] = PALETTE[np.clip(colour_ids[edges], 0, len(PALETTE) - 1)]
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
            colour = tuple(int(c) for c in PALETTE[min(tid, len(PALETTE) - 1)])
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
