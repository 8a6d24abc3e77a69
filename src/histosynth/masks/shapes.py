"""Shape sources of the sampler, and the cleaning and warping of their shapes.

A shape source is ``source(n, types, rng) -> bool (n, H, W)``: fitted
ellipses (:func:`ellipse_source`) or the β-VAE (:func:`dvae_source`, decoded
by :class:`FastDecoder`); :func:`build_shape_source` picks one for the CLI.
:func:`clean_shapes` and :func:`warp_shapes` turn the shapes into the crops
the sampler places (step 2 and 3 of :mod:`histosynth.masks.sampling`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histosynth.errors import HistosynthError
from histosynth.masks.features import shape_moments
from histosynth.masks.statsfile import sample_quantiles

log = logging.getLogger(__name__)

ShapeSource = Callable[[int, np.ndarray, np.random.Generator], np.ndarray]
SHAPE_SIZE = 64


def ellipse_source(stats: Mapping[str, Any] | None = None, size: int = SHAPE_SIZE,
                   ecc_range: tuple[float, float] = (0.3, 0.9)) -> ShapeSource:
    """Filled ellipses (n, size, size) with eccentricity drawn from the stats' per-type distribution.

    Without stats (or for a type without morphology) the eccentricity is uniform
    on ``ecc_range``. Major axis 0.7 x size, random orientation (the sampler
    re-orients and re-sizes every shape anyway).
    """
    morph = dict(stats.get("morphology", {})) if stats else {}
    centre = (size - 1) / 2.0
    shift = 4  # sub-pixel precision of cv2.ellipse: 1/16 px

    def source(n: int, types: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        out = np.zeros((n, size, size), np.uint8)
        if n == 0:
            return out.astype(bool)
        types = np.zeros(n, np.int64) if types is None else np.asarray(types)
        u = rng.random(n)
        ecc = ecc_range[0] + (ecc_range[1] - ecc_range[0]) * u
        for t in np.unique(types):
            m = morph.get(str(int(t)), {})
            if m.get("n", 0) > 0 and "eccentricity" in m:
                sel = types == t
                ecc[sel] = sample_quantiles(m["eccentricity"], u[sel])
        ecc = np.clip(ecc, 0.0, 0.995)
        a = 0.35 * size
        b = np.maximum(a * np.sqrt(1 - ecc * ecc), 1.5)
        th = rng.uniform(0, 180, n)
        c = int(round(centre * (1 << shift)))
        for i in range(n):
            cv2.ellipse(out[i], (c, c), (int(round(a * (1 << shift))), int(round(b[i] * (1 << shift)))),
                        float(th[i]), 0, 360, 1, -1, cv2.LINE_8, shift)
        return out.astype(bool)

    source.type_aware = True  # type: ignore[attr-defined]
    return source


class FastDecoder:
    """The β-VAE decoder rewritten for CPU inference: BatchNorm folded into the weights, the stride-1
    transposed convolutions turned into ordinary (flipped-kernel) convolutions, channels-last memory.

    About 3-4x faster than ``model.decode`` on one core (the 16 -> 1 channel
    transposed convolution at 64 x 64 is slow in PyTorch), and about 2x more in
    bfloat16 on CPUs with native bf16 (``precision="auto"`` picks bfloat16
    exactly when /proc/cpuinfo lists avx512_bf16 or amx_bf16 - a property of
    the machine, so the choice, and the output, are reproducible there; the
    logits differ from float32 by ~1e-3, which moves at most a boundary pixel
    now and then). Built from the decoder's layers (``fc``, ``up`` of
    Conv-BN-ReLU blocks, ``to_logits``); :meth:`build` checks it against
    ``model.decode`` on random latents and returns None when the architecture
    is not what it expects or the outputs differ, so the caller falls back to
    the model.
    """

    def __init__(self, model: Any, precision: str = "auto"):
        import torch
        from torch import nn

        if precision == "auto":
            precision = "bfloat16" if cpu_has_bf16() else "float32"
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32

        dec = model.decoder
        self.model = model
        self.fc, self.channels, self.side = dec.fc, int(dec.channels), int(dec.side)
        self.layers = []
        blocks = list(dec.up) + [dec.to_logits]
        for blk in blocks:
            if isinstance(blk, nn.ConvTranspose2d):
                convt, bn, relu = blk, None, False
            else:
                mods = list(blk.block)
                if len(mods) != 3 or not isinstance(mods[0], nn.ConvTranspose2d) or not isinstance(
                        mods[1], nn.BatchNorm2d) or not isinstance(mods[2], nn.ReLU):
                    raise ValueError("unexpected decoder block")
                convt, bn, relu = mods[0], mods[1], True
            if convt.groups != 1 or convt.dilation != (1, 1) or convt.output_padding != (0, 0):
                raise ValueError("unexpected transposed convolution")
            w = convt.weight.detach().float().clone()  # (in, out, k, k)
            bias = convt.bias.detach().float().clone() if convt.bias is not None else torch.zeros(w.shape[1])
            if bn is not None:
                scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
                w = w * scale[None, :, None, None]
                bias = (bias - bn.running_mean.float()) * scale + bn.bias.detach().float()
            stride, padding = convt.stride[0], convt.padding[0]
            if stride == 1:
                k = w.shape[-1]
                w = w.flip(-1, -2).transpose(0, 1).contiguous()
                self.layers.append(("conv", w.to(self.dtype), bias.to(self.dtype), k - 1 - padding, relu))
            else:
                self.layers.append(("convt", w.to(self.dtype), bias.to(self.dtype), (stride, padding), relu))

    @classmethod
    def build(cls, model: Any, precision: str = "auto") -> FastDecoder | None:
        import torch

        try:
            fast = cls(model, precision)
            gen = torch.Generator().manual_seed(1)
            z = torch.randn(8, int(model.latent_dim), generator=gen)
            c = model.one_hot(np.full(8, int(model.cfg.type_ids[0])), 8) if model.conditional else None
            with torch.inference_mode():
                ref = model.decode(z, c)
                got = fast.logits(z, c)
            tol = 1e-3 if fast.precision == "float32" else 0.05 * max(1.0, float(ref.abs().max()))
            if ref.shape != got.shape or float((ref - got.float()).abs().max()) > tol:
                return None
            return fast
        except (AttributeError, ValueError, TypeError, RuntimeError, KeyError, IndexError, HistosynthError) as err:
            log.debug("fast decoder unavailable (%s); using model.decode", err)
            return None

    def logits(self, z: Any, c: Any = None) -> Any:
        import torch
        import torch.nn.functional as F

        if c is not None:
            z = torch.cat([z, c.to(z.dtype)], dim=1)
        h = self.fc(z).view(-1, self.channels, self.side, self.side)
        h = h.to(self.dtype).contiguous(memory_format=torch.channels_last)
        for kind, w, b, p, relu in self.layers:
            h = F.conv2d(h, w, b, padding=p) if kind == "conv" else F.conv_transpose2d(h, w, b, stride=p[0],
                                                                                          padding=p[1])
            if relu:
                h = F.relu_(h)
        return h


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (Linux /proc/cpuinfo: avx512_bf16 or amx_bf16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def dvae_source(model: Any, sigma: float = 0.5, fast: bool = True, batch: int = 1024,
                precision: str = "auto") -> ShapeSource:
    """Shapes decoded by the β-VAE, z ~ N(0, sigma^2 I), thresholded at probability 1/2.

    The latents are drawn exactly as ``histosynth.models.dvae.sample_shapes``
    draws them (a CPU ``torch.Generator`` seeded from ``rng``), so with
    ``fast=False`` the shapes are those of ``sample_shapes``; with ``fast``
    (default) :class:`FastDecoder` decodes them (same logits up to float
    rounding) when it can.
    """
    import torch

    from histosynth.models.dvae import sample_shapes

    decoder = FastDecoder.build(model, precision) if fast else None
    source_info = {"decoder": "fast " + decoder.precision if decoder else "model.decode float32"}
    conditional = bool(getattr(model, "conditional", False))

    def source(n: int, types: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        if n == 0:
            return np.zeros((0, SHAPE_SIZE, SHAPE_SIZE), bool)
        seed = int(rng.integers(0, 2**31 - 1))
        t = np.asarray(types) if (conditional and types is not None) else None
        if decoder is None:
            return np.asarray(sample_shapes(model, n, t, sigma=sigma, seed=seed), dtype=bool)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(int(n), int(model.latent_dim), generator=gen) * float(sigma)
        c_all = model.one_hot(t, n) if conditional else None
        out = []
        with torch.inference_mode():
            for start in range(0, n, batch):
                c = None if c_all is None else c_all[start:start + batch]
                out.append((decoder.logits(z[start:start + batch], c) > 0)[:, 0].numpy())
        return np.concatenate(out)

    source.info = source_info  # type: ignore[attr-defined]
    # an unconditional model does not know the type: the sampler assigns its shapes by eccentricity
    source.type_aware = conditional  # type: ignore[attr-defined]
    return source


def build_shape_source(dvae: str, stats: Mapping[str, Any], sigma: float, threads: int = 1,
                       precision: str = "auto") -> tuple[ShapeSource, str, dict[str, Any]]:
    """The CLI's shape source: the β-VAE at ``dvae``, or fitted ellipses for the word 'ellipses'."""
    if dvae == "ellipses":
        return ellipse_source(stats), "ellipses", {}
    if not Path(dvae).is_file():
        raise HistosynthError("no such β-VAE checkpoint", dvae)
    try:
        import torch

        from histosynth.models.dvae import load_dvae
    except ImportError as err:
        raise HistosynthError(f"the β-VAE module is not available ({err})", dvae) from err
    torch.set_num_threads(max(1, int(threads)))
    model = load_dvae(dvae, device="cpu")
    info: dict[str, Any] = {"dvae": str(dvae), "sigma": float(sigma),
                            "dvae_conditional": bool(getattr(model, "conditional", False))}
    if getattr(model, "conditional", False):
        known = {int(t) for t in getattr(getattr(model, "cfg", None), "type_ids", ()) or dict(model.classes)}
        need = sorted(int(t) for t in stats["classes"] if stats["morphology"][str(t)].get("n", 0) > 0)
        missing = [t for t in need if t not in known]
        if len(missing) == len(need):
            raise HistosynthError(f"the conditional β-VAE knows type ids {sorted(known)}, the stats need {need}", dvae)
    else:
        missing = []
    source = dvae_source(model, sigma, precision=precision)
    info.update(getattr(source, "info", {}))
    if missing:
        # a type of the statistics that the library held no shape of (every one cut by the patch border or
        # under min_bbox_area): its nuclei keep their type, counts, sizes and eccentricities, drawn as ellipses
        names = {int(t): str(n) for t, n in stats["classes"].items()}
        source = fallback_source(source, ellipse_source(stats), missing)
        info["shape_fallback"] = {
            "types": {names.get(t, str(t)): int(stats["morphology"][str(t)].get("n", 0)) for t in missing},
            "shapes": "fitted ellipses (the β-VAE was trained without these types)",
            "nuclei": source.counts}
        log.warning("the conditional β-VAE knows type ids %s, the stats also hold %s (%s nuclei measured): "
                    "those nuclei are drawn as fitted ellipses (counted in report.json's shape_fallback)",
                    sorted(known), ", ".join(f"{names.get(t, t)} (id {t})" for t in missing),
                    ", ".join(str(stats["morphology"][str(t)].get("n", 0)) for t in missing))
    return source, "dvae", info


def fallback_source(primary: ShapeSource, fallback: ShapeSource, fallback_types: Sequence[int]) -> ShapeSource:
    """``primary``'s shapes, except for ``fallback_types``, whose shapes come from ``fallback``; ``counts``
    (type id -> shapes drawn by the fallback) grows as it draws."""
    chosen = np.asarray(sorted(int(t) for t in fallback_types), np.int64)
    counts: dict[str, int] = {str(int(t)): 0 for t in chosen}

    def source(n: int, types: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        if types is None or n == 0:
            return primary(n, types, rng)
        types = np.asarray(types)
        other = np.isin(types, chosen)
        if not other.any():
            return primary(n, types, rng)
        out = np.zeros((n, SHAPE_SIZE, SHAPE_SIZE), bool)
        if (~other).any():
            out[~other] = primary(int((~other).sum()), types[~other], rng)
        out[other] = fallback(int(other.sum()), types[other], rng)
        for t, c in zip(*np.unique(types[other], return_counts=True)):
            counts[str(int(t))] += int(c)
        return out

    source.type_aware = getattr(primary, "type_aware", True)  # type: ignore[attr-defined]
    source.fallback_types = frozenset(int(t) for t in chosen)  # type: ignore[attr-defined]
    source.counts = counts  # type: ignore[attr-defined]
    source.info = getattr(primary, "info", {})  # type: ignore[attr-defined]
    return source


def clean_shapes(shapes: np.ndarray) -> np.ndarray:
    """Largest 8-connected component with holes filled, per shape; empty shapes stay empty."""
    out = np.ascontiguousarray(shapes, dtype=np.uint8)
    for i in range(len(out)):
        contours, _ = cv2.findContours(out[i], cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        if len(contours) <= 1:  # one component without holes (or nothing)
            continue
        outer, _ = cv2.findContours(out[i], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        big = max(outer, key=lambda cnt: (cv2.contourArea(cnt), len(cnt)))
        out[i] = 0
        cv2.drawContours(out[i], [big], -1, 1, thickness=-1)
    return out.astype(bool)


def warp_shapes(shapes: np.ndarray, areas: np.ndarray, orientations: np.ndarray,
                eccentricities: np.ndarray | None = None) -> list[np.ndarray]:
    """Give each shape a target area and orientation (skimage convention), optionally an eccentricity.

    One affine map per shape, about its centroid: with ``eccentricities`` an
    area-preserving stretch along its principal axes (major x s, minor / s,
    s = ((l2/l1) / (1 - e^2))^(1/4), clipped to [0.4, 3]) first, then the
    rotation by (target - own orientation) and the isotropic scale
    sqrt(target area / area). Returns square boolean crops of odd side whose
    centre pixel ((side - 1) / 2) is the shape's centroid. An empty shape
    becomes a disk of the target area.
    """
    mom = shape_moments(shapes)
    n, h, w = shapes.shape
    out: list[np.ndarray] = []
    if n == 0:
        return out
    # radius bound from the bounding box: the farthest box corner from the centroid
    rows, cols = shapes.any(axis=2), shapes.any(axis=1)
    big = np.int64(1 << 30)
    r0 = np.where(rows, np.arange(h), big).min(axis=1)
    r1 = np.where(rows, np.arange(h), -1).max(axis=1)
    c0 = np.where(cols, np.arange(w), big).min(axis=1)
    c1 = np.where(cols, np.arange(w), -1).max(axis=1)
    dy = np.maximum(np.abs(r0 - mom["cy"]), np.abs(r1 - mom["cy"])) + 0.5
    dx = np.maximum(np.abs(c0 - mom["cx"]), np.abs(c1 - mom["cx"])) + 0.5
    rad = np.sqrt(dy * dy + dx * dx)
    stretch = np.ones(n)
    if eccentricities is not None:
        ratio = np.where(mom["major_axis"] > 0, (mom["minor_axis"] / np.maximum(mom["major_axis"], 1e-9)) ** 2, 1.0)
        want = np.clip(1.0 - np.asarray(eccentricities, float) ** 2, 1e-3, 1.0)
        stretch = np.clip((np.maximum(ratio, 1e-3) / want) ** 0.25, 0.4, 3.0)
    src = shapes.astype(np.uint8) * 255
    for i in range(n):
        a_src = mom["area"][i]
        target = max(float(areas[i]), 1.0)
        if a_src < 1:
            rd = math.sqrt(target / math.pi)
            side = 2 * int(math.ceil(rd)) + 3
            cc = (side - 1) / 2
            yy, xx = np.ogrid[0:side, 0:side]
            out.append((yy - cc) ** 2 + (xx - cc) ** 2 <= rd * rd)
            continue
        cy, cx = float(mom["cy"][i]), float(mom["cx"][i])
        f = math.sqrt(target / a_src)
        th = float(mom["orientation"][i])
        delta = float(orientations[i]) - th
        cd, sd = math.cos(delta), math.sin(delta)
        lin = f * np.array([[cd, sd], [-sd, cd]])  # rotation in (x, y), as cv2.getRotationMatrix2D
        st = float(stretch[i])
        if st != 1.0:
            u = np.array([math.sin(th), math.cos(th)])  # major axis in (x, y)
            v = np.array([u[1], -u[0]])
            lin = lin @ (st * np.outer(u, u) + np.outer(v, v) / st)
        side = 2 * int(math.ceil(rad[i] * f * max(st, 1.0 / st))) + 3
        c = (side - 1) / 2
        m = np.empty((2, 3))
        m[:, :2] = lin
        m[:, 2] = np.array([c, c]) - lin @ np.array([cx, cy])
        crop = cv2.warpAffine(src[i], m, (side, side), flags=cv2.INTER_LINEAR) >= 128
        if not crop.any():  # a sliver scaled below a pixel: keep one pixel
            crop[side // 2, side // 2] = True
        out.append(crop)
    return out
