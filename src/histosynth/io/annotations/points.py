"""Boundary-point JSON (the CRLM case): lists of boundary pixels per nucleus."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import (
    as_xy,
    largest_polygon,
    nonfinite_error,
    not_a_number,
    not_a_number_error,
)
from histosynth.io.annotations._model import Parsed

_POINT_LIST_KEYS = ("points", "boundary", "boundary_points", "coordinates", "contour", "vertices", "outline")
_NAME_KEYS = ("class", "class_name", "type", "label", "category", "name")
_CONTAINER_KEYS = (
    "nuclei",
    "annotations",
    "cells",
    "objects",
    "instances",
    "contours",
    "boundaries",
    "polygons",
)


def _is_pair(v: Any) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) in (2, 3)
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in v)
    ) or (isinstance(v, dict) and ("x" in v or "X" in v) and ("y" in v or "Y" in v))


def _looks_like_nucleus(v: Any) -> bool:
    if isinstance(v, list):
        return len(v) > 0 and _is_pair(v[0])
    if isinstance(v, dict):
        if ("x" in v and "y" in v) or ("X" in v and "Y" in v):
            return isinstance(v.get("x", v.get("X")), list)
        return any(isinstance(v.get(k), list) for k in _POINT_LIST_KEYS)
    return False


def points_container(data: Any) -> list[tuple[str, Any]] | None:
    """The (ref, entry) list of a boundary-point JSON, or None if it is not one."""
    if isinstance(data, dict):
        for k in _CONTAINER_KEYS:
            if k in data and isinstance(data[k], (list, dict)):
                data = data[k]
                break
    if isinstance(data, list):
        entries = [(f"nucleus {i}", v) for i, v in enumerate(data)]
    elif isinstance(data, dict):
        entries = [(f"nucleus {k!r}", v) for k, v in data.items()]
    else:
        return None
    if not entries or not _looks_like_nucleus(entries[0][1]):
        return None
    return entries


def _entry_points(v: Any, ref: str, path: Path) -> tuple[np.ndarray, str]:
    name = ""
    if isinstance(v, dict):
        for k in _NAME_KEYS:
            if k in v and isinstance(v[k], (str, int)) and not isinstance(v[k], bool):
                name = str(v[k])
                break
        if ("x" in v and "y" in v) or ("X" in v and "Y" in v):
            xs, ys = v.get("x", v.get("X")), v.get("y", v.get("Y"))
            bad = not_a_number([xs, ys])
            if bad is not None:
                raise not_a_number_error(path, ref, "x/y are not numeric lists", bad)
            try:
                xs = np.asarray(xs, dtype=np.float64).reshape(-1)
                ys = np.asarray(ys, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise HistosynthError(f"{ref}: x/y are not numeric lists", path) from None
            if xs.shape != ys.shape:
                raise HistosynthError(f"{ref}: x has {xs.size} values but y has {ys.size}", path)
            return np.column_stack([xs, ys]), name
        for k in _POINT_LIST_KEYS:
            if isinstance(v.get(k), list):
                v = v[k]
                break
        else:
            raise HistosynthError(f"{ref}: no boundary points (expected x/y lists or a points list)", path)
    if isinstance(v, list) and v and isinstance(v[0], dict):
        try:
            v = [[p.get("x", p.get("X")), p.get("y", p.get("Y"))] for p in v]
        except AttributeError:
            raise HistosynthError(f"{ref}: points mix objects and other values", path) from None
    return as_xy(v, path, ref), name


def _order_ring(pts: np.ndarray, report: Counter) -> np.ndarray:
    """File order if it forms a simple polygon; else points sorted by angle around the centroid."""
    if len(pts) < 4:
        return pts
    if Polygon(pts).is_valid:
        return pts
    c = pts.mean(axis=0)
    ang = np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0])
    alt = pts[np.argsort(ang, kind="stable")]
    if Polygon(alt).is_valid:
        report["reordered"] += 1
        return alt
    return pts


def parse_points_json(data: Any, path: Path) -> Parsed:
    out = Parsed()
    entries = points_container(data)
    if entries is None:
        raise HistosynthError("not a boundary-point JSON (expected a list/dict of point lists)", path)
    for ref, v in entries:
        out.report["read"] += 1
        pts, name = _entry_points(v, ref, path)
        if not np.isfinite(pts).all():
            raise nonfinite_error(path, ref)
        # drop repeated points (consecutive and the closing point)
        if len(pts) > 1:
            keep = np.ones(len(pts), dtype=bool)
            keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
            pts = pts[keep]
            if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
                pts = pts[:-1]
        if len(np.unique(pts, axis=0)) < 3:
            out.add(ref, name, None)
            continue
        pts = _order_ring(pts, out.report)
        step = np.abs(np.diff(np.vstack([pts, pts[:1]]), axis=0)).max(axis=1)
        out.report["gaps_closed"] += int(np.count_nonzero(step > 1.0))
        # points are boundary pixels: pixel centre at +0.5, and the outline is
        # grown by half a pixel so that the boundary pixels themselves are inside
        poly = Polygon(pts + 0.5)
        if not poly.is_valid:
            poly = shapely.make_valid(poly)
            out.report["repaired_invalid"] += 1
            poly, dropped = largest_polygon(poly)
            out.report["repair_parts_dropped"] += dropped
            if poly is None:
                out.add(ref, name, None)
                continue
        grown = poly.buffer(0.5, join_style="mitre", mitre_limit=1.5)
        out.add(ref, name, grown)
    return out
