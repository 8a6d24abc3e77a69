"""Geometry shared by the format parsers: rings and polygons built in bulk, splines,
ellipses, and the pixel-edge tracing of label images (:func:`instance_polygons`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from histosynth.errors import HistosynthError
from histosynth.io.annotations._model import Parsed

# --------------------------------------------------------------------------- #
# Rings and polygons
# --------------------------------------------------------------------------- #


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
    x0, y0, x1, y1 = float(x0), float(y0), float(x1), float(y1)  # Python floats overflow to inf without warnings
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a, b = abs(x1 - x0) / 2, abs(y1 - y0) / 2
    perim = math.pi * (3 * (a + b) - math.sqrt(max((3 * a + b) * (a + 3 * b), 0.0)))
    # an overflowing box (corners near ±1e308) gives an infinite perimeter; the reader then refuses the item
    n = int(min(max(32, math.ceil(perim)), 4096)) if math.isfinite(perim) else 4096
    th = np.arange(n) * (2 * math.pi / n)
    return np.column_stack([cx + a * np.cos(th), cy + b * np.sin(th)])


def shoelace(xy: np.ndarray) -> float:
    if len(xy) < 3:
        return 0.0
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def rings_to_polys_inplace(out: Parsed) -> None:
    """Turn the LinearRings among ``out.geoms`` into Polygons (vectorised)."""
    g = np.empty(len(out.geoms), dtype=object)
    g[:] = out.geoms
    rings = shapely.get_type_id(g) == 2  # LinearRing; None gives -1
    if rings.any():
        g[rings] = shapely.polygons(g[rings])
        out.geoms = list(g)


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


def not_a_number(values: Any) -> str | bool | None:
    """The first string or boolean among JSON coordinates (a flat list, or a list of points), or None.

    numpy would convert a quoted ``"12.5"`` (and ``true``) to a float without a
    word; the readers refuse them instead (a number is a number). Values of
    other types are left to the numeric conversion, which reports them.
    """
    if isinstance(values, (str, bool)):
        return values
    if not isinstance(values, list):
        return None
    for item in values:
        for v in item if isinstance(item, list) else (item,):
            if isinstance(v, (str, bool)):
                return v
    return None


def not_a_number_error(path: Path, ref: str, what: str, value: str | bool) -> HistosynthError:
    """The error for a string or boolean where the file must hold a number."""
    kind = "a string" if isinstance(value, str) else "a boolean"
    return HistosynthError(f"{ref}: {what}: {value!r} is {kind}, not a number (numbers must not be quoted)", path)


def as_xy(value: Any, path: Path, ref: str) -> np.ndarray:
    """A list of points ([x, y] or [x, y, z]) as an (n, 2) float array, or an error."""
    bad = not_a_number(value)
    if bad is not None:
        raise not_a_number_error(path, ref, "coordinates are not a list of numeric points", bad)
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
