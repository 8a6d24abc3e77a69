"""Spatial statistics of nucleus centroids, and the fit of the spatial field the sampler places nuclei with.

NN distances, the translation-corrected pair-correlation g_ab(r)
(:class:`PairCorrelation`), tissue and packing fractions, and the multitype
log-Gaussian Cox process fitted to g_ab(r) (:func:`fit_field`). The
estimators and what the sampler does with the field are described in
:mod:`histosynth.masks.stats` and :mod:`histosynth.masks.sampling`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from scipy.spatial import cKDTree

MAX_PACKING = 0.75  # above the jamming limit of random sequential packing: the hard core caps it anyway


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


def pair_terms(points: np.ndarray, shape: tuple[int, int], r_edges: np.ndarray) -> tuple[np.ndarray, float]:
    """One patch's share of the pooled, translation-corrected g(r) of all nuclei (:class:`PairCorrelation`'s
    all-all estimator): the ring histogram of ordered pairs weighted by 1/|W ∩ W_x|, and n(n-1)/|W|²."""
    h, w = float(shape[0]), float(shape[1])
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(points)
    if n < 2:
        return np.zeros(len(r_edges) - 1), 0.0
    pairs = cKDTree(points).query_pairs(float(r_edges[-1]), output_type="ndarray")
    dy = np.abs(points[pairs[:, 0], 0] - points[pairs[:, 1], 0])
    dx = np.abs(points[pairs[:, 0], 1] - points[pairs[:, 1], 1])
    hist, _ = np.histogram(np.hypot(dx, dy), bins=r_edges, weights=1.0 / np.maximum((h - dy) * (w - dx), 1e-9))
    return 2.0 * hist, n * (n - 1) / (h * w) ** 2


def ripley_l(num: np.ndarray, den: float, r_edges: np.ndarray) -> np.ndarray:
    """Ripley's L at the outer ring edges from pooled :func:`pair_terms` (L(r) = r for complete randomness):
    K(r) = sum over the rings up to r of g x ring area, L = sqrt(K / pi)."""
    if den <= 0:
        return np.full(len(r_edges) - 1, np.nan)
    k = np.cumsum(np.asarray(num, dtype=np.float64) / den)
    return np.sqrt(k / np.pi)


class PairCorrelation:
    """Accumulates the translation-corrected pair-correlation g_ab(r) over patches.

    ``add(points, types, shape)`` per patch; ``result()`` gives
    {"a-b": g(r)} for a <= b in ``type_ids`` plus "all-all", and the raw pair
    counts per ring. The estimator is described in :mod:`histosynth.masks.stats`.
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


# --------------------------------------------------------------------------- spatial field (LGCP)
def nearest_psd(mat: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix to the symmetric part of ``mat`` (negative eigenvalues → 0)."""
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
        mats = [nearest_psd(m_) for m_ in mats]
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
