"""Synthetic demo slides: file format, ground truth that matches pixels, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import orjson
import pandas as pd
import pytest
import shapely
import tifffile
from scipy.ndimage import binary_dilation
from skimage.color import rgb2hed

from histosynth.slides.demo import CLASS_COLORS, make_demo_slides
from histosynth.errors import HistosynthError

SIZE = (1024, 1024)
FILES = {"demo-000.tif", "demo-000.geojson", "demo-000.regions.geojson", "demo-001.tif", "demo-001.geojson",
         "demo-001.regions.geojson", "slides.csv", "demo.json"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("demo")
    table = make_demo_slides(out, n_slides=2, size=SIZE, seed=7)
    return out, table


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _polys(path: Path) -> tuple[np.ndarray, np.ndarray]:
    fc = orjson.loads(path.read_bytes())
    geoms = np.array([shapely.geometry.shape(f["geometry"]) for f in fc["features"]], dtype=object)
    names = np.array([f["properties"]["classification"]["name"] for f in fc["features"]])
    return geoms, names


def _read(path: Path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def _label(geoms: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label image: pixel (r, c) gets i+1 when its centre (c+.5, r+.5) is inside polygon i."""
    lab = np.zeros(shape, np.int32)
    for i, g in enumerate(geoms):
        x0, y0, x1, y1 = shapely.bounds(g)
        cs = np.arange(int(np.floor(x0)), int(np.ceil(x1)))
        rs = np.arange(int(np.floor(y0)), int(np.ceil(y1)))
        xx, yy = np.meshgrid(cs + 0.5, rs + 0.5)
        inside = shapely.contains_xy(g, xx, yy)
        lab[rs[0] : rs[-1] + 1, cs[0] : cs[-1] + 1][inside] = i + 1
    return lab


def test_table_and_files(demo):
    out, table = demo
    assert {p.name for p in out.iterdir()} == FILES  # no temporary leftovers
    assert list(table.columns) == ["slide", "image", "annotations", "stain", "mpp", "width", "height", "n_nuclei"]
    on_disk = pd.read_csv(out / "slides.csv")
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)
    assert list(table.slide) == ["demo-000", "demo-001"]
    assert list(table.stain) == ["pale", "dark"]
    assert (table.width == SIZE[0]).all() and (table.height == SIZE[1]).all()
    assert (table.mpp == 0.25).all()
    meta = json.loads((out / "demo.json").read_text())
    assert meta["parameters"]["seed"] == 7
    assert sum(meta["counts"].values()) == table.n_nuclei.sum()


def test_openslide_pyramid_and_jpeg_tiles(demo):
    out, table = demo
    for row in table.itertuples():
        with openslide.OpenSlide(str(out / row.image)) as s:
            assert s.properties["openslide.vendor"] == "generic-tiff"
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
            assert s.level_count >= 2
            assert s.dimensions == SIZE
            assert s.level_downsamples[1] == pytest.approx(2.0)
        with tifffile.TiffFile(out / row.image) as tif:
            assert not tif.is_bigtiff
            assert len(tif.pages) >= 2
            for i, page in enumerate(tif.pages):
                assert page.is_tiled and page.tilewidth == 256 and page.tilelength == 256
                assert page.compression == 7  # JPEG
                assert page.subfiletype == (0 if i == 0 else 1)
                assert "DateTime" not in page.tags
            assert "histosynth demo" in tif.pages[0].description
            assert "seed=7" in tif.pages[0].description


def test_geojson_schema(demo):
    out, table = demo
    for row in table.itertuples():
        fc = orjson.loads((out / row.annotations).read_bytes())
        assert fc["type"] == "FeatureCollection"
        assert len(fc["features"]) == row.n_nuclei > 50
        ids = [f["id"] for f in fc["features"]]
        assert len(set(ids)) == len(ids) and all(len(i) == 36 for i in ids)
        for f in fc["features"]:
            assert f["geometry"]["type"] == "Polygon"
            ring = f["geometry"]["coordinates"][0]
            assert ring[0] == ring[-1] and len(ring) >= 4
            props = f["properties"]
            assert props["objectType"] == "annotation"
            name = props["classification"]["name"]
            assert props["classification"]["color"] == list(CLASS_COLORS[name])


def test_polygons_valid_inside_and_disjoint(demo):
    out, table = demo
    for row in table.itertuples():
        geoms, _ = _polys(out / row.annotations)
        assert shapely.is_valid(geoms).all()
        b = shapely.bounds(geoms)
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= row.width).all() and (b[:, 3] <= row.height).all()
        tree = shapely.STRtree(geoms)
        i, j = tree.query(geoms, predicate="intersects")
        pairs = i < j
        inter = shapely.area(shapely.intersection(geoms[i[pairs]], geoms[j[pairs]]))
        assert inter.max(initial=0.0) < 0.05
        assert pairs.sum() > 5  # some nuclei touch


def test_classes_differ_in_size_and_shape(demo):
    out, table = demo
    geoms = []
    names = []
    for row in table.itertuples():
        g, n = _polys(out / row.annotations)
        geoms.append(g)
        names.append(n)
    geoms, names = np.concatenate(geoms), np.concatenate(names)
    assert set(names) == set(CLASS_COLORS)
    area = shapely.area(geoms)

    def aspect(g):
        r = shapely.minimum_rotated_rectangle(g)
        xy = np.asarray(r.exterior.coords)
        e = np.hypot(*np.diff(xy[:3], axis=0).T)
        return e.max() / max(e.min(), 1e-6)

    asp = np.array([aspect(g) for g in geoms])
    mean_area = {c: area[names == c].mean() for c in CLASS_COLORS}
    mean_asp = {c: np.median(asp[names == c]) for c in CLASS_COLORS}
    assert mean_area["Lymphocyte"] < mean_area["Epithelial"]
    # micrometre sizes at 0.25 mpp: lymphocyte ~5-7 um, epithelial ~7-10 um across
    assert 300 < mean_area["Lymphocyte"] < 700 < mean_area["Epithelial"] < 1500
    assert mean_asp["Spindle"] > 2.5 > 1.6 > mean_asp["Epithelial"] > mean_asp["Lymphocyte"] * 0.9


def test_nuclei_are_hematoxylin_dark_where_annotated(demo):
    out, table = demo
    for row in table.itertuples():
        rgb = _read(out / row.image)
        geoms, _ = _polys(out / row.annotations)
        lab = _label(geoms, rgb.shape[:2])
        hema = rgb2hed(rgb)[..., 0]
        grey = rgb.mean(-1)
        tissue = grey < 215
        inside = lab > 0
        # 2 px away from any nucleus, in tissue
        near = binary_dilation(inside, iterations=2)
        stroma = tissue & ~near
        assert hema[inside].mean() > hema[stroma].mean() + 0.03
        assert grey[inside].mean() < grey[stroma].mean() - 20
        # per nucleus: darker than the ring around it (ring outside every nucleus)
        ring_ok = 0
        for k, g in enumerate(geoms, start=1):
            x0, y0, x1, y1 = shapely.bounds(g)
            r0, c0 = max(int(y0) - 6, 0), max(int(x0) - 6, 0)
            sl = np.s_[r0 : int(y1) + 7, c0 : int(x1) + 7]
            m = lab[sl] == k
            ring = binary_dilation(m, iterations=4) & ~near[sl]
            if m.sum() < 10 or ring.sum() < 10:
                ring_ok += 1
                continue
            ring_ok += grey[sl][m].mean() < grey[sl][ring].mean() - 5
        assert ring_ok >= 0.9 * len(geoms)
        # the background is there and white, and tissue is there
        assert (grey > 220).mean() > 0.1
        assert 0.25 < tissue.mean() < 0.85


def test_stain_styles_differ(demo):
    out, table = demo
    means = []
    for row in table.itertuples():
        rgb = _read(out / row.image).reshape(-1, 3).astype(float)
        means.append(rgb[rgb.mean(1) < 215].mean(0))
    assert np.linalg.norm(means[0] - means[1]) > 15
    assert means[1].mean() < means[0].mean()  # "dark" is darker than "pale"


def test_deterministic_and_independent_of_n_slides(demo, tmp_path):
    out, _ = demo
    make_demo_slides(tmp_path / "one", n_slides=1, size=SIZE, seed=7)
    for name in ("demo-000.tif", "demo-000.geojson"):
        assert _sha(tmp_path / "one" / name) == _sha(out / name)
    make_demo_slides(tmp_path / "other", n_slides=1, size=SIZE, seed=8)
    for name in ("demo-000.tif", "demo-000.geojson"):
        assert _sha(tmp_path / "other" / name) != _sha(out / name)


def test_mpp_scales_nuclei_in_pixels(tmp_path):
    a = make_demo_slides(tmp_path / "a", n_slides=1, size=(777, 601), seed=3, mpp=0.5)
    with openslide.OpenSlide(str(tmp_path / "a" / a.image[0])) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert s.level_dimensions[:2] == ((777, 601), (388, 300))
        edge = np.asarray(s.read_region((777 - 20, 601 - 20), 0, (20, 20)).convert("RGB"))
        assert edge.mean() > 100  # edge tiles hold image, not black padding
    geoms, names = _polys(tmp_path / "a" / a.annotations[0])
    lym = shapely.area(geoms[names == "Lymphocyte"]).mean()
    # 5-7 um lymphocytes at 0.5 um/px: ~ 80-180 px^2 (a quarter of the 0.25 mpp area)
    assert 60 < lym < 200


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_slides": 0},
        {"size": (256, 1024)},
        {"size": (1024,)},
        {"mpp": 0},
        {"mpp": -0.25},
        {"mpp": float("nan")},
        {"seed": -1},
        {"tile": 100},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(HistosynthError):
        make_demo_slides(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_render_is_a_pure_function_of_the_window():
    """Windows of level 0 agree where they overlap: bands and tiles join without seams."""
    from histosynth.slides.demo import _Slide

    slide = _Slide(768, 768, 0.25, 5, 1)
    big = slide.render(0, 0, 768, 768).astype(int)
    for y0, x0, h, w in ((100, 150, 300, 257), (511, 3, 200, 400), (640, 640, 128, 128)):
        part = slide.render(y0, x0, h, w).astype(int)
        diff = np.abs(part - big[y0 : y0 + h, x0 : x0 + w])
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    import histosynth.slides.demo as demo_mod

    calls = []
    real = demo_mod._write_geojson

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_mod, "_write_geojson", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        make_demo_slides(out, n_slides=2, size=(512, 512), seed=1)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    calls.clear()
    with pytest.raises(RuntimeError):
        make_demo_slides(out, n_slides=2, size=(512, 512), seed=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
