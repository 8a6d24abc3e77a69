"""Few-image GAN training (#15): DiffAugment, the EMA generator, WGAN-GP, spectral norm, seed 001's global D."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from histosynth.cli import build_parser
from histosynth.errors import HistosynthError
from histosynth.gan import diffaugment as da
from histosynth.gan import train as tg
from histosynth.gan.train import ema_decay, train_gan, update_ema
from histosynth.models import pix2pix as p2p
from histosynth.models.pix2pix import GANLoss, define_D, gradient_penalty, load_gan
from tests.test_train_gan import TINY, _write_set

torch.set_num_threads(1)

ALL = ["color", "translation", "cutout"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return [_write_set(root / "a", "slide-a", seed=1), _write_set(root / "b", "slide-b", seed=2)]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return [_write_set(tmp_path_factory.mktemp("big") / "s", "s", n=2, size=64)]


def _pair(n=4, side=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, side, side, generator=gen) * 2 - 1
    cond = torch.rand(n, 5, side, side, generator=gen) * 2 - 1
    return image, cond


# -- DiffAugment ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ALL)
def test_each_policy_changes_the_input_and_is_differentiable(policy):
    image, cond = _pair()
    image.requires_grad_(True)
    cond.requires_grad_(True)
    out_image, out_cond = da.diff_augment(image, cond, [policy], torch.Generator().manual_seed(1))
    assert out_image.shape == image.shape and out_cond.shape == cond.shape
    assert not torch.equal(out_image, image)
    (out_image.square().sum() + out_cond.square().sum()).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    if policy == "color":  # colour is for the image only
        assert out_cond is cond
    else:
        assert not torch.equal(out_cond, cond)


@pytest.mark.parametrize("policies", [["translation"], ["cutout"], ["translation", "cutout"], ALL])
def test_geometric_policies_move_image_and_conditioning_together(policies):
    image, _ = _pair()
    cond = image.clone()  # the conditioning a copy of the image: the same transform keeps them equal
    out_image, out_cond = da.diff_augment(image, cond, [p for p in policies if p != "color"],
                                          torch.Generator().manual_seed(2))
    assert torch.equal(out_image, out_cond)
    # with colour (image only) first, the same geometry still zeroes the same pixels of both
    out_image, out_cond = da.diff_augment(image, cond, policies, torch.Generator().manual_seed(2))
    erased = (out_cond == 0).all(1)
    assert erased.any() and torch.equal(erased, (out_image == 0).all(1))


def test_translation_shifts_within_an_eighth_and_cutout_zeroes_half_a_side():
    side = 32
    image = torch.zeros(64, 3, side, side)
    image[:, :, 16, 16] = 1.0
    moved = da.translation(image, torch.Generator().manual_seed(3))
    ys, xs = [], []
    for b in range(64):
        y, x = (moved[b, 0] == 1).nonzero()[0].tolist()
        ys.append(y - 16)
        xs.append(x - 16)
    assert max(map(abs, ys + xs)) == side // 8 and len(set(ys)) > 3
    holes = da.cutout(torch.ones(64, 1, side, side), torch.Generator().manual_seed(4))
    zeros = (holes == 0).sum((1, 2, 3))
    assert zeros.max() == (side // 2) ** 2 and (zeros > 0).all()  # a 16x16 square, clipped at the border


def test_diffaugment_is_reproducible_from_a_seeded_generator():
    image, cond = _pair()
    a = da.diff_augment(image, cond, ALL, torch.Generator().manual_seed(5))
    b = da.diff_augment(image, cond, ALL, torch.Generator().manual_seed(5))
    c = da.diff_augment(image, cond, ALL, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # the order the policies are named in does not matter: they are applied as the paper orders them
    d = da.diff_augment(image, cond, ["cutout", "color", "translation"], torch.Generator().manual_seed(5))
    assert torch.equal(a[0], d[0])
    assert da.diff_augment(image, cond, [], None) == (image, cond)


def test_unknown_or_repeated_policies_are_errors():
    with pytest.raises(HistosynthError, match="among"):
        da.check_policies(["colour"])
    with pytest.raises(HistosynthError, match="twice"):
        da.check_policies(["cutout", "cutout"])
    assert da.check_policies("cutout") == ["cutout"]


# -- WGAN-GP -------------------------------------------------------------------------------------------------
class LinearCritic(nn.Module):
    """D(cond, x) = Σ w·input per scale (or a 1×1-conv logit map with ``patch``): its gradient is known."""

    def __init__(self, weights: list[torch.Tensor], patch: bool = False):
        super().__init__()
        self.weights = [nn.Parameter(w) for w in weights]
        self.patch = patch

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        if self.patch:
            return [[(x * w[:, None, None]).sum(1, keepdim=True)] for w in self.weights]
        return [[(x * w).sum((1, 2, 3))[:, None]] for w in self.weights]


def test_gradient_penalty_equals_the_closed_form_on_a_linear_critic():
    torch.manual_seed(0)
    cond, image = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8, 8)

    def penalty(critic: nn.Module) -> float:
        return float(gradient_penalty(critic, cond, image).detach())

    w = torch.randn(7, 8, 8) * 0.05
    norm = float(w[4:].norm())  # only the image channels' weights count: the conditioning is not interpolated
    assert penalty(LinearCritic([w])) == pytest.approx((norm - 1) ** 2, rel=1e-5)
    # two scales: the mean of their penalties
    w2 = torch.randn(7, 8, 8) * 0.5
    expected = ((norm - 1) ** 2 + (float(w2[4:].norm()) - 1) ** 2) / 2
    assert penalty(LinearCritic([w, w2])) == pytest.approx(expected, rel=1e-5)
    # a logit map: D's value per sample is the mean of its map, each pixel's weight is w / (H W)
    v = torch.randn(7)
    assert penalty(LinearCritic([v], patch=True)) == pytest.approx((float(v[4:].norm()) * 8 / 64 - 1) ** 2,
                                                                   rel=1e-5)
    # the penalty trains the critic: it has a gradient with respect to D's weights
    critic = LinearCritic([w])
    gradient_penalty(critic, cond, image).backward()
    assert critic.weights[0].grad is not None and critic.weights[0].grad.abs().sum() > 0


def test_interpolates_lie_between_real_and_fake_and_the_wgan_loss():
    real, fake = torch.zeros(5, 3, 4, 4), torch.ones(5, 3, 4, 4, requires_grad=True)
    x = p2p.interpolate(real, fake, torch.Generator().manual_seed(0))
    assert not x.requires_grad and (x >= 0).all() and (x <= 1).all()
    assert all(len(x[b].unique()) == 1 for b in range(5)) and len(x[:, 0, 0, 0].unique()) == 5  # one ε per sample
    loss = GANLoss("wgan-gp")
    pred = torch.tensor([[1.0], [3.0]])
    assert float(loss(pred, True)) == -2.0 and float(loss(pred, False)) == 2.0
    assert float(loss(pred, True, for_discriminator=False)) == -2.0


# -- discriminators ------------------------------------------------------------------------------------------
def test_global_discriminator_is_seed_001s_table_3():
    d = define_D("global", in_ch=4, ndf=64, size=256)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 4, 4, 4), (128, 64, 4, 4), (256, 128, 4, 4),
                                                      (256, 256, 4, 4), (256, 256, 4, 4)]
    assert all(c.stride == (2, 2) for c in convs)
    linears = [m for m in d.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and tuple(linears[0].weight.shape) == (1, 8 * 8 * 256)
    feats = d.features(torch.zeros(2, 4, 256, 256))[0]
    assert [tuple(f.shape[1:]) for f in feats[:-1]] == [(64, 128, 128), (128, 64, 64), (256, 32, 32),
                                                        (256, 16, 16), (256, 8, 8)]
    assert tuple(feats[-1].shape) == (2, 1)  # one logit per image
    # at another crop the flatten follows it: (crop // 32)^2 * 4 ndf
    assert define_D("global", in_ch=4, ndf=8, size=64).head.in_features == 2 * 2 * 32
    with pytest.raises(HistosynthError, match="crop 16 is too small for the global discriminator"):
        define_D("global", in_ch=4, ndf=8, size=16)


@pytest.mark.parametrize("kind", ["patch", "global", "multiscale"])
def test_spectral_norm_on_every_layer_and_no_norm(kind):
    d = define_D(kind, in_ch=5, ndf=4, norm=None, size=64, spectral_norm=True)
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in d.modules())
    d(torch.randn(2, 5, 64, 64))  # a training forward: one power iteration
    for m in layers:
        w = m.weight.detach().flatten(1)
        assert float(torch.linalg.matrix_norm(w, ord=2)) == pytest.approx(1.0, abs=0.1)


# -- EMA -----------------------------------------------------------------------------------------------------
def test_ema_decay_warms_up_to_the_asked_decay():
    """min(decay, (1 + t) / (10 + t)): 0.1 at the first update, rising, never above the asked decay."""
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    seq = [ema_decay(0.999, t) for t in range(20000)]
    assert all(a <= b for a, b in zip(seq, seq[1:])) and max(seq) == 0.999
    assert ema_decay(0.5, 100) == 0.5
    # what the warm-up is for: after 700 updates the initial weights' share prod(d_t) is negligible
    share = float(np.prod(seq[:700]))
    assert share < 1e-6 and 0.999 ** 700 > 0.49


def test_update_ema_averages_parameters_and_copies_buffers():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    ema = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    before = [p.detach().clone() for p in ema.parameters()]
    model[1].running_mean.fill_(3.0)
    update_ema(ema, model, 0.75)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.75 * b + 0.25 * p)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)


# -- training ------------------------------------------------------------------------------------------------
def _ckpt(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("disc", ["patch", "global", "multiscale"])
def test_few_image_training_on_each_discriminator(sets, big, tmp_path, disc):
    kw = dict(TINY, crop=64, batch_size=1) if disc == "multiscale" else dict(TINY)
    data = big if disc == "multiscale" else sets
    report = train_gan(data, tmp_path, disc=disc, diffaugment=ALL, ema=0.5, gan_mode="wgan-gp", lambda_gp=10.0,
                       spectral_norm=True, steps=2, decay_steps=1, checkpoint_every=10, **kw)
    assert all(pd.notna(report[k]) for k in ("G_gan", "G_l1", "D_real", "D_fake", "D_gp"))
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log.columns) == ["step", "G_gan", "G_l1", "G_fm", "D_real", "D_fake", "D_gp", "lr", "seconds"]
    ckpt = _ckpt(tmp_path / "checkpoint.pt")
    assert ckpt["train"]["d_norm"] == "none" and ckpt["train"]["diffaugment"] == ALL
    assert not any("running_mean" in k for k in ckpt["discriminator"])  # wgan-gp: no BatchNorm in D
    assert any("parametrizations" in k for k in ckpt["discriminator"])
    bundle = load_gan(tmp_path / "gan.pt")
    assert bundle.config["ema"] == 0.5 and bundle.step == 3
    state = bundle.generator.state_dict()
    assert all(torch.equal(state[k], ckpt["generator_ema"][k]) for k in state)
    assert not all(torch.equal(state[k], ckpt["generator"][k]) for k in state)  # the average, not the raw G


def test_options_off_train_todays_weights_and_ema_leaves_training_alone(sets, tmp_path):
    kw = dict(TINY, steps=3, decay_steps=1, checkpoint_every=10, noise=True)
    train_gan(sets, tmp_path / "plain", **kw)
    train_gan(sets, tmp_path / "off", diffaugment=[], ema=0.0, lambda_gp=3.0, spectral_norm=False, **kw)
    train_gan(sets, tmp_path / "ema", ema=0.9, **kw)
    plain, off, ema = (_ckpt(tmp_path / name / "checkpoint.pt") for name in ("plain", "off", "ema"))
    for part in ("generator", "discriminator"):
        assert all(torch.equal(plain[part][k], off[part][k]) for k in plain[part])
        assert all(torch.equal(plain[part][k], ema[part][k]) for k in plain[part])  # the raw G trains as before
    assert "generator_ema" not in plain and "ema" not in _ckpt(tmp_path / "plain" / "gan.pt")["config"]
    gan = _ckpt(tmp_path / "plain" / "gan.pt")["generator"]
    assert all(torch.equal(gan[k], plain["generator"][k]) for k in gan)


def test_wgan_gp_keeps_instance_norm_in_d(sets, tmp_path):
    train_gan(sets, tmp_path, gan_mode="wgan-gp", norm="instance", disc="patch", steps=1, decay_steps=0,
              checkpoint_every=10, **TINY)
    assert _ckpt(tmp_path / "checkpoint.pt")["train"]["d_norm"] == "instance"


def test_a_checkpoint_from_before_resumes_and_an_old_global_one_is_set_aside(sets, tmp_path, caplog):
    kw = dict(TINY, steps=2, decay_steps=0, checkpoint_every=1)
    for disc in ("patch", "global"):
        out = tmp_path / disc
        train_gan(sets, out, disc=disc, **kw)
        ckpt = _ckpt(out / "checkpoint.pt")
        for key in ("diffaugment", "ema", "lambda_gp", "spectral_norm", "d_norm"):  # as written before #15
            ckpt["train"].pop(key)
            ckpt["config"]["train"].pop(key, None)
        torch.save(ckpt, out / "checkpoint.pt")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="histosynth.training"):
            train_gan(sets, out, disc=disc, **dict(kw, steps=3))
        if disc == "patch":
            assert "other settings" not in caplog.text and "at step 2" in caplog.text
        else:
            assert "written with other settings (disc)" in caplog.text


def test_bad_few_image_settings_are_refused_before_training(sets, tmp_path):
    cases = [
        ({"diffaugment": ["colour"]}, "diffaugment policies must be among"),
        ({"diffaugment": ["cutout", "cutout"]}, "names a policy twice"),
        ({"ema": 1.0}, r"ema .* must be in \[0, 1\)"),
        ({"ema": -0.1}, r"ema .* must be in \[0, 1\)"),
        ({"lambda_gp": -1.0}, "lambdas >= 0"),
        ({"disc": "global", "crop": 16}, "crop 16 is too small for the global discriminator"),
        ({"disc": "global", "batch_size": 1}, "BatchNorm needs batch_size > 1"),
    ]
    for kw, message in cases:
        with pytest.raises(HistosynthError, match=message):
            train_gan(sets, tmp_path / "o", **{**TINY, "steps": 1, **kw})
        assert not (tmp_path / "o").exists()


def test_cli_flags(monkeypatch):
    parser = build_parser()
    base = ["train-gan", "ps", "out"]
    args = parser.parse_args(base)
    assert (args.diffaugment, args.ema, args.lambda_gp, args.spectral_norm) == ([], 0.0, 10, False)
    args = parser.parse_args([*base, "--diffaugment", "color", "cutout", "--ema", "0.999", "--lambda-gp", "5",
                              "--spectral-norm", "--gan-mode", "wgan-gp"])
    assert (args.diffaugment, args.ema, args.lambda_gp, args.spectral_norm, args.gan_mode) == (
        ["color", "cutout"], 0.999, 5.0, True, "wgan-gp")
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--diffaugment", "rotation"])
    seen = {}
    monkeypatch.setattr(tg, "train_gan", lambda *a, **kw: seen.update(kw))
    args.func(args)
    assert {k: seen[k] for k in ("diffaugment", "ema", "lambda_gp", "spectral_norm", "gan_mode")} == {
        "diffaugment": ["color", "cutout"], "ema": 0.999, "lambda_gp": 5.0, "spectral_norm": True,
        "gan_mode": "wgan-gp"}
