"""ImageJ ROIs: one ``.roi`` file or a ``RoiSet.zip``."""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import (
    catmull_rom_closed,
    ellipse_ring,
    largest_polygon,
    linearrings,
    nonfinite_error,
    rings_to_polys_inplace,
)
from histosynth.io.annotations._model import Parsed

_ROI_POLYGON, _ROI_RECT, _ROI_OVAL = 0, 1, 2
_ROI_FREEHAND, _ROI_TRACED = 7, 8
_ROI_AREA_TYPES = {_ROI_POLYGON, _ROI_FREEHAND, _ROI_TRACED}
_ROI_TYPE_NAMES = {3: "line", 4: "freeline", 5: "polyline", 6: "no-roi", 9: "angle", 10: "point"}
_OPT_SPLINE_FIT, _OPT_SUBPIXEL, _OPT_DRAW_OFFSET = 1, 128, 256
_MAX_ROI_BYTES = 5 * 1024 * 1024  # ImageJ's own limit for a ROI
# what zipfile raises for a damaged archive or entry: bad headers and CRCs, offsets past the end (OSError from
# seek), cut-off deflate streams (EOFError, zlib.error), unknown compression (NotImplementedError), encryption
# (RuntimeError), impossible header values (ValueError)
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError)


def _short(b: bytes, o: int) -> int:
    v = struct.unpack_from(">h", b, o)[0]
    return v + 65536 if v < -5000 else v  # ImageJ: values < -5000 are unsigned > 32767


def decode_roi(b: bytes, ref: str, path: Path, report: Counter) -> tuple[np.ndarray | None, bool]:
    """One ImageJ ROI -> (ring coordinates or None if not an area ROI, is_composite)."""
    if len(b) < 64 or b[:4] != b"Iout":
        raise HistosynthError(f"{ref}: not an ImageJ ROI (bad magic or truncated header)", path)
    version = struct.unpack_from(">h", b, 4)[0]
    rtype = b[6]
    top, left, bottom, right = (_short(b, o) for o in (8, 10, 12, 14))
    n = struct.unpack_from(">H", b, 16)[0]
    if n == 0 and version >= 227:
        n = struct.unpack_from(">i", b, 18)[0]  # large polygons store n at 18
    options = struct.unpack_from(">h", b, 50)[0] & 0xFFFF
    shape_size = struct.unpack_from(">i", b, 36)[0]
    subpixel = bool(options & _OPT_SUBPIXEL) and version >= 222
    if shape_size > 0:  # composite ROI: a path of float segments
        need = 64 + 4 * shape_size
        if len(b) < need:
            raise HistosynthError(f"{ref}: truncated composite ROI", path)
        arr = np.frombuffer(b, dtype=">f4", count=shape_size, offset=64).astype(np.float64)
        return _composite_rings(arr, ref, path), True
    if rtype in (_ROI_RECT, _ROI_OVAL):
        if version >= 223 and subpixel:
            x, y, w, h = struct.unpack_from(">ffff", b, 18)
            x0, y0, x1, y1 = x, y, x + w, y + h
        else:
            x0, y0, x1, y1 = left, top, right, bottom
        if rtype == _ROI_RECT:
            return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64), False
        return ellipse_ring(x0, y0, x1, y1), False
    if rtype in _ROI_AREA_TYPES:
        if n < 0:
            raise HistosynthError(f"{ref}: negative coordinate count", path)
        need = 64 + 4 * n + (8 * n if subpixel else 0)
        if len(b) < need:
            raise HistosynthError(f"{ref}: truncated ROI ({len(b)} bytes, {n} points need {need})", path)
        if subpixel:
            xs = np.frombuffer(b, dtype=">f4", count=n, offset=64 + 4 * n).astype(np.float64)
            ys = np.frombuffer(b, dtype=">f4", count=n, offset=64 + 8 * n).astype(np.float64)
            if options & _OPT_DRAW_OFFSET:  # coordinates refer to pixel centres
                xs, ys = xs + 0.5, ys + 0.5
        else:
            xr = np.frombuffer(b, dtype=">i2", count=n, offset=64).astype(np.int64)
            yr = np.frombuffer(b, dtype=">i2", count=n, offset=64 + 2 * n).astype(np.int64)
            xr = np.where(xr < -5000, xr + 65536, xr)
            yr = np.where(yr < -5000, yr + 65536, yr)
            xs = (left + np.maximum(xr, 0)).astype(np.float64)
            ys = (top + np.maximum(yr, 0)).astype(np.float64)
        ring = np.column_stack([xs, ys])
        if options & _OPT_SPLINE_FIT:
            ring = catmull_rom_closed(ring, 8)
            report["splines_sampled"] += 1
        return ring, False
    if rtype in _ROI_TYPE_NAMES:
        if _ROI_TYPE_NAMES[rtype] == "point":
            report["not_polygon_points"] += 1
        return None, False
    raise HistosynthError(f"{ref}: unknown ROI type {rtype}", path)


def _composite_rings(arr: np.ndarray, ref: str, path: Path) -> Any:
    """Path segments (moveTo 0, lineTo 1, quadTo 2, cubicTo 3, close 4) -> polygon (even-odd)."""
    nargs = {0: 2, 1: 2, 2: 4, 3: 6, 4: 0}
    if not np.isfinite(arr).all():  # segment codes and coordinates alike
        raise nonfinite_error(path, ref)
    rings: list[list[tuple[float, float]]] = []
    cur: list[tuple[float, float]] = []
    i = 0
    while i < len(arr):
        seg = int(arr[i])
        if seg not in nargs or i + 1 + nargs[seg] > len(arr):
            raise HistosynthError(f"{ref}: malformed composite ROI path", path)
        a = arr[i + 1 : i + 1 + nargs[seg]]
        if seg == 0:
            if len(cur) >= 3:
                rings.append(cur)
            cur = [(a[0], a[1])]
        elif seg in (1, 2, 3):  # curves: keep their end point (ImageJ stores flattened paths)
            cur.append((a[-2], a[-1]))
        else:
            if len(cur) >= 3:
                rings.append(cur)
            cur = []
        i += 1 + nargs[seg]
    if len(cur) >= 3:
        rings.append(cur)
    return [np.asarray(r, dtype=np.float64) for r in rings]


def parse_imagej(path: Path) -> Parsed:
    out = Parsed()
    with open(path, "rb") as f:
        magic = f.read(4)
    entries: list[tuple[str, bytes]] = []
    if magic == b"Iout":
        data = path.read_bytes()
        if len(data) > _MAX_ROI_BYTES:
            raise HistosynthError("ROI file larger than 5 MB", path)
        entries.append((path.name, data))
    else:
        try:
            with zipfile.ZipFile(path) as z:
                infos = [i for i in z.infolist() if i.filename.lower().endswith(".roi")]
                if not infos:
                    raise HistosynthError("zip archive holds no .roi entries (not an ImageJ RoiSet)", path)
                for info in infos:
                    if info.file_size > _MAX_ROI_BYTES:
                        raise HistosynthError(f"ROI '{info.filename}' is larger than 5 MB", path)
                    try:
                        entries.append((info.filename, z.read(info)))
                    except _ZIP_ERRORS as exc:
                        raise HistosynthError(
                            f"ROI '{info.filename}': corrupt zip entry ({type(exc).__name__}: {exc})", path
                        ) from None
        except _ZIP_ERRORS as exc:
            raise HistosynthError(f"corrupt zip archive ({type(exc).__name__}: {exc})", path) from None
    geoms: list[Any] = []  # ring coordinates, or a ready polygon for composite ROIs
    for i, (name, data) in enumerate(entries):
        ref = f"ROI {i} ({name})"
        out.report["read"] += 1
        ring, composite = decode_roi(data, ref, path, out.report)
        if ring is None:
            out.report["skipped_not_polygon"] += 1
            continue
        rings = ring if composite else [ring]
        for r in rings:
            if not np.isfinite(r).all():
                raise nonfinite_error(path, ref)
        if composite:
            geom = None
            for lr in linearrings(rings):
                if lr is not None:
                    p = shapely.make_valid(Polygon(lr))
                    geom = p if geom is None else shapely.symmetric_difference(geom, p)
            poly, dropped = largest_polygon(geom)
            out.report["multipolygon_parts_dropped"] += dropped
            out.add(ref, "", poly)
        else:
            out.add(ref, "", None)
            geoms.append((len(out.geoms) - 1, ring))
    for (j, _), lr in zip(geoms, linearrings([r for _, r in geoms])):
        out.geoms[j] = lr
    rings_to_polys_inplace(out)
    return out


def zip_has_roi(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.lower().endswith(".roi") for n in z.namelist())
    except _ZIP_ERRORS:
        return False
