"""HoVer-Net (Graham et al. 2019): the network.

The layout follows pytorch-CycleGAN-and-pix2pix's ``networks.py``: one class
per block, the architecture readable top to bottom. The network follows the
official code (vqdang/hover_net, ``models/hovernet/net_desc.py`` and the
TensorFlow ``src/model/graph.py`` the paper's numbers came from)::

    image (B, 3, S, S), uint8 (divided by 255 here) or float in [0, 1]
    stem      conv 7×7 stride 1 → BN → ReLU                  w       "original": valid (S-6); "fast": same (S)
    stage 1   pre-activation bottleneck units ×3 (stride 1)   4w      d0   bottleneck 1×1 w → 3×3 w → 1×1 4w
    stage 2   ... ×4, the first with stride 2                  8w      d1   (bottleneck 2w)
    stage 3   ... ×6, the first with stride 2                 16w      d2   (bottleneck 4w)
    stage 4   ... ×3, the first with stride 2                 32w      d3   (bottleneck 8w), no max-pool anywhere
    conv_bot  conv 1×1                                        16w      (1024 at w = 64)
    three decoder branches NP (2), HV (2), TP (n_types + 1), each:
      u3   upsample ×2 (nearest) + d2 → conv k×k valid → 4w → dense block ×8 units → conv 1×1 → 8w
      u2   upsample ×2 + centre crop of d1 → conv k×k valid → 2w → dense block ×4 units → conv 1×1 → 4w
      u1   upsample ×2 + centre crop of d0 → conv k×k same → w
      head BN → ReLU → conv 1×1 (with bias) → logits / HV regression

A stage unit is pre-activation (He et al. 2016): BN → ReLU → 1×1 → BN → ReLU
→ 3×3 (stride) → BN → ReLU → 1×1, plus the shortcut; the first unit of a
stage has no pre-activation (the stem / previous stage already ends in BN →
ReLU) and its shortcut is a 1×1 convolution (with the stride) of that input;
each stage ends in BN → ReLU. A dense unit is BN → ReLU → 1×1 conv (2w) → BN
→ ReLU → k×k valid conv (w/2, 4 groups), concatenated to the centre-cropped
running features; the dense block ends in BN → ReLU. ``w`` = ``width`` (64 in
the paper; it must be a multiple of 8), and every channel count scales with
it. ``k`` = 5 in "original" mode and 3 in "fast" mode, as in the official
code. Strided 3×3 convolutions pad 1 on every side (the official code pads
TensorFlow-"same", i.e. only bottom/right; the sizes are the same, the
sampling grid is shifted by one input pixel).

Sizes (:meth:`HoVerNet.output_size`): "original" 270 → 80, "fast" 256 → 164,
the documented patch sizes (:data:`INPUT_SIZE`, :data:`OUTPUT_SIZE`). Other
inputs work when the stage-3 map has an even side (a multiple of 8 after the
stem always does) and the output is positive: e.g. "fast" 93–96 → 4 (the
smallest), 101–104 → 12, 255 → 164; "original" 195–198 → 8 (the
smallest). Targets are made at the input size and centre-cropped to the
output (:func:`crop_to_output`).

Cost of one patch, counted with ``torch.utils.flop_counter`` on the meta
device (FLOPs = 2 × multiply-accumulates; BatchNorm / ReLU / additions not
counted), "original" at 270 → 80 and "fast" at 256 → 164, for the NP + HV
branches and, after the slash, with a TP branch of 6 outputs (PanNuke's 5
types + background)::

    configuration               original 270 → 80                fast 256 → 164
                                params          FLOPs            params          FLOPs
    width 64, units (3,4,6,3)   45.0 / 54.7 M   322 / 392 G      33.6 / 37.6 M   256 / 298 G
    width 32, units (3,4,6,3)   11.3 / 13.7 M    81 / 98 G        8.4 / 9.4 M     64 / 75 G
    width 16, units (3,4,6,3)    2.8 / 3.4 M     20 / 25 G        2.1 / 2.4 M     16 / 19 G
    width 16, units (1,1,1,1)    1.9 / 2.5 M     13 / 18 G        1.1 / 1.4 M    9.4 / 12 G
    width 8,  units (1,1,1,1)   0.47 / 0.62 M   3.4 / 4.5 G      0.29 / 0.35 M  2.4 / 3.1 G

Initialisation as the official code: convolutions Kaiming-normal (fan-out,
ReLU), BatchNorm weight 1 and bias 0, head biases 0. Works under
``torch.autocast`` (bf16 on the CPU, fp16 / bf16 on CUDA); the loss computes
in float32 whatever the outputs' dtype (:mod:`histosynth.models.hovernet.loss`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import HistosynthError

MODES = ("fast", "original")
#: the documented patch sizes of the official code: input side → output side
INPUT_SIZE = {"fast": 256, "original": 270}
OUTPUT_SIZE = {"fast": 164, "original": 80}
#: decoder kernel size per mode (the official "fast" decoder uses 3×3, "original" 5×5)
DECODER_KSIZE = {"fast": 3, "original": 5}
DENSE_GROUPS = 4
#: "valid": the paper's unpadded decoder (output = centre of the input); "same": zero-padded (output = input)
PADDINGS = ("valid", "same")


def _channels(base: int, width: int) -> int:
    """A channel count of the paper-size network (width 64) scaled to ``width``."""
    return base * width // 64


def center_crop(x: Any, size: int | Sequence[int]) -> Any:
    """Centre-crop the last two axes of an array or tensor to ``size`` (side or (h, w)).

    The top/left margin is ``(H - h) // 2``, as the official ``crop_op`` /
    ``cropping_center``; a side smaller than the target is an error.
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    H, W = x.shape[-2:]
    if h > H or w > W or h < 0 or w < 0:
        raise HistosynthError(f"cannot centre-crop {H}x{W} to {h}x{w}")
    t, left = (H - h) // 2, (W - w) // 2
    return x[..., t:t + h, left:left + w]


def crop_to_output(targets: Mapping[str, Any], model: HoVerNet) -> dict[str, Any]:
    """Centre-crop every map of a target dict (made at the input size) to ``model``'s output size."""
    out = {}
    for key, value in targets.items():
        H, W = value.shape[-2:]
        out[key] = center_crop(value, model.output_size((H, W)))
    return out


# -- encoder ----------------------------------------------------------------------------------------
def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels, eps=1e-5), nn.ReLU(inplace=True))


class ResidualUnit(nn.Module):
    """Pre-activation bottleneck: [BN → ReLU] → 1×1 → BN → ReLU → 3×3 (stride) → BN → ReLU → 1×1."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, preact: bool = True):
        super().__init__()
        self.preact = bn_relu(in_ch) if preact else nn.Identity()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 1, bias=False),
            bn_relu(mid_ch),
            nn.Conv2d(mid_ch, mid_ch, 3, stride=stride, padding=1, bias=False),
            bn_relu(mid_ch),
            nn.Conv2d(mid_ch, out_ch, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.preact(x))


class ResidualStage(nn.Module):
    """``count`` residual units; the first strides and has a 1×1 projection shortcut; ends in BN → ReLU."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, count: int, stride: int):
        super().__init__()
        self.units = nn.ModuleList(
            ResidualUnit(in_ch if i == 0 else out_ch, mid_ch, out_ch, stride if i == 0 else 1, preact=i > 0)
            for i in range(count)
        )
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
                         if in_ch != out_ch or stride != 1 else nn.Identity())
        self.last = bn_relu(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shortcut(x) + self.units[0](x)
        for unit in self.units[1:]:
            x = x + unit(x)
        return self.last(x)


class Encoder(nn.Module):
    """Stem conv 7×7 (no max-pool) and four pre-activation ResNet-50 stages; returns d0..d3 (d3 after conv_bot)."""

    def __init__(self, width: int, units: Sequence[int], stem_padding: int, in_ch: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 7, padding=stem_padding, bias=False), bn_relu(width))
        stages, c = [], width
        for i, count in enumerate(units):
            out = 4 * width * 2**i
            stages.append(ResidualStage(c, width * 2**i, out, count, stride=1 if i == 0 else 2))
            c = out
        self.stages = nn.ModuleList(stages)
        self.conv_bot = nn.Conv2d(c, 16 * width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats[-1] = self.conv_bot(feats[-1])
        return feats


# -- decoder ----------------------------------------------------------------------------------------
class DenseUnit(nn.Module):
    """BN → ReLU → 1×1 conv → BN → ReLU → k×k conv (4 groups; valid, or zero-padded ``pad``): ``growth`` channels."""

    def __init__(self, in_ch: int, bottleneck: int, growth: int, ksize: int, pad: int = 0):
        super().__init__()
        self.block = nn.Sequential(
            bn_relu(in_ch),
            nn.Conv2d(in_ch, bottleneck, 1, bias=False),
            bn_relu(bottleneck),
            nn.Conv2d(bottleneck, growth, ksize, padding=pad, groups=DENSE_GROUPS, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DenseBlock(nn.Module):
    """``count`` dense units, each concatenated to the centre-cropped running features; ends in BN → ReLU."""

    def __init__(self, in_ch: int, bottleneck: int, growth: int, ksize: int, count: int, pad: int = 0):
        super().__init__()
        self.units = nn.ModuleList(DenseUnit(in_ch + i * growth, bottleneck, growth, ksize, pad)
                                   for i in range(count))
        self.out_ch = in_ch + count * growth
        self.last = bn_relu(self.out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            new = unit(x)
            x = torch.cat([center_crop(x, new.shape[-2:]), new], dim=1)
        return self.last(x)


class DecoderLevel(nn.Module):
    """conv k×k (valid, or zero-padded ``pad``) → dense block → conv 1×1: one of the u3 / u2 levels."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, ksize: int, dense_units: int, width: int,
                 pad: int = 0):
        super().__init__()
        self.conva = nn.Conv2d(in_ch, mid_ch, ksize, padding=pad, bias=False)
        self.dense = DenseBlock(mid_ch, _channels(128, width), _channels(32, width), ksize, dense_units, pad)
        self.convf = nn.Conv2d(self.dense.out_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convf(self.dense(self.conva(x)))


def upsample_add(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour ×2 upsampling of ``x`` plus ``skip`` centre-cropped to it."""
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x + center_crop(skip, x.shape[-2:])


class DecoderBranch(nn.Module):
    """u3 (dense ×8) → u2 (dense ×4) → u1 (conv same) → BN → ReLU → conv 1×1 with ``out_ch`` outputs."""

    def __init__(self, out_ch: int, width: int, ksize: int, dense_units: Sequence[int], pad: int = 0):
        super().__init__()
        self.u3 = DecoderLevel(16 * width, 4 * width, 8 * width, ksize, dense_units[0], width, pad)
        self.u2 = DecoderLevel(8 * width, 2 * width, 4 * width, ksize, dense_units[1], width, pad)
        self.u1 = nn.Conv2d(4 * width, width, ksize, padding=ksize // 2, bias=False)
        self.head = nn.Sequential(bn_relu(width), nn.Conv2d(width, out_ch, 1, bias=True))

    def forward(self, d: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.u3(upsample_add(d[3], d[2]))
        x = self.u2(upsample_add(x, d[1]))
        x = self.u1(upsample_add(x, d[0]))
        return self.head(x)


class HoVerNet(nn.Module):
    """HoVer-Net: pre-activation ResNet-50 encoder and NP / HV / [TP] decoder branches.

    ``n_types``: nucleus types without background (the TP head has
    ``n_types + 1`` outputs, 0 = background); None or 0 leaves the TP branch
    out. ``mode``: "original" (270 → 80, 5×5 decoder) or "fast" (256 → 164,
    3×3 decoder). ``width`` (multiple of 8; 64 = paper), ``units`` (residual
    units per stage; (3, 4, 6, 3) = ResNet-50) and ``dense_units`` (units of
    the u3 / u2 dense blocks; (8, 4) = paper) shrink it for the CPU.
    ``padding``: "valid" (the paper's: the decoder's k×k convolutions are
    unpadded, so the output is the centre of the input) or "same" (they are
    zero-padded, the stem too: the output is the whole input, whose side must
    be a multiple of 8; the same parameters, and on the CPU several times the
    output pixels per second — ``benchmarks/segmenter_speed.py``).

    ``forward(images)`` takes (B, 3, S, S), uint8 (divided by 255 here) or
    float already in [0, 1], and returns ``{"np": (B, 2, s, s) logits, "hv":
    (B, 2, s, s) horizontal / vertical maps, "tp": (B, n_types + 1, s, s)
    logits}`` ("tp" only with types) with ``s = output_size(S)``.
    """

    def __init__(self, n_types: int | None = None, mode: str = "fast", width: int = 64,
                 units: Sequence[int] = (3, 4, 6, 3), dense_units: Sequence[int] = (8, 4), in_ch: int = 3,
                 padding: str = "valid"):
        super().__init__()
        if mode not in MODES:
            raise HistosynthError(f"HoVer-Net mode must be one of {MODES}, got {mode!r}")
        if padding not in PADDINGS:
            raise HistosynthError(f"HoVer-Net padding must be one of {PADDINGS}, got {padding!r}")
        if width < 8 or width % 8:
            raise HistosynthError(f"HoVer-Net width must be a positive multiple of 8, got {width}")
        units, dense_units = tuple(int(u) for u in units), tuple(int(u) for u in dense_units)
        if len(units) != 4 or min(units) < 1:
            raise HistosynthError(f"units must be four positive counts (one per stage), got {units}")
        if len(dense_units) != 2 or min(dense_units) < 0:
            raise HistosynthError(f"dense_units must be two counts >= 0 (u3, u2), got {dense_units}")
        if n_types is not None and n_types < 0:
            raise HistosynthError(f"n_types must be None or >= 0, got {n_types}")
        n_types = int(n_types) if n_types else 0
        self.config = {"n_types": n_types, "mode": mode, "width": int(width), "units": list(units),
                       "dense_units": list(dense_units), "in_ch": int(in_ch), "padding": padding}
        ksize = DECODER_KSIZE[mode]
        same = padding == "same"
        self.encoder = Encoder(width, units, stem_padding=3 if mode == "fast" or same else 0, in_ch=in_ch)
        heads = {"np": 2, "hv": 2}
        if n_types:
            heads["tp"] = n_types + 1
        pad = ksize // 2 if same else 0
        self.decoders = nn.ModuleDict({k: DecoderBranch(c, width, ksize, dense_units, pad)
                                       for k, c in heads.items()})
        init_weights(self)

    @property
    def n_types(self) -> int:
        return self.config["n_types"]

    @property
    def mode(self) -> str:
        return self.config["mode"]

    def output_size(self, input_size: int | Sequence[int]) -> int | tuple[int, int]:
        """The output side(s) for an input side (or (h, w)); HistosynthError if the input cannot work."""
        if not isinstance(input_size, (int, np.integer)):
            return tuple(self.output_size(int(s)) for s in input_size)  # type: ignore[return-value]
        if self.config["padding"] == "same":
            if input_size < 8 or input_size % 8:
                raise HistosynthError(f"HoVer-Net with same padding needs an input side that is a positive "
                                      f"multiple of 8, got {input_size}")
            return int(input_size)
        k = DECODER_KSIZE[self.mode]
        n3, n2 = self.config["dense_units"]
        d0 = int(input_size) - (0 if self.mode == "fast" else 6)
        d1 = math.ceil(d0 / 2)
        d2 = math.ceil(d1 / 2)
        d3 = math.ceil(d2 / 2)
        u3 = 2 * d3 - (k - 1) * (1 + n3)
        u2 = 2 * u3 - (k - 1) * (1 + n2)
        out = 2 * u2
        if d0 < 1 or 2 * d3 > d2 or u3 < 1 or 2 * u3 > d1 or u2 < 1 or out > d0:
            raise HistosynthError(
                f"HoVer-Net ({self.mode}) cannot take a {input_size}-px input: the sides must leave an even "
                f"stage-3 map and a positive output (e.g. {INPUT_SIZE[self.mode]} → {OUTPUT_SIZE[self.mode]})")
        return out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != self.config["in_ch"]:
            raise HistosynthError(f"HoVer-Net needs (B, {self.config['in_ch']}, H, W) images, "
                                  f"got {tuple(images.shape)}")
        self.output_size(tuple(images.shape[-2:]))  # validates
        if not images.is_floating_point():
            images = images.float() / 255.0
        d = self.encoder(images)
        return {name: branch(d) for name, branch in self.decoders.items()}


def init_weights(net: nn.Module) -> nn.Module:
    """Official init: conv weights Kaiming-normal (fan-out, ReLU), conv biases 0, BatchNorm weight 1 / bias 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net
