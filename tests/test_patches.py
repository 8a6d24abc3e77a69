"""The rasterize stage: annotations + tiles -> typed patch set, counts and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.io.labels import class_columns, parse_class_map, report_class_map
from histosynth.io.patchset import read_patchset
from histosynth.patches.annotate import rasterize_patchset
from histosynth.slides.tiling import TileParams, tile_slide
from tests.conftest import shared_file
from tests.helpers import tissue_image, write_pyramid


def _feature(coords, name):
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]},
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


def _square(x, y, s):
    return [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]


def make_tiles(d):
    """A 400 x 200 slide at 0.25 µm/px tiled into 100-px tiles under d/tiles (also used by test_regions)."""
    slide = write_pyramid(d / "s.tif", tissue_image(400, 200, tissue=(0, 1)), mpp=0.25, levels=1, tile=128)
    tile_slide(slide, d / "tiles", TileParams(size=100, max_background=1.0))
    return d / "tiles"


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return make_tiles(tmp_path_factory.mktemp("tiles"))


def _geojson(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_known_squares(tiles, tmp_path):
    ann = _geojson(tmp_path / "a.geojson", [
        _feature(_square(10, 10, 20), "Tumour"),        # 20x20 inside tile (0, 0)
        _feature(_square(90, 40, 20), "nuclei_lymph"),  # crosses x = 100: 10 px in each tile
        _feature(_square(350, 150, 10), "Tumour"),      # tile (300, 100)
    ])
    report = rasterize_patchset(ann, tiles, tmp_path / "p", {"tumour": 1, "lymph": 2})
    ps = read_patchset(tmp_path / "p", require=("images", "inst", "types"))
    idx = ps.index.set_index(["x", "y"])
    assert len(ps) == 8
    assert idx.loc[(0, 0), "n_nuclei"] == 2 and idx.loc[(0, 0), "n_tumour"] == 1
    assert idx.loc[(0, 0), "n_lymph"] == 1 and idx.loc[(100, 0), "n_lymph"] == 1
    assert idx.loc[(300, 100), "n_tumour"] == 1 and idx.loc[(200, 0), "n_nuclei"] == 0
    row = list(zip(ps.index["x"], ps.index["y"])).index((0, 0))
    inst, types = ps.inst[row], ps.types[row]
    assert inst.dtype == np.int32 and types.dtype == np.uint8
    assert (inst[10:30, 10:30] == 1).all() and (inst == 1).sum() == 400
    assert (inst == 2).sum() == 10 * 20 and (types[40:60, 90:100] == 2).all()
    right = list(zip(ps.index["x"], ps.index["y"])).index((100, 0))
    assert (ps.inst[right] == 1).sum() == 10 * 20
    assert np.array_equal(ps.images[:], read_patchset(tiles).images[:])
    assert report["nuclei_read"] == 3 and report["nuclei_on_kept_tiles"] == 3
    assert report["rasterize"]["instances"] == 4 and report["classes"] == {"1": "tumour", "2": "lymph"}
    assert json.loads((tmp_path / "p" / "report.json").read_text())["classes"] == {"1": "tumour", "2": "lymph"}
    assert ps.report["parse"]["kept"] == 3


def test_unknown_classes_are_listed(tiles, tmp_path):
    ann = _geojson(tmp_path / "a.geojson", [
        _feature(_square(10, 10, 20), "Tumour"), _feature(_square(50, 50, 20), "Mitosis"),
        _feature(_square(60, 10, 20), "Mitosis"), _feature(_square(150, 10, 20), "Debris"),
    ])
    with pytest.raises(HistosynthError, match="(?i)mitosis.*2|debris") as err:
        rasterize_patchset(ann, tiles, tmp_path / "p", {"Tumour": 1})
    assert "debris" in str(err.value).lower() and "mitosis" in str(err.value).lower()
    assert not (tmp_path / "p").exists()
    rasterize_patchset(ann, tiles, tmp_path / "p", {"Tumour": 1, "Other": 2}, catch_all="Other")
    ps = read_patchset(tmp_path / "p")
    assert ps.index["n_other"].sum() == 3 and ps.report["parse"]["catch_all"] == 3


def test_no_class_map_makes_every_nucleus_type_1(tiles, tmp_path):
    ann = _geojson(tmp_path / "a.geojson", [_feature(_square(10, 10, 20), "anything")])
    rasterize_patchset(ann, tiles, tmp_path / "p")
    ps = read_patchset(tmp_path / "p")
    assert ps.index["n_nucleus"].sum() == 1 and set(np.unique(ps.types[:])) == {0, 1}
    assert ps.report["classes"] == {"1": "nucleus"} and report_class_map(ps.report) == {1: "nucleus"}


def test_annotation_mpp_must_match_the_slide(tiles, tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(
        '<Annotations MicronsPerPixel="0.500000"><Annotation Id="1"><Regions>'
        '<Region Id="1" Type="0"><Vertices><Vertex X="10" Y="10"/><Vertex X="30" Y="10"/>'
        '<Vertex X="30" Y="30"/><Vertex X="10" Y="30"/></Vertices></Region>'
        "</Regions></Annotation></Annotations>"
    )
    with pytest.raises(HistosynthError, match="another scan"):
        rasterize_patchset(xml, tiles, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_cli_rasterize_with_overlay(tiles, tmp_path):
    ann = _geojson(tmp_path / "a.geojson", [_feature(_square(10, 10, 20), "Tumour")])
    out, png = tmp_path / "p", tmp_path / "qc" / "o.png"
    assert main(["rasterize", str(ann), str(tiles), str(out), "--classes", "Tumour=1", "--overlay", str(png)]) == 0
    assert read_patchset(out).index["n_tumour"].sum() == 1 and png.stat().st_size > 0
    assert main(["rasterize", str(ann), str(tiles), str(tmp_path / "q"), "--classes", "Tumour"]) == 2
    assert main(["rasterize", str(tmp_path / "none.geojson"), str(tiles), str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()


def test_class_maps():
    assert parse_class_map(["Epithelial=1", "Lymphocyte=2"]) == {"Epithelial": 1, "Lymphocyte": 2}
    assert parse_class_map([]) is None
    assert parse_class_map(["a=b=3"]) == {"a=b": 3}
    for bad in (["x"], ["x=0"], ["x=256"], ["x=one"], ["x=1", "x=2"]):
        with pytest.raises(HistosynthError):
            parse_class_map(bad)
    assert class_columns({"Spindle cell": 3, "Epithelial": 1}) == {1: "n_epithelial", 3: "n_spindle_cell"}


def test_monuseg_instances_equal_the_valid_regions():
    """Every kept MoNuSeg region becomes one instance, unless an overlapping smaller one hides it."""
    from histosynth.io.annotations import read
    from histosynth.patches.rasterize import rasterize_tile

    for name in ("TCGA-21-5784-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1"):
        aset = read(shared_file("monuseg-train", "annotations", f"{name}.xml"), slide_size=(1000, 1000))
        polys = [n.polygon for n in aset.nuclei]
        inst, _, info = rasterize_tile(polys, [1] * len(polys), 0, 0, 1.0, 1000, 1000)
        assert info["n_nuclei"] == len(np.unique(inst)) - 1
        assert info["n_nuclei"] + info["n_hidden"] >= len(polys) - 2  # at most 2 slivers with no pixel centre
        assert info["n_nuclei"] >= 0.99 * aset.report["kept"]


# -- annotation files that yield little are errors, never an empty patch set (issue #17) -------------------------
def _imagescope(path, squares):
    regions = "".join(
        f'<Region Id="{i}" Type="0"><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in square[:-1])
        + "</Vertices></Region>"
        for i, square in enumerate(squares, 1)
    )
    path.write_text(f'<Annotations><Annotation Id="1" Name=""><Regions>{regions}</Regions></Annotation></Annotations>')
    return path


def _point(x, y):
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": {}}


@pytest.mark.parametrize(
    "make, message",
    [
        # the slide is 400 x 200: outlines drawn at 40x on a slide read at 10x
        (lambda d: _geojson(d / "a.geojson", [_feature(_square(4 * x, 4 * y, 40), "t")
                                              for x, y in [(150, 80), (300, 120), (390, 190)]]),
         (r"all 3 items .*3 wholly outside the slide.*span x 600\.\.1600, y 320\.\.800 but the slide is 400 x 200"
          r".*another level or magnification")),
        (lambda d: _imagescope(d / "a.xml", [_square(1000, 1000, 10), _square(2000, 500, 10)]),
         r"all 2 items .*2 wholly outside the slide.*another level or magnification"),
        (lambda d: _geojson(d / "a.geojson", [_point(10, 10), _point(50, 60)]),
         r"all 2 items .*2 not polygons.*point annotations \(2 points\), not outlines.*DAFF centroid library"
         r".*histosynth daff-library --points"),
        (lambda d: _geojson(d / "a.geojson", []), r"holds no annotations"),
        (lambda d: _geojson(d / "a.geojson", [_feature(_square(10, 10, 20), "t"), _feature(_square(900, 10, 20), "t"),
                                              _feature(_square(10, 900, 20), "t")]),
         r"2 of 3 items \(67%, more than rasterize.max_dropped_fraction 0.5\).*2 wholly outside the slide"),
    ],
    ids=["geojson-outside", "imagescope-outside", "only-points", "no-features", "mostly-outside"],
)
def test_a_file_that_yields_little_is_an_error(tiles, tmp_path, make, message):
    ann = make(tmp_path)
    with pytest.raises(HistosynthError, match=message) as err:
        rasterize_patchset(ann, tiles, tmp_path / "p")
    assert str(ann) in str(err.value)
    assert not (tmp_path / "p").exists()


def test_max_dropped_fraction_and_the_cli(tiles, tmp_path, capsys):
    ann = _geojson(tmp_path / "a.geojson", [_feature(_square(10, 10, 20), "t"), _feature(_square(900, 10, 20), "t"),
                                            _feature(_square(10, 900, 20), "t")])
    out = tmp_path / "p"
    assert main(["rasterize", str(ann), str(tiles), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error: ")]) == 1 and "a.geojson" in err[-1], err
    assert not out.exists()
    assert main(["rasterize", str(ann), str(tiles), str(out), "--max-dropped-fraction", "0.7"]) == 0
    assert read_patchset(out).report["parse"]["outside_slide"] == 2
    with pytest.raises(HistosynthError, match="all 3 items"):
        far = _geojson(tmp_path / "far.geojson", [_feature(_square(900, 10 + 30 * i, 20), "t") for i in range(3)])
        rasterize_patchset(far, tiles, tmp_path / "q", max_dropped_fraction=1.0)


def test_max_dropped_fraction_default_is_the_schemas():
    import inspect

    from histosynth.config import schema_node
    from histosynth.patches import annotate

    default = inspect.signature(rasterize_patchset).parameters["max_dropped_fraction"].default
    assert default == annotate.MAX_DROPPED_FRACTION == schema_node("rasterize.max_dropped_fraction")["default"]
