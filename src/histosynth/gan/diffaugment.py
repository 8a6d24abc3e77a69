"""DiffAugment: differentiable augmentation of everything the discriminator sees, for few-image GAN training.

Zhao, Liu, Lin, Zhu & Han (2020), "Differentiable Augmentation for Data-Efficient GAN Training" (NeurIPS):
with a handful of training images the discriminator memorises them and the generator stops learning.
Augmenting only the real images does not help (the generator learns to paint the augmentations);
DiffAugment applies the same family of random transforms T to the real *and* the generated images every
time they go into D — in D's step D(T(real)), D(T(G(c))), and in G's step D(T(G(c))) — and every T is
differentiable, so G's gradient flows back through T.

Here D sees a pair, the conditioning channels (masks, option layer) and the image: the geometric
transforms (``translation``, ``cutout``) move and erase both with one draw per sample, so D still sees a
mask that matches its image; ``color`` changes the image channels only. The policies, with the paper's
strengths (its ``DiffAugment_pytorch.py``), for images in [−1, 1]:

- ``color``: brightness + U(−0.5, 0.5), then saturation (distance to the pixel's channel mean) × U(0, 2),
  then contrast (distance to the image mean) × U(0.5, 1.5), each drawn per sample;
- ``translation``: a shift by up to 1/8 of the side in each direction, per sample, the uncovered border
  zero-filled (conditioning too);
- ``cutout``: a square of half the side, centred on a random pixel (clipped at the border), set to zero
  in the image and the conditioning.

They are applied in that order (the paper's ``color,translation,cutout``) whatever order they are named in.
Every random number comes from the ``torch.Generator`` (CPU) the caller passes: training seeds it and saves
its state in the checkpoint, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from histosynth.errors import HistosynthError

#: the policies, in the order they are applied
POLICIES = ("color", "translation", "cutout")
#: the largest shift of ``translation``, as a fraction of the side
TRANSLATION_RATIO = 0.125
#: the side of ``cutout``'s square, as a fraction of the side
CUTOUT_RATIO = 0.5


def check_policies(policies: str | Iterable[str]) -> list[str]:
    """The policies in the order they are applied; an unknown or repeated name is a :class:`HistosynthError`.

    A string is one policy.
    """
    policies = [policies] if isinstance(policies, str) else list(policies)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise HistosynthError(f"diffaugment policies must be among {POLICIES}, got {unknown}")
    if len(set(policies)) != len(policies):
        raise HistosynthError(f"diffaugment names a policy twice: {policies}")
    return [p for p in POLICIES if p in policies]


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(N, 1, 1, 1) draws of U(0, 1), one per sample of ``like``, on its device and in its dtype."""
    return torch.rand(like.shape[0], 1, 1, 1, generator=generator).to(like.device, like.dtype)


def color(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness, saturation and contrast per sample of ``image`` (N, 3, H, W) in [−1, 1]."""
    image = image + (_uniform(image, generator) - 0.5)
    mean = image.mean(dim=1, keepdim=True)
    image = (image - mean) * (_uniform(image, generator) * 2) + mean
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    return (image - mean) * (_uniform(image, generator) + 0.5) + mean


def translation(x: torch.Tensor, generator: torch.Generator | None = None,
                ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift each sample of ``x`` (N, C, H, W) by up to ``ratio`` of its sides, zero-filling the border."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n,), generator=generator).tolist()
    dx = torch.randint(-sw, sw + 1, (n,), generator=generator).tolist()
    padded = F.pad(x, (sw, sw, sh, sh))
    # output pixel (i, j) is input pixel (i - dy, j - dx): padded pixel (i - dy + sh, j - dx + sw)
    return torch.stack([padded[b, :, sh - dy[b] : sh - dy[b] + h, sw - dx[b] : sw - dx[b] + w] for b in range(n)])


def cutout(x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Zero a square of ``ratio`` of the sides in each sample of ``x`` (N, C, H, W), centred on a random pixel."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h, (n, 1), generator=generator) - ch // 2
    left = torch.randint(0, w, (n, 1), generator=generator) - cw // 2
    ys, xs = torch.arange(h)[None], torch.arange(w)[None]
    rows = (ys >= top) & (ys < top + ch)  # (N, H)
    cols = (xs >= left) & (xs < left + cw)  # (N, W)
    keep = ~(rows[:, :, None] & cols[:, None, :])
    return x * keep[:, None].to(x.device, x.dtype)


def diff_augment(image: torch.Tensor, cond: torch.Tensor, policies: str | Iterable[str],
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, conditioning) as D should see them: ``policies`` applied with one draw per sample for the pair.

    ``image`` (N, 3, H, W) in [−1, 1] and ``cond`` (N, C, H, W) are transformed together by the geometric
    policies; ``color`` changes ``image`` only. No policy: both are returned as they are.
    """
    policies = check_policies(policies)
    if "color" in policies:
        image = color(image, generator)
    geometric = [p for p in policies if p != "color"]
    if not geometric:
        return image, cond
    pair = torch.cat([cond, image], 1)
    for name in geometric:
        pair = translation(pair, generator) if name == "translation" else cutout(pair, generator)
    return pair[:, cond.shape[1]:], pair[:, : cond.shape[1]]
