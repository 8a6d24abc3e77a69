"""QuPath GeoJSON from instance label maps: :func:`instances_to_features` and :func:`write_feature_collection`.

Torch-free; used by ``histosynth export --format geojson`` (patch sets) and by
whole-slide segmentation (one call per tile, placed with ``offset``/``scale``).

What QuPath reads (``qupath.lib.io.PathObjectTypeAdapters``, v0.4+)
---------------------------------------------------------------------
A ``FeatureCollection`` of ``Feature`` objects. The feature's ``id`` is a UUID
*string* (QuPath parses it with ``UUID.fromString`` and ignores anything
else); ``properties`` holds ``objectType`` (``"annotation"``,
``"detection"``, ``"cell"``, ...; a missing type makes an annotation),
``classification`` as an object ``{"name": ..., "color": [r, g, b]}``,
``isLocked``, ``measurements`` as an object of name → number, and
``metadata`` as an object of name → string (kept by annotations and TMA
cores only). Other properties are ignored. An object without a
``classification`` is QuPath's *unclassified* object.

Geometry
--------
Each instance is traced along pixel EDGES with the project's tracer
(:func:`histosynth.io.annotations.instance_polygons`): a vertex is a pixel
corner, so the polygon, rasterised with the pixel-centre rule of
:mod:`histosynth.patches.rasterize` on the same grid, gives back exactly the
instance's pixels. Pixels that touch only at a corner are joined by a neck
2**-7 px wide that holds no pixel centre, so an 8-connected instance is one
valid polygon. Holes are interior rings. An instance whose pixels form several
8-connected pieces is a ``MultiPolygon`` with one part per piece (raster
order of the pieces' first pixels); every part round-trips exactly too.
(histosynth's own GeoJSON reader keeps the largest part of a MultiPolygon: a
hand-drawn nucleus is one piece.) This tracer is used rather than OpenCV's
``findContours``, whose contours run through boundary-pixel *centres* and
would need a half-pixel outward offset that is not exact at diagonal steps.

Coordinates are ``offset + scale * (pixel corner)``: for a patch of level-0
origin ``(x, y)`` and downsample ``d``, ``offset = (x, y)``, ``scale = d``
gives level-0 slide coordinates (the project convention: pixel ``(r, c)`` of
level 0 covers ``[c, c+1) x [r, r+1)``). They are written rounded to
:data:`DECIMALS` decimals (a thousandth of a level-0 pixel, which keeps the
necks open for ``scale >= 0.5``).

Properties
----------
``objectType`` as asked; ``classification`` of the instance's type — the
majority of the nonzero ``types`` of its pixels
(:func:`histosynth.io.labels.instance_types`) — named by ``class_map``, or the
type number as a string (``"3"``) for a type the map does not name, with the
colour :func:`type_colour`; an instance with no typed pixel (or ``types``
None) gets no ``classification``, i.e. it is unclassified in QuPath;
``isLocked: false``; ``measurements``: ``instance_id``, ``area_px`` (pixel
count in level-0 pixels, ``count * scale**2``), ``centroid_x``,
``centroid_y`` (mean of the pixel centres, slide coordinates), then whatever
``measurements[id]`` adds (it may override these).

The feature ``id`` is ``uuid5(NAMESPACE, f"{id_prefix}#{instance id}")``: the
same input gives the same file; give each tile or patch its own
``id_prefix`` so that ids stay unique across calls.
"""

from __future__ import annotations

import colorsys
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_write
from histosynth.io.labels import majority_types, read_class_map, relabel

#: decimals of written coordinates and measurements
DECIMALS = 3
#: the QuPath object types this module writes
OBJECT_TYPES = ("annotation", "detection")
#: namespace of the deterministic feature ids (uuid5)
NAMESPACE = uuid.UUID("5b0c1c8e-6f0a-4c55-9a53-2f6d1e0b7a11")

#: colours by type id (0 unused): the overlay outlines and the QuPath classes share them
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


def type_colour(type_id: int) -> list[int]:
    """``[r, g, b]`` of a type: :data:`PALETTE` for 1..8, then hues spaced by the golden ratio (stable per id)."""
    t = int(type_id)
    if 0 < t < len(PALETTE):
        return [int(c) for c in PALETTE[t]]
    hue = (t * 0.618033988749895) % 1.0
    return [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.9)]


def _label_map(a: Any, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise HistosynthError(f"{what} must be a 2-D label map, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        raise HistosynthError(f"{what} has dtype {arr.dtype}; expected integer labels")
    if arr.size and int(arr.min()) < 0:
        raise HistosynthError(f"{what} has negative labels")
    return arr


def _instance_geometries(inst: np.ndarray, ids: np.ndarray, counts: np.ndarray, index: np.ndarray) -> list[Any]:
    """One shapely (Multi)Polygon per id of ``ids`` in pixel-corner coordinates of ``inst``.

    ``instance_polygons`` keeps the largest 8-connected piece of an instance;
    an instance whose polygon's area falls short of its pixel count by half a
    pixel or more had more pieces and is traced again piece by piece.
    """
    import shapely
    from scipy import ndimage

    from histosynth.io.annotations import instance_polygons

    traced_ids, polys, report = instance_polygons(inst)
    if not np.array_equal(traced_ids.astype(np.int64), ids.astype(np.int64)):  # pragma: no cover - invariant
        raise HistosynthError("internal: traced instances differ from the label map's ids")
    polys = list(polys)
    if report.get("dropped_pieces"):
        short = np.flatnonzero(counts - shapely.area(np.asarray(polys, dtype=object)) >= 0.5)
        boxes = ndimage.find_objects(index.reshape(inst.shape), max_label=len(ids))
        eight = np.ones((3, 3), dtype=bool)
        for k in short.tolist():
            sl = boxes[k]
            pieces, _ = ndimage.label(index.reshape(inst.shape)[sl] == k + 1, structure=eight)
            _, parts, _ = instance_polygons(pieces)
            parts = shapely.transform(np.asarray(parts, dtype=object), lambda c, sl=sl: c + [sl[1].start, sl[0].start])
            polys[k] = shapely.multipolygons(parts)
    return polys


def instances_to_features(
    inst: np.ndarray,
    types: np.ndarray | None,
    class_map: dict[int, str],
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    measurements: dict[int, dict[str, float]] | None = None,
    object_type: str = "detection",
    id_prefix: str = "",
) -> list[dict]:
    """One QuPath GeoJSON Feature per instance id > 0 of ``inst``, ids ascending (see the module docstring).

    ``types`` is a pixel type map of ``inst``'s shape (0 = untyped) or None;
    ``class_map`` is ``{type id: name}`` (any form
    :func:`histosynth.io.labels.read_class_map` reads); coordinates are
    ``offset + scale * pixel corner``; ``measurements[id]`` adds numbers to the
    feature of instance ``id``.
    """
    import shapely

    inst = _label_map(inst, "instance map")
    if types is not None:
        types = _label_map(types, "type map")
        if types.shape != inst.shape:
            raise HistosynthError(f"type map {types.shape} and instance map {inst.shape} differ in shape")
    if object_type not in OBJECT_TYPES:
        raise HistosynthError(f"object_type must be one of {', '.join(OBJECT_TYPES)}, got {object_type!r}")
    try:
        ox, oy = (float(v) for v in offset)
        scale = float(scale)
    except (TypeError, ValueError) as err:
        raise HistosynthError(f"offset must be two numbers and scale a number ({err})") from None
    if not (np.isfinite([ox, oy, scale]).all() and scale > 0):
        raise HistosynthError(f"offset {offset!r} must be finite and scale {scale!r} finite and > 0")
    names = read_class_map(dict(class_map or {}), "class_map")
    ids, index, counts = relabel(inst)
    n = len(ids)
    extra = _check_measurements(measurements, ids)
    if n == 0:
        return []
    h, w = inst.shape
    tvals = np.zeros(n, np.int64) if types is None else majority_types(index, n, types)
    cols = np.tile(np.arange(w, dtype=np.float64), h)
    rows = np.repeat(np.arange(h, dtype=np.float64), w)
    px = np.bincount(index, weights=cols, minlength=n + 1)[1:] / counts + 0.5
    py = np.bincount(index, weights=rows, minlength=n + 1)[1:] / counts + 0.5
    cx, cy = np.round(ox + scale * px, DECIMALS), np.round(oy + scale * py, DECIMALS)
    area = np.round(counts * scale * scale, DECIMALS)
    geoms = _instance_geometries(inst, ids, counts, index)
    placed = shapely.transform(np.asarray(geoms, dtype=object),
                               lambda c: np.round(c * scale + [ox, oy], DECIMALS))
    geojson = shapely.to_geojson(placed)
    classes: dict[int, dict[str, Any]] = {}
    features = []
    for k, iid in enumerate(ids.tolist()):
        props: dict[str, Any] = {"objectType": object_type}
        t = int(tvals[k])
        if t:
            if t not in classes:
                classes[t] = {"name": names.get(t, str(t)), "color": type_colour(t)}
            props["classification"] = dict(classes[t], color=list(classes[t]["color"]))
        props["isLocked"] = False
        m = {"instance_id": float(iid), "area_px": float(area[k]), "centroid_x": float(cx[k]),
             "centroid_y": float(cy[k])}
        if iid in extra:
            m.update(extra[iid])
        props["measurements"] = m
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(NAMESPACE, f"{id_prefix}#{iid}")),
            "geometry": orjson.loads(geojson[k]),
            "properties": props,
        })
    return features


def _check_measurements(measurements: Mapping[int, Mapping[str, float]] | None,
                        ids: np.ndarray) -> dict[int, dict[str, float]]:
    """``measurements`` as ``{id: {name: float}}``; a named error for an absent id, a bad name or value."""
    if not measurements:
        return {}
    present = set(ids.tolist())
    out: dict[int, dict[str, float]] = {}
    for iid, values in measurements.items():
        key = int(iid)
        if key not in present:
            raise HistosynthError(f"measurements given for instance {iid}, which is not in the instance map")
        if not isinstance(values, Mapping):
            raise HistosynthError(f"measurements of instance {iid} must be a mapping of name to number")
        row: dict[str, float] = {}
        for name, value in values.items():
            if not isinstance(name, str) or not name:
                raise HistosynthError(f"measurement name {name!r} of instance {iid} is not a non-empty string")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise HistosynthError(f"measurement {name!r} of instance {iid} is not a number: {value!r}") from None
            if not np.isfinite(v):
                raise HistosynthError(f"measurement {name!r} of instance {iid} is {v} (JSON has no NaN/inf)")
            row[name] = round(v, DECIMALS)
        out[key] = row
    return out


def _rounded(obj: Any, where: str) -> Any:
    """``obj`` with every float rounded to :data:`DECIMALS`; numpy numbers as Python numbers; NaN/inf refused."""
    if isinstance(obj, dict):
        return {k: _rounded(v, where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, where) for v in obj]
    if isinstance(obj, (bool, np.bool_)) or obj is None or isinstance(obj, str):
        return bool(obj) if isinstance(obj, np.bool_) else obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if not np.isfinite(v):
            raise HistosynthError(f"{where} holds {v}, which JSON cannot represent")
        return round(v, DECIMALS)
    if isinstance(obj, np.ndarray):
        return _rounded(obj.tolist(), where)
    raise HistosynthError(f"{where} holds a {type(obj).__name__}, which is not JSON")


def _rounded_coordinates(coords: Any, where: str) -> Any:
    """GeoJSON ``coordinates`` (nested lists) rounded with numpy: one array per block of equal-length rings."""
    try:
        a = np.asarray(coords, dtype=np.float64)
    except (ValueError, TypeError):
        if isinstance(coords, (list, tuple)):  # ragged: rings of different lengths
            return [_rounded_coordinates(c, where) for c in coords]
        raise HistosynthError(f"{where} has coordinates that are not numbers") from None
    if not np.isfinite(a).all():
        raise HistosynthError(f"{where} holds a NaN or infinite coordinate, which JSON cannot represent")
    return np.round(a, DECIMALS).tolist()


def _rounded_feature(f: Any, i: int) -> dict:
    """Feature ``i`` checked (a Feature, a string id) and rounded for writing."""
    where = f"feature {i}"
    if not isinstance(f, dict) or f.get("type") != "Feature":
        raise HistosynthError(f"{where} is not a GeoJSON Feature object")
    if "id" in f and not isinstance(f["id"], str):
        raise HistosynthError(f"{where} has id {f['id']!r}; QuPath wants a UUID string")
    out = {}
    for key, value in f.items():
        if key in ("geometry", "nucleusGeometry") and isinstance(value, dict):
            geom = dict(value)
            if "coordinates" in geom:
                geom["coordinates"] = _rounded_coordinates(geom["coordinates"], where)
            if "geometries" in geom:  # a GeometryCollection
                geom["geometries"] = [_rounded_feature({"type": "Feature", "geometry": g}, i)["geometry"]
                                      for g in geom["geometries"]]
            out[key] = geom
        else:
            out[key] = _rounded(value, where)
    return out


def write_feature_collections(chunks: Iterable[Iterable[dict]], path: str | os.PathLike) -> int:
    """Stream features, chunk by chunk, into one FeatureCollection at ``path`` (atomically); returns the count.

    Only one chunk's features are held at a time, so a slide with millions of
    nuclei is written in the memory of one patch or tile.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "wb") as fh:
            fh.write(b'{"type":"FeatureCollection","features":[')
            for chunk in chunks:
                for f in chunk:
                    data = orjson.dumps(_rounded_feature(f, count))
                    fh.write(b",\n" + data if count else data)
                    count += 1
            fh.write(b"]}\n")

    atomic_write(path, write)
    return count


def write_feature_collection(features: list[dict], path: str | os.PathLike) -> None:
    """Write ``features`` as a GeoJSON ``FeatureCollection`` at ``path`` (atomically; floats to :data:`DECIMALS`)."""
    write_feature_collections([features], path)
