"""Optional pix2pix: PatchGAN / global / multi-scale discriminators, losses, GAN checkpoints.

The layout follows pytorch-CycleGAN-and-pix2pix's ``networks.py``: one class
per block, small builders (:func:`define_G`, :func:`define_D`), the
architecture readable top to bottom.

Generators live in their own modules and are built by name
(:mod:`histosynth.models.generators`, ``gan.generator``): the pix2pix U-Net
(:mod:`histosynth.models.unet`, the default; :func:`define_G` builds it),
pix2pixHD (:mod:`histosynth.models.pix2pixhd`) and SPADE
(:mod:`histosynth.models.spade`). A GAN checkpoint records the generator's
``kind`` in ``config["generator"]``; :func:`load_gan` rebuilds that class
(a checkpoint without one is a U-Net).

Discriminators see the image concatenated with the conditioning (mask
channels + option, never the noise channel): the PatchGAN (70 × 70), seed
001's global one (Table 3: five stride-2 convs, flatten, dense; built for one
input side) and pix2pixHD's multi-scale one. All of them answer
:meth:`features`, a list (one entry per scale) of lists of intermediate
activations whose last element is the logit map; :class:`GANLoss`,
:func:`gradient_penalty` (WGAN-GP) and :func:`feature_matching_loss` take
that. :func:`define_D` builds them with or without norm layers and with
spectral normalisation on request.

Inference: :func:`generate` puts the generator in its inference mode
(BatchNorm uses its running statistics; the U-Net keeps dropout on when
``config["generator"]["dropout_at_inference"]``, pix2pix's only source of
randomness at test time).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.io.labels import class_map_to_json, read_class_map
from histosynth.models.checkpoint import read_torch_checkpoint
from histosynth.models.gan_layers import Generator, init_weights, norm_layer
from histosynth.models.generators import DEFAULT_KIND, build_generator
from histosynth.models.generators import define_G as define_generator
from histosynth.models.unet import UnetGenerator

CHECKPOINT_FORMAT = "histosynth-gan"
CHECKPOINT_VERSION = 1
DISCRIMINATORS = ("patch", "global", "multiscale")
GAN_MODES = ("vanilla", "lsgan", "hinge", "wgan-gp")


# -- discriminators ---------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """conv 4×4 → [norm] → LeakyReLU 0.2: one discriminator layer (``norm`` None: no norm, the conv has a bias)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str | None):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 4, stride=stride, padding=1,
                                             bias=norm != "batch")]
        if norm is not None:
            layers.append(norm_layer(norm, out_ch))
        layers.append(nn.LeakyReLU(0.2, inplace=False))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: C64-C128-C256 (stride 2) - C512 (stride 1) - conv → a logit per patch (70×70 at n_layers 3)."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3, norm: str | None = "batch"):
        super().__init__()
        blocks = [ConvBlock(in_ch, ndf, 2, None)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            blocks.append(ConvBlock(ndf * prev, ndf * mult, 2 if n < n_layers else 1, norm))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        feats.append(self.head(x))
        return [feats]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0][-1]


class GlobalDiscriminator(nn.Module):
    """Seed 001's "original / vanilla" discriminator (its Table 3): one real/fake logit per image.

    ``n_layers`` (5) conv blocks 4×4 stride 2 of ndf × (1, 2, 4, 4, 4) channels (64-128-256-256-256 at
    ndf 64; the first without norm), then flatten and one dense layer to a logit. Each block halves the
    side (s → ⌊s/2⌋), so at 256 px the last map is 8 × 8 × 256 and the dense layer takes 8·8·256 inputs;
    at another input side ``size`` it takes ⌊size/32⌋² · 4·ndf (the flatten follows the crop, as a dense
    layer must). ``size`` is therefore fixed when the network is built; at least 2**n_layers px.
    """

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 5, norm: str | None = "batch", size: int = 256):
        super().__init__()
        self.side = int(size) // 2**n_layers
        if self.side < 1:
            raise HistosynthError(f"crop {size} is too small for the global discriminator (its {n_layers} stride-2 "
                                  f"convs need at least {2**n_layers} px); use a larger --crop")
        blocks, c = [], in_ch
        for n in range(n_layers):
            out = ndf * min(2**n, 4)
            blocks.append(ConvBlock(c, out, 2, None if n == 0 else norm))
            c = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c * self.side * self.side, 1)

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        if x.shape[-2:] != (self.side, self.side):
            raise HistosynthError(f"the global discriminator was built for a {self.side}x{self.side} last map "
                                  f"(its input side), got {x.shape[-2]}x{x.shape[-1]}")
        feats.append(self.head(x.flatten(1)))
        return [feats]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0][-1]


class MultiscaleDiscriminator(nn.Module):
    """pix2pixHD: ``num_D`` PatchGANs on the input downsampled 1×, 2×, 4× (avg-pool 3, stride 2)."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3, num_D: int = 2, norm: str | None = "batch"):
        super().__init__()
        if num_D < 1:
            raise HistosynthError(f"num_D must be at least 1, got {num_D}")
        self.discriminators = nn.ModuleList(PatchDiscriminator(in_ch, ndf, n_layers, norm) for _ in range(num_D))
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, d in enumerate(self.discriminators):
            if i:
                x = self.downsample(x)
            out.extend(d.features(x))
        return out

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return self.features(x)


def receptive_field(net: nn.Module) -> int:
    """Receptive field (px) of one output of a plain conv stack (its Conv2d layers in order)."""
    r = 1
    for m in reversed([m for m in net.modules() if isinstance(m, nn.Conv2d)]):
        r = (r - 1) * m.stride[0] + m.kernel_size[0]
    return r


# -- builders -------------------------------------------------------------------------------------------
def define_G(in_ch: int, out_ch: int = 3, depth: int = 8, width: int = 64, max_width: int = 512,
             dropout_innermost: int = 3, norm: str = "batch", dropout_at_inference: bool = True,
             init_gain: float = 0.02) -> UnetGenerator:
    """A freshly initialised U-Net generator (see :class:`UnetGenerator`; any kind:
    :func:`histosynth.models.generators.define_G`)."""
    return define_generator("unet", in_ch, out_ch, init_gain=init_gain, depth=depth, width=width,
                            max_width=max_width, dropout_innermost=dropout_innermost, norm=norm,
                            dropout_at_inference=dropout_at_inference)


def define_D(kind: str = "patch", in_ch: int = 4, ndf: int = 64, n_layers: int | None = None, num_D: int = 2,
             norm: str | None = "batch", init_gain: float = 0.02, *, size: int = 256,
             spectral_norm: bool = False) -> nn.Module:
    """A freshly initialised discriminator: 'patch' (PatchGAN, n_layers 3 = 70×70), 'global' or 'multiscale'.

    ``norm`` None: no normalisation layers (what WGAN-GP needs instead of BatchNorm). ``size`` is the input
    side, which the global discriminator's dense layer depends on. ``spectral_norm``: every conv and linear
    layer is spectrally normalised (Miyato et al. 2018) after the N(0, ``init_gain``) init.
    """
    if kind == "patch":
        net: nn.Module = PatchDiscriminator(in_ch, ndf, 3 if n_layers is None else n_layers, norm)
    elif kind == "global":
        net = GlobalDiscriminator(in_ch, ndf, 5 if n_layers is None else n_layers, norm, size)
    elif kind == "multiscale":
        net = MultiscaleDiscriminator(in_ch, ndf, 3 if n_layers is None else n_layers, num_D, norm)
    else:
        raise HistosynthError(f"discriminator must be one of {DISCRIMINATORS}, got {kind!r}")
    init_weights(net, init_gain)
    return add_spectral_norm(net) if spectral_norm else net


def add_spectral_norm(net: nn.Module) -> nn.Module:
    """``net`` with every Conv2d and Linear weight spectrally normalised (one power iteration per training
    forward; torch.nn.utils.parametrizations.spectral_norm: the state holds the raw weight and u, v)."""
    for module in list(net.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            torch.nn.utils.parametrizations.spectral_norm(module)
    return net


# -- losses -------------------------------------------------------------------------------------------------
def _logits(pred: torch.Tensor | list) -> list[torch.Tensor]:
    if isinstance(pred, torch.Tensor):
        return [pred]
    return [scale[-1] if isinstance(scale, (list, tuple)) else scale for scale in pred]


class GANLoss(nn.Module):
    """Adversarial loss on logits (a tensor, or :meth:`features` output: mean over scales).

    vanilla: BCE with logits; lsgan: MSE to 1 / 0; hinge: D gets relu(1 ∓ x),
    G gets −x (call with ``for_discriminator=False``); wgan-gp (Gulrajani et al.
    2017): the critic gets E[x] for fakes and −E[x] for reals (their sum is its
    loss, with :func:`gradient_penalty` added), G gets −E[x].
    """

    def __init__(self, mode: str = "lsgan"):
        super().__init__()
        if mode not in GAN_MODES:
            raise HistosynthError(f"gan mode must be one of {GAN_MODES}, got {mode!r}")
        self.mode = mode

    def _one(self, x: torch.Tensor, real: bool, for_discriminator: bool) -> torch.Tensor:
        x = x.float()
        if self.mode == "vanilla":
            return F.binary_cross_entropy_with_logits(x, torch.full_like(x, float(real)))
        if self.mode == "lsgan":
            return F.mse_loss(x, torch.full_like(x, float(real)))
        if not for_discriminator:
            return -x.mean()
        if self.mode == "wgan-gp":
            return -x.mean() if real else x.mean()
        return F.relu(1 - x).mean() if real else F.relu(1 + x).mean()

    def forward(self, pred: torch.Tensor | list, target_is_real: bool,
                for_discriminator: bool = True) -> torch.Tensor:
        logits = _logits(pred)
        return sum(self._one(x, target_is_real, for_discriminator) for x in logits) / len(logits)


def interpolate(real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP's random points between real and fake samples: ε·real + (1 − ε)·fake, ε ~ U(0, 1) per sample.

    Any shape (N, ...): images (N, C, H, W), z-stacks (N, Z, C, H, W). ``fake`` is detached (the penalty
    trains the critic only); ε comes from ``generator`` (CPU) when given.
    """
    eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), generator=generator).to(real.device, torch.float32)
    return eps * real.float() + (1 - eps) * fake.detach().float()


def gradient_penalty(D: nn.Module, cond: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's penalty E[(‖∇ₓ D(cond, x)‖₂ − 1)²] at the images ``image`` (N, 3, H, W), in float32.

    The gradient is taken with respect to the image channels of D's input (the conditioning ``cond`` is the
    pair's, shared by the real and the fake image, and is not interpolated), per sample; D's value for a
    sample is the mean of its logit map (a PatchGAN's E over patches, as in :class:`GANLoss`). A
    multi-scale D is one critic per scale: the penalty is the mean of the scales' penalties, as GANLoss
    takes the mean of their Wasserstein terms, so each scale's critic gets the paper's loss up to the
    common factor 1/num_D. Call it outside autocast: the penalty's double backward stays in float32.
    """
    cond = cond.detach().float()
    return critic_penalty(lambda x: _logits(D.features(torch.cat([cond, x], 1))), image)


def critic_penalty(critic: Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]],
                   x: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's E[(‖∇ₓ critic(x)‖₂ − 1)²] at samples ``x`` of any shape (N, ...), in float32, per sample.

    ``critic(x)`` gives a score per sample (N,), a map per sample (N, ...) whose mean is the score, or a
    list of those (one critic per scale: the penalty is the mean of theirs). :func:`gradient_penalty` is
    this for a conditional D; MI-GAN's critics (:mod:`histosynth.models.migan`) call it on images and
    z-stacks. Call it outside autocast: the double backward stays in float32.
    """
    x = x.detach().float().requires_grad_(True)
    out = critic(x)
    scores = out if isinstance(out, list) else [out]
    total = torch.zeros((), device=x.device)
    for s in scores:
        (grad,) = torch.autograd.grad(s.float().reshape(s.shape[0], -1).mean(1).sum(), x, create_graph=True)
        total = total + ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    return total / len(scores)


def feature_matching_loss(fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]) -> torch.Tensor:
    """pix2pixHD feature matching: L1 between D's intermediate features of fake and (detached) real.

    Averaged over the layers of each scale (the logits excluded) and over the scales.
    """
    total = torch.zeros((), device=fake[0][0].device)
    for f_scale, r_scale in zip(fake, real):
        layers = list(zip(f_scale[:-1], r_scale[:-1]))
        total = total + sum(F.l1_loss(f.float(), r.detach().float()) for f, r in layers) / max(1, len(layers))
    return total / len(fake)


def l1_loss(fake: torch.Tensor, real: torch.Tensor, weight: float = 100.0) -> torch.Tensor:
    """λ·L1, λ = 100 as in pix2pix."""
    return weight * F.l1_loss(fake.float(), real.float())


# -- checkpoints ------------------------------------------------------------------------------------------
@dataclass
class GanBundle:
    """A trained generator and what the translator needs to condition it."""

    generator: nn.Module
    config: dict
    options: list[str]
    classes: dict[int, str]
    n_types: int
    noise: bool
    step: int
    path: str | None = field(default=None, repr=False)
    #: the generator takes the tissue channel (+1 tissue, −1 air; trained with gan.tissue_channel)
    tissue: bool = False

    def option_index(self, name: str | int) -> int:
        """Index of option ``name`` (or a valid index passed through)."""
        if isinstance(name, int) and 0 <= name < len(self.options):
            return name
        if name not in self.options:
            raise HistosynthError(f"option {name!r} unknown to this GAN (it knows {self.options})", self.path)
        return self.options.index(name)


def gan_checkpoint_dict(generator: Generator, *, options: list[str], classes: dict[int, str], n_types: int,
                        noise: bool, step: int, config: dict | None = None, tissue: bool = False,
                        **extra: Any) -> dict[str, Any]:
    """What every GAN file holds (CPU tensors, plain types; loadable with weights_only=True), plus ``extra``.

    ``tissue: True`` is written only for a generator that takes the tissue channel; a file without the key
    (all written before it) has none.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "generator": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
        "config": {"generator": dict(generator.config), **(config or {})},
        "options": [str(o) for o in options],
        "classes": class_map_to_json(classes),
        "n_types": int(n_types),
        "noise": bool(noise),
        "step": int(step),
        **({"tissue": True} if tissue else {}),
        **extra,
    }


#: training settings added with few-image training (#15), as a checkpoint written before them trained
SETTINGS_BEFORE_FEW_IMAGE = {"diffaugment": [], "ema": 0.0, "lambda_gp": 0.0, "spectral_norm": False}
#: what a checkpoint written before then calls its ``disc: global`` (a global-average-pool D of another layout)
OLD_GLOBAL_DISC = "global (before seed 001's layout)"


def read_gan_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one clear error for a missing, corrupt or foreign file.

    A checkpoint written before generators had names gets ``kind: "unet"`` in each generator config it holds
    (``config``, and ``train`` of a training checkpoint), so it loads and resumes as the U-Net it is. One
    written before few-image training gets those settings off (:data:`SETTINGS_BEFORE_FEW_IMAGE`) in its
    training settings, so it resumes as what it is; its ``disc: global`` becomes :data:`OLD_GLOBAL_DISC`,
    so it is never resumed into the global discriminator of seed 001's layout, whose weights differ. One
    written before the tissue channel gets ``tissue_channel: False`` in its training settings (it had none).
    """
    ckpt = read_torch_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "GAN")
    config = ckpt.get("config")
    for holder in (config, ckpt.get("train"), config.get("train") if isinstance(config, dict) else None):
        if isinstance(holder, dict) and isinstance(holder.get("generator"), dict):
            holder["generator"].setdefault("kind", DEFAULT_KIND)
    for train in (ckpt.get("train"), config.get("train") if isinstance(config, dict) else None):
        if isinstance(train, dict) and "spectral_norm" not in train:
            train.update({k: v for k, v in SETTINGS_BEFORE_FEW_IMAGE.items() if k not in train})
            if train.get("disc") == "global":
                train["disc"] = OLD_GLOBAL_DISC
        if isinstance(train, dict):
            train.setdefault("tissue_channel", False)
    return ckpt


def load_gan(path: str | os.PathLike, device: str | torch.device = "cpu") -> GanBundle:
    """The generator of ``gan.pt`` (or a training ``checkpoint.pt``) on ``device``, in inference mode.

    The generator's class is the checkpoint's ``config["generator"]["kind"]``; a config or state that does
    not fit that class is one error naming the file.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = read_gan_checkpoint(path)
    what = "generator"
    try:
        config = dict(ckpt["config"])
        what = f"a {config['generator']['kind']} generator"
        gen = build_generator(config["generator"])
        gen.load_state_dict(ckpt["generator"], strict=True)
        bundle = GanBundle(generator=gen, config=config, options=[str(o) for o in ckpt["options"]],
                           classes=read_class_map(ckpt["classes"], path),
                           n_types=int(ckpt["n_types"]), noise=bool(ckpt["noise"]), step=int(ckpt["step"]),
                           path=os.fspath(path), tissue=bool(ckpt.get("tissue", False)))
    except (KeyError, TypeError, ValueError, RuntimeError, HistosynthError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HistosynthError(f"checkpoint does not fit the GAN architecture ({what}): {first}", path) from err
    gen.to(device).set_inference_mode()
    return bundle


def generate(bundle: GanBundle, cond: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """Images in [−1, 1] (N, 3, H, W) for conditioning ``cond`` (from :func:`build_conditioning`), no grad.

    Dropout follows ``config['generator']['dropout_at_inference']``; ``seed``
    makes its draws reproducible without touching the global RNG.
    """
    gen = bundle.generator
    expected = gen.config["in_ch"]
    if cond.ndim != 4 or cond.shape[1] != expected:
        raise HistosynthError(f"conditioning must be (N, {expected}, H, W) for this GAN, got {tuple(cond.shape)}",
                              bundle.path)
    device = next(gen.parameters()).device
    modes = [(m, m.training) for m in gen.modules()]
    gen.set_inference_mode()
    try:
        with torch.no_grad():
            if seed is None:
                return gen(cond.to(device, torch.float32)).float()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(seed))
                return gen(cond.to(device, torch.float32)).float()
    finally:
        for m, mode in modes:
            m.training = mode
