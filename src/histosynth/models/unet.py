"""The pix2pix U-Net generator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", CVPR), as the Optional-pix2pix seed uses it; ``gan.generator: unet``, the default.

Encoder C64-C128-C256-C512-C512-C512-C512-C512 (conv 4×4 stride 2, LeakyReLU
0.2, no norm on the first and the innermost layer), decoder
CD512-CD512-CD512-C512-C256-C128-C64 (ReLU, transposed conv 4×4 stride 2,
norm, dropout 0.5 in the ``dropout_innermost`` innermost up blocks) with skip
connections, then Tanh. ``depth`` and ``width`` shrink it for the CPU.

Dropout at inference: pix2pix keeps dropout on at test time as its only
source of randomness; this is ``config["dropout_at_inference"]`` (default
True), honoured by :meth:`UnetGenerator.set_inference_mode`.
"""

from __future__ import annotations

import torch
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models.gan_layers import Generator, norm_layer


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


class UnetGenerator(Generator):
    """The pix2pix U-Net: ``depth`` down blocks, ``depth`` up blocks, skips by concatenation.

    Level i has ``min(width * 2**i, max_width)`` channels; the input side must
    be divisible by ``2**depth`` (256 px for the paper's depth 8).
    """

    kind = "unet"

    def __init__(self, in_ch: int, out_ch: int = 3, depth: int = 8, width: int = 64, max_width: int = 512,
                 dropout_innermost: int = 3, norm: str = "batch", dropout_at_inference: bool = True):
        if depth < 2:
            raise HistosynthError(f"U-Net depth must be at least 2, got {depth}")
        if in_ch < 1 or out_ch < 1 or width < 1 or max_width < 1:
            raise HistosynthError("U-Net channel counts must be positive")
        norm_layer(norm, 1)  # validates
        super().__init__({"in_ch": int(in_ch), "out_ch": int(out_ch), "depth": int(depth), "width": int(width),
                          "max_width": int(max_width), "dropout_innermost": int(dropout_innermost), "norm": norm,
                          "dropout_at_inference": bool(dropout_at_inference)},
                         2**depth, f"the U-Net of depth {depth} halves it {depth} times")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_side(*x.shape[-2:])
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
