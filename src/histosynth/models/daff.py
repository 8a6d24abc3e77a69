"""The DAFF-GAN generator (Cheng et al., "Deep Adversarial Image Synthesis for Nuclei Segmentation of
Histopathology Image", section III.B.2: Deep Attention Feature Fusion GAN); ``gan.generator: daff``.

DAFF-GAN is pix2pixHD (:mod:`histosynth.models.pix2pixhd`, whose blocks are reused here) with two additions,
in the paper's words:

- "we added criss-cross attention module before the residual blocks in the global generator and the local
  generator network" — :class:`CrissCrossAttention` (Huang et al. 2019, "CCNet: Criss-Cross Attention for
  Semantic Segmentation", ICCV, the paper's [22]) sits between the encoder and the residual blocks of the
  global generator, and between the fusion (local front end + global features) and the residual blocks of
  the local enhancer;
- "we added a remote skip connection for both the global generator and the local generator. The skip
  connection can effectively reduce the problem of gradient disappearance and network degradation." The
  text says no more (its Fig. 3 is not in the text we have), so what it connects is our choice: the
  features of each generator's first layer (the 7×7 input conv, full resolution of that generator,
  ``width`` channels) are *added* to its last feature map (after the last transposed conv: same size, same
  channels), i.e. the longest skip the generator has, just before its output layer (G1 alone) or before
  G1's features are handed to the local enhancer (G1 under G2). Addition rather than concatenation because
  the paper motivates the skip with the ResNet argument (vanishing gradients, degradation), whose shortcuts
  are identity additions, and because pix2pixHD fuses G1 and G2 by addition too; it adds no parameter.

Criss-cross attention (:class:`CrissCrossAttention`): 1×1 convs give queries and keys of C/8 channels (at
least 1) and values of C channels; each pixel attends to the H + W − 1 pixels of its row and its column
(itself counted once) with a softmax over those positions, and the output is ``gamma`` · (attention-weighted
values) + input, ``gamma`` a learned scalar initialised at 0 (so the module starts as the identity). As in
CCNet's recurrent module, the same attention (shared weights) is applied ``recurrence`` times (CCNet's
default 2: after two passes every pixel has reached every other). CCNet's segmentation head around it
(3×3 convs before and after, concatenation with its input) is not part of the paper's description and is
left out. Plain torch (einsum), no CUDA kernel: memory O(N·H·W·(H + W)) per pass.

Everything else is pix2pixHD's, with the same settings (``width``, ``n_down``, ``n_blocks``, ``norm``,
``local_enhancer``) and the same input-side multiple. The paper's training recipe (multi-scale D, feature
matching, the log loss of its eq. 2) is the trainer's: ``gan.disc: multiscale``, ``gan.lambda_fm``,
``gan.gan_mode: vanilla`` (config/daff-gan.yaml sets them).
"""

from __future__ import annotations

import torch
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models.pix2pixhd import STEM_LAYERS, GlobalGenerator, LocalEnhancer, Pix2PixHDGenerator


def criss_cross_weights(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Attention weights (N, H, W, H + W) of every pixel over its column (first H) and its row (last W).

    ``query`` and ``key`` are (N, C', H, W). The softmax runs over the H + W entries of a pixel; the pixel's own
    entry in the column part is excluded (weight 0), so it is counted once, in the row part.
    """
    h = query.shape[-2]
    column = torch.einsum("nchw,ncgw->nhwg", query, key)  # pixel (h, w) · pixel (g, w)
    row = torch.einsum("nchw,nchv->nhwv", query, key)  # pixel (h, w) · pixel (h, v)
    itself = torch.eye(h, dtype=torch.bool, device=query.device)[:, None, :]  # (H, 1, H): g == h
    column = column.masked_fill(itself, float("-inf"))
    return torch.softmax(torch.cat([column, row], dim=-1), dim=-1)


class CrissCrossAttention(nn.Module):
    """CCNet's recurrent criss-cross attention: ``recurrence`` times x ← gamma · attend(x) + x, shared weights."""

    def __init__(self, channels: int, recurrence: int = 2):
        super().__init__()
        if channels < 1:
            raise HistosynthError(f"criss-cross attention needs at least one channel, got {channels}")
        if recurrence < 1:
            raise HistosynthError(f"attention_recurrence must be at least 1, got {recurrence}")
        reduced = max(channels // 8, 1)
        self.recurrence = int(recurrence)
        self.query = nn.Conv2d(channels, reduced, 1)
        self.key = nn.Conv2d(channels, reduced, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attend_once(self, x: torch.Tensor) -> torch.Tensor:
        """One pass: gamma · (the values of each pixel's row and column, weighted by the attention) + x."""
        h = x.shape[-2]
        weights = criss_cross_weights(self.query(x), self.key(x))
        value = self.value(x)
        from_column = torch.einsum("nhwg,ncgw->nchw", weights[..., :h], value)
        from_row = torch.einsum("nhwv,nchv->nchw", weights[..., h:], value)
        return self.gamma * (from_column + from_row) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.attend_once(x)
        return x


class AttentionGlobalGenerator(GlobalGenerator):
    """pix2pixHD's G1 (no output layer) with criss-cross attention before its residual blocks and the remote
    skip: its 7×7 input conv's features added to its last feature map."""

    def __init__(self, in_ch: int, width: int, n_down: int, n_blocks: int, norm: str, recurrence: int):
        super().__init__(in_ch, width, n_down, n_blocks, norm)
        self.attention = CrissCrossAttention(width * 2**n_down, recurrence)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.model[:STEM_LAYERS](x)
        encoded = self.model[STEM_LAYERS:self.blocks_start](stem)
        return self.model[self.blocks_start:](self.attention(encoded)) + stem


class AttentionLocalEnhancer(LocalEnhancer):
    """pix2pixHD's G2 (no output layer) with criss-cross attention on the fused features before its residual
    blocks and the remote skip: its 7×7 input conv's features added to its last feature map."""

    def __init__(self, in_ch: int, width: int, norm: str, recurrence: int):
        super().__init__(in_ch, width, norm)
        self.attention = CrissCrossAttention(2 * width, recurrence)

    def forward(self, x: torch.Tensor, global_features: torch.Tensor) -> torch.Tensor:
        stem = self.front[:STEM_LAYERS](x)
        fused = self.front[STEM_LAYERS:](stem) + global_features
        return self.back(self.attention(fused)) + stem


class DaffGenerator(Pix2PixHDGenerator):
    """pix2pixHD's G1 (optionally inside G2) with criss-cross attention and remote skips; see the module
    docstring."""

    kind = "daff"

    def __init__(self, in_ch: int, out_ch: int = 3, width: int = 32, n_down: int = 3, n_blocks: int = 3,
                 norm: str = "batch", local_enhancer: bool = False, attention_recurrence: int = 2):
        if attention_recurrence < 1:
            raise HistosynthError(f"attention_recurrence must be at least 1, got {attention_recurrence}")
        super().__init__(in_ch, out_ch, width, n_down, n_blocks, norm, local_enhancer,
                         extra={"attention_recurrence": int(attention_recurrence)})

    def global_generator(self, in_ch: int, width: int, n_down: int, n_blocks: int,
                         norm: str) -> AttentionGlobalGenerator:
        return AttentionGlobalGenerator(in_ch, width, n_down, n_blocks, norm, self.config["attention_recurrence"])

    def local_generator(self, in_ch: int, width: int, norm: str) -> AttentionLocalEnhancer:
        return AttentionLocalEnhancer(in_ch, width, norm, self.config["attention_recurrence"])
