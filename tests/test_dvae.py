"""The nucleus-shape β-VAE: architecture, sampling API, checkpoints, training, resume."""

from __future__ import annotations

import argparse
import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from skimage.draw import ellipse

from histosynth.errors import HistosynthError, Terminated
from histosynth.models import dvae as dvae_mod
from histosynth.models.dvae import (
    DVAE,
    DVAEConfig,
    checkpoint_dict,
    decode,
    define_dvae,
    encode,
    load_dvae,
    sample_posterior_shapes,
    sample_shapes,
    vae_loss,
)
from histosynth.cli.masks import register as add_cli
from histosynth.masks.dvae import dvae_sweep, epoch_order, epochs_for, split_holdout, train_dvae

torch.set_num_threads(1)

TINY = dict(enc_widths=(4, 4, 8, 8), dec_widths=(8, 4, 4), hidden=16, dec_channels=4)
TRAIN = dict(device="cpu", threads=1, batch_size=8, min_steps=0, **TINY)


def _write_library(path, n=40, seed=0):
    """A library of random ellipses: type 1 round, type 2 elongated."""
    rng = np.random.default_rng(seed)
    shapes = np.zeros((n, 64, 64), np.uint8)
    types = np.zeros(n, np.uint8)
    for i in range(n):
        t = 1 + i % 2
        a = rng.uniform(6, 10)
        b = a * (rng.uniform(0.8, 1.0) if t == 1 else rng.uniform(0.3, 0.5))
        rr, cc = ellipse(32, 32, a, b, shape=(64, 64), rotation=rng.uniform(0, np.pi))
        shapes[i, rr, cc] = 1
        types[i] = t
    np.savez(path, shapes=shapes, types=types, areas=shapes.sum((1, 2)).astype(np.float32),
             scales=np.ones(n, np.float32), slides=np.array(["s"] * n), centroids=np.zeros((n, 2)),
             classes=np.asarray(json.dumps({"1": "round", "2": "long"})), mpp=np.asarray(0.5))
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return _write_library(tmp_path_factory.mktemp("lib") / "nuclei.npz")


@pytest.fixture(scope="module")
def trained(library, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    report = train_dvae(library, out, latent_dim=4, epochs=3, **TRAIN)
    return out, report


# -- architecture ------------------------------------------------------------------------------
def test_default_architecture_follows_the_seed():
    model = DVAE(DVAEConfig())
    downs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(downs) == 4 and all(m.stride == (2, 2) for m in downs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules()) == 4
    assert model.encoder.fc_mu.out_features == 10 == model.latent_dim
    fc = [m for m in model.decoder.fc if isinstance(m, torch.nn.Linear)]
    assert (fc[0].in_features, fc[0].out_features, fc[1].out_features) == (10, 100, 16 * 16 * 16)
    x = torch.zeros(3, 1, 64, 64)
    logits, mu, logvar = model(x)
    assert logits.shape == (3, 1, 64, 64) and mu.shape == logvar.shape == (3, 10)


def test_conditional_appends_one_hot_to_features_and_z():
    plain = define_dvae(latent_dim=6, **TINY)
    cond = define_dvae(latent_dim=6, type_ids=(1, 3, 5), **TINY)
    assert cond.conditional and not plain.conditional
    assert cond.encoder.fc_mu.in_features == plain.encoder.fc_mu.in_features + 3
    assert cond.decoder.fc[0].in_features == 6 + 3
    c = cond.one_hot(np.array([5, 1]), 2)
    assert c.tolist() == [[0, 0, 1], [1, 0, 0]]
    logits, mu, _ = cond(torch.zeros(2, 1, 64, 64), c)
    assert logits.shape == (2, 1, 64, 64) and mu.shape == (2, 6)
    with pytest.raises(HistosynthError, match="conditioned"):
        cond.one_hot(None, 2)
    with pytest.raises(HistosynthError, match=r"\[7\]"):
        cond.one_hot(np.array([7, 1]), 2)


def test_loss_is_bce_sum_plus_beta_kl():
    logits = torch.zeros(2, 1, 64, 64)
    x = torch.ones(2, 1, 64, 64)
    mu = torch.ones(2, 3)
    logvar = torch.zeros(2, 3)
    loss, recon, kl = vae_loss(logits, x, mu, logvar, beta=4.0)
    assert recon.item() == pytest.approx(64 * 64 * np.log(2), rel=1e-5)
    assert kl.item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(recon.item() + 6.0, rel=1e-6)


def test_mse_loss_is_the_seeds_squared_error_plus_beta_kl():
    logits = torch.zeros(2, 1, 64, 64)  # sigmoid 0.5 everywhere
    x = torch.ones(2, 1, 64, 64)
    loss, recon, kl = vae_loss(logits, x, torch.ones(2, 3), torch.zeros(2, 3), beta=2.0, reconstruction="mse")
    assert recon.item() == pytest.approx(64 * 64 * 0.25) and loss.item() == pytest.approx(recon.item() + 3.0)
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        vae_loss(logits, x, torch.ones(2, 3), torch.zeros(2, 3), beta=2.0, reconstruction="l1")


def test_reconstruction_metrics_measure_the_seeds_mse_per_shape(library):
    from histosynth.masks.dvae import reconstruction_metrics

    model = DVAE(DVAEConfig(latent_dim=2, **TINY))
    shapes = np.zeros((3, 64, 64), np.uint8)
    shapes[:, 20:30, 20:30] = 1
    with torch.no_grad():  # a decoder that outputs sigmoid 0.5 everywhere: squared error 0.25 per pixel
        for m in model.decoder.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
    metrics = reconstruction_metrics(model, shapes, None)
    assert metrics["mse"] == pytest.approx(64 * 64 * 0.25, rel=1e-4)
    assert metrics["mse_kl"] == pytest.approx(metrics["mse"] + sum(metrics["kl_per_dim"]), rel=1e-6)


def test_training_with_the_seeds_mse_loss(library, tmp_path):
    report = train_dvae(library, tmp_path, latent_dim=2, epochs=2, loss="mse", **TRAIN)
    assert report["epochs"] == 2 and np.isfinite(report["holdout_mse"])
    assert torch.load(tmp_path / "dvae.pt", weights_only=True)["train"]["loss"] == "mse"
    with pytest.raises(HistosynthError, match="dvae.loss must be one of"):
        train_dvae(library, tmp_path / "bad", latent_dim=2, epochs=1, loss="l1", **TRAIN)


def test_loss_decreases_over_a_few_steps(library):
    shapes = np.load(library)["shapes"][:16]
    x = torch.from_numpy(shapes.astype(np.float32)).unsqueeze(1)
    torch.manual_seed(0)
    model = define_dvae(latent_dim=4, **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        loss, _, _ = vae_loss(*_fwd(model, x, gen), beta=4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _fwd(model, x, gen):
    logits, mu, logvar = model(x, generator=gen)
    return logits, x, mu, logvar


# -- training outputs and the sampling API ----------------------------------------------------------
def test_training_writes_model_log_and_pictures(trained):
    out, report = trained
    for name in ("dvae.pt", "log.csv", "traversal.png", "samples.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "dvae.pt", weights_only=True)
    assert ckpt["latent_dim"] == 4 and ckpt["epoch"] == 3 and ckpt["classes"] == {"1": "round", "2": "long"}
    assert ckpt["config"]["enc_widths"] == [4, 4, 8, 8]
    table = pd.read_csv(out / "log.csv")
    assert list(table.columns) == ["epoch", "step", "train_loss", "recon", "kl", "holdout_bce", "holdout_dice",
                                   "holdout_iou", "holdout_mse", "holdout_mse_kl", "seconds"]
    assert (table["holdout_mse_kl"] > table["holdout_mse"]).all() and (table["holdout_mse"] > 0).all()
    assert list(table["epoch"]) == [1, 2, 3] and list(table["step"]) == [5, 10, 15]  # 36 train shapes / 8
    assert table["train_loss"].iloc[-1] < table["train_loss"].iloc[0]
    assert np.isfinite(table[["holdout_bce", "holdout_dice"]].to_numpy()).all()
    assert report["holdout_shapes"] == 4 and report["train_shapes"] == 36
    assert 0 <= report["holdout_dice"] <= 1


def test_load_dvae_round_trip_and_sampling(trained):
    out, _ = trained
    model = load_dvae(out / "dvae.pt")
    assert not model.training and model.latent_dim == 4 and not model.conditional
    assert model.classes == {1: "round", 2: "long"} and model.mpp == 0.5
    saved = torch.load(out / "dvae.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

    a = sample_shapes(model, 10, None, sigma=0.5, seed=3)
    b = sample_shapes(model, 10, None, sigma=0.5, seed=3, batch=3)
    c = sample_shapes(model, 10, None, sigma=0.5, seed=4)
    assert a.dtype == bool and a.shape == (10, 64, 64)
    assert np.array_equal(a, b)
    assert not np.array_equal(decode(model, np.ones((1, 4))), decode(model, -np.ones((1, 4))))
    assert c.shape == a.shape
    assert sample_shapes(model, 0, None).shape == (0, 64, 64)

    probs = decode(model, np.zeros((5, 4)))
    assert probs.dtype == np.float32 and probs.shape == (5, 64, 64)
    assert probs.min() >= 0 and probs.max() <= 1
    with pytest.raises(HistosynthError, match=r"\(n, 4\)"):
        decode(model, np.zeros((5, 3)))
    mu, logvar = encode(model, np.zeros((2, 64, 64), np.uint8))
    assert mu.shape == logvar.shape == (2, 4)
    assert load_dvae(out / "checkpoint.pt").latent_dim == 4  # a training checkpoint loads too


def test_sampling_from_the_stored_posterior(trained):
    out, _ = trained
    model = load_dvae(out / "dvae.pt")
    assert model.posterior["mu"].shape == (36, 4) and set(model.posterior["types"]) == {1, 2}
    a = sample_posterior_shapes(model, 12, np.array([2]), seed=5)
    assert a.dtype == bool and a.shape == (12, 64, 64)
    assert np.array_equal(a, sample_posterior_shapes(model, 12, np.array([2]), seed=5, batch=5))
    assert sample_posterior_shapes(model, 7, None, seed=0).shape == (7, 64, 64)
    with pytest.raises(HistosynthError, match="type id 9"):
        sample_posterior_shapes(model, 3, np.array([9]))
    with pytest.raises(HistosynthError, match="no stored posterior"):
        sample_posterior_shapes(define_dvae(latent_dim=4, **TINY), 3)


def test_load_dvae_rejects_corrupt_foreign_and_mismatched_files(trained, tmp_path):
    out, _ = trained
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(HistosynthError, match="unreadable") as err:
        load_dvae(junk)
    assert str(junk) in str(err.value)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((out / "dvae.pt").read_bytes()[:2000])
    with pytest.raises(HistosynthError, match="truncated.pt"):
        load_dvae(truncated)

    foreign = tmp_path / "gan.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": {}}, foreign)
    with pytest.raises(HistosynthError, match="not a DVAE checkpoint"):
        load_dvae(foreign)

    other = define_dvae(latent_dim=4, **TINY)
    ckpt = checkpoint_dict(other)
    ckpt["config"]["enc_widths"] = [8, 8, 8, 8]  # weights of one architecture, config of another
    wrong = tmp_path / "wrong.pt"
    torch.save(ckpt, wrong)
    with pytest.raises(HistosynthError, match="does not fit the DVAE architecture") as err:
        load_dvae(wrong)
    assert "wrong.pt" in str(err.value)

    with pytest.raises(HistosynthError, match="not found"):
        load_dvae(tmp_path / "missing.pt")


def test_conditional_model(library, tmp_path):
    report = train_dvae(library, tmp_path, latent_dim=3, epochs=1, conditional=True, **TRAIN)
    assert report["epochs"] == 1
    model = load_dvae(tmp_path / "dvae.pt")
    assert model.conditional and model.cfg.type_ids == (1, 2)
    types = np.array([1, 2, 2, 1, 1])
    a = sample_shapes(model, 5, types, seed=1)
    assert a.shape == (5, 64, 64) and np.array_equal(a, sample_shapes(model, 5, types, seed=1))
    assert sample_shapes(model, 4, np.array([2]), seed=1).shape == (4, 64, 64)  # one type for all
    with pytest.raises(HistosynthError, match="conditioned"):
        sample_shapes(model, 5, None)
    with pytest.raises(HistosynthError, match="unknown"):
        sample_shapes(model, 2, np.array([1, 9]))


# -- robustness -----------------------------------------------------------------------------------------
def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(library, tmp_path, monkeypatch):
    real = dvae_mod.vae_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, recon, kl = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 7 else loss), recon, kl

    monkeypatch.setattr(dvae_mod, "vae_loss", poisoned)
    with pytest.raises(HistosynthError, match=r"non-finite loss \(loss=nan\) at epoch 2, step 7") as err:
        train_dvae(library, tmp_path, latent_dim=2, epochs=3, **TRAIN)
    assert "checkpoint.pt (step 5)" in str(err.value)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 5
    assert not (tmp_path / "dvae.pt").exists()


def test_empty_or_missing_library(tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, shapes=np.zeros((0, 64, 64), np.uint8), types=np.zeros(0, np.uint8),
             areas=np.zeros(0, np.float32), scales=np.zeros(0, np.float32), slides=np.array([], str),
             centroids=np.zeros((0, 2)), classes=np.asarray("{}"), mpp=np.asarray(0.5))
    with pytest.raises(HistosynthError, match="empty library"):
        train_dvae(empty, tmp_path / "out", **TRAIN)
    with pytest.raises(HistosynthError, match="not found"):
        train_dvae(tmp_path / "none.npz", tmp_path / "out", **TRAIN)


def test_holdout_is_stratified_and_seeded():
    types = np.array([1] * 50 + [2] * 20 + [3] * 1)
    train, hold = split_holdout(types, 0.1, seed=0)
    assert np.bincount(types[hold], minlength=4).tolist() == [0, 5, 2, 0]
    assert len(np.intersect1d(train, hold)) == 0 and len(train) + len(hold) == len(types)
    assert np.array_equal(hold, split_holdout(types, 0.1, seed=0)[1])
    assert not np.array_equal(hold, split_holdout(types, 0.1, seed=1)[1])
    assert np.array_equal(epoch_order(30, 0, 2), epoch_order(30, 0, 2))
    assert not np.array_equal(epoch_order(30, 0, 2), epoch_order(30, 0, 3))


# -- resume ---------------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


def _count_steps(monkeypatch, kill_after=None):
    """Count the optimizer steps (calls of the loss); the one after ``kill_after`` dies, as a kill would."""
    real = dvae_mod.vae_loss
    steps = []

    def loss(*args, **kwargs):
        if kill_after is not None and len(steps) == kill_after:
            raise _Killed(kill_after)
        steps.append(len(steps) + 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dvae_mod, "vae_loss", loss)
    return steps


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("checkpoint_steps, kill_at", [(0, 12), (3, 8)])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(library, trained, tmp_path, checkpoint_steps, kill_at,
                                                            monkeypatch):
    ref_dir, _ = trained  # 3 epochs x 5 steps, latent 4, uninterrupted
    out = tmp_path / "resumed"
    with monkeypatch.context() as m, pytest.raises(_Killed):
        _count_steps(m, kill_after=kill_at)
        train_dvae(library, out, latent_dim=4, epochs=3, checkpoint_steps=checkpoint_steps, **TRAIN)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == (10 if checkpoint_steps == 0 else 6)
    assert ckpt["batch"] == (0 if checkpoint_steps == 0 else 1)
    assert not (out / "dvae.pt").exists()
    steps = _count_steps(monkeypatch)
    train_dvae(library, out, latent_dim=4, epochs=3, checkpoint_steps=checkpoint_steps, **TRAIN)
    assert len(steps) == 15 - ckpt["step"]  # it resumed: only the missing steps ran
    ref, got = _weights(ref_dir / "dvae.pt"), _weights(out / "dvae.pt")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    table = pd.read_csv(out / "log.csv")
    assert list(table["epoch"]) == [1, 2, 3]
    np.testing.assert_allclose(table["train_loss"], pd.read_csv(ref_dir / "log.csv")["train_loss"], rtol=1e-6)


@pytest.mark.parametrize("term_at", [7, 10])  # mid-epoch; the last batch of an epoch (the checkpoint ends it)
def test_sigterm_saves_at_the_step_and_the_resumed_run_equals_an_uninterrupted_one(library, trained, tmp_path,
                                                                                    monkeypatch, term_at):
    """SIGTERM during optimizer step ``term_at``: the step completes, checkpoint.pt is written there, Terminated
    says so; the rerun trains only the missing steps and ends with the uninterrupted run's weights and log."""
    ref_dir, _ = trained
    out = tmp_path / "stopped"
    real = dvae_mod.vae_loss
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as m, pytest.raises(Terminated, match=rf"checkpoint.pt \(step {term_at}\)"):
        m.setattr(dvae_mod, "vae_loss", loss)
        train_dvae(library, out, latent_dim=4, epochs=3, **TRAIN)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == term_at and not (out / "dvae.pt").exists()
    steps = _count_steps(monkeypatch)
    train_dvae(library, out, latent_dim=4, epochs=3, **TRAIN)
    assert len(steps) == 15 - term_at
    ref, got = _weights(ref_dir / "dvae.pt"), _weights(out / "dvae.pt")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    np.testing.assert_allclose(pd.read_csv(out / "log.csv")["train_loss"],
                               pd.read_csv(ref_dir / "log.csv")["train_loss"], rtol=1e-6)


def test_checkpoint_with_other_settings_is_not_resumed(library, tmp_path, caplog):
    train_dvae(library, tmp_path, latent_dim=2, epochs=1, **TRAIN)
    with caplog.at_level("WARNING"):
        report = train_dvae(library, tmp_path, latent_dim=2, epochs=1, beta=2.0, **TRAIN)
    assert "other settings (beta)" in caplog.text
    assert report["step"] == 5  # trained afresh, not resumed past the end


@settings(deadline=None)
@given(epochs=st.integers(1, 50), per_epoch=st.integers(1, 40), min_steps=st.integers(0, 2000))
def test_epochs_for_reaches_min_steps_and_never_lowers_epochs(epochs, per_epoch, min_steps):
    raised = epochs_for(epochs, per_epoch, min_steps)
    assert raised >= epochs and raised * per_epoch >= min_steps
    assert raised == epochs or (raised - 1) * per_epoch < min_steps  # no more epochs than needed


def test_small_library_trains_at_least_min_steps(library, tmp_path, caplog):
    # 36 training shapes in batches of 8: 5 steps per epoch; 1 epoch asked, 12 steps at least -> 3 epochs
    with caplog.at_level("INFO"):
        report = train_dvae(library, tmp_path, latent_dim=2, epochs=1, **{**TRAIN, "min_steps": 12})
    assert (report["epochs"], report["epochs_requested"], report["step"]) == (3, 1, 15)
    assert len(pd.read_csv(tmp_path / "log.csv")) == 3
    assert "3 epochs instead of 1" in caplog.text and "min_steps = 12" in caplog.text
    with pytest.raises(HistosynthError, match="min_steps"):
        train_dvae(library, tmp_path / "bad", latent_dim=2, epochs=1, **{**TRAIN, "min_steps": -1})


# -- sweep and CLI --------------------------------------------------------------------------------------
def test_sweep_writes_one_model_per_latent_size(library, tmp_path):
    result = dvae_sweep(library, tmp_path, latent_dims=(2, 3), epochs=1, **TRAIN)
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert list(table["latent_dim"]) == [2, 3]
    assert {"final_train_loss", "holdout_bce", "holdout_dice", "holdout_mse", "holdout_mse_kl",
            "seconds"} <= set(table.columns)
    assert (tmp_path / "sweep.png").stat().st_size > 0 and len(result["rows"]) == 2
    assert load_dvae(tmp_path / "latent-3" / "dvae.pt").latent_dim == 3


def test_cli_flags():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_cli(sub)
    args = parser.parse_args(["train-dvae", "lib.npz", "out", "--latent-dim", "12", "--beta", "2", "--epochs", "5",
                              "--batch-size", "64", "--lr", "0.01", "--seed", "3", "--device", "cpu",
                              "--threads", "2", "--conditional", "--checkpoint-every", "2", "--min-steps", "40",
                              "--loss", "mse"])
    assert args.loss == "mse"
    assert (args.latent_dim, args.beta, args.epochs, args.batch_size, args.lr, args.seed, args.device,
            args.threads, args.conditional, args.checkpoint_every, args.min_steps) == (12, 2.0, 5, 64, 0.01, 3, "cpu",
                                                                                        2, True, 2, 40)
    args = parser.parse_args(["dvae-sweep", "lib.npz", "out", "--latent-dims", "8", "10"])
    assert args.latent_dims == [8, 10] and args.func.__name__ == "_run_sweep"
