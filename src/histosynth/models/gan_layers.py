"""What the mask → H&E GAN networks share: the norm layers, the pix2pix init, the generator base class.

Every generator (:mod:`histosynth.models.unet`, :mod:`histosynth.models.pix2pixhd`,
:mod:`histosynth.models.daff`, :mod:`histosynth.models.spade`; built by :mod:`histosynth.models.generators`)
is a :class:`Generator`: it maps the conditioning (N, in_ch, H, W) of
:func:`histosynth.gan.conditioning.build_conditioning` to images (N, out_ch, H, W) in [−1, 1], and exposes
what training and translation use of it — ``config`` (its ``kind`` and the keyword arguments that rebuild
it; saved in every GAN checkpoint), ``multiple`` (the side H and W must be divisible by) and
:meth:`Generator.set_inference_mode`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from histosynth.errors import HistosynthError

NORMS = ("batch", "instance")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm (learned affine) or InstanceNorm (no affine, no running stats), as pix2pix."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    raise HistosynthError(f"norm must be one of {NORMS}, got {norm!r}")


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """pix2pix init: conv / linear weights N(0, gain), BatchNorm weights N(1, gain), biases 0.

    A parameter-free BatchNorm (SPADE's) has nothing to initialise.
    """
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


class Generator(nn.Module):
    """A mask → H&E generator: conditioning (N, in_ch, H, W) → images (N, out_ch, H, W) in [−1, 1].

    A subclass names itself in ``kind`` and calls ``super().__init__(config, multiple, why)`` with the
    keyword arguments that rebuild it (``config``; ``in_ch`` among them), the factor its input sides must be
    divisible by, and why, in words, for the error messages ("the U-Net halves it 7 times").
    """

    kind: ClassVar[str]

    def __init__(self, config: dict[str, Any], multiple: int, why: str):
        super().__init__()
        self.config: dict[str, Any] = {"kind": self.kind, **config}
        self.multiple = int(multiple)
        self.why_multiple = why

    def check_side(self, h: int, w: int) -> None:
        """One clear error when an input of ``h`` × ``w`` px cannot pass through the network."""
        if h % self.multiple or w % self.multiple:
            raise HistosynthError(f"the {self.kind} generator needs sides divisible by {self.multiple} "
                                  f"({self.why_multiple}), got {h}x{w}")

    def set_inference_mode(self) -> None:
        """eval(): BatchNorm uses its running statistics (the U-Net also turns its dropout back on)."""
        self.eval()
