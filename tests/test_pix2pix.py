"""Optional pix2pix networks: U-Net shapes, discriminators, losses, init, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models import pix2pix as p2p
from histosynth.models.pix2pix import (
    GANLoss,
    GanBundle,
    MultiscaleDiscriminator,
    UnetGenerator,
    define_D,
    define_G,
    feature_matching_loss,
    gan_checkpoint_dict,
    generate,
    load_gan,
    receptive_field,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("depth,side", [(3, 16), (4, 32), (5, 64)])
def test_unet_shapes(depth, side):
    g = define_G(6, 3, depth=depth, width=4, max_width=16)
    x = torch.randn(2, 6, side, side)
    y = g(x)
    assert y.shape == (2, 3, side, side)
    assert y.min() >= -1 and y.max() <= 1  # Tanh
    assert len(g.downs) == len(g.ups) == depth


def test_unet_follows_the_paper_at_depth_8():
    g = UnetGenerator(4, 3, depth=8, width=64)
    widths = [blk.block[-1].num_features if isinstance(blk.block[-1], nn.BatchNorm2d) else
              [m for m in blk.block if isinstance(m, nn.Conv2d)][0].out_channels for blk in g.downs]
    assert widths == [64, 128, 256, 512, 512, 512, 512, 512]
    # dropout 0.5 in the three innermost up blocks only
    drops = [any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in up.modules()) for up in g.ups]
    assert drops == [True, True, True, False, False, False, False, False]
    assert isinstance(g.ups[-1].block[-1], nn.Tanh)
    assert sum(p.numel() for p in g.parameters()) == pytest.approx(54.4e6, rel=0.01)


def test_unet_rejects_indivisible_input():
    g = define_G(4, depth=4, width=4)
    with pytest.raises(HistosynthError, match="divisible by 16"):
        g(torch.zeros(1, 4, 24, 24))
    with pytest.raises(HistosynthError, match="norm"):
        UnetGenerator(4, norm="group")


def test_instance_norm_generator():
    g = define_G(4, depth=4, width=4, norm="instance")
    assert g(torch.randn(1, 4, 32, 32)).shape == (1, 3, 32, 32)


def test_patchgan_receptive_field_is_70():
    d = define_D("patch", in_ch=7, ndf=8)
    assert receptive_field(d) == 70
    assert d(torch.zeros(1, 7, 256, 256)).shape == (1, 1, 30, 30)
    assert receptive_field(define_D("patch", in_ch=7, ndf=8, n_layers=1)) == 16


def test_global_discriminator_one_logit_per_image():
    d = define_D("global", in_ch=7, ndf=4, size=64)
    assert d(torch.randn(3, 7, 64, 64)).shape == (3, 1)
    with pytest.raises(HistosynthError, match="built for a 2x2 last map"):
        d(torch.randn(3, 7, 128, 128))
    feats = d.features(torch.randn(3, 7, 64, 64))
    assert len(feats) == 1 and feats[0][-1].shape == (3, 1)


def test_multiscale_features_and_feature_matching():
    d = define_D("multiscale", in_ch=5, ndf=4, num_D=3)
    assert isinstance(d, MultiscaleDiscriminator)
    x = torch.randn(2, 5, 128, 128)
    feats = d(x)
    assert len(feats) == 3 and all(len(scale) == 5 for scale in feats)
    assert feats[0][0].shape[-1] == 64 and feats[1][0].shape[-1] == 32 and feats[2][0].shape[-1] == 16
    assert float(feature_matching_loss(feats, feats).detach()) == 0.0
    other = d(torch.randn(2, 5, 128, 128))
    fm = feature_matching_loss(feats, other)
    assert float(fm.detach()) > 0
    # the real features are detached: gradients reach only the fake branch
    fake = torch.randn(1, 5, 128, 128, requires_grad=True)
    real = torch.randn(1, 5, 128, 128, requires_grad=True)
    feature_matching_loss(d(fake), d(real)).backward()
    assert fake.grad is not None and real.grad is None


def test_gan_loss_modes():
    pos, neg = torch.full((2, 1, 3, 3), 5.0), torch.full((2, 1, 3, 3), -5.0)
    lsgan = GANLoss("lsgan")
    assert float(lsgan(torch.ones(2, 1, 3, 3), True)) == 0.0
    assert float(lsgan(torch.zeros(2, 1, 3, 3), True)) == 1.0
    vanilla = GANLoss("vanilla")
    assert float(vanilla(pos, True)) < 0.01 and float(vanilla(pos, False)) > 4.9
    hinge = GANLoss("hinge")
    assert float(hinge(pos, True)) == 0.0 and float(hinge(neg, False)) == 0.0
    assert float(hinge(torch.zeros(1, 1, 2, 2), True)) == 1.0
    assert float(hinge(pos, True, for_discriminator=False)) == -5.0
    # list of per-scale features: mean over the scales' logits
    assert float(lsgan([[torch.zeros(1), torch.ones(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 2)]], True)) == 0.5
    with pytest.raises(HistosynthError):
        GANLoss("wgan")
    with pytest.raises(HistosynthError):
        define_D("pixel", 4)


def test_init_statistics():
    torch.manual_seed(0)
    g = define_G(8, depth=5, width=32).requires_grad_(False)
    ws = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(float(ws.mean())) < 1e-3 and float(ws.std()) == pytest.approx(0.02, rel=0.05)
    bn = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert float(bn.mean()) == pytest.approx(1.0, abs=0.01) and float(bn.std()) == pytest.approx(0.02, rel=0.2)


def _bundle_file(tmp_path, dropout_at_inference=True):
    torch.manual_seed(1)
    g = define_G(6, depth=3, width=4, dropout_at_inference=dropout_at_inference)
    path = tmp_path / "gan.pt"
    torch.save(gan_checkpoint_dict(g, options=["dark", "pale"], classes={1: "Epithelial", 2: "Lymphocyte"},
                                   n_types=2, noise=False, step=7, config={"train": {"crop": 16}}), path)
    return g, path


def test_load_gan_round_trip(tmp_path):
    g, path = _bundle_file(tmp_path, dropout_at_inference=False)
    torch.load(path, weights_only=True)
    bundle = load_gan(path)
    assert isinstance(bundle, GanBundle)
    assert bundle.options == ["dark", "pale"] and bundle.option_index("pale") == 1
    assert bundle.classes == {1: "Epithelial", 2: "Lymphocyte"} and bundle.n_types == 2
    assert bundle.noise is False and bundle.step == 7 and bundle.config["train"]["crop"] == 16
    for (k, a), b in zip(g.state_dict().items(), bundle.generator.state_dict().values()):
        assert torch.equal(a, b), k
    cond = torch.rand(2, 6, 16, 16) * 2 - 1
    out = generate(bundle, cond)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, generate(bundle, cond))  # dropout off: deterministic
    with pytest.raises(HistosynthError, match="option 'x' unknown"):
        bundle.option_index("x")
    with pytest.raises(HistosynthError, match=r"\(N, 6, H, W\)"):
        generate(bundle, torch.zeros(1, 5, 16, 16))


def test_dropout_at_inference(tmp_path):
    _, path = _bundle_file(tmp_path)
    bundle = load_gan(path)
    assert not bundle.generator.training
    assert all(m.training for m in bundle.generator.modules() if isinstance(m, nn.Dropout))
    cond = torch.rand(1, 6, 16, 16) * 2 - 1
    a, b, c = generate(bundle, cond, seed=1), generate(bundle, cond, seed=1), generate(bundle, cond, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_load_gan_errors(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(HistosynthError, match="corrupt.pt.*unreadable"):
        load_gan(bad)
    with pytest.raises(HistosynthError, match="not found"):
        load_gan(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "histosynth-dvae", "state_dict": {}}, other)
    with pytest.raises(HistosynthError, match="other.pt.*not a GAN checkpoint"):
        load_gan(other)
    g, path = _bundle_file(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["generator"]["width"] = 8  # another architecture
    torch.save(ckpt, tmp_path / "arch.pt")
    with pytest.raises(HistosynthError, match="arch.pt.*does not fit"):
        load_gan(tmp_path / "arch.pt")
    del ckpt["options"]
    torch.save(ckpt, tmp_path / "keys.pt")
    with pytest.raises(HistosynthError, match="keys.pt.*does not fit"):
        load_gan(tmp_path / "keys.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(HistosynthError, match="trunc.pt"):
        load_gan(truncated)
    assert p2p.CHECKPOINT_FORMAT == "histosynth-gan"
