"""DEPAS (seed 002): tissue-layout masks from noise, and the plain DCGAN baseline it is compared with.

The generator, top to bottom (the paper's Fig. 2A):

- ``z`` (B, nz) as a 1x1 map → a transposed conv to an ``h0 x w0`` map (``h0 = H / 2^n``, ``w0 = W / 2^n``,
  ``n = len(widths)``), then ``n - 1`` stride-2 transposed convs, each followed by BatchNorm + ReLU and
  (DEPAS) **spatial noise**; the last stride-2 transposed conv gives the output logits at (H, W).
  With widths (512, 256, 128, 64) that is the paper's five transposed convs for 512 x 1024; the paper
  does not say how its first layer reaches 32 x 64 from the latent, and here it is one transposed conv with a
  32 x 64 kernel — 105 M of the generator's 108 M parameters (measured). More, narrower widths (e.g.
  (512, 512, 256, 256, 128, 64, 32): a 4 x 8 first map) keep that layer small at the same output size.
- **Spatial noise** (section 3.1 (2)): one 2-D Gaussian array (B, 1, H, W) per sample is drawn, brought to
  each hidden layer's resolution by average pooling and re-scaled to unit variance (pooling k x k cells
  divides the sd by k: "resolution and scale adjustments"), and added to the layer's features times a
  learned per-channel weight (initialised at ``noise_init`` = 0.1, so the noise starts small but not off).
- **Discrete adaptive block**: binary (tissue / air) the annealing sigmoid AS_t(x) = 1 / (1 + exp(-δ_t x))
  (equation 1); with K > 2 labels (air + K - 1 tissue labels) the annealing-temperature softmax
  AST_t = softmax(x / T_t) over channels (equation 2). At inference (``eval()``) they are the step function
  (x > 0) and argmax. The schedules are the paper's, counted in steps rather than epochs: the paper trains
  100 epochs, raising δ by one every 10 epochs (δ_0 = 1, so δ = 10 over the last tenth) and dividing T by
  1.25 every 10 epochs (T_0 = 1). Here ``anneal_every`` steps stand for 10 epochs;
  :func:`anneal_every_default` makes it a tenth of the training steps, so a run of any length goes
  through the paper's ten stages: δ_t = 1 + floor(t / anneal_every), T_t = 1.25^-floor(t / anneal_every).

The discriminators (Fig. 2B): three DCGAN encoders (conv k4 s2 + BatchNorm (not on the first) +
LeakyReLU 0.2, halving until the shorter side is 4) each ending in a scalar logit (a conv to one channel,
averaged over its map, so non-square inputs work), fed the mask at 100 %, 50 % and 25 % (average pooling).
The loss is equation (3)-(4): the sum of the scales' vanilla GAN losses with α = 1 each.

The **DCGAN baseline** (``kind="dcgan"``) is the same generator without spatial noise and with a fixed
sigmoid / softmax (δ = T = 1 throughout; thresholded at 0.5 / argmax at inference), against one
discriminator at 100 % — the plain DCGAN the paper compares with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import HistosynthError

KINDS = ("depas", "dcgan")
#: the paper's schedule: δ += 1 and T /= 1.25 at every one of ten stages
DELTA_STEP = 1.0
TEMPERATURE_FACTOR = 1.25
STAGES = 10


def anneal_every_default(total_steps: int) -> int:
    """Steps per annealing stage: a tenth of the run (the paper's 10 of 100 epochs), at least 1."""
    return max(1, int(total_steps) // STAGES)


def anneal_delta(step: int, anneal_every: int) -> float:
    """δ_t of the annealing sigmoid: 1 + floor(t / anneal_every)."""
    return 1.0 + DELTA_STEP * (int(step) // max(1, int(anneal_every)))


def anneal_temperature(step: int, anneal_every: int) -> float:
    """T_t of the annealing softmax: 1.25^-floor(t / anneal_every)."""
    return TEMPERATURE_FACTOR ** -(int(step) // max(1, int(anneal_every)))


class SpatialNoise(nn.Module):
    """Adds a (B, 1, H, W) noise map, pooled to this layer's size and re-scaled to unit sd, times a per-channel weight."""

    def __init__(self, channels: int, init: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1, channels, 1, 1), float(init)))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        kh, kw = noise.shape[-2] // h, noise.shape[-1] // w
        n = F.avg_pool2d(noise, (kh, kw)) * math.sqrt(kh * kw) if kh * kw > 1 else noise
        return x + self.weight * n.to(x.dtype)


class DiscreteAdaptive(nn.Module):
    """The discrete adaptive block: annealing sigmoid (1 channel) or annealing-temperature softmax (K channels).

    ``annealing`` False (the DCGAN baseline) keeps δ = T = 1. In ``train()`` it returns probabilities
    (tissue for one channel, per label for K); in ``eval()`` the discrete decision as a float one-hot /
    0-1 map of the same shape.
    """

    def __init__(self, channels: int, annealing: bool = True):
        super().__init__()
        self.channels, self.annealing = int(channels), bool(annealing)
        self.register_buffer("delta", torch.tensor(1.0))
        self.register_buffer("temperature", torch.tensor(1.0))

    def set_step(self, step: int, anneal_every: int) -> None:
        if not self.annealing:
            return
        if self.channels == 1:  # the sigmoid's slope; the softmax's temperature stays 1 (unused)
            self.delta.fill_(anneal_delta(step, anneal_every))
        else:
            self.temperature.fill_(anneal_temperature(step, anneal_every))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            if not self.training:
                return (x > 0).to(x.dtype)
            return torch.sigmoid(self.delta * x)
        if not self.training:
            return F.one_hot(x.argmax(1), self.channels).permute(0, 3, 1, 2).to(x.dtype)
        return torch.softmax(x / self.temperature, dim=1)


class TissueGenerator(nn.Module):
    """Noise → tissue mask (see the module docstring). ``n_labels`` counts air: 2 = binary (one output channel)."""

    def __init__(self, size: Sequence[int] = (512, 1024), nz: int = 100, widths: Sequence[int] = (512, 256, 128, 64),
                 n_labels: int = 2, kind: str = "depas", noise_init: float = 0.1):
        super().__init__()
        if kind not in KINDS:
            raise HistosynthError(f"tissue model kind must be one of {KINDS}, got {kind!r}")
        h, w = int(size[0]), int(size[1])
        n = len(widths)
        if n < 1 or h % 2 ** n or w % 2 ** n:
            raise HistosynthError(f"tissue mask size {h}x{w} must be divisible by 2^{n} ({n} upsampling layers of "
                                  f"widths {list(widths)}); pick a size that is, or fewer widths")
        if n_labels < 2:
            raise HistosynthError(f"a tissue mask needs at least 2 labels (air + tissue), got {n_labels}")
        self.config: dict[str, Any] = {"kind": kind, "size": [h, w], "nz": int(nz), "widths": [int(c) for c in widths],
                                       "n_labels": int(n_labels), "noise_init": float(noise_init)}
        self.kind, self.size, self.nz, self.n_labels = kind, (h, w), int(nz), int(n_labels)
        self.spatial_noise = kind == "depas"
        h0, w0 = h // 2 ** n, w // 2 ** n
        self.stem = nn.ConvTranspose2d(nz, widths[0], (h0, w0), 1, 0, bias=False)
        self.norms = nn.ModuleList([nn.BatchNorm2d(widths[0])])
        self.ups = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.ups.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False))
            self.norms.append(nn.BatchNorm2d(c_out))
        self.noises = nn.ModuleList([SpatialNoise(c, noise_init) for c in widths]) if self.spatial_noise else None
        out_ch = 1 if n_labels == 2 else n_labels
        self.head = nn.ConvTranspose2d(widths[-1], out_ch, 4, 2, 1)
        self.block = DiscreteAdaptive(out_ch, annealing=kind == "depas")

    def set_step(self, step: int, anneal_every: int) -> None:
        self.block.set_step(step, anneal_every)

    def forward(self, z: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Probabilities (train) or the discrete mask (eval): (B, 1, H, W) binary or (B, K, H, W)."""
        x = z.reshape(z.shape[0], self.nz, 1, 1)
        if self.spatial_noise and noise is None:
            noise = torch.randn((z.shape[0], 1, *self.size), generator=generator, device=z.device, dtype=z.dtype)
        layers = [self.stem, *self.ups]
        for i, (conv, norm) in enumerate(zip(layers, self.norms)):
            x = F.relu(norm(conv(x)))
            if self.noises is not None:
                x = self.noises[i](x, noise)
        return self.block(self.head(x))

    def labels(self, out: torch.Tensor) -> torch.Tensor:
        """The label map (B, H, W) int64 (0 = air, 1.. tissue labels) of an eval-mode output."""
        return (out[:, 0] > 0.5).long() if out.shape[1] == 1 else out.argmax(1)


class ScalarDiscriminator(nn.Module):
    """DCGAN encoder → one logit per image (conv k4 s2, BN from the second, LeakyReLU 0.2; mean of the last map)."""

    def __init__(self, in_ch: int, size: Sequence[int], ndf: int = 64, max_width: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        c, h, w, i = in_ch, int(size[0]), int(size[1]), 0
        while min(h, w) > 4 or i == 0:
            c_out = min(max_width, ndf * 2 ** i)
            layers.append(nn.Conv2d(c, c_out, 4, 2, 1, bias=i == 0))
            if i:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c, h, w, i = c_out, h // 2, w // 2, i + 1
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


class MultiScaleScalarD(nn.Module):
    """One :class:`ScalarDiscriminator` per scale (1, 1/2, 1/4 by default); returns one logit vector per scale."""

    def __init__(self, in_ch: int, size: Sequence[int], ndf: int = 64, scales: Sequence[float] = (1.0, 0.5, 0.25)):
        super().__init__()
        h, w = int(size[0]), int(size[1])
        self.factors = [int(round(1 / s)) for s in scales]
        if any(h // f < 4 or w // f < 4 for f in self.factors):
            raise HistosynthError(f"tissue mask size {h}x{w} is too small for discriminators at scales "
                                  f"{list(scales)} (each needs at least 4x4)")
        self.ds = nn.ModuleList([ScalarDiscriminator(in_ch, (h // f, w // f), ndf) for f in self.factors])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [d(F.avg_pool2d(x, f) if f > 1 else x) for d, f in zip(self.ds, self.factors)]


def discriminator_for(kind: str, in_ch: int, size: Sequence[int], ndf: int) -> MultiScaleScalarD:
    """DEPAS: three scales (100 / 50 / 25 %); the DCGAN baseline: one (100 %)."""
    return MultiScaleScalarD(in_ch, size, ndf, (1.0, 0.5, 0.25) if kind == "depas" else (1.0,))


def gan_loss(logits: Sequence[torch.Tensor], real: bool) -> torch.Tensor:
    """Σ_r α_r · BCE(D_r, real) with α_r = 1 (equations 3-4)."""
    target = 1.0 if real else 0.0
    return sum(F.binary_cross_entropy_with_logits(lg.float(), torch.full_like(lg.float(), target))
               for lg in logits)


def to_channels(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """A label map (B, H, W) as the discriminator sees real masks: (B, 1, H, W) tissue 0/1, or one-hot (B, K, H, W)."""
    if n_labels == 2:
        return (labels > 0).float().unsqueeze(1)
    return F.one_hot(labels.long(), n_labels).permute(0, 3, 1, 2).float()
