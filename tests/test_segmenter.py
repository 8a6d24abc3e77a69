"""Training HoVer-Net per arm, resuming, sliding-window prediction, and scoring on held-out patch sets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from histosynth.segmentation import segmenter as sg
from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter
from histosynth.io.pool import load_pool
from histosynth.segmentation.augment import Augment
from histosynth.segmentation.score import score

torch.set_num_threads(1)

COLOURS = {0: (235, 190, 215), 1: (90, 40, 140), 2: (40, 20, 90)}
# the smallest HoVer-Net: 8 channels, one unit per stage; a 96-px input gives a 4-px output in fast mode
TINY = dict(width=8, units=(1, 1, 1, 1), input_size=104, batch_size=2, device="cpu", threads=1,
            precision="float32", log_every=1, augment=Augment(0, 0, 0, 0, 0))


def _write_set(path, slide, n=3, size=64, seed=0, classes=None, max_type=2, source="test", background=None):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with PatchSetWriter(path, arrays=("images", "inst", "types"), patch_size=(size, size)) as w:
        for i in range(n):
            inst = np.zeros((size, size), np.int32)
            types = np.zeros((size, size), np.uint8)
            for k in range(1, 7):
                cy, cx, r = rng.integers(5, size - 5), rng.integers(5, size - 5), rng.integers(3, 6)
                disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)
                inst[disc] = k
                types[disc] = 1 + k % max_type
            img = np.zeros((size, size, 3), np.uint8)
            img[:] = COLOURS[0] if background is None else background
            for t in range(1, max_type + 1):
                img[types == t] = COLOURS[min(t, 2)]
            row = {"slide": slide, "x": 0, "y": i * size, "level": 0, "downsample": 1.0, "mpp": 0.5,
                   "width": size, "height": size, "tissue_fraction": 1.0, "n_nuclei": 6, "source": source}
            w.add(row, images=img, inst=inst, types=types)
        w.report = {"classes": classes or {"1": "Epithelial", "2": "Lymphocyte"}}
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    return {"real": [_write_set(root / "real", "r", seed=1)], "synthetic": [_write_set(root / "syn", "s", seed=2)],
            "test": [_write_set(root / "test", "t", seed=3, n=2, size=150)]}


def test_sampler_is_pure_and_pads_small_patches(sets):
    data = sg.arm_data("real+synthetic", sets["real"], sets["synthetic"], mix=0.5)
    pools, weights = data.pools, data.weights(0)
    a = sg.sample_batch(pools, weights, 3, 96, 0, 4)
    b = sg.sample_batch(pools, weights, 3, 96, 0, 4)
    assert all((x == y).all() for x, y in zip(a, b))
    imgs, inst, types, valid = a
    assert imgs.shape == (3, 96, 96, 3) and inst.dtype == np.int32
    # a 64-px patch in a 96-px window: exactly 64*64 valid pixels, padding has no nuclei
    assert (valid.reshape(3, -1).sum(1) == 64 * 64).all()
    assert not inst[~valid].any() and not types[~valid].any()


def test_augmented_batches_are_pure_and_keep_the_masks(sets):
    data = sg.arm_data("real", sets["real"], [])
    plain = sg.sample_batch(data.pools, [1.0], 1, 96, 0, 1)
    aug = Augment(hed=0.05, color=0.1, scale=0.0, blur=1.0, noise=0.05)
    a = sg.sample_batch(data.pools, [1.0], 1, 96, 0, 1, augment=aug)
    b = sg.sample_batch(data.pools, [1.0], 1, 96, 0, 1, augment=aug)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[0] == plain[0]).all()  # the images change ...
    for x, y in zip(a[1:], plain[1:]):  # ... the masks (no zoom here) do not
        assert (x == y).all()


@pytest.fixture(scope="module")
def marked_pools(tmp_path_factory):
    """Two pools told apart by the background colour of their patches (red, blue; nuclei are purple)."""
    root = tmp_path_factory.mktemp("marked")
    return [load_pool([_write_set(root / name, name, n=3, seed=i, background=colour)])
            for i, (name, colour) in enumerate((("zero", (255, 0, 0)), ("one", (0, 0, 255))))]


def _pool_of_draws(pools, weights, steps, batch_size=4):
    """The pool each patch of ``steps`` batches came from, read off its background colour."""
    which = []
    for step in range(steps):
        imgs = sg.sample_batch(pools, weights, batch_size, 32, 0, step)[0]
        rgb = imgs.reshape(batch_size, -1, 3)
        for patch in rgb:
            colours = {tuple(c) for c in patch.tolist()}
            which.append(1 if (0, 0, 255) in colours else 0)
            assert ((255, 0, 0) in colours) != ((0, 0, 255) in colours)
    return np.array(which)


def test_sample_batch_follows_the_pool_weights(marked_pools):
    pools = marked_pools
    assert (_pool_of_draws(pools, [1.0, 0.0], 25) == 0).all()
    assert (_pool_of_draws(pools, [0.0, 1.0], 25) == 1).all()
    n, p = 400, 0.1
    k = int(_pool_of_draws(pools, [0.9, 0.1], n // 4).sum())
    assert abs(k - n * p) <= 4 * np.sqrt(n * p * (1 - p)), k  # binomial(400, 0.1): 40 +- 24; uniform would be ~200
    data = sg.arm_data("real+synthetic", pools[0].paths, pools[1].paths, mix=0.25)
    assert data.names == ["real", "synthetic"] and data.weights(0) == [0.75, 0.25]


def test_every_arm_draws_from_its_pools_and_validates_on_real_tiles(sets):
    real, synth = sets["real"], sets["synthetic"]
    expect = {"real": ["real"], "real+synthetic": ["real", "synthetic"], "synthetic": ["synthetic"],
              "painted-real": ["synthetic"], "synthetic-then-real": ["real", "synthetic"]}
    for arm, names in expect.items():
        data = sg.arm_data(arm, real, synth if arm != "real" else [], steps=10)
        assert data.names == names, arm
        # three 64-px tiles in a column: the last one validates, the other two train (those that train on real)
        assert len(data.val) == 1
        if "real" in names:
            assert len(data.pools[0]) == 2
    then = sg.arm_data("synthetic-then-real", real, synth, steps=10, pretrain=0.3)
    assert [then.weights(s) for s in (0, 2, 3, 9)] == [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]
    assert sg.arm_data("real+synthetic", real, synth, mix=1.0).weights(0) == [0.0, 1.0]


def test_painted_tiles_of_validation_positions_are_not_trained_on(sets, tmp_path):
    # the GAN's painting of the real slide's own masks: same slide name and positions as the real tiles
    painted = _write_set(tmp_path / "painted", "r", seed=1)
    data = sg.arm_data("painted-real", sets["real"], [painted])
    assert len(data.pools[0]) == 2 and len(data.val) == 1


@pytest.mark.parametrize("arm, real, synthetic, kwargs, message", [
    ("real", False, False, {}, "needs the real patch sets"),
    ("synthetic", False, True, {}, "needs the real patch sets"),
    ("synthetic", True, False, {}, "needs synthetic"),
    ("painted-real", True, False, {}, "needs synthetic"),
    ("real", True, True, {}, "real data only"),
    ("both", True, False, {}, "arm must be one of"),
    ("real+synthetic", True, True, {"mix": 1.5}, r"must be in \[0, 1\]"),
    ("synthetic-then-real", True, True, {"pretrain": 1.0}, r"must be in \(0, 1\)"),
])
def test_arms_need_their_data(sets, arm, real, synthetic, kwargs, message):
    with pytest.raises(HistosynthError, match=message):
        sg.arm_data(arm, sets["real"] if real else [], sets["synthetic"] if synthetic else [], **kwargs)


def test_a_single_tile_per_slide_leaves_no_validation_set(tmp_path):
    one = _write_set(tmp_path / "one", "o", n=1)
    with pytest.raises(HistosynthError, match="validation set came out empty"):
        sg.arm_data("real", [one], [])


class Kill(Exception):
    pass


def test_training_writes_model_log_and_resumes_exactly(sets, tmp_path, monkeypatch):
    full = sg.train_segmenter(sets["real"], tmp_path / "full", arm="real+synthetic", synthetic=sets["synthetic"],
                              steps=4, checkpoint_every=2, val_every=1, seed=3, **TINY)
    assert full["steps"] == 4 and np.isfinite(full["loss"])
    log_csv = pd.read_csv(tmp_path / "full" / "log.csv")
    assert list(log_csv["step"]) == [1, 2, 3, 4] and {"np_ce", "hv_mse", "tp_ce", "lr"} <= set(log_csv.columns)
    val_csv = pd.read_csv(tmp_path / "full" / "validation.csv")
    assert list(val_csv["step"]) == [1, 2, 3, 4] and val_csv["n_true"].gt(0).all()
    saved = json.loads((tmp_path / "full" / "train.json").read_text())
    best = int(val_csv["step"][val_csv["pq"].idxmax()])  # the first of equals
    assert saved["best_step"] == best and saved["best_pq"] == pytest.approx(val_csv["pq"].max())
    assert saved["patches"] == {"real": 2, "synthetic": 3, "validation": 1} and isinstance(saved["rising"], bool)
    assert torch.load(tmp_path / "full" / "model.pt", weights_only=True)["step"] == best

    real_sample = sg.sample_batch

    def sample(*args, **kwargs):  # dies before step 3 (0-based), as a kill after the third step would
        if args[-1] == 3:
            raise Kill
        return real_sample(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(sg, "sample_batch", sample)
        with pytest.raises(Kill):
            sg.train_segmenter(sets["real"], tmp_path / "resumed", arm="real+synthetic", synthetic=sets["synthetic"],
                               steps=4, checkpoint_every=2, val_every=1, seed=3, **TINY)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "resumed" / "model.pt").exists()
    sg.train_segmenter(sets["real"], tmp_path / "resumed", arm="real+synthetic", synthetic=sets["synthetic"],
                       steps=4, checkpoint_every=2, val_every=1, seed=3, **TINY)
    pd.testing.assert_frame_equal(val_csv.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "resumed" / "validation.csv").drop(columns="seconds"))
    a = sg.load_segmenter(tmp_path / "full" / "model.pt")
    b = sg.load_segmenter(tmp_path / "resumed" / "model.pt")
    assert a.arm == "real+synthetic" and a.classes == {1: "Epithelial", 2: "Lymphocyte"} and a.n_types == 2
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    pd.testing.assert_frame_equal(log_csv.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "resumed" / "log.csv").drop(columns="seconds"))
    assert torch.load(tmp_path / "full" / "model.pt", weights_only=True)["classes"] == {"1": "Epithelial",
                                                                                          "2": "Lymphocyte"}
    # a finished run rerun with its outputs deleted (Snakemake after an input's date changed) resumes at the end
    # from checkpoint.pt: it trains nothing and writes every output again
    for name in ("model.pt", "log.csv", "validation.csv", "train.json"):
        (tmp_path / "full" / name).unlink()
    again = sg.train_segmenter(sets["real"], tmp_path / "full", arm="real+synthetic", synthetic=sets["synthetic"],
                               steps=4, checkpoint_every=2, val_every=1, seed=3, **TINY)
    pd.testing.assert_frame_equal(val_csv, pd.read_csv(tmp_path / "full" / "validation.csv"))
    assert again["best_step"] == best and (tmp_path / "full" / "log.csv").is_file()
    assert torch.equal(next(iter(sg.load_segmenter(tmp_path / "full" / "model.pt").model.state_dict().values())),
                       next(iter(a.model.state_dict().values())))


def test_checkpoint_of_another_kind_or_corrupt_is_named(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(HistosynthError, match="unreadable segmenter checkpoint"):
        sg.load_segmenter(bad)
    torch.save({"format": "histosynth-gan"}, bad)
    with pytest.raises(HistosynthError, match="not a segmenter checkpoint"):
        sg.load_segmenter(bad)
    torch.save({"format": sg.CHECKPOINT_FORMAT, "version": 1, "arch": {"width": 8}, "model": {}}, bad)
    with pytest.raises(HistosynthError, match="does not fit"):
        sg.load_segmenter(bad)


def test_nan_loss_stops_training(sets, tmp_path, monkeypatch):
    real_loss = sg.hn.hovernet_loss

    def nan_loss(*a, **k):
        total, parts = real_loss(*a, **k)
        return total * float("nan"), parts

    monkeypatch.setattr(sg.hn, "hovernet_loss", nan_loss)
    with pytest.raises(HistosynthError, match="non-finite loss"):
        sg.train_segmenter(sets["real"], tmp_path / "nan", arm="real", steps=2, **TINY)
    assert not (tmp_path / "nan" / "model.pt").exists()


@pytest.fixture(scope="module")
def model(sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    sg.train_segmenter(sets["real"], out, arm="real", steps=2, seed=0, **TINY)
    return out / "model.pt"


def test_predict_covers_any_size_and_overlap_only_blends(model):
    seg = sg.load_segmenter(model)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)
    maps = sg.predict(seg, image, overlap=0)
    assert maps["np"].shape == (37, 50) and maps["hv"].shape == (2, 37, 50) and maps["tp"].shape == (3, 37, 50)
    assert np.isfinite(maps["hv"]).all() and ((maps["np"] >= 0) & (maps["np"] <= 1)).all()
    # each window sees its full receptive field (reflect padding), so overlapping windows agree up to float noise
    big = rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)
    a, b = sg.predict(seg, big, overlap=0), sg.predict(seg, big, overlap=3)
    assert a["np"].shape == (30, 30)
    with pytest.raises(HistosynthError, match="overlap"):
        sg.predict(seg, big, overlap=seg.output_size)
    with pytest.raises(HistosynthError, match="RGB uint8"):
        sg.predict(seg, big.astype(float))
    assert np.allclose(a["np"][:4, :4], b["np"][:4, :4], atol=1e-5)


def test_score_writes_per_image_rows_summary_and_overlay(model, sets, tmp_path):
    summary = score(model, sets["test"], tmp_path / "score", device="cpu", threads=1, n_overlays=2)
    rows = pd.read_csv(tmp_path / "score" / "scores.csv")
    assert len(rows) == 2 and set(rows["arm"]) == {"real"} and {"pq", "aji", "dice", "slide"} <= set(rows.columns)
    assert ((rows[["dice", "aji", "pq"]] >= 0) & (rows[["dice", "aji", "pq"]] <= 1)).all().all()
    saved = json.loads((tmp_path / "score" / "summary.json").read_text())
    assert saved["n_images"] == 2 and saved["arm"] == "real" and "mpq" in saved
    assert summary["pq"] == pytest.approx(rows["pq"].mean())
    assert (tmp_path / "score" / "overlay.png").stat().st_size > 1000


def test_score_refuses_sets_without_nuclei_and_foreign_types(model, tmp_path):
    empty = tmp_path / "empty"
    with PatchSetWriter(empty, arrays=("images", "inst", "types"), patch_size=(32, 32)) as w:
        w.add({"slide": "e", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5, "width": 32,
               "height": 32, "tissue_fraction": 1.0, "n_nuclei": 0, "source": "t"},
              images=np.zeros((32, 32, 3), np.uint8), inst=np.zeros((32, 32), np.int32),
              types=np.zeros((32, 32), np.uint8))
    with pytest.raises(HistosynthError, match="no nuclei"):
        score(model, [empty], tmp_path / "out", device="cpu")
    other = _write_set(tmp_path / "other", "o", classes={"1": "Tumour", "2": "Immune"})
    with pytest.raises(HistosynthError, match="not the ones the model was trained with"):
        score(model, [other], tmp_path / "out", device="cpu")
    more = _write_set(tmp_path / "more", "m", classes={}, max_type=3)
    with pytest.raises(HistosynthError, match="use type 3"):
        score(model, [more], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_cli_train_and_score(sets, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train-segmenter", str(sets["synthetic"][0]), str(out), "--arm", "real", "--no-augment", "--width", "8", "--units",
            "1", "1", "1", "1", "--input-size", "104", "--steps", "1", "--batch-size", "1", "--device", "cpu",
            "--precision", "float32", "--threads", "1"]
    assert main(args) == 0
    assert main(["score", str(out / "model.pt"), str(sets["test"][0]), str(tmp_path / "s"), "--device", "cpu",
                 "--threads", "1"]) == 0
    assert (tmp_path / "s" / "scores.csv").is_file()
    assert main(["train-segmenter", str(tmp_path / "x"), "--arm", "synthetic"]) == 2
    assert "needs the real patch sets" in capsys.readouterr().err
    assert main(["train-segmenter", str(sets["real"][0]), str(tmp_path / "y"), "--arm", "synthetic"]) == 2
    assert "needs synthetic" in capsys.readouterr().err
    assert main(["train-segmenter", str(sets["real"][0]), str(tmp_path / "y"), "--arm", "real", "--mix", "2"]) == 2
    assert "mix" in capsys.readouterr().err and not (tmp_path / "y" / "model.pt").exists()


def test_score_reads_the_rasterize_class_spelling(model, tmp_path):
    """rasterize's report names classes by index column ({"n_epithelial": 1}); that is the same mapping."""
    spelled = _write_set(tmp_path / "spelled", "t", classes={"n_epithelial": 1, "n_lymphocyte": 2})
    assert score(model, [spelled], tmp_path / "out", device="cpu")["n_images"] == 3


def test_segmenter_does_not_import_the_gan():
    """The segmenter trains from io.pool and training, never from the GAN stage (layering)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import histosynth

    src = str(Path(histosynth.__file__).resolve().parents[1])
    script = ("import sys, histosynth.segmentation.segmenter, histosynth.segmentation.score\n"
              "bad = [m for m in sys.modules if m.startswith('histosynth.gan')]\n"
              "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
