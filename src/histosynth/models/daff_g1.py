"""DAFF-GAN's G1: centroid-point images → typed nucleus masks (seed "Deep Adversarial Image Synthesis for
Nuclei Segmentation of Histopathology Image", section III.A.2: "the generator G1 aims to translate centroid
point images to different types of nuclei masks").

The paper uses DAFF-GAN for this stage as for the image stage ("we use DAFF-GAN [...] to synthesize
verisimilar nuclei masks"), so G1 is :class:`histosynth.models.daff.DaffGenerator` (pix2pixHD's global
generator with criss-cross attention before the residual blocks and the remote skip; the local enhancer is
an option, off by default) with its own input and output:

- **input**: one channel per nucleus type (K channels, type t on channel t − 1), −1 everywhere except a
  disk of ``point_radius`` px around each centroid, +1 on its type's channel
  (:func:`histosynth.masks.daff_layout.point_image`). One channel per type rather than a point map + a type
  channel, so that the type is a set of channels, not a magnitude the convolutions must decode;
- **output**: 1 + K channels through the generator's Tanh, in [−1, 1]: channel 0 the nucleus foreground
  (+1 nucleus, −1 background), channel t the pixels of type t (+1 / −1). Foreground is channel 0 > 0.

The paper does not say what G1's discriminator sees; here D1 sees the point image and the mask
concatenated (pix2pix's conditional D), multi-scale with feature matching and the log loss, as the paper's
training of DAFF-GAN (trainer: :mod:`histosynth.masks.daff_g1`).

The file ``g1.pt``: ``format`` / ``version``, ``generator`` (state dict), ``config`` (the generator's
``kind`` and settings, as :func:`histosynth.models.generators.build_generator` reads), ``classes``,
``n_types``, ``point_radius``, ``step`` and the training settings; read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from typing import Any

from histosynth.errors import HistosynthError
from histosynth.io.labels import class_map_to_json, read_class_map
from histosynth.models.checkpoint import read_torch_checkpoint
from histosynth.models.daff import DaffGenerator
from histosynth.models.gan_layers import init_weights

G1_FORMAT = "histosynth-daff-g1"
G1_VERSION = 1


def define_g1(n_types: int, *, width: int = 32, n_down: int = 3, n_blocks: int = 3, norm: str = "batch",
              local_enhancer: bool = False, attention_recurrence: int = 2, init_gain: float = 0.02) -> DaffGenerator:
    """A freshly initialised G1 for ``n_types`` nucleus types: K point channels in, 1 + K mask channels out."""
    if n_types < 1:
        raise HistosynthError(f"G1 needs at least one nucleus type, got {n_types}")
    net = DaffGenerator(int(n_types), 1 + int(n_types), width=width, n_down=n_down, n_blocks=n_blocks, norm=norm,
                        local_enhancer=local_enhancer, attention_recurrence=attention_recurrence)
    return init_weights(net, init_gain)


def g1_checkpoint_dict(G: DaffGenerator, *, classes: dict[int, str], n_types: int, point_radius: int, step: int,
                       **extra: Any) -> dict[str, Any]:
    """What every G1 file holds (CPU tensors, plain types), plus ``extra``."""
    return {
        "format": G1_FORMAT, "version": G1_VERSION,
        "generator": {k: v.detach().cpu().clone() for k, v in G.state_dict().items()},
        "config": {"generator": dict(G.config)}, "classes": class_map_to_json(classes), "n_types": int(n_types),
        "point_radius": int(point_radius), "step": int(step), **extra,
    }


def read_g1_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a G1 file (g1.pt or a training checkpoint.pt), one clear error else."""
    return read_torch_checkpoint(path, G1_FORMAT, G1_VERSION, "DAFF G1")


def load_g1(path: str | os.PathLike) -> tuple[DaffGenerator, dict[str, Any]]:
    """(G1 in inference mode on the CPU, the file's metadata: classes, n_types, point_radius, step)."""
    from histosynth.models.generators import build_generator

    ckpt = read_g1_checkpoint(path)
    try:
        G = build_generator(ckpt["config"]["generator"])
        G.load_state_dict(ckpt["generator"])
    except (KeyError, RuntimeError, TypeError) as err:
        raise HistosynthError(f"G1 checkpoint does not match its own config: {str(err).splitlines()[0][:200]}",
                              path) from err
    if not isinstance(G, DaffGenerator):
        raise HistosynthError(f"G1 must be a daff generator, got {G.kind}", path)
    G.set_inference_mode()
    meta = {"classes": read_class_map(ckpt["classes"], path), "n_types": int(ckpt["n_types"]),
            "point_radius": int(ckpt["point_radius"]), "step": int(ckpt["step"])}
    if G.config["in_ch"] != meta["n_types"] or G.config["out_ch"] != 1 + meta["n_types"]:
        raise HistosynthError(f"G1 has {G.config['in_ch']} input / {G.config['out_ch']} output channels for "
                              f"{meta['n_types']} types (expected n_types / 1 + n_types)", path)
    return G, meta
