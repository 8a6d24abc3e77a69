"""The mask → H&E generators by name (``gan.generator``): build a fresh one, or rebuild one from a checkpoint.

- ``unet`` — the pix2pix U-Net (:mod:`histosynth.models.unet`), the default;
- ``pix2pixhd`` — the pix2pixHD global generator, optionally with its local enhancer
  (:mod:`histosynth.models.pix2pixhd`);
- ``daff`` — the DAFF-GAN generator: pix2pixHD with criss-cross attention and remote skips
  (:mod:`histosynth.models.daff`);
- ``spade`` — the SPADE generator (:mod:`histosynth.models.spade`).

All take the same conditioning (N, in_ch, H, W) and return (N, 3, H, W) in [−1, 1]; they are
:class:`histosynth.models.gan_layers.Generator` subclasses, whose ``config["kind"]`` names the entry here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from histosynth.errors import HistosynthError
from histosynth.models.daff import DaffGenerator
from histosynth.models.gan_layers import Generator, init_weights
from histosynth.models.pix2pixhd import Pix2PixHDGenerator
from histosynth.models.spade import SpadeGenerator
from histosynth.models.unet import UnetGenerator

GENERATORS: dict[str, type[Generator]] = {
    cls.kind: cls for cls in (UnetGenerator, Pix2PixHDGenerator, DaffGenerator, SpadeGenerator)
}
#: the kind of a checkpoint written before generators had names
DEFAULT_KIND = "unet"


def generator_class(kind: str) -> type[Generator]:
    """The class of ``kind``, or one clear error naming the known kinds."""
    if kind not in GENERATORS:
        raise HistosynthError(f"generator must be one of {tuple(GENERATORS)}, got {kind!r}")
    return GENERATORS[kind]


def _arguments(cls: type[Generator]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "extra"}  # extra: a subclass's settings


def define_G(kind: str, in_ch: int, out_ch: int = 3, *, init_gain: float = 0.02, **settings: Any) -> Generator:
    """A freshly initialised generator of ``kind`` (N(0, ``init_gain``) weights, as pix2pix).

    ``settings`` may hold the settings of every kind (train-gan passes them all): each generator takes those
    its constructor names and leaves the others (``depth`` is the U-Net's, ``n_blocks`` pix2pixHD's and DAFF-GAN's,
    ``attention_recurrence`` DAFF-GAN's).
    """
    cls = generator_class(kind)
    own = _arguments(cls)
    return init_weights(cls(in_ch, out_ch, **{k: v for k, v in settings.items() if k in own}), init_gain)


def build_generator(config: Mapping[str, Any]) -> Generator:
    """The (not initialised) generator a checkpoint's ``config["generator"]`` describes; no ``kind``: a U-Net.

    Strict: a setting the kind's constructor does not take is an error (the config belongs to another kind).
    """
    config = dict(config)
    kind = config.pop("kind", DEFAULT_KIND)
    cls = generator_class(kind)
    unknown = sorted(set(config) - _arguments(cls))
    if unknown:
        raise HistosynthError(f"the {kind} generator has no setting(s) {', '.join(unknown)}")
    return cls(**config)
