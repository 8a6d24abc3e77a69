"""The fit-stats stage: statistics of real nuclei masks, and the fits the sampler draws from.

:func:`fit_stats` reads one or more typed patch sets (``inst.npy`` + ``types.npy``)
of the TRAIN slides and writes ``stats.json`` plus three figures
(``counts.png``, ``morphology.png``, ``spatial.png``). Everything
:mod:`histosynth.masks.sampling` needs is in ``stats.json``; nothing else is read
back.

What is measured
----------------
* **Counts** per patch: the number of distinct nucleus ids in the patch (a
  nucleus cut by the patch edge counts, as it does in :mod:`evaluate_masks`),
  in total and per type. A nucleus' type is the majority of ``types`` over its
  pixels.
* **Morphology** per nucleus (moments exactly as ``skimage.measure.regionprops``:
  area, eccentricity, orientation, major/minor axis length; perimeter and
  solidity from ``regionprops`` itself). Nuclei whose bounding box comes within
  ``border_margin`` pixels of the patch edge are cut by the tile and are left
  out of the morphology (they still count and still take part in the spatial
  statistics).
* **Spatial**: centroids of all nuclei of a patch.

  - nearest-neighbour (NN) distance, per patch, from every nucleus to the
    nearest other nucleus of the patch (``all``) and to the nearest other
    nucleus of the same type (per type). No edge correction: the same plain
    definition is used by ``evaluate-masks`` on both sides, and synthetic
    patches have the same size, so the comparison is like for like.
  - pair-correlation function g_ab(r) for every type pair (a <= b, cross-type
    included) and for all nuclei (``all-all``), on a fixed ring grid
    ``r_edges`` (0 .. min(H, W)/3 in steps of ``dr``). Edge correction is the
    **translation correction**: a pair at offset (dx, dy) is weighted by
    1 / ((W - |dx|)(H - |dy|)), the area of the window intersected with its
    translate, which makes the second-order density estimate unbiased for a
    stationary process. Patches are pooled by ratio:
    g_ab(r) = sum_p rho_ab,p(r) / sum_p lambda_a,p lambda_b,p with
    lambda_a lambda_b estimated by n_a n_b / |W|^2 (n_a (n_a - 1) / |W|^2 for
    a = b). Differences in density *between* patches therefore do not show up
    as clustering (g of a Poisson process with a patch-varying intensity is 1):
    they are in the count distributions, which the sampler draws first.

What is fitted
--------------
* **Count distributions** (total and per type), by maximum likelihood, each
  candidate being a distribution on 0, 1, 2, ...: ``poisson`` (lam),
  ``nbinom`` (mean, size; var = mean + mean^2/size), and the continuous
  ``normal`` (mean, sd) and ``gamma`` (shape, scale; location 0) *discretised*
  - P(k) = F(k + 1/2) - F(k - 1/2), the mass below 1/2 going to 0 - so that
  all four likelihoods are probabilities of the same integers and their AIC
  (2 k - 2 log L) can be compared. (The seed paper compared normal, gamma and
  beta densities on the counts; beta needs bounds a count does not have.) The
  smallest AIC is ``best``. Degenerate data - fewer than 2 patches, or every
  count equal (all zero included) - get the family ``point`` (a point mass at
  the mean; drawn by stochastic rounding when the mean is not an integer) and
  no candidates: never a crash or NaN. A type of the class map that never
  occurs is a point mass at 0, has no morphology, and is never placed.
* **Count copula**: per-type counts are correlated (a patch full of epithelium
  has few lymphocytes). The sampler draws them through a Gaussian copula whose
  correlation matrix is 2 sin(pi rho_s / 6) of the Spearman correlations of the
  per-type counts (projected onto the positive-definite matrices).
* **Spatial model** (``field``), what :mod:`histosynth.masks.sampling` places
  nuclei with (a hard-core, thresholded-Gaussian-field Cox process; the
  design and why are in that module's docstring):

  - the *correlation structure* of the per-type latent fields: a multitype
    log-Gaussian Cox process fitted to the g_ab(r) curves by least squares on
    log g (:func:`fit_field`; signs and relative sizes of the cross-type
    correlations, length scale);
  - per-type *packing fraction* (visible nucleus area / territory area, the
    territory being the union of discs of the median same-type NN distance
    around the type's centroids; :func:`packing_fraction`) and *contact rate*
    (fraction of nuclei touching another, 4-adjacency);
  - the *tissue*: per patch, the fraction within the 90th-percentile NN
    distance of any centroid (:func:`tissue_fractions`), kept as (total count,
    fraction) pairs;
  - then, unless ``calibrate=0``, a few rounds of simulation adjust packing,
    contact and length scale until the sampler's median NN distances,
    touching fractions and g(r) match the real ones
    (:func:`histosynth.masks.sampling.calibrate_field`); the simulated g(r) is
    kept as ``g_sampler`` and drawn dashed in ``spatial.png``.

``scale_counts`` rescales a count fit to another patch area
-----------------------------------------------------------
Counts scale with AREA, not side length: for a ratio a = (S/P)^2 (S, P the
side lengths) every family's mean becomes a * mean. (The seed paper scaled a
1000x1000 fit to 350x350 by 0.35; the right factor is 0.35^2 = 0.1225.) The
variance:

* ``poisson``: lam' = a lam (exact for a Poisson process);
* ``nbinom`` (a Poisson process whose intensity is gamma-distributed from patch
  to patch, constant within a patch): mean' = a mean, size' = size, so
  var' = a mean + a^2 mean^2 / size;
* ``normal`` and ``gamma``: the same decomposition into a Poisson part and an
  extra-Poisson part: var' = a m + a^2 (v - m) when v >= m (over-dispersed),
  var' = a v when v < m (under-dispersed, like sums of independent blocks);
  the normal takes (a m, sqrt(var')), the gamma shape m'^2/var' and scale
  var'/m';
* ``point``: value' = a value.

stats.json (``format: histosynth-stats``, ``version: 1``)
---------------------------------------------------------
::

    classes        {"1": "Epithelial", ...}   type id -> name (class_names, the
                   patch sets' report.json, or "type k")
    mpp            um/px the counts and sizes refer to (median of the patches)
    patch_size     [H, W] in pixels
    n_patches, n_nuclei, sources, border_margin
    counts         {"total": FIT, "1": FIT, ...} with FIT =
                   {"family", "params", "mean", "var", "n", "min", "max",
                    "zero_fraction", "candidates": {family: {"params",
                    "loglik", "aic"}}}  (candidates empty for "point")
    presence       {"1": fraction of patches where type 1 occurs, ...}
    count_copula   {"types": [1, 2, 3], "corr": K x K}
    morphology     {"1": {"n": nuclei used, "area": Q, "eccentricity": Q,
                    "orientation": Q, "perimeter": Q, "solidity": Q,
                    "major_axis": Q, "minor_axis": Q}, ...}
                   Q = {"mean", "std", "quantiles": values at probabilities
                   linspace(0, 1, 201)}: np.interp(u, p, quantiles) is the
                   inverse-CDF draw. A type with no nucleus has {"n": 0}.
                   Types with aligned nuclei also get "orientation_patch_mean"
                   (Q of per-patch axial mean orientations),
                   "orientation_deviation" (Q of deviations from the patch
                   mean) and "orientation_alignment" (mean cos 2 deviation).
    spatial        {"r_edges": px, "r": bin centres px, "units": "px",
                    "edge_correction": "translation", "g": {"1-1": [...],
                    "1-2": [...], "all-all": [...]} (null where no pairs),
                    "pairs": {same keys: raw pair counts per ring},
                    "nn": {"all": Q, "1": Q, ...} (same-type NN per type),
                    "touching_fraction": {"all", "1", ...},
                    "tissue": {"radius_px", "mean_fraction",
                               "count_fraction": [[total count, fraction], ...]}}
    field          {"model": "thresholded-gaussian", "types",
                    "components": [{"length_px", "cov"}] (the correlation
                    structure; only the correlations matter to the sampler),
                    "r_fit", "rmse" (of the LGCP fit), "hard_core_px" (2nd
                    percentile of NN distances), "packing": {"1": ...},
                    "contact": {"1": ...}, "leak" (fraction of a type's
                    nuclei placed outside its territory), "g_sampler",
                    "calibration": {method, rounds, history, chosen_rmse}}

A stats.json of the demo (3 classes, 76 patches) is ~100 kB.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import optimize, stats as sps
from scipy.spatial import cKDTree

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.patchset import parse_classes, read_patchset

log = logging.getLogger(__name__)

FORMAT = "histosynth-stats"
VERSION = 1
FAMILIES = ("normal", "gamma", "poisson", "nbinom")
N_QUANTILES = 201
QUANTILE_P = np.linspace(0.0, 1.0, N_QUANTILES)
MAX_PACKING = 0.75  # above the jamming limit of random sequential packing: the hard core caps it anyway
LEAK = 0.05  # fraction of a type's nuclei placed outside its territory
MAX_TISSUE_PAIRS = 5000  # (count, tissue fraction) pairs kept in stats.json
MORPH_FEATURES = ("area", "eccentricity", "orientation", "perimeter", "solidity", "major_axis", "minor_axis")


# --------------------------------------------------------------------------- per-nucleus features
def nucleus_features(inst: np.ndarray, types: np.ndarray | None = None, full: bool = False,
                     border_margin: int = 1) -> dict[str, np.ndarray]:
    """Per-nucleus features of one instance mask, ids 1..n (gaps allowed; absent ids are dropped).

    Returns arrays (one entry per present id, in id order): ``label``, ``type``
    (majority of ``types``; 0 without ``types``), ``area``, ``cy``, ``cx``
    (centroid, row/col), ``eccentricity``, ``orientation`` (radians, skimage
    convention: angle from the row axis to the major axis, in [-pi/2, pi/2]),
    ``major_axis``, ``minor_axis`` (4 sqrt(eigenvalue)), ``border`` (bbox within
    ``border_margin`` px of the edge). ``full`` adds ``perimeter`` and
    ``solidity`` from ``skimage.measure.regionprops``.
    The moments are vectorised with ``np.bincount`` and equal regionprops'.
    """
    inst = np.asarray(inst)
    h, w = inst.shape
    flat = inst.ravel().astype(np.int64)
    n = int(flat.max()) if flat.size else 0
    if n <= 0:
        empty = {k: np.zeros(0) for k in ("area", "cy", "cx", "eccentricity", "orientation", "major_axis",
                                          "minor_axis")}
        empty.update(label=np.zeros(0, np.int64), type=np.zeros(0, np.int64), border=np.zeros(0, bool))
        if full:
            empty.update(perimeter=np.zeros(0), solidity=np.zeros(0))
        return empty
    rr, cc = np.divmod(np.arange(flat.size, dtype=np.int64), w)
    m = n + 1
    area = np.bincount(flat, minlength=m).astype(np.float64)
    present = np.nonzero(area[1:])[0] + 1
    sr = np.bincount(flat, rr, m)
    sc = np.bincount(flat, cc, m)
    src = np.bincount(flat, (rr * cc).astype(np.float64), m)
    srr = np.bincount(flat, (rr * rr).astype(np.float64), m)
    scc = np.bincount(flat, (cc * cc).astype(np.float64), m)
    a = area[present]
    cy, cx = sr[present] / a, sc[present] / a
    var_r = srr[present] / a - cy * cy
    var_c = scc[present] / a - cx * cx
    cov = src[present] / a - cy * cx
    ecc, orient, l1, l2 = _shape_from_moments(var_r, var_c, cov)
    # bounding boxes: min/max row and col per label
    rmin = np.full(m, h, np.int64)
    rmax = np.full(m, -1, np.int64)
    cmin = np.full(m, w, np.int64)
    cmax = np.full(m, -1, np.int64)
    np.minimum.at(rmin, flat, rr)
    np.maximum.at(rmax, flat, rr)
    np.minimum.at(cmin, flat, cc)
    np.maximum.at(cmax, flat, cc)
    bm = int(border_margin)
    p = present
    border = (rmin[p] < bm) | (cmin[p] < bm) | (rmax[p] >= h - bm) | (cmax[p] >= w - bm)
    out: dict[str, np.ndarray] = {
        "label": p.astype(np.int64),
        "area": a,
        "cy": cy,
        "cx": cx,
        "eccentricity": ecc,
        "orientation": orient,
        "major_axis": 4.0 * np.sqrt(l1),
        "minor_axis": 4.0 * np.sqrt(l2),
        "border": border,
    }
    if types is not None:
        t = np.asarray(types).ravel().astype(np.int64)
        nt = int(t.max()) + 1 if t.size else 1
        joint = np.bincount(flat * nt + t, minlength=m * nt).reshape(m, nt)
        joint[:, 0] = 0  # background type never wins over a real type
        tt = joint.argmax(axis=1)
        out["type"] = tt[p]
    else:
        out["type"] = np.zeros(len(p), np.int64)
    if full:
        from skimage.measure import regionprops_table

        props = regionprops_table(inst.astype(np.int32, copy=False), properties=("label", "perimeter", "solidity"))
        pos = {int(lab): i for i, lab in enumerate(props["label"])}
        idx = np.array([pos[int(lab)] for lab in p])
        out["perimeter"] = np.asarray(props["perimeter"], float)[idx]
        out["solidity"] = np.asarray(props["solidity"], float)[idx]
    return out


def _shape_from_moments(var_r: np.ndarray, var_c: np.ndarray, cov: np.ndarray):
    """Eccentricity, orientation and inertia eigenvalues (l1 >= l2) as in skimage.regionprops."""
    half_tr = 0.5 * (var_r + var_c)
    disc = np.sqrt(np.maximum(0.25 * (var_r - var_c) ** 2 + cov * cov, 0.0))
    l1 = half_tr + disc
    l2 = np.maximum(half_tr - disc, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1.0 - l2 / np.where(l1 > 0, l1, 1.0), 0.0, 1.0)), 0.0)
    # skimage: a = var_c, b = -cov, c = var_r; orientation = 0.5 atan2(-2b, c - a)
    diff = var_r - var_c
    orient = np.where(diff == 0, np.where(cov > 0, np.pi / 4, np.where(cov < 0, -np.pi / 4, np.pi / 4)),
                      0.5 * np.arctan2(2.0 * cov, diff))
    return ecc, orient, l1, l2


def shape_moments(shapes: np.ndarray) -> dict[str, np.ndarray]:
    """Area, centroid (cy, cx), orientation and eccentricity of a batch of binary masks (n, h, w)."""
    s = np.asarray(shapes, dtype=np.float64)
    n, h, w = s.shape
    r = np.arange(h, dtype=np.float64)
    c = np.arange(w, dtype=np.float64)
    rows = s.sum(axis=2)  # (n, h)
    cols = s.sum(axis=1)  # (n, w)
    area = rows.sum(axis=1)
    safe = np.where(area > 0, area, 1.0)
    cy = rows @ r / safe
    cx = cols @ c / safe
    var_r = rows @ (r * r) / safe - cy * cy
    var_c = cols @ (c * c) / safe - cx * cx
    cov = np.einsum("nij,i,j->n", s, r, c) / safe - cy * cx
    ecc, orient, l1, l2 = _shape_from_moments(var_r, var_c, cov)
    return {"area": area, "cy": cy, "cx": cx, "orientation": orient, "eccentricity": ecc,
            "major_axis": 4 * np.sqrt(l1), "minor_axis": 4 * np.sqrt(l2)}


# --------------------------------------------------------------------------- count distributions
def _disc_cont_logpmf(dist: Any, x: np.ndarray) -> np.ndarray:
    """log P(k) for a continuous distribution discretised to the integers 0, 1, ... (mass < 1/2 → 0)."""
    lo = np.where(x <= 0, -np.inf, x - 0.5)
    hi = x + 0.5
    p_cdf = dist.cdf(hi) - np.where(np.isinf(lo), 0.0, dist.cdf(np.where(np.isinf(lo), 0.0, lo)))
    p_sf = np.where(np.isinf(lo), 1.0, dist.sf(np.where(np.isinf(lo), 0.0, lo))) - dist.sf(hi)
    p = np.maximum(p_cdf, p_sf)
    return np.log(np.maximum(p, 1e-300))


def _family_dist(family: str, params: Mapping[str, float]) -> Any:
    if family == "normal":
        return sps.norm(loc=params["mean"], scale=params["sd"])
    if family == "gamma":
        return sps.gamma(a=params["shape"], scale=params["scale"])
    if family == "poisson":
        return sps.poisson(params["lam"])
    if family == "nbinom":
        size, mean = params["size"], params["mean"]
        return sps.nbinom(size, size / (size + mean))
    raise ValueError(f"unknown count family {family!r}")


def count_logpmf(family: str, params: Mapping[str, float], k: np.ndarray) -> np.ndarray:
    """log P(K = k) of a fitted count distribution (continuous families discretised)."""
    k = np.asarray(k, dtype=np.float64)
    if family == "point":
        v = params["value"]
        lo, frac = math.floor(v), v - math.floor(v)
        p = np.where(k == lo, 1.0 - frac, 0.0) + np.where(k == lo + 1, frac, 0.0)
        with np.errstate(divide="ignore"):
            return np.log(p)
    dist = _family_dist(family, params)
    if family in ("poisson", "nbinom"):
        return dist.logpmf(k)
    return _disc_cont_logpmf(dist, k)


def _moments(family: str, params: Mapping[str, float]) -> tuple[float, float]:
    if family == "point":
        v = params["value"]
        f = v - math.floor(v)
        return float(v), float(f * (1 - f))
    if family == "normal":
        return float(params["mean"]), float(params["sd"] ** 2)
    if family == "gamma":
        return float(params["shape"] * params["scale"]), float(params["shape"] * params["scale"] ** 2)
    if family == "poisson":
        return float(params["lam"]), float(params["lam"])
    m, r = params["mean"], params["size"]
    return float(m), float(m + m * m / r)


def _fit_family(family: str, x: np.ndarray) -> dict[str, float]:
    """Maximum-likelihood parameters of one family on counts x (not all equal, len >= 2)."""
    mean = float(x.mean())
    var = float(x.var())
    if family == "poisson":
        return {"lam": mean}
    if family == "nbinom":
        def nll(logr: float) -> float:
            r = math.exp(logr)
            return -float(sps.nbinom.logpmf(x, r, r / (r + mean)).sum())

        res = optimize.minimize_scalar(nll, bounds=(-8.0, 16.0), method="bounded", options={"xatol": 1e-6})
        return {"mean": mean, "size": float(math.exp(res.x))}
    if family == "normal":
        start = np.array([mean, math.log(max(math.sqrt(max(var - 1 / 12, 0.0)), 0.3))])

        def nll(p: np.ndarray) -> float:
            return -float(_disc_cont_logpmf(sps.norm(p[0], math.exp(p[1])), x).sum())

        res = optimize.minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-8})
        p = res.x if nll(res.x) <= nll(start) else start
        return {"mean": float(p[0]), "sd": float(math.exp(p[1]))}
    if family == "gamma":
        v = max(var, 0.25)
        m = max(mean, 0.1)
        start = np.array([math.log(m * m / v), math.log(v / m)])

        def nll(p: np.ndarray) -> float:
            p = np.clip(p, -20, 20)
            return -float(_disc_cont_logpmf(sps.gamma(math.exp(p[0]), scale=math.exp(p[1])), x).sum())

        res = optimize.minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-8})
        p = np.clip(res.x if nll(res.x) <= nll(start) else start, -20, 20)
        return {"shape": float(math.exp(p[0])), "scale": float(math.exp(p[1]))}
    raise ValueError(f"unknown count family {family!r}")


_N_PARAMS = {"normal": 2, "gamma": 2, "poisson": 1, "nbinom": 2}


def fit_counts(counts: Sequence[int] | np.ndarray, families: Sequence[str] = FAMILIES) -> dict[str, Any]:
    """Fit every family in ``families`` by maximum likelihood; the smallest AIC is ``family``.

    Degenerate data (< 2 values, or all equal) → ``family: "point"`` at the mean,
    no candidates. Negative or non-integer counts are a ValueError.
    """
    x = np.asarray(counts, dtype=np.float64).ravel()
    if x.size and (np.any(x < 0) or np.any(x != np.round(x)) or not np.all(np.isfinite(x))):
        raise ValueError("counts must be non-negative integers")
    summary = {
        "n": int(x.size),
        "min": float(x.min()) if x.size else 0.0,
        "max": float(x.max()) if x.size else 0.0,
        "zero_fraction": float(np.mean(x == 0)) if x.size else 1.0,
    }
    if x.size < 2 or np.all(x == x[0]):
        value = float(x.mean()) if x.size else 0.0
        return {"family": "point", "params": {"value": value}, "mean": value, "var": 0.0,
                "candidates": {}, **summary}
    candidates: dict[str, dict[str, Any]] = {}
    for fam in families:
        params = _fit_family(fam, x)
        ll = float(count_logpmf(fam, params, x).sum())
        if not math.isfinite(ll):
            ll = -1e300
        candidates[fam] = {"params": params, "loglik": ll, "aic": 2 * _N_PARAMS[fam] - 2 * ll}
    best = min(candidates, key=lambda f: (candidates[f]["aic"], FAMILIES.index(f)))
    mean, var = _moments(best, candidates[best]["params"])
    return {"family": best, "params": dict(candidates[best]["params"]), "mean": mean, "var": var,
            "candidates": candidates, **summary}


def count_cdf_table(fit: Mapping[str, Any], tail: float = 1e-10) -> np.ndarray:
    """Cumulative probabilities P(K <= k) for k = 0 .. kmax (kmax where the tail falls below ``tail``)."""
    family, params = fit["family"], fit["params"]
    if family == "point":
        v = float(params["value"])
        lo, frac = math.floor(v), v - math.floor(v)
        cdf = np.ones(lo + 2)
        cdf[:lo] = 0.0
        cdf[lo] = 1.0 - frac
        return cdf
    mean, var = _moments(family, params)
    kmax = int(max(10, mean + 12 * math.sqrt(max(var, mean, 1.0)) + 10))
    while True:
        k = np.arange(kmax + 1, dtype=np.float64)
        cdf = np.cumsum(np.exp(count_logpmf(family, params, k)))
        if 1.0 - cdf[-1] < tail or kmax > 10_000_000:
            break
        kmax *= 2
    cdf /= cdf[-1]
    return cdf


def count_ppf(fit: Mapping[str, Any], u: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
    """Inverse CDF of a count fit at probabilities u (→ int64 counts >= 0).

    Continuous families give round(F^-1(u)) clipped at 0 (the discretisation of
    the likelihood); a non-integer point mass is stochastically rounded.
    ``table`` (from :func:`count_cdf_table`) skips rebuilding the CDF.
    """
    cdf = count_cdf_table(fit) if table is None else table
    u = np.asarray(u, dtype=np.float64)
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)


def _scale_mean_var(m: float, v: float, a: float) -> tuple[float, float]:
    if v >= m:
        return a * m, a * m + a * a * (v - m)
    return a * m, a * v


def _scale_params(family: str, params: Mapping[str, float], a: float) -> dict[str, float]:
    if family == "point":
        return {"value": a * params["value"]}
    if family == "poisson":
        return {"lam": a * params["lam"]}
    if family == "nbinom":
        return {"mean": a * params["mean"], "size": params["size"]}
    m, v = _moments(family, params)
    m2, v2 = _scale_mean_var(m, v, a)
    if family == "normal":
        return {"mean": m2, "sd": math.sqrt(max(v2, 0.0))}
    if family == "gamma":
        v2 = max(v2, 1e-12)
        m2 = max(m2, 1e-12)
        return {"shape": m2 * m2 / v2, "scale": v2 / m2}
    raise ValueError(f"unknown count family {family!r}")


def scale_counts(fit: Mapping[str, Any], area_ratio: float) -> dict[str, Any]:
    """A count fit rescaled to a patch ``area_ratio`` times as large (new area / fitted area).

    The mean of every family scales linearly with area; the variance as the
    module docstring states (Poisson: var = mean; NB: size kept, so
    var' = a mean + a^2 mean^2/size; normal/gamma: Poisson part * a, extra-Poisson
    part * a^2, or var * a when under-dispersed). ``area_ratio`` = (S/P)^2
    for square patches of sides S (new) and P (fitted), not S/P.
    """
    a = float(area_ratio)
    if not a > 0:
        raise ValueError(f"area ratio must be positive, got {area_ratio}")
    out = dict(fit)
    out["params"] = _scale_params(fit["family"], fit["params"], a)
    out["mean"], out["var"] = _moments(fit["family"], out["params"])
    out["candidates"] = {f: {**c, "params": _scale_params(f, c["params"], a)}
                         for f, c in fit.get("candidates", {}).items()}
    out["area_ratio"] = a * float(fit.get("area_ratio", 1.0))
    return out


# --------------------------------------------------------------------------- spatial statistics
def nn_distances(points: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
    """Distance from each point to the nearest *other* point (of ``targets`` if given, else of ``points``).

    ``points`` and ``targets`` are (n, 2); with ``targets`` the points are assumed
    to be a subset of them (the point itself at distance 0 is skipped). Points
    without a neighbour give no entry.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    tg = points if targets is None else np.asarray(targets, dtype=np.float64).reshape(-1, 2)
    if len(points) == 0 or len(tg) < 2:
        return np.zeros(0)
    d, _ = cKDTree(tg).query(points, k=2)
    return d[:, 1]


def default_r_edges(patch_size: tuple[int, int]) -> np.ndarray:
    """The fixed ring grid for g(r): 0 .. min(H, W)/3 px, about 40 rings of whole pixels."""
    r_max = max(4, int(min(patch_size)) // 3)
    dr = max(1, int(round(r_max / 40)))
    return np.arange(0, r_max + 1e-9, dr, dtype=np.float64)


class PairCorrelation:
    """Accumulates the translation-corrected pair-correlation g_ab(r) over patches.

    ``add(points, types, shape)`` per patch; ``result()`` gives
    {"a-b": g(r)} for a <= b in ``type_ids`` plus "all-all", and the raw pair
    counts per ring. See the module docstring for the estimator.
    """

    def __init__(self, type_ids: Sequence[int], r_edges: np.ndarray):
        self.types = [int(t) for t in type_ids]
        self.r_edges = np.asarray(r_edges, dtype=np.float64)
        self.keys = [f"{a}-{b}" for i, a in enumerate(self.types) for b in self.types[i:]] + ["all-all"]
        nb = len(self.r_edges) - 1
        self.num = {k: np.zeros(nb) for k in self.keys}
        self.den = {k: 0.0 for k in self.keys}
        self.pairs = {k: np.zeros(nb, np.int64) for k in self.keys}
        self.ring_area = np.pi * np.diff(self.r_edges ** 2)

    def add(self, points: np.ndarray, types: np.ndarray, shape: tuple[int, int]) -> None:
        h, w = float(shape[0]), float(shape[1])
        area = h * w
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        types = np.asarray(types).ravel()
        r_max = self.r_edges[-1]
        if len(points) >= 2:
            tree = cKDTree(points)
            pairs = tree.query_pairs(r_max, output_type="ndarray")
        else:
            pairs = np.zeros((0, 2), np.int64)
        i, j = pairs[:, 0], pairs[:, 1]
        dy = np.abs(points[i, 0] - points[j, 0])
        dx = np.abs(points[i, 1] - points[j, 1])
        d = np.hypot(dx, dy)
        wgt = 1.0 / np.maximum((h - dy) * (w - dx), 1e-9)  # 1 / |W ∩ W_x|
        ti, tj = types[i], types[j]
        counts = {t: int(np.sum(types == t)) for t in self.types}
        n = len(points)
        for key in self.keys:
            if key == "all-all":
                sel = np.ones(len(d), bool)
                den = n * (n - 1)
                mult = 2.0  # ordered pairs
            else:
                a, b = (int(s) for s in key.split("-"))
                if a == b:
                    sel = (ti == a) & (tj == a)
                    den = counts[a] * (counts[a] - 1)
                    mult = 2.0
                else:
                    sel = ((ti == a) & (tj == b)) | ((ti == b) & (tj == a))
                    den = counts[a] * counts[b]
                    mult = 1.0
            if sel.any():
                hist, _ = np.histogram(d[sel], bins=self.r_edges, weights=wgt[sel])
                self.num[key] += mult * hist
                self.pairs[key] += np.histogram(d[sel], bins=self.r_edges)[0]
            self.den[key] += den / (area * area)  # lambda_a lambda_b of this patch

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        g = {}
        for key in self.keys:
            # sum_p rho_p(r) / sum_p lambda_a,p lambda_b,p, rho_p = sum_pairs 1/|W ∩ W_x| / ring area
            if self.den[key] > 0:
                g[key] = self.num[key] / self.ring_area / self.den[key]
            else:
                g[key] = np.full(len(self.ring_area), np.nan)
        return g, dict(self.pairs)


# --------------------------------------------------------------------------- spatial field (LGCP)
def _psd(mat: np.ndarray) -> np.ndarray:
    mat = 0.5 * (mat + mat.T)
    vals, vecs = np.linalg.eigh(mat)
    return (vecs * np.maximum(vals, 0.0)) @ vecs.T


def fit_field(r: np.ndarray, g: Mapping[str, np.ndarray], pairs: Mapping[str, np.ndarray],
              type_ids: Sequence[int], hard_core_px: float, r_fit_min: float | None = None,
              max_components: int = 2) -> dict[str, Any]:
    """Fit a multitype log-Gaussian Cox process to the pair-correlation curves.

    For an LGCP with Gaussian fields Z_a, g_ab(r) = exp(C_ab(r)) exactly, where
    C_ab is the cross-covariance of Z_a and Z_b. The model is a linear model of
    coregionalisation with one or two squared-exponential components,
    C_ab(r) = sum_k S^(k)_ab exp(-r^2 / (2 l_k^2)), each S^(k) a positive
    semi-definite type x type matrix. For each (l_1[, l_2]) on a geometric grid
    the S^(k)_ab are weighted least squares of log g_ab(r) (weights: number of
    pairs in the ring) over r >= r_fit_min (default 2 x the hard-core
    distance: below it g is shaped by the packing of touching nuclei, which
    the sampler's hard core produces by itself), projected onto
    the PSD matrices; the grid point with the smallest weighted squared error
    wins (a second component must lower it by 5 %). Length scales start at
    2 x the hard-core distance: a field varying faster than a nucleus diameter
    would describe packing, not clustering. log g is floored at log 0.05.
    No clustering in the data gives S = 0: a hard-core process with uniform
    intensity.
    """
    r = np.asarray(r, dtype=np.float64)
    types = [int(t) for t in type_ids]
    k = len(types)
    lo = 2.0 * hard_core_px if r_fit_min is None else float(r_fit_min)
    use = r >= lo
    if use.sum() < 3:
        use = r >= r[min(len(r) - 3, max(0, int(np.searchsorted(r, lo)) - 3))]
    rr = r[use]
    # target and weights per pair (a, b)
    y = np.zeros((k, k, len(rr)))
    wt = np.zeros((k, k, len(rr)))
    for i, a in enumerate(types):
        for j, b in enumerate(types):
            key = f"{min(a, b)}-{max(a, b)}"
            gv = np.asarray(g.get(key, np.full(len(r), np.nan)), float)[use]
            pv = np.asarray(pairs.get(key, np.zeros(len(r))), float)[use]
            ok = np.isfinite(gv)
            y[i, j] = np.where(ok, np.log(np.maximum(np.where(ok, gv, 1.0), 0.05)), 0.0)
            wt[i, j] = np.where(ok, pv, 0.0)
    if k == 0 or wt.sum() <= 0:
        return {"model": "lgcp", "types": types, "components": [], "r_fit": [float(lo), float(r[-1])],
                "rmse": 0.0, "hard_core_px": float(hard_core_px)}
    grid = np.geomspace(max(2.0, 2.0 * hard_core_px, 0.5 * lo), max(3.0 * r[-1], 4.0 * hard_core_px + 1), 24)

    def solve(lengths: Sequence[float]) -> tuple[float, list[np.ndarray]]:
        basis = np.stack([np.exp(-rr ** 2 / (2 * ell ** 2)) for ell in lengths])  # (m, R)
        mats = [np.zeros((k, k)) for _ in lengths]
        for i in range(k):
            for j in range(i, k):
                wv = wt[i, j]
                if wv.sum() <= 0:
                    continue
                sw = np.sqrt(wv)
                coef, *_ = np.linalg.lstsq((basis * sw).T, y[i, j] * sw, rcond=None)
                for m_, c in enumerate(coef):
                    mats[m_][i, j] = mats[m_][j, i] = c
        mats = [_psd(m_) for m_ in mats]
        pred = np.einsum("mab,mr->abr", np.stack(mats), basis)
        sse = float(np.sum(wt * (y - pred) ** 2))
        return sse, mats

    best = (math.inf, [], [])
    for ell in grid:
        sse, mats = solve([ell])
        if sse < best[0]:
            best = (sse, [ell], mats)
    if max_components >= 2:
        best2 = (math.inf, [], [])
        for i1, l1 in enumerate(grid):
            for l2 in grid[i1 + 2:]:
                sse, mats = solve([l1, l2])
                if sse < best2[0]:
                    best2 = (sse, [l1, l2], mats)
        if best2[0] < 0.95 * best[0]:
            best = best2
    sse, lengths, mats = best
    rmse = math.sqrt(sse / max(wt.sum(), 1e-12))
    comps = [{"length_px": float(ell), "cov": m_.round(6).tolist()} for ell, m_ in zip(lengths, mats)
             if np.any(np.abs(m_) > 1e-9)]
    return {"model": "lgcp", "types": types, "components": comps, "r_fit": [float(rr[0]), float(rr[-1])],
            "rmse": rmse, "hard_core_px": float(hard_core_px)}


def field_g(field: Mapping[str, Any], a: int, b: int, r: np.ndarray) -> np.ndarray:
    """g_ab(r) = exp(C_ab(r)) of a fitted field (without the hard core)."""
    types = [int(t) for t in field["types"]]
    r = np.asarray(r, float)
    if a not in types or b not in types:
        return np.ones_like(r)
    i, j = types.index(a), types.index(b)
    c = np.zeros_like(r)
    for comp in field["components"]:
        c += np.asarray(comp["cov"])[i, j] * np.exp(-r ** 2 / (2 * comp["length_px"] ** 2))
    return np.exp(c)


def _wrap_axial(theta: np.ndarray) -> np.ndarray:
    """Angles of an axis (period pi) into [-pi/2, pi/2)."""
    return (np.asarray(theta) + np.pi / 2) % np.pi - np.pi / 2


def orientation_alignment(orient: np.ndarray, patch: np.ndarray, min_nuclei: int = 3
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch axial mean orientations and every nucleus' deviation from its patch's mean.

    The axial mean is 0.5 atan2(sum sin 2t, sum cos 2t); patches with fewer
    than ``min_nuclei`` nuclei give nothing. Aligned nuclei (spindles along
    collagen) have deviations concentrated at 0, round ones uniform ones.
    """
    means, devs = [], []
    for p in np.unique(patch):
        th = orient[patch == p]
        if th.size < min_nuclei:
            continue
        m = 0.5 * math.atan2(float(np.sin(2 * th).sum()), float(np.cos(2 * th).sum()))
        means.append(m)
        devs.append(_wrap_axial(th - m))
    if not means:
        return np.zeros(0), np.zeros(0)
    return np.asarray(means), np.concatenate(devs)


def touching(inst: np.ndarray) -> np.ndarray:
    """Ids (sorted) of the nuclei that touch another nucleus (4-adjacent pixels of different ids)."""
    inst = np.asarray(inst)
    ids = []
    for a, b in ((inst[:, 1:], inst[:, :-1]), (inst[1:, :], inst[:-1, :])):
        m = (a > 0) & (b > 0) & (a != b)
        ids.append(a[m])
        ids.append(b[m])
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, inst.dtype)


def tissue_fractions(points: Sequence[tuple[np.ndarray, np.ndarray]], radius: float,
                     shape: tuple[int, int]) -> np.ndarray:
    """Per patch, the fraction of the patch within ``radius`` of a nucleus centroid (0 without nuclei).

    The union of those discs is the patch's cellular tissue as the masks show
    it; with the radius at the 90th percentile of the NN distance, neighbours in
    sparse stroma are bridged while empty background (or lumen) stays out.
    """
    h, w = shape
    canvas = np.zeros((h, w), np.uint8)
    rad = max(1, int(round(radius)))
    out = np.zeros(len(points))
    for i, (pts, _) in enumerate(points):
        if len(pts) == 0:
            continue
        canvas[:] = 0
        for y, x in pts:
            cv2.circle(canvas, (int(round(x)), int(round(y))), rad, 1, -1)
        out[i] = canvas.mean()
    return out


def packing_fraction(points: Sequence[tuple[np.ndarray, np.ndarray]], areas: Sequence[np.ndarray],
                     type_id: int, radius: float, shape: tuple[int, int]) -> float | None:
    """Fraction of a type's territory covered by its nuclei, pooled over patches.

    The territory of type t in a patch is the union of discs of ``radius``
    (the median same-type NN distance: neighbours' discs overlap, so a nest is
    one region) around its centroids, clipped to the patch; the covered part is
    the visible area of its nuclei. None when the type never has 2 nuclei in a
    patch.
    """
    h, w = shape
    covered = territory = 0.0
    canvas = np.zeros((h, w), np.uint8)
    rad = max(1, int(round(radius)))
    for (pts, tt), ar in zip(points, areas):
        sel = tt == type_id
        if sel.sum() < 2:
            continue
        canvas[:] = 0
        for y, x in pts[sel]:
            cv2.circle(canvas, (int(round(x)), int(round(y))), rad, 1, -1)
        territory += float(canvas.sum())
        covered += float(ar[sel].sum())
    if territory <= 0:
        return None
    return min(covered / territory, 1.0)


# --------------------------------------------------------------------------- helpers
def quantile_summary(values: np.ndarray) -> dict[str, Any]:
    """{"n", "mean", "std", "quantiles"} at QUANTILE_P (empty → n 0 and no quantiles)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    q = np.quantile(v, QUANTILE_P)
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()),
            "quantiles": [float(f"{x:.6g}") for x in q]}


def sample_quantiles(summary: Mapping[str, Any], u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw from a quantile summary at probabilities u."""
    q = np.asarray(summary["quantiles"], dtype=np.float64)
    return np.interp(np.asarray(u, float), np.linspace(0.0, 1.0, len(q)), q)


def spearman_copula(counts: np.ndarray) -> np.ndarray:
    """Gaussian-copula correlation from per-type counts (patches x types): 2 sin(pi rho_s / 6), PSD."""
    counts = np.asarray(counts, dtype=np.float64)
    n, k = counts.shape
    corr = np.eye(k)
    if n < 3:
        return corr
    varying = [i for i in range(k) if np.ptp(counts[:, i]) > 0]
    if len(varying) >= 2:
        ranks = np.column_stack([sps.rankdata(counts[:, i]) for i in varying])
        rho = np.corrcoef(ranks, rowvar=False)
        pear = 2 * np.sin(np.pi * rho / 6)
        for a, i in enumerate(varying):
            for b, j in enumerate(varying):
                corr[i, j] = pear[a, b]
    corr = _psd(corr)
    d = np.sqrt(np.maximum(np.diag(corr), 1e-12))
    corr = corr / np.outer(d, d)
    np.fill_diagonal(corr, 1.0)
    return corr


def class_names_of(patch_set_paths: Sequence[str | os.PathLike]) -> dict[int, str] | None:
    """The class map recorded in the patch sets' report.json (``classes``), if any, or None.

    Different maps in different patch sets are a HistosynthError.
    """
    found: dict[int, str] | None = None
    first = None
    for p in patch_set_paths:
        rep = Path(p) / "report.json"
        if not rep.is_file():
            continue
        try:
            data = json.loads(rep.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        classes = data.get("classes")
        if not isinstance(classes, dict) or not classes:
            continue
        names = parse_classes(classes)
        if found is None:
            found, first = names, p
        elif names != found:
            raise HistosynthError(f"class map {names} differs from {found} of {first}", p)
    return found


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a stats.json (format, version, the keys the sampler needs)."""
    path = Path(path)
    if path.is_dir():
        path = path / "stats.json"
    if not path.is_file():
        raise HistosynthError("no such stats file", path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HistosynthError(f"not a JSON stats file: {err}", path) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise HistosynthError(f"not a {FORMAT} file (format {found!r})",
                              path)
    if int(data.get("version", 0)) > VERSION:
        raise HistosynthError(f"stats version {data.get('version')} is newer than this histosynth ({VERSION})", path)
    missing = [k for k in ("classes", "mpp", "patch_size", "counts", "morphology", "spatial", "field",
                           "count_copula") if k not in data]
    if missing:
        raise HistosynthError(f"stats file lacks {missing}", path)
    return data


# --------------------------------------------------------------------------- the stage
def collect(patch_sets: Sequence[str | os.PathLike], border_margin: int = 1, full: bool = True,
            progress: bool = False) -> dict[str, Any]:
    """Read patch sets and measure every patch: counts, per-nucleus features, centroids.

    Returns {"mpp", "patch_size", "counts" (list of {type: count} per patch),
    "nuclei" (dict of concatenated per-nucleus arrays incl. "patch"),
    "points" (list of (centroids, types) per patch), "type_ids" (sorted ids
    seen), "sources"}. Bad input (no inst/types, empty, mixed sizes or mpp) is a
    HistosynthError naming the patch set.
    """
    from tqdm import tqdm

    if not patch_sets:
        raise HistosynthError("no patch sets given")
    sizes: set[tuple[int, int]] = set()
    mpps: list[float] = []
    counts: list[dict[int, int]] = []
    points: list[tuple[np.ndarray, np.ndarray]] = []
    areas: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {}
    seen_types: set[int] = set()
    patch_no = 0
    for path in patch_sets:
        ps = read_patchset(path, require=("inst", "types"))
        if len(ps) == 0:
            raise HistosynthError("patch set is empty", path)
        shape = tuple(int(s) for s in ps.inst.shape[1:3])
        if sizes and shape not in sizes:
            raise HistosynthError(f"patches of {shape[0]}x{shape[1]} px; the other patch sets have "
                                  f"{next(iter(sizes))}: fit them separately", path)
        sizes.add(shape)
        mpp = ps.index["mpp"].to_numpy(dtype=float)
        if not np.all(np.isfinite(mpp)) or np.any(mpp <= 0):
            raise HistosynthError("index.csv has missing or non-positive mpp", path)
        mpps.extend(mpp.tolist())
        for i in tqdm(range(len(ps)), desc=f"stats {Path(path).name}", disable=not progress):
            inst = np.asarray(ps.inst[i])
            types = np.asarray(ps.types[i])
            f = nucleus_features(inst, types, full=full, border_margin=border_margin)
            f["touching"] = np.isin(f["label"], touching(inst))
            tt = f["type"]
            if np.any(tt == 0):
                raise HistosynthError(f"patch {i}: {int(np.sum(tt == 0))} nuclei have no type (types.npy is 0 "
                                      "under them)", path)
            seen_types.update(int(t) for t in np.unique(tt))
            counts.append({int(t): int(c) for t, c in zip(*np.unique(tt, return_counts=True))})
            points.append((np.column_stack([f["cy"], f["cx"]]), tt))
            areas.append(f["area"])
            f["patch"] = np.full(len(tt), patch_no)
            for key, val in f.items():
                parts.setdefault(key, []).append(val)
            patch_no += 1
    med = float(np.median(mpps))
    if np.any(np.abs(np.asarray(mpps) / med - 1) > 0.05):
        raise HistosynthError(f"patches of different resolutions ({min(mpps):.4g}-{max(mpps):.4g} um/px); "
                              "tile them at one --mpp", patch_sets[0])
    nuclei = {k: np.concatenate(v) for k, v in parts.items()}
    return {"mpp": med, "patch_size": next(iter(sizes)), "counts": counts, "nuclei": nuclei, "points": points,
            "areas": areas,
            "type_ids": sorted(seen_types), "sources": [str(p) for p in patch_sets]}


def fit_stats(
    patch_sets: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    class_names: Mapping[int, str] | None = None,
    border_margin: int = 1,
    progress: bool = False,
    figures: bool = True,
    calibrate: int = 4,
    calibrate_masks: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure the patch sets, fit everything, write ``out_dir/stats.json`` (+ figures); return the stats.

    ``calibrate`` > 0 refines the spatial field by that many rounds of
    simulation (:func:`histosynth.masks.sampling.calibrate_field`, ``calibrate_masks``
    masks a round, seeded by ``seed``); 0 keeps the direct fit g = exp(C).
    """
    data = collect(patch_sets, border_margin=border_margin, progress=progress)
    if class_names is None:
        class_names = class_names_of(patch_sets)
    seen = data["type_ids"]
    if class_names:
        classes = {int(k): str(v) for k, v in class_names.items()}
        unknown = sorted(set(seen) - set(classes))
        if unknown:
            raise HistosynthError(f"type ids {unknown} occur in the masks but not in the class map {classes}",
                                  patch_sets[0])
    else:
        classes = {t: f"type {t}" for t in seen}
    type_ids = sorted(classes)
    n_patches = len(data["counts"])
    count_mat = np.array([[c.get(t, 0) for t in type_ids] for c in data["counts"]], dtype=np.int64)
    count_mat = count_mat.reshape(n_patches, len(type_ids))
    totals = count_mat.sum(axis=1)
    counts = {"total": fit_counts(totals)}
    for j, t in enumerate(type_ids):
        counts[str(t)] = fit_counts(count_mat[:, j])
    presence = {str(t): float(np.mean(count_mat[:, j] > 0)) for j, t in enumerate(type_ids)}
    nuc = data["nuclei"]
    inner = ~nuc["border"]
    morphology: dict[str, Any] = {}
    for t in type_ids:
        sel = inner & (nuc["type"] == t)
        if not sel.any():  # only cut nuclei of this type: use them rather than nothing
            sel = nuc["type"] == t
        entry: dict[str, Any] = {"n": int(sel.sum())}
        if sel.any():
            for feat in MORPH_FEATURES:
                entry[feat] = quantile_summary(nuc[feat][sel])
            means, devs = orientation_alignment(nuc["orientation"][sel], nuc["patch"][sel])
            if means.size:
                entry["orientation_patch_mean"] = quantile_summary(means)
                entry["orientation_deviation"] = quantile_summary(devs)
                entry["orientation_alignment"] = float(np.mean(np.cos(2 * devs)))
        morphology[str(t)] = entry
    # spatial
    h, w = data["patch_size"]
    r_edges = default_r_edges((h, w))
    pc = PairCorrelation(type_ids, r_edges)
    nn_all, nn_type = [], {t: [] for t in type_ids}
    for pts, tt in data["points"]:
        pc.add(pts, tt, (h, w))
        nn_all.append(nn_distances(pts))
        for t in type_ids:
            sel = tt == t
            if sel.sum() >= 2:
                nn_type[t].append(nn_distances(pts[sel]))
    g, pairs = pc.result()
    r = 0.5 * (r_edges[1:] + r_edges[:-1])
    nn = {"all": quantile_summary(np.concatenate(nn_all) if nn_all else np.zeros(0))}
    for t in type_ids:
        nn[str(t)] = quantile_summary(np.concatenate(nn_type[t]) if nn_type[t] else np.zeros(0))
    # hard-core distance: the 2nd percentile of NN distances (centroids of touching nuclei)
    all_nn = np.concatenate(nn_all) if nn_all else np.zeros(0)
    hard_core = float(np.percentile(all_nn, 2)) if all_nn.size else 0.0
    present = [t for t in type_ids if morphology[str(t)]["n"] > 0 or presence[str(t)] > 0]
    field = fit_field(r, g, pairs, present, hard_core)
    packing = {}
    for t in present:
        nn_t = nn[str(t)]
        rad = float(np.median(nn_t["quantiles"])) if nn_t.get("n", 0) else 0.0
        phi = packing_fraction(data["points"], data["areas"], t, rad, (h, w)) if rad > 0 else None
        packing[str(t)] = float(np.clip(phi if phi is not None else 0.3, 0.02, MAX_PACKING))
    # tissue: per patch (total count, fraction within the 90th-percentile NN distance of a nucleus)
    tissue_radius = float(np.percentile(all_nn, 90)) if all_nn.size else float(min(h, w))
    frac = tissue_fractions(data["points"], tissue_radius, (h, w))
    keep = np.arange(n_patches)
    if n_patches > MAX_TISSUE_PAIRS:
        keep = np.linspace(0, n_patches - 1, MAX_TISSUE_PAIRS).round().astype(int)
    tissue = {"radius_px": tissue_radius, "count_fraction": [[int(totals[i]), round(float(frac[i]), 4)] for i in keep],
              "mean_fraction": float(frac.mean())}
    field["model"] = "thresholded-gaussian"
    field["packing"] = packing
    field["leak"] = LEAK
    touch = {"all": float(nuc["touching"].mean()) if nuc["touching"].size else 0.0}
    for t in type_ids:
        sel = nuc["type"] == t
        touch[str(t)] = float(nuc["touching"][sel].mean()) if sel.any() else 0.0
    field["contact"] = {str(t): touch[str(t)] for t in present}
    stats = {
        "format": FORMAT,
        "version": VERSION,
        "classes": {str(t): classes[t] for t in type_ids},
        "mpp": data["mpp"],
        "patch_size": [int(h), int(w)],
        "n_patches": n_patches,
        "n_nuclei": int(totals.sum()),
        "sources": data["sources"],
        "border_margin": int(border_margin),
        "counts": counts,
        "presence": presence,
        "count_copula": {"types": type_ids, "corr": spearman_copula(count_mat).round(6).tolist()},
        "morphology": morphology,
        "spatial": {
            "r_edges": r_edges.tolist(),
            "r": r.tolist(),
            "units": "px",
            "edge_correction": "translation",
            "g": {k: [None if not math.isfinite(x) else round(float(x), 5) for x in v] for k, v in g.items()},
            "pairs": {k: v.astype(int).tolist() for k, v in pairs.items()},
            "nn": nn,
            "touching_fraction": touch,
            "tissue": tissue,
        },
        "field": field,
    }
    if calibrate > 0 and h == w:
        from histosynth.masks.sampling import calibrate_field

        stats["field"] = calibrate_field(stats, iterations=calibrate, n_masks=calibrate_masks, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".stats.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(stats, indent=1))
    os.replace(tmp, out_dir / "stats.json")
    if figures:
        plot_counts(stats, data, type_ids, out_dir / "counts.png")
        plot_morphology(stats, data, type_ids, out_dir / "morphology.png")
        plot_spatial(stats, data, type_ids, out_dir / "spatial.png")
    log.info("fitted %d patches (%d nuclei, %d types) → %s; total count ~ %s (AIC best)",
             n_patches, stats["n_nuclei"], len(type_ids), out_dir / "stats.json", counts["total"]["family"])
    return stats


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_counts(stats: Mapping[str, Any], data: Mapping[str, Any], type_ids: Sequence[int], out: Path) -> None:
    plt = _plt()
    keys = ["total"] + [str(t) for t in type_ids]
    per_patch = {"total": np.array([sum(c.values()) for c in data["counts"]])}
    for t in type_ids:
        per_patch[str(t)] = np.array([c.get(t, 0) for c in data["counts"]])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    colors = {"normal": "C0", "gamma": "C1", "poisson": "C2", "nbinom": "C3", "point": "k"}
    for ax, key in zip(axes[0], keys):
        x = per_patch[key]
        fit = stats["counts"][key]
        hi = int(max(x.max() if x.size else 0, 1) * 1.15) + 2
        bins = np.histogram_bin_edges(x, bins=min(30, max(5, hi))) if x.size else 10
        ax.hist(x, bins=bins, density=True, color="0.8", label=f"{len(x)} patches")
        k = np.arange(0, hi + 1)
        for fam, cand in fit["candidates"].items():
            best = fam == fit["family"]
            p = np.exp(count_logpmf(fam, cand["params"], k))
            ax.plot(k, p, color=colors[fam], lw=2.5 if best else 1.0, ls="-" if best else "--",
                    label=f"{fam} AIC {cand['aic']:.1f}" + (" (best)" if best else ""))
        if fit["family"] == "point":
            ax.axvline(fit["params"]["value"], color="k", lw=2, label="point mass (degenerate)")
        name = "total" if key == "total" else stats["classes"][key]
        ax.set_title(f"{name}: nuclei per {stats['patch_size'][0]}x{stats['patch_size'][1]} patch")
        ax.set_xlabel("count")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=90)


def plot_morphology(stats: Mapping[str, Any], data: Mapping[str, Any], type_ids: Sequence[int], out: Path) -> None:
    plt = _plt()
    nuc = data["nuclei"]
    inner = ~nuc["border"]
    feats = ("area", "eccentricity", "orientation", "perimeter", "solidity")
    fig, axes = plt.subplots(1, len(feats), figsize=(3.8 * len(feats), 3.2))
    for ax, feat in zip(axes, feats):
        for t in type_ids:
            v = nuc[feat][inner & (nuc["type"] == t)]
            if v.size:
                ax.hist(v, bins=40, density=True, histtype="step", lw=1.5,
                        label=f"{stats['classes'][str(t)]} ({v.size})")
        ax.set_title(feat + (" (px)" if feat in ("area", "perimeter") else ""))
        ax.legend(fontsize=7)
    fig.suptitle(f"nuclei not touching the patch edge, {stats['mpp']:.3g} um/px")
    fig.tight_layout()
    save_figure(fig, out, dpi=90)


def plot_spatial(stats: Mapping[str, Any], data: Mapping[str, Any], type_ids: Sequence[int], out: Path) -> None:
    plt = _plt()
    sp = stats["spatial"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key, summ in sp["nn"].items():
        if summ.get("n", 0) == 0:
            continue
        q = np.asarray(summ["quantiles"])
        label = "all" if key == "all" else stats["classes"][key]
        ax.plot(q, QUANTILE_P, lw=2 if key == "all" else 1, label=f"{label} (n={summ['n']})")
    ax.set_xlabel("NN distance (px)")
    ax.set_ylabel("CDF")
    ax.set_title("nearest-neighbour distance (same type; all)")
    ax.legend(fontsize=7)
    r = np.asarray(sp["r"])
    sim = stats["field"].get("g_sampler", {})

    def arr(vals: Sequence[float | None]) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in vals], float)

    for ax, keys, title in ((axes[1], [k for k in sp["g"] if _same(k)], "g(r) within type"),
                            (axes[2], [k for k in sp["g"] if not _same(k)], "g(r) across types")):
        top = 1.0
        for i, key in enumerate(keys):
            gv = arr(sp["g"][key])
            if not np.isfinite(gv).any():
                continue
            top = max(top, float(np.nanmax(gv)))
            ax.plot(r, gv, color=f"C{i}", lw=1.5, label=_pair_label(stats, key))
            if key in sim:
                ax.plot(r, arr(sim[key]), color=f"C{i}", ls="--", lw=1)
        ax.axhline(1, color="0.5", lw=0.8)
        ax.axvline(stats["field"]["hard_core_px"], color="0.5", ls=":", lw=0.8)
        ax.set_xlabel("r (px)")
        ax.set_title(title + (" (solid: data, dashed: sampler)" if sim else " (translation-corrected)"), fontsize=9)
        ax.set_ylim(0, min(8.0, max(2.0, 1.05 * top)))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=90)


def _same(key: str) -> bool:
    a, b = key.split("-")
    return a == b


def _pair_label(stats: Mapping[str, Any], key: str) -> str:
    if key == "all-all":
        return "all nuclei"
    a, b = key.split("-")
    return f"{stats['classes'][a]}-{stats['classes'][b]}"
