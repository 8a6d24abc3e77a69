"""Optional pix2pix: U-Net generator, PatchGAN / global / multi-scale discriminators, losses, checkpoints.

The layout follows pytorch-CycleGAN-and-pix2pix's ``networks.py``: one class
per block, small builders (:func:`define_G`, :func:`define_D`), the
architecture readable top to bottom.

Generator (pix2pix, Isola et al. 2017, as the Optional-pix2pix seed uses it):
encoder C64-C128-C256-C512-C512-C512-C512-C512 (conv 4×4 stride 2, LeakyReLU
0.2, no norm on the first and the innermost layer), decoder
CD512-CD512-CD512-C512-C256-C128-C64 (ReLU, transposed conv 4×4 stride 2,
norm, dropout 0.5 in the ``dropout_innermost`` innermost up blocks) with skip
connections, then Tanh. ``depth`` and ``width`` shrink it for the CPU.

Discriminators see the image concatenated with the conditioning (mask
channels + option, never the noise channel). All of them answer
:meth:`features`, a list (one entry per scale) of lists of intermediate
activations whose last element is the logit map; :class:`GANLoss` and
:func:`feature_matching_loss` take that.

Dropout at inference: pix2pix keeps dropout on at test time as its only
source of randomness; this is ``config["dropout_at_inference"]`` (default
True). :func:`generate` honours it, and BatchNorm uses its running statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.io.labels import class_map_to_json, read_class_map
from histosynth.models.checkpoint import read_torch_checkpoint

CHECKPOINT_FORMAT = "histosynth-gan"
CHECKPOINT_VERSION = 1
NORMS = ("batch", "instance")
DISCRIMINATORS = ("patch", "global", "multiscale")
GAN_MODES = ("vanilla", "lsgan", "hinge")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm (learned affine) or InstanceNorm (no affine, no running stats), as pix2pix."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    raise HistosynthError(f"norm must be one of {NORMS}, got {norm!r}")


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """pix2pix init: conv / linear weights N(0, gain), BatchNorm weights N(1, gain), biases 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


# -- generator -----------------------------------------------------------------------------------
class DownBlock(nn.Module):
    """[LeakyReLU 0.2] → conv 4×4 stride 2 → [norm]: one encoder level."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, outermost: bool = False, innermost: bool = False):
        super().__init__()
        use_norm = not (outermost or innermost)
        layers: list[nn.Module] = [] if outermost else [nn.LeakyReLU(0.2, inplace=False)]
        layers.append(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=not (use_norm and norm == "batch")))
        if use_norm:
            layers.append(norm_layer(norm, out_ch))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """ReLU → transposed conv 4×4 stride 2 → norm [→ dropout 0.5]; the outermost ends in Tanh instead."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, outermost: bool = False, dropout: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.ReLU(inplace=False),
                                   nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1,
                                                      bias=outermost or norm != "batch")]
        if outermost:
            layers.append(nn.Tanh())
        else:
            layers.append(norm_layer(norm, out_ch))
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UnetGenerator(nn.Module):
    """The pix2pix U-Net: ``depth`` down blocks, ``depth`` up blocks, skips by concatenation.

    Level i has ``min(width * 2**i, max_width)`` channels; the input side must
    be divisible by ``2**depth`` (256 px for the paper's depth 8).
    """

    def __init__(self, in_ch: int, out_ch: int = 3, depth: int = 8, width: int = 64, max_width: int = 512,
                 dropout_innermost: int = 3, norm: str = "batch", dropout_at_inference: bool = True):
        super().__init__()
        if depth < 2:
            raise HistosynthError(f"U-Net depth must be at least 2, got {depth}")
        if in_ch < 1 or out_ch < 1 or width < 1 or max_width < 1:
            raise HistosynthError("U-Net channel counts must be positive")
        norm_layer(norm, 1)  # validates
        self.config = {"in_ch": int(in_ch), "out_ch": int(out_ch), "depth": int(depth), "width": int(width),
                       "max_width": int(max_width), "dropout_innermost": int(dropout_innermost), "norm": norm,
                       "dropout_at_inference": bool(dropout_at_inference)}
        ch = [min(width * 2**i, max_width) for i in range(depth)]
        self.downs = nn.ModuleList(
            DownBlock(in_ch if i == 0 else ch[i - 1], ch[i], norm, outermost=i == 0, innermost=i == depth - 1)
            for i in range(depth)
        )
        # ups[0] is the innermost (reads the bottleneck), ups[-1] the outermost (writes the image)
        ups = []
        for j in range(depth):
            level = depth - 1 - j
            in_c = ch[level] if j == 0 else 2 * ch[level]
            out_c = out_ch if level == 0 else ch[level - 1]
            ups.append(UpBlock(in_c, out_c, norm, outermost=level == 0,
                               dropout=j < dropout_innermost and level != 0))
        self.ups = nn.ModuleList(ups)

    @property
    def multiple(self) -> int:
        return 2 ** self.config["depth"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise HistosynthError(f"the U-Net of depth {self.config['depth']} needs sides divisible by "
                                  f"{self.multiple}, got {h}x{w}")
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.ups[0](skips.pop())
        for up in self.ups[1:]:
            x = up(torch.cat([x, skips.pop()], dim=1))
        return x

    def set_inference_mode(self) -> None:
        """eval(), then dropout back on if ``dropout_at_inference``."""
        self.eval()
        if self.config["dropout_at_inference"]:
            for m in self.modules():
                if isinstance(m, nn.Dropout):
                    m.train()


# -- discriminators ---------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """conv 4×4 → [norm] → LeakyReLU 0.2: one discriminator layer."""

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

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
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
    """One real/fake logit per image: stride-2 conv blocks, global average pool, linear (seed 001's variant)."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 5, norm: str = "batch"):
        super().__init__()
        blocks, c = [], in_ch
        for n in range(n_layers):
            out = ndf * min(2**n, 8)
            blocks.append(ConvBlock(c, out, 2, None if n == 0 else norm))
            c = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c, 1)

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        feats.append(self.head(x.mean(dim=(2, 3))))
        return [feats]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0][-1]


class MultiscaleDiscriminator(nn.Module):
    """pix2pixHD: ``num_D`` PatchGANs on the input downsampled 1×, 2×, 4× (avg-pool 3, stride 2)."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3, num_D: int = 2, norm: str = "batch"):
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
    """A freshly initialised U-Net generator (see :class:`UnetGenerator`)."""
    return init_weights(UnetGenerator(in_ch, out_ch, depth, width, max_width, dropout_innermost, norm,
                                      dropout_at_inference), init_gain)


def define_D(kind: str = "patch", in_ch: int = 4, ndf: int = 64, n_layers: int | None = None, num_D: int = 2,
             norm: str = "batch", init_gain: float = 0.02) -> nn.Module:
    """A freshly initialised discriminator: 'patch' (PatchGAN, n_layers 3 = 70×70), 'global' or 'multiscale'."""
    if kind == "patch":
        net: nn.Module = PatchDiscriminator(in_ch, ndf, 3 if n_layers is None else n_layers, norm)
    elif kind == "global":
        net = GlobalDiscriminator(in_ch, ndf, 5 if n_layers is None else n_layers, norm)
    elif kind == "multiscale":
        net = MultiscaleDiscriminator(in_ch, ndf, 3 if n_layers is None else n_layers, num_D, norm)
    else:
        raise HistosynthError(f"discriminator must be one of {DISCRIMINATORS}, got {kind!r}")
    return init_weights(net, init_gain)


# -- losses -------------------------------------------------------------------------------------------------
def _logits(pred: torch.Tensor | list) -> list[torch.Tensor]:
    if isinstance(pred, torch.Tensor):
        return [pred]
    return [scale[-1] if isinstance(scale, (list, tuple)) else scale for scale in pred]


class GANLoss(nn.Module):
    """Adversarial loss on logits (a tensor, or :meth:`features` output: mean over scales).

    vanilla: BCE with logits; lsgan: MSE to 1 / 0; hinge: D gets relu(1 ∓ x),
    G gets −x (call with ``for_discriminator=False``).
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
        return F.relu(1 - x).mean() if real else F.relu(1 + x).mean()

    def forward(self, pred: torch.Tensor | list, target_is_real: bool,
                for_discriminator: bool = True) -> torch.Tensor:
        logits = _logits(pred)
        return sum(self._one(x, target_is_real, for_discriminator) for x in logits) / len(logits)


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

    def option_index(self, name: str | int) -> int:
        """Index of option ``name`` (or a valid index passed through)."""
        if isinstance(name, int) and 0 <= name < len(self.options):
            return name
        if name not in self.options:
            raise HistosynthError(f"option {name!r} unknown to this GAN (it knows {self.options})", self.path)
        return self.options.index(name)


def gan_checkpoint_dict(generator: UnetGenerator, *, options: list[str], classes: dict[int, str], n_types: int,
                        noise: bool, step: int, config: dict | None = None, **extra: Any) -> dict[str, Any]:
    """What every GAN file holds (CPU tensors, plain types; loadable with weights_only=True), plus ``extra``."""
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
        **extra,
    }


def read_gan_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one clear error for a missing, corrupt or foreign file."""
    return read_torch_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "GAN")


def load_gan(path: str | os.PathLike, device: str | torch.device = "cpu") -> GanBundle:
    """The generator of ``gan.pt`` (or a training ``checkpoint.pt``) on ``device``, in inference mode."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = read_gan_checkpoint(path)
    try:
        config = dict(ckpt["config"])
        gen = UnetGenerator(**dict(config["generator"]))
        gen.load_state_dict(ckpt["generator"], strict=True)
        bundle = GanBundle(generator=gen, config=config, options=[str(o) for o in ckpt["options"]],
                           classes=read_class_map(ckpt["classes"], path),
                           n_types=int(ckpt["n_types"]), noise=bool(ckpt["noise"]), step=int(ckpt["step"]),
                           path=os.fspath(path))
    except (KeyError, TypeError, ValueError, RuntimeError, HistosynthError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HistosynthError(f"checkpoint does not fit the GAN architecture: {first}", path) from err
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
