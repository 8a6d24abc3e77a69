"""stack-baselines: two stack sets a z-stack generator must beat, scored by :mod:`.evaluate` like any other.

The **base image** of each baseline stack is a real stack's best plane (``best_plane`` of index.csv) — or,
with ``base``, the best plane of each stack of another stack set (e.g. G1 samples written as stacks); the
output then has one stack per base stack, with ``best_plane`` Z // 2 (the convention of ``sample-stacks``).
Build baselines from the *training* stacks and evaluate them against held-out ones: built from the very stacks
they are scored against, their in-focus planes are those stacks' own.

- ``copy``: every plane is a copy of the base image (no defocus at all: the focus curve is flat, the outline
  IoU is 1).
- ``blur``: plane z is the base image blurred with a Gaussian of sigma σ(d), d = z − best_plane. σ(d) is fitted
  to the real set's mean focus curve (:func:`histosynth.multifocus.evaluate.mean_curve`, the focus measure per
  plane divided by each stack's maximum, averaged per offset from the best plane): the target ratio is
  r(d) = mean(d) / mean(0), clipped to [0, 1]. On a sample of up to :data:`FIT_IMAGES` base images drawn by
  seed (those with a non-zero focus measure), g(σ) = mean over the sample of F(blur(b, σ)) / F(b), F the focus
  measure (variance of the Laplacian) of the blurred uint8 image; σ(d) solves g(σ) = r(d) by bisection on
  [0, :data:`SIGMA_MAX`] px (:data:`BISECTIONS` steps; g falls with σ): σ = 0 where r ≥ 1, SIGMA_MAX where
  even that blur keeps more focus than r. An offset that no real stack recorded takes the σ of the nearest
  fitted offset on its side of the best plane. The fit (r and σ per offset) is recorded in report.json.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.multifocus.stacks import focus_measure
from histosynth.multifocus.stackset import StackSet, StackSetWriter, read_stackset

log = logging.getLogger(__name__)

KINDS = ("copy", "blur")
FIT_IMAGES = 64
SIGMA_MAX = 16.0
BISECTIONS = 30


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """(h, w, 3) uint8 blurred by a Gaussian of ``sigma`` px (reflected border); sigma 0: a copy."""
    import cv2

    if sigma <= 0:
        return np.array(image, np.uint8)
    return cv2.GaussianBlur(np.ascontiguousarray(image, np.uint8), (0, 0), float(sigma))


def _focus(image: np.ndarray) -> float:
    return float(focus_measure(np.asarray(image)[None])[0])


def focus_ratio(images: list[np.ndarray], focus0: np.ndarray, sigma: float) -> float:
    """Mean over ``images`` of F(blur(image, sigma)) / F(image)."""
    return float(np.mean([_focus(blur(im, sigma)) / f0 for im, f0 in zip(images, focus0)]))


def fit_sigma(images: list[np.ndarray], focus0: np.ndarray, target: float) -> float:
    """The sigma at which :func:`focus_ratio` meets ``target`` (bisection; see the module's docstring)."""
    if target >= 1.0:
        return 0.0
    lo, hi = 0.0, SIGMA_MAX
    if focus_ratio(images, focus0, hi) > target:
        return hi
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        if focus_ratio(images, focus0, mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fit_sigmas(real: StackSet, bases: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """σ per offset −(Z−1) … Z−1 fitted to ``real``'s mean focus curve on a sample of ``bases`` (N, h, w, 3)."""
    from histosynth.multifocus.evaluate import mean_curve, stack_stats

    z = real.planes
    curve = mean_curve(stack_stats(real), z)
    offsets = curve["offsets"]
    m0 = curve["mean"][offsets.index(0)]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB1E2]))
    pick = np.sort(rng.choice(len(bases), min(FIT_IMAGES, len(bases)), replace=False))
    images = [np.asarray(bases[i]) for i in pick]
    f0 = np.array([_focus(im) for im in images])
    keep = f0 > 0
    images, f0 = [im for im, k in zip(images, keep) if k], f0[keep]
    targets: dict[int, float | None] = {}
    sigmas: dict[int, float | None] = {}
    for d, m in zip(offsets, curve["mean"]):
        if d == 0:
            targets[d], sigmas[d] = 1.0, 0.0
        elif m is None or not m0 or not images:
            targets[d], sigmas[d] = None, None
        else:
            targets[d] = float(np.clip(m / m0, 0.0, 1.0))
            sigmas[d] = fit_sigma(images, f0, targets[d])
    for side in (1, -1):  # offsets nobody recorded: the nearest fitted one on the same side
        last = 0.0
        for d in range(side, side * z, side):
            if sigmas[d] is None:
                sigmas[d] = last
            last = sigmas[d]
    return {"offsets": offsets, "target_ratio": [targets[d] for d in offsets],
            "sigma_px": [sigmas[d] for d in offsets], "fit_images": len(images), "seed": int(seed)}


def make_baseline(real_dir: str | os.PathLike, out_dir: str | os.PathLike, kind: str, *,
                  base_dir: str | os.PathLike | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the ``kind`` baseline (``copy`` or ``blur``) as a stack set at ``out_dir``; returns its report."""
    if kind not in KINDS:
        raise HistosynthError(f"unknown baseline kind {kind!r}; one of {list(KINDS)}")
    real = read_stackset(real_dir)
    z = real.planes
    if base_dir is None:
        base_set, base_best, out_best = real, real.index["best_plane"].to_numpy(np.int64), None
    else:
        base_set = read_stackset(base_dir)
        if base_set.size != real.size:
            raise HistosynthError(f"base images of {base_set.size[0]} x {base_set.size[1]} px, but the real stacks "
                                  f"{real.path} are {real.size[0]} x {real.size[1]} px", base_dir)
        base_best, out_best = base_set.index["best_plane"].to_numpy(np.int64), z // 2
    bases = np.stack([np.asarray(base_set.stacks[i, base_best[i]]) for i in range(len(base_set))])
    fit = fit_sigmas(real, bases, seed) if kind == "blur" else None
    if fit:
        sig = dict(zip(fit["offsets"], fit["sigma_px"]))
        log.info("blur baseline: sigma per offset %s px", {d: round(s, 3) for d, s in sig.items()})
    with StackSetWriter(out_dir, planes=z, size=real.size, plane_offsets_um=real.plane_offsets_um) as w:
        for i, base in enumerate(bases):
            b = int(base_best[i]) if out_best is None else out_best
            if fit:
                stack = np.stack([blur(base, sig[p - b]) for p in range(z)])
            else:
                stack = np.repeat(base[None], z, axis=0)
            row = {"slide": str(base_set.index["slide"].iloc[i]) if base_dir is None else "baseline",
                   "x": int(base_set.index["x"].iloc[i]) if base_dir is None else -1,
                   "y": int(base_set.index["y"].iloc[i]) if base_dir is None else -1,
                   "best_plane": b, "source": "synthetic"}
            w.add(row, stack)
        w.report.update(stage="stack_baselines", kind=kind, real=str(real.path),
                        base=str(base_set.path), fit=fit, seed=int(seed))
        report = dict(w.report)
    log.info("wrote the %s baseline (%d stacks) to %s", kind, len(bases), Path(out_dir))
    return report
