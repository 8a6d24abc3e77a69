"""The generator's input: a nucleus mask turned into conditioning channels.

:func:`build_conditioning` maps an instance map ``inst`` (0 = background,
1..n = nuclei) and a type map ``types`` (0 = background / untyped, 1..T) to a
float32 tensor (N, C, H, W) whose channels are, in this order
(:func:`conditioning_channels`):

- ``foreground``: inst > 0;
- ``edges``: the nuclear contours — a *nucleus* pixel one of whose four
  neighbours has another instance id, background included (neighbours outside
  the image are ignored). Where two nuclei touch both sides of the contact
  are marked, which is what keeps touching nuclei apart in the image;
- ``type_1`` … ``type_T``: one channel per nucleus type (one-hot of ``types``
  on the foreground);
- ``option``: the "option layer" of Optional pix2pix — a constant channel
  selecting the stain / domain: option ``k`` of ``n_options`` is
  ``2 * k / (n_options - 1) - 1`` (so the first option is −1 and the last
  +1); with a single option the channel is 0 everywhere;
- ``tissue`` (only with ``tissue=True``, a GAN trained with ``gan.tissue_channel``): +1 on tissue, −1 on
  air, from a tissue layout (uint8, 0 = air, 1.. = tissue labels: every label counts as tissue) — the
  patch set's ``tissue.npy`` or :func:`tissue_from_images` of its images; it lets the generator paint air
  as air (the glass between tissue) instead of filling every empty pixel with stroma;
- ``noise`` (only with ``noise=True``): standard normal N(0, 1) per pixel,
  drawn from ``generator`` — the one channel not confined to [−1, 1].

Binary channels are −1 (off) / +1 (on), matching the generator's Tanh range.
Everything is vectorised torch; numpy or torch input, CPU output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from histosynth.errors import HistosynthError


def conditioning_channels(n_types: int, noise: bool, tissue: bool = False) -> list[str]:
    """The channel names of :func:`build_conditioning`, in order (``noise`` always last)."""
    if n_types < 0:
        raise HistosynthError(f"n_types must be >= 0, got {n_types}")
    names = ["foreground", "edges", *[f"type_{t}" for t in range(1, n_types + 1)], "option"]
    return names + (["tissue"] if tissue else []) + (["noise"] if noise else [])


def tissue_from_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) tissue masks (1 = tissue, 0 = air) of RGB images (N, H, W, 3) or (H, W, 3).

    :func:`histosynth.masks.tissue.tissue_mask` of each image (grey > 204 = air, specks and holes under
    64 px removed): the same rule that makes the tissue model's training masks.
    """
    from histosynth.masks.tissue import tissue_mask

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise HistosynthError(f"images must be (N, H, W, 3) RGB, got {images.shape}")
    out = np.empty(images.shape[:3], np.uint8)
    for i, img in enumerate(images):
        out[i] = tissue_mask(img)
    return out


def _as_tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", dtype)
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def instance_edges(inst: torch.Tensor) -> torch.Tensor:
    """Bool (…, H, W): nucleus pixels with a 4-neighbour of another id (background included)."""
    edge = torch.zeros(inst.shape, dtype=torch.bool)
    dv = inst[..., 1:, :] != inst[..., :-1, :]
    dh = inst[..., :, 1:] != inst[..., :, :-1]
    edge[..., 1:, :] |= dv
    edge[..., :-1, :] |= dv
    edge[..., :, 1:] |= dh
    edge[..., :, :-1] |= dh
    return edge & (inst > 0)


def option_value(option: int, n_options: int) -> float:
    """The option layer's constant: −1 … +1 over the options, 0 for a single option."""
    if n_options < 1:
        raise HistosynthError(f"n_options must be >= 1, got {n_options}")
    if not 0 <= int(option) < n_options:
        raise HistosynthError(f"option {option} is not in [0, {n_options})")
    return 0.0 if n_options == 1 else 2.0 * int(option) / (n_options - 1) - 1.0


def build_conditioning(
    inst: np.ndarray | torch.Tensor,
    types: np.ndarray | torch.Tensor,
    n_types: int,
    option: int | Sequence[int] | np.ndarray | torch.Tensor,
    n_options: int,
    noise: bool = False,
    generator: torch.Generator | None = None,
    tissue: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 (N, C, H, W) conditioning of masks ``inst`` / ``types`` (N, H, W) or (H, W); see module doc.

    ``option`` is one option index for all, or one per mask. Type ids above
    ``n_types`` are an error. ``tissue`` (the masks' tissue layouts, shaped like ``inst``; > 0 = tissue)
    adds the ``tissue`` channel; None (the default) leaves it out, as for a GAN trained without it.
    """
    inst_t = _as_tensor(inst, torch.int64)
    types_t = _as_tensor(types, torch.int64)
    if inst_t.ndim == 2:
        inst_t = inst_t[None]
    if types_t.ndim == 2:
        types_t = types_t[None]
    if inst_t.ndim != 3 or types_t.shape != inst_t.shape:
        raise HistosynthError(f"inst and types must both be (N, H, W) or (H, W), got {tuple(inst_t.shape)} "
                              f"and {tuple(_as_tensor(types, torch.int64).shape)}")
    n, h, w = inst_t.shape
    if types_t.numel() and int(types_t.max()) > n_types:
        raise HistosynthError(f"type id {int(types_t.max())} in the mask but the model knows {n_types} types")
    if types_t.numel() and int(types_t.min()) < 0:
        raise HistosynthError("negative type id in the mask")
    opts = np.atleast_1d(np.asarray(option.cpu() if isinstance(option, torch.Tensor) else option, dtype=np.int64))
    if opts.size == 1:
        opts = np.repeat(opts, n)
    if opts.shape != (n,):
        raise HistosynthError(f"{opts.size} options for {n} masks")
    values = torch.tensor([option_value(int(o), n_options) for o in opts], dtype=torch.float32)

    fg = inst_t > 0
    channels = [fg, instance_edges(inst_t)]
    if n_types:
        onehot = types_t[:, None] == torch.arange(1, n_types + 1).view(1, -1, 1, 1)  # (N, T, H, W)
        onehot &= fg[:, None]
    else:
        onehot = torch.zeros((n, 0, h, w), dtype=torch.bool)
    binary = torch.cat([channels[0][:, None], channels[1][:, None], onehot], dim=1).float() * 2 - 1
    parts = [binary, values.view(n, 1, 1, 1).expand(n, 1, h, w)]
    if tissue is not None:
        tissue_t = _as_tensor(tissue, torch.int64)
        if tissue_t.ndim == 2:
            tissue_t = tissue_t[None]
        if tissue_t.shape != inst_t.shape:
            raise HistosynthError(f"the tissue layouts are {tuple(tissue_t.shape)}, the masks {tuple(inst_t.shape)}")
        parts.append((tissue_t[:, None] > 0).float() * 2 - 1)
    if noise:
        parts.append(torch.randn((n, 1, h, w), generator=generator, dtype=torch.float32))
    return torch.cat(parts, dim=1).contiguous()


def render_conditioning(cond: torch.Tensor, n_types: int, tissue: bool = False) -> np.ndarray:
    """An RGB picture (N, H, W, 3) float in [0, 1] of conditioning tensors: nuclei coloured by type, contours white.

    With ``tissue`` (the conditioning has the tissue channel) air is drawn dark blue, tissue black.
    """
    palette = np.array([[0.85, 0.2, 0.2], [0.2, 0.7, 0.25], [0.25, 0.4, 0.95], [0.9, 0.75, 0.1],
                        [0.7, 0.3, 0.8], [0.1, 0.75, 0.8]], dtype=np.float32)
    c = cond.detach().cpu().float().numpy() > 0
    n, _, h, w = c.shape
    out = np.zeros((n, h, w, 3), np.float32)
    if tissue:
        out[~c[:, 3 + n_types]] = (0.1, 0.15, 0.35)  # air
    out[c[:, 0]] = 0.5  # foreground of no type: grey
    for t in range(n_types):
        out[c[:, 2 + t]] = palette[t % len(palette)]
    out[c[:, 1]] = 1.0
    return out
