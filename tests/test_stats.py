"""fit-stats: per-nucleus features, count fits and AIC, area rescaling, NN distances, g(r), stats.json."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import stats as sps
from skimage.measure import regionprops

from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter
from histosynth.masks.counts import count_cdf_table, count_logpmf, count_ppf, fit_counts, scale_counts
from histosynth.masks.features import nucleus_features, orientation_alignment, shape_moments, touching
from histosynth.masks.spatial import PairCorrelation, default_r_edges, nn_distances
from histosynth.masks.stats import fit_stats
from histosynth.masks.statsfile import load_stats

CLASSES = {1: "Epithelial", 2: "Lymphocyte"}


# --------------------------------------------------------------------------- toy patch sets
def toy_masks(rng: np.random.Generator, size: int, n_per_type: dict[int, int], mode: str = "uniform",
              radius: dict[int, tuple[float, float]] | None = None, gap: int = 0,
              elongation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One non-overlapping mask of ellipses: ``mode`` uniform, or clustered (type 1 around 2 parents)."""
    radius = radius or {1: (4.5, 6.5), 2: (3.0, 4.0), 3: (3.0, 4.0)}
    inst = np.zeros((size, size), np.int32)
    typ = np.zeros((size, size), np.uint8)
    parents = rng.uniform(0.2 * size, 0.8 * size, (2, 2))
    nid = 0
    for t, n in n_per_type.items():
        for _ in range(n):
            for _try in range(200):
                if mode == "clustered" and t == 1:
                    cy, cx = parents[rng.integers(2)] + rng.normal(0, size / 12, 2)
                else:
                    cy, cx = rng.uniform(0, size, 2)
                r = rng.uniform(*radius[t])
                one = np.zeros((size, size), np.uint8)
                cv2.ellipse(one, (int(round(cx)), int(round(cy))), (int(round(r * elongation)), int(round(r))),
                            float(rng.uniform(0, 180)), 0, 360, 1, -1)
                if not one.any():
                    continue
                grown = cv2.dilate(one, np.ones((2 * gap + 1, 2 * gap + 1), np.uint8)) if gap else one
                if np.any(inst[grown > 0]):
                    continue
                nid += 1
                inst[one > 0] = nid
                typ[one > 0] = t
                break
    return inst, typ


def write_toy(path: Path, n_patches: int = 20, size: int = 128, seed: int = 0, mode: str = "uniform",
              counts: dict[int, tuple[int, int]] | None = None, classes: dict[int, str] | None = CLASSES,
              mpp: float = 0.5, **kw) -> Path:
    """A typed patch set of toy masks (counts per type uniform on the given ranges), with report.json classes."""
    rng = np.random.default_rng(seed)
    counts = counts or {1: (8, 14), 2: (4, 9)}
    cols = {t: "n_" + name.lower() for t, name in (classes or {1: "nucleus"}).items()}
    with PatchSetWriter(path, ("inst", "types"), (size, size), extra_columns=tuple(cols.values())) as w:
        for i in range(n_patches):
            n = {t: int(rng.integers(lo, hi + 1)) for t, (lo, hi) in counts.items()}
            inst, typ = toy_masks(rng, size, n, mode=mode, **kw)
            row = {"slide": "toy", "x": i * size, "y": 0, "level": 0, "downsample": 1.0, "mpp": mpp,
                   "width": size, "height": size, "tissue_fraction": 1.0, "n_nuclei": int(inst.max()),
                   "source": "toy"}
            for t, c in cols.items():
                row[c] = int(len(np.unique(inst[typ == t])))
            w.add(row, inst=inst, types=typ)
        if classes:
            w.report = {"stage": "toy", "classes": {c: t for t, c in cols.items()}}
    return path


def _no_nan(text: str) -> dict:
    def bad(c):
        raise AssertionError(f"{c} in JSON")

    return json.loads(text, parse_constant=bad)


# --------------------------------------------------------------------------- per-nucleus features
def test_nucleus_features_equal_regionprops():
    rng = np.random.default_rng(3)
    inst, typ = toy_masks(rng, 96, {1: 12, 2: 8}, elongation=1.8)
    f = nucleus_features(inst, typ, full=True)
    props = regionprops(inst)
    assert list(f["label"]) == [p.label for p in props]
    for i, p in enumerate(props):
        assert f["area"][i] == p.area
        assert f["cy"][i] == pytest.approx(p.centroid[0]) and f["cx"][i] == pytest.approx(p.centroid[1])
        assert f["eccentricity"][i] == pytest.approx(p.eccentricity, abs=1e-9)
        assert f["orientation"][i] == pytest.approx(p.orientation, abs=1e-9)
        assert f["major_axis"][i] == pytest.approx(p.axis_major_length, rel=1e-9)
        assert f["minor_axis"][i] == pytest.approx(p.axis_minor_length, rel=1e-9, abs=1e-9)
        assert f["perimeter"][i] == pytest.approx(p.perimeter)
        assert f["solidity"][i] == pytest.approx(p.solidity)
        assert f["type"][i] == typ[p.coords[0, 0], p.coords[0, 1]]
        r0, c0, r1, c1 = p.bbox
        assert f["border"][i] == (r0 < 1 or c0 < 1 or r1 > 95 or c1 > 95)


def test_known_small_mask_counts_and_areas():
    inst = np.zeros((20, 20), np.int32)
    typ = np.zeros((20, 20), np.uint8)
    inst[2:5, 2:5], typ[2:5, 2:5] = 1, 1  # 9 px
    inst[10:12, 3:7], typ[10:12, 3:7] = 3, 2  # 8 px; id 2 missing (gaps allowed)
    inst[15:20, 15:17], typ[15:20, 15:17] = 4, 2  # touches the bottom edge
    typ[15, 15] = 1  # a minority pixel does not change the majority type
    f = nucleus_features(inst, typ)
    assert list(f["label"]) == [1, 3, 4]
    assert list(f["area"]) == [9, 8, 10]
    assert list(f["type"]) == [1, 2, 2]
    assert list(f["border"]) == [False, False, True]
    assert (f["cy"][0], f["cx"][0]) == (3.0, 3.0)
    assert f["eccentricity"][0] == pytest.approx(0.0)
    assert list(touching(inst)) == []
    inst[5, 2:5] = 5
    assert list(touching(inst)) == [1, 5]


def test_shape_moments_match_nucleus_features():
    rng = np.random.default_rng(5)
    inst, _ = toy_masks(rng, 64, {1: 1}, elongation=2.0)
    m = shape_moments((inst > 0)[None])
    f = nucleus_features(inst)
    for key in ("area", "cy", "cx", "orientation", "eccentricity"):
        assert m[key][0] == pytest.approx(f[key][0], abs=1e-9)


def test_orientation_alignment_of_aligned_and_random_nuclei():
    rng = np.random.default_rng(0)
    patch = np.repeat(np.arange(30), 10)
    aligned = (rng.uniform(-np.pi / 2, np.pi / 2, 30)[patch] + rng.normal(0, 0.1, 300) + np.pi / 2) % np.pi - np.pi / 2
    means, devs = orientation_alignment(aligned, patch)
    assert len(means) == 30 and np.mean(np.cos(2 * devs)) > 0.9
    _, devs = orientation_alignment(rng.uniform(-np.pi / 2, np.pi / 2, 300), patch)
    assert np.mean(np.cos(2 * devs)) < 0.5


# --------------------------------------------------------------------------- count fits
U = (np.arange(2000) + 0.5) / 2000  # quantile-constructed samples: exact, no sampling luck


@pytest.mark.parametrize("x, family", [
    (sps.poisson(4).ppf(U), "poisson"),
    (sps.nbinom(1.5, 1.5 / 16.5).ppf(U), "nbinom"),
    (np.round(sps.norm(120, 15).ppf(U)), "normal"),
    (np.round(sps.gamma(2, scale=60).ppf(U)), "gamma"),
], ids=["poisson", "nbinom", "normal", "gamma"])
def test_aic_picks_the_right_family(x, family):
    fit = fit_counts(x)
    assert fit["family"] == family
    assert set(fit["candidates"]) == {"normal", "gamma", "poisson", "nbinom"}
    for cand in fit["candidates"].values():
        assert math.isfinite(cand["aic"]) and math.isfinite(cand["loglik"])


def test_fits_recover_known_parameters():
    rng = np.random.default_rng(0)
    pois = fit_counts(rng.poisson(7.0, 3000))["candidates"]["poisson"]["params"]
    assert pois["lam"] == pytest.approx(7.0, rel=0.03)
    nb = fit_counts(sps.nbinom(3.0, 3.0 / 23.0).rvs(3000, random_state=rng))["candidates"]["nbinom"]["params"]
    assert nb["mean"] == pytest.approx(20.0, rel=0.05) and nb["size"] == pytest.approx(3.0, rel=0.12)
    gam = fit_counts(np.round(rng.gamma(3.0, 20.0, 3000)))["candidates"]["gamma"]["params"]
    assert gam["shape"] == pytest.approx(3.0, rel=0.1) and gam["scale"] == pytest.approx(20.0, rel=0.1)
    nor = fit_counts(np.round(rng.normal(130.2, 21.34, 3000)))["candidates"]["normal"]["params"]
    assert nor["mean"] == pytest.approx(130.2, rel=0.02) and nor["sd"] == pytest.approx(21.34, rel=0.05)


@pytest.mark.parametrize("x, value", [([5, 5, 5, 5], 5.0), ([0, 0, 0], 0.0), ([7], 7.0), ([], 0.0)],
                         ids=["all-equal", "all-zero", "one-patch", "none"])
def test_degenerate_counts_are_a_point_mass(x, value):
    fit = fit_counts(x)
    assert fit["family"] == "point" and fit["params"]["value"] == value and fit["candidates"] == {}
    _no_nan(json.dumps(fit))
    assert np.all(count_ppf(fit, np.linspace(0.01, 0.99, 9)) == int(value))


def test_bad_counts_raise():
    with pytest.raises(ValueError):
        fit_counts([1, -2, 3])
    with pytest.raises(ValueError):
        fit_counts([1.5, 2])


def test_ppf_draws_follow_the_pmf():
    rng = np.random.default_rng(1)
    for fam, params in [("poisson", {"lam": 6.0}), ("nbinom", {"mean": 12.0, "size": 2.0}),
                        ("normal", {"mean": 40.0, "sd": 6.0}), ("gamma", {"shape": 2.0, "scale": 10.0})]:
        fit = {"family": fam, "params": params}
        table = count_cdf_table(fit)
        draws = count_ppf(fit, rng.random(20000), table)
        k = np.arange(len(table))
        pmf = np.exp(count_logpmf(fam, params, k))
        assert pmf.sum() == pytest.approx(1.0, abs=1e-6)
        assert draws.mean() == pytest.approx((k * pmf).sum(), rel=0.03)
    # a non-integer point mass keeps its mean by stochastic rounding
    draws = count_ppf({"family": "point", "params": {"value": 2.25}}, rng.random(20000))
    assert set(np.unique(draws)) == {2, 3} and draws.mean() == pytest.approx(2.25, abs=0.02)


def test_scale_counts_by_area_not_side():
    """The seed's mistake: a 1000 px fit rescaled to 350 px by 0.35; counts scale with area, 0.1225."""
    a = (350 / 1000) ** 2
    x = np.round(sps.norm(130.2, 21.34).ppf(U))
    fit = fit_counts(x)
    for fam, cand in fit["candidates"].items():
        mean, var = fit_counts_moments(fam, cand["params"])
        scaled = scale_counts({"family": fam, "params": cand["params"]}, a)
        m2, v2 = fit_counts_moments(fam, scaled["params"])
        assert m2 == pytest.approx(a * mean, rel=1e-9), fam
        assert m2 != pytest.approx(0.35 * mean, rel=0.01)
        if fam == "poisson":
            assert v2 == pytest.approx(m2)
        elif fam == "nbinom":
            assert scaled["params"]["size"] == cand["params"]["size"]
            assert v2 == pytest.approx(a * mean + a * a * (var - mean), rel=1e-9)
        else:  # over-dispersed (var 455 > mean 130): Poisson part x a, extra part x a^2
            assert v2 == pytest.approx(a * mean + a * a * (var - mean), rel=1e-6)
    assert scale_counts(fit, a)["mean"] == pytest.approx(45.57 * 0.35, rel=0.01)  # not the seed's 45.57
    # under-dispersed: variance scales linearly
    under = scale_counts({"family": "normal", "params": {"mean": 100.0, "sd": 5.0}}, 0.25)
    assert under["mean"] == 25.0 and under["var"] == pytest.approx(25.0 * 0.25)
    point = scale_counts({"family": "point", "params": {"value": 8.0}, "candidates": {}}, 0.5)
    assert point["params"]["value"] == 4.0
    with pytest.raises(ValueError):
        scale_counts(fit, 0)


def fit_counts_moments(fam, params):
    from histosynth.masks.counts import _moments

    return _moments(fam, params)


# --------------------------------------------------------------------------- spatial statistics
def test_nn_distances_of_a_regular_grid():
    yy, xx = np.mgrid[5:100:10, 5:100:10]
    pts = np.column_stack([yy.ravel(), xx.ravel()]).astype(float)
    d = nn_distances(pts)
    assert len(d) == 100 and np.allclose(d, 10.0)
    assert len(nn_distances(pts[:1])) == 0


def _poisson_g(n_patches=300, n=60, size=128, hard_core=0.0, seed=0):
    rng = np.random.default_rng(seed)
    pc = PairCorrelation([1, 2], default_r_edges((size, size)))
    for _ in range(n_patches):
        pts = []
        for _try in range(20 * n):
            p = rng.uniform(0, size, 2)
            if hard_core and pts and np.min(np.hypot(*(np.asarray(pts) - p).T)) < hard_core:
                continue
            pts.append(p)
            if len(pts) == n:
                break
        pts = np.asarray(pts)
        pc.add(pts, rng.integers(1, 3, len(pts)), (size, size))
    g, pairs = pc.result()
    r = 0.5 * (pc.r_edges[1:] + pc.r_edges[:-1])
    return r, g, pairs


def test_g_of_a_poisson_process_is_one():
    r, g, pairs = _poisson_g()
    for key in ("1-1", "1-2", "2-2", "all-all"):
        sel = r > 4
        assert abs(np.mean(g[key][sel]) - 1.0) < 0.05, key
        assert np.all(np.abs(g[key][r > 10] - 1.0) < 0.3), key
    assert pairs["all-all"].sum() > 0


def test_g_of_a_hard_core_process_is_below_one_at_small_r():
    r, g, _ = _poisson_g(n_patches=120, n=40, hard_core=8.0)
    assert np.all(g["all-all"][r < 7] < 0.05)
    assert abs(np.mean(g["all-all"][r > 20]) - 1.0) < 0.1


# --------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    a = write_toy(d / "a", n_patches=12, seed=1, mode="clustered")
    b = write_toy(d / "b", n_patches=12, seed=2, mode="clustered")
    return a, b


@pytest.fixture(scope="module")
def toy_stats(toy_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats-out")
    names = {1: "Epithelial", 2: "Lymphocyte", 3: "Spindle"}  # Spindle never occurs
    stats = fit_stats(list(toy_sets), out, class_names=names, calibrate=1, calibrate_masks=8)
    return out, stats


def test_fit_stats_writes_everything_the_sampler_needs(toy_stats):
    out, stats = toy_stats
    for name in ("stats.json", "counts.png", "morphology.png", "spatial.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    text = (out / "stats.json").read_text()
    data = _no_nan(text)
    assert len(text) < 3_000_000
    assert data == load_stats(out / "stats.json") == load_stats(out)
    assert data["classes"] == {"1": "Epithelial", "2": "Lymphocyte", "3": "Spindle"}
    assert data["mpp"] == 0.5 and data["patch_size"] == [128, 128] and data["n_patches"] == 24
    for key in ("total", "1", "2"):
        fit = data["counts"][key]
        assert fit["family"] in fit["candidates"]
        assert min(c["aic"] for c in fit["candidates"].values()) == fit["candidates"][fit["family"]]["aic"]
    # absent type: point mass at 0, no morphology, never present
    assert data["counts"]["3"]["family"] == "point" and data["counts"]["3"]["params"]["value"] == 0
    assert data["morphology"]["3"] == {"n": 0} and data["presence"]["3"] == 0.0
    m1 = data["morphology"]["1"]
    assert m1["n"] > 100 and len(m1["area"]["quantiles"]) == 201
    assert m1["area"]["quantiles"] == sorted(m1["area"]["quantiles"])
    assert 60 < m1["area"]["mean"] < 140  # discs of radius 4.5-6.5
    sp = data["spatial"]
    assert sp["edge_correction"] == "translation" and len(sp["r"]) == len(sp["r_edges"]) - 1
    assert set(sp["g"]) == {"1-1", "1-2", "1-3", "2-2", "2-3", "3-3", "all-all"}
    assert all(v is None for v in sp["g"]["3-3"])  # no pairs: null, not NaN
    assert sp["nn"]["3"] == {"n": 0} and sp["nn"]["all"]["n"] > 100
    assert data["count_copula"]["types"] == [1, 2, 3] and len(data["count_copula"]["corr"]) == 3
    f = data["field"]
    assert f["types"] == [1, 2] and set(f["packing"]) == {"1", "2"} and "calibration" in f


def test_clustered_toy_has_g_above_one(toy_stats):
    _, stats = toy_stats
    r = np.asarray(stats["spatial"]["r"])
    g11 = np.array(stats["spatial"]["g"]["1-1"], float)
    assert np.mean(g11[(r > 12) & (r < 30)]) > 1.5
    assert np.all(g11[r < 5] < 0.1)  # non-overlapping discs: hard core


def test_class_names_come_from_report_json(toy_sets, tmp_path):
    stats = fit_stats([toy_sets[0]], tmp_path, calibrate=0, figures=False)
    assert stats["classes"] == {"1": "epithelial", "2": "lymphocyte"}
    unnamed = write_toy(tmp_path / "unnamed", n_patches=3, classes=None, counts={1: (3, 5)})
    stats = fit_stats([unnamed], tmp_path / "o2", calibrate=0, figures=False)
    assert stats["classes"] == {"1": "type 1"}


def test_degenerate_data_never_crash(tmp_path):
    """Every patch with the same counts, a single patch: point masses, no NaN."""
    ps = write_toy(tmp_path / "same", n_patches=1, counts={1: (3, 3), 2: (0, 0)})
    stats = fit_stats([ps], tmp_path / "out", calibrate=0)
    text = (tmp_path / "out" / "stats.json").read_text()
    _no_nan(text)
    assert stats["counts"]["total"]["family"] == "point" and stats["counts"]["1"]["params"]["value"] == 3
    assert stats["counts"]["2"]["params"]["value"] == 0 and stats["morphology"]["2"] == {"n": 0}


def test_bad_inputs_raise_histosynth_error(toy_sets, tmp_path):
    # a patch set without masks
    with PatchSetWriter(tmp_path / "img", ("images",), (32, 32)) as w:
        w.add({"slide": "s", "x": 0, "y": 0, "level": 0, "downsample": 1, "mpp": 0.5, "width": 32, "height": 32,
               "tissue_fraction": 1, "n_nuclei": 0, "source": "t"}, images=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(HistosynthError, match="inst.npy"):
        fit_stats([tmp_path / "img"], tmp_path / "o")
    # empty
    with PatchSetWriter(tmp_path / "empty", ("inst", "types"), (32, 32)):
        pass
    with pytest.raises(HistosynthError, match="empty"):
        fit_stats([tmp_path / "empty"], tmp_path / "o")
    with pytest.raises(HistosynthError, match="no patch sets"):
        fit_stats([], tmp_path / "o")
    with pytest.raises(HistosynthError, match="not a patch set"):
        fit_stats([tmp_path / "missing"], tmp_path / "o")
    # a type in the masks that the class map lacks
    with pytest.raises(HistosynthError, match="not in the class map"):
        fit_stats([toy_sets[0]], tmp_path / "o", class_names={1: "Epithelial"})
    # nuclei without a type
    with PatchSetWriter(tmp_path / "untyped", ("inst", "types"), (32, 32)) as w:
        inst = np.zeros((32, 32), np.int32)
        inst[4:8, 4:8] = 1
        w.add({"slide": "s", "x": 0, "y": 0, "level": 0, "downsample": 1, "mpp": 0.5, "width": 32, "height": 32,
               "tissue_fraction": 1, "n_nuclei": 1, "source": "t"}, inst=inst, types=np.zeros((32, 32), np.uint8))
    with pytest.raises(HistosynthError, match="no type"):
        fit_stats([tmp_path / "untyped"], tmp_path / "o")
    # patch sets of different sizes or resolutions
    small = write_toy(tmp_path / "small", n_patches=2, size=64)
    with pytest.raises(HistosynthError, match="fit them separately"):
        fit_stats([toy_sets[0], small], tmp_path / "o")
    other = write_toy(tmp_path / "other-mpp", n_patches=2, mpp=0.25)
    with pytest.raises(HistosynthError, match="resolutions"):
        fit_stats([toy_sets[0], other], tmp_path / "o")
    # class maps that disagree between patch sets
    renamed = write_toy(tmp_path / "renamed", n_patches=2, classes={1: "Tumour", 2: "Lymphocyte"})
    with pytest.raises(HistosynthError, match="contradictory class maps"):
        fit_stats([toy_sets[0], renamed], tmp_path / "o")
    assert not (tmp_path / "o" / "stats.json").exists()


def test_load_stats_rejects_bad_files(tmp_path):
    with pytest.raises(HistosynthError, match="no such"):
        load_stats(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HistosynthError, match="JSON"):
        load_stats(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(HistosynthError, match="histosynth-stats"):
        load_stats(tmp_path / "other.json")
    (tmp_path / "partial.json").write_text(json.dumps({"format": "histosynth-stats", "version": 1}))
    with pytest.raises(HistosynthError, match="lacks"):
        load_stats(tmp_path / "partial.json")


def test_cli_fit_stats(toy_sets, tmp_path, capsys):
    from histosynth.cli.masks import register as add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fit-stats", str(toy_sets[0]), str(tmp_path / "out"),
                              "--classes", "Epithelial=1", "Lymphocyte=2", "--calibrate", "0"])
    args.func(args)
    data = load_stats(tmp_path / "out" / "stats.json")
    assert data["classes"] == {"1": "Epithelial", "2": "Lymphocyte"}
