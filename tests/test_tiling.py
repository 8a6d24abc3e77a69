"""The tiler: grid, tissue filter, resampling, edges, regions, determinism, atomic output."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.slides import tiling
from histosynth.errors import HistosynthError
from histosynth.io.patchset import read_patchset
from histosynth.io.slides import open_slide
from histosynth.slides.tiling import TileParams, plan_tiles, tile_slide
from tests.conftest import shared_file
from tests.helpers import tissue_image, write_pyramid


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    """1000 x 700 at 0.25 um/px, tissue in the right half, 3 levels."""
    path = tmp_path_factory.mktemp("slide") / "half.tif"
    return write_pyramid(path, tissue_image(1000, 700, tissue=(0.5, 1.0)), mpp=0.25, levels=3, tile=128)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_grid_positions_and_padding(slide_path):
    with open_slide(slide_path) as slide:
        plan = plan_tiles(slide, TileParams(size=128, target_mpp=0.5))
    assert plan.level == 1 and plan.read_size == 128 and plan.downsample == pytest.approx(2.0)
    assert plan.footprint == pytest.approx(256)
    xs = sorted({t.x for t in plan.grid})
    ys = sorted({t.y for t in plan.grid})
    assert xs == [0, 256, 512, 768] and ys == [0, 256, 512]
    padded = {(t.x, t.y) for t in plan.grid if t.padded}
    assert padded == {(768, y) for y in ys} | {(x, 512) for x in xs}
    with open_slide(slide_path) as slide:
        dropped = plan_tiles(slide, TileParams(size=128, target_mpp=0.5, edge="drop"))
    assert [(t.x, t.y) for t in dropped.grid] == [(x, y) for y in (0, 256) for x in (0, 256, 512)]


def test_stride_gives_overlap(slide_path):
    with open_slide(slide_path) as slide:
        plan = plan_tiles(slide, TileParams(size=128, target_mpp=0.5, stride=64, edge="drop"))
    xs = sorted({t.x for t in plan.grid})
    assert xs[:3] == [0, 128, 256] and xs[-1] + 256 <= 1000


def test_sliding_window_stops_at_the_far_edge(tmp_path):
    path = write_pyramid(tmp_path / "sq.tif", tissue_image(1000, 1000, tissue=(0, 1)), mpp=0.25, levels=1)
    with open_slide(path) as slide:
        plan = plan_tiles(slide, TileParams(size=128, target_mpp=0.5, stride=124))
    assert sorted({t.x for t in plan.grid}) == [0, 248, 496, 744]
    assert not any(t.padded for t in plan.grid) and len(plan.grid) == 16


def test_tissue_filter_keeps_tissue_tiles(slide_path, tmp_path):
    stats = tile_slide(slide_path, tmp_path / "t", TileParams(size=128, target_mpp=0.5))
    ps = read_patchset(tmp_path / "t", require=("images",))
    assert stats.kept == len(ps) > 0
    # tissue is x >= 500 level-0: tiles starting at 512 and 768 (768 is padded: 232 of 256 px inside)
    assert set(ps.index["x"]) == {512, 768}
    assert (ps.index["tissue_fraction"] >= 0.15).all()
    assert ps.images.dtype == np.uint8 and ps.images.shape[1:] == (128, 128, 3)
    assert ps.inst is None and ps.types is None
    assert ps.index["n_nuclei"].isna().all()
    keep_all = tile_slide(slide_path, tmp_path / "all", TileParams(size=128, target_mpp=0.5, max_background=1.0))
    assert keep_all.kept == keep_all.grid == 12


def test_lowres_prefilter_skips_decoding_but_changes_nothing(tmp_path):
    img = tissue_image(4096, 2048, tissue=(0.75, 1.0))
    path = write_pyramid(tmp_path / "big.tif", img, mpp=0.25, levels=5, tile=256)
    params = TileParams(size=128, target_mpp=0.25)
    fast = tile_slide(path, tmp_path / "fast", params)
    assert fast.ruled_out_lowres > 0 and fast.decoded < fast.grid
    slow = tile_slide(path, tmp_path / "slow", TileParams(size=128, target_mpp=0.25, lowres_min_pixels=10**6))
    assert slow.ruled_out_lowres == 0 and slow.decoded == slow.grid
    assert fast.kept == slow.kept
    assert _sha(tmp_path / "fast" / "images.npy") == _sha(tmp_path / "slow" / "images.npy")
    a = pd.read_csv(tmp_path / "fast" / "index.csv")
    b = pd.read_csv(tmp_path / "slow" / "index.csv")
    pd.testing.assert_frame_equal(a, b)


def test_lowres_prefilter_is_exact_on_pale_demo_tissue(tmp_path):
    """Pale tissue sits just under the threshold: averaging at low res must not rule it out."""
    from histosynth.slides.demo import make_demo_slides

    make_demo_slides(tmp_path / "demo", n_slides=1, size=(2048, 2048), seed=5)  # slide 0: pale stain
    path = tmp_path / "demo" / "demo-000.tif"
    for size, mpp in ((128, 0.25), (64, 0.25)):
        fast = tile_slide(path, tmp_path / "fast", TileParams(size=size, target_mpp=mpp))
        slow = tile_slide(path, tmp_path / "slow", TileParams(size=size, target_mpp=mpp, lowres_min_pixels=10**6))
        assert fast.ruled_out_lowres > 0 and fast.kept == slow.kept
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "fast" / "index.csv"),
                                      pd.read_csv(tmp_path / "slow" / "index.csv"))


def test_resampling_between_levels(slide_path, tmp_path):
    # 0.6 um/px: level 1 (0.5) read 154 px and shrunk to 128
    with open_slide(slide_path) as slide:
        plan = plan_tiles(slide, TileParams(size=128, target_mpp=0.6))
        assert plan.level == 1 and plan.read_size == round(128 * 1.2)
        tile = tiling.read_tile(slide, plan, plan.grid[6], 128)
        g = plan.grid[6]
        ref = slide.read_region(g.x, g.y, 0, round(128 * 2.4), round(128 * 2.4))
    ref = cv2.resize(ref, (128, 128), interpolation=cv2.INTER_AREA)
    assert tile.shape == (128, 128, 3)
    assert np.abs(tile.astype(int) - ref).mean() < 6
    stats = tile_slide(slide_path, tmp_path / "t", TileParams(size=128, target_mpp=0.6))
    idx = read_patchset(tmp_path / "t").index
    assert stats.kept == len(idx) and np.allclose(idx["mpp"], 0.6)
    assert np.allclose(idx["downsample"], 2.4) and (idx["level"] == 1).all()


def test_native_resolution_by_default(slide_path):
    with open_slide(slide_path) as slide:
        plan = plan_tiles(slide, TileParams(size=128))
    assert plan.level == 0 and plan.downsample == 1.0 and plan.mpp == pytest.approx(0.25)


def test_padded_tiles_are_white_outside_the_slide(slide_path, tmp_path):
    tile_slide(slide_path, tmp_path / "t", TileParams(size=128, target_mpp=0.5))
    ps = read_patchset(tmp_path / "t")
    row = ps.index.index[(ps.index["x"] == 768) & (ps.index["y"] == 512)][0]
    assert bool(ps.index.loc[row, "padded"])
    tile = ps.images[row]
    # slide is 1000 x 700: 116 of 128 columns, 94 of 128 rows are inside
    assert (tile[:, 116:] == 255).all() and (tile[94:] == 255).all()
    assert (tile[:90, :110] < 250).any()


def test_regions_restrict_the_grid(slide_path):
    with open_slide(slide_path) as slide:
        plan = plan_tiles(slide, TileParams(size=128, target_mpp=0.5, regions=[(600, 100, 300, 300)]))
    assert {(t.x, t.y) for t in plan.grid} == {(600, 100), (856, 100), (600, 356), (856, 356)}


def test_deterministic(slide_path, tmp_path):
    p = TileParams(size=128, target_mpp=0.5)
    tile_slide(slide_path, tmp_path / "a", p)
    tile_slide(slide_path, tmp_path / "b", p)
    for name in ("images.npy", "index.csv"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)


def _same_with_and_without_prefilter(path, tmp_path, **params):
    fast = tile_slide(path, tmp_path / "fast", TileParams(**params))
    slow = tile_slide(path, tmp_path / "slow", TileParams(**params, lowres_min_pixels=10**6))
    assert slow.ruled_out_lowres == 0 and slow.decoded == slow.grid
    assert fast.kept == slow.kept
    assert _sha(tmp_path / "fast" / "images.npy") == _sha(tmp_path / "slow" / "images.npy")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "fast" / "index.csv"),
                                  pd.read_csv(tmp_path / "slow" / "index.csv"))
    return fast


def test_single_level_slides_rule_out_background_from_jpeg_probes(tmp_path):
    path = write_pyramid(tmp_path / "flat.tif", tissue_image(2048, 1024, tissue=(0.6, 0.9)), levels=1, tile=256)
    fast = _same_with_and_without_prefilter(path, tmp_path, size=128)
    assert fast.ruled_out_lowres > 0 and fast.decoded < fast.grid


def test_jpeg_probe_prefilter_on_a_level_too_large_for_one_eighth(tmp_path, monkeypatch):
    from functools import partialmethod

    from histosynth.io.slides import Slide

    monkeypatch.setattr(Slide, "jpeg_overview", partialmethod(Slide.jpeg_overview, max_pixels=2000))
    path = write_pyramid(tmp_path / "flat.tif", tissue_image(2048, 1024, tissue=(0.6, 0.9)), levels=1, tile=256)
    fast = _same_with_and_without_prefilter(path, tmp_path, size=256)  # the overview is 1/64: 4 px a tile side
    assert fast.ruled_out_lowres > 0


def test_jpeg_probe_prefilter_is_exact_on_pale_demo_tissue(tmp_path):
    """The demo's pale stain, re-saved as one level so that only the JPEG probe can rule out background."""
    from histosynth.slides.demo import make_demo_slides

    make_demo_slides(tmp_path / "demo", n_slides=1, size=(2048, 2048), seed=5)  # slide 0: pale stain
    with open_slide(tmp_path / "demo" / "demo-000.tif") as slide:
        level0 = slide.read_level(0)
    path = write_pyramid(tmp_path / "pale.tif", level0, levels=1, tile=256)
    for size in (128, 64):
        fast = _same_with_and_without_prefilter(path, tmp_path / str(size), size=size)
        assert fast.ruled_out_lowres > 0


@pytest.mark.parametrize("levels", [2, 1])  # 1: the pre-filter's JPEG probes run on the threads too
def test_threads_give_the_same_output(tmp_path, levels):
    path = write_pyramid(tmp_path / "s.tif", tissue_image(1500, 1100, tissue=(0.3, 1.0)), levels=levels, tile=128)
    p = TileParams(size=100, target_mpp=0.25)
    one = tile_slide(path, tmp_path / "one", p, threads=1)
    two = tile_slide(path, tmp_path / "two", p, threads=2)
    assert one.kept == two.kept > 0 and one.ruled_out_lowres == two.ruled_out_lowres > 0
    for name in ("images.npy", "index.csv"):
        assert _sha(tmp_path / "one" / name) == _sha(tmp_path / "two" / name)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(1, 40),
    threshold=st.integers(0, 255),
    inside=st.one_of(st.none(), st.tuples(st.integers(0, 40), st.integers(0, 40))),
)
def test_background_pixels_counts_grey_above_threshold(seed, size, threshold, inside):
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    bg = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) > threshold
    if inside is not None:
        inside = (min(inside[0], size), min(inside[1], size))
        bg[inside[0] :, :] = True  # past the slide edge: background
        bg[:, inside[1] :] = True
    assert tiling._background_pixels(rgb, threshold, inside) == int(bg.sum())


def test_tile_larger_than_slide(slide_path, tmp_path):
    with pytest.raises(HistosynthError, match="more than the slide"):
        tile_slide(slide_path, tmp_path / "t", TileParams(size=512, target_mpp=1.0))
    assert not (tmp_path / "t").exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_way_leaves_nothing(slide_path, tmp_path, monkeypatch):
    real = tiling.read_tile
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise HistosynthError("simulated corrupt tile")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "read_tile", flaky)
    with pytest.raises(HistosynthError, match="simulated"):
        tile_slide(slide_path, tmp_path / "t", TileParams(size=128, target_mpp=0.5, max_background=1.0))
    assert list(tmp_path.iterdir()) == []


def test_a_tile_that_fails_to_decode_in_a_worker_stops_the_run(tmp_path, monkeypatch):
    from histosynth.io import slides

    path = write_pyramid(tmp_path / "s.tif", tissue_image(1500, 1100, tissue=(0.3, 1.0)), levels=1, tile=128)
    real = slides._TiffLevel._decode

    def flaky(self, index):
        if index == 20:
            raise HistosynthError("corrupt slide: simulated", self.path)
        return real(self, index)

    monkeypatch.setattr(slides._TiffLevel, "_decode", flaky)
    with pytest.raises(HistosynthError, match="simulated"):
        tile_slide(path, tmp_path / "out" / "t", TileParams(size=100), threads=2)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_params():
    for bad in (
        TileParams(size=4),
        TileParams(stride=0),
        TileParams(target_mpp=0),
        TileParams(max_background=1.5),
        TileParams(edge="wrap"),
        TileParams(regions=[(0, 0, 0, 10)]),
    ):
        with pytest.raises(HistosynthError):
            bad.check()


def test_real_svs_tiles(tmp_path):
    path = shared_file("wsi", "CMU-1-Small-Region.svs")
    stats = tile_slide(path, tmp_path / "t", TileParams(size=256))
    ps = read_patchset(tmp_path / "t")
    assert stats.grid == 9 * 12 and 0 < stats.kept == len(ps) < stats.grid
    assert np.allclose(ps.index["mpp"], 0.499)
    with open_slide(path) as slide:
        for i in (0, len(ps) // 2):
            row = ps.index.iloc[i]
            if not row["padded"]:
                ref = slide.read_region(int(row["x"]), int(row["y"]), 0, 256, 256)
                assert np.array_equal(ps.images[i], ref)
    # single level: background is ruled out from 1/8-scale JPEG probes, without changing anything
    for size in (256, 128):
        fast = _same_with_and_without_prefilter(path, tmp_path / str(size), size=size)
        assert fast.ruled_out_lowres > 0


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(300, 2000),
    height=st.integers(300, 2000),
    size=st.sampled_from([64, 100, 128]),
    mpp=st.sampled_from([0.25, 0.3, 0.5, 0.73]),
    stride=st.one_of(st.none(), st.integers(20, 150)),
)
def test_grid_covers_the_slide(width, height, size, mpp, stride):
    """Property: every level-0 pixel lies in some tile; origins are inside the slide and unique."""
    from histosynth.io.slides import LevelInfo, Slide

    slide = Slide.__new__(Slide)
    slide.levels = [LevelInfo(width, height, 1.0)]
    slide.mpp_x = slide.mpp_y = 0.25
    slide.path = "synthetic"
    params = TileParams(size=size, target_mpp=mpp, stride=stride)
    try:
        plan = plan_tiles(slide, params)
    except HistosynthError:
        assert size * mpp / 0.25 > min(width, height)
        return
    xs = sorted({t.x for t in plan.grid})
    ys = sorted({t.y for t in plan.grid})
    assert xs[0] == 0 and ys[0] == 0
    assert xs[-1] < width and ys[-1] < height
    if stride is None or stride <= size:  # no gaps between tiles, none at the end
        assert xs[-1] + plan.footprint >= width - 1 and ys[-1] + plan.footprint >= height - 1
        assert max(np.diff(xs), default=0) <= plan.footprint + 1
        assert max(np.diff(ys), default=0) <= plan.footprint + 1
    assert len({(t.x, t.y) for t in plan.grid}) == len(plan.grid)
    for t in plan.grid:
        assert t.padded == (t.x + plan.footprint > width + 1e-6 or t.y + plan.footprint > height + 1e-6)


def test_regions_from_annotations_group_separate_areas(tmp_path):
    """Two annotated areas far apart give two regions; the space between them is not tiled."""
    import json

    from histosynth.slides.tiling import annotation_regions

    def square(x, y):
        return {"type": "Feature", "properties": {"classification": {"name": "n"}},
                "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + 10, y], [x + 10, y + 10], [x, y + 10], [x, y]]]}}

    feats = [square(100 + 20 * i, 100) for i in range(5)] + [square(3000 + 15 * i, 2500) for i in range(3)]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    regions = annotation_regions(path, cell=512)
    assert sorted(regions) == [(100, 100, 90, 10), (3000, 2500, 40, 10)]
    empty = tmp_path / "e.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(HistosynthError, match="no annotations"):
        annotation_regions(empty)
