"""sample-masks: shapes, sizes, counts, hard core, clustering, seeds and shards, the patch set and the CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from histosynth.errors import HistosynthError
from histosynth.io.patchset import read_patchset
from histosynth.masks.calibrate import simulate_spatial
from histosynth.masks.features import nucleus_features
from histosynth.masks.sampling import MaskSampler, sample_masks, shard_range, systematic_round
from histosynth.masks.shapes import clean_shapes, ellipse_source, warp_shapes
from histosynth.masks.stats import fit_stats
from histosynth.masks.statsfile import load_stats
from tests.test_stats import write_toy

NAMES = {1: "Epithelial", 2: "Lymphocyte", 3: "Spindle"}


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    d = tmp_path_factory.mktemp("clustered")
    ps = write_toy(d / "real", n_patches=30, seed=11, mode="clustered", counts={1: (14, 22), 2: (5, 10)})
    stats = fit_stats([ps], d / "stats", class_names=NAMES, calibrate=2, calibrate_masks=16, figures=False)
    return ps, stats


@pytest.fixture(scope="module")
def uniform(tmp_path_factory):
    d = tmp_path_factory.mktemp("uniform")
    ps = write_toy(d / "real", n_patches=30, seed=12, mode="uniform", counts={1: (14, 22), 2: (5, 10)})
    stats = fit_stats([ps], d / "stats", class_names=NAMES, calibrate=2, calibrate_masks=16, figures=False)
    return ps, stats


# --------------------------------------------------------------------------- shapes
def test_warp_sets_orientation_and_area():
    rng = np.random.default_rng(0)
    shapes = ellipse_source(None, ecc_range=(0.95, 0.95))(7, None, rng)
    targets = np.array([-1.4, -0.8, -0.3, 0.0, 0.4, 0.9, 1.5])
    areas = np.array([60, 90, 150, 200, 300, 120, 80], float)
    crops = warp_shapes(shapes, areas, targets)
    for crop, want, area in zip(crops, targets, areas):
        assert crop.shape[0] == crop.shape[1] and crop.shape[0] % 2 == 1
        f = nucleus_features(crop.astype(np.int32))
        assert len(f["label"]) == 1
        diff = (f["orientation"][0] - want + np.pi / 2) % np.pi - np.pi / 2
        assert abs(diff) < 0.12, (want, f["orientation"][0])
        assert f["area"][0] == pytest.approx(area, rel=0.12)
        assert f["eccentricity"][0] > 0.85  # the shape's own eccentricity is kept
        c = (crop.shape[0] - 1) / 2
        assert abs(f["cy"][0] - c) < 1.0 and abs(f["cx"][0] - c) < 1.0


def test_warp_stretches_to_a_target_eccentricity():
    rng = np.random.default_rng(2)
    shapes = ellipse_source(None, ecc_range=(0.3, 0.8))(6, None, rng)
    want = np.array([0.2, 0.5, 0.7, 0.85, 0.93, 0.97])
    orient = np.array([0.3, -0.5, 1.0, 0.0, -1.2, 0.7])
    crops = warp_shapes(shapes, np.full(6, 400.0), orient, want)
    for crop, e, th in zip(crops, want, orient):
        f = nucleus_features(crop.astype(np.int32))
        assert f["eccentricity"][0] == pytest.approx(e, abs=0.04)
        assert f["area"][0] == pytest.approx(400, rel=0.08)
        if e > 0.5:
            assert abs((f["orientation"][0] - th + np.pi / 2) % np.pi - np.pi / 2) < 0.1


def test_type_blind_shapes_are_assigned_by_eccentricity(clustered):
    _, stats = clustered
    sampler = MaskSampler(stats, ellipse_source(stats), 64)
    shapes = ellipse_source(None, ecc_range=(0.0, 0.98))(50, None, np.random.default_rng(0))
    target = np.random.default_rng(1).random(50)
    out = sampler.match_eccentricity(shapes, target)
    from histosynth.masks.features import shape_moments

    have = shape_moments(out)["eccentricity"]
    assert np.all(np.diff(have[np.argsort(target)]) >= 0)  # rounder shapes go to rounder targets
    key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
    assert key(out) == key(shapes)  # the same shapes, reassigned


def test_empty_shape_becomes_a_disk_of_the_target_area():
    crops = warp_shapes(np.zeros((1, 64, 64), bool), np.array([113.0]), np.array([0.0]))
    assert crops[0].sum() == pytest.approx(113, rel=0.15)


def test_clean_shapes_keeps_the_largest_component_and_fills_holes():
    s = np.zeros((2, 64, 64), bool)
    s[0, 10:40, 10:40] = True
    s[0, 20:25, 20:25] = False  # a hole
    s[0, 50:55, 50:55] = True  # a speck
    s[1, 5:9, 5:9] = True  # already clean
    out = clean_shapes(s)
    assert out[0].sum() == 900 and not out[0, 50:55, 50:55].any()
    assert np.array_equal(out[1], s[1])


# --------------------------------------------------------------------------- placement
def test_place_never_overlaps(clustered):
    _, stats = clustered
    sampler = MaskSampler(stats, ellipse_source(stats), 96)
    rng = np.random.default_rng(1)
    disk = np.hypot(*np.mgrid[-5:6, -5:6]) <= 5.0
    crops = [disk.copy() for _ in range(60)]
    types = np.array([1] * 40 + [2] * 20)
    cdfs = sampler.draw_field(rng, {1: 40, 2: 20})
    inst, typ = sampler.place(crops, types, cdfs, rng)
    ids = np.unique(inst[inst > 0])
    assert len(ids) + sampler.dropped == 60 and list(ids) == list(range(1, len(ids) + 1))
    f = nucleus_features(inst, typ)
    inner = ~f["border"]
    assert inner.sum() > 10
    # an interior nucleus is exactly its crop: nothing was painted over it
    assert np.all(f["area"][inner] == disk.sum())
    assert set(np.unique(typ[inst > 0])) <= {1, 2} and np.all((typ > 0) == (inst > 0))


def test_sampled_masks_are_valid_and_reproducible(clustered):
    _, stats = clustered
    src = ellipse_source(stats)
    a = sample_masks(stats, src, 40, 128, seed=3)
    b = sample_masks(stats, src, 40, 128, seed=3)
    c = sample_masks(stats, src, 40, 128, seed=4)
    assert np.array_equal(a["inst"], b["inst"]) and np.array_equal(a["types"], b["types"])
    assert not np.array_equal(a["inst"], c["inst"])
    q = stats["morphology"]
    for inst, typ, row in zip(a["inst"], a["types"], a["rows"]):
        f = nucleus_features(inst, typ)
        assert row["n_nuclei"] == len(f["label"]) == inst.max()
        assert row["n_epithelial"] + row["n_lymphocyte"] + row["n_spindle"] == row["n_nuclei"]
        assert row["n_spindle"] == 0  # absent from the data: never placed
        for lab, t, area, border in zip(f["label"], f["type"], f["area"], f["border"]):
            if border:
                continue
            lo, hi = q[str(t)]["area"]["quantiles"][0], q[str(t)]["area"]["quantiles"][-1]
            assert 0.8 * lo <= area <= 1.2 * hi  # sizes within the fitted range
            _, n_comp = ndimage.label(inst == lab)
            assert n_comp == 1  # one piece: never cut by another nucleus


def test_counts_follow_the_fitted_distribution_rescaled_by_area(clustered):
    _, stats = clustered
    src = ellipse_source(stats)
    fit = stats["counts"]["total"]
    full = sample_masks(stats, src, 60, 128, seed=5)
    n = np.array([r["n_nuclei"] for r in full["rows"]])
    assert n.mean() == pytest.approx(fit["mean"], rel=0.12)
    assert n.std() == pytest.approx(np.sqrt(fit["var"]), rel=0.5)
    small = sample_masks(stats, src, 60, 64, seed=5)  # a quarter of the area: a quarter of the nuclei
    n_small = np.array([r["n_nuclei"] for r in small["rows"]])
    assert n_small.mean() == pytest.approx(fit["mean"] / 4, rel=0.2)
    assert small["area_ratio"] == 0.25


def test_shards_differ_and_are_reproducible(clustered, tmp_path):
    _, stats = clustered
    src = ellipse_source(stats)
    assert [shard_range(10, k, 3) for k in range(3)] == [(0, 3), (3, 6), (6, 10)]
    s0 = sample_masks(stats, src, 10, 64, seed=1, shard=0, n_shards=2)
    s1 = sample_masks(stats, src, 10, 64, seed=1, shard=1, n_shards=2)
    s1b = sample_masks(stats, src, 10, 64, seed=1, shard=1, n_shards=2)
    assert len(s0["rows"]) == len(s1["rows"]) == 5
    assert not np.array_equal(s0["inst"], s1["inst"])
    assert np.array_equal(s1["inst"], s1b["inst"])
    assert s1["rows"][0]["source"] == "sample-masks seed 1 shard 1"
    with pytest.raises(HistosynthError, match="shard"):
        sample_masks(stats, src, 10, 64, seed=1, shard=2, n_shards=2)
    with pytest.raises(HistosynthError, match="--n"):
        sample_masks(stats, src, 0, 64, seed=1)


def _g(paths_or_masks, types=(1, 2), size=128):
    from histosynth.masks.spatial import PairCorrelation, default_r_edges

    pc = PairCorrelation(list(types), default_r_edges((size, size)))
    for inst, typ in paths_or_masks:
        f = nucleus_features(inst, typ)
        pc.add(np.column_stack([f["cy"], f["cx"]]), f["type"], (size, size))
    g, _ = pc.result()
    r = 0.5 * (pc.r_edges[1:] + pc.r_edges[:-1])
    return r, g


def test_clustering_is_reproduced_not_uniform(clustered, uniform):
    real_ps, stats = clustered
    real = read_patchset(real_ps)
    r, g_real = _g(zip(real.inst, real.types))
    syn = sample_masks(stats, ellipse_source(stats), 40, 128, seed=0)
    _, g_syn = _g(zip(syn["inst"], syn["types"]))
    band = (r > 12) & (r < 30)
    assert np.mean(g_real["1-1"][band]) > 1.5
    assert np.mean(g_syn["1-1"][band]) > 1.3  # clustered like the real masks ...
    _, stats_u = uniform
    syn_u = sample_masks(stats_u, ellipse_source(stats_u), 40, 128, seed=0)
    _, g_u = _g(zip(syn_u["inst"], syn_u["types"]))
    assert np.mean(g_u["1-1"][band]) < 1.25  # ... and not when the real ones are not
    assert np.mean(g_syn["1-1"][band]) > np.mean(g_u["1-1"][band]) + 0.2
    # the hard core: no two centroids closer than the smallest nuclei allow
    assert np.all(g_syn["all-all"][r < 4] < 0.05)


def test_simulated_spatial_matches_calibration_targets(clustered):
    _, stats = clustered
    sim = simulate_spatial(stats, 16, np.random.default_rng(0))
    real_med = np.median(stats["spatial"]["nn"]["all"]["quantiles"])
    assert np.median(sim["nn"]["all"]) == pytest.approx(real_med, rel=0.2)
    assert 0 <= sim["touching"]["all"] <= 1


# --------------------------------------------------------------------------- the patch set and the CLI
def _parser():
    from histosynth.cli.masks import register as add_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--progress", action="store_true")
    add_cli(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_a_mask_patch_set(clustered, tmp_path):
    _, stats = clustered
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    out = tmp_path / "masks" / "shard-1"
    args = _parser().parse_args(["sample-masks", str(tmp_path / "stats.json"), "ellipses", str(out),
                                 "--n", "6", "--size", "96", "--seed", "7", "--shard", "1", "--n-shards", "2"])
    args.func(args)
    ps = read_patchset(out, require=("inst", "types"))
    assert ps.images is None and not (out / "images.npy").exists()
    assert ps.inst.shape == (3, 96, 96) and ps.types.dtype == np.uint8
    idx = ps.index
    assert set(idx["slide"]) == {"synthetic"} and set(idx["x"]) == {0} and set(idx["y"]) == {0}
    assert set(idx["width"]) == {96} and set(idx["mpp"]) == {stats["mpp"]}
    assert set(idx["source"]) == {"sample-masks seed 7 shard 1"}
    assert {"n_epithelial", "n_lymphocyte", "n_spindle"} <= set(idx.columns)
    assert list(idx["n_nuclei"]) == [int(m.max()) for m in ps.inst]
    rep = ps.report
    assert rep["classes"] == {"1": "Epithelial", "2": "Lymphocyte", "3": "Spindle"}
    assert rep["shape_source"] == "ellipses" and rep["masks"] == 3 and set(rep["timings"]) >= {"decode", "placement"}


def test_cli_bad_inputs(clustered, tmp_path):
    _, stats = clustered
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    parser = _parser()
    for argv, msg in [
        (["sample-masks", str(tmp_path / "nope.json"), "ellipses", str(tmp_path / "o"), "--n", "2"], "no such"),
        (["sample-masks", str(tmp_path / "stats.json"), str(tmp_path / "missing.pt"), str(tmp_path / "o"),
          "--n", "2"], "no such"),
        (["sample-masks", str(tmp_path / "stats.json"), "ellipses", str(tmp_path / "o"), "--n", "2",
          "--sigma", "0"], "sigma"),
        (["sample-masks", str(tmp_path / "stats.json"), "ellipses", str(tmp_path / "o"), "--n", "2",
          "--size", "4"], "size"),
    ]:
        args = parser.parse_args(argv)
        with pytest.raises(HistosynthError, match=msg):
            args.func(args)
    assert not (tmp_path / "o").exists()


def test_cli_with_a_dvae_checkpoint(clustered, tmp_path):
    dvae = pytest.importorskip("histosynth.models.dvae")
    torch = pytest.importorskip("torch")
    _, stats = clustered
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    torch.manual_seed(0)
    model = dvae.define_dvae(classes={1: "Epithelial", 2: "Lymphocyte", 3: "Spindle"})
    torch.save(dvae.checkpoint_dict(model), tmp_path / "dvae.pt")
    outs = []
    for k in range(2):
        out = tmp_path / f"m{k}"
        args = _parser().parse_args(["sample-masks", str(tmp_path / "stats.json"), str(tmp_path / "dvae.pt"),
                                     str(out), "--n", "3", "--size", "64", "--seed", "2", "--threads", "1"])
        args.func(args)
        outs.append(read_patchset(out, require=("inst", "types")))
    assert outs[0].report["shape_source"] == "dvae" and outs[0].report["sigma"] == 0.5
    assert np.array_equal(outs[0].inst, outs[1].inst)  # same seed, same masks on the CPU
    assert all(m.max() > 0 for m in outs[0].inst)


def test_stats_round_trip_through_json(clustered, tmp_path):
    _, stats = clustered
    (tmp_path / "s.json").write_text(json.dumps(stats))
    loaded = load_stats(tmp_path / "s.json")
    a = sample_masks(loaded, ellipse_source(loaded), 3, 64, seed=9)
    b = sample_masks(stats, ellipse_source(stats), 3, 64, seed=9)
    assert np.array_equal(a["inst"], b["inst"])


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_fast_decoder_equals_sample_shapes(conditional):
    dvae = pytest.importorskip("histosynth.models.dvae")
    torch = pytest.importorskip("torch")
    from histosynth.masks.shapes import FastDecoder, dvae_source

    torch.manual_seed(0)
    kw = {"type_ids": (1, 2)} if conditional else {}
    model = dvae.define_dvae(classes={1: "a", 2: "b"}, **kw)
    for mod in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    assert FastDecoder.build(model) is not None
    types = np.array([1, 2] * 20)
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    fast = dvae_source(model, 0.5)(40, types, rng_a)
    slow = dvae_source(model, 0.5, fast=False)(40, types, rng_b)
    seed = int(np.random.default_rng(4).integers(0, 2**31 - 1))
    ref = dvae.sample_shapes(model, 40, types if conditional else None, sigma=0.5, seed=seed)
    assert np.array_equal(slow, ref)
    assert fast.shape == (40, 64, 64) and np.mean(fast != ref) < 1e-3  # float rounding at the threshold only


def test_degenerate_stats_and_empty_masks(tmp_path):
    one = write_toy(tmp_path / "one", n_patches=1, counts={1: (6, 6), 2: (0, 0)})
    stats = fit_stats([one], tmp_path / "s", calibrate=0, figures=False)
    assert stats["counts"]["total"]["family"] == "point"
    rep = sample_masks(stats, ellipse_source(stats), 4, 128, seed=0)
    assert [r["n_nuclei"] for r in rep["rows"]] == [6] * 4 and all(r["n_lymphocyte"] == 0 for r in rep["rows"])
    empty = {**stats, "counts": {k: {**v, "params": {"value": 0.0}, "mean": 0.0} for k, v in stats["counts"].items()}}
    rep = sample_masks(empty, ellipse_source(empty), 2, 64, seed=0, out_dir=tmp_path / "empty")
    ps = read_patchset(tmp_path / "empty", require=("inst", "types"))
    assert ps.inst.shape == (2, 64, 64) and ps.inst.max() == 0 and list(ps.index["n_nuclei"]) == [0, 0]


def test_gauss_field_matches_the_grid_for_narrow_kernels():
    """Regression: a field whose kernel is under 3 grid cells (small patches, MoNuSeg at 128 px) has the grid's shape."""
    from histosynth.masks.sampling import MaskSampler

    sampler = MaskSampler.__new__(MaskSampler)
    sampler.grid = 36
    sampler._smooth = lambda x, sd: x
    rng = np.random.default_rng(0)
    for sd in (0.5, 1.0, 2.9, 3.0, 7.5):
        assert sampler._gauss_field(rng, np.ones((1, 1)), sd).shape == (1, 36, 36)


def test_empty_decoded_shapes_are_counted_and_warned_of(clustered, caplog):
    """A shape model that decodes nothing still yields masks (disks), but the report counts them and warns."""
    import logging

    _, stats = clustered
    src = ellipse_source(stats)

    def empty_source(n, types, rng):
        shapes = src(n, types, rng)
        shapes[::2] = False  # every other shape decodes empty
        return shapes

    with caplog.at_level(logging.WARNING, logger="histosynth.masks.sampling"):
        report = sample_masks(stats, empty_source, 10, 128, seed=1)
    assert report["nuclei"] > 0 and 0.3 * report["nuclei"] <= report["disks"] <= 0.7 * report["nuclei"]
    assert "under-trained" in caplog.text
    assert sample_masks(stats, src, 10, 128, seed=1)["disks"] == 0


# --------------------------------------------------------------------------- synthesis on request
@settings(deadline=None)
@given(shares=st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_systematic_round_keeps_the_total_and_rounds_each_share_down_or_up(shares, seed):
    counts = systematic_round(np.array(shares), np.random.default_rng(seed))
    assert counts.sum() in (np.floor(sum(shares)), np.ceil(sum(shares)))
    assert all(np.floor(s) - 1e-9 <= c <= np.ceil(s) + 1e-9 for s, c in zip(shares, counts))


def _fractions(result) -> dict[str, float]:
    rows = result["rows"]
    n = sum(r["n_nuclei"] for r in rows)
    return {name: sum(r[f"n_{name.lower()}"] for r in rows) / n for name in ("Epithelial", "Lymphocyte")}


@pytest.mark.parametrize("key", ["Lymphocyte", "lymphocyte", "2"])
def test_a_requested_type_mix_is_honoured_over_the_sample(clustered, key):
    _, stats = clustered
    src = ellipse_source(stats)
    fitted = sample_masks(stats, src, 60, 128, seed=5)
    asked = sample_masks(stats, src, 60, 128, seed=5, type_mix={key: 0.6})
    assert _fractions(fitted)["Lymphocyte"] < 0.4  # the toy's fitted mix is about a third lymphocytes
    assert _fractions(asked)["Lymphocyte"] == pytest.approx(0.6, abs=0.02)
    assert asked["achieved"]["type_fractions"]["Lymphocyte"] == pytest.approx(_fractions(asked)["Lymphocyte"], abs=1e-5)
    assert asked["request"] == {"type_mix": {"Lymphocyte": 0.6}, "density": 1.0}
    # the rest stays fitted: the number of nuclei per mask
    n_fit = np.mean([r["n_nuclei"] for r in fitted["rows"]])
    assert np.mean([r["n_nuclei"] for r in asked["rows"]]) == pytest.approx(n_fit, rel=0.1)
    assert fitted["request"] == {"type_mix": None, "density": 1.0}


def test_density_scales_the_number_of_nuclei_and_keeps_the_mix(clustered):
    _, stats = clustered
    src = ellipse_source(stats)
    fitted = sample_masks(stats, src, 40, 128, seed=6)
    dense = sample_masks(stats, src, 40, 128, seed=6, density=1.5)
    assert dense["achieved"]["nuclei_per_mask"] == pytest.approx(1.5 * fitted["achieved"]["nuclei_per_mask"],
                                                                 rel=0.1)
    assert _fractions(dense)["Lymphocyte"] == pytest.approx(_fractions(fitted)["Lymphocyte"], abs=0.05)
    sparse = sample_masks(stats, src, 40, 128, seed=6, density=0.5, type_mix={"Epithelial": 1.0})
    assert _fractions(sparse)["Epithelial"] == 1.0
    assert sparse["achieved"]["nuclei_per_mask"] == pytest.approx(0.5 * fitted["achieved"]["nuclei_per_mask"],
                                                                  rel=0.15)


@pytest.mark.parametrize("type_mix, density, msg", [
    ({"Macrophage": 0.2}, 1.0, "not a class of the statistics"),
    ({"Lymphocyte": 1.5}, 1.0, r"in \[0, 1\]"),
    ({"Lymphocyte": 0.7, "Epithelial": 0.6}, 1.0, "sum to 1.3"),
    ({"Lymphocyte": 0.3, "Epithelial": 0.3}, 1.0, "names every type"),
    ({"Spindle": 0.2}, 1.0, "hold none"),
    (None, 0.0, "density must be positive"),
    (None, -1.0, "density must be positive"),
])
def test_bad_requests_stop_before_anything_is_sampled(clustered, tmp_path, type_mix, density, msg):
    _, stats = clustered
    with pytest.raises(HistosynthError, match=msg):
        sample_masks(stats, ellipse_source(stats), 4, 64, seed=0, out_dir=tmp_path / "o", type_mix=type_mix,
                     density=density)
    assert not (tmp_path / "o").exists()


def test_cli_type_mix_and_density(clustered, tmp_path):
    _, stats = clustered
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    base = ["sample-masks", str(tmp_path / "stats.json"), "ellipses"]
    args = _parser().parse_args([*base, str(tmp_path / "m"), "--n", "8", "--size", "96",
                                 "--type-mix", "Lymphocyte=0.5", "--density", "1.2"])
    args.func(args)
    rep = read_patchset(tmp_path / "m", require=("inst", "types")).report
    assert rep["request"] == {"type_mix": {"Lymphocyte": 0.5}, "density": 1.2}
    assert set(rep["achieved"]["type_fractions"]) == {"Epithelial", "Lymphocyte", "Spindle"}
    for bad, msg in (("Lymphocyte", "CLASS=FRACTION"), ("Lymphocyte=half", "must be a number"),
                     ("Macrophage=0.1", "not a class")):
        args = _parser().parse_args([*base, str(tmp_path / "bad"), "--n", "2", "--type-mix", bad])
        with pytest.raises(HistosynthError, match=msg):
            args.func(args)
        assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- the uniform baseline
def test_uniform_method_places_decoded_shapes_uniformly_without_overlap(clustered):
    _, stats = clustered
    # type-aware ellipses of a fixed size: the uniform method must keep them as they are
    src = ellipse_source(None, size=32, ecc_range=(0.6, 0.6))
    uni = sample_masks(stats, src, 40, 128, seed=3, method="uniform")
    fitted = sample_masks(stats, ellipse_source(stats), 40, 128, seed=3)
    assert uni["method"] == "uniform" and "uniform" in uni["placement"] and uni["eccentricity"] == "model"
    n = np.array([r["n_nuclei"] for r in uni["rows"]])
    assert n.mean() == pytest.approx(np.mean([r["n_nuclei"] for r in fitted["rows"]]), rel=0.15)  # fitted counts
    areas, eccs = [], []
    for inst in uni["inst"]:
        f = nucleus_features(inst, border_margin=1)
        areas += f["area"][~f["border"]].tolist()
        eccs += f["eccentricity"][~f["border"]].tolist()
        assert len(np.unique(inst)) - 1 == inst.max()  # ids 1..n, each nucleus one piece (no overlap)
    ellipse_area = np.pi * (0.35 * 32) * (0.35 * 32) * np.sqrt(1 - 0.6 ** 2)
    assert np.median(areas) == pytest.approx(ellipse_area, rel=0.1)  # the decoded size, not the fitted one
    assert np.median(eccs) == pytest.approx(0.6, abs=0.08)
    # no territories: the nuclei spread over the patch more evenly than the clustered fit places them
    def spread(result):
        return np.mean([np.std([(inst == i).nonzero()[0].mean() for i in range(1, inst.max() + 1)])
                        for inst in result["inst"] if inst.max() > 3])
    assert spread(uni) > spread(fitted)


def test_unknown_method_is_an_error(clustered, tmp_path):
    _, stats = clustered
    with pytest.raises(HistosynthError, match="method must be one of"):
        sample_masks(stats, ellipse_source(stats), 2, 64, seed=0, out_dir=tmp_path / "o", method="poisson")
    assert not (tmp_path / "o").exists()
    args = _parser().parse_args(["sample-masks", "s.json", "ellipses", "o", "--method", "uniform"])
    assert args.method == "uniform"


# --------------------------------------------------------------------------- a type the β-VAE never saw
def _partial_dvae(tmp_path, type_ids):
    dvae = pytest.importorskip("histosynth.models.dvae")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = dvae.define_dvae(classes={t: NAMES[t] for t in type_ids}, type_ids=tuple(type_ids), latent_dim=4)
    torch.save(dvae.checkpoint_dict(model), tmp_path / "dvae.pt")
    return tmp_path / "dvae.pt"


def test_a_type_without_library_shapes_is_drawn_as_fitted_ellipses_and_counted(clustered, tmp_path, caplog):
    """The statistics hold types 1 and 2; the conditional β-VAE was trained on type 2 only (every type-1
    nucleus cut by the border or too small for the library): type 1 keeps its nuclei, drawn as ellipses."""
    from histosynth.masks.shapes import build_shape_source

    _, stats = clustered
    path = _partial_dvae(tmp_path, (2,))
    with caplog.at_level("WARNING"):
        source, name, info = build_shape_source(str(path), stats, 0.5)
    assert name == "dvae" and "drawn as fitted ellipses" in caplog.text and "Epithelial (id 1)" in caplog.text
    assert info["shape_fallback"]["types"] == {"Epithelial": stats["morphology"]["1"]["n"]}
    types = np.array([1, 2, 1, 2, 2])
    shapes = source(5, types, np.random.default_rng(0))
    assert shapes.shape == (5, 64, 64) and info["shape_fallback"]["nuclei"] == {"1": 2}
    # the fallback's shapes are the ellipse source's: one filled convex piece each
    for s in shapes[types == 1]:
        assert ndimage.label(s)[1] == 1 and s.sum() > 500
    for method in ("statistical", "uniform"):
        res = sample_masks(stats, source, 6, 128, seed=4, method=method)
        per_type = res["achieved"]["type_fractions"]
        assert per_type["Epithelial"] > 0.2 and per_type["Lymphocyte"] > 0.1  # the fitted mix, both types
        if method == "uniform":  # ellipses scaled to the type's mean area, not drawn at the 64-px frame's size
            areas = [nucleus_features(i, t, border_margin=1) for i, t in zip(res["inst"], res["types"])]
            a1 = np.concatenate([f["area"][(f["type"] == 1) & ~f["border"]] for f in areas])
            assert np.median(a1) == pytest.approx(stats["morphology"]["1"]["area"]["mean"], rel=0.35)


def test_a_beta_vae_without_any_of_the_stats_types_is_an_error(clustered, tmp_path):
    from histosynth.masks.shapes import build_shape_source

    _, stats = clustered
    with pytest.raises(HistosynthError, match="knows type ids \\[3\\], the stats need \\[1, 2\\]"):
        build_shape_source(str(_partial_dvae(tmp_path, (3,))), stats, 0.5)
