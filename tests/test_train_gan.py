"""Training Optional pix2pix: data checks, a few steps learn, exact resume, NaN stop, CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

from histosynth.gan import train as tg
from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter
from histosynth.io.pool import load_pool
from histosynth.models.pix2pix import generate, load_gan
from histosynth.cli.gan import register as add_cli
from histosynth.gan.train import learning_rate, sample_batch, train_gan

torch.set_num_threads(1)

COLOURS = {0: (235, 190, 215), 1: (90, 40, 140), 2: (40, 20, 90)}  # background pink, two nucleus types
TINY = dict(crop=32, depth=3, width=4, batch_size=2, device="cpu", threads=1, precision="float32",
            sample_every=1000, log_every=1)


def _write_set(path, slide, n=4, size=40, seed=0, arrays=("images", "inst", "types")):
    """Solid-colour patches: discs of type 1 or 2 on a pink background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with PatchSetWriter(path, arrays=arrays, patch_size=(size, size)) as w:
        for i in range(n):
            inst = np.zeros((size, size), np.int32)
            types = np.zeros((size, size), np.uint8)
            for k in range(1, 5):
                cy, cx, r = rng.integers(3, size - 3), rng.integers(3, size - 3), rng.integers(2, 5)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                inst[disc] = k
                types[disc] = 1 + k % 2
            img = np.zeros((size, size, 3), np.uint8)
            img[:] = COLOURS[0]
            for t in (1, 2):
                img[types == t] = COLOURS[t]
            row = {"slide": slide, "x": 0, "y": i * size, "level": 0, "downsample": 1.0, "mpp": 0.5,
                   "width": size, "height": size, "tissue_fraction": 1.0, "n_nuclei": 4, "source": "test"}
            data = {"images": img, "inst": inst, "types": types}
            w.add(row, **{a: data[a] for a in arrays})
        w.report = {"classes": {"1": "Epithelial", "2": "Lymphocyte"}}
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return [_write_set(root / "a", "slide-a", seed=1), _write_set(root / "b", "slide-b", seed=2)]


def test_sampler_is_a_pure_function_of_seed_and_step(sets):
    data = load_pool(sets, {"slide-a": "pale"})
    assert data.options == ["default", "pale"] and len(data) == 8
    a, b = sample_batch(data, 3, 32, 0, 5), sample_batch(data, 3, 32, 0, 5)
    c = sample_batch(data, 3, 32, 0, 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    imgs, inst, types, opts = a
    assert imgs.shape == (3, 32, 32, 3) and inst.shape == types.shape == (3, 32, 32)
    # augmentation keeps image and mask aligned
    for t in (1, 2):
        assert (imgs[types == t] == COLOURS[t]).all()
    assert set(opts.tolist()) <= {0, 1}


def test_learning_rate_schedule():
    assert learning_rate(0, 1.0, 10, 10) == 1.0 and learning_rate(9, 1.0, 10, 10) == 1.0
    assert learning_rate(15, 1.0, 10, 10) == 0.5 and learning_rate(20, 1.0, 10, 10) == 0.0
    assert learning_rate(50, 1.0, 10, 0) == 1.0


def test_a_few_steps_reduce_l1(sets, tmp_path):
    report = train_gan(sets, tmp_path, options={"slide-a": "pale", "slide-b": "dark"}, steps=40, decay_steps=0,
                       lr=2e-3, checkpoint_every=100, **TINY)
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log.columns) == tg.LOG_COLUMNS and len(log) == 40
    assert log["G_l1"].iloc[-5:].mean() < 0.6 * log["G_l1"].iloc[:5].mean()
    assert (tmp_path / "samples.png").stat().st_size > 0
    torch.load(tmp_path / "gan.pt", weights_only=True)
    bundle = load_gan(tmp_path / "gan.pt")
    assert bundle.options == ["dark", "pale"] and bundle.n_types == 2 and bundle.step == 40
    assert bundle.classes == {1: "Epithelial", 2: "Lymphocyte"} and not bundle.noise
    assert report["step"] == 40 and report["precision"] == "float32"
    from histosynth.gan.conditioning import build_conditioning

    _, inst, types, _ = sample_batch(load_pool(sets), 2, 32, 0, 0)
    cond = build_conditioning(inst, types, bundle.n_types, bundle.option_index("pale"), len(bundle.options))
    assert generate(bundle, cond, seed=0).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("disc,gan_mode,noise", [("multiscale", "hinge", True), ("global", "vanilla", False)])
def test_other_discriminators_train(sets, tmp_path, disc, gan_mode, noise):
    big = disc == "multiscale"  # two PatchGANs need 64 px; the global D needs a batch > 1 for BatchNorm
    kw = dict(TINY, crop=64 if big else 32, batch_size=1 if big else 2)
    data = [_write_set(tmp_path / "big", "s", n=2, size=64)] if big else sets
    report = train_gan(data, tmp_path / "out", options=None, disc=disc, num_d=2, gan_mode=gan_mode, noise=noise,
                       steps=2, decay_steps=1, checkpoint_every=10, **kw)
    assert np.isfinite(report["G_l1"])
    if disc == "multiscale":
        assert report["G_fm"] > 0
    assert load_gan(tmp_path / "out" / "gan.pt").noise is noise


def _params(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["generator"], ckpt["discriminator"], ckpt.get("generator_ema", {})


class Kill(Exception):
    pass


def _kill_before(monkeypatch, module, kill_step):
    """Make ``module.sample_batch`` raise at 0-based ``kill_step``: training dies there, as a kill would."""
    real = module.sample_batch
    drawn = []

    def sample(*args):
        step = args[-1]
        if step == kill_step:
            raise Kill
        drawn.append(step)
        return real(*args)

    monkeypatch.setattr(module, "sample_batch", sample)
    return drawn


@pytest.mark.parametrize("few_image", [{}, dict(diffaugment=["color", "translation", "cutout"], ema=0.9,
                                                 gan_mode="wgan-gp", spectral_norm=True)], ids=["plain", "few-image"])
def test_resume_is_exact(sets, tmp_path, monkeypatch, few_image):
    """A run killed after step 3 (checkpoint at 2) and restarted ends with an uninterrupted run's weights and log.

    The few-image variant: DiffAugment and wgan-gp's interpolates draw from a checkpointed generator, the EMA
    generator and D's spectral-norm vectors are in the checkpoint."""
    kw = dict(TINY, options={"slide-a": "pale"}, steps=4, decay_steps=2, checkpoint_every=2, noise=True, **few_image)
    train_gan(sets, tmp_path / "whole", **kw)

    with monkeypatch.context() as m:
        drawn = _kill_before(m, tg, 3)
        with pytest.raises(Kill):
            train_gan(sets, tmp_path / "cut", **kw)
    assert drawn == [0, 1, 2]  # steps 0..2 ran, the log has their rows, the checkpoint is the one of step 2
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "cut" / "gan.pt").exists()
    assert list(pd.read_csv(tmp_path / "cut" / "log.csv")["step"]) == [1, 2, 3]
    drawn = _kill_before(monkeypatch, tg, None)
    train_gan(sets, tmp_path / "cut", **kw)
    assert drawn == [2, 3, 4, 5, -1]  # resumed at the checkpoint: only the missing steps ran (-1: samples.png)
    for a, b in zip(_params(tmp_path / "whole" / "checkpoint.pt"), _params(tmp_path / "cut" / "checkpoint.pt")):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert bool(_params(tmp_path / "cut" / "checkpoint.pt")[2]) is bool(few_image)  # the EMA generator, when on
    ga = torch.load(tmp_path / "whole" / "gan.pt", weights_only=True)["generator"]
    gb = torch.load(tmp_path / "cut" / "gan.pt", weights_only=True)["generator"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    whole = pd.read_csv(tmp_path / "whole" / "log.csv")
    cut = pd.read_csv(tmp_path / "cut" / "log.csv")
    pd.testing.assert_frame_equal(whole.drop(columns="seconds"), cut.drop(columns="seconds"))


def test_nan_loss_stops_and_keeps_checkpoint(sets, tmp_path, monkeypatch):
    real_l1 = tg._l1
    calls = {"n": 0}

    def l1(fake, real, weight):
        calls["n"] += 1
        out = real_l1(fake, real, weight)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(tg, "_l1", l1)
    with pytest.raises(HistosynthError, match=r"non-finite loss \(G_l1=nan.*step 3.*checkpoint.pt \(step 2\)"):
        train_gan(sets, tmp_path, steps=5, decay_steps=0, checkpoint_every=2, **TINY)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "gan.pt").exists()


def test_bad_inputs(sets, tmp_path):
    no_images = _write_set(tmp_path / "masks-only", "s", arrays=("inst", "types"))
    with pytest.raises(HistosynthError, match="no images.npy"):
        train_gan([no_images], tmp_path / "o", steps=1, **TINY)
    with pytest.raises(HistosynthError, match="larger than the patches"):
        train_gan(sets, tmp_path / "o", steps=1, **dict(TINY, crop=48))
    with pytest.raises(HistosynthError, match="divisible"):
        train_gan(sets, tmp_path / "o", steps=1, **dict(TINY, crop=12))
    with pytest.raises(HistosynthError, match="too small for the patch discriminator"):
        train_gan(sets, tmp_path / "o", steps=1, **dict(TINY, crop=16))
    other = _write_set(tmp_path / "big", "s", size=32)
    with pytest.raises(HistosynthError, match="different patch sizes"):
        train_gan([sets[0], other], tmp_path / "o", steps=1, **TINY)
    empty = _write_set(tmp_path / "empty", "s", n=0)
    with pytest.raises(HistosynthError, match="no patches"):
        train_gan([empty], tmp_path / "o", steps=1, **TINY)
    with pytest.raises(HistosynthError, match="at least one patch set"):
        train_gan([], tmp_path / "o", steps=1, **TINY)
    with pytest.raises(HistosynthError, match="disc must be"):
        train_gan(sets, tmp_path / "o", steps=1, disc="pixel", **TINY)


def test_cli(sets, tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(["train-gan", *map(str, sets), str(out), "--options", "slide-a=pale", "slide-b=dark",
                              "--crop", "32", "--depth", "3", "--width", "4", "--steps", "2", "--decay-steps", "0",
                              "--batch-size", "2", "--device", "cpu", "--precision", "float32",
                              "--classes", "Epi=1", "Lym=2", "--disc", "global", "--gan-mode", "vanilla"])
    args.func(args)
    bundle = load_gan(out / "gan.pt")
    assert bundle.options == ["dark", "pale"] and bundle.classes == {1: "Epi", 2: "Lym"}
    bad = parser.parse_args(["train-gan", str(sets[0]), str(out), "--options", "slide-a"])
    with pytest.raises(HistosynthError, match="SLIDE=NAME"):
        bad.func(bad)
