"""The sample-masks stage: synthetic nuclei instance + type masks from fitted statistics.

``histosynth sample-masks STATS DVAE OUT_DIR --n N --size S --seed K`` writes a
patch set with ``inst.npy`` and ``types.npy`` only (no ``images.npy``: it is
absent, not zero-filled). ``index.csv`` rows have ``slide = "synthetic"``,
x = y = 0, the mpp of the stats, width = height = S, ``n_nuclei``, one
``n_<class>`` column per class and ``source = "sample-masks seed K shard k"``.
``report.json`` records the parameters, the shape source, how many nuclei
could not be placed, and a timing breakdown.

One mask, step by step
----------------------
1. **Counts.** The total count T is drawn from the AIC-best fit of the total
   (``stats.json`` ``counts.total``), rescaled from the fitted patch area to
   S x S by AREA (:func:`histosynth.masks.counts.scale_counts`; the seed paper scaled
   by side length, which is wrong). The split into types comes from a draw of
   the per-type counts through the Gaussian copula of ``count_copula`` (each
   type's own fitted, area-rescaled distribution): T is apportioned in those
   proportions (largest remainder). So the total follows its own fit exactly
   and the type mix keeps the per-type marginals and their correlations
   (e.g. epithelium-rich patches have few lymphocytes). A type that never
   occurred in the data has a point mass at 0 and is never placed.
2. **Shapes.** ``shape_source(n, types, rng) -> bool (n, 64, 64)`` for all
   nuclei of a batch of masks at once (the CLI decodes the β-VAE with
   z ~ N(0, sigma^2), sigma 0.5 as in the seed; tests and the fallback use
   :func:`~histosynth.masks.shapes.ellipse_source`, ellipses whose eccentricity
   is drawn from the fitted per-type distribution). The β-VAE is decoded by
   :class:`~histosynth.masks.shapes.FastDecoder` (BatchNorm folded, stride-1
   transposed convolutions as convolutions, channels-last, bfloat16 where the
   CPU has it natively; ``--precision``),
   about 5x faster than ``model.decode`` on one core, checked against it at
   start-up. Each shape is cleaned (largest component, holes filled; an empty
   decode becomes a disk). An unconditional β-VAE does not know the type, so
   its shapes are handed to the nuclei by eccentricity rank against targets
   drawn from each type's fitted eccentricity distribution
   (:meth:`MaskSampler.match_eccentricity`): spindles get the elongated
   shapes, lymphocytes the round ones. A conditional β-VAE decodes per type.
3. **Size, elongation and orientation.** Each nucleus gets an area drawn from
   its type's fitted area distribution (inverse CDF of the stored quantiles)
   and, with ``--eccentricity fitted`` (default), an eccentricity drawn from
   its type's fitted distribution, reached by an area-preserving stretch
   along the shape's principal axes: the β-VAE gives the outline, the data
   the elongation (an 8-epoch β-VAE of the demo with sigma 0.5 decodes no
   shape thinner than e ~ 0.9, where a fifth of the real nuclei - spindles -
   lie; eccentricity KS 0.2 with ``model``, which keeps the decoded shape's
   own). Its
   orientation is a per-mask, per-type mean direction drawn from the fitted
   distribution of patch mean orientations plus a deviation drawn from the
   fitted distribution of deviations from the patch mean - fitted rather than
   uniform, because real spindle nuclei run parallel along fibres within a
   patch while round nuclei come out uniform either way (types without these
   fits use the marginal orientation distribution). The shape
   is rotated about its centroid by (target - its own orientation, measured
   with the same moments as regionprops), stretched, and scaled isotropically
   by sqrt(target area / its area), all in one ``cv2.warpAffine`` (bilinear,
   then thresholded at 1/2).
4. **Placement: a hard-core, thresholded-Gaussian-field Cox process**
   (all parameters in ``stats.json`` ``field``, fitted by fit-stats to the
   real g(r), NN distances and touching fractions; see
   :func:`histosynth.masks.calibrate.calibrate_field`). Per mask, on a 4-px
   grid over the patch plus a margin:

   - the **tissue** is the top fraction f of a smooth Gaussian field, f taken
     from a real patch with about as many nuclei (real patches with few
     nuclei are mostly background, so their nuclei crowd into part of it);
   - each type t has its own smooth Gaussian field Z_t; the fields are
     correlated across types as the LGCP fitted to g_ab(r) says (positive:
     types mix, negative: they keep apart - epithelial nests vs lymphocyte
     aggregates). Type t's **territory** is the top part of Z_t within the
     tissue, just large enough that its N_t nuclei fill it to the fitted
     packing fraction (capped at the whole tissue: sparse stroma). A fraction
     ``leak`` (5 %) of each type's nuclei falls outside its territory;
   - nuclei are placed one by one, largest first, each at a candidate centre
     drawn from its type's territory; with the fitted **contact** probability
     the candidate is instead slid (by bisection) against an already placed
     nucleus of the same type until they touch, as packed real nuclei do
     (about half of the demo nuclei touch another). The **hard core** is
     exact: a candidate whose pixels meet a placed nucleus is rejected and
     redrawn (``max_tries`` from the territory, then as many uniformly; then
     the nucleus is dropped and counted in report.json). Touching is allowed,
     gaps are not required, as in real annotations.
   - centres range a little beyond the patch (the 75th percentile of the
     nucleus radius) and a candidate with no pixel inside the patch is
     redrawn, so nuclei cut by the edge occur as in real tiles (where every
     visible nucleus counts).

   Why this process: real nuclei sit in compartments with sharp borders
   (nests, aggregates, stroma, background), densely packed inside and
   sparse outside. A log-Gaussian Cox process with the fitted g(r) alone
   (tried first) spreads nuclei softly over the patch: with the hard core its
   g(r) stayed far below the real one and the NN distances too long (KS 0.2
   against the training masks). Thresholding the same correlated fields gives
   compartments whose size follows from the counts and the fitted packing,
   reproduces within-type attraction, cross-type repulsion and the NN
   distances, stays cheap (a few small blurs per mask, an O(1) array test per
   candidate) and conditions exactly on the drawn counts. A Strauss/Gibbs
   sampler needs MCMC per mask and cannot express attraction stably;
   independent Thomas processes per type cannot express cross-type repulsion.
   The residual mismatch (g(r) of all nuclei at 20-80 px about 1.1 vs 1.25
   on the demo) is drawn in fit-stats' spatial.png.

The ``uniform`` method (``--method uniform``)
-------------------------------------------
Seed "Histological Image Synthesis Using Deep Learning"'s own layout, kept as
the baseline the statistical sampler must beat: counts as in step 1, each
nucleus the β-VAE's shape at the size and elongation it is decoded with (no
fitted size, eccentricity or orientation; an empty decode becomes a disk of
its type's mean area), placed uniformly at random without overlap (step 4's
hard core and edge rule, no field, no territories, no contacts).

Synthesis on request
--------------------
``type_mix`` (class name or type id -> fraction, e.g. ``{"Lymphocyte": 0.5}``)
and ``density`` (a factor on the number of nuclei) override step 1 and
leave every other fitted statistic as it is. The total T is drawn from its
fit and multiplied by ``density`` (rounded at random, up or down, so the mean
is exact); each requested type gets the fraction asked of T, and the types
not named share the rest in the proportions of the copula draw, as before.
The counts are rounded by systematic sampling (one uniform offset per mask,
each count the floor or the ceiling of its share, the total kept), which is
unbiased: over the sample the requested fractions are met up to the rare
nucleus the placement cannot fit (counted as ``dropped``). A requested type
needs fitted shape statistics (it must occur in the training masks); naming
every type means the fractions must sum to 1. ``report.json`` holds the
request beside what came out (``request``, ``achieved``).

Nuclei only inside tissue
-------------------------
``tissue`` (``--tissue``: a patch set with ``tissue.npy``, e.g. from
``histosynth sample-tissue``; mask i of the run uses tissue mask i modulo
their number) restricts the placement to the tissue: the air pixels of the
patch start out occupied (no nucleus pixel lands on air), the field's tissue
(step 3) is the given tissue on the field grid instead of a random one, and the
uniform candidates are drawn from tissue pixels. Counts scale with the tissue
area at the fitted density per tissue pixel: the counts drawn in step 1 are
multiplied by f / f_real (f the mask's tissue fraction, f_real the mean tissue
fraction of the real patches in stats.json; 1 where the stats hold none) and
rounded systematically. The output patch set carries ``tissue.npy`` too.

Determinism: shard k of seed K uses ``numpy.random.SeedSequence(K,
spawn_key=(k,))`` - independent streams per shard, reproducible on the CPU
for the same inputs, K, k and number of masks of the shard (mask i of N goes
to shard i * n_shards // N, i.e. shards get contiguous, near-equal ranges).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy.special import ndtr

from histosynth.errors import HistosynthError
from histosynth.io.labels import class_columns, class_key, class_map_to_json, read_class_map
from histosynth.io.patchset import PatchSetWriter
from histosynth.masks.counts import count_cdf_table, count_ppf, scale_counts
from histosynth.masks.features import shape_moments
from histosynth.masks.shapes import ShapeSource, clean_shapes, warp_shapes
from histosynth.masks.statsfile import load_stats, sample_quantiles

log = logging.getLogger(__name__)

STEPS = ("counts", "decode", "resize_rotate", "field", "placement", "write")
#: the values of sample_masks.method that MaskSampler draws; "daff" (seed 003's centroid layouts + G1) is
#: dispatched by sample_masks to histosynth.masks.daff_layout
METHODS = ("statistical", "uniform")
PLACEMENT = {"statistical": "hard-core thresholded-Gaussian-field Cox process (see histosynth.masks.sampling)",
             "uniform": "uniform at random without overlap, shapes as decoded (seed 000's method)"}


def resolve_type_mix(type_mix: Mapping[str | int, float] | None, classes: Mapping[int, str],
                     placeable: Sequence[int], all_types: Sequence[int]) -> dict[int, float]:
    """type id -> requested fraction, checked (``classes``: the stats' class map; names compared loosely).

    A key is a class name or a type id. Errors: an unknown class, a fraction outside [0, 1], fractions
    summing over 1, every type named with a sum under 1, a positive fraction for a type the stats hold no
    shapes of (it never occurred in the training masks).
    """
    if not type_mix:
        return {}
    by_name = {class_key(name): int(tid) for tid, name in classes.items()}
    out: dict[int, float] = {}
    for key, value in type_mix.items():
        text = str(key).strip()
        tid = int(text) if text.isdigit() and int(text) in all_types else by_name.get(class_key(text))
        if tid is None or tid not in all_types:
            known = ", ".join(classes.get(t, str(t)) for t in all_types)
            raise HistosynthError(f"sample_masks.type_mix names {key!r}, which is not a class of the statistics "
                                  f"(known: {known})")
        if tid in out:
            raise HistosynthError(f"sample_masks.type_mix names type {tid} twice ({key!r})")
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            raise HistosynthError(f"sample_masks.type_mix: the fraction of {key!r} must be a number, "
                                  f"got {value!r}") from None
        if not 0.0 <= fraction <= 1.0:
            raise HistosynthError(f"sample_masks.type_mix: the fraction of {key!r} must be in [0, 1], got {value}")
        if fraction > 0 and tid not in placeable:
            raise HistosynthError(f"sample_masks.type_mix asks for {key!r}, but the training masks hold none: "
                                  "there are no shape and size statistics to draw it from")
        out[tid] = fraction
    total = sum(out.values())
    if total > 1.0 + 1e-6:
        raise HistosynthError(f"sample_masks.type_mix: the fractions sum to {total:.4g}, over 1")
    rest = [t for t in placeable if t not in out]
    if not rest and total < 1.0 - 1e-6:
        raise HistosynthError(f"sample_masks.type_mix names every type but its fractions sum to {total:.4g}, "
                              "not 1: nothing is left to make up the rest")
    return out


def systematic_round(shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integers summing to ``round(shares.sum())``, each the floor or ceiling of its share, unbiased.

    One uniform offset u: count_i = floor(C_i + u) - floor(C_{i-1} + u) over the cumulative sums C.
    """
    shares = np.maximum(np.asarray(shares, dtype=np.float64), 0.0)
    edges = np.floor(np.concatenate([[0.0], np.cumsum(shares)]) + rng.random())
    return np.diff(edges).astype(np.int64)


@dataclass
class MaskSampler:
    """Draws synthetic masks of ``size`` x ``size`` px from a stats dict and a shape source."""

    stats: Mapping[str, Any]
    shape_source: ShapeSource
    size: int
    field_cell: int = 4
    max_tries: int = 40
    contact_tries: int = 6
    eccentricity: str = "fitted"
    type_mix: Mapping[str | int, float] | None = None
    density: float = 1.0
    method: str = "statistical"
    timings: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in STEPS})
    dropped: int = 0
    disks: int = 0  # decoded shapes that came out empty and were replaced by disks of the target area
    tissue_masks: np.ndarray | None = None  # (M, size, size) uint8, 0 = air: nuclei only where > 0 (docstring)
    first_mask: int = 0  # global index of this sampler's first mask (which tissue mask each one gets)
    allowed: np.ndarray | None = field(default=None, init=False)  # bool (size, size) of the mask being placed

    def __post_init__(self) -> None:
        st = self.stats
        self.size = int(self.size)
        if self.method not in METHODS:
            raise HistosynthError(f"sample_masks.method must be one of {METHODS}, got {self.method!r}")
        if self.eccentricity not in ("fitted", "model"):
            raise HistosynthError(f"--eccentricity must be fitted or model, got {self.eccentricity!r}")
        if self.size < 8:
            raise HistosynthError(f"--size must be at least 8 px, got {self.size}")
        ph, pw = st["patch_size"]
        self.area_ratio = self.size * self.size / float(ph * pw)
        self.classes = read_class_map(st["classes"], "stats.json")
        self.total_fit = scale_counts(st["counts"]["total"], self.area_ratio)
        self.total_table = count_cdf_table(self.total_fit)
        cop = st["count_copula"]
        self.cop_types = [int(t) for t in cop["types"]]
        self.type_fits = [scale_counts(st["counts"][str(t)], self.area_ratio) for t in self.cop_types]
        self.type_tables = [count_cdf_table(f) for f in self.type_fits]
        corr = np.asarray(cop["corr"], dtype=np.float64).reshape(len(self.cop_types), len(self.cop_types))
        vals, vecs = np.linalg.eigh(0.5 * (corr + corr.T))
        self.cop_chol = vecs * np.sqrt(np.maximum(vals, 0.0))
        self.morph = {int(k): v for k, v in st["morphology"].items()}
        placeable = [t for t in self.cop_types if self.morph.get(t, {}).get("n", 0) > 0]
        self.placeable = np.array(placeable, dtype=np.int64)
        if len(self.placeable) == 0:
            raise HistosynthError("the stats hold no nuclei to sample from (no type has morphology)")
        # fallback proportions when the copula draws zero everywhere
        means = np.array([max(f["mean"], 0.0) if t in placeable else 0.0
                          for t, f in zip(self.cop_types, self.type_fits)])
        self.mean_props = means / means.sum() if means.sum() > 0 else np.isin(self.cop_types, placeable) / len(
            placeable)
        self.can_place = np.isin(self.cop_types, placeable)
        if not (math.isfinite(float(self.density)) and float(self.density) > 0):
            raise HistosynthError(f"sample_masks.density must be positive, got {self.density}")
        self.requested = resolve_type_mix(self.type_mix, self.classes, placeable, self.cop_types)
        self.request_share = np.array([self.requested.get(t, 0.0) for t in self.cop_types])
        self.request_named = np.isin(self.cop_types, list(self.requested))
        # radius margin for centres outside the patch: 75th percentile of the equivalent radius
        r75 = [math.sqrt(sample_quantiles(self.morph[t]["area"], np.array([0.75]))[0] / math.pi)
               for t in placeable]
        self.margin = int(math.ceil(max(r75)))
        self.mean_area = {t: float(self.morph[t]["area"]["mean"]) for t in placeable}
        # field: per component, a matrix square root of the covariance (rows scaled so every type's
        # field has unit variance: only the correlation structure matters under the threshold)
        fl = st["field"]
        self.field_types = [int(t) for t in fl.get("types", [])]
        nt = len(self.field_types)
        total_var = np.zeros(nt)
        for comp in fl.get("components", []):
            total_var += np.diag(np.asarray(comp["cov"], dtype=np.float64).reshape(nt, nt))
        self.field_on = total_var > 1e-9
        scale = np.where(self.field_on, 1.0 / np.sqrt(np.where(self.field_on, total_var, 1.0)), 0.0)
        self.components = []
        for comp in fl.get("components", []):
            cov = np.asarray(comp["cov"], dtype=np.float64).reshape(nt, nt)
            v, q = np.linalg.eigh(0.5 * (cov + cov.T))
            root = (q * np.sqrt(np.maximum(v, 0.0))) * scale[:, None]  # cov = root root^T
            sd_cells = comp["length_px"] / math.sqrt(2.0) / self.field_cell
            self.components.append((root, sd_cells))
        self.packing = {int(k): float(v) for k, v in fl.get("packing", {}).items()}
        self.leak = float(fl.get("leak", 0.05))
        self.contact = {int(k): float(v) for k, v in fl.get("contact", {}).items()} if self.method != "uniform" else {}
        tissue = st["spatial"].get("tissue") if fl.get("tissue", True) else None
        if tissue and tissue.get("count_fraction"):
            cf = np.asarray(tissue["count_fraction"], dtype=np.float64).reshape(-1, 2)
            order = np.argsort(cf[:, 0], kind="stable")
            self.tissue_counts = cf[order, 0] * self.area_ratio
            self.tissue_frac = np.clip(cf[order, 1], 0.0, 1.0)
        else:
            self.tissue_counts = None
            self.tissue_frac = None
        self.tissue_sd = (self.components[0][1] if self.components else 0.0)
        self.domain = self.size + 2 * self.margin
        self.grid = int(math.ceil(self.domain / self.field_cell))
        self._norms: dict[tuple[float, int], float] = {}
        self.tissue_real = float(np.mean(self.tissue_frac)) if self.tissue_frac is not None and len(
            self.tissue_frac) else 1.0
        if self.tissue_masks is not None and self.tissue_masks.shape[1:] != (self.size, self.size):
            raise HistosynthError(f"tissue masks are {self.tissue_masks.shape[1]}x{self.tissue_masks.shape[2]}, "
                                  f"the masks {self.size}x{self.size}: sample the tissue at that size")

    def _allowed_cells(self) -> np.ndarray:
        """The tissue of :attr:`allowed` on the field grid (flat bool): cells at least half tissue."""
        m, g, c = self.margin, self.grid, self.field_cell
        full = np.pad(self.allowed.astype(np.float32), m, mode="edge")
        full = np.pad(full, ((0, g * c - full.shape[0]), (0, g * c - full.shape[1])), mode="edge")
        return (full.reshape(g, c, g, c).mean(axis=(1, 3)) >= 0.5).ravel()

    # -- counts ------------------------------------------------------------------
    def draw_counts(self, rng: np.random.Generator) -> np.ndarray:
        """Per-type counts (aligned with ``count_copula.types``) of one mask."""
        k = len(self.cop_types)
        total = int(count_ppf(self.total_fit, rng.random(1), self.total_table)[0])
        z = self.cop_chol @ rng.standard_normal(k)
        u = ndtr(z)
        per = np.array([count_ppf(f, u[j:j + 1], tab)[0] for j, (f, tab) in
                        enumerate(zip(self.type_fits, self.type_tables))], dtype=np.float64)
        per[~self.can_place] = 0
        if self.requested or self.density != 1.0:
            return self._requested_counts(total, per, rng)
        props = per / per.sum() if per.sum() > 0 else self.mean_props
        raw = total * props
        out = np.floor(raw).astype(np.int64)
        rest = total - int(out.sum())
        if rest > 0:
            order = np.argsort(-(raw - out), kind="stable")
            out[order[:rest]] += 1
        return out

    def _requested_counts(self, total: int, per: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Counts under a request: the total times ``density``, the named types their fractions of it, the
        others the rest in the proportions of the copula draw ``per`` (see the module docstring)."""
        total = int(np.floor(total * float(self.density) + rng.random()))
        rest = ~self.request_named & self.can_place
        others = np.where(rest, per, 0.0)
        if others.sum() <= 0:
            others = np.where(rest, self.mean_props, 0.0)
        free = max(0.0, 1.0 - float(self.request_share.sum()))
        props = self.request_share.copy()
        if others.sum() > 0:
            props += free * others / others.sum()
        props = props / props.sum() if props.sum() > 0 else self.mean_props
        return systematic_round(total * props, rng)

    # -- the field ---------------------------------------------------------------
    def _smooth(self, noise: np.ndarray, sd: float) -> np.ndarray:
        """Gaussian-smoothed white noise with unit variance (away from the edges)."""
        if sd < 0.3:
            return noise
        ksz = 2 * int(math.ceil(3 * sd)) + 1
        key = (round(sd, 6), ksz)
        if key not in self._norms:
            k1 = cv2.getGaussianKernel(ksz, sd).ravel()
            self._norms[key] = 1.0 / float(np.sum(k1 ** 2))  # 2-D kernel energy = (sum k1^2)^2 → sd factor
        out = cv2.GaussianBlur(noise, (ksz, ksz), sd, borderType=cv2.BORDER_REFLECT)
        return out * np.float32(self._norms[key])

    def tissue_fraction(self, total: int, rng: np.random.Generator, k: int = 5) -> float:
        """A tissue fraction for a mask of ``total`` nuclei: that of one of the k real patches closest in count."""
        if self.tissue_counts is None or total <= 0:
            return 1.0
        n = len(self.tissue_counts)
        pos = int(np.searchsorted(self.tissue_counts, total))
        lo, hi = max(0, pos - k), min(n, pos + k)
        cand = np.arange(lo, hi)
        near = cand[np.argsort(np.abs(self.tissue_counts[cand] - total), kind="stable")[:k]]
        return float(self.tissue_frac[near[rng.integers(len(near))]])

    def _gauss_field(self, rng: np.random.Generator, root: np.ndarray, sd: float) -> np.ndarray:
        """``root @ W`` for independent smoothed unit-variance fields W (sd in grid cells), on the grid.

        Wide kernels are applied on a coarser grid (sd about 3 coarse cells) and
        the result is resized bilinearly: the field is smooth on that scale, and
        the thresholds downstream only use ranks.
        """
        g = self.grid
        nt = root.shape[1]
        step = max(1.0, sd / 3.0)
        gc = int(math.ceil(g / step)) + 1
        sdc = sd / step
        pad = int(math.ceil(2 * sdc))
        noise = rng.standard_normal((nt, gc + 2 * pad, gc + 2 * pad)).astype(np.float32)
        sm = np.stack([self._smooth(noise[j], sdc) for j in range(nt)])[:, pad:pad + gc, pad:pad + gc]
        if step > 1.0:
            span = g / step  # the g fine cells cover this many coarse cells
            sm = np.stack([cv2.resize(x[:int(math.ceil(span)) + 1, :int(math.ceil(span)) + 1], (g, g),
                                      interpolation=cv2.INTER_LINEAR) for x in sm])
        else:  # narrow kernel (small nuclei or patches): smoothed on the grid itself
            sm = sm[:, :g, :g]
        return np.tensordot(root.astype(np.float32), sm, axes=(1, 0))

    def draw_field(self, rng: np.random.Generator, counts: Mapping[int, int]) -> dict[int, np.ndarray]:
        """Cumulative intensity per type over the grid cells (for inverse-CDF cell draws).

        The tissue is the top fraction f of a further Gaussian field, f drawn from
        the real patches with about as many nuclei (:meth:`tissue_fraction`).
        Type t's territory is the top q_t of its own field within the tissue,
        q_t = N_t x mean area / (packing_t x tissue area) (capped at 1, i.e. the
        whole tissue): the nuclei fill their territory to the fitted packing
        fraction. Inside the territory the intensity is 1, elsewhere such that a
        fraction ``leak`` of the nuclei falls outside. Types without a field or
        packing are uniform over the tissue.
        """
        g = self.grid
        cells = g * g
        nt = len(self.field_types)
        z = np.zeros((nt, g, g), np.float32)
        for root, sd in self.components:
            z += self._gauss_field(rng, root, sd)
        total = int(sum(counts.values()))
        f = self.tissue_fraction(total, rng)
        tissue = np.ones(cells, bool)
        if self.allowed is not None:
            tissue = self._allowed_cells()
        elif f < 0.999 and self.tissue_sd > 0:
            z0 = self._gauss_field(rng, np.ones((1, 1)), self.tissue_sd)[0].ravel()
            k0 = max(1, int(round(f * cells)))
            tissue = z0 >= np.partition(z0, cells - k0)[cells - k0]
        n_tissue = int(tissue.sum())
        tissue_area = float(self.domain * self.domain) * n_tissue / cells
        cdfs = {}
        for j, t in enumerate(self.field_types):
            n_t = int(counts.get(t, 0))
            if n_t == 0:
                continue
            phi = self.packing.get(t)
            inside = tissue
            if self.field_on[j] and phi:
                q = n_t * self.mean_area.get(t, 0.0) / (phi * tissue_area)
                if q < 1.0:
                    k_in = max(1, int(round(q * n_tissue)))
                    zz = np.where(tissue, z[j].ravel(), -np.inf)
                    inside = zz >= np.partition(zz, cells - k_in)[cells - k_in]
            n_in = int(inside.sum())
            if n_in >= cells:
                continue  # uniform (no cdf)
            q = n_in / cells
            out_w = self.leak * q / ((1.0 - self.leak) * (1.0 - q)) if self.leak > 0 else 0.0
            cdfs[t] = np.cumsum(np.where(inside, 1.0, out_w))
        return cdfs

    # -- one mask ----------------------------------------------------------------
    def place(self, crops: list[np.ndarray], types: np.ndarray, cdfs: Mapping[int, np.ndarray],
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Place the nuclei (largest first) with the hard core; returns (inst int32, types uint8).

        Candidates per nucleus: with probability ``contact[t]`` first up to
        ``contact_tries`` contact proposals (a random placed nucleus of the same
        type, a random direction, free at 1.4 x the sum of the equivalent
        radii, then 5 bisection steps towards 0.5 x that sum keeping the last
        free position: the nuclei end up touching, within a pixel, as packed
        real nuclei do); then ``max_tries``
        draws from the type's intensity; then ``max_tries`` uniform draws; else
        the nucleus is dropped (counted).
        """
        s, m, c = self.size, self.margin, self.field_cell
        ext = max([max(cr.shape) for cr in crops] + [1])
        pad = ext // 2 + m + 2
        big = s + 2 * pad
        canvas = np.zeros((big, big), np.int32)
        tcanvas = np.zeros((big, big), np.uint8)
        sizes = np.array([int(cr.sum()) for cr in crops])
        order = np.argsort(-sizes, kind="stable")
        off = pad - m  # canvas coordinate of domain origin
        g = self.grid
        next_id = 1
        tries = self.max_tries
        placed_at: dict[int, list[tuple[float, float, float]]] = {}

        occ = np.zeros((big, big), bool)
        lo_in, hi_in = pad, pad + s
        where = None
        if self.allowed is not None:
            occ[lo_in:hi_in, lo_in:hi_in] = ~self.allowed  # air is taken: no nucleus pixel on it
            where = np.flatnonzero(self.allowed)

        def free(y0: int, x0: int, cr: np.ndarray) -> bool:
            hh, ww = cr.shape
            if y0 < 0 or x0 < 0 or y0 + hh > big or x0 + ww > big:
                return False
            if (occ[y0:y0 + hh, x0:x0 + ww] & cr).any():
                return False
            if y0 >= lo_in and x0 >= lo_in and y0 + hh <= hi_in and x0 + ww <= hi_in:
                return True  # wholly inside the patch
            vy0, vy1 = max(lo_in - y0, 0), min(hi_in - y0, hh)
            vx0, vx1 = max(lo_in - x0, 0), min(hi_in - x0, ww)
            return vy0 < vy1 and vx0 < vx1 and bool(cr[vy0:vy1, vx0:vx1].any())

        for i in order:
            cr = crops[i]
            t = int(types[i])
            hh, ww = cr.shape
            cy, cx = (hh - 1) / 2.0, (ww - 1) / 2.0
            r_i = math.sqrt(sizes[i] / math.pi)
            spot = None
            mates = placed_at.get(t)
            if mates and rng.random() < self.contact.get(t, 0.0):
                picks = rng.integers(0, len(mates), self.contact_tries)
                angles = rng.uniform(0, 2 * math.pi, self.contact_tries)
                for pk, ang in zip(picks.tolist(), angles.tolist()):
                    my, mx, r_j = mates[pk]
                    dy, dx = math.sin(ang), math.cos(ang)
                    d_hi, d_lo = 1.4 * (r_i + r_j), 0.5 * (r_i + r_j)
                    y0 = int(math.floor(my + d_hi * dy - cy + 0.5))
                    x0 = int(math.floor(mx + d_hi * dx - cx + 0.5))
                    if not free(y0, x0, cr):
                        continue
                    last = (y0, x0)
                    for _ in range(5):  # bisect towards contact: d_hi stays free
                        d = 0.5 * (d_hi + d_lo)
                        y0 = int(math.floor(my + d * dy - cy + 0.5))
                        x0 = int(math.floor(mx + d * dx - cx + 0.5))
                        if free(y0, x0, cr):
                            d_hi, last = d, (y0, x0)
                        else:
                            d_lo = d
                    spot = last
                    break
            if spot is None:
                cdf = cdfs.get(t)
                for phase in (0, 1):
                    if phase == 0 and cdf is not None:
                        cells = np.searchsorted(cdf, rng.random(tries) * cdf[-1], side="right")
                        cells = np.minimum(cells, g * g - 1)
                        ys = (cells // g + rng.random(tries)) * c
                        xs = (cells % g + rng.random(tries)) * c
                    elif where is not None:  # uniform over the tissue pixels
                        if not where.size:
                            break
                        pix = where[rng.integers(0, where.size, tries)]
                        ys = pix // s + m + rng.random(tries)
                        xs = pix % s + m + rng.random(tries)
                    else:
                        ys = rng.random(tries) * self.domain
                        xs = rng.random(tries) * self.domain
                    y0s = np.floor(off + ys - cy + 0.5).astype(np.int64).tolist()
                    x0s = np.floor(off + xs - cx + 0.5).astype(np.int64).tolist()
                    for y0, x0 in zip(y0s, x0s):
                        if free(y0, x0, cr):
                            spot = (y0, x0)
                            break
                    if spot is not None:
                        break
            if spot is None:
                self.dropped += 1
                continue
            y0, x0 = spot
            canvas[y0:y0 + hh, x0:x0 + ww][cr] = next_id
            tcanvas[y0:y0 + hh, x0:x0 + ww][cr] = t
            occ[y0:y0 + hh, x0:x0 + ww] |= cr
            placed_at.setdefault(t, []).append((y0 + cy, x0 + cx, r_i))
            next_id += 1
        inst = canvas[pad:pad + s, pad:pad + s]
        typ = tcanvas[pad:pad + s, pad:pad + s]
        return _relabel(inst), np.ascontiguousarray(typ)

    def draw_sizes(self, types: np.ndarray, mask_of: np.ndarray, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Area and orientation of each nucleus (``mask_of``: which mask it belongs to).

        Orientation = a per-mask, per-type mean direction (drawn from the fitted
        distribution of patch means) + a deviation drawn from the fitted
        distribution of deviations from the patch mean: aligned types (spindles
        along fibres) stay aligned within a mask, round ones come out uniform.
        Types without these fits use the marginal orientation distribution.
        """
        n = len(types)
        areas = np.empty(n)
        orients = np.empty(n)
        n_masks = int(mask_of.max()) + 1 if n else 0
        for t in np.unique(types):
            sel = types == t
            k = int(sel.sum())
            mo = self.morph[int(t)]
            areas[sel] = sample_quantiles(mo["area"], rng.random(k))
            if "orientation_deviation" in mo and "orientation_patch_mean" in mo:
                means = sample_quantiles(mo["orientation_patch_mean"], rng.random(n_masks))
                dev = sample_quantiles(mo["orientation_deviation"], rng.random(k))
                orients[sel] = (means[mask_of[sel]] + dev + np.pi / 2) % np.pi - np.pi / 2
            else:
                orients[sel] = sample_quantiles(mo["orientation"], rng.random(k))
        return areas, orients

    def draw_eccentricities(self, types: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A target eccentricity per nucleus from its type's fitted distribution."""
        out = np.empty(len(types))
        u = rng.random(len(types))
        for t in np.unique(types):
            sel = types == t
            out[sel] = sample_quantiles(self.morph[int(t)]["eccentricity"], u[sel])
        return out

    def match_eccentricity(self, shapes: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Hand the shapes of a type-blind source to the nuclei by eccentricity rank.

        An unconditional β-VAE decodes shapes without knowing the type, so
        spindles would come out as round as lymphocytes. Each nucleus has a
        target eccentricity from its type's fitted distribution; the k-th
        roundest shape of the batch goes to the nucleus with the k-th smallest
        target (1-D optimal transport). No extra decoding: the shapes keep their
        outlines, only their assignment changes.
        """
        if len(shapes) < 2:
            return shapes
        have = shape_moments(shapes)["eccentricity"]
        out = np.empty_like(shapes)
        out[np.argsort(target, kind="stable")] = shapes[np.argsort(have, kind="stable")]
        return out

    def as_decoded(self, shapes: np.ndarray, types: np.ndarray) -> list[np.ndarray]:
        """Each shape cut to its bounding box, as decoded (the ``uniform`` method); an empty one a disk of its
        type's mean area."""
        crops = []
        # types the shape source draws as fitted ellipses (no β-VAE shapes of them): not at nucleus scale
        # as drawn, so scaled to their type's mean area
        rescale = getattr(self.shape_source, "fallback_types", frozenset())
        for shape, t in zip(shapes, types):
            rows, cols = np.flatnonzero(shape.any(axis=1)), np.flatnonzero(shape.any(axis=0))
            if rows.size:
                crop = np.ascontiguousarray(shape[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
                if int(t) in rescale:
                    f = math.sqrt(self.mean_area.get(int(t), 1.0) / max(int(crop.sum()), 1))
                    h, w = max(1, round(crop.shape[0] * f)), max(1, round(crop.shape[1] * f))
                    crop = cv2.resize(crop.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
                    if not crop.any():
                        crop = np.ones((1, 1), bool)
                crops.append(crop)
                continue
            r = math.sqrt(self.mean_area.get(int(t), 1.0) / math.pi)
            side = 2 * int(math.ceil(r)) + 1
            yy, xx = np.ogrid[0:side, 0:side]
            crops.append((yy - side // 2) ** 2 + (xx - side // 2) ** 2 <= r * r)
        return crops

    def sample(self, n: int, rng: np.random.Generator, batch: int = 32):
        """Yield (inst, types, per-type counts) for ``n`` masks, decoding shapes ``batch`` masks at a time."""
        tm = self.timings
        done = 0
        while done < n:
            b = min(batch, n - done)
            t0 = time.perf_counter()
            counts = [self.draw_counts(rng) for _ in range(b)]
            if self.tissue_masks is not None:  # the fitted density per tissue pixel (module docstring)
                tm_ = self.tissue_masks
                counts = [systematic_round(cnt * float((tm_[(self.first_mask + done + k) % len(tm_)] > 0).mean())
                                           / max(self.tissue_real, 1e-6), rng) for k, cnt in enumerate(counts)]
            types_per = [np.repeat(np.array(self.cop_types, np.int64), cnt) for cnt in counts]
            all_types = np.concatenate(types_per) if types_per else np.zeros(0, np.int64)
            mask_of = np.repeat(np.arange(b), [len(tp) for tp in types_per])
            uniform = self.method == "uniform"
            if not uniform:
                areas, orients = self.draw_sizes(all_types, mask_of, rng)
            t1 = time.perf_counter()
            tm["counts"] += t1 - t0
            shapes = np.asarray(self.shape_source(len(all_types), all_types, rng), dtype=bool)
            if shapes.shape != (len(all_types), shapes.shape[1], shapes.shape[2]) or shapes.ndim != 3:
                raise HistosynthError(f"shape source returned {shapes.shape}, expected ({len(all_types)}, H, W)")
            shapes = clean_shapes(shapes)
            self.disks += int((~shapes.any(axis=(1, 2))).sum())
            if not uniform:
                target_ecc = self.draw_eccentricities(all_types, rng)
                if not getattr(self.shape_source, "type_aware", True):
                    shapes = self.match_eccentricity(shapes, target_ecc)
            t2 = time.perf_counter()
            tm["decode"] += t2 - t1
            if uniform:
                crops = self.as_decoded(shapes, all_types)
            else:
                crops = warp_shapes(shapes, areas, orients, target_ecc if self.eccentricity == "fitted" else None)
            t3 = time.perf_counter()
            tm["resize_rotate"] += t3 - t2
            start = 0
            for k in range(b):
                nk = len(types_per[k])
                t4 = time.perf_counter()
                if self.tissue_masks is not None:
                    self.allowed = self.tissue_masks[(self.first_mask + done + k) % len(self.tissue_masks)] > 0
                cdfs = {} if uniform else self.draw_field(rng, dict(zip(self.cop_types, counts[k].tolist())))
                t5 = time.perf_counter()
                tm["field"] += t5 - t4
                inst, typ = self.place(crops[start:start + nk], types_per[k], cdfs, rng)
                tm["placement"] += time.perf_counter() - t5
                start += nk
                yield inst, typ
            done += b


def _relabel(inst: np.ndarray) -> np.ndarray:
    """Ids 1..n in order of first appearance of the placement ids (gaps closed)."""
    inst = np.ascontiguousarray(inst, dtype=np.int32)
    mx = int(inst.max())
    if mx == 0:
        return inst
    present = np.zeros(mx + 1, bool)
    present[np.unique(inst)] = True
    present[0] = False
    lut = np.zeros(mx + 1, np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lut[inst]


def shard_range(n: int, shard: int, n_shards: int) -> tuple[int, int]:
    """The masks [start, stop) of shard ``shard`` of ``n_shards`` (contiguous, near-equal)."""
    return n * shard // n_shards, n * (shard + 1) // n_shards


def shard_rng(seed: int, shard: int) -> np.random.Generator:
    """The generator of one shard: SeedSequence(seed, spawn_key=(shard,)) - independent per shard."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(shard),)))


def sample_masks(
    stats: Mapping[str, Any] | str | os.PathLike,
    shape_source: ShapeSource,
    n: int,
    size: int,
    seed: int,
    out_dir: str | os.PathLike | None = None,
    shard: int = 0,
    n_shards: int = 1,
    batch: int = 32,
    source_name: str = "custom",
    progress: bool = False,
    extra_report: Mapping[str, Any] | None = None,
    eccentricity: str = "fitted",
    type_mix: Mapping[str | int, float] | None = None,
    density: float = 1.0,
    method: str = "statistical",
    tissue: np.ndarray | None = None,
    daff: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample this shard's masks of ``n`` in all; write them to ``out_dir`` (a patch set) if given.

    ``method``: ``statistical`` (the fitted layout) or ``uniform`` (seed 000's baseline; module docstring), or
    ``daff``: :func:`histosynth.masks.daff_layout.sample_daff_masks` with ``daff`` = {library, g1, and optionally
    ops, threads, batch}; ``stats`` and ``shape_source`` are then not used.
    ``type_mix`` and ``density`` ask for another mix of types or more (fewer) nuclei than fitted
    (module docstring, "Synthesis on request").

    ``tissue`` (M, size, size) uint8 places nuclei only where it is > 0 (module docstring, "Nuclei only
    inside tissue"); mask i of ``n`` gets tissue mask i mod M, which the output carries as ``tissue.npy``.

    ``shape_source(n, types, rng) -> bool (n, H, W)`` is any callable (the CLI
    builds one from the β-VAE: :func:`~histosynth.masks.shapes.dvae_source`;
    tests use :func:`~histosynth.masks.shapes.ellipse_source`). A source with
    ``type_aware = False`` (an unconditional β-VAE) gets its shapes assigned by
    eccentricity; a source without the attribute is trusted to respect ``types``.

    Returns a report dict; without ``out_dir`` it also holds ``inst``, ``types``
    (stacked arrays) and ``rows`` (the index rows) - handy for tests.
    """
    from tqdm import tqdm

    if method == "daff":
        from histosynth.masks.daff_layout import sample_daff_masks

        if not daff or "library" not in daff or "g1" not in daff:
            raise HistosynthError("sample_masks.method daff needs the centroid library and G1 (daff={library, g1})")
        if tissue is not None:
            raise HistosynthError("sample_masks.method daff does not place nuclei inside tissue masks yet: its "
                                  "layouts come from the centroid library; use statistical or uniform with --tissue")
        opts = {k: daff[k] for k in ("ops", "threads", "batch") if daff.get(k) is not None}
        return sample_daff_masks(daff["library"], daff["g1"], n, size, seed, out_dir, shard=shard,
                                 n_shards=n_shards, progress=progress, extra_report=extra_report, **opts)
    if not isinstance(stats, Mapping):
        stats = load_stats(stats)
    if n < 1:
        raise HistosynthError(f"--n must be at least 1, got {n}")
    if not (n_shards >= 1 and 0 <= shard < n_shards):
        raise HistosynthError(f"--shard must be in 0..{n_shards - 1} (--n-shards {n_shards}), got {shard}")
    start, stop = shard_range(n, shard, n_shards)
    rng = shard_rng(seed, shard)
    sampler = MaskSampler(stats, shape_source, size, eccentricity=eccentricity, type_mix=type_mix,
                          density=density, method=method, tissue_masks=tissue, first_mask=start)
    classes = read_class_map(stats["classes"], "stats.json")
    cols = class_columns({name: tid for tid, name in classes.items()})
    type_ids = sorted(cols)
    src = f"sample-masks seed {seed} shard {shard}"
    rows: list[dict[str, Any]] = []
    insts: list[np.ndarray] = []
    typs: list[np.ndarray] = []
    tiss: list[np.ndarray] = []
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "stage": "sample-masks",
        "seed": int(seed), "shard": int(shard), "n_shards": int(n_shards), "n_total": int(n),
        "masks": int(stop - start), "first_mask": int(start), "size": int(size), "mpp": float(stats["mpp"]),
        "shape_source": source_name, "area_ratio": sampler.area_ratio,
        "classes": class_map_to_json(classes),
        "method": method, "placement": PLACEMENT[method],
        "eccentricity": eccentricity if method == "statistical" else "model",
        "request": {"type_mix": {classes.get(t, str(t)): f for t, f in sampler.requested.items()} or None,
                    "density": float(density)},
        **(dict(extra_report) if extra_report else {}),
    }

    def make_row(inst: np.ndarray, typ: np.ndarray) -> dict[str, Any]:
        ids = inst.ravel()
        nmax = int(ids.max())
        row = {"slide": "synthetic", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": float(stats["mpp"]),
               "width": int(size), "height": int(size), "n_nuclei": nmax, "source": src,
               "tissue_fraction": 1.0 if sampler.allowed is None else float(sampler.allowed.mean())}
        per = np.zeros(256, np.int64)
        if nmax:
            first = np.zeros(nmax + 1, np.int64)
            sel = ids > 0
            first[ids[sel]] = typ.ravel()[sel]
            per = np.bincount(first[1:], minlength=256)
        for tid in type_ids:
            row[cols[tid]] = int(per[tid])
        return row

    it = sampler.sample(stop - start, rng, batch=batch)
    bar = tqdm(total=stop - start, desc="sample-masks", disable=not progress)
    if out_dir is not None:
        arrays = ("inst", "types") if tissue is None else ("inst", "types", "tissue")
        with PatchSetWriter(out_dir, arrays, (size, size), extra_columns=tuple(cols.values())) as w:
            for inst, typ in it:
                t0 = time.perf_counter()
                row = make_row(inst, typ)
                w.add(row, inst=inst, types=typ,
                      **({} if tissue is None else {"tissue": sampler.allowed.astype(np.uint8)}))
                rows.append(row)
                sampler.timings["write"] += time.perf_counter() - t0
                bar.update()
            report.update(_summary(sampler, rows, time.perf_counter() - t_start, cols))
            w.report = report
    else:
        for inst, typ in it:
            rows.append(make_row(inst, typ))
            insts.append(inst)
            typs.append(typ)
            if tissue is not None:
                tiss.append(sampler.allowed.astype(np.uint8))
            bar.update()
        report.update(_summary(sampler, rows, time.perf_counter() - t_start, cols))
        report["inst"] = np.stack(insts) if insts else np.zeros((0, size, size), np.int32)
        report["types"] = np.stack(typs) if typs else np.zeros((0, size, size), np.uint8)
        report["rows"] = rows
        if tissue is not None:
            report["tissue"] = np.stack(tiss) if tiss else np.zeros((0, size, size), np.uint8)
    bar.close()
    log.info("sampled %d masks (%d nuclei, %d dropped, %d empty shapes made disks) in %.1f s%s", len(rows),
             report["nuclei"], report["dropped"], report["disks"], report["seconds"],
             f" → {out_dir}" if out_dir else "")
    if sampler.requested or density != 1.0:
        fractions = report["achieved"]["type_fractions"]
        log.info("requested %s at density %g; got %s, %.1f nuclei per mask", report["request"]["type_mix"] or
                 "the fitted mix", density, ", ".join(f"{k} {v:.3f}" for k, v in fractions.items()),
                 report["achieved"]["nuclei_per_mask"])
    if report["nuclei"] and report["disks"] > 0.1 * report["nuclei"]:
        log.warning("%d of %d nuclei (%.0f %%) have a disk in place of an empty decoded shape: the shape model is "
                    "under-trained (see its hold-out Dice in train_dvae's log)", report["disks"], report["nuclei"],
                    100 * report["disks"] / report["nuclei"])
    return report


def _summary(sampler: MaskSampler, rows: list[dict[str, Any]], seconds: float,
             cols: Mapping[int, str]) -> dict[str, Any]:
    nuclei = int(sum(r["n_nuclei"] for r in rows))
    per_type = {sampler.classes.get(t, str(t)): int(sum(r[col] for r in rows)) for t, col in cols.items()}
    achieved = {"type_fractions": {k: round(v / nuclei, 5) if nuclei else None for k, v in per_type.items()},
                "nuclei_per_mask": round(nuclei / len(rows), 3) if rows else None}
    return {"nuclei": nuclei, "dropped": int(sampler.dropped), "disks": int(sampler.disks), "achieved": achieved,
            "seconds": round(seconds, 3),
            "masks_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None,
            "timings": {k: round(v, 4) for k, v in sampler.timings.items()}}
