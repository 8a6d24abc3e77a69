"""HoVer-Net/CoNSeP .mat files and label images (.npy/.png/.tif), with their type maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import instance_polygons
from histosynth.io.annotations._model import Parsed
from histosynth.io.labels import instance_types


def load_mat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise HistosynthError(
            "MATLAB v7.3 (HDF5) .mat files are not supported; re-save with -v7 or export a .npy", path
        ) from None
    except Exception as exc:  # scipy raises ValueError/TypeError/... on corrupt files
        raise HistosynthError(f"cannot read .mat file ({type(exc).__name__}: {exc})", path) from None


def load_label_array(path: Path) -> np.ndarray:
    """A 2-D (or HoVer-Net multi-channel) array from .npy/.png/.tif."""
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if head.startswith(b"\x93NUMPY") or suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")) or suffix in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        import cv2

        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ValueError("OpenCV could not decode the image")
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            arr = arr[..., 2::-1] if arr.shape[2] == 3 else arr[..., [2, 1, 0, 3]]
        return arr
    except HistosynthError:
        raise
    except Exception as exc:
        raise HistosynthError(f"cannot read label image ({type(exc).__name__}: {exc})", path) from None


def _as_label_2d(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] in (3, 4):
        if all(np.array_equal(a[..., 0], a[..., c]) for c in (1, 2)):
            a = a[..., 0]
        else:
            raise HistosynthError(f"{what} is a colour image (channels differ), not a 2-D label image", path)
    if a.ndim != 2:
        raise HistosynthError(f"{what} must be a 2-D integer array, got shape {a.shape}", path)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise HistosynthError(f"{what} holds non-integer values; expected integer labels", path)
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise HistosynthError(f"{what} has dtype {a.dtype}; expected integer labels", path)
    if a.size and a.min() < 0:
        raise HistosynthError(f"{what} has negative labels", path)
    return a


def _types_per_instance(
    ids: np.ndarray, inst: np.ndarray, types: Any, path: Path, types_path: Path
) -> np.ndarray:
    """Type value per instance id, from per-instance `inst_type` or a pixel type map."""
    if isinstance(types, tuple) and types[0] == "inst_type":
        t = np.asarray(types[1]).reshape(-1)
        if len(t) == len(ids):  # ascending ids (CoNSeP, and patches with sparse ids)
            return t.astype(np.int64)
        if ids.size and len(t) >= int(ids.max()):  # indexed by id - 1
            return t[ids.astype(np.int64) - 1].astype(np.int64)
        raise HistosynthError(
            f"inst_type in {types_path} has {len(t)} entries but the instance map has "
            f"{len(ids)} instances (largest id {int(ids.max()) if ids.size else 0})",
            path,
        )
    tmap = types[1]
    if tmap.shape != inst.shape:
        raise HistosynthError(
            f"type map {types_path} has shape {tmap.shape}, instance map has {inst.shape}", path
        )
    all_ids, all_types = instance_types(inst, tmap)
    return all_types[np.searchsorted(all_ids, ids)]


def _load_types(types_path: Path, path: Path) -> tuple[str, np.ndarray]:
    if not types_path.is_file():
        raise HistosynthError(f"type map {types_path} not found", path)
    with open(types_path, "rb") as f:
        head = f.read(128)
    if head.startswith(b"MATLAB") or types_path.suffix.lower() == ".mat":
        m = load_mat(types_path)
        if "inst_type" in m:
            return ("inst_type", np.asarray(m["inst_type"]))
        if "type_map" in m:
            return ("type_map", _as_label_2d(m["type_map"], types_path, "type_map"))
        raise HistosynthError("has neither 'inst_type' nor 'type_map'", types_path)
    return ("type_map", _as_label_2d(load_label_array(types_path), types_path, "type map"))


_TYPE_SIBLING_SUFFIXES = ("_type", "_types", "_class", "_classes")
_IMAGE_EXTS = (".npy", ".png", ".tif", ".tiff")


def find_type_sibling(path: Path) -> Path | None:
    """An optional type map beside a label image: <stem>.mat or <stem>_type(s)/_class(es).<ext>."""
    stem = path.stem
    cands = []
    if path.suffix.lower() != ".mat":
        cands.append(path.with_name(stem + ".mat"))
    for s in _TYPE_SIBLING_SUFFIXES:
        for e in _IMAGE_EXTS:
            cands.append(path.with_name(stem + s + e))
    for c in cands:
        if c.is_file() and c != path:
            return c
    return None


def parse_label(path: Path, types_path: Path | None, from_mat: bool) -> Parsed:
    out = Parsed()
    types: Any = None
    tsrc = types_path
    if from_mat:
        m = load_mat(path)
        if "inst_map" not in m:
            keys = sorted(k for k in m if not k.startswith("__"))
            raise HistosynthError(
                f"no 'inst_map' in the .mat file (it has {keys}); read the instance map "
                "(.npy/.png/.tif) and pass this file as types=",
                path,
            )
        inst = _as_label_2d(m["inst_map"], path, "inst_map")
        if types_path is None:
            tsrc = path
            if "inst_type" in m:
                types = ("inst_type", np.asarray(m["inst_type"]))
            elif "type_map" in m:
                types = ("type_map", _as_label_2d(m["type_map"], path, "type_map"))
    else:
        arr = np.asarray(load_label_array(path))
        if arr.ndim == 3 and arr.shape[2] in (2, 5) and path.suffix.lower() == ".npy":
            # HoVer-Net training patches: [..., inst, type] or [R, G, B, inst, type]
            inst = _as_label_2d(arr[..., -2], path, "instance channel")
            if types_path is None:
                types = ("type_map", _as_label_2d(arr[..., -1], path, "type channel"))
                tsrc = path
        else:
            inst = _as_label_2d(arr, path, "label image")
        if types_path is None and types is None:
            tsrc = find_type_sibling(path)
    if types is None and tsrc is not None:
        types = _load_types(tsrc, path)
    out.size = (int(inst.shape[1]), int(inst.shape[0]))
    out.size_is_exact = True
    ids, polys, counts = instance_polygons(inst)
    out.report.update(counts)
    out.report["read"] += len(ids)
    tvals = None if types is None else _types_per_instance(ids, inst, types, path, tsrc)
    for j, (iid, poly) in enumerate(zip(ids, polys)):
        name = "" if tvals is None else str(int(tvals[j]))
        out.add(f"instance {int(iid)}", name, poly)
    return out
