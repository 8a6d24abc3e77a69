"""QuPath GeoJSON: reading (one pass, polygons built in bulk) and :func:`write_geojson`."""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from shapely.geometry import mapping

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import (
    as_xy,
    nonfinite_error,
    not_a_number,
    polygons_from_flat,
    polygons_from_rings,
    shoelace,
)
from histosynth.io.annotations._model import AnnotationSet, Nucleus, Parsed

# geometries skipped as not polygons that are counted as points too (not_polygon_points)
_POINT_TYPES = ("Point", "MultiPoint")


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
    result. A coordinate given as a string (``"12.5"``) or a boolean is an
    error, never converted.
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
            if isinstance(gtype, str) and gtype in _POINT_TYPES:
                report["not_polygon_points"] += 1
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
    # string or an object in place of a point cannot pass, and array("d")
    # refuses a string in place of a number (np.fromiter would parse it).
    try:
        ring_len = np.fromiter(map(list.__len__, rings), dtype=np.int64, count=len(rings))
        n_points = int(ring_len.sum())
        if n_points and max(map(list.__len__, chain.from_iterable(rings))) != 2:
            raise _NotSimple
        values = array("d", chain.from_iterable(chain.from_iterable(rings)))
    except (TypeError, ValueError, OverflowError):
        raise _NotSimple from None
    if len(values) != 2 * n_points:  # a point with fewer than 2 values
        raise _NotSimple
    xy = np.frombuffer(values, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all() or _has_boolean(rings, ring_len, xy):
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


def _has_boolean(rings: list, ring_len: np.ndarray, xy: np.ndarray) -> bool:
    """Whether a JSON ``true``/``false`` stands for a coordinate (array("d") reads them as 1 and 0).

    Only the values equal to 0 or 1 are looked up in the parsed rings, which
    are few in real coordinates.
    """
    flat = np.flatnonzero((xy == 0) | (xy == 1))
    if not flat.size:
        return False
    ends = np.cumsum(ring_len)
    point = flat // 2
    ring = np.searchsorted(ends, point, side="right")
    first = ends - ring_len
    return any(
        type(rings[r][p - first[r]][c]) is bool for r, p, c in zip(ring.tolist(), point.tolist(), (flat % 2).tolist())
    )


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
            if not_a_number(r) is not None:
                raise _NotSimple
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
    best = int(np.argmax([abs(shoelace(s)) for _, s in cand]))
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
            if isinstance(gtype, str) and gtype in _POINT_TYPES:
                out.report["not_polygon_points"] += 1
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
            areas = [abs(shoelace(s)) for s, _ in cand]
            best = int(np.argmax(areas))
            out.report["multipolygon_parts_dropped"] += len(cand) - 1
            cand = [cand[best]]
        pending.append((ref, _qupath_name(feat), cand[0][0], cand[0][1]))
    polys = polygons_from_rings([(s, h) for _, _, s, h in pending], out.report)
    for (ref, name, _, _), p in zip(pending, polys):
        out.add(ref, name, p)
    return out


def write_geojson(path: str | os.PathLike, nuclei: AnnotationSet | Iterable[Nucleus]) -> None:
    """Write nuclei as a QuPath-style GeoJSON FeatureCollection (atomically)."""
    items = nuclei.nuclei if isinstance(nuclei, AnnotationSet) else list(nuclei)
    feats = []
    for n in items:
        props: dict[str, Any] = {"objectType": "annotation", "type_id": int(n.type_id)}
        if n.class_name:
            props["classification"] = {"name": n.class_name}
        feats.append(
            {"type": "Feature", "id": str(n.id), "geometry": mapping(n.polygon), "properties": props}
        )
    payload = orjson.dumps({"type": "FeatureCollection", "features": feats})
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_geojson_points(path: str | os.PathLike) -> tuple[list[tuple[float, float, str, int]], int]:
    """The point annotations of a GeoJSON file: ``(x, y, class name, feature index)`` per point (a
    ``MultiPoint`` gives one per point; level-0 pixels as written) and the number of non-point features.

    The reader of outlines (:func:`histosynth.io.annotations.read`) skips points; this is what the DAFF
    centroid library (``histosynth daff-library --points``) reads them with. A point that is not two finite
    numbers is an error naming the feature.
    """
    from histosynth.io.annotations._detect import check_file, load_json

    path = Path(path)
    check_file(path)
    features = _geojson_features(load_json(path), path)
    out: list[tuple[float, float, str, int]] = []
    skipped = 0
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise HistosynthError(f"feature {i}: not an object", path)
        geom = feat.get("geometry")
        gtype = geom.get("type") if isinstance(geom, dict) else None
        if gtype not in _POINT_TYPES:
            skipped += 1
            continue
        coords = geom.get("coordinates")
        pts = [coords] if gtype == "Point" else coords
        if not isinstance(pts, list):
            raise HistosynthError(f"feature {i}: malformed {gtype} coordinates", path)
        name = _qupath_name(feat)
        for p in pts:
            ok = isinstance(p, list) and len(p) >= 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in p[:2])
            if not ok:
                raise HistosynthError(f"feature {i}: a point is not two finite numbers ({p!r})", path)
            out.append((float(p[0]), float(p[1]), name, i))
    return out, skipped
