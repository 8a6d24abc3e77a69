"""The SPADE generator (Park et al. 2019, "Semantic Image Synthesis with Spatially-Adaptive Normalization",
CVPR); ``gan.generator: spade``.

Spatially-adaptive normalisation (:class:`SPADE`): the activations are normalised without learned affine
parameters (BatchNorm or InstanceNorm, ``gan.norm``), then scaled and shifted per pixel by ``1 + gamma`` and
``beta``, two 3×3 convs on a shared 3×3 conv + ReLU of the conditioning resized (nearest) to the
activations' size. The mask therefore re-enters every layer instead of being washed out by the
normalisations, which is the paper's point.

Residual block (:class:`SPADEResBlock`): SPADE → LeakyReLU 0.2 → conv 3×3, twice (the middle width is the
smaller of in and out), plus a shortcut that is learned (SPADE → conv 1×1, no bias) when the channel count
changes and the identity otherwise.

Generator (:class:`SpadeGenerator`, no VAE encoder: the paper's variant without style input): the
conditioning downsampled (nearest) by ``2**n_down`` → conv 3×3 to ``width * 2**n_down`` channels → a
residual block at that size → ``n_down`` times (nearest upsampling 2× → a residual block halving the
channels) → LeakyReLU 0.2 → conv 3×3 to 3 channels → Tanh. That is ``n_down + 1`` blocks; the paper's
256-px generator has 7 at width 64 (1024 channels at the bottom). The SPADE hidden layer has ``2 * width``
channels capped at the channels it modulates (the paper's 128 at width 64, without the cap), which keeps
the full-resolution blocks CPU-sized.

Training: the paper trains SPADE with the hinge loss, a multi-scale discriminator and feature matching
(``gan.gan_mode: hinge``, ``gan.disc: multiscale``); here the loss stays whatever ``gan.gan_mode`` says.
Left out of the paper's recipe: spectral norm in the generator, and its Xavier init (the pix2pix
N(0, 0.02) init of every histosynth generator is used). Convs whose output goes straight into a
normalisation have no bias (it would be cancelled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models.gan_layers import Generator, norm_layer


def param_free_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm without affine (running statistics kept) or InstanceNorm without affine."""
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=False)
    return norm_layer(norm, channels)


class SPADE(nn.Module):
    """norm(x) · (1 + gamma(c)) + beta(c), with c the conditioning resized (nearest) to x's size."""

    def __init__(self, channels: int, cond_ch: int, hidden: int, norm: str):
        super().__init__()
        self.normalize = param_free_norm(norm, channels)
        self.shared = nn.Sequential(nn.Conv2d(cond_ch, hidden, 3, padding=1), nn.ReLU(inplace=False))
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        features = self.shared(F.interpolate(cond, size=x.shape[-2:], mode="nearest"))
        return self.normalize(x) * (1 + self.gamma(features)) + self.beta(features)


class SPADEResBlock(nn.Module):
    """x_s + conv(act(SPADE(conv(act(SPADE(x)))))); x_s = conv 1×1(SPADE(x)) if the channels change, else x."""

    def __init__(self, in_ch: int, out_ch: int, cond_ch: int, width: int, norm: str):
        super().__init__()
        middle = min(in_ch, out_ch)
        self.norm_0 = SPADE(in_ch, cond_ch, min(2 * width, in_ch), norm)
        self.conv_0 = nn.Conv2d(in_ch, middle, 3, padding=1, bias=False)
        self.norm_1 = SPADE(middle, cond_ch, min(2 * width, middle), norm)
        self.conv_1 = nn.Conv2d(middle, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.norm_s = SPADE(in_ch, cond_ch, min(2 * width, in_ch), norm)
            self.conv_s = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.learned_shortcut = in_ch != out_ch

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, cond)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, cond), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, cond), 0.2))
        return shortcut + dx


class SpadeGenerator(Generator):
    """SPADE residual blocks from the downsampled conditioning up to the image; see the module docstring."""

    kind = "spade"

    def __init__(self, in_ch: int, out_ch: int = 3, width: int = 32, n_down: int = 3, norm: str = "batch"):
        if in_ch < 1 or out_ch < 1 or width < 1:
            raise HistosynthError("SPADE channel counts must be positive")
        if n_down < 1:
            raise HistosynthError(f"SPADE needs n_down >= 1, got {n_down}")
        norm_layer(norm, 1)  # validates
        super().__init__({"in_ch": int(in_ch), "out_ch": int(out_ch), "width": int(width), "n_down": int(n_down),
                          "norm": norm}, 2**n_down, f"SPADE starts from the conditioning downsampled {2**n_down}x")
        channels = [width * 2 ** (n_down - i) for i in range(n_down + 1)]  # block i's output
        self.stem = nn.Conv2d(in_ch, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            SPADEResBlock(channels[max(i - 1, 0)], channels[i], in_ch, width, norm) for i in range(n_down + 1)
        )
        self.head = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h, w = cond.shape[-2:]
        self.check_side(h, w)
        x = self.stem(F.interpolate(cond, size=(h // self.multiple, w // self.multiple), mode="nearest"))
        for i, block in enumerate(self.blocks):
            if i:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(x, cond)
        return torch.tanh(self.head(F.leaky_relu(x, 0.2)))
