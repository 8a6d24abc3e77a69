"""The learning-curve grid (``snakemake evidence``): which train slides each (k, seed) regime fits on.

A *regime* is one replicate at one data size: ``k`` train slides drawn with
``seed``. Everything fitted in it — statistics, nucleus library, β-VAE, GAN,
synthetic pairs, every arm's segmenter — sees only those slides and takes
``seed`` as its seed; the TEST slides are the run's, the same for every
regime, and never seen by anything fitted. Its files live under
``<results>/evidence/k-<k>/seed-<seed>/`` with the layout of the default run
(``stats/``, ``models/``, ``synthetic/``, ``segmentation/<arm>/seed-<seed>/``).

The draw is nested: a seed shuffles the (sorted) train slides once and
regime k takes the first k, so k = 1 ⊂ k = 2 ⊂ … ⊂ all within a seed and a
learning curve compares like with like. ``all`` is every train slide (the
seeds then differ only in what they seed).

:func:`plan_regimes` checks the grid at start-up, before anything trains: a
k larger than the number of train slides, an arm that does not exist or a
grid without train slides is one clear error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError

#: every arm a segmenter can be trained as (histosynth.segmentation.segmenter.ARMS, without importing torch)
ARM_NAMES = ("real", "real+synthetic", "synthetic", "synthetic-then-real", "painted-real")
#: the path of a regime below the results folder, with a trailing slash ("" is the default run)
REGIME_PATTERN = r"(evidence/k-(\d+|all)/seed-\d+/)?"


@dataclass(frozen=True)
class Regime:
    k: str  # "1", "2", ..., or "all"
    seed: int
    slides: tuple[str, ...]

    @property
    def path(self) -> str:
        return regime_path(self.k, self.seed)


def regime_path(k: str | int, seed: int) -> str:
    return f"evidence/k-{k}/seed-{int(seed)}/"


def parse_regime_path(fit: str) -> tuple[str, int] | None:
    """(k, seed) of a regime path, None for "" (the default run)."""
    if not fit:
        return None
    m = re.fullmatch(r"evidence/k-(\d+|all)/seed-(\d+)/", fit)
    if m is None:
        raise HistosynthError(f"not a regime path: {fit!r} (evidence/k-K/seed-S/)")
    return m.group(1), int(m.group(2))


def draw_train_slides(train: Sequence[str], k: str | int, seed: int) -> list[str]:
    """The ``k`` train slides of ``seed`` (nested over k; see the module docstring), in sorted order."""
    names = sorted(train)
    if not names:
        raise HistosynthError("the learning curve needs train slides, and the split has none")
    if str(k) == "all":
        return names
    n = int(k)
    if not 1 <= n <= len(names):
        raise HistosynthError(f"evidence.k asks for {n} train slides but the split has {len(names)} "
                              f"({', '.join(names)})")
    order = np.random.default_rng([int(seed), 0xE1D]).permutation(len(names))
    return sorted(names[i] for i in order[:n])


def evidence_arms(arms: Sequence[str]) -> list[str]:
    """The arms of the grid: ``real`` first (the baseline of every difference), then the others in order."""
    unknown = [a for a in arms if a not in ARM_NAMES]
    if unknown:
        raise HistosynthError(f"evidence.arms: no arm {', '.join(map(repr, unknown))}; the arms are "
                              f"{', '.join(ARM_NAMES)}")
    return ["real", *(a for a in arms if a != "real")]


def plan_regimes(evidence: Mapping[str, Any], train: Sequence[str]) -> list[Regime]:
    """Every (k, seed) regime of the ``evidence`` settings on the run's ``train`` slides, checked."""
    evidence_arms(evidence["arms"])
    ks = [str(k) for k in evidence["k"]]
    bad = [k for k in ks if k != "all" and not k.isdigit()]
    if bad:
        raise HistosynthError(f"evidence.k: each k is a positive number of slides or 'all', got {bad}")
    return [Regime(k, int(seed), tuple(draw_train_slides(train, k, seed)))
            for k in ks for seed in evidence["seeds"]]
