"""The mask → H&E generators by name (gan.generator): shapes, gradients, checkpoints, training, resume, CLI."""

from __future__ import annotations

import logging

import pytest
import torch

from histosynth.cli import build_parser, main
from histosynth.errors import HistosynthError
from histosynth.gan import train as tg
from histosynth.gan.conditioning import build_conditioning
from histosynth.gan.train import sample_batch, train_gan
from histosynth.io.pool import load_pool
from histosynth.models import generators
from histosynth.models.daff import DaffGenerator
from histosynth.models.generators import GENERATORS, build_generator, define_G
from histosynth.models.pix2pix import gan_checkpoint_dict, generate, load_gan
from histosynth.models.pix2pixhd import Pix2PixHDGenerator
from histosynth.models.spade import SpadeGenerator
from histosynth.models.unet import UnetGenerator
from tests.test_train_gan import TINY, _write_set

torch.set_num_threads(1)

#: (kind, settings) of a tiny generator of each kind; every one takes 32-px input
TINY_G = {
    "unet": ("unet", dict(depth=3, width=4)),
    "pix2pixhd": ("pix2pixhd", dict(width=4, n_down=2, n_blocks=1)),
    "pix2pixhd-local": ("pix2pixhd", dict(width=4, n_down=1, n_blocks=1, local_enhancer=True)),
    "spade": ("spade", dict(width=4, n_down=2)),
}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return [_write_set(root / "a", "slide-a", seed=1), _write_set(root / "b", "slide-b", seed=2)]


def test_the_registry_names_every_kind():
    assert GENERATORS == {"unet": UnetGenerator, "pix2pixhd": Pix2PixHDGenerator, "daff": DaffGenerator,
                          "spade": SpadeGenerator}
    with pytest.raises(HistosynthError, match="generator must be one of.*'vae'"):
        define_G("vae", 5)


@pytest.mark.parametrize("name", TINY_G)
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_each_kind_maps_the_conditioning_to_an_image_and_trains_every_parameter(name, norm):
    kind, settings = TINY_G[name]
    torch.manual_seed(0)
    g = define_G(kind, 5, norm=norm, **settings)
    assert g.config["kind"] == kind and g.config["in_ch"] == 5
    check_maps_trains_and_rebuilds(g)


def check_maps_trains_and_rebuilds(g) -> None:
    """A generator of 5 input channels: images in [-1, 1], a gradient to every parameter, deterministic in
    inference mode (but the U-Net, which keeps dropout on), rebuilt from its config."""
    x = torch.randn(2, 5, 32, 32)
    y = g(x)
    assert y.shape == (2, 3, 32, 32) and y.min() >= -1 and y.max() <= 1 and y.std() > 0
    ((y - torch.rand_like(y)) ** 2).mean().backward()
    dead = [n for n, p in g.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"{g.kind}: no gradient reaches {dead}"
    g.set_inference_mode()
    with torch.no_grad():
        assert torch.equal(g(x[:1]), g(x[:1])) or g.kind == "unet"  # only the U-Net keeps dropout on
    rebuilt = build_generator(g.config)
    assert type(rebuilt) is type(g) and rebuilt.config == g.config
    rebuilt.load_state_dict(g.state_dict(), strict=True)


def test_define_g_takes_each_kinds_own_settings():
    all_settings = dict(depth=3, width=4, max_width=16, dropout_innermost=3, dropout_at_inference=True, n_down=2,
                        n_blocks=1, local_enhancer=False, norm="instance", attention_recurrence=1)
    assert set(define_G("unet", 5, **all_settings).config) == {
        "kind", "in_ch", "out_ch", "depth", "width", "max_width", "dropout_innermost", "norm", "dropout_at_inference"}
    assert set(define_G("pix2pixhd", 5, **all_settings).config) == {
        "kind", "in_ch", "out_ch", "width", "n_down", "n_blocks", "norm", "local_enhancer"}
    assert set(define_G("daff", 5, **all_settings).config) == {
        "kind", "in_ch", "out_ch", "width", "n_down", "n_blocks", "norm", "local_enhancer", "attention_recurrence"}
    assert set(define_G("spade", 5, **all_settings).config) == {"kind", "in_ch", "out_ch", "width", "n_down", "norm"}


def test_multiples_and_indivisible_input():
    assert define_G("unet", 5, depth=3, width=4).multiple == 8
    assert define_G("pix2pixhd", 5, width=4, n_down=3).multiple == 8
    assert define_G("pix2pixhd", 5, width=4, n_down=3, local_enhancer=True).multiple == 16
    assert define_G("spade", 5, width=4, n_down=3).multiple == 8
    g = define_G("pix2pixhd", 5, width=4, n_down=2, n_blocks=1, local_enhancer=True)
    with pytest.raises(HistosynthError, match=r"divisible by 8 .*local enhancer.*got 36x36"):
        g(torch.zeros(1, 5, 36, 36))
    with pytest.raises(HistosynthError, match="divisible by 4"):
        define_G("spade", 5, width=4, n_down=2)(torch.zeros(1, 5, 30, 32))
    with pytest.raises(HistosynthError, match="n_down >= 1"):
        SpadeGenerator(5, n_down=0)
    with pytest.raises(HistosynthError, match="norm"):
        Pix2PixHDGenerator(5, norm="group")


def test_the_local_enhancer_paints_with_both_branches():
    torch.manual_seed(0)
    g = define_G("pix2pixhd", 5, width=4, n_down=1, n_blocks=1, norm="instance", local_enhancer=True)
    assert g.global_net.model[1].out_channels == 8  # the global generator at twice the width
    g.set_inference_mode()
    x = torch.randn(1, 5, 32, 32)
    with torch.no_grad():
        before = g(x)
        for branch in (g.global_net, g.local_net.front):
            saved = {k: v.clone() for k, v in branch.state_dict().items()}
            for p in branch.parameters():
                p.mul_(1.5)
            assert not torch.allclose(g(x), before, atol=1e-4), branch
            branch.load_state_dict(saved)
        assert torch.equal(g(x), before)


# --------------------------------------------------------------------------- training and checkpoints
def _train(sets, out, monkeypatch, **kw):
    """train_gan with tiny settings; returns the trained generator as it is in memory at the end."""
    built = []
    real = generators.define_G

    def capture(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    with monkeypatch.context() as m:
        m.setattr(tg.generators, "define_G", capture)
        train_gan(sets, out, **{**TINY, "steps": 2, "decay_steps": 0, "checkpoint_every": 1, **kw})
    return built[0]


@pytest.mark.parametrize("name", ["pix2pixhd", "pix2pixhd-local", "spade"])
def test_train_load_generate_round_trip(sets, tmp_path, monkeypatch, name):
    kind, settings = TINY_G[name]
    trained = _train(sets, tmp_path, monkeypatch, generator=kind, **settings)
    bundle = load_gan(tmp_path / "gan.pt")
    assert type(bundle.generator) is GENERATORS[kind] and bundle.config["generator"] == trained.config
    assert bundle.config["train"]["generator"]["kind"] == kind and bundle.step == 2
    check_generate_equals_the_trained_model(bundle, trained, sets)


def check_generate_equals_the_trained_model(bundle, trained, sets) -> None:
    """generate() of the loaded bundle paints what the in-memory generator paints (inference mode)."""
    _, inst, types, _ = sample_batch(load_pool(sets), 2, 32, 0, 0)
    cond = build_conditioning(inst, types, bundle.n_types, 0, len(bundle.options))
    trained.set_inference_mode()
    with torch.no_grad():
        expected = trained(cond)
    assert torch.equal(generate(bundle, cond, seed=3), expected)


def _pix2pixhd_file(tmp_path):
    g = define_G("pix2pixhd", 6, width=4, n_down=1, n_blocks=1)
    path = tmp_path / "hd.pt"
    torch.save(gan_checkpoint_dict(g, options=["default"], classes={1: "E", 2: "L"}, n_types=2, noise=False,
                                   step=1), path)
    return torch.load(path, weights_only=True)


def test_a_checkpoint_loaded_as_another_generator_is_one_error_naming_the_file(tmp_path, capsys):
    ckpt = _pix2pixhd_file(tmp_path)
    assert ckpt["config"]["generator"]["kind"] == "pix2pixhd"
    ckpt["config"]["generator"]["kind"] = "spade"  # the settings of pix2pixhd under another name
    torch.save(ckpt, tmp_path / "kind.pt")
    with pytest.raises(HistosynthError, match=r"kind.pt.*does not fit .*spade generator.*n_blocks"):
        load_gan(tmp_path / "kind.pt")
    ckpt["config"]["generator"] = dict(define_G("spade", 6, width=4, n_down=1).config)  # spade's config, hd's state
    torch.save(ckpt, tmp_path / "state.pt")
    with pytest.raises(HistosynthError, match=r"state.pt.*does not fit .*spade generator"):
        load_gan(tmp_path / "state.pt")
    ckpt["config"]["generator"]["kind"] = "vae"
    torch.save(ckpt, tmp_path / "unknown.pt")
    with pytest.raises(HistosynthError, match=r"unknown.pt.*generator must be one of"):
        load_gan(tmp_path / "unknown.pt")
    assert main(["translate", str(tmp_path / "state.pt"), str(tmp_path / "masks"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state.pt" in err[0] and "does not fit" in err[0], err


def test_a_checkpoint_without_kind_is_a_unet(tmp_path):
    g = define_G("unet", 6, depth=3, width=4)
    ckpt = gan_checkpoint_dict(g, options=["default"], classes={1: "E"}, n_types=1, noise=False, step=1)
    del ckpt["config"]["generator"]["kind"]  # as written before generators had names
    torch.save(ckpt, tmp_path / "old.pt")
    bundle = load_gan(tmp_path / "old.pt")
    assert type(bundle.generator) is UnetGenerator and bundle.config["generator"]["kind"] == "unet"
    for a, b in zip(g.state_dict().values(), bundle.generator.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_generator_settings_are_refused_before_training(sets, tmp_path):
    cases = [
        (dict(generator="vae"), "generator must be one of"),
        (dict(generator="pix2pixhd", n_down=3, local_enhancer=True, crop=24), r"not divisible by 16 .*local enhancer"),
        (dict(generator="spade", n_down=3, crop=20), r"crop 20 is not divisible by 8 .*SPADE"),
        (dict(generator="unet", local_enhancer=True), "local_enhancer is part of the pix2pixhd generator"),
        (dict(generator="pix2pixhd", n_blocks=0), "n_blocks must be at least 1"),
        (dict(generator="pix2pixhd", n_down=5, crop=32), "too small for the pix2pixhd generator"),  # 1x1 bottleneck
    ]
    for kw, message in cases:
        with pytest.raises(HistosynthError, match=message):
            train_gan(sets, tmp_path / "o", **{**TINY, "steps": 1, **kw})
        assert not (tmp_path / "o").exists()


def test_resume_refuses_a_checkpoint_of_another_generator(sets, tmp_path, monkeypatch, caplog):
    kind, settings = TINY_G["pix2pixhd"]
    _train(sets, tmp_path, monkeypatch, generator=kind, **settings)
    with caplog.at_level(logging.WARNING, logger="histosynth.training"):
        _train(sets, tmp_path, monkeypatch, generator="spade", width=4, n_down=2)
    assert "written with other settings (generator); training starts afresh" in caplog.text
    assert type(load_gan(tmp_path / "gan.pt").generator) is SpadeGenerator


def test_an_old_unet_checkpoint_still_resumes(sets, tmp_path, monkeypatch, caplog):
    kind, settings = TINY_G["unet"]
    _train(sets, tmp_path, monkeypatch, generator=kind, **settings)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for holder in (ckpt["config"], ckpt["config"]["train"], ckpt["train"]):  # as before generators had names
        holder["generator"].pop("kind", None)  # (the two train entries may be one dict)
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with caplog.at_level(logging.INFO, logger="histosynth.training"):
        _train(sets, tmp_path, monkeypatch, generator=kind, steps=3, **settings)
    assert "other settings" not in caplog.text and "at step 2" in caplog.text
    assert load_gan(tmp_path / "gan.pt").step == 3


def test_cli_flags():
    parser = build_parser()
    base = ["train-gan", "ps", "out"]
    args = parser.parse_args(base)
    assert (args.generator, args.n_down, args.n_blocks, args.local_enhancer) == ("unet", 3, 3, False)
    args = parser.parse_args([*base, "--generator", "pix2pixhd", "--n-blocks", "9", "--n-down", "4",
                              "--local-enhancer"])
    assert (args.generator, args.n_down, args.n_blocks, args.local_enhancer) == ("pix2pixhd", 4, 9, True)
    assert parser.parse_args([*base, "--local-enhancer", "--no-local-enhancer"]).local_enhancer is False
    assert parser.parse_args([*base, "--generator", "spade"]).generator == "spade"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--generator", "vae"])
