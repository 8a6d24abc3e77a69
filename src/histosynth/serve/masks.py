"""Masks for the page: drawn nuclei rasterised, uploads read with the CLI's readers, and the downloads.

**Drawing.** The page sends the nuclei it drew as a list of objects, in canvas pixels:

- ``{"kind": "ellipse", "cx", "cy", "rx", "ry", "angle" (degrees), "type"}``;
- ``{"kind": "shape", "shape": k, "cx", "cy", "r", "angle", "type"}``: shape ``k`` of the drawing shapes
  (β-VAE decodes or library nuclei, 64 x 64), scaled so its 64-px frame spans ``4 r`` px, rotated about the
  frame's centre by ``angle`` and centred at (cx, cy).

They are drawn in order over a base mask (a sampled or uploaded one, or nothing), each over what is under
it (the newest on top); ids are renumbered 1..n afterwards, a nucleus left without a pixel is gone.

**Uploads** go through :func:`histosynth.io.annotations.read`, the reader of ``rasterize`` (a label image:
PNG / TIFF / .npy, optionally with a type map; a GeoJSON with class names), at the canvas size, and are
rasterised with :func:`histosynth.patches.rasterize.rasterize_tile`: the same checks and the same error
messages as the CLI.
"""

from __future__ import annotations

import base64
import io
import json
import math
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histosynth.errors import HistosynthError
from histosynth.serve.run import Mask

#: the most nuclei one drawing request may hold
MAX_DRAWN = 2000
SHAPE_FRAME = 64


# --------------------------------------------------------------------------- drawing
def _number(item: Mapping[str, Any], key: str, i: int, low: float, high: float) -> float:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HistosynthError(f"drawn nucleus {i}: {key} must be a number, got {value!r}")
    if not low <= value <= high:
        raise HistosynthError(f"drawn nucleus {i}: {key} = {value} is outside [{low:g}, {high:g}]")
    return float(value)


def draw_nuclei(nuclei: Sequence[Any], side: int, classes: Mapping[int, str], shapes: np.ndarray,
                base: Mask | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Instance (int32) and type (uint8) maps of ``nuclei`` drawn over ``base`` on a ``side`` x ``side`` canvas."""
    if not isinstance(nuclei, list):
        raise HistosynthError("nuclei must be a list of drawn nuclei")
    if len(nuclei) > MAX_DRAWN:
        raise HistosynthError(f"{len(nuclei)} drawn nuclei; at most {MAX_DRAWN} per mask")
    if base is not None:
        if base.inst.shape != (side, side):
            raise HistosynthError(f"the base mask is {base.inst.shape[1]} x {base.inst.shape[0]} px, the canvas "
                                  f"{side} x {side}")
        inst = base.inst.astype(np.int32, copy=True)
        types = base.types.astype(np.uint8, copy=True)
    else:
        inst = np.zeros((side, side), np.int32)
        types = np.zeros((side, side), np.uint8)
    next_id = int(inst.max(initial=0)) + 1
    for i, item in enumerate(nuclei):
        if not isinstance(item, dict):
            raise HistosynthError(f"drawn nucleus {i} is not an object")
        t = item.get("type")
        if isinstance(t, bool) or not isinstance(t, int) or t not in classes:
            raise HistosynthError(f"drawn nucleus {i}: unknown type {t!r}; the model knows "
                                  + ", ".join(f"{k} ({v})" for k, v in sorted(classes.items())))
        cx = _number(item, "cx", i, -side, 2 * side)
        cy = _number(item, "cy", i, -side, 2 * side)
        angle = _number(item, "angle", i, -3600, 3600) if "angle" in item else 0.0
        pixels = np.zeros((side, side), np.uint8)
        kind = item.get("kind")
        if kind == "ellipse":
            rx = _number(item, "rx", i, 0.5, side)
            ry = _number(item, "ry", i, 0.5, side)
            cv2.ellipse(pixels, ((cx, cy), (2 * rx, 2 * ry), angle), 1, thickness=-1)
        elif kind == "shape":
            k = item.get("shape")
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(shapes):
                raise HistosynthError(f"drawn nucleus {i}: shape {k!r} is not one of the {len(shapes)} shapes")
            r = _number(item, "r", i, 0.5, side)
            scale = 4 * r / SHAPE_FRAME
            c = (SHAPE_FRAME - 1) / 2
            m = cv2.getRotationMatrix2D((c, c), -angle, scale)
            m[:, 2] += (cx - c, cy - c)
            warped = cv2.warpAffine(shapes[k].astype(np.float32), m, (side, side), flags=cv2.INTER_LINEAR)
            pixels = (warped >= 0.5).astype(np.uint8)
        else:
            raise HistosynthError(f"drawn nucleus {i}: kind must be 'ellipse' or 'shape', got {kind!r}")
        on = pixels.astype(bool)
        inst[on] = next_id
        types[on] = t
        next_id += 1
    return relabel(inst, types)


def relabel(inst: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids renumbered 1..n in order of first id; background types cleared."""
    ids = np.unique(inst)
    ids = ids[ids > 0]
    lut = np.zeros(int(inst.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    out = lut[inst]
    types = np.where(out > 0, types, 0).astype(np.uint8)
    return out.astype(np.int32), types


# --------------------------------------------------------------------------- uploads
def _safe_name(name: str, default: str) -> str:
    base = Path(str(name or "")).name
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return keep[:80] or default


def read_upload(data: bytes, filename: str, side: int, classes: Mapping[int, str], *,
                types_data: bytes | None = None, types_filename: str = "", default_type: int | None = None) -> Mask:
    """A mask from an uploaded label image (+ optional type map) or GeoJSON, read as ``rasterize`` reads it.

    Errors name the uploaded file, never the temporary folder it was read from.
    """
    from histosynth.io.annotations import read
    from histosynth.patches.rasterize import rasterize_tile

    name = _safe_name(filename, "upload")
    head = data[:64].lstrip()
    is_json = name.lower().endswith((".json", ".geojson")) or head.startswith((b"{", b"["))
    class_map = {str(n): int(t) for t, n in classes.items()}
    if not is_json:  # label images name their types by number
        class_map.update({str(int(t)): int(t) for t in classes})
    with tempfile.TemporaryDirectory(prefix="histosynth-serve-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        types_path = None
        if types_data is not None and not is_json:
            types_path = Path(tmp) / ("types-" + _safe_name(types_filename, "types.png"))
            types_path.write_bytes(types_data)
        catch_all = default_type if (not is_json and types_path is None) else None
        try:
            nuclei = read(path, class_map, fmt="geojson" if is_json else "label", slide_size=(side, side),
                          types=types_path, catch_all=catch_all)
        except HistosynthError as err:
            message = str(err).replace(f"{tmp}/", "")
            if "unknown class names" in message:
                message += f" (the model's classes: {', '.join(classes.values())})"
            raise HistosynthError(message) from None
    if not nuclei.nuclei:
        raise HistosynthError(f"{name}: no nucleus inside the {side} x {side} canvas")
    inst, types, _ = rasterize_tile([n.polygon for n in nuclei.nuclei], [n.type_id for n in nuclei.nuclei],
                                    0, 0, 1.0, side, side)
    return Mask(inst.astype(np.int32), types.astype(np.uint8), f"uploaded {name}")


# --------------------------------------------------------------------------- pictures and downloads
def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an RGB (H, W, 3) or a label (H, W) image (16-bit when it needs it)."""
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    # Huffman coding only (no LZ77 matching): lossless, 10 % larger than zlib level 1 on a painted
    # 512-px image and a third faster (26 vs 40 ms) - the encoding is most of a paint request's overhead
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                          cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY])
    if not ok:
        raise HistosynthError("could not encode the PNG")
    return buf.tobytes()


def data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def mask_picture_url(mask: Mask) -> str:
    """The mask drawn for people (type colours, black outlines) as a PNG data URL, made once per mask."""
    from histosynth.gan.translate import type_colour_image

    if "picture" not in mask.pictures:
        mask.pictures["picture"] = data_url(type_colour_image(mask.inst, mask.types))
    return mask.pictures["picture"]


def overlay_picture(image: np.ndarray, mask: Mask) -> np.ndarray:
    """``image`` with the mask's outlines in their type's colour (``histosynth.patches.export.outline_image``);
    the outline pixels and their colours are found once per mask, so repainting a mask costs a copy."""
    if "outline" not in mask.pictures:
        from histosynth.patches.export import outline_image

        where = np.nonzero(_edges(mask.inst))  # the pixels outline_image draws
        drawn = outline_image(np.zeros((*mask.inst.shape, 3), np.uint8), mask.inst, mask.types)
        mask.pictures["outline"] = (where, drawn[where])
    where, colours = mask.pictures["outline"]
    out = np.array(image, copy=True)
    out[where] = colours
    return out


def _edges(inst: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(inst, mode="inner") & (inst > 0)


def tiff_bytes(array: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array, compression="zlib")
    return buf.getvalue()


def pair_zip(image: np.ndarray, mask: Mask, classes: Mapping[int, str], info: Mapping[str, Any]) -> bytes:
    """The pair as a zip: image.png, inst.tif (int32), types.tif (uint8), nuclei.geojson, info.json."""
    from histosynth.io.labels import class_map_to_json
    from histosynth.io.qupath import instances_to_features, write_feature_collection

    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="histosynth-serve-") as tmp:
        geojson = Path(tmp) / "nuclei.geojson"
        write_feature_collection(instances_to_features(mask.inst, mask.types, dict(classes)), geojson)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("image.png", png_bytes(image))
            z.writestr("inst.tif", tiff_bytes(mask.inst.astype(np.int32)))
            z.writestr("types.tif", tiff_bytes(mask.types.astype(np.uint8)))
            z.write(geojson, "nuclei.geojson")
            z.writestr("info.json", json.dumps({**info, "mask": mask.origin, "n_nuclei": mask.n_nuclei,
                                                "classes": class_map_to_json(dict(classes))}, indent=2))
    return buf.getvalue()
