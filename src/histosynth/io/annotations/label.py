"""HoVer-Net/CoNSeP .mat files and label images (.npy/.png/.tif), with their type maps."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import instance_polygons
from histosynth.io.annotations._model import Parsed
from histosynth.io.labels import instance_types

#: the most pixels a label image may have (32,768 squared): tracing one takes about 40 bytes per pixel
MAX_LABEL_PIXELS = 2**30


def load_mat(path: Path) -> dict:
    """The variables of a MATLAB v4-v7.2 file, read by ``scipy.io.loadmat`` in a child process.

    scipy's MAT v5 reader is C code that crashes the interpreter (a segfault,
    no exception) on some damaged files: with scipy 1.17, a ``.mat`` whose char
    array is cut short by 12 bytes. In a child process such a crash becomes a
    HistosynthError naming the file instead of the end of the stage. The child
    is forked where the platform allows (a few milliseconds; scipy is already
    imported), spawned elsewhere.
    """
    import multiprocessing as mp

    import scipy.io  # noqa: F401 - imported here, once, so that a forked child has it

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_load_mat_child, args=(str(path), send), daemon=True)
    child.start()
    send.close()
    result, finished = None, False
    try:
        try:
            result = receive.recv()
        except EOFError:  # the child died without an answer
            pass
        finished = True
    finally:
        receive.close()
        if not finished:  # interrupted (KeyboardInterrupt, a time limit): stop the child too
            child.terminate()
        child.join()
    if result is None:
        raise HistosynthError(
            f"cannot read .mat file: scipy's reader crashed on it (exit code {child.exitcode}); a corrupt file", path
        )
    kind, value = result
    if kind == "v7.3":
        raise HistosynthError(
            "MATLAB v7.3 (HDF5) .mat files are not supported; re-save with -v7 or export a .npy", path
        )
    if kind == "error":
        raise HistosynthError(f"cannot read .mat file ({value})", path)
    return value


def _load_mat_child(path: str, send: Any) -> None:
    """In the child: ("ok", variables), ("v7.3", None) or ("error", message), sent through ``send``."""
    import faulthandler

    import scipy.io

    faulthandler.disable()  # a crash here is the parent's to report in one line, not a dump on stderr

    try:
        result: tuple[str, Any] = ("ok", scipy.io.loadmat(path))
    except NotImplementedError:
        result = ("v7.3", None)
    except Exception as exc:  # noqa: BLE001 - scipy raises ValueError/TypeError/... on corrupt files
        result = ("error", f"{type(exc).__name__}: {exc}")
    try:
        send.send(result)
    except Exception as exc:  # noqa: BLE001 - content that does not pickle
        send.send(("error", f"unreadable content ({type(exc).__name__}: {exc})"))
    finally:
        send.close()


def load_label_array(path: Path) -> np.ndarray:
    """A 2-D (or HoVer-Net multi-channel) array from .npy/.png/.tif, its size checked from the header first."""
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(24)
    try:
        if head.startswith(b"\x93NUMPY") or suffix == ".npy":
            try:  # the header alone (a memory map reads no data)
                _check_label_pixels(path, np.load(path, mmap_mode="r", allow_pickle=False).shape)
            except HistosynthError:
                raise
            except Exception:  # noqa: BLE001, S110 - np.load below reports the file
                pass
            arr = np.load(path, allow_pickle=False)
        elif head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")) or suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                _check_label_pixels(path, tf.pages[0].shape)
                arr = tf.asarray(key=0)
        else:
            import cv2

            if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
                w, h = struct.unpack_from(">II", head, 16)
                _check_label_pixels(path, (h, w))
            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ValueError("OpenCV could not decode the image")
            if arr.ndim == 3 and arr.shape[2] in (3, 4):
                arr = arr[..., 2::-1] if arr.shape[2] == 3 else arr[..., [2, 1, 0, 3]]
    except HistosynthError:
        raise
    except Exception as exc:
        raise HistosynthError(f"cannot read label image ({type(exc).__name__}: {exc})", path) from None
    return arr


def _check_label_pixels(path: Path, shape: tuple[int, ...]) -> None:
    """Refuse an image without pixels, or with more than MAX_LABEL_PIXELS (checked before decoding where possible)."""
    if len(shape) < 2:  # not an image: _as_label_2d names the shape
        return
    pixels = int(shape[0]) * int(shape[1])
    if pixels == 0:
        raise HistosynthError(f"label image of shape {tuple(shape)} has no pixels", path)
    if pixels > MAX_LABEL_PIXELS:
        raise HistosynthError(
            f"label image of {shape[1]} x {shape[0]} pixels ({pixels:,}) is over the limit of {MAX_LABEL_PIXELS:,} "
            "pixels for a label image: a corrupt or hostile file? If it is genuine, split it into tiles or raise "
            "histosynth.io.annotations.label.MAX_LABEL_PIXELS",
            path,
        )


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
    _check_label_pixels(path, a.shape)
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
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:  # would wrap to negative ids
        raise HistosynthError(f"{what} holds labels above 2**63 - 1 ({int(a.max())})", path)
    return a


def _integer_values(t: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Non-negative integer values (int64) of a numeric array, or a HistosynthError naming ``what``."""
    if t.dtype == bool:
        t = t.astype(np.uint8)
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise HistosynthError(f"{what} has dtype {t.dtype}; expected integer types", path)
    if np.issubdtype(t.dtype, np.floating) and (not np.isfinite(t).all() or not np.array_equal(t, np.round(t))):
        raise HistosynthError(f"{what} holds non-integer values; expected integer types", path)
    if t.size and (t.min() < 0 or t.max() > np.iinfo(np.int64).max):
        raise HistosynthError(f"{what} holds values outside 0..2**63-1; expected type numbers", path)
    return t.astype(np.int64)


def _types_per_instance(
    ids: np.ndarray, inst: np.ndarray, types: Any, path: Path, types_path: Path
) -> np.ndarray:
    """Type value per instance id, from per-instance `inst_type` or a pixel type map."""
    if isinstance(types, tuple) and types[0] == "inst_type":
        t = _integer_values(np.asarray(types[1]).reshape(-1), types_path, "inst_type")
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


#: public names of the label checks, which the patch-dataset importer (histosynth.patches.importer) shares
as_label_2d = _as_label_2d
integer_values = _integer_values
