"""QuPath GeoJSON from label maps (histosynth.io.qupath): geometry round trips, QuPath's expectations, bad input."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from shapely.geometry import shape

from histosynth.errors import HistosynthError
from histosynth.io.annotations import read
from histosynth.io.labels import instance_types
from histosynth.io.qupath import (
    DECIMALS,
    PALETTE,
    instances_to_features,
    type_colour,
    write_feature_collection,
)
from histosynth.patches.rasterize import rasterize_tile


def _awkward() -> tuple[np.ndarray, np.ndarray]:
    """An instance with a hole, one whose pixels touch only at a corner, one in two pieces, one untyped."""
    inst = np.zeros((14, 14), np.int32)
    inst[1:6, 1:6] = 1
    inst[2:4, 2:4] = 0  # hole
    inst[7, 7] = inst[8, 8] = inst[9, 9] = 2  # a diagonal chain: pixels touching at corners
    inst[11:13, 1:3] = 5  # id 5 in two pieces (sparse ids: no 3, 4)
    inst[11:13, 9:12] = 5
    inst[1:3, 9:12] = 7
    types = np.where(inst == 1, 1, np.where(inst == 2, 2, np.where(inst == 5, 3, 0))).astype(np.uint8)
    types[inst == 7] = 0  # instance 7 has no typed pixel
    return inst, types


def _rasterize(features: list[dict], x0: float, y0: float, d: float, w: int, h: int) -> np.ndarray:
    polys = [shape(f["geometry"]) for f in features]
    ids = [int(f["properties"]["measurements"]["instance_id"]) for f in features]
    inst, _, info = rasterize_tile(polys, [1] * len(polys), x0, y0, d, w, h)
    # rasterize_tile numbers instances 1..n in input order; give back the exported ids
    lut = np.zeros(len(polys) + 1, np.int64)
    lut[1:] = [ids[k] for k in info["ids"]]
    return lut[inst]


def test_geometry_round_trip_is_pixel_exact_at_slide_offset_and_scale():
    inst, types = _awkward()
    feats = instances_to_features(inst, types, {1: "Epithelial", 2: "Lymphocyte"}, offset=(1000, 500), scale=2.0)
    assert [f["properties"]["measurements"]["instance_id"] for f in feats] == [1, 2, 5, 7]
    kinds = [f["geometry"]["type"] for f in feats]
    assert kinds == ["Polygon", "Polygon", "MultiPolygon", "Polygon"]
    geoms = [shape(f["geometry"]) for f in feats]
    assert all(g.is_valid for g in geoms)
    assert len(geoms[0].interiors) == 1 and len(geoms[2].geoms) == 2
    # level-0 placement: the bounding box of instance 1 (pixels 1..5) at offset + 2 * corner
    assert geoms[0].bounds == (1002.0, 502.0, 1012.0, 512.0)
    assert np.array_equal(_rasterize(feats, 1000, 500, 2.0, 14, 14), inst)
    # measurements in level-0 pixels and slide coordinates
    m = feats[0]["properties"]["measurements"]
    assert m["area_px"] == pytest.approx(4 * np.count_nonzero(inst == 1))
    rows, cols = np.nonzero(inst == 1)
    assert m["centroid_x"] == pytest.approx(1000 + 2 * (cols.mean() + 0.5), abs=10**-DECIMALS)
    assert m["centroid_y"] == pytest.approx(500 + 2 * (rows.mean() + 0.5), abs=10**-DECIMALS)


def test_classification_unclassified_and_colours():
    inst, types = _awkward()
    feats = instances_to_features(inst, types, {1: "Epithelial", 2: "Lymphocyte"})
    cls = [f["properties"].get("classification") for f in feats]
    assert cls[0] == {"name": "Epithelial", "color": list(map(int, PALETTE[1]))}
    assert cls[1] == {"name": "Lymphocyte", "color": list(map(int, PALETTE[2]))}
    assert cls[2]["name"] == "3"  # a type the class map does not name: its number
    assert cls[3] is None  # no typed pixel: unclassified in QuPath (no classification)
    assert all("classification" not in f["properties"] for f in instances_to_features(inst, None, {}))
    # one stable colour per type, also past the palette
    assert type_colour(40) == type_colour(40) and type_colour(40) != type_colour(41)
    assert all(0 <= c <= 255 for c in type_colour(200))
    # the class of an instance is the majority of its typed pixels
    mixed = types.copy()
    mixed[1, 1:5] = 2
    _, tv = instance_types(inst, mixed)
    assert tv[0] == 1
    assert instances_to_features(inst, mixed, {1: "a", 2: "b"})[0]["properties"]["classification"]["name"] == "a"


def test_ids_are_deterministic_uuid_strings():
    inst, types = _awkward()
    a = instances_to_features(inst, types, {}, id_prefix="slide-1/patch-7")
    b = instances_to_features(inst, types, {}, id_prefix="slide-1/patch-7")
    c = instances_to_features(inst, types, {}, id_prefix="slide-1/patch-8")
    ids = [f["id"] for f in a]
    assert ids == [f["id"] for f in b]
    assert not set(ids) & {f["id"] for f in c}
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and str(uuid.UUID(i)) == i for i in ids)


def test_measurements_and_object_type():
    inst, types = _awkward()
    feats = instances_to_features(inst, types, {}, measurements={2: {"type_prob": np.float32(0.87654)}},
                                  object_type="annotation")
    assert feats[1]["properties"]["measurements"]["type_prob"] == pytest.approx(0.877)
    assert "type_prob" not in feats[0]["properties"]["measurements"]
    assert {f["properties"]["objectType"] for f in feats} == {"annotation"}
    assert all(f["properties"]["isLocked"] is False for f in feats)
    with pytest.raises(HistosynthError, match="instance 3, which is not"):
        instances_to_features(inst, types, {}, measurements={3: {"p": 1.0}})
    with pytest.raises(HistosynthError, match="JSON has no NaN"):
        instances_to_features(inst, types, {}, measurements={1: {"p": float("nan")}})
    with pytest.raises(HistosynthError, match="not a number"):
        instances_to_features(inst, types, {}, measurements={1: {"p": "high"}})


@pytest.mark.parametrize(
    ("inst", "types", "kwargs", "message"),
    [
        (np.zeros((2, 2, 2), np.int32), None, {}, "2-D label map"),
        (np.zeros((4, 4), np.float32), None, {}, "integer labels"),
        (-np.ones((4, 4), np.int32), None, {}, "negative"),
        (np.ones((4, 4), np.int32), np.ones((4, 5), np.uint8), {}, "differ in shape"),
        (np.ones((4, 4), np.int32), None, {"object_type": "cell"}, "object_type"),
        (np.ones((4, 4), np.int32), None, {"scale": 0.0}, "scale"),
        (np.ones((4, 4), np.int32), None, {"offset": (float("nan"), 0.0)}, "finite"),
    ],
)
def test_bad_input_is_named(inst, types, kwargs, message):
    with pytest.raises(HistosynthError, match=message):
        instances_to_features(inst, types, {}, **kwargs)


def test_empty_map_gives_no_features(tmp_path):
    assert instances_to_features(np.zeros((5, 5), np.int32), np.zeros((5, 5), np.uint8), {}) == []
    write_feature_collection([], tmp_path / "e.geojson")
    assert json.loads((tmp_path / "e.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


def test_written_file_meets_qupaths_expectations_and_reads_back(tmp_path):
    inst, types = _awkward()
    feats = instances_to_features(inst, types, {1: "Epithelial", 2: "Lymphocyte", 3: "Spindle"},
                                  offset=(0.3333333, 7.0), scale=1.0000004, object_type="annotation")
    path = tmp_path / "sub" / "nuclei.geojson"
    write_feature_collection(feats, path)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 4
    ids = [f["id"] for f in data["features"]]
    assert len(set(ids)) == 4 and all(isinstance(i, str) for i in ids)
    for f in data["features"]:
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] in ("annotation", "detection")
        if "classification" in props:
            c = props["classification"]
            assert isinstance(c, dict) and isinstance(c["name"], str)
            assert len(c["color"]) == 3 and all(isinstance(v, int) for v in c["color"])
        assert all(isinstance(v, (int, float)) for v in props["measurements"].values())
        g = shape(f["geometry"])
        assert g.is_valid and not g.is_empty
        coords = shapely.get_coordinates(g).ravel()
        assert np.array_equal(coords, np.round(coords, DECIMALS))  # rounded: small files
    # histosynth's own GeoJSON reader: same instances, same classes (untyped read with a catch-all)
    got = read(path, {"Epithelial": 1, "Lymphocyte": 2, "Spindle": 3, "none": 4}, catch_all="none")
    assert [n.type_id for n in got.nuclei] == [1, 2, 3, 4]
    assert got.report.get("multipolygon_parts_dropped", 0) == 1  # the reader keeps a MultiPolygon's largest part
    # rasterised back on the same grid: exact for the single-piece instances
    back = _rasterize(data["features"], 0.3333333, 7.0, 1.0000004, 14, 14)
    assert np.array_equal(back, inst)


def test_write_is_atomic(tmp_path):
    inst, types = _awkward()
    feats = instances_to_features(inst, types, {})
    path = tmp_path / "n.geojson"
    write_feature_collection(feats, path)
    before = path.read_bytes()
    bad = [*feats, {"type": "Feature", "id": 12, "geometry": None, "properties": {}}]
    with pytest.raises(HistosynthError, match="UUID string"):
        write_feature_collection(bad, path)
    nan = [dict(feats[0], properties={"measurements": {"x": float("inf")}})]
    with pytest.raises(HistosynthError, match="JSON cannot represent"):
        write_feature_collection(nan, path)
    hole = [dict(feats[0], geometry={"type": "Polygon", "coordinates": [[[0, 0], [1, float("nan")], [1, 1], [0, 0]]]})]
    with pytest.raises(HistosynthError, match="NaN or infinite coordinate"):
        write_feature_collection(hole, path)
    with pytest.raises(HistosynthError, match="not a GeoJSON Feature"):
        write_feature_collection([{"type": "Polygon"}], path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["n.geojson"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    inst=arrays(np.int32, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 4)),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1.0, 2.0, 0.5, 4.000331]),
    offset=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
)
def test_property_export_then_rasterize_gives_the_same_instances(inst, seed, scale, offset):
    """Any label map (holes, corner contacts, pieces): traced, placed, rounded, rasterised back = the same map."""
    types = np.random.default_rng(seed).integers(0, 3, inst.shape).astype(np.uint8)
    feats = instances_to_features(inst, types, {1: "a", 2: "b"}, offset=offset, scale=scale)
    ids = sorted(set(np.unique(inst).tolist()) - {0})
    assert [f["properties"]["measurements"]["instance_id"] for f in feats] == ids
    assert all(shape(f["geometry"]).is_valid for f in feats)
    h, w = inst.shape
    assert np.array_equal(_rasterize(feats, *offset, scale, w, h), inst)
    _, tv = instance_types(inst, types)
    names = [f["properties"].get("classification", {}).get("name") for f in feats]
    assert names == [{0: None, 1: "a", 2: "b"}[int(t)] for t in tv]
