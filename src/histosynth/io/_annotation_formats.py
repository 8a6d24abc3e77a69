"""Per-format parsers behind :mod:`histosynth.io.annotations` (private).

Every parser turns one file into a :class:`Parsed`: parallel lists of item
references (for error messages), raw class names and shapely polygons (``None``
for an item that has no area), plus the counts of items it dropped itself.
Validation that is common to all formats (repair, clipping, class mapping)
happens afterwards in ``annotations._finish``. The coordinate conventions chosen
per format are documented in the docstring of :mod:`histosynth.io.annotations`.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError

import numpy as np
import orjson
import shapely
from shapely.geometry import Polygon

from histosynth.errors import HistosynthError

# --------------------------------------------------------------------------- #
# Result of a parser
# --------------------------------------------------------------------------- #


@dataclass
class Parsed:
    """What a format parser hands to the common pipeline."""

    refs: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    geoms: list[Any] = field(default_factory=list)  # Polygon (maybe invalid) | None
    report: Counter = field(default_factory=Counter)
    mpp: float | None = None
    size: tuple[int, int] | None = None  # (width, height) stated by the file itself
    size_is_exact: bool = False  # label images: slide_size must equal it

    def add(self, ref: str, name: str, geom: Any) -> None:
        self.refs.append(ref)
        self.names.append(name)
        self.geoms.append(geom)


# --------------------------------------------------------------------------- #
# Geometry helpers
# --------------------------------------------------------------------------- #


def _unsafe_xml(exc: Exception, path: Any) -> HistosynthError:
    """The one error for XML that declares a DTD, entities or external references."""
    return HistosynthError(
        f"refusing unsafe XML ({type(exc).__name__}: DTD/entity declarations are not allowed "
        "in annotation files)",
        path,
    )

def first_nonfinite(rings: list[np.ndarray]) -> int | None:
    """Index of the first ring holding a NaN/inf coordinate, or None."""
    if not rings:
        return None
    lens = np.fromiter((len(r) for r in rings), dtype=np.int64, count=len(rings))
    if lens.sum() == 0:
        return None
    allc = np.concatenate([r.reshape(-1, 2) for r in rings])
    bad = ~np.isfinite(allc).all(axis=1)
    if not bad.any():
        return None
    return int(np.searchsorted(np.cumsum(lens), int(np.argmax(bad)), side="right"))


def linearrings(rings: list[np.ndarray]) -> list[Any]:
    """Clean rings and build shapely LinearRings, vectorised.

    Consecutive repeated points and a repeated closing point are dropped; a ring
    with fewer than 3 points left becomes ``None`` (degenerate). Coordinates must
    already be finite (see :func:`first_nonfinite`).
    """
    n = len(rings)
    out: list[Any] = [None] * n
    if n == 0:
        return out
    lens = np.fromiter((len(r) for r in rings), dtype=np.int64, count=n)
    total = int(lens.sum())
    if total == 0:
        return out
    allc = np.concatenate([np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in rings])
    rid = np.repeat(np.arange(n), lens)
    keep = np.ones(total, dtype=bool)
    keep[1:] = ~((allc[1:] == allc[:-1]).all(axis=1) & (rid[1:] == rid[:-1]))
    nonempty = lens > 0
    starts = (np.cumsum(lens) - lens)[nonempty]
    idx = np.where(keep, np.arange(total), -1)
    last_kept = np.maximum.reduceat(idx, starts)
    closing = (last_kept != starts) & (allc[last_kept] == allc[starts]).all(axis=1)
    keep[last_kept[closing]] = False
    counts = np.bincount(rid[keep], minlength=n)
    ok = counts >= 3
    sel = keep & ok[rid]
    if not ok.any():
        return out
    newid = (np.cumsum(ok) - 1)[rid[sel]]
    geoms = shapely.linearrings(allc[sel], indices=newid)
    for i, g in zip(np.flatnonzero(ok), geoms):
        out[int(i)] = g
    return out


def polygons_from_rings(items: list[tuple[np.ndarray, list[np.ndarray]]], report: Counter) -> list[Any]:
    """(shell, holes) coordinate arrays -> Polygons (None where the shell is degenerate).

    Degenerate holes (< 3 distinct points) are dropped and counted as
    ``holes_dropped``.
    """
    rings: list[np.ndarray] = []
    for shell, holes in items:
        rings.append(shell)
        rings.extend(holes)
    lr = linearrings(rings)
    shells = []
    out: list[Any] = []
    k = 0
    simple_idx = []
    for j, (_shell, holes) in enumerate(items):
        sh = lr[k]
        hs = lr[k + 1 : k + 1 + len(holes)]
        k += 1 + len(holes)
        if sh is None:
            out.append(None)
            continue
        good_holes = [h for h in hs if h is not None]
        if len(good_holes) != len(hs):
            report["holes_dropped"] += len(hs) - len(good_holes)
        if good_holes:
            out.append(shapely.polygons(sh, holes=good_holes))
        else:
            out.append(None)
            shells.append(sh)
            simple_idx.append(j)
    if shells:
        for j, p in zip(simple_idx, shapely.polygons(np.asarray(shells, dtype=object))):
            out[j] = p
    return out


def polygons_from_flat(xy: np.ndarray, ring_len: np.ndarray, is_shell: np.ndarray) -> tuple[np.ndarray, int]:
    """Polygons from one flat coordinate array, built in one vectorised call.

    ``xy`` (M, 2) holds the vertices of every ring, ring after ring; ``ring_len``
    the number of vertices of each ring; ``is_shell`` marks the rings that start a
    polygon (its shell; the rings up to the next shell are its holes). Returns an
    object array with one Polygon per shell (``None`` where the shell is
    degenerate) and the number of degenerate holes dropped from kept polygons.
    Rings are cleaned as :func:`linearrings` does (consecutive repeated points
    and a repeated closing point dropped, < 3 points left = degenerate), so the
    result equals :func:`polygons_from_rings` on the same rings, coordinate for
    coordinate. Coordinates must be finite.
    """
    ring_len = np.asarray(ring_len, dtype=np.int64)
    is_shell = np.asarray(is_shell, dtype=bool)
    n_poly = int(is_shell.sum())
    out = np.full(n_poly, None, dtype=object)
    n_ring = len(ring_len)
    total = int(ring_len.sum()) if n_ring else 0
    if n_poly == 0 or total == 0:
        return out, 0
    xy = np.ascontiguousarray(xy, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    ends = np.cumsum(ring_len)
    nonempty = ring_len > 0
    e_ne = ends[nonempty]
    s_ne = e_ne - ring_len[nonempty]
    # drop consecutive repeated points within a ring (a ring's first point is always kept)
    keep = np.empty(total, dtype=bool)
    keep[0] = True
    np.logical_not((x[1:] == x[:-1]) & (y[1:] == y[:-1]), out=keep[1:])
    keep[s_ne] = True
    # drop the closing point when it repeats the first: the last kept point of a
    # ring (the last point, unless it ends a run of repeats)
    last_kept = e_ne - 1
    back = np.flatnonzero(~keep[last_kept])
    while len(back):
        last_kept[back] -= 1
        back = back[~keep[last_kept[back]]]
    closing = (last_kept != s_ne) & (x[last_kept] == x[s_ne]) & (y[last_kept] == y[s_ne])
    keep[last_kept[closing]] = False
    dropped = np.flatnonzero(~keep)
    counts = ring_len - np.bincount(np.searchsorted(ends, dropped, side="right"), minlength=n_ring)[:n_ring]
    ok = counts >= 3
    poly_of = np.cumsum(is_shell) - 1  # polygon index of each ring
    shell_ok = ok[is_shell]
    in_kept = shell_ok[poly_of]
    holes_dropped = int(np.count_nonzero(in_kept & ~ok & ~is_shell))
    use = ok & in_kept
    if not use.any():
        return out, holes_dropped
    if not use.all():
        keep &= np.repeat(use, ring_len)
    coords = xy[keep]
    ring_offsets = np.zeros(int(use.sum()) + 1, dtype=np.int64)
    np.cumsum(counts[use], out=ring_offsets[1:])
    per_poly = np.bincount(poly_of[use], minlength=n_poly)[shell_ok]
    geom_offsets = np.zeros(len(per_poly) + 1, dtype=np.int64)
    np.cumsum(per_poly, out=geom_offsets[1:])
    out[shell_ok] = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, coords, (ring_offsets, geom_offsets)
    )
    return out, holes_dropped


def largest_polygon(geom: Any) -> tuple[Polygon | None, int]:
    """The largest Polygon in ``geom`` and the number of other polygonal parts."""
    if geom is None or geom.is_empty:
        return None, 0
    if isinstance(geom, Polygon):
        return (geom if geom.area > 0 else None), 0
    parts = [p for p in shapely.get_parts(shapely.get_parts(geom)) if isinstance(p, Polygon) and p.area > 0]
    # get_parts twice flattens a GeometryCollection holding MultiPolygons
    if not parts:
        return None, 0
    best = max(parts, key=lambda p: p.area)
    return best, len(parts) - 1


def catmull_rom_closed(points: np.ndarray, per_segment: int = 8) -> np.ndarray:
    """Sample a closed uniform Catmull-Rom spline through ``points``.

    ``per_segment`` samples per control-point segment (t = 0, 1/k, ... (k-1)/k),
    so the curve passes through every control point.
    """
    p = np.asarray(points, dtype=np.float64)
    if len(p) > 1 and np.array_equal(p[0], p[-1]):
        p = p[:-1]
    if len(p) > 1:
        d = np.any(p != np.roll(p, 1, axis=0), axis=1)
        d[0] = True
        p = p[d]
    if len(p) < 3:
        return p
    p0 = np.roll(p, 1, axis=0)
    p1 = p
    p2 = np.roll(p, -1, axis=0)
    p3 = np.roll(p, -2, axis=0)
    t = np.arange(per_segment, dtype=np.float64) / per_segment
    t2, t3 = t * t, t * t * t
    # standard uniform Catmull-Rom basis (tension 0.5)
    b0 = (-t3 + 2 * t2 - t) * 0.5
    b1 = (3 * t3 - 5 * t2 + 2) * 0.5
    b2 = (-3 * t3 + 4 * t2 + t) * 0.5
    b3 = (t3 - t2) * 0.5
    pts = (
        p0[:, None, :] * b0[None, :, None]
        + p1[:, None, :] * b1[None, :, None]
        + p2[:, None, :] * b2[None, :, None]
        + p3[:, None, :] * b3[None, :, None]
    )
    return pts.reshape(-1, 2)


def ellipse_ring(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Ellipse inscribed in the box [x0, x1] x [y0, y1], ~1 vertex per pixel of perimeter."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a, b = abs(x1 - x0) / 2, abs(y1 - y0) / 2
    perim = math.pi * (3 * (a + b) - math.sqrt(max((3 * a + b) * (a + 3 * b), 0.0)))
    n = int(min(max(32, math.ceil(perim)), 4096))
    th = np.arange(n) * (2 * math.pi / n)
    return np.column_stack([cx + a * np.cos(th), cy + b * np.sin(th)])


# --------------------------------------------------------------------------- #
# Label images: pixel-edge tracing
# --------------------------------------------------------------------------- #

_BRIDGE = 2.0**-8  # offset used to join pixels that touch only at a corner
_EIGHT = np.ones((3, 3), dtype=bool)
# directions: 0 east (+x), 1 south (+y), 2 west (-x), 3 north (-y)
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])
# The directed edge leaving vertex (x, y) in direction d has the pixel `a` on
# its right and `b` on its left; with the padded label image P, the pixels
# around vertex (x, y) are NW = P[y, x], NE = P[y, x+1], SW = P[y+1, x],
# SE = P[y+1, x+1]. An edge belongs to instance a when a != b and a != 0.
_A_DY, _A_DX = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 1])  # SE, SW, NW, NE
_B_DY, _B_DX = np.array([0, 1, 1, 0]), np.array([1, 1, 0, 0])  # NE, SE, SW, NW


def _edge_owner(P: np.ndarray, d: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a = P[y + _A_DY[d], x + _A_DX[d]]
    b = P[y + _B_DY[d], x + _B_DX[d]]
    return np.where(a != b, a, 0)


def _trace_rings(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crack-follow every instance of a label image along pixel edges.

    Returns ``(coords, ring_index, ring_label)``: the corners of all rings
    (level-0 pixel coordinates, integer corners), the ring each corner belongs
    to, and the label of each ring. Every edge is walked with its instance on
    the right; where an instance's pixels touch only at a corner the walk turns
    left (8-connected foreground) and the corner is replaced by three points
    ``_BRIDGE`` px away, which makes a neck of width 2**-7 px that holds no
    pixel centre. Outer rings have positive shoelace area, holes negative.
    """
    H, W = lab.shape
    P = np.zeros((H + 2, W + 2), dtype=lab.dtype)
    P[1:-1, 1:-1] = lab
    ds, ys, xs, ks = [], [], [], []
    for d in range(4):
        a = P[_A_DY[d] : _A_DY[d] + H + 1, _A_DX[d] : _A_DX[d] + W + 1]
        b = P[_B_DY[d] : _B_DY[d] + H + 1, _B_DX[d] : _B_DX[d] + W + 1]
        yy, xx = np.nonzero((a != b) & (a != 0))
        ds.append(np.full(len(yy), d, dtype=np.int64))
        ys.append(yy)
        xs.append(xx)
        ks.append(a[yy, xx])
    d = np.concatenate(ds)
    y = np.concatenate(ys).astype(np.int64)
    x = np.concatenate(xs).astype(np.int64)
    k = np.concatenate(ks)
    n = len(d)
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=lab.dtype)
    key = (d * (H + 1) + y) * (W + 1) + x  # ascending: built direction-major, C order
    ex, ey = x + _DX[d], y + _DY[d]
    left, right = (d + 3) % 4, (d + 1) % 4
    nd = np.where(_edge_owner(P, left, ex, ey) == k, left, np.where(_edge_owner(P, d, ex, ey) == k, d, right))
    nxt = np.searchsorted(key, (nd * (H + 1) + ey) * (W + 1) + ex)
    turn = nd != d
    # first turning edge at or after each edge (pointer jumping over straight runs)
    idx = np.arange(n)
    ptr = np.where(turn, idx, nxt)
    while True:
        nptr = ptr[ptr]
        if np.array_equal(nptr, ptr):
            break
        ptr = nptr
    T = np.flatnonzero(turn)
    sigma = np.searchsorted(T, ptr[nxt[T]]).tolist()
    m = len(T)
    seen = bytearray(m)
    order: list[int] = []
    starts: list[int] = []
    for s0 in range(m):
        if seen[s0]:
            continue
        starts.append(len(order))
        j = s0
        while not seen[j]:
            seen[j] = 1
            order.append(j)
            j = sigma[j]
    e = T[np.asarray(order, dtype=np.int64)]
    ring_of = np.zeros(len(e), dtype=np.int64)
    ring_of[np.asarray(starts[1:], dtype=np.int64)] = 1
    ring_of = np.cumsum(ring_of)
    vx, vy, kk = ex[e], ey[e], k[e]
    nw, ne = P[vy, vx], P[vy, vx + 1]
    sw, se = P[vy + 1, vx], P[vy + 1, vx + 1]
    pinch = ((nw == kk) & (se == kk) & (ne != kk) & (sw != kk)) | (
        (ne == kk) & (sw == kk) & (nw != kk) & (se != kk)
    )
    reps = np.where(pinch, 3, 1)
    cx = np.repeat(vx.astype(np.float64), reps)
    cy = np.repeat(vy.astype(np.float64), reps)
    rid = np.repeat(ring_of, reps)
    if pinch.any():
        first = np.cumsum(reps) - reps
        pe = np.flatnonzero(pinch)
        din, dout = d[e[pe]], nd[e[pe]]
        f = first[pe]
        cx[f] -= _BRIDGE * _DX[din]
        cy[f] -= _BRIDGE * _DY[din]
        cx[f + 1] += -_BRIDGE * _DX[din] + _BRIDGE * _DX[dout]
        cy[f + 1] += -_BRIDGE * _DY[din] + _BRIDGE * _DY[dout]
        cx[f + 2] += _BRIDGE * _DX[dout]
        cy[f + 2] += _BRIDGE * _DY[dout]
    ring_label = kk[np.asarray(starts, dtype=np.int64)]
    return np.column_stack([cx, cy]), rid, ring_label


def _ring_areas(coords: np.ndarray, rid: np.ndarray, nrings: int) -> np.ndarray:
    first = np.searchsorted(rid, np.arange(nrings))
    nxt = np.arange(1, len(rid) + 1)
    last = np.append(first[1:], len(rid)) - 1
    nxt[last] = first
    x, y = coords[:, 0], coords[:, 1]
    return 0.5 * np.bincount(rid, weights=x * y[nxt] - x[nxt] * y, minlength=nrings)


def instance_polygons(inst: np.ndarray) -> tuple[np.ndarray, list[Polygon], Counter]:
    """Trace every instance of a 2-D label image (0 = background) as a polygon.

    Returns ``(ids, polygons, counts)`` with ids ascending. Outlines follow pixel
    edges (corners at integer coordinates), so rasterising a polygon with the
    pixel-centre rule gives back exactly its pixels (pixels touching only at a
    corner are joined by a neck that holds no pixel centre). An instance whose
    pixels form several 8-connected pieces keeps its largest piece (ties: the
    first in raster order); the others are counted in
    ``counts["dropped_pieces"]`` and their pixels in ``counts["dropped_pixels"]``.
    """
    from scipy import ndimage

    counts: Counter = Counter()
    lab = np.asarray(inst)
    if lab.dtype.kind not in "iu":
        lab = lab.astype(np.int64)
    coords, rid, rlab = _trace_rings(lab)
    nr = len(rlab)
    if nr == 0:
        return np.zeros(0, dtype=lab.dtype), [], counts
    area = _ring_areas(coords, rid, nr)
    outer = area > 0
    rings = shapely.linearrings(coords, indices=rid)
    ids, n_outer = np.unique(rlab[outer], return_counts=True)
    # holes grouped by label
    hole_idx = np.flatnonzero(~outer)
    holes_by: dict[int, list[int]] = {}
    for h in hole_idx.tolist():
        holes_by.setdefault(int(rlab[h]), []).append(h)
    outer_idx = np.flatnonzero(outer)
    outer_of = dict(zip(rlab[outer_idx].tolist(), outer_idx.tolist()))  # single-piece ids
    polys: list[Any] = [None] * len(ids)
    simple_pos, simple_rings = [], []
    multi = set(ids[n_outer > 1].tolist())
    slices = None
    for pos, iid in enumerate(ids.tolist()):
        if iid in multi:
            if slices is None:
                slices = {}
            continue
        hs = holes_by.get(iid)
        if hs:
            polys[pos] = shapely.polygons(rings[outer_of[iid]], holes=rings[hs])
        else:
            simple_pos.append(pos)
            simple_rings.append(rings[outer_of[iid]])
    if simple_rings:
        for pos, p in zip(simple_pos, shapely.polygons(np.asarray(simple_rings, dtype=object))):
            polys[pos] = p
    if multi:
        objs = ndimage.find_objects(lab) if lab.max() < 2**24 else None
        for pos, iid in enumerate(ids.tolist()):
            if iid not in multi:
                continue
            if objs is not None:
                sl = objs[iid - 1]
            else:  # pragma: no cover - huge label values
                rr, cc = np.nonzero(lab == iid)
                sl = (slice(rr.min(), rr.max() + 1), slice(cc.min(), cc.max() + 1))
            crop = lab[sl] == iid
            pieces, npieces = ndimage.label(crop, structure=_EIGHT)
            sizes = np.bincount(pieces.ravel())[1:]
            keep = int(np.argmax(sizes)) + 1
            counts["dropped_pieces"] += npieces - 1
            counts["dropped_pixels"] += int(sizes.sum() - sizes[keep - 1])
            _, sub, _ = instance_polygons((pieces == keep).astype(np.uint8))
            polys[pos] = shapely.transform(sub[0], lambda c, sl=sl: c + [sl[1].start, sl[0].start])
    return ids, polys, counts


# --------------------------------------------------------------------------- #
# Small shared utilities
# --------------------------------------------------------------------------- #


def as_xy(value: Any, path: Path, ref: str) -> np.ndarray:
    """A list of points ([x, y] or [x, y, z]) as an (n, 2) float array, or an error."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise HistosynthError(f"{ref}: coordinates are not a list of numeric points ({exc})", path) from None
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise HistosynthError(f"{ref}: coordinates are not a list of [x, y] points (shape {arr.shape})", path)
    return arr[:, :2]


def nonfinite_error(path: Path, ref: str) -> HistosynthError:
    return HistosynthError(f"{ref}: non-finite (NaN or infinite) coordinate; the file is corrupt", path)


# --------------------------------------------------------------------------- #
# GeoJSON (QuPath)
# --------------------------------------------------------------------------- #


def _qupath_name(feature: dict) -> str:
    props = feature.get("properties")
    if not isinstance(props, dict):
        props = {}
    cls = props.get("classification", feature.get("classification"))
    if isinstance(cls, dict):
        name = cls.get("name")
        if name is None and isinstance(cls.get("names"), list):
            name = ": ".join(str(x) for x in cls["names"])
        if name is not None:
            return str(name)
    elif isinstance(cls, str):
        return cls
    name = props.get("name")
    return "" if name is None else str(name)


def _geojson_features(data: Any, path: Path) -> list:
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict):
        t = data.get("type")
        if t == "FeatureCollection":
            features = data.get("features")
            if not isinstance(features, list):
                raise HistosynthError("FeatureCollection without a 'features' list", path)
        elif t == "Feature":
            features = [data]
        elif t in ("Polygon", "MultiPolygon"):
            features = [{"type": "Feature", "geometry": data, "properties": {}}]
        else:
            raise HistosynthError(f"not a GeoJSON FeatureCollection/Feature (type {t!r})", path)
    else:
        raise HistosynthError("not GeoJSON (top level is neither an object nor a list)", path)
    return features


class _NotSimple(Exception):
    """The fast GeoJSON path met something it leaves to the reference path."""


def parse_geojson(data: Any, path: Path) -> Parsed:
    """QuPath GeoJSON: one pass over the parsed features, polygons built in bulk.

    Files that are well formed (every coordinate a finite number, every point
    an [x, y] pair) take the fast path; anything else (errors, 3-D points,
    numbers as strings, ...) is read by :func:`_parse_geojson_reference`, the
    per-feature reader, which names the offending item. Both give the same
    result.
    """
    features = _geojson_features(data, path)
    try:
        return _parse_geojson_fast(features)
    except _NotSimple:
        return _parse_geojson_reference(features, path)


def _parse_geojson_fast(features: list) -> Parsed:
    out = Parsed()
    report = out.report
    if features:
        report["read"] += len(features)
    refs: list[str] = []
    names: list[str] = []
    nrings: list[int] = []  # rings per item; 0 = no polygon (None)
    rings: list[Any] = []  # the rings of every item, as parsed (lists of points)
    add_rings = rings.extend
    for i, feat in enumerate(features):
        if type(feat) is not dict:
            raise _NotSimple
        get = feat.get
        geom = get("nucleusGeometry") or get("geometry")
        if geom is None:
            report["skipped_no_geometry"] += 1
            continue
        if type(geom) is not dict:
            raise _NotSimple
        gtype = geom.get("type")
        if gtype == "Polygon":
            coords = geom.get("coordinates")
            if type(coords) is not list:
                raise _NotSimple
        elif gtype == "MultiPolygon":
            coords, dropped = _largest_part(geom.get("coordinates"))
            if dropped:
                report["multipolygon_parts_dropped"] += dropped
        else:
            report["skipped_not_polygon"] += 1
            continue
        fid = get("id")
        refs.append(f"feature {i}" if fid is None else f"feature {i} (id {fid})")
        # the usual QuPath layout inline; anything else through _qupath_name
        props = get("properties")
        cls = props.get("classification") if type(props) is dict else None
        name = cls.get("name") if type(cls) is dict else None
        names.append(name if type(name) is str else _qupath_name(feat))
        nrings.append(len(coords))
        add_rings(coords)
    # Every ring a list of points, every point a list of two values, and the
    # values all finite numbers: list.__len__ refuses anything but a list, so a
    # string or an object in place of a point cannot pass. The values are
    # converted as np.asarray(ring, dtype=float64) converts them.
    try:
        ring_len = np.fromiter(map(list.__len__, rings), dtype=np.int64, count=len(rings))
        n_points = int(ring_len.sum())
        if n_points and max(map(list.__len__, chain.from_iterable(rings))) != 2:
            raise _NotSimple
        # exactly 2 * n_points values, or fromiter raises (no point has more than 2)
        xy = np.fromiter(
            chain.from_iterable(chain.from_iterable(rings)), dtype=np.float64, count=2 * n_points
        ).reshape(-1, 2)
    except (TypeError, ValueError, OverflowError):
        raise _NotSimple from None
    if not np.isfinite(xy).all():
        raise _NotSimple
    nr = np.asarray(nrings, dtype=np.int64)
    is_shell = np.zeros(len(rings), dtype=bool)
    is_shell[(np.cumsum(nr) - nr)[nr > 0]] = True
    polys, holes_dropped = polygons_from_flat(xy, ring_len, is_shell)
    if holes_dropped:
        report["holes_dropped"] += holes_dropped
    geoms = np.full(len(nr), None, dtype=object)
    geoms[nr > 0] = polys
    out.refs, out.names, out.geoms = refs, names, geoms
    return out


def _largest_part(parts: Any) -> tuple[list, int]:
    """The rings of a MultiPolygon's part with the largest shell, and the number of other parts."""
    if type(parts) is not list:
        raise _NotSimple
    cand = []
    for part in parts:
        if type(part) is not list:
            raise _NotSimple
        rings = []
        for r in part:
            try:
                a = np.asarray(r, dtype=np.float64)
            except (TypeError, ValueError):
                raise _NotSimple from None
            if a.ndim != 2 or a.shape[1] != 2 or not np.isfinite(a).all():
                if a.size:  # an empty ring is fine
                    raise _NotSimple
                a = np.zeros((0, 2))
            rings.append(a)
        if rings:
            cand.append((part, rings[0]))
    if not cand:
        return [], 0
    if len(cand) == 1:
        return cand[0][0], 0
    best = int(np.argmax([abs(_shoelace(s)) for _, s in cand]))
    return cand[best][0], len(cand) - 1


def _parse_geojson_reference(features: list, path: Path) -> Parsed:
    """Feature by feature, with the checks and error messages (see :func:`parse_geojson`)."""
    out = Parsed()
    pending: list[tuple[str, str, np.ndarray, list[np.ndarray]]] = []
    for i, feat in enumerate(features):
        ref = f"feature {i}"
        out.report["read"] += 1
        if not isinstance(feat, dict):
            raise HistosynthError(f"{ref}: not a JSON object", path)
        if feat.get("id") is not None:
            ref += f" (id {feat['id']})"
        geom = feat.get("nucleusGeometry") or feat.get("geometry")
        if geom is None:
            out.report["skipped_no_geometry"] += 1
            continue
        if not isinstance(geom, dict):
            raise HistosynthError(f"{ref}: geometry is not an object", path)
        gtype = geom.get("type")
        coords = geom.get("coordinates")
        if gtype == "Polygon":
            parts = [coords]
        elif gtype == "MultiPolygon":
            parts = coords
        else:
            out.report["skipped_not_polygon"] += 1
            continue
        if not isinstance(parts, list) or not all(isinstance(p, list) for p in parts):
            raise HistosynthError(f"{ref}: malformed {gtype} coordinates", path)
        cand = []
        for part in parts:
            rings = [as_xy(r, path, ref) for r in part]
            for r in rings:
                if not np.isfinite(r).all():
                    raise nonfinite_error(path, ref)
            if rings:
                cand.append((rings[0], rings[1:]))
        if not cand:
            out.add(ref, _qupath_name(feat), None)
            continue
        if len(cand) > 1:
            # a MultiPolygon nucleus: keep the part with the largest shell area
            areas = [abs(_shoelace(s)) for s, _ in cand]
            best = int(np.argmax(areas))
            out.report["multipolygon_parts_dropped"] += len(cand) - 1
            cand = [cand[best]]
        pending.append((ref, _qupath_name(feat), cand[0][0], cand[0][1]))
    polys = polygons_from_rings([(s, h) for _, _, s, h in pending], out.report)
    for (ref, name, _, _), p in zip(pending, polys):
        out.add(ref, name, p)
    return out


def _shoelace(xy: np.ndarray) -> float:
    if len(xy) < 3:
        return 0.0
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# --------------------------------------------------------------------------- #
# XML: ImageScope and ASAP (streaming, defusedxml)
# --------------------------------------------------------------------------- #


def xml_events(path: Path):
    """defusedxml iterparse ("end" events) that refuses DTDs, entities, external refs."""
    import defusedxml
    from defusedxml.ElementTree import iterparse

    f = open(path, "rb")
    try:
        for ev in iterparse(f, forbid_dtd=True, forbid_entities=True, forbid_external=True):
            yield ev
    except ParseError as exc:
        line, col = getattr(exc, "position", (None, None))
        raise HistosynthError(f"malformed XML at line {line}, column {col}: {exc}", path) from None
    except defusedxml.DefusedXmlException as exc:
        raise _unsafe_xml(exc, path) from None
    finally:
        f.close()


def _floats(strings: list[str], path: Path, refs: list[str], lens: list[int], base: int = 0) -> np.ndarray:
    """Convert coordinate strings in one call; on failure name the offending item.

    orjson parses a JSON array of the numbers ~4x faster than ``float()`` per
    string; anything that is not a JSON number ("nan", "1,5", a missing
    attribute) falls back to a per-string pass that names the item. ``base`` is
    the index of ``strings[0]`` among all coordinate strings of the file.
    """
    try:
        vals = np.array(orjson.loads("[" + ",".join(strings) + "]"), dtype=np.float64)
        if vals.shape == (len(strings),):  # "1,5" (decimal comma) reads as two numbers
            return vals
    except (TypeError, ValueError, orjson.JSONDecodeError):
        pass
    vals = np.empty(len(strings))

    def item(j: int) -> str:
        return refs[int(np.searchsorted(np.cumsum(lens), (base + j) // 2, side="right"))]

    for j, s in enumerate(strings):
        if s is None:
            raise HistosynthError(f"{item(j)}: a vertex lacks its X or Y attribute", path)
        try:
            vals[j] = float(s)
        except (TypeError, ValueError):
            try:  # ASAP written under a decimal-comma locale
                vals[j] = float(str(s).replace(",", "."))
            except ValueError:
                raise HistosynthError(f"{item(j)}: coordinate {s!r} is not a number", path) from None
    return vals


class _Coords:
    """Vertex coordinate strings, converted to float64 in chunks so memory stays bounded."""

    CHUNK = 1 << 17

    def __init__(self, path: Path):
        self.path = path
        self.refs: list[str] = []
        self.lens: list[int] = []
        self.buf: list[str] = []
        self.chunks: list[np.ndarray] = []
        self.base = 0

    def add(self, ref: str, strs: list[str]) -> None:
        self.refs.append(ref)
        self.lens.append(len(strs) // 2)
        self.buf.extend(strs)
        if len(self.buf) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.buf:
            self.chunks.append(_floats(self.buf, self.path, self.refs, self.lens, self.base))
            self.base += len(self.buf)
            self.buf = []

    def rings(self) -> list[np.ndarray]:
        self._flush()
        vals = np.concatenate(self.chunks) if self.chunks else np.zeros(0)
        self.chunks = []
        rings = _rings_from_flat(vals, self.lens)
        bad = first_nonfinite(rings)
        if bad is not None:
            raise nonfinite_error(self.path, self.refs[bad])
        return rings


def _rings_from_flat(vals: np.ndarray, lens: list[int]) -> list[np.ndarray]:
    xy = vals.reshape(-1, 2)
    bounds = np.cumsum([0, *lens])
    return [xy[bounds[i] : bounds[i + 1]] for i in range(len(lens))]


_IMAGESCOPE_NOT_CLASSES = {"description", ""}


def _expat_parser(path: Path):
    """An expat parser that refuses DTDs, entity declarations and external references.

    The same guards as defusedxml's ``iterparse(..., forbid_dtd=True,
    forbid_entities=True, forbid_external=True)`` (its exception classes too),
    without ElementTree's per-element Python layer: the caller installs its own
    start/end handlers.
    """
    from xml.parsers import expat

    from defusedxml.common import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden

    def doctype(name, sysid, pubid, has_internal_subset):
        raise DTDForbidden(name, sysid, pubid)

    def entity_decl(name, is_parameter_entity, value, base, sysid, pubid, notation_name):
        raise EntitiesForbidden(name, value, base, sysid, pubid, notation_name)

    def unparsed_entity_decl(name, base, sysid, pubid, notation_name):
        raise EntitiesForbidden(name, None, base, sysid, pubid, notation_name)

    def external_entity_ref(context, base, sysid, pubid):
        raise ExternalReferenceForbidden(context, base, sysid, pubid)

    p = expat.ParserCreate(None, "}")  # namespace processing as in ElementTree
    p.StartDoctypeDeclHandler = doctype
    p.EntityDeclHandler = entity_decl
    p.UnparsedEntityDeclHandler = unparsed_entity_decl
    p.ExternalEntityRefHandler = external_entity_ref
    return p


def _expat_run(p, path: Path, block: int = 1 << 20) -> None:
    """Feed ``path`` to ``p``; errors as :func:`xml_events` reports them."""
    import defusedxml
    from xml.parsers import expat

    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(block)
                if not data:
                    break
                p.Parse(data, False)
            p.Parse(b"", True)
    except expat.ExpatError as exc:
        raise HistosynthError(
            f"malformed XML at line {exc.lineno}, column {exc.offset}: {exc}", path
        ) from None
    except defusedxml.DefusedXmlException as exc:
        raise _unsafe_xml(exc, path) from None


class _RegionStream:
    """Vertex strings of the regions read so far -> float64 chunks -> polygons, in bulk.

    Strings are converted (:func:`_floats`) every :attr:`CHUNK` strings, and each
    converted chunk of whole regions is turned into polygons straight away, so
    neither the strings nor the float coordinates of the whole file are held.
    A non-finite coordinate is remembered (the first region that has one) and
    reported by :meth:`finish`, after every string has been converted.
    """

    CHUNK = _Coords.CHUNK

    def __init__(self, path: Path):
        self.path = path
        self.refs: list[str] = []
        self.lens: list[int] = []  # vertices per region
        self.ellipse: list[bool] = []
        self.buf: list[Any] = []
        self.base = 0  # index of buf[0] among all coordinate strings
        self.done = 0  # regions converted so far
        self.geoms: list[np.ndarray] = []
        self.first_bad: int | None = None  # first region with a non-finite coordinate

    def add(self, ref: str, strs: list[Any], ellipse: bool) -> None:
        self.refs.append(ref)
        self.lens.append(len(strs) // 2)
        self.ellipse.append(ellipse)
        if strs:
            self.buf.extend(strs)
            if len(self.buf) >= self.CHUNK:
                self._flush()

    def _flush(self) -> None:
        lo, hi = self.done, len(self.refs)
        if hi == lo:
            return
        vals = _floats(self.buf, self.path, self.refs, self.lens, self.base)
        self.base += len(self.buf)
        self.buf = []
        self.done = hi
        lens = np.asarray(self.lens[lo:hi], dtype=np.int64)
        xy = vals.reshape(-1, 2)
        if self.first_bad is not None:
            return  # the read fails in finish(): skip building
        finite = np.isfinite(xy).all(axis=1)
        if not finite.all():
            k = int(np.searchsorted(np.cumsum(lens), int(np.argmin(finite)), side="right"))
            self.first_bad = lo + k
            return
        ell = self.ellipse[lo:hi]
        if any(ell):
            rings = np.split(xy, np.cumsum(lens)[:-1])
            for k in np.flatnonzero(ell).tolist():
                r = rings[k]
                if len(r) >= 2:
                    rings[k] = ellipse_ring(r[:, 0].min(), r[:, 1].min(), r[:, 0].max(), r[:, 1].max())
            lens = np.fromiter(map(len, rings), dtype=np.int64, count=len(rings))
            xy = np.concatenate(rings) if rings else xy
        polys, _ = polygons_from_flat(xy, lens, np.ones(len(lens), dtype=bool))
        self.geoms.append(polys)

    def finish(self) -> np.ndarray:
        """Polygon (or None) per region, in order; raises on a non-finite coordinate."""
        self._flush()
        if self.first_bad is not None:
            raise nonfinite_error(self.path, self.refs[self.first_bad])
        out = np.empty(len(self.refs), dtype=object)
        if self.geoms:
            out[:] = np.concatenate(self.geoms)
        self.geoms = []
        return out


# per open element: what it is to the ImageScope reader
_OTHER, _REGION, _VERTICES, _ANNOTATION, _ANN_ATTRIBUTES, _ROOT = range(6)
_SPECIAL = frozenset({"Region", "Annotation", "Annotations"})


def parse_imagescope(path: Path) -> Parsed:
    """Aperio ImageScope XML (MoNuSeg, MoNuSAC), streamed with expat.

    Reads exactly what an ElementTree ``iterparse`` over the file gives (a
    region's vertices are the children of its first ``Vertices`` child, the
    annotation's class comes from its ``Name`` or the ``Attribute`` elements of
    its first ``Attributes`` child), but keeps no elements: a vertex costs two
    attribute strings until its chunk is converted to float64, and polygons are
    built per chunk of regions.
    """
    out = Parsed()
    report = out.report
    stream = _RegionStream(path)
    ann_of: list[int] = []  # annotation index per region
    ann_names: list[str] = []
    root: list[Any] = [None]  # attributes of the last <Annotations> closed
    stack: list[list[Any]] = []  # [kind, data] per open element
    p = _expat_parser(path)

    # --- vertex mode: inside a region's first <Vertices>, its children are vertices
    pts: list[Any] = []
    add_pt = pts.append
    depth = 0  # 1 inside a vertex element

    def vertex_start(name, attrs):
        nonlocal depth
        if depth == 0 and (name == "Vertex" or name not in _SPECIAL):
            get = attrs.get
            add_pt(get("X"))
            add_pt(get("Y"))
            depth = 1
            return
        # an element inside a vertex, or a Region/Annotation(s) among the
        # vertices: the general handlers take over until the vertex ends
        if depth:
            stack.append([_OTHER, None])  # the vertex itself
            depth = 0
        p.StartElementHandler = start
        p.EndElementHandler = end
        start(name, attrs)

    def vertex_end(name):
        nonlocal depth
        if depth:
            depth = 0
        else:  # </Vertices>
            stack.pop()
            p.StartElementHandler = start
            p.EndElementHandler = end

    def enter_vertices(region: list[Any]) -> None:
        nonlocal pts, add_pt, depth
        if region[2] is None:
            region[2] = []
        pts = region[2]
        add_pt = pts.append
        depth = 0
        p.StartElementHandler = vertex_start
        p.EndElementHandler = vertex_end

    # --- general mode
    def start(name, attrs):
        parent = stack[-1] if stack else None
        if parent is not None and parent[0] == _VERTICES:  # a vertex of the region
            if name in ("Region", "Annotation"):
                # ElementTree clears these when they end, before the region reads them
                parent[1][2].extend((None, None))
            else:
                parent[1][2].extend((attrs.get("X"), attrs.get("Y")))
        if name == "Region":
            stack.append([_REGION, attrs, None])  # attrs, vertex strings of its first <Vertices>
        elif name == "Vertices" and parent is not None and parent[0] == _REGION and parent[2] is None:
            stack.append([_VERTICES, parent])
            enter_vertices(parent)
        elif name == "Annotation":
            stack.append([_ANNOTATION, attrs, None])  # attrs, Attribute names of its first <Attributes>
        elif name == "Attributes" and parent is not None and parent[0] == _ANNOTATION and parent[2] is None:
            parent[2] = []
            stack.append([_ANN_ATTRIBUTES, parent])
        else:
            if name == "Attribute":
                # an Attribute anywhere below an annotation's first <Attributes>
                # (not inside a region or annotation nested there)
                for kind, data, *_ in reversed(stack):
                    if kind == _ANN_ATTRIBUTES:
                        data[2].append(attrs.get("Name"))
                        break
                    if kind in (_REGION, _ANNOTATION):
                        break
            stack.append([_ROOT, attrs] if name == "Annotations" else [_OTHER, None])

    def end(name):
        kind, data, *rest = stack.pop()
        if kind == _REGION:
            region_end(data, rest[0])
        elif kind == _ANNOTATION:
            annotation_end(data, rest[0])
        elif kind == _ROOT:
            root[0] = data
        if stack and stack[-1][0] == _VERTICES:  # a vertex with children ended
            enter_vertices(stack[-1][1])

    def region_end(attrs, strs):
        report["read"] += 1
        ann_i = len(ann_names)
        ref = f"Annotation {ann_i + 1} Region {attrs.get('Id', '?')}"
        if attrs.get("NegativeROA", "0") not in ("0", ""):
            report["skipped_negative"] += 1
            return
        rtype = attrs.get("Type", "0")
        if rtype in ("0", "1", ""):  # free-form/polygon, rectangle (4 corners)
            ellipse = False
        elif rtype == "2":  # ellipse: vertices are two corners of its box
            ellipse = True
        else:  # arrow, ruler, ...
            report["skipped_not_polygon"] += 1
            return
        stream.add(ref, strs or [], ellipse)
        ann_of.append(ann_i)

    def annotation_end(attrs, attr_names):
        name = (attrs.get("Name") or "").strip()
        if not name and attr_names:
            for n in attr_names:
                n = (n or "").strip()
                if n.casefold() not in _IMAGESCOPE_NOT_CLASSES:
                    name = n
                    break
        ann_names.append(name)

    p.StartElementHandler = start
    p.EndElementHandler = end
    _expat_run(p, path)
    attrs = root[0]
    if attrs is None:
        raise HistosynthError("not an ImageScope XML file (no <Annotations> root)", path)
    mpp = attrs.get("MicronsPerPixel")
    if mpp:
        try:
            out.mpp = float(mpp)
        except ValueError:
            raise HistosynthError(f"MicronsPerPixel {mpp!r} is not a number", path) from None
        if not (math.isfinite(out.mpp) and out.mpp > 0):
            raise HistosynthError(f"MicronsPerPixel {mpp!r} is not a positive number", path)
    out.geoms = stream.finish()
    out.refs = stream.refs
    out.names = [ann_names[a] if a < len(ann_names) else "" for a in ann_of]
    return out


def _rings_to_polys_inplace(out: Parsed) -> None:
    """Turn the LinearRings among ``out.geoms`` into Polygons (vectorised)."""
    g = np.empty(len(out.geoms), dtype=object)
    g[:] = out.geoms
    rings = shapely.get_type_id(g) == 2  # LinearRing; None gives -1
    if rings.any():
        g[rings] = shapely.polygons(g[rings])
        out.geoms = list(g)


_ASAP_POLYGONAL = {"polygon", "spline", "rectangle"}


def parse_asap(path: Path, spline_samples: int = 8) -> Parsed:
    """ASAP XML (Camelyon), streamed; splines sampled as closed Catmull-Rom curves."""
    out = Parsed()
    coords = _Coords(path)
    names: list[str] = []
    perms: list[np.ndarray | None] = []
    splines: list[bool] = []
    seen_root = False
    i = 0
    for _ev, el in xml_events(path):
        tag = el.tag
        if tag == "Annotation":
            i += 1
            out.report["read"] += 1
            atype = (el.get("Type") or "").strip()
            ref = f"Annotation {i - 1} ({el.get('Name', '')!s})"
            if atype.casefold() not in _ASAP_POLYGONAL:
                out.report["skipped_not_polygon"] += 1
                el.clear()
                continue
            cel = el.find("Coordinates")
            cs = [] if cel is None else list(cel)
            order = [c.get("Order") for c in cs]
            perm = None
            if order and None not in order:
                try:
                    o = np.array([float(x) for x in order])
                except ValueError:
                    raise HistosynthError(f"{ref}: Coordinate Order is not a number", path) from None
                if np.any(np.diff(o) < 0):
                    perm = np.argsort(o, kind="stable")
            coords.add(ref, [a for c in cs for a in (c.get("X"), c.get("Y"))])
            names.append((el.get("PartOfGroup") or "").strip())
            perms.append(perm)
            splines.append(atype.casefold() == "spline")
            el.clear()
        elif tag == "ASAP_Annotations":
            seen_root = True
    if not seen_root:
        raise HistosynthError("not an ASAP XML file (no <ASAP_Annotations> root)", path)
    rings = coords.rings()
    for k, ring in enumerate(rings):
        if perms[k] is not None:
            ring = ring[perms[k]]
            out.report["reordered"] += 1
        if splines[k]:
            ring = catmull_rom_closed(ring, spline_samples)
            out.report["splines_sampled"] += 1
        rings[k] = ring
    for ref, name, lr in zip(coords.refs, names, linearrings(rings)):
        out.add(ref, name, lr)
    _rings_to_polys_inplace(out)
    return out


# --------------------------------------------------------------------------- #
# HoVer-Net .mat and label images
# --------------------------------------------------------------------------- #


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
    sel = inst > 0
    rank = np.searchsorted(ids, inst[sel])
    tv = tmap[sel].astype(np.int64)
    nz = tv > 0
    tmax = int(tv.max()) + 1 if tv.size else 1
    votes = np.bincount(rank[nz] * tmax + tv[nz], minlength=len(ids) * tmax).reshape(len(ids), tmax)
    out = votes.argmax(axis=1)
    out[votes.max(axis=1) == 0] = 0
    return out


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


# --------------------------------------------------------------------------- #
# ImageJ ROI (.roi, RoiSet.zip)
# --------------------------------------------------------------------------- #

_ROI_POLYGON, _ROI_RECT, _ROI_OVAL = 0, 1, 2
_ROI_FREEHAND, _ROI_TRACED = 7, 8
_ROI_AREA_TYPES = {_ROI_POLYGON, _ROI_FREEHAND, _ROI_TRACED}
_ROI_TYPE_NAMES = {3: "line", 4: "freeline", 5: "polyline", 6: "no-roi", 9: "angle", 10: "point"}
_OPT_SPLINE_FIT, _OPT_SUBPIXEL, _OPT_DRAW_OFFSET = 1, 128, 256
_MAX_ROI_BYTES = 5 * 1024 * 1024  # ImageJ's own limit for a ROI


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
        return None, False
    raise HistosynthError(f"{ref}: unknown ROI type {rtype}", path)


def _composite_rings(arr: np.ndarray, ref: str, path: Path) -> Any:
    """Path segments (moveTo 0, lineTo 1, quadTo 2, cubicTo 3, close 4) -> polygon (even-odd)."""
    nargs = {0: 2, 1: 2, 2: 4, 3: 6, 4: 0}
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
                    entries.append((info.filename, z.read(info)))
        except zipfile.BadZipFile as exc:
            raise HistosynthError(f"corrupt zip archive ({exc})", path) from None
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
    _rings_to_polys_inplace(out)
    return out


# --------------------------------------------------------------------------- #
# Boundary-point JSON (CRLM-style)
# --------------------------------------------------------------------------- #

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


# --------------------------------------------------------------------------- #
# COCO
# --------------------------------------------------------------------------- #


def rle_decode(seg: dict, ref: str, path: Path) -> np.ndarray:
    """COCO RLE (uncompressed list or compressed string counts) -> (h, w) bool mask."""
    try:
        h, w = (int(v) for v in seg["size"])
        counts = seg["counts"]
    except (KeyError, TypeError, ValueError):
        raise HistosynthError(f"{ref}: malformed RLE segmentation", path) from None
    if isinstance(counts, str):
        counts = _rle_string_counts(counts, ref, path)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.sum() != h * w):
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


def coco_images(data: dict, path: Path) -> tuple[dict, dict, dict]:
    if not isinstance(data.get("annotations"), list):
        raise HistosynthError("COCO file without an 'annotations' list", path)
    images = {}
    for im in data.get("images") or []:
        if isinstance(im, dict) and "id" in im:
            images[im["id"]] = im
    cats = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and "id" in c:
            cats[c["id"]] = str(c.get("name", c["id"]))
    by_image: dict = {}
    for a in data["annotations"]:
        if not isinstance(a, dict):
            raise HistosynthError("COCO annotation that is not an object", path)
        by_image.setdefault(a.get("image_id"), []).append(a)
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
        try:
            out.size = (int(image_info["width"]), int(image_info["height"]))
        except (TypeError, ValueError):
            out.size = None
    pending: list[tuple[str, str, np.ndarray]] = []
    direct: list[tuple[str, str, Any]] = []
    order: list[tuple[str, int]] = []
    for a in anns:
        ref = f"annotation id {a.get('id', '?')}"
        out.report["read"] += 1
        cid = a.get("category_id")
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
            best = int(np.argmax([abs(_shoelace(r)) for r in rings]))
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


# --------------------------------------------------------------------------- #
# Detection helpers
# --------------------------------------------------------------------------- #

_XML_TAG = re.compile(rb"<([A-Za-z_][\w.:-]*)")


def xml_root_tag(head: bytes) -> str | None:
    """Name of the first element in an XML head (skips <?xml?>, comments, DOCTYPE)."""
    text = re.sub(rb"<!--.*?-->", b"", head, flags=re.S)
    m = _XML_TAG.search(text)
    return m.group(1).decode("ascii", "replace") if m else None


def zip_has_roi(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.lower().endswith(".roi") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_bytes_limited(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


__all__ = ["Parsed", "instance_polygons"]
