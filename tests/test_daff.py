"""The DAFF-GAN generator (gan.generator: daff): criss-cross attention, remote skips, training, checkpoints, CLI."""

from __future__ import annotations

import pytest
import torch

from histosynth.cli import build_parser
from histosynth.errors import HistosynthError
from histosynth.gan.train import train_gan
from histosynth.models.daff import CrissCrossAttention, DaffGenerator, criss_cross_weights
from histosynth.models.generators import define_G
from histosynth.models.pix2pix import load_gan
from histosynth.models.pix2pixhd import STEM_LAYERS
from tests.test_generators import (  # noqa: F401 (sets is a fixture)
    _train,
    check_generate_equals_the_trained_model,
    check_maps_trains_and_rebuilds,
    sets,
)
from tests.test_train_gan import TINY

torch.set_num_threads(1)


def _attention(channels: int = 8, recurrence: int = 1, gamma: float = 0.7) -> CrissCrossAttention:
    torch.manual_seed(0)
    module = CrissCrossAttention(channels, recurrence).double()
    with torch.no_grad():
        module.gamma.fill_(gamma)
    return module


# --------------------------------------------------------------------------- criss-cross attention
def test_the_weights_are_a_softmax_over_the_row_and_the_column_with_the_pixel_once():
    torch.manual_seed(0)
    h, w = 5, 6
    weights = criss_cross_weights(torch.randn(2, 3, h, w), torch.randn(2, 3, h, w))
    assert weights.shape == (2, h, w, h + w)
    assert torch.allclose(weights.sum(-1), torch.ones(2, h, w))
    column = weights[..., :h]
    assert torch.all(column.diagonal(dim1=1, dim2=3) == 0)  # the pixel's own entry in its column: excluded
    assert torch.all((weights > 0).sum(-1) == h + w - 1)


def test_attention_keeps_the_shape_and_starts_as_the_identity():
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    fresh = CrissCrossAttention(8).double()
    assert fresh.gamma.item() == 0 and fresh.recurrence == 2
    assert fresh.query.out_channels == fresh.key.out_channels == 1 and fresh.value.out_channels == 8
    assert torch.equal(fresh(x), x)
    y = _attention(recurrence=2)(x)
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_one_pass_reaches_the_row_and_column_two_passes_reach_everything():
    x = torch.randn(1, 8, 7, 9, dtype=torch.float64)
    moved = x.clone()
    moved[..., 3, 4] += 1.0
    cross = torch.zeros(7, 9, dtype=torch.bool)
    cross[3, :] = cross[:, 4] = True
    with torch.no_grad():
        once = _attention(recurrence=1)
        changed = (once(moved) - once(x)).abs().sum(1)[0] > 1e-12
        assert torch.equal(changed, cross)
        twice = _attention(recurrence=2)
        assert torch.all((twice(moved) - twice(x)).abs().sum(1)[0] > 1e-12)


def test_gradients_reach_gamma_and_the_convs():
    module = _attention(recurrence=2)
    module(torch.randn(2, 8, 6, 5, dtype=torch.float64)).square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(HistosynthError, match="attention_recurrence must be at least 1"):
        CrissCrossAttention(8, recurrence=0)


# --------------------------------------------------------------------------- the generator
@pytest.mark.parametrize("local_enhancer", [False, True])
def test_the_generator_paints_and_trains_every_parameter(local_enhancer):
    torch.manual_seed(0)
    g = define_G("daff", 5, width=4, n_down=2 - local_enhancer, n_blocks=1, local_enhancer=local_enhancer,
                 attention_recurrence=2, norm="instance")
    assert isinstance(g, DaffGenerator) and g.config["kind"] == "daff" and g.multiple == 4
    attentions = [m for m in g.modules() if isinstance(m, CrissCrossAttention)]
    assert len(attentions) == 1 + local_enhancer
    with torch.no_grad():  # gamma starts at 0, where no gradient reaches the attention's convs
        for m in attentions:
            m.gamma.fill_(0.5)
    check_maps_trains_and_rebuilds(g)


def test_attention_sits_before_the_residual_blocks_and_the_remote_skips_count():
    torch.manual_seed(0)
    g = define_G("daff", 5, width=4, n_down=1, n_blocks=1, norm="instance", local_enhancer=True)
    g.set_inference_mode()
    seen = {}
    for name, net in (("global", g.global_net), ("local", g.local_net)):
        net.attention.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0].shape}))
    x = torch.randn(1, 5, 32, 32)
    G1, G2 = g.global_net, g.local_net
    with torch.no_grad():
        out = g(x)
        # G1 at 16 px and width 8: bottleneck 16 channels at 8 px; G2's fused features: 8 channels at 16 px
        assert seen == {"global": (1, 16, 8, 8), "local": (1, 8, 16, 16)}
        half = g.downsample(x)
        g_stem = G1.model[:STEM_LAYERS](half)
        g_deep = G1.model[G1.blocks_start:](G1.attention(G1.model[STEM_LAYERS:G1.blocks_start](g_stem)))
        l_stem = G2.front[:STEM_LAYERS](x)

        def local(global_features: torch.Tensor, skip: bool) -> torch.Tensor:
            fused = G2.front[STEM_LAYERS:](l_stem) + global_features
            return g.head(G2.back(G2.attention(fused)) + (l_stem if skip else 0))

        assert torch.allclose(local(g_deep + g_stem, skip=True), out, atol=1e-6)  # the forward, spelled out
        assert not torch.allclose(local(g_deep, skip=True), out, atol=1e-4)  # without G1's remote skip
        assert not torch.allclose(local(g_deep + g_stem, skip=False), out, atol=1e-4)  # without G2's


def test_bad_settings_are_one_error_before_training(sets, tmp_path):  # noqa: F811
    cases = [
        (dict(generator="daff", n_down=2, local_enhancer=True, crop=20), r"not divisible by 8 .*local enhancer"),
        (dict(generator="daff", attention_recurrence=0), "attention_recurrence must be at least 1"),
    ]
    for kw, message in cases:
        with pytest.raises(HistosynthError, match=message):
            train_gan(sets, tmp_path / "o", **{**TINY, "steps": 1, **kw})
        assert not (tmp_path / "o").exists()
    with pytest.raises(HistosynthError, match="attention_recurrence must be at least 1"):
        DaffGenerator(5, attention_recurrence=0)


def test_other_generators_ignore_the_recurrence():
    assert define_G("pix2pixhd", 5, width=4, n_down=1, attention_recurrence=3).config["kind"] == "pix2pixhd"
    assert "attention_recurrence" not in define_G("unet", 5, depth=3, width=4, attention_recurrence=3).config


@pytest.mark.parametrize("local_enhancer", [False, True])
def test_train_load_generate_round_trip(sets, tmp_path, monkeypatch, local_enhancer):  # noqa: F811
    trained = _train(sets, tmp_path, monkeypatch, generator="daff", width=4, n_down=2 - local_enhancer,
                     n_blocks=1, local_enhancer=local_enhancer, attention_recurrence=1, gan_mode="vanilla")
    assert trained.global_net.attention.gamma.item() != 0  # the attention was trained
    bundle = load_gan(tmp_path / "gan.pt")
    assert type(bundle.generator) is DaffGenerator and bundle.config["generator"] == trained.config
    assert bundle.config["generator"]["attention_recurrence"] == 1 and bundle.step == 2
    check_generate_equals_the_trained_model(bundle, trained, sets)


def test_cli_flag():
    parser = build_parser()
    base = ["train-gan", "ps", "out"]
    assert parser.parse_args(base).attention_recurrence == 2
    args = parser.parse_args([*base, "--generator", "daff", "--attention-recurrence", "3", "--local-enhancer"])
    assert (args.generator, args.attention_recurrence, args.local_enhancer) == ("daff", 3, True)
