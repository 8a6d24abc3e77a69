"""evaluate-stacks and stack-baselines (issue #20): tiny 5-plane stacks of a defocused disc."""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.gan.evaluate import FID_PACKAGE
from histosynth.multifocus.baselines import make_baseline
from histosynth.multifocus.evaluate import evaluate_stacks, half_width, read_stackset, stack_stats
from histosynth.multifocus.stackset import StackSetWriter

Z, S = 5, 24


def disc_stack(best: int, rng: np.random.Generator, size: int = S, planes: int = Z, slope: float = 1.2
               ) -> np.ndarray:
    """A dark textured disc on a light background, sharp at ``best``, Gaussian-blurred with |z - best|."""
    yy, xx = np.mgrid[:size, :size]
    r = rng.uniform(5, 7)
    img = np.full((size, size, 3), 220.0)
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < r * r
    img[inside] = (70, 40, 120)
    img += rng.normal(0, 12, size=(size, size, 1))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.stack([img if z == best else cv2.GaussianBlur(img, (0, 0), slope * abs(z - best))
                     for z in range(planes)])


def write(path, stacks, best):
    with StackSetWriter(path, planes=stacks.shape[1], size=stacks.shape[2:4],
                        plane_offsets_um=list(range(stacks.shape[1]))) as w:
        for s, b in zip(stacks, best):
            w.add({"slide": "t", "x": 0, "y": 0, "best_plane": int(b), "source": "real"}, s)
    return path


def make_set(path, n, seed, best=None, **kw):
    rng = np.random.default_rng(seed)
    best = [int(b) for b in (rng.integers(1, Z - 1, n) if best is None else best)]
    return write(path, np.stack([disc_stack(b, rng, **kw) for b in best]), best)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("mfe")
    real = make_set(d / "real", 8, 1)
    train = make_set(d / "train", 8, 2)
    return {"d": d, "real": real, "train": train,
            "copy": make_baseline(train, d / "copy", "copy") and d / "copy",
            "blur": make_baseline(train, d / "blur", "blur") and d / "blur"}


@pytest.fixture
def no_fid_package(monkeypatch):
    monkeypatch.setitem(sys.modules, FID_PACKAGE, None)


def test_focus_peak_and_width(sets):
    st = stack_stats(read_stackset(sets["real"]))
    assert (st.peak == st.best).all() and (st.peak_offset == 0).all()
    assert (st.width > 0.5).all() and (st.width < 3).all()
    assert half_width(np.ones(5)) == 5.0
    assert half_width(np.array([0, 0, 1, 0, 0.0])) == pytest.approx(1.0)
    assert half_width(np.array([0, 0.5, 1, 0.5, 0])) == pytest.approx(2.0)


def test_baselines_and_metrics(sets, tmp_path, no_fid_package):
    ev = evaluate_stacks(sets["real"], [sets["copy"], sets["blur"]], tmp_path, names=["copy", "blur"])
    copy, blur, floor = ev["generated"]["copy"], ev["generated"]["blur"], ev["floor"]
    # the blur baseline's focus curve is like the real one, the copy's flat
    assert blur["focus"]["ks_width"] < copy["focus"]["ks_width"]
    assert copy["focus"]["ks_peak"] == 0.0 and copy["focus"]["mean_width"] == 5.0 and blur["focus"]["curve_l1"] < copy["focus"]["curve_l1"]
    # a sharp disc stays a disc: high IoU across real planes; copies are identical planes
    assert ev["real"]["consistency"]["mean_iou"] > 0.7
    assert copy["consistency"]["mean_iou"] == 1.0 and copy["consistency"]["per_gap"] == [1.0] * (Z - 1)
    assert copy["consistency"]["diff_to_real"] == pytest.approx(1.0 - ev["real"]["consistency"]["mean_iou"])
    # the floor: two halves of the real stacks
    assert floor["n_a"] + floor["n_b"] == 8 and floor["focus"]["ks_width"] is not None
    assert floor["consistency"]["diff_to_real"] is not None
    assert copy["fid_per_plane"] == [None] * Z and "not installed" in copy["fid_skipped"]
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["generated"]["blur"]["focus"]["ks_width"] == blur["focus"]["ks_width"]
    table = (tmp_path / "table.md").read_text()
    assert "| copy |" in table and "real-vs-real floor" in table and "not installed" in table
    assert (tmp_path / "montage.png").stat().st_size > 2000
    fit = read_stackset(sets["blur"]).report["fit"]
    sig = dict(zip(fit["offsets"], fit["sigma_px"]))
    assert sig[0] == 0.0 and 0 < sig[1] < sig[2] and 0 < sig[-1]


@pytest.fixture
def fake_inception(monkeypatch):
    import histosynth.gan.evaluate as ev_mod

    calls = []

    def features(model, imgs, device=None):
        imgs = np.asarray(imgs, np.float64) / 255.0
        calls.append(len(imgs))
        lap = np.array([cv2.Laplacian(i.mean(2), cv2.CV_64F).var() for i in imgs])[:, None]
        return np.concatenate([imgs.mean((1, 2)), imgs.std((1, 2)), lap], axis=1)

    monkeypatch.setattr(ev_mod, "locate_inception", lambda: ("fake.pt", "fake-inception"))
    monkeypatch.setattr(ev_mod, "load_inception", lambda path, dev: object())
    monkeypatch.setattr(ev_mod, "inception_features", features)
    return calls


def test_fid_per_plane_with_a_fake_network(sets, tmp_path, fake_inception):
    ev = evaluate_stacks(sets["real"], [sets["copy"]], tmp_path, montage_stacks=1, device="cpu", threads=1)
    g = ev["generated"]["copy"]
    assert ev["fid_model"] == "fake-inception" and fake_inception
    assert len(g["fid_per_plane"]) == Z and g["fid_per_plane"][Z // 2] is not None
    assert g["fid_mean"] > 0 and g["kid_per_plane"][Z // 2]["kid"] is not None
    # copies are sharp at every offset: far from the real defocused planes, much nearer at the best plane
    assert g["fid_per_plane"][0] > g["fid_per_plane"][Z // 2]
    assert ev["floor"]["fid_mean"] is not None and ev["floor"]["fid_n"][Z // 2] == [4, 4]
    assert not ev["generated"]["copy"]["fid_skipped"]


def test_bad_inputs(sets, tmp_path, no_fid_package):
    few = make_set(tmp_path / "few", 3, 3)
    with pytest.raises(HistosynthError, match="at least 4") as e:
        evaluate_stacks(few, [sets["copy"]], tmp_path / "o")
    assert "few" in str(e.value)
    planes = make_set(tmp_path / "planes", 4, 4, best=[1, 2, 3, 2], planes=7)
    with pytest.raises(HistosynthError, match="7 planes") as e:
        evaluate_stacks(sets["real"], [planes], tmp_path / "o")
    assert "planes" in str(e.value)
    small = make_set(tmp_path / "small", 4, 5, size=16)
    with pytest.raises(HistosynthError, match="16 x 16") as e:
        evaluate_stacks(sets["real"], [small], tmp_path / "o")
    assert "small" in str(e.value)
    with pytest.raises(HistosynthError, match="names"):
        evaluate_stacks(sets["real"], [sets["copy"]], tmp_path / "o", names=["a", "b"])
    with pytest.raises(HistosynthError, match="not a stack set"):
        evaluate_stacks(sets["real"], [tmp_path / "nothing"], tmp_path / "o")
    with pytest.raises(HistosynthError, match="px"):
        make_baseline(sets["real"], tmp_path / "b", "copy", base_dir=small)
    assert not (tmp_path / "o").exists()


def test_cli_end_to_end(sets, tmp_path, no_fid_package, capsys):
    out = tmp_path / "ev"
    g1 = make_set(tmp_path / "g1", 4, 6, best=[2, 2, 2, 2])
    assert main(["stack-baselines", str(sets["train"]), str(tmp_path / "b"), "--kind", "blur",
                 "--base", str(g1), "--seed", "1"]) == 0
    b = read_stackset(tmp_path / "b")
    assert len(b) == 4 and (b.index["best_plane"] == Z // 2).all()
    assert main(["evaluate-stacks", str(sets["real"]), str(tmp_path / "b"), str(sets["copy"]), str(out),
                 "--names", "blurG1", "copy", "--no-fid", "--montage-stacks", "1"]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert set(ev["generated"]) == {"blurG1", "copy"} and "--no-fid" in ev["floor"]["fid_skipped"]
    assert main(["evaluate-stacks", str(sets["real"]), str(out)]) == 2
    assert "REAL_STACKS GENERATED_STACKS" in capsys.readouterr().err
