"""Exports (png, pannuke, hovernet, hovernet-mat, geojson) and overlays."""

from __future__ import annotations

import json
import uuid

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.io
from shapely.geometry import shape

from histosynth.errors import HistosynthError
from histosynth.io.annotations import read
from histosynth.io.labels import instance_types
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.patches.export import FORMATS, export, outline_image, overlay
from histosynth.patches.rasterize import rasterize_tile

CLASSES = {"1": "Epithelial", "2": "Lymphocyte", "3": "Spindle"}


@pytest.fixture()
def typed(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "ps"
    with PatchSetWriter(out, ("images", "inst", "types"), (16, 16)) as w:
        for i in range(3):
            inst = np.zeros((16, 16), np.int32)
            inst[2:6, 2:6], inst[8:14, 8:12] = 1, 2
            types = np.where(inst == 1, 1, np.where(inst == 2, 3, 0)).astype(np.uint8)
            w.add({"slide": f"s{i % 2}", "x": i * 16, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
                   "width": 16, "height": 16, "tissue_fraction": 1.0, "n_nuclei": 2, "source": "x"},
                  images=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), inst=inst, types=types)
    return out


def test_png(typed, tmp_path):
    assert export(typed, tmp_path / "png", "png") == 3
    names = sorted(p.name for p in (tmp_path / "png" / "inst").iterdir())
    assert names[0] == "000000_s0_0_0.png" and len(names) == 3
    inst = cv2.imread(str(tmp_path / "png" / "inst" / names[1]), cv2.IMREAD_UNCHANGED)
    assert inst.dtype == np.uint16 and (inst[8:14, 8:12] == 2).all()
    img = cv2.cvtColor(cv2.imread(str(tmp_path / "png" / "images" / names[1])), cv2.COLOR_BGR2RGB)
    from histosynth.io.patchset import read_patchset

    assert np.array_equal(img, read_patchset(typed).images[1])
    assert "name" in (tmp_path / "png" / "index.csv").read_text().splitlines()[0]


def test_pannuke(typed, tmp_path):
    export(typed, tmp_path / "pn", "pannuke", n_types=3)
    masks = np.load(tmp_path / "pn" / "masks.npy")
    images = np.load(tmp_path / "pn" / "images.npy")
    assert masks.shape == (3, 16, 16, 4) and masks.dtype == np.float64 and images.dtype == np.float64
    assert (masks[0, 2:6, 2:6, 0] == 1).all() and (masks[0, 8:14, 8:12, 2] == 2).all()
    assert masks[0, ..., 1].max() == 0
    assert (masks[0, ..., 3] == (masks[0, ..., :3].sum(-1) == 0)).all()
    assert list(np.load(tmp_path / "pn" / "types.npy")) == ["s0", "s1", "s0"]


def test_hovernet(typed, tmp_path):
    export(typed, tmp_path / "hv", "hovernet")
    files = sorted((tmp_path / "hv").glob("*.npy"))
    arr = np.load(files[0])
    assert len(files) == 3 and arr.shape == (16, 16, 5) and arr.dtype == np.int32
    assert (arr[2:6, 2:6, 3] == 1).all() and (arr[8:14, 8:12, 4] == 3).all()


def test_errors(typed, tmp_path):
    with pytest.raises(HistosynthError, match="unknown export format"):
        export(typed, tmp_path / "x", "tiff")
    with pytest.raises(HistosynthError, match="unknown QuPath object type"):
        export(typed, tmp_path / "x", "geojson", object_type="cell")
    (typed / "inst.npy").unlink()
    for fmt in ("hovernet", "hovernet-mat", "geojson"):
        with pytest.raises(HistosynthError, match="inst.npy"):
            export(typed, tmp_path / "x", fmt)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp*"))


def test_empty_patch_set_is_an_error(tmp_path):
    with PatchSetWriter(tmp_path / "empty", ("inst", "types"), (8, 8)):
        pass
    for fmt in FORMATS:
        with pytest.raises(HistosynthError, match="empty"):
            export(tmp_path / "empty", tmp_path / "x", fmt)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp*"))


def test_failed_export_keeps_the_previous_output(typed, tmp_path, monkeypatch):
    import histosynth.patches.export as ex

    export(typed, tmp_path / "gj", "geojson")
    before = sorted(p.name for p in (tmp_path / "gj").iterdir())

    def boom(*args, **kwargs):
        raise HistosynthError("simulated failure half-way")

    monkeypatch.setattr(ex, "instances_to_features", boom)
    with pytest.raises(HistosynthError, match="half-way"):
        export(typed, tmp_path / "gj", "geojson")
    assert sorted(p.name for p in (tmp_path / "gj").iterdir()) == before
    assert not list(tmp_path.glob(".gj.tmp*"))


# -- hovernet-mat -------------------------------------------------------------------------------------
def _awkward_patch(h: int = 24, w: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Sparse ids, a hole, a corner contact, a mixed-type instance."""
    inst = np.zeros((h, w), np.int32)
    inst[1:7, 1:7] = 3
    inst[3:5, 3:5] = 0
    inst[9, 9] = inst[10, 10] = inst[11, 10] = 8
    inst[14:20, 2:9] = 9
    types = np.where(inst == 3, 1, np.where(inst == 8, 2, np.where(inst == 9, 3, 0))).astype(np.uint8)
    types[14, 2:9] = 1  # instance 9: mostly type 3, one row of type 1
    return inst, types


@pytest.fixture()
def placed(tmp_path):
    """Two slides; patches at level-0 offsets with downsample 2, one pair overlapping; a class map."""
    out = tmp_path / "placed"
    base, btypes = _awkward_patch()
    with PatchSetWriter(out, ("inst", "types"), base.shape) as w:
        for slide, x, y, k in (("A", 1000, 500, 0), ("A", 1020, 500, 1), ("B", 0, 40, 2)):
            inst = np.roll(base, k, axis=1)
            types = np.roll(btypes, k, axis=1)
            w.add({"slide": slide, "x": x, "y": y, "level": 1, "downsample": 2.0, "mpp": 0.5,
                   "width": base.shape[1], "height": base.shape[0], "tissue_fraction": 1.0, "n_nuclei": 3,
                   "source": "test"}, inst=inst, types=types)
        w.report = {"classes": CLASSES}
    return out


def test_hovernet_mat_layout(placed, tmp_path):
    assert export(placed, tmp_path / "mat", "hovernet-mat") == 3
    ps = read_patchset(placed)
    files = sorted((tmp_path / "mat").glob("*.mat"))
    assert [f.stem for f in files] == pd.read_csv(tmp_path / "mat" / "index.csv")["name"].tolist()
    m = scipy.io.loadmat(files[0])
    inst, types = np.asarray(ps.inst[0]), np.asarray(ps.types[0])
    assert m["inst_map"].dtype == np.int32 and np.array_equal(m["inst_map"], inst)
    assert m["inst_uid"].shape == (3, 1) and m["inst_uid"].dtype == np.int64
    assert m["inst_uid"].ravel().tolist() == [3, 8, 9]  # the ids present, not renumbered
    assert m["inst_type"].shape == (3, 1) and m["inst_type"].ravel().tolist() == [1, 2, 3]  # majority
    assert m["inst_centroid"].shape == (3, 2) and m["inst_centroid"].dtype == np.float64
    rows, cols = np.nonzero(inst == 9)
    assert m["inst_centroid"][2].tolist() == pytest.approx([cols.mean(), rows.mean()])  # (x, y)
    assert np.array_equal(m["type_map"], types)


def test_hovernet_mat_round_trip_through_histosynths_reader(placed, tmp_path):
    """.mat -> histosynth's annotation reader -> rasterizer: the same instances, pixel for pixel, and types."""
    export(placed, tmp_path / "mat", "hovernet-mat")
    ps = read_patchset(placed)
    for i, f in enumerate(sorted((tmp_path / "mat").glob("*.mat"))):
        inst, types = np.asarray(ps.inst[i]), np.asarray(ps.types[i])
        got = read(f, {"1": 1, "2": 2, "3": 3})
        h, w = inst.shape
        back, _, info = rasterize_tile([n.polygon for n in got.nuclei], [n.type_id for n in got.nuclei],
                                                0, 0, 1, w, h)
        ids, tv = instance_types(inst, types)
        assert len(got.nuclei) == len(ids) == info["n_nuclei"]
        lut = np.concatenate([[0], ids])
        assert np.array_equal(lut[back], inst)  # pixel-exact (the reader numbers instances 1..n)
        assert [n.type_id for n in got.nuclei] == tv.tolist()


def test_hovernet_mat_without_types(tmp_path):
    inst, _ = _awkward_patch()
    with PatchSetWriter(tmp_path / "ps", ("inst",), inst.shape) as w:
        w.add({"slide": "synthetic", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
               "width": inst.shape[1], "height": inst.shape[0], "tissue_fraction": 1.0, "n_nuclei": 3,
               "source": "t"}, inst=inst)
        w.add({"slide": "synthetic", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
               "width": inst.shape[1], "height": inst.shape[0], "tissue_fraction": 1.0, "n_nuclei": 0,
               "source": "t"}, inst=np.zeros_like(inst))
    export(tmp_path / "ps", tmp_path / "mat", "hovernet-mat")
    first, empty = (scipy.io.loadmat(f) for f in sorted((tmp_path / "mat").glob("*.mat")))
    assert "inst_type" not in first and "type_map" not in first  # as HoVer-Net does without types
    assert first["inst_uid"].ravel().tolist() == [3, 8, 9]
    assert empty["inst_uid"].shape == (0, 1) and empty["inst_centroid"].shape == (0, 2)


# -- geojson --------------------------------------------------------------------------------------------
def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1)


def test_geojson_one_file_per_slide_in_level0_coordinates(placed, tmp_path):
    """Round trip: slide GeoJSON -> histosynth's reader -> rasterizer on each patch's tile: same nuclei and types."""
    assert export(placed, tmp_path / "gj", "geojson") == 3
    assert sorted(p.name for p in (tmp_path / "gj").iterdir()) == ["A.geojson", "B.geojson", "index.csv"]
    table = pd.read_csv(tmp_path / "gj" / "index.csv")
    assert table["file"].tolist() == ["A.geojson", "A.geojson", "B.geojson"]
    ps = read_patchset(placed)
    name_to_id = {v: int(k) for k, v in CLASSES.items()}
    for slide, rows in (("A", [0, 1]), ("B", [2])):
        data = json.loads((tmp_path / "gj" / f"{slide}.geojson").read_text())
        got = read(tmp_path / "gj" / f"{slide}.geojson", name_to_id)
        assert len(got.nuclei) == len(data["features"]) == 3 * len(rows)  # per patch: overlaps appear twice
        for k, i in enumerate(rows):
            row = ps.index.iloc[i]
            inst, types = np.asarray(ps.inst[i]), np.asarray(ps.types[i])
            mine = got.nuclei[3 * k: 3 * k + 3]
            assert {f["properties"]["metadata"]["patch_row"] for f in data["features"][3 * k: 3 * k + 3]} == {str(i)}
            back, _, _ = rasterize_tile([n.polygon for n in mine], [n.type_id for n in mine],
                                        float(row.x), float(row.y), float(row.downsample), int(row.width),
                                        int(row.height))
            ids, tv = instance_types(inst, types)
            assert [n.type_id for n in mine] == tv.tolist()
            for j, iid in enumerate(ids.tolist()):
                # the convention: pixel-edge outlines, pixel-centre rasterization -> exact (IoU 1)
                assert _iou(back == j + 1, inst == iid) >= 0.9
            assert np.array_equal(back > 0, inst > 0)
    # placed on the slide: x = patch x + downsample * column
    a0 = shape(json.loads((tmp_path / "gj" / "A.geojson").read_text())["features"][0]["geometry"])
    assert a0.bounds[:2] == (1000 + 2 * 1, 500 + 2 * 1)


def test_geojson_meets_qupaths_expectations(placed, tmp_path):
    export(placed, tmp_path / "gj", "geojson")
    ids = []
    for path in (tmp_path / "gj").glob("*.geojson"):
        data = json.loads(path.read_text())
        assert data["type"] == "FeatureCollection"
        for f in data["features"]:
            assert f["type"] == "Feature" and isinstance(f["id"], str) and str(uuid.UUID(f["id"])) == f["id"]
            ids.append(f["id"])
            props = f["properties"]
            assert props["objectType"] == "annotation" and props["isLocked"] is False
            cls = props["classification"]
            assert cls["name"] in CLASSES.values() and len(cls["color"]) == 3
            assert all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
            assert all(isinstance(v, str) for v in props["metadata"].values())
            assert props["metadata"]["slide"] == path.stem
            assert shape(f["geometry"]).is_valid
    assert len(ids) == len(set(ids)) == 9
    # reproducible: the same export twice gives the same bytes
    export(placed, tmp_path / "gj2", "geojson", object_type="detection")
    export(placed, tmp_path / "gj3", "geojson", object_type="detection")
    assert (tmp_path / "gj2" / "A.geojson").read_bytes() == (tmp_path / "gj3" / "A.geojson").read_bytes()
    assert b'"objectType":"detection"' in (tmp_path / "gj2" / "A.geojson").read_bytes()


def test_geojson_patches_without_slide_coordinates(tmp_path):
    """Synthetic masks (slide 'synthetic', x = y = 0): one file per patch in the patch's own pixel coordinates."""
    inst, types = _awkward_patch()
    with PatchSetWriter(tmp_path / "syn", ("inst", "types"), inst.shape) as w:
        for k in range(2):
            w.add({"slide": "synthetic", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
                   "width": inst.shape[1], "height": inst.shape[0], "tissue_fraction": 1.0, "n_nuclei": 3,
                   "source": "sample-masks seed 0 shard 0"}, inst=np.roll(inst, k, 0), types=np.roll(types, k, 0))
        w.report = {"classes": CLASSES}
    export(tmp_path / "syn", tmp_path / "gj", "geojson")
    files = sorted((tmp_path / "gj" / "patches").glob("*.geojson"))
    assert [f.name for f in files] == ["000000_synthetic_0_0.geojson", "000001_synthetic_0_0.geojson"]
    assert pd.read_csv(tmp_path / "gj" / "index.csv")["file"].tolist() == [f"patches/{f.name}" for f in files]
    got = read(files[1], {v: int(k) for k, v in CLASSES.items()})
    back, _, _ = rasterize_tile([n.polygon for n in got.nuclei], [1] * len(got.nuclei), 0, 0, 1,
                                inst.shape[1], inst.shape[0])
    assert np.array_equal(back > 0, np.roll(inst, 1, 0) > 0)


def test_geojson_without_class_map_and_bad_report(placed, tmp_path):
    (placed / "report.json").unlink()
    export(placed, tmp_path / "gj", "geojson")
    names = {f["properties"]["classification"]["name"]
             for f in json.loads((tmp_path / "gj" / "A.geojson").read_text())["features"]}
    assert names == {"1", "2", "3"}  # types without a class map are named by their numbers
    (placed / "report.json").write_text("{not json")
    with pytest.raises(HistosynthError, match="report.json"):
        export(placed, tmp_path / "gj2", "geojson")
    assert not (tmp_path / "gj2").exists()


def test_cli_export_choices_are_the_formats(placed, tmp_path):
    from histosynth.cli import main

    assert main(["export", str(placed), str(tmp_path / "o"), "--format", "hovernet-mat"]) == 0
    assert len(list((tmp_path / "o").glob("*.mat"))) == 3
    assert main(["export", str(placed), str(tmp_path / "g"), "--format", "geojson", "--object-type", "detection"]) == 0
    assert main(["export", str(placed), str(tmp_path / "g2"), "--format", "geojson", "--object-type", "cell"]) == 2
    with pytest.raises(SystemExit):
        main(["export", str(placed), str(tmp_path / "x"), "--format", "tiff"])


def test_overlay(typed, tmp_path):
    assert overlay(typed, tmp_path / "o.png", per_slide=2, class_names={1: "a", 3: "c"}) == 3
    pic = cv2.imread(str(tmp_path / "o.png"))
    assert pic is not None and pic.shape[1] >= 2 * 16
    img = np.zeros((8, 8, 3), np.uint8)
    inst = np.zeros((8, 8), np.int32)
    inst[2:6, 2:6] = 1
    drawn = outline_image(img, inst, np.where(inst > 0, 2, 0))
    assert (drawn[2, 2:6] == [230, 40, 40]).all() and (drawn[3:5, 3:5] == 0).all()
