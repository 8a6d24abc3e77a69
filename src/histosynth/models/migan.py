"""MI-GAN (seed "GAN-Based Method for Synthesizing Multi-focus Cell Images"): the networks, read top to bottom.

Two generators, trained independently (trainer: :mod:`histosynth.multifocus.train`):

- **G1**, the base-image generator (paper section 2.1, Fig. 2), a DCGAN: z ∈ R^100 → a 64 × 64 × 3 in-focus
  cell image; critic **D1**; WGAN-GP, λ = 10.
- **G2**, the multi-focus generator (section 2.2, Fig. 3): the base image → the Z planes of the cell's z-stack
  (Z = 11 in the paper: I₋₅ … I₊₅): Z 2-D encoders → a 3-D ResNet over the plane axis → Z 2-D decoders;
  critic **D2** (3-D convolutions); the 3-D version of WGAN-GP, λ = 10.

Images are in [−1, 1], channels first: G1 gives (B, 3, 64, 64), G2 (B, 3, 64, 64) → (B, Z, 3, 64, 64), D1
and D2 give one score per sample, (B,).

**Where the paper's sizes do not add up, the choices made here:**

1. *G1's first map.* "Four up-sampling convolution layers" (kernel 6, stride 2, padding 2: each exactly
   doubles the side, (n − 1)·2 − 4 + 6 = 2n) take a 4 × 4 map to 64 × 64, but the paper does not say how z
   becomes that 4 × 4 map. Here it is DCGAN's own projection: z as a (100, 1, 1) map through a 4 × 4
   transposed convolution (stride 1, no padding; the same as a linear layer to 8w × 4 × 4) + BN + ReLU.
   The fourth up-sampling layer ends in tanh instead of BN + ReLU (DCGAN; the image must lie in [−1, 1]).
2. *No BatchNorm in the critics.* The paper puts BN after D2's convolutions, but WGAN-GP penalises the
   gradient of *each sample's* score, and BatchNorm makes a sample's score depend on the rest of its batch
   (Gulrajani et al. drop it for that reason). D1 and D2 use layer normalisation instead — ``GroupNorm(1,
   C)``, a per-sample normalisation over channels and positions, what the WGAN-GP paper recommends — after
   every convolution but the first and the last (DCGAN's critic layout).
3. *D1's six 5 × 5 convolutions.* The paper gives kernel 5 only; here all six have stride 2 and padding 2,
   which takes 64 → 32 → 16 → 8 → 4 → 2 → 1: the sixth convolution (to one channel) *is* the score, with
   no linear head. LeakyReLU(0.2) as in DCGAN's discriminator (the paper names no activation for D1).
4. *D2's six 3-D convolutions* (kernel 5, stride 2, padding 2 on all three axes, as the paper says) take
   the spatial sides 64 → 1 as in D1; the plane axis goes 11 → 6 → 3 → 2 → 1 → 1 → 1, so the last two
   convolutions see the plane axis only through their kernel's centre slice. That is what the paper's
   numbers give; it is kept (rather than a stride of 1 on the plane axis) because after four layers each
   unit already sees every plane. ReLU, as the paper says.
5. *The encoders' output: "11 × 3 × 4 × 4".* Four stride-2 convolutions take 64 → 4, but a 3-channel 4 × 4
   code (48 numbers per plane) is far too narrow for a decoder without skips to redraw a 64 × 64 cell, and
   the paper's own "3" may be the RGB of its figure. Here each encoder ends in ``code_channels`` channels
   (default 4 × width = 128 at width 32); ``code_channels=3`` is the paper read literally. The Z codes
   (B, C, 4, 4) are stacked on a plane axis into (B, C, Z, 4, 4), the 3-D ResNet's input.
6. *The 3-D ResNet's "seven layers"*: seven residual blocks, each conv3d 3×3×3 → BN → LeakyReLU(0.2) →
   conv3d 3×3×3 → BN, plus the identity (the paper's sub-layers; padding 1 keeps (Z, 4, 4)), at
   ``code_channels`` channels.
7. *Widths.* G1 follows DCGAN (ngf = 64: 512 → 256 → 128 → 64 → 3), D1 ndf = 64 (64 … 512, capped at 8 ×).
   G2's encoders w → 2w → 4w → C and decoders C → 4w → 2w → w → 3 with w = 32; D2 w = 32 doubling to at
   most 256 (a 5³ kernel at 512 × 512 channels is 33 M weights per layer). The paper gives no widths.

The checkpoint file (``g1.pt`` / ``g2.pt`` and the trainers' ``checkpoint.pt``): ``format`` / ``version``,
``kind`` ('g1' / 'g2'), ``config`` (the generator's and the critic's keyword arguments), ``generator``,
``critic`` (state dicts), ``step``, ``train`` (the settings); read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models.checkpoint import read_torch_checkpoint

MIGAN_FORMAT = "histosynth-migan"
MIGAN_VERSION = 1
IMAGE_SIZE = 64  # the paper's cell images; four stride-2 layers from / to a 4 x 4 map
KINDS = ("g1", "g2")


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """DCGAN's init: convolution weights N(0, 0.02), norm weights N(1, 0.02), biases 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)) and m.affine:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


# -- building blocks ----------------------------------------------------------------------------------------
def up(in_ch: int, out_ch: int, last: bool = False) -> nn.Sequential:
    """Transposed conv 6 × 6, stride 2, padding 2 (doubles the side), then BN + ReLU, or tanh when ``last``."""
    conv = nn.ConvTranspose2d(in_ch, out_ch, 6, 2, 2, bias=last)
    return nn.Sequential(conv, nn.Tanh()) if last else nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU(True))


def down(in_ch: int, out_ch: int) -> nn.Sequential:
    """Conv 6 × 6, stride 2, padding 2 (halves the side), then BN + ReLU (G2's encoders)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 6, 2, 2, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(True))


def critic_layer(conv: nn.Module, out_ch: int, norm: bool, act: nn.Module) -> nn.Sequential:
    """A critic's convolution, then layer norm (``GroupNorm(1, C)``: per sample, see choice 2) and ``act``."""
    return nn.Sequential(conv, *([nn.GroupNorm(1, out_ch)] if norm else []), act)


def _widths(width: int, n: int, cap: int) -> list[int]:
    return [min(width * 2 ** i, cap) for i in range(n)]


# -- G1 and D1 ----------------------------------------------------------------------------------------------
class BaseGenerator(nn.Module):
    """G1: z (B, z_dim) → base cell image (B, 3, 64, 64) in [−1, 1] (choice 1)."""

    def __init__(self, z_dim: int = 100, width: int = 64):
        super().__init__()
        self.config = {"z_dim": int(z_dim), "width": int(width)}
        w = int(width)
        self.project = nn.Sequential(nn.ConvTranspose2d(z_dim, 8 * w, 4, 1, 0, bias=False),
                                     nn.BatchNorm2d(8 * w), nn.ReLU(True))          # 1 → 4
        self.up = nn.Sequential(up(8 * w, 4 * w), up(4 * w, 2 * w), up(2 * w, w),  # 4 → 8 → 16 → 32
                                up(w, 3, last=True))                              # 32 → 64, tanh

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.project(z[:, :, None, None]))


class Critic2d(nn.Module):
    """D1: image (B, 3, 64, 64) → score (B,): six convs 5 × 5 / stride 2 / padding 2 (choices 2 and 3)."""

    def __init__(self, width: int = 64, max_width: int = 512):
        super().__init__()
        self.config = {"width": int(width), "max_width": int(max_width)}
        ch = [3, *_widths(width, 5, max_width)]
        layers = [critic_layer(nn.Conv2d(ch[i], ch[i + 1], 5, 2, 2), ch[i + 1], i > 0, nn.LeakyReLU(0.2, True))
                  for i in range(5)]                                                # 64 → 2
        self.net = nn.Sequential(*layers, nn.Conv2d(ch[-1], 1, 5, 2, 2))           # 2 → 1: the score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1).mean(1)


# -- G2 and D2 ----------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """One plane's 2-D encoder: base image (B, 3, 64, 64) → code (B, code_ch, 4, 4); four ``down`` layers."""

    def __init__(self, width: int, code_ch: int):
        super().__init__()
        self.net = nn.Sequential(down(3, width), down(width, 2 * width), down(2 * width, 4 * width),
                                 down(4 * width, code_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResBlock3d(nn.Module):
    """x + BN(conv3d(LeakyReLU(BN(conv3d(x))))), 3 × 3 × 3 kernels with padding 1 (choice 6)."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm3d(ch), nn.LeakyReLU(0.2, True),
                                  nn.Conv3d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm3d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Decoder(nn.Module):
    """One plane's 2-D decoder: code (B, code_ch, 4, 4) → image (B, 3, 64, 64); four ``up`` layers, tanh."""

    def __init__(self, width: int, code_ch: int):
        super().__init__()
        self.net = nn.Sequential(up(code_ch, 4 * width), up(4 * width, 2 * width), up(2 * width, width),
                                 up(width, 3, last=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiFocusGenerator(nn.Module):
    """G2: base image (B, 3, 64, 64) → stack (B, Z, 3, 64, 64); plane ``center`` is the base image's plane."""

    def __init__(self, planes: int = 11, width: int = 32, code_channels: int = 128, res_blocks: int = 7):
        super().__init__()
        self.config = {"planes": int(planes), "width": int(width), "code_channels": int(code_channels),
                       "res_blocks": int(res_blocks)}
        self.encoders = nn.ModuleList(Encoder(width, code_channels) for _ in range(planes))
        self.resnet = nn.Sequential(*(ResBlock3d(code_channels) for _ in range(res_blocks)))
        self.decoders = nn.ModuleList(Decoder(width, code_channels) for _ in range(planes))

    @property
    def planes(self) -> int:
        return self.config["planes"]

    @property
    def center(self) -> int:
        """The plane the base image stands for (the trainer centres each real stack on its best plane)."""
        return self.planes // 2

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        codes = torch.stack([enc(base) for enc in self.encoders], 2)      # (B, C, Z, 4, 4)
        codes = self.resnet(codes)
        return torch.stack([dec(codes[:, :, k]) for k, dec in enumerate(self.decoders)], 1)  # (B, Z, 3, 64, 64)


class Critic3d(nn.Module):
    """D2: stack (B, Z, 3, 64, 64) → score (B,): six conv3d 5³ / stride 2 / padding 2 (choices 2 and 4)."""

    def __init__(self, width: int = 32, max_width: int = 256):
        super().__init__()
        self.config = {"width": int(width), "max_width": int(max_width)}
        ch = [3, *_widths(width, 5, max_width)]
        layers = [critic_layer(nn.Conv3d(ch[i], ch[i + 1], 5, 2, 2), ch[i + 1], i > 0, nn.ReLU(True))
                  for i in range(5)]
        self.net = nn.Sequential(*layers, nn.Conv3d(ch[-1], 1, 5, 2, 2))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v.transpose(1, 2)).flatten(1).mean(1)             # (B, 3, Z, H, W) for conv3d


# -- building, checkpoints ----------------------------------------------------------------------------------
def define_g1(z_dim: int = 100, width: int = 64, critic_width: int = 64) -> tuple[BaseGenerator, Critic2d]:
    """(G1, D1), freshly initialised (DCGAN init)."""
    return init_weights(BaseGenerator(z_dim, width)), init_weights(Critic2d(critic_width))


def define_g2(planes: int = 11, width: int = 32, code_channels: int = 128, res_blocks: int = 7,
              critic_width: int = 32) -> tuple[MultiFocusGenerator, Critic3d]:
    """(G2, D2), freshly initialised (DCGAN init)."""
    if planes < 1 or res_blocks < 0 or code_channels < 1 or width < 1:
        raise HistosynthError(f"G2 needs planes >= 1, width >= 1, code_channels >= 1 and res_blocks >= 0, got "
                              f"{planes}, {width}, {code_channels}, {res_blocks}")
    return (init_weights(MultiFocusGenerator(planes, width, code_channels, res_blocks)),
            init_weights(Critic3d(critic_width)))


def build(kind: str, config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """(generator, critic) of ``kind`` from a checkpoint's ``config`` (``generator`` and ``critic`` kwargs)."""
    if kind == "g1":
        return BaseGenerator(**config["generator"]), Critic2d(**config["critic"])
    if kind == "g2":
        return MultiFocusGenerator(**config["generator"]), Critic3d(**config["critic"])
    raise HistosynthError(f"unknown MI-GAN network {kind!r} (one of {KINDS})")


def checkpoint_dict(kind: str, G: nn.Module, D: nn.Module, *, step: int, **extra: Any) -> dict[str, Any]:
    """What every MI-GAN file holds (CPU tensors, plain types), plus ``extra``."""
    return {"format": MIGAN_FORMAT, "version": MIGAN_VERSION, "kind": kind,
            "config": {"generator": dict(G.config), "critic": dict(D.config)},
            "generator": {k: v.detach().cpu().clone() for k, v in G.state_dict().items()},
            "critic": {k: v.detach().cpu().clone() for k, v in D.state_dict().items()},
            "step": int(step), **extra}


def read_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of an MI-GAN file; ``kind`` ('g1' / 'g2'): another is an error."""
    ckpt = read_torch_checkpoint(path, MIGAN_FORMAT, MIGAN_VERSION, "MI-GAN")
    if ckpt.get("kind") not in KINDS:
        raise HistosynthError(f"MI-GAN checkpoint of unknown kind {ckpt.get('kind')!r}", path)
    if kind is not None and ckpt["kind"] != kind:
        raise HistosynthError(f"an MI-GAN {ckpt['kind'].upper()} checkpoint where {kind.upper()} is needed", path)
    return ckpt


def load(path: str | os.PathLike, kind: str) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(generator, critic, the file's contents) of an MI-GAN file on the CPU, the generator in eval mode."""
    ckpt = read_checkpoint(path, kind)
    try:
        G, D = build(kind, ckpt["config"])
        G.load_state_dict(ckpt["generator"])
        D.load_state_dict(ckpt["critic"])
    except (KeyError, RuntimeError, TypeError) as err:
        raise HistosynthError(f"MI-GAN checkpoint does not match its own config: {str(err).splitlines()[0][:200]}",
                              path) from err
    G.eval()
    return G, D, ckpt
