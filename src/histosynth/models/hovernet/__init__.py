"""HoVer-Net (Graham et al. 2019): network, training targets, loss, and instance post-processing.

- :mod:`~histosynth.models.hovernet.net`: the network (:class:`HoVerNet`, its
  blocks, :func:`init_weights`), the documented patch sizes and the centre
  crops (:func:`center_crop`, :func:`crop_to_output`);
- :mod:`~histosynth.models.hovernet.targets`: the NP / HV / TP training maps
  (:func:`hovernet_targets`, :func:`hv_map`);
- :mod:`~histosynth.models.hovernet.loss`: :func:`hovernet_loss` and its terms;
- :mod:`~histosynth.models.hovernet.postprocess`: instances and types from the
  outputs (:func:`postprocess`, :func:`type_map`; the type of an instance is :func:`histosynth.io.labels.instance_types`).

Every public name is re-exported here: ``from histosynth.models import
hovernet as hn; hn.HoVerNet(...)``.
"""

from histosynth.models.hovernet.loss import (
    DEFAULT_LOSS_WEIGHTS,
    hovernet_loss,
    msge_loss,
    sobel_kernels,
    soft_dice_loss,
)
from histosynth.models.hovernet.net import (
    DECODER_KSIZE,
    DENSE_GROUPS,
    INPUT_SIZE,
    MODES,
    OUTPUT_SIZE,
    DecoderBranch,
    DecoderLevel,
    DenseBlock,
    DenseUnit,
    Encoder,
    HoVerNet,
    ResidualStage,
    ResidualUnit,
    bn_relu,
    center_crop,
    crop_to_output,
    init_weights,
    upsample_add,
)
from histosynth.models.hovernet.postprocess import postprocess, sizes_at, type_map
from histosynth.models.hovernet.targets import hovernet_targets, hv_map

__all__ = [
    "DECODER_KSIZE",
    "DEFAULT_LOSS_WEIGHTS",
    "DENSE_GROUPS",
    "INPUT_SIZE",
    "MODES",
    "OUTPUT_SIZE",
    "DecoderBranch",
    "DecoderLevel",
    "DenseBlock",
    "DenseUnit",
    "Encoder",
    "HoVerNet",
    "ResidualStage",
    "ResidualUnit",
    "bn_relu",
    "center_crop",
    "crop_to_output",
    "hovernet_loss",
    "hovernet_targets",
    "hv_map",
    "init_weights",
    "msge_loss",
    "postprocess",
    "sizes_at",
    "sobel_kernels",
    "soft_dice_loss",
    "type_map",
    "upsample_add",
]
