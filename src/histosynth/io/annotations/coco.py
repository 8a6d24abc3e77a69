"""COCO JSON: polygons and RLE masks, one image of the file at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import (
    instance_polygons,
    linearrings,
    nonfinite_error,
    not_a_number,
    not_a_number_error,
    shoelace,
)
from histosynth.io.annotations._model import Parsed
from histosynth.io.annotations.label import MAX_LABEL_PIXELS


def rle_decode(seg: dict, ref: str, path: Path) -> np.ndarray:
    """COCO RLE (uncompressed list or compressed string counts) -> (h, w) bool mask."""
    try:
        size, counts = seg["size"], seg["counts"]
        bad = not_a_number(size)
        if bad is not None:
            raise not_a_number_error(path, ref, "RLE size", bad)
        h, w = (int(v) for v in size)
    except (KeyError, TypeError, ValueError):
        raise HistosynthError(f"{ref}: malformed RLE segmentation", path) from None
    if isinstance(counts, str):
        counts = _rle_string_counts(counts, ref, path)
    else:
        bad = not_a_number(counts)
        if bad is not None:
            raise not_a_number_error(path, ref, "RLE counts", bad)
    if h < 0 or w < 0 or h * w > MAX_LABEL_PIXELS:
        raise HistosynthError(f"{ref}: RLE size {h}x{w} is negative or over {MAX_LABEL_PIXELS:,} pixels", path)
    try:
        counts = np.asarray(counts, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise HistosynthError(f"{ref}: RLE counts are not a list of integers", path) from None
    if counts.ndim != 1:
        raise HistosynthError(f"{ref}: RLE counts are not a flat list of integers", path)
    # each count at most h * w first, so that the sum cannot wrap around
    if (counts.size and (counts.min() < 0 or counts.max() > h * w)) or int(counts.sum()) != h * w:
        raise HistosynthError(f"{ref}: RLE counts do not add up to {h}x{w}", path)
    vals = np.zeros(len(counts), dtype=bool)
    vals[1::2] = True
    flat = np.repeat(vals, counts)
    return flat.reshape(w, h).T  # COCO RLE is column-major


def _rle_string_counts(s: str, ref: str, path: Path) -> list[int]:
    """pycocotools' compressed RLE string (LEB128-like, 5 bits per char, delta-coded)."""
    counts: list[int] = []
    p = 0
    b = s.encode("ascii", "replace")
    while p < len(b):
        x, k, more = 0, 0, True
        while more:
            if p >= len(b):
                raise HistosynthError(f"{ref}: truncated compressed RLE", path)
            c = b[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _coco_list(data: dict, key: str, path: Path) -> list:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise HistosynthError(f"COCO '{key}' is a {type(value).__name__}, not a list", path)
    return value


def _coco_id(value: Any, what: str, path: Path) -> Any:
    """An id as a dictionary key: a number or a string (a list or an object is a corrupt file)."""
    if value is not None and not isinstance(value, (int, float, str)):
        raise HistosynthError(f"{what} {_short(value)} is not a number or a string", path)
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def coco_images(data: dict, path: Path) -> tuple[dict, dict, dict]:
    if not isinstance(data.get("annotations"), list):
        raise HistosynthError("COCO file without an 'annotations' list", path)
    images = {}
    for k, im in enumerate(_coco_list(data, "images", path)):
        if isinstance(im, dict) and "id" in im:
            images[_coco_id(im["id"], f"images[{k}]: id", path)] = im
    cats = {}
    for k, c in enumerate(_coco_list(data, "categories", path)):
        if isinstance(c, dict) and "id" in c:
            cats[_coco_id(c["id"], f"categories[{k}]: id", path)] = str(c.get("name", c["id"]))
    by_image: dict = {}
    for a in data["annotations"]:
        if not isinstance(a, dict):
            raise HistosynthError("COCO annotation that is not an object", path)
        iid = _coco_id(a.get("image_id"), f"annotation id {_short(a.get('id', '?'))}: image_id", path)
        by_image.setdefault(iid, []).append(a)
    return images, cats, by_image


def select_coco_image(images: dict, by_image: dict, image: Any, path: Path) -> Any:
    if image is None:
        keys = set(images) | set(by_image)
        if len(keys) == 1:
            return next(iter(keys))
        raise HistosynthError(
            f"COCO file holds {len(keys)} images; pass image= (a file_name or an image id), "
            "or use read_coco_all()",
            path,
        )
    if image in images or image in by_image:
        return image
    target = str(image)
    for iid, im in images.items():
        fn = str(im.get("file_name", ""))
        base = os.path.basename(fn)
        if target in (fn, base, os.path.splitext(base)[0]):
            return iid
    raise HistosynthError(f"COCO file has no image {image!r}", path)


def parse_coco_image(anns: list[dict], cats: dict, image_info: dict | None, path: Path) -> Parsed:
    out = Parsed()
    if image_info and "width" in image_info and "height" in image_info:
        bad = not_a_number([image_info["width"], image_info["height"]])
        if bad is not None:
            raise not_a_number_error(path, f"image {image_info.get('id', '?')}", "width/height", bad)
        try:
            out.size = (int(image_info["width"]), int(image_info["height"]))
        except (TypeError, ValueError, OverflowError):  # None, NaN, infinity: the size is unknown
            out.size = None
    pending: list[tuple[str, str, np.ndarray]] = []
    direct: list[tuple[str, str, Any]] = []
    order: list[tuple[str, int]] = []
    for a in anns:
        ref = f"annotation id {_short(a.get('id', '?'))}"
        out.report["read"] += 1
        cid = _coco_id(a.get("category_id"), f"{ref}: category_id", path)
        if cid not in cats and cats:
            raise HistosynthError(f"{ref}: category_id {cid!r} is not in 'categories'", path)
        name = cats.get(cid, "" if cid is None else str(cid))
        if a.get("iscrowd"):
            out.report["skipped_crowd"] += 1
            continue
        seg = a.get("segmentation")
        if isinstance(seg, dict):
            mask = rle_decode(seg, ref, path)
            if not mask.any():
                direct.append((ref, name, None))
            else:
                _, polys, counts = instance_polygons(mask.astype(np.uint8))
                out.report.update(counts)
                direct.append((ref, name, polys[0]))
            order.append(("d", len(direct) - 1))
            continue
        if not isinstance(seg, list) or not seg:
            out.report["skipped_not_polygon"] += 1
            continue
        rings = []
        for part in seg:
            bad = not_a_number(part)
            if bad is not None:
                raise not_a_number_error(path, ref, "segmentation is not a list of numbers", bad)
            try:
                flat = np.asarray(part, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise HistosynthError(f"{ref}: segmentation is not a list of numbers", path) from None
            if flat.size % 2:
                raise HistosynthError(f"{ref}: segmentation polygon has an odd number of values", path)
            if not np.isfinite(flat).all():
                raise nonfinite_error(path, ref)
            rings.append(flat.reshape(-1, 2))
        if len(rings) > 1:
            best = int(np.argmax([abs(shoelace(r)) for r in rings]))
            out.report["multipolygon_parts_dropped"] += len(rings) - 1
            rings = [rings[best]]
        pending.append((ref, name, rings[0]))
        order.append(("p", len(pending) - 1))
    lrs = linearrings([r for _, _, r in pending])
    polys: list[Any] = [None] * len(pending)
    idx = [i for i, lr in enumerate(lrs) if lr is not None]
    if idx:
        for i, p in zip(idx, shapely.polygons(np.asarray([lrs[i] for i in idx], dtype=object))):
            polys[i] = p
    for kind, j in order:
        if kind == "p":
            out.add(pending[j][0], pending[j][1], polys[j])
        else:
            out.add(*direct[j])
    return out
