"""Count distributions: nuclei per patch, fitted by maximum likelihood, drawn by inverse CDF, rescaled by area.

The candidates (``FAMILIES``) are distributions on 0, 1, 2, ...: ``poisson``
(lam), ``nbinom`` (mean, size) and the discretised continuous ``normal``
(mean, sd) and ``gamma`` (shape, scale); degenerate data get the family
``point``. Why and how they are compared (AIC) is in :mod:`histosynth.masks.stats`.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize
from scipy import stats as sps

FAMILIES = ("normal", "gamma", "poisson", "nbinom")


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
