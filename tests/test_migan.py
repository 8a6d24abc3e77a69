"""MI-GAN (models.migan, multifocus.train): network shapes at the paper's sizes, the 5-D gradient penalty,
tiny G1 / G2 trainings (resume, --init-from), sampling a stack set, and each bad input named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.models import migan
from histosynth.models.pix2pix import critic_penalty, interpolate
from histosynth.multifocus.stackset import StackSetWriter, read_stackset
from histosynth.multifocus.train import centre_indices, sample_stacks, train_g1, train_g2

TINY_G1 = {"z_dim": 8, "width": 4, "critic_width": 4}
TINY_G2 = {"width": 4, "code_channels": 4, "res_blocks": 1, "critic_width": 4}
RUN = {"batch_size": 2, "n_critic": 2, "seed": 1, "device": "cpu", "threads": 1, "progress": False,
       "checkpoint_every": 100, "log_every": 1, "sample_every": 100}


def blob_stacks(path, n=4, planes=3, size=64, seed=0):
    """A stack set of ``n`` cells: a dark disk, sharpest at a random best plane, blurred away from it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with StackSetWriter(path, planes, (size, size), [float(k) for k in range(planes)]) as w:
        for i in range(n):
            best = int(rng.integers(0, planes))
            r = rng.uniform(size / 8, size / 4)
            d = np.hypot(yy - size / 2 - rng.uniform(-4, 4), xx - size / 2 - rng.uniform(-4, 4))
            stack = np.empty((planes, size, size, 3), np.uint8)
            for k in range(planes):
                edge = 1.0 + 3.0 * abs(k - best)
                inside = 1 / (1 + np.exp((d - r) / edge))
                stack[k] = (230 - 150 * inside[..., None] * np.array([0.6, 1.0, 0.5])).astype(np.uint8)
            w.add({"slide": "s", "x": i, "y": i, "best_plane": best, "source": "real"}, stack)
    return path


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    return blob_stacks(tmp_path_factory.mktemp("migan") / "stacks")


# --------------------------------------------------------------------------- the networks
def test_networks_have_the_paper_shapes():
    with torch.no_grad():
        G1, D1 = migan.define_g1()  # z 100, the DCGAN widths
        img = G1(torch.randn(2, 100))
        assert img.shape == (2, 3, 64, 64) and img.abs().max() <= 1
        assert D1(img).shape == (2,)
        G2, D2 = migan.define_g2(planes=11)
        stack = G2(img)
        assert stack.shape == (2, 11, 3, 64, 64) and G2.center == 5
        assert D2(stack).shape == (2,)
    assert len(G2.encoders) == len(G2.decoders) == 11 and len(G2.resnet) == 7
    assert sum(isinstance(m, torch.nn.Conv2d) for m in D1.modules()) == 6
    assert sum(isinstance(m, torch.nn.Conv3d) for m in D2.modules()) == 6
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)) for m in (*D1.modules(), *D2.modules()))


def test_gradient_penalty_on_stacks_is_the_closed_form_on_a_linear_critic():
    w = torch.randn(3, 2, 3, 4, 4)
    real, fake = torch.randn(5, 3, 2, 3, 4, 4), torch.randn(5, 3, 2, 3, 4, 4)
    x = interpolate(real, fake, torch.Generator().manual_seed(0))
    eps = torch.rand(5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, eps.view(5, 1, 1, 1, 1, 1) * real + (1 - eps.view(5, 1, 1, 1, 1, 1)) * fake)
    gp = critic_penalty(lambda v: (v * w).flatten(1).sum(1), x)  # grad is w for every sample
    assert torch.allclose(gp, (w.norm() - 1) ** 2)


def test_centring_puts_the_best_plane_in_the_middle():
    assert centre_indices(5, 11, 11).tolist() == list(range(11))
    assert centre_indices(0, 5, 5).tolist() == [0, 0, 0, 1, 2]
    assert centre_indices(4, 5, 5).tolist() == [2, 3, 4, 4, 4]


# --------------------------------------------------------------------------- training
def test_g1_and_g2_train_resume_and_sample(stacks, tmp_path):
    r1 = train_g1([stacks], tmp_path / "g1", steps=2, **TINY_G1, **RUN)
    assert r1["step"] == 2 and np.isfinite(r1["W"])
    log = (tmp_path / "g1" / "log.csv").read_text().splitlines()
    assert log[0] == "step,G_loss,D_real,D_fake,D_gp,W,lr,seconds" and len(log) == 3
    assert (tmp_path / "g1" / "samples.png").stat().st_size > 0
    train_g2([stacks], tmp_path / "g1" / "g1.pt", tmp_path / "whole", steps=2, **TINY_G2, **RUN)
    assert (tmp_path / "whole" / "samples.png").stat().st_size > 0
    # stopped after one step, then resumed to two: the weights of the uninterrupted run
    train_g2([stacks], None, tmp_path / "resumed", steps=1, **TINY_G2, **RUN)
    train_g2([stacks], None, tmp_path / "resumed", steps=2, **TINY_G2, **RUN)
    a = torch.load(tmp_path / "whole" / "g2.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "g2.pt", weights_only=True)
    assert all(torch.equal(a["generator"][k], b["generator"][k]) for k in a["generator"])
    assert all(torch.equal(a["critic"][k], b["critic"][k]) for k in a["critic"])
    assert a["plane_offsets_um"] == [-1.0, 0.0, 1.0]

    out = tmp_path / "synthetic"
    sample_stacks(tmp_path / "g1" / "g1.pt", tmp_path / "whole" / "g2.pt", out, n=3, seed=4, batch_size=2,
                  device="cpu")
    ss = read_stackset(out)
    assert ss.stacks.shape == (3, 3, 64, 64, 3) and ss.plane_offsets_um == [-1.0, 0.0, 1.0]
    assert (ss.index["best_plane"] == 1).all() and (ss.index["source"] == "synthetic").all()
    assert (ss.index["x"] == -1).all() and (ss.index["y"] == -1).all()
    again = tmp_path / "again"
    sample_stacks(tmp_path / "g1" / "g1.pt", tmp_path / "whole" / "g2.pt", again, n=3, seed=4, device="cpu")
    assert np.array_equal(read_stackset(again).stacks, ss.stacks)  # batch size does not change the draw


def test_init_from_starts_from_the_trained_model_and_refuses_another_architecture(stacks, tmp_path):
    train_g1([stacks], tmp_path / "a", steps=1, **TINY_G1, **RUN)
    first = torch.load(tmp_path / "a" / "g1.pt", weights_only=True)
    train_g1([stacks], tmp_path / "b", steps=1, init_from=str(tmp_path / "a" / "g1.pt"), **TINY_G1,
             **{**RUN, "n_critic": 1})
    fresh = torch.load(tmp_path / "b" / "g1.pt", weights_only=True)
    assert fresh["train"]["init_from"] == str(tmp_path / "a" / "g1.pt")
    # one step of lr 1e-4 from the trained weights stays near them, far from a fresh init
    key = "up.0.0.weight"
    assert (fresh["generator"][key] - first["generator"][key]).abs().max() < 1e-3
    with pytest.raises(HistosynthError, match="another architecture: generator.width 4"):
        train_g1([stacks], tmp_path / "c", steps=1, init_from=str(tmp_path / "a" / "g1.pt"),
                 **{**TINY_G1, "width": 8}, **RUN)
    with pytest.raises(HistosynthError, match="G1 checkpoint; this trains G2"):
        train_g2([stacks], None, tmp_path / "d", steps=1, init_from=str(tmp_path / "a" / "g1.pt"), **TINY_G2, **RUN)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_clear_error_each(stacks, tmp_path):
    with pytest.raises(HistosynthError, match="fewer than one batch"):
        train_g1([stacks], tmp_path / "x", steps=1, **TINY_G1, **{**RUN, "batch_size": 5})
    small = blob_stacks(tmp_path / "small", n=2, size=32)
    with pytest.raises(HistosynthError, match="cells of 32 x 32 px; MI-GAN's networks take 64 x 64"):
        train_g1([small], tmp_path / "x", steps=1, **TINY_G1, **RUN)
    five = blob_stacks(tmp_path / "five", n=2, planes=5)
    train_g2([stacks], None, tmp_path / "g2", steps=1, **TINY_G2, **RUN)
    with pytest.raises(HistosynthError, match="makes 3 planes; the stacks have 5"):
        train_g2([five], None, tmp_path / "y", steps=1, init_from=str(tmp_path / "g2" / "g2.pt"), **TINY_G2, **RUN)
    with pytest.raises(HistosynthError, match="5 planes, but"):
        train_g2([stacks, five], None, tmp_path / "y", steps=1, **TINY_G2, **RUN)
    with pytest.raises(HistosynthError, match="MI-GAN G2 checkpoint where G1 is needed"):
        sample_stacks(tmp_path / "g2" / "g2.pt", tmp_path / "g2" / "g2.pt", tmp_path / "z", n=1, device="cpu")


def test_cli_trains_both_and_samples(stacks, tmp_path, capsys):
    tiny = ["--z-dim", "8", "--width", "4", "--critic-width", "4", "--steps", "1", "--batch-size", "2",
            "--n-critic", "1", "--device", "cpu"]
    assert main(["train-migan-g1", str(stacks), str(tmp_path / "g1"), *tiny]) == 0
    tiny2 = ["--width", "4", "--code-channels", "4", "--res-blocks", "1", "--critic-width", "4", "--steps", "1",
             "--batch-size", "2", "--n-critic", "1", "--device", "cpu"]
    assert main(["train-migan-g2", str(stacks), str(tmp_path / "g2"), "--g1", str(tmp_path / "g1" / "g1.pt"),
                 *tiny2]) == 0
    assert main(["sample-stacks", str(tmp_path / "g1" / "g1.pt"), str(tmp_path / "g2" / "g2.pt"),
                 str(tmp_path / "out"), "--n", "2", "--device", "cpu"]) == 0
    assert len(read_stackset(tmp_path / "out")) == 2
    assert main(["train-migan-g2", str(stacks), str(tmp_path / "g3"), "--init-from",
                 str(tmp_path / "g1" / "g1.pt"), *tiny2]) == 2
    assert "this trains G2" in capsys.readouterr().err
