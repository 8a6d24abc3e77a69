"""Tissue regions from annotations -> tissue.npy (histosynth.patches.regions, rasterize --tissue-regions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon, box

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.io import annotations
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.masks import tissue as ts
from histosynth.patches.annotate import rasterize_patchset
from histosynth.patches.regions import (
    Regions,
    parse_tissue_regions,
    region_maps,
    tissue_classes,
)
from histosynth.slides.tiling import TileParams, tile_slide
from tests.conftest import shared_file
from tests.test_patches import make_tiles

CAMELYON_MIXED = ("annotation-formats", "asap_xml", "camelyon16_tumor_001_tissue_artifact_background_mixed.xml")


def _feature(coords, name, holes=()):
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords, *holes]},
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


def _square(x, y, s):
    return [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]


def _geojson(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _regions(polys, labels):
    return Regions("mem", list(polys), np.asarray(labels, np.int64), {}, [])


def _reference(polys, labels, x0, y0, d, w, h):
    """Per pixel centre: the label of the smallest closed polygon holding it (ties: the earlier), else 0."""
    cx = x0 + (np.arange(w) + 0.5) * d
    cy = y0 + (np.arange(h) + 0.5) * d
    xx, yy = np.meshgrid(cx, cy)
    out = np.zeros((h, w), np.uint8)
    best = np.full((h, w), np.inf)
    for poly, label in zip(polys, labels):
        inside = shapely.intersects_xy(poly, xx, yy) & (poly.area < best)
        out[inside], best[inside] = label, poly.area
    return out


# -- the label maps --------------------------------------------------------------------------------
def test_a_square_region_labels_exactly_its_pixels():
    (m,) = region_maps(_regions([box(10, 20, 30, 25)], [3]), [(0, 0, 1.0, 40, 40)])
    assert m.dtype == np.uint8
    expected = np.zeros((40, 40), np.uint8)
    expected[20:25, 10:30] = 3
    assert np.array_equal(m, expected)


def test_overlapping_regions_the_smallest_wins_whatever_the_order():
    big, small = box(0, 0, 40, 40), box(10, 10, 20, 20)
    for polys, labels in (([big, small], [1, 2]), ([small, big], [2, 1])):
        (m,) = region_maps(_regions(polys, labels), [(0, 0, 1.0, 40, 40)])
        assert (m[10:20, 10:20] == 2).all() and (m == 2).sum() == 100 and (m == 1).sum() == 1600 - 100


def test_a_hole_is_air_unless_another_region_covers_it():
    holed = Polygon(_square(0, 0, 40), [_square(10, 10, 10)])
    (m,) = region_maps(_regions([holed], [1]), [(0, 0, 1.0, 40, 40)])
    assert (m[10:20, 10:20] == 0).all() and (m == 1).sum() == 1600 - 100
    (m,) = region_maps(_regions([holed, box(12, 12, 14, 14)], [1, 2]), [(0, 0, 1.0, 40, 40)])
    assert (m == 2).sum() == 4 and (m == 0).sum() == 96


def test_tile_downsample_and_origin_map_level0_coordinates():
    # a tile at 0.5 um/px over a 0.25 um/px slide: downsample 2, origin (100, 50)
    poly = box(120, 70, 160, 90)  # level-0: 40 x 20 -> 20 x 10 tile pixels from (10, 10)
    (m,) = region_maps(_regions([poly], [1]), [(100, 50, 2.0, 32, 32)])
    expected = np.zeros((32, 32), np.uint8)
    expected[10:20, 10:30] = 1
    assert np.array_equal(m, expected)
    assert np.array_equal(m, _reference([poly], [1], 100, 50, 2.0, 32, 32))


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(-10, 40), st.integers(-10, 40), st.integers(1, 30), st.integers(1, 30),
                          st.integers(1, 255)), min_size=0, max_size=6),
       st.sampled_from([0.5, 1.0, 1.5, 3.0]))
def test_labels_written_are_air_or_asked_for_and_match_the_reference(rects, d):
    polys = [box(x, y, x + w, y + h) for x, y, w, h, _ in rects]
    labels = [lab for *_, lab in rects]
    (m,) = region_maps(_regions(polys, labels), [(0, 0, d, 24, 20)])
    assert set(np.unique(m).tolist()) <= {0, *labels}
    # equal areas: the reference's strict < keeps the earlier, the rasterizer's ties go to the earlier too
    assert np.array_equal(m, _reference(polys, labels, 0, 0, d, 24, 20))


# -- the option ------------------------------------------------------------------------------------
def test_parse_tissue_regions():
    assert parse_tissue_regions(["tumor=1", "stroma=2"]) == {"tumor": 1, "stroma": 2}
    assert parse_tissue_regions({"tumor": 1}) == {"tumor": 1}
    assert parse_tissue_regions(None) == {} and parse_tissue_regions([]) == {}
    assert tissue_classes({"stroma": 2, "tumor": 1}) == {"1": "tumor", "2": "stroma"}


@pytest.mark.parametrize("bad, words", [
    (["tumor=0"], "labels are 1..255"), (["tumor=-1"], "labels are 1..255"), (["tumor=256"], "labels are 1..255"),
    (["tumor=1", "stroma=1"], "label 1 is given to both"), (["tumor=x"], "integer"), (["tumor"], "NAME=LABEL"),
    (["Tumor=1", "tumor=2"], "name the same class"), ({"tumor": 1.5}, "integer"), ({"tumor": True}, "integer"),
])
def test_bad_labels_name_the_option(bad, words):
    with pytest.raises(HistosynthError, match="--tissue-regions") as err:
        parse_tissue_regions(bad)
    assert words in str(err.value)


# -- the rasterize stage ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return make_tiles(tmp_path_factory.mktemp("tiles"))


def _mixed(tmp_path):
    """Nuclei and regions in one file: two tumour regions (one overlapping stroma), a stroma one."""
    return _geojson(tmp_path / "a.geojson", [
        _feature(_square(10, 10, 20), "Epithelial"),
        _feature(_square(0, 0, 200), "Stroma"),
        _feature(_square(50, 50, 100), "tumor"),
        _feature(_square(310, 110, 30), "Epithelial"),
        _feature(_square(300, 100, 50), "Tumor"),
    ])


def test_regions_from_the_nuclei_file_are_taken_out_of_the_nuclei(tiles, tmp_path, caplog):
    caplog.set_level("INFO")
    rep = rasterize_patchset(_mixed(tmp_path), tiles, tmp_path / "p", {"Epithelial": 1},
                             tissue_regions={"tumor": 1, "stroma": 2})
    ps = read_patchset(tmp_path / "p", require=("images", "inst", "types", "tissue"))
    assert rep["nuclei_read"] == 2 and rep["parse"]["excluded_classes"] == 3
    assert "3 items of the tissue region classes" in caplog.text
    assert rep["tissue_classes"] == {"1": "tumor", "2": "stroma"} == ps.report["tissue_classes"]
    tr = rep["tissue_regions"]
    assert tr["polygons"] == {"tumor": 2, "stroma": 1} and tr["missing"] == [] and not tr["separate_file"]
    xy = list(zip(ps.index["x"], ps.index["y"]))
    full = np.zeros((200, 400), np.uint8)
    for (x, y), t in zip(xy, ps.tissue):
        full[y:y + 100, x:x + 100] = t
    expected = np.zeros((200, 400), np.uint8)
    expected[0:200, 0:200] = 2
    expected[50:150, 50:150] = 1
    expected[100:150, 300:350] = 1
    assert np.array_equal(full, expected)
    assert tr["pixels"] == {"0": int((expected == 0).sum()), "1": int((expected == 1).sum()),
                            "2": int((expected == 2).sum())}
    assert tr["patches_with_regions"] == 5 and tr["patches"] == 8
    assert ps.inst.max() == 1 and ps.index["n_nuclei"].sum() == 2  # the regions are no nuclei
    # without the option the same file is all nuclei (5 classes known as nuclei)
    rep = rasterize_patchset(_mixed(tmp_path), tiles, tmp_path / "q", {"Epithelial": 1, "tumor": 2, "stroma": 3})
    assert rep["nuclei_read"] == 5 and read_patchset(tmp_path / "q").tissue is None


def test_a_separate_regions_file_and_a_missing_class(tiles, tmp_path, caplog):
    nuclei = _geojson(tmp_path / "n.geojson", [_feature(_square(10, 10, 20), "Epithelial")])
    regions = _geojson(tmp_path / "r.geojson", [_feature(_square(0, 0, 100), "tissue"),
                                                _feature(_square(200, 0, 10), "Other")])
    rep = rasterize_patchset(nuclei, tiles, tmp_path / "p", {"Epithelial": 1},
                             tissue_regions={"tissue": 1, "artifact": 2}, regions_file=regions)
    tr = rep["tissue_regions"]
    assert tr["separate_file"] and tr["polygons"] == {"tissue": 1, "artifact": 0}
    assert tr["missing"] == ["artifact"] and tr["other_items"] == 1 and tr["parse"]["kept"] == 2
    assert "no polygon of the tissue region class 'artifact'" in caplog.text
    assert read_patchset(tmp_path / "p").tissue.sum() == 100 * 100


def test_no_region_on_any_tile_is_reported_and_training_refuses(tiles, tmp_path, caplog):
    nuclei = _geojson(tmp_path / "n.geojson", [_feature(_square(10, 10, 20), "Epithelial")])
    rep = rasterize_patchset(nuclei, tiles, tmp_path / "p", {"Epithelial": 1}, tissue_regions={"tumor": 1})
    assert rep["tissue_regions"]["missing"] == ["tumor"] and rep["tissue_regions"]["patches_with_regions"] == 0
    assert "tissue.npy is all air" in caplog.text
    with pytest.raises(HistosynthError, match="every tissue mask of the 8 patches is air"):
        ts.load_tissue_masks([tmp_path / "p"])


def test_bad_regions_input_writes_nothing(tiles, tmp_path):
    nuclei = _geojson(tmp_path / "n.geojson", [_feature(_square(10, 10, 20), "Epithelial")])
    broken = tmp_path / "r.xml"
    broken.write_text("<ASAP_Annotations><Annotations><Annotation")
    with pytest.raises(HistosynthError, match="r.xml"):
        rasterize_patchset(nuclei, tiles, tmp_path / "p", {"Epithelial": 1}, tissue_regions={"tissue": 1},
                           regions_file=broken)
    with pytest.raises(HistosynthError, match="--tissue-regions"):
        rasterize_patchset(nuclei, tiles, tmp_path / "p", {"Epithelial": 1}, tissue_regions={"a": 1, "b": 1})
    with pytest.raises(HistosynthError, match="without --tissue-regions"):
        rasterize_patchset(nuclei, tiles, tmp_path / "p", {"Epithelial": 1}, regions_file=nuclei)
    only = _geojson(tmp_path / "o.geojson", [_feature(_square(10, 10, 20), "tumor")])
    with pytest.raises(HistosynthError, match="only tissue regions"):
        rasterize_patchset(only, tiles, tmp_path / "p", None, tissue_regions={"tumor": 1})
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p*"))


def test_cli_tissue_regions(tiles, tmp_path):
    ann = _mixed(tmp_path)
    out = tmp_path / "p"
    assert main(["rasterize", str(ann), str(tiles), str(out), "--classes", "Epithelial=1",
                 "--tissue-regions", "tumor=1", "stroma=2"]) == 0
    assert read_patchset(out).report["tissue_classes"] == {"1": "tumor", "2": "stroma"}
    assert main(["rasterize", str(ann), str(tiles), str(tmp_path / "q"), "--classes", "Epithelial=1",
                 "--tissue-regions", "tumor=1", "stroma=0"]) == 2
    assert not (tmp_path / "q").exists()


def test_exclude_classes_in_the_reader(tmp_path):
    ann = _mixed(tmp_path)
    aset = annotations.read(ann, {"epithelial": 1}, exclude_classes=["nuclei_TUMOR", "stroma"])
    assert len(aset) == 2 and aset.report["excluded_classes"] == 3
    assert aset.report["read"] == aset.report["kept"] + aset.report["excluded_classes"]


def test_multilabel_tissue_training_on_rasterized_regions(tiles, tmp_path):
    rasterize_patchset(_mixed(tmp_path), tiles, tmp_path / "p", {"Epithelial": 1},
                       tissue_regions={"tumor": 1, "stroma": 2})
    rep = ts.train_tissue([tmp_path / "p"], tmp_path / "m", size=(16, 32), nz=8, widths=(16, 8), ndf=4,
                          batch_size=2, steps=2, log_every=1, sample_every=2, device="cpu")
    assert rep["step"] == 2
    G, classes = ts.load_tissue_model(tmp_path / "m" / "tissue.pt")
    assert classes == {1: "tumor", 2: "stroma"} and G.n_labels == 3
    assert ts.generate(G, 2, 0).max() <= 2


# -- real data: Camelyon16 ASAP XML groups ---------------------------------------------------------
def _fake_tiles(path, boxes, side):
    with PatchSetWriter(path, arrays=("images",), patch_size=(side, side)) as w:
        for i, (x, y, d) in enumerate(boxes):
            w.add({"slide": "tumor_001", "x": x, "y": y, "level": 0, "downsample": d, "mpp": 0.243 * d,
                   "width": side, "height": side, "tissue_fraction": 1.0, "n_nuclei": 0, "source": f"p{i}"},
                  images=np.full((side, side, 3), 200, np.uint8))
        w.report = {"slide": {}}
    return path


def test_camelyon_asap_groups_rasterize_onto_a_tile_grid(tmp_path):
    xml = shared_file(*CAMELYON_MIXED)
    groups = {"tissue": 1, "artifact": 2, "background": 3}
    aset = annotations.read(xml, None)
    assert {"tissue", "artifact", "background"} <= set(aset.class_counts)
    polys = [n.polygon for n in aset.nuclei if n.class_name in groups]
    labels = [groups[n.class_name] for n in aset.nuclei if n.class_name in groups]
    # a 2 x 2 grid of 64 px tiles at downsample 64 over the first tissue outline
    first = next(n.polygon for n in aset.nuclei if n.class_name == "tissue")
    x0, y0, _, _ = (int(v) for v in first.bounds)
    d, side = 64.0, 64
    grid = [(x0 + i * side * d, y0 + j * side * d, d) for j in range(2) for i in range(2)]
    tiles = _fake_tiles(tmp_path / "tiles", grid, side)
    nuclei = _geojson(tmp_path / "n.geojson", [_feature(_square(x0 + 100, y0 + 100, 20), "nucleus")])
    rep = rasterize_patchset(nuclei, tiles, tmp_path / "p", None, tissue_regions=groups, regions_file=xml)
    ps = read_patchset(tmp_path / "p", require=("tissue",))
    assert rep["tissue_regions"]["polygons"] == {"tissue": 4, "artifact": 6, "background": 2}
    assert rep["tissue_regions"]["other_items"] == 0 and rep["tissue_regions"]["missing"] == []
    for (x, y, dd), m in zip(grid, ps.tissue):
        assert np.array_equal(m, _reference(polys, labels, x, y, dd, side, side))
    assert (ps.tissue[:] == 1).any() and set(np.unique(ps.tissue[:]).tolist()) <= {0, 1, 2, 3}


# -- the demo slides' regions: the multi-label path end to end on data the project makes -----------------
def test_demo_regions_rasterize_and_train(tmp_path):
    from histosynth.slides.demo import make_demo_slides

    table = make_demo_slides(tmp_path / "demo", n_slides=1, size=(512, 512), seed=3)
    name = table.slide[0]
    regions = tmp_path / "demo" / f"{name}.regions.geojson"
    tile_slide(tmp_path / "demo" / f"{name}.tif", tmp_path / "tiles", TileParams(size=128, max_background=1.0))
    assert main(["rasterize", str(tmp_path / "demo" / f"{name}.geojson"), str(tmp_path / "tiles"),
                 str(tmp_path / "p"), "--classes", "Epithelial=1", "Lymphocyte=2", "Spindle=3",
                 "--tissue-regions", "epithelium=1", "stroma=2", "--regions-file", str(regions)]) == 0
    ps = read_patchset(tmp_path / "p", require=("inst", "types", "tissue"))
    assert ps.report["tissue_regions"]["missing"] == [] and set(np.unique(ps.tissue[:]).tolist()) == {0, 1, 2}
    # the regions are the layout the nuclei were placed in: epithelial nuclei lie on epithelium
    types, tissue = ps.types[:], ps.tissue[:]
    # and spindle nuclei on stroma, up to the 8 px grid the regions are traced on (epithelial nuclei sit at
    # the basal side of the nests, so their outer pixels often reach into the stroma)
    epithelial_on_epi, spindle_on_stroma = (tissue[types == 1] == 1).mean(), (tissue[types == 3] == 2).mean()
    assert epithelial_on_epi > 0.6 and spindle_on_stroma > 0.9, (epithelial_on_epi, spindle_on_stroma)
    assert (tissue[types == 3] == 1).mean() < 0.1
    rep = ts.train_tissue([tmp_path / "p"], tmp_path / "m", size=(32, 32), nz=8, widths=(8, 4), ndf=4,
                          batch_size=2, steps=2, log_every=1, sample_every=2, device="cpu")
    assert rep["step"] == 2 and ts.load_tissue_model(tmp_path / "m" / "tissue.pt")[0].n_labels == 3


def test_workflow_trains_the_tissue_model_on_the_demo_regions(tmp_path):
    """The real DAG: demo slides (with their regions files) -> tiles -> rasterize --tissue-regions -> train_tissue."""
    import yaml

    from tests.test_workflow import TINY, snakemake

    cfg = {**TINY, "rasterize": {"tissue_regions": {"epithelium": 1, "stroma": 2}},
           "tissue": {"enabled": True, "size": [32, 32], "nz": 8, "widths": [8, 4], "ndf": 4, "steps": 2,
                      "batch_size": 2, "log_every": 1, "sample_every": 2, "checkpoint_every": 2, "threads": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, "results/models/tissue/tissue.pt")
    assert res.returncode == 0, res.stderr[-3000:]
    patches = sorted((tmp_path / "results" / "patches").iterdir())
    assert patches and all(read_patchset(p).report["tissue_classes"] == {"1": "epithelium", "2": "stroma"}
                           for p in patches)
    G, classes = ts.load_tissue_model(tmp_path / "results" / "models" / "tissue" / "tissue.pt")
    assert classes == {1: "epithelium", 2: "stroma"} and G.n_labels == 3
