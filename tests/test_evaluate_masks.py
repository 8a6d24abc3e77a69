"""evaluate-masks: KS per feature, the pass bar, size handling, class checks, figures, the CLI and DEPAS's
realism measures (t-SNE KS / KL, Fréchet distances, Inception path with a fake network, the real-vs-real floor)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from histosynth.errors import HistosynthError
from histosynth.cli.masks import register as add_cli
from histosynth.masks import realism as rm
from histosynth.masks.evaluate import BARS, evaluate_masks, measure, split_halves
from histosynth.io.labels import class_key
from histosynth.io.patchset import PatchSetWriter
from tests.test_stats import write_toy


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    real = write_toy(d / "real", n_patches=20, seed=1)
    real2 = write_toy(d / "real2", n_patches=20, seed=2)
    big = write_toy(d / "big", n_patches=20, seed=3, radius={1: (8.0, 10.0), 2: (6.0, 7.0)},
                    counts={1: (3, 5), 2: (1, 3)})
    return d, real, real2, big


def test_identical_inputs_give_ks_zero_and_pass(sets, tmp_path):
    _, real, _, _ = sets
    ev = evaluate_masks([real], [real], tmp_path, realism=False)
    for name in BARS:
        f = ev["features"][name]
        assert f["statistic"] == 0.0 and f["pass"] is True and f["n_synthetic"] == f["n_real"] > 0
        assert f["pvalue"] == pytest.approx(1.0)
    assert ev["all_pass"] is True
    assert ev["type_mix"]["total_variation"] == 0.0
    assert all(v["statistic"] == 0.0 for v in ev["type_fractions"].values())
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert data["features"]["count"]["bar"] == 0.1 and data["features"]["eccentricity"]["bar"] == 0.15
    for png in ("histograms.png", "montage.png"):
        assert (tmp_path / png).stat().st_size > 5000


def test_same_process_passes_different_fails(sets, tmp_path):
    _, real, real2, big = sets
    same = evaluate_masks([real2], [real], tmp_path / "same", figures=False, realism=False)
    assert same["features"]["area"]["statistic"] < 0.1
    diff = evaluate_masks([big], [real], tmp_path / "diff", figures=False, realism=False)
    assert not diff["all_pass"]
    for name in ("count", "area", "nn_distance"):
        assert diff["features"][name]["statistic"] > 0.5 and diff["features"][name]["pass"] is False


def test_several_patch_sets_per_side(sets, tmp_path):
    _, real, real2, _ = sets
    ev = evaluate_masks([real, real2], [real2, real], tmp_path, figures=False, realism=False)
    assert ev["n_patches"] == {"synthetic": 40, "real": 40} and ev["all_pass"]


def test_real_patches_larger_are_counted_in_windows(sets, tmp_path):
    _, real, _, _ = sets
    small = write_toy(tmp_path / "small", n_patches=10, size=64, seed=4)
    ev = evaluate_masks([small], [real], tmp_path / "o", figures=False, realism=False)
    assert ev["features"]["count"]["n_real"] == 20 * 4  # each 128 px patch gives four 64 px windows
    assert "windows" in ev["features"]["count"]["note"] and not ev["features"]["count"]["count_rescaled"]
    m = measure([real], count_window=64)
    # a quarter of the nuclei per window, plus those cut by the window edges (counted in both windows)
    quarter = np.mean(m["count"]) / 4
    assert quarter <= np.mean(m["window_count"]) <= 1.4 * quarter


def test_real_patches_smaller_are_rescaled_by_area(sets, tmp_path):
    _, real, _, _ = sets
    small = write_toy(tmp_path / "small", n_patches=10, size=64, seed=4)
    ev = evaluate_masks([real], [small], tmp_path / "o", figures=False, realism=False)
    f = ev["features"]["count"]
    assert f["count_rescaled"] is True and "x 4" in f["note"]  # (128/64)^2, not 2


def _no_masks(path):
    with PatchSetWriter(path, ("images",), (32, 32)) as w:
        w.add({"slide": "s", "x": 0, "y": 0, "level": 0, "downsample": 1, "mpp": 0.5, "width": 32, "height": 32,
               "tissue_fraction": 1, "n_nuclei": 0, "source": "t"}, images=np.zeros((32, 32, 3), np.uint8))
    return path


def _no_nuclei(path):
    with PatchSetWriter(path, ("inst", "types"), (32, 32)) as w:
        w.add({"slide": "s", "x": 0, "y": 0, "level": 0, "downsample": 1, "mpp": 0.5, "width": 32, "height": 32,
               "tissue_fraction": 1, "n_nuclei": 0, "source": "t"}, inst=np.zeros((32, 32), np.int32),
              types=np.zeros((32, 32), np.uint8))
    return path


def _empty(path):
    with PatchSetWriter(path, ("inst", "types"), (32, 32)):
        pass
    return path


@pytest.mark.parametrize("make, message", [
    (_no_masks, "inst.npy"),
    (_no_nuclei, "no nuclei"),
    (_empty, "empty"),
    (lambda p: write_toy(p, n_patches=2, classes={1: "Tumour", 2: "Lymphocyte"}), "mismatched class"),
    (lambda p: write_toy(p, n_patches=2, counts={1: (2, 3), 3: (1, 2)},
                         classes={1: "Epithelial", 3: "Spindle"}), "not in the real class map"),
    (lambda p: write_toy(p, n_patches=2, mpp=0.25), "um/px"),
], ids=["no-masks", "no-nuclei", "empty", "renamed-class", "extra-class", "mpp"])
def test_bad_inputs(sets, tmp_path, make, message):
    _, real, _, _ = sets
    bad = make(tmp_path / "bad")
    with pytest.raises(HistosynthError, match=message):
        evaluate_masks([bad], [real], tmp_path / "out")
    assert not (tmp_path / "out" / "evaluation.json").exists()
    with pytest.raises(HistosynthError, match="no real"):
        evaluate_masks([real], [], tmp_path / "out")


def test_cli(sets, tmp_path):
    _, real, real2, _ = sets
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate-masks", str(real2), str(real), str(tmp_path / "a"), "--no-realism"])
    args.func(args)
    assert json.loads((tmp_path / "a" / "evaluation.json").read_text())["real"] == [str(real)]
    args = parser.parse_args(["evaluate-masks", str(real2), str(tmp_path / "b"), "--real", str(real), str(real2),
                              "--no-realism"])
    args.func(args)
    ev = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert ev["real"] == [str(real), str(real2)] and ev["synthetic"] == [str(real2)]
    args = parser.parse_args(["evaluate-masks", str(real2), str(tmp_path / "c")])
    with pytest.raises(HistosynthError, match="SYNTHETIC REAL OUT_DIR"):
        args.func(args)


def test_masks_sampled_on_request_are_reported_with_the_request(sets, tmp_path):
    from histosynth.masks.sampling import sample_masks
    from histosynth.masks.shapes import ellipse_source
    from histosynth.masks.stats import fit_stats

    _, real, real2, _ = sets
    stats = fit_stats([real], tmp_path / "stats", class_names={1: "Epithelial", 2: "Lymphocyte"}, calibrate=1,
                      calibrate_masks=8, figures=False)
    size = int(np.load(real / "inst.npy", mmap_mode="r").shape[1])
    for name, mix in (("asked", {"Lymphocyte": 0.7}), ("other", {"Lymphocyte": 0.2})):
        sample_masks(stats, ellipse_source(stats), 30, size, seed=1, out_dir=tmp_path / name, type_mix=mix,
                     density=1.5)
    ev = evaluate_masks([tmp_path / "asked"], [real], tmp_path / "ev", figures=False, realism=False)
    request = ev["request"]
    assert (request["type_mix"], request["density"]) == ({"Lymphocyte": 0.7}, 1.5)
    def lymphocytes(fractions):  # the evaluation names classes as the real sets do (here n_lymphocyte)
        return next(v for k, v in fractions.items() if class_key(k) == "lymphocyte")

    assert lymphocytes(request["achieved"]["type_fractions"]) == pytest.approx(0.7, abs=0.03)
    assert lymphocytes(request["real"]["type_fractions"]) < 0.5
    assert request["achieved"]["nuclei_per_patch"] > request["real"]["nuclei_per_patch"]
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["request"] == request
    assert evaluate_masks([real2], [real], tmp_path / "plain", figures=False, realism=False)["request"] is None
    with pytest.raises(HistosynthError, match="different requests"):
        evaluate_masks([tmp_path / "asked", tmp_path / "other"], [real], tmp_path / "mixed", figures=False)
    assert not (tmp_path / "mixed").exists()


def test_ripley_l_is_r_for_complete_randomness_and_above_it_for_clusters():
    from histosynth.masks.spatial import default_r_edges, pair_terms, ripley_l

    rng = np.random.default_rng(0)
    edges = default_r_edges((256, 256))
    poisson = [pair_terms(rng.random((80, 2)) * 256, (256, 256), edges) for _ in range(40)]
    l_poisson = ripley_l(sum(p[0] for p in poisson), sum(p[1] for p in poisson), edges)
    r = edges[1:]
    assert np.abs(l_poisson - r)[r >= 10].max() < 0.06 * r.max()
    parents = [rng.random((6, 2)) * 256 for _ in range(40)]
    clusters = [pair_terms((p[rng.integers(0, 6, 80)] + rng.normal(0, 6, (80, 2))) % 256, (256, 256), edges)
                for p in parents]
    l_clustered = ripley_l(sum(c[0] for c in clusters), sum(c[1] for c in clusters), edges)
    assert (l_clustered - r)[(r >= 5) & (r <= 30)].min() > 5  # clustered: many more neighbours at short range
    assert np.isnan(ripley_l(np.zeros(len(r)), 0.0, edges)).all()


def test_wasserstein_and_ripley_envelope_in_the_evaluation(sets, tmp_path):
    _, real, real2, big = sets
    same = evaluate_masks([real], [real], tmp_path / "same", figures=False, realism=False)
    assert all(v["distance"] == 0.0 for v in same["wasserstein"].values())
    rip = same["ripley"]
    assert rip["synthetic"] == rip["real"] and rip["inside"] >= 0.9 and rip["max_abs_difference"] == 0.0
    assert len(rip["r"]) == len(rip["envelope_low"]) == len(rip["envelope_high"]) and rip["resamples"] == 199
    other = evaluate_masks([real2], [real], tmp_path / "other", figures=False, realism=False)  # the same process, other draw
    diff = evaluate_masks([big], [real], tmp_path / "diff", realism=False)
    assert diff["wasserstein"]["area"]["per_sd"] > 2 * other["wasserstein"]["area"]["per_sd"]
    assert diff["ripley"]["inside"] < other["ripley"]["inside"]
    assert (tmp_path / "diff" / "histograms.png").stat().st_size > 5000



def _pairs(path, touching_pairs: int, apart_pairs: int):
    """Patches of 32 x 32 px holding pairs of 4 x 4 px nuclei (type 1 left, type 2 right): ``touching_pairs``
    patches where the two share an edge, ``apart_pairs`` where a column of background separates them."""
    with PatchSetWriter(path, ("inst", "types"), (32, 32)) as w:
        for i in range(touching_pairs + apart_pairs):
            inst = np.zeros((32, 32), np.int32)
            gap = 0 if i < touching_pairs else 1
            inst[10:14, 10:14] = 1
            inst[10:14, 14 + gap:18 + gap] = 2
            w.add({"slide": "s", "x": 32 * i, "y": 0, "level": 0, "downsample": 1, "mpp": 0.5, "width": 32,
                   "height": 32, "tissue_fraction": 1, "n_nuclei": 2, "source": "t"},
                  inst=inst, types=inst.astype(np.uint8))
    return path


def test_touching_fraction_on_each_side_and_per_type(tmp_path):
    """3 of 4 synthetic patches hold a touching pair, 1 of 4 real ones: 75 % vs 25 % of the nuclei."""
    syn = _pairs(tmp_path / "syn", 3, 1)
    real = _pairs(tmp_path / "real", 1, 3)
    ev = evaluate_masks([syn], [real], tmp_path / "out", figures=False, realism=False)
    t = ev["touching"]
    assert t["synthetic"] == pytest.approx(0.75) and t["real"] == pytest.approx(0.25)
    assert set(t["per_type"]) == {"type 1", "type 2"}
    assert t["per_type"]["type 2"] == {"synthetic": pytest.approx(0.75), "real": pytest.approx(0.25)}
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["touching"]["real"] == pytest.approx(0.25)
    same = evaluate_masks([real], [real], tmp_path / "same", figures=False, realism=False)["touching"]
    assert same["synthetic"] == same["real"] == pytest.approx(0.25)

# --------------------------------------------------------------------------- DEPAS's realism measures
@pytest.fixture(scope="module")
def dense_sparse(tmp_path_factory):
    """Masks crowded with nuclei against masks with a few: clearly different sets (30 patches each)."""
    d = tmp_path_factory.mktemp("realism")
    dense = write_toy(d / "dense", n_patches=30, seed=4, counts={1: (22, 30), 2: (10, 14)})
    sparse = write_toy(d / "sparse", n_patches=30, seed=5, counts={1: (1, 3), 2: (0, 1)})
    return dense, sparse


def _realism(ev):
    r = ev["realism"]
    assert r["skipped"] is None
    return r


def test_realism_maths_of_identical_and_shifted_points():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 2))
    assert rm.ks_2d(a, a) == (0.0, [0.0, 0.0])
    assert rm.kl_2d(a, a) == pytest.approx(0.0, abs=1e-12) and rm.kl_1d(a[:, 0], a[:, 0]) == pytest.approx(0.0)
    assert rm.frechet(a, a) == pytest.approx(0.0, abs=1e-9)
    b = a + [3.0, 0.0]
    assert rm.ks_2d(a, b)[1][0] > 0.8 and rm.kl_2d(a, b) > 1.0 and rm.kl_1d(a[:, 0], b[:, 0]) > 1.0
    assert rm.frechet(a, b) == pytest.approx(9.0, rel=0.05)  # the mean shift squared, same covariances
    # identical vectors sit on the same spot of a t-SNE map; too few points per side is a reason, not a crash
    emb = rm.embed_2d(np.concatenate([a, a]), "tsne", seed=0)
    assert np.array_equal(emb[:200], emb[200:])
    out, pts = rm.compare(a[:4], a[:30])
    assert out["ks_2d"] is None and "at least 5" in out["skipped"] and pts == {} and out["frechet"] is not None


def test_realism_identical_sets_are_zero_different_sets_larger(sets, dense_sparse, tmp_path):
    _, real, _, _ = sets
    dense, sparse = dense_sparse
    same = _realism(evaluate_masks([real], [real], tmp_path / "same", inception=False))
    area = same["area"]
    assert area["ks_2d"] == 0.0 and area["kl_2d"] == pytest.approx(0.0, abs=1e-9)
    assert area["frechet_pca16"] == pytest.approx(0.0, abs=1e-6)
    assert area["embedding"] == same["settings"]["embedding"] == "tsne" and area["n_real"] == 20
    assert same["inception"]["fid"] is None and "disabled" in same["inception"]["skipped"]
    assert same["floor_split"]["how"] == "by mask (one slide)" and same["floor_split"]["n_a"] == 10
    assert area["floor"]["ks_2d"] is not None and area["floor"]["frechet_pca16"] > 0
    assert (tmp_path / "same" / "realism.png").stat().st_size > 5000
    diff = _realism(evaluate_masks([dense], [sparse], tmp_path / "diff", figures=False, inception=False))["area"]
    assert diff["ks_2d"] > 0.2 and diff["kl_2d"] > 1.0 and diff["frechet_pca16"] > 1.0
    assert diff["ks_2d"] > diff["floor"]["ks_2d"] and diff["frechet_pca16"] > diff["floor"]["frechet_pca16"]
    pca = _realism(evaluate_masks([dense], [sparse], tmp_path / "pca", figures=False, inception=False,
                                  embedding="pca"))["area"]
    assert pca["embedding"] == "pca" and pca["ks_2d"] > 0.5
    assert pca["frechet_pca16"] == pytest.approx(diff["frechet_pca16"])  # the embedding does not touch it


def test_realism_is_deterministic_under_the_seed(sets, tmp_path):
    _, real, real2, _ = sets

    def run(seed, name):
        r = evaluate_masks([real2], [real], tmp_path / name, figures=False, inception=False, seed=seed,
                           max_masks=12)["realism"]
        return {k: v for k, v in r.items() if k != "seconds"}

    first = run(3, "a")
    assert first["n"] == {"synthetic": 12, "real": 12}
    assert run(3, "b") == first
    assert run(4, "c")["area"] != first["area"]


def test_realism_floor_splits_real_masks_by_slide():
    a, b, how = split_halves(["s1"] * 6 + ["s2"] * 5 + ["s3"] * 2, seed=0)
    slides = np.array(["s1"] * 6 + ["s2"] * 5 + ["s3"] * 2)
    assert not set(slides[a]) & set(slides[b]) and len(a) + len(b) == 13 and how.startswith("by slide")
    assert {len(a), len(b)} == {6, 7}
    assert split_halves(["s1"] * 6 + ["s2"] * 5 + ["s3"] * 2, seed=0)[2] == how
    a, b, how = split_halves(["one"] * 9, seed=1)
    assert how == "by mask (one slide)" and len(a) == 4 and len(b) == 5 and not set(a) & set(b)


def test_realism_too_few_masks_is_a_reason_not_a_crash(sets, tmp_path):
    _, real, _, _ = sets
    few = write_toy(tmp_path / "few", n_patches=3, seed=9)
    r = _realism(evaluate_masks([few], [real], tmp_path / "out", inception=False))
    assert r["area"]["ks_2d"] is None and "at least 5" in r["area"]["skipped"]
    assert r["area"]["frechet_pca16"] is not None  # 3 per side is enough for a Fréchet distance
    r = _realism(evaluate_masks([real], [few], tmp_path / "out2", inception=False))
    assert r["area"]["floor"]["ks_2d"] is None and "at least 5" in r["area"]["floor"]["skipped"]
    assert "at least 2" in r["area"]["floor"]["skipped"]  # halves of 1 and 2 masks
    assert (tmp_path / "out2" / "realism.png").exists()
    off = evaluate_masks([real], [real], tmp_path / "off", realism=False)
    assert off["realism"] == {"skipped": "disabled (--no-realism)"} and (tmp_path / "off" / "realism.png").exists()


@pytest.fixture
def fake_inception(monkeypatch):
    """A stand-in for the optional network (as tests/test_evaluate_images.py fakes it): 8-d features of the
    rendered masks' colour means and spreads and a fixed projection of a thumbnail. Records what it saw."""
    import histosynth.models.inception as inc_mod

    proj = np.random.default_rng(0).normal(size=(48, 2))
    seen = []

    def features(model, imgs, device=None):
        seen.append(np.asarray(imgs))
        imgs = np.asarray(imgs, np.float64) / 255.0
        thumb = imgs[:, ::16, ::16, :].reshape(len(imgs), -1)[:, :48]
        return np.concatenate([imgs.mean((1, 2)), imgs.std((1, 2)), thumb @ proj], axis=1)

    monkeypatch.setattr(inc_mod, "locate_inception", lambda: ("fake.pt", "fake-inception"))
    monkeypatch.setattr(inc_mod, "load_inception", lambda path, dev: object())
    monkeypatch.setattr(inc_mod, "inception_features", features)
    return seen


def test_realism_inception_path_with_a_fake_network(sets, dense_sparse, tmp_path, fake_inception):
    _, real, _, _ = sets
    dense, sparse = dense_sparse
    same = _realism(evaluate_masks([real], [real], tmp_path / "same", figures=False, device="cpu"))["inception"]
    assert same["skipped"] is None and same["model"] == "fake-inception" and same["n_real"] == 20
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["ks_2d"] == 0.0
    assert same["kl_2d"] == pytest.approx(0.0, abs=1e-9) and same["kid"] is not None
    assert same["floor"]["fid"] is not None and same["floor"]["kid"] is not None
    imgs = np.concatenate(fake_inception)
    assert imgs.dtype == np.uint8 and imgs.shape[1:] == (128, 128, 3) and len(imgs) == 40  # colour_mask renderings
    diff = _realism(evaluate_masks([dense], [sparse], tmp_path / "diff", device="cpu"))["inception"]
    assert diff["fid"] > 10 * max(same["fid"], 1e-6) and diff["ks_2d"] > 0.2 and diff["kl_2d"] > 1.0
    assert diff["fid"] > diff["floor"]["fid"]
    assert (tmp_path / "diff" / "realism.png").stat().st_size > 5000


def test_realism_without_the_package_skips_inception_with_the_reason(sets, tmp_path, monkeypatch, caplog):
    import sys

    from histosynth.models.inception import FID_PACKAGE

    _, real, real2, _ = sets
    monkeypatch.setitem(sys.modules, FID_PACKAGE, None)
    with caplog.at_level("INFO"):
        r = _realism(evaluate_masks([real2], [real], tmp_path, figures=False))
    deep = r["inception"]
    assert deep["fid"] is None and deep["ks_2d"] is None and deep["floor"] is None
    assert "not installed" in deep["skipped"] and "nothing is downloaded" in deep["skipped"]
    assert deep["skipped"] in caplog.text
    assert r["area"]["ks_2d"] is not None  # the network-free measures do not depend on it


def test_cli_realism_flags(sets, tmp_path):
    _, real, real2, _ = sets
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate-masks", str(real2), str(real), str(tmp_path / "a"), "--embedding", "pca",
                              "--realism-max-masks", "10", "--no-inception", "--seed", "2", "--threads", "1"])
    args.func(args)
    r = json.loads((tmp_path / "a" / "evaluation.json").read_text())["realism"]
    assert r["settings"]["embedding"] == "pca" and r["n"] == {"synthetic": 10, "real": 10}
    assert r["settings"]["seed"] == 2 and "disabled" in r["inception"]["skipped"]
    args = parser.parse_args(["evaluate-masks", str(real2), str(real), str(tmp_path / "b"), "--no-realism"])
    args.func(args)
    assert json.loads((tmp_path / "b" / "evaluation.json").read_text())["realism"]["skipped"].startswith("disabled")
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate-masks", str(real2), str(real), str(tmp_path / "c"), "--embedding", "umap"])


def test_tissue_benchmark_uses_the_library_maths():
    """benchmarks/tissue.py computes its KS / KL / Fréchet figures with histosynth.masks.realism."""
    pytest.importorskip("torch")
    from benchmarks import tissue

    assert tissue.kl_1d is rm.kl_1d and tissue.kl_2d is rm.kl_2d and tissue.frechet is rm.frechet
    with pytest.raises(SystemExit) as e:
        tissue.main(["--help"])
    assert e.value.code == 0
