"""The pix2pixHD generator (Wang et al. 2018, "High-Resolution Image Synthesis and Semantic Manipulation with
Conditional GANs", CVPR): the global generator G1 and, optionally, one local enhancer G2 at 2×;
``gan.generator: pix2pixhd``.

Global generator (:class:`GlobalGenerator`, the paper's G1): a 7×7 conv (reflection padding) to ``width``
channels, ``n_down`` 3×3 stride-2 convs doubling the channels, ``n_blocks`` residual blocks (3×3 convs,
reflection padding) at the bottom, ``n_down`` 3×3 stride-2 transposed convs halving them again, and the
output layer: a 7×7 conv to 3 channels + Tanh. Every other conv is followed by the norm (``gan.norm``;
pix2pixHD itself uses instance norm) and ReLU. The paper's G1 has width 64, 4 downsamplings and 9 residual
blocks at 1024 × 512; the defaults here (``gan.n_down`` 3, ``gan.n_blocks`` 3, ``gan.width`` 32) are sized
for 128-px crops on a CPU.

Local enhancer (``local_enhancer=True``, :class:`LocalEnhancer`, the paper's G2 with one enhancer): G1 runs
on the input downsampled 2× (average pool 3, stride 2) at twice the width, its output layer dropped; a front
end (7×7 conv to ``width``, a stride-2 conv to 2·width) reads the full-resolution input, and its features
are *added* to G1's last feature map; then 3 residual blocks, a transposed conv back to full resolution and
``width`` channels, and the output layer. The input side must then be divisible by ``2 * 2**n_down``.

Convs whose output goes straight into a normalisation have no bias (it would be cancelled); the weights are
initialised as pix2pix's (N(0, 0.02)), which is also pix2pixHD's.
"""

from __future__ import annotations

import torch
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models.gan_layers import Generator, norm_layer

#: residual blocks of the local enhancer (the paper's ``n_blocks_local``)
LOCAL_BLOCKS = 3
#: layers of the 7×7 input conv (reflection pad, conv, norm, ReLU) that open G1's ``model`` and G2's ``front``
STEM_LAYERS = 4


def _conv_norm_relu(conv: nn.Module, norm: str, channels: int) -> list[nn.Module]:
    return [conv, norm_layer(norm, channels), nn.ReLU(inplace=False)]


class ResnetBlock(nn.Module):
    """x + (reflection pad 1 → conv 3×3 → norm → ReLU → reflection pad 1 → conv 3×3 → norm)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            *_conv_norm_relu(nn.Conv2d(channels, channels, 3, bias=False), norm, channels),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class GlobalGenerator(nn.Module):
    """G1 without its output layer: (N, in_ch, H, W) → features (N, width, H, W).

    ``model[:STEM_LAYERS]`` is the 7×7 input conv, ``model[:blocks_start]`` the whole encoder and
    ``model[blocks_start:]`` the residual blocks and the decoder (the hooks DAFF-GAN's generator uses).
    """

    def __init__(self, in_ch: int, width: int, n_down: int, n_blocks: int, norm: str):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), *_conv_norm_relu(nn.Conv2d(in_ch, width, 7, bias=False), norm, width)]
        for i in range(n_down):
            c = width * 2**i
            layers += _conv_norm_relu(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), norm, 2 * c)
        self.blocks_start = len(layers)
        layers += [ResnetBlock(width * 2**n_down, norm) for _ in range(n_blocks)]
        for i in range(n_down, 0, -1):
            c = width * 2**i
            layers += _conv_norm_relu(nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1,
                                                         bias=False), norm, c // 2)
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LocalEnhancer(nn.Module):
    """G2 without its output layer: front end on the full-resolution input, + G1's features, back end.

    ``forward(x, global_features)`` takes the input (N, in_ch, H, W) and G1's last feature map
    (N, 2·width, H/2, W/2) and returns features (N, width, H, W). ``front[:STEM_LAYERS]`` is its 7×7 input
    conv; ``back`` starts with the residual blocks.
    """

    def __init__(self, in_ch: int, width: int, norm: str):
        super().__init__()
        self.front = nn.Sequential(
            nn.ReflectionPad2d(3),
            *_conv_norm_relu(nn.Conv2d(in_ch, width, 7, bias=False), norm, width),
            *_conv_norm_relu(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), norm, 2 * width),
        )
        self.back = nn.Sequential(
            *[ResnetBlock(2 * width, norm) for _ in range(LOCAL_BLOCKS)],
            *_conv_norm_relu(nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1, output_padding=1,
                                                bias=False), norm, width),
        )

    def forward(self, x: torch.Tensor, global_features: torch.Tensor) -> torch.Tensor:
        return self.back(self.front(x) + global_features)


class Pix2PixHDGenerator(Generator):
    """G1 alone, or G1 at half resolution inside the local enhancer G2; see the module docstring.

    A subclass (DAFF-GAN's, :mod:`histosynth.models.daff`) swaps G1 and G2 for its own through
    :meth:`global_generator` and :meth:`local_generator`, and adds its settings to ``extra`` (its config).
    """

    kind = "pix2pixhd"

    def __init__(self, in_ch: int, out_ch: int = 3, width: int = 32, n_down: int = 3, n_blocks: int = 3,
                 norm: str = "batch", local_enhancer: bool = False, *, extra: dict | None = None):
        if in_ch < 1 or out_ch < 1 or width < 1:
            raise HistosynthError(f"the {self.kind} generator's channel counts must be positive")
        if n_down < 1 or n_blocks < 1:
            raise HistosynthError(f"the {self.kind} generator needs n_down >= 1 and n_blocks >= 1, got {n_down} "
                                  f"and {n_blocks}")
        norm_layer(norm, 1)  # validates
        multiple = 2 ** (n_down + bool(local_enhancer))
        why = f"the global generator halves it {n_down} times"
        super().__init__({"in_ch": int(in_ch), "out_ch": int(out_ch), "width": int(width), "n_down": int(n_down),
                          "n_blocks": int(n_blocks), "norm": norm, "local_enhancer": bool(local_enhancer),
                          **(extra or {})},
                         multiple, why + (", after the local enhancer's 2x downsampling" if local_enhancer else ""))
        if local_enhancer:
            self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
            self.global_net = self.global_generator(in_ch, 2 * width, n_down, n_blocks, norm)
            self.local_net = self.local_generator(in_ch, width, norm)
        else:
            self.global_net = self.global_generator(in_ch, width, n_down, n_blocks, norm)
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, out_ch, 7), nn.Tanh())

    def global_generator(self, in_ch: int, width: int, n_down: int, n_blocks: int, norm: str) -> GlobalGenerator:
        """G1 without its output layer (``width``: twice the generator's under the local enhancer)."""
        return GlobalGenerator(in_ch, width, n_down, n_blocks, norm)

    def local_generator(self, in_ch: int, width: int, norm: str) -> LocalEnhancer:
        """G2 without its output layer."""
        return LocalEnhancer(in_ch, width, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_side(*x.shape[-2:])
        if not self.config["local_enhancer"]:
            return self.head(self.global_net(x))
        return self.head(self.local_net(x, self.global_net(self.downsample(x))))
