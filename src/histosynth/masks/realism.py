"""DEPAS's realism measures: two sets of feature vectors compared as point clouds (arrays in, numbers out).

DEPAS (seed 002) judges synthetic masks against real ones by three numbers, which need nothing but a feature
vector per mask:

* **KS on a 2-D embedding** - real and synthetic vectors are embedded *together* in two dimensions (t-SNE,
  or the first two principal components); the two-sample Kolmogorov-Smirnov statistic of the two sides is
  taken along each axis and averaged (:func:`ks_2d`). 0 = the sides cover the map alike.
* **KL on the same embedding** - KL(real || synthetic) of the two sides' 10 x 10 histograms on the joint
  range of the embedding, each bin + 1e-3 before normalising so that an empty synthetic bin costs a finite
  amount (:func:`kl_2d`; :func:`kl_1d` is the 1-D form on 20 bins). 0 = identical histograms.
* **A Fréchet distance** of Gaussians fitted to the two sides' features (:func:`frechet`): FID when the
  features are Inception's (:mod:`histosynth.models.inception`), otherwise the same formula on other
  features, e.g. the first 16 principal components of area-averaged masks (:func:`pca_fit`), and named so.

:func:`compare` puts the three together for one pair of feature sets; :func:`embed_2d` is the embedding.
The t-SNE is scikit-learn's (``random_state`` = the seed, perplexity min(30, (n - 1) / 3), PCA
initialisation), run on the first at most 50 principal components of the pooled features, as usual for
t-SNE of high-dimensional features. Its axes carry no meaning of their own, and a t-SNE map is fitted to
the points it is given: compare values only between comparisons with similar numbers of points.

``benchmarks/tissue.py`` (DEPAS against a DCGAN on tissue masks) and ``evaluate-masks`` (nuclei masks)
both compute their numbers here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from histosynth.models.inception import frechet_distance, gaussian_fit

log = logging.getLogger(__name__)

#: bins per axis of the 2-D histograms of KL, and of the 1-D ones
HIST_BINS_2D = 10
HIST_BINS_1D = 20
#: added to every histogram bin before normalising (an empty bin of the synthetic side stays finite)
KL_SMOOTHING = 1e-3
#: principal components of the fallback's Fréchet distance
PCA_COMPONENTS = 16
#: the fewest points per side an embedding (and its KS / KL) is computed for
MIN_POINTS = 5
#: t-SNE's perplexity, lowered to (n - 1) / 3 for few points
TSNE_PERPLEXITY = 30.0
#: principal components the features are reduced to before the t-SNE
TSNE_PCA = 50
EMBEDDINGS = ("tsne", "pca")


def ks_2d(real: np.ndarray, synthetic: np.ndarray) -> tuple[float, list[float]]:
    """The two-sample KS statistic along each axis of (n, 2) points, and their mean: (mean, [x, y])."""
    axes = [float(ks_2samp(real[:, j], synthetic[:, j]).statistic) for j in range(2)]
    return float(np.mean(axes)), axes


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() + KL_SMOOTHING
    b = b.ravel() + KL_SMOOTHING
    a, b = a / a.sum(), b / b.sum()
    return float(np.sum(a * np.log(a / b)))


def kl_1d(real: np.ndarray, synthetic: np.ndarray, bins: int = HIST_BINS_1D) -> float:
    """KL(real || synthetic) of histograms with ``bins`` bins on the pooled range (+1e-3 per bin)."""
    real, synthetic = np.asarray(real, float), np.asarray(synthetic, float)
    lo, hi = min(real.min(), synthetic.min()), max(real.max(), synthetic.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    return _kl(np.histogram(real, edges)[0], np.histogram(synthetic, edges)[0])


def kl_2d(real: np.ndarray, synthetic: np.ndarray, bins: int = HIST_BINS_2D) -> float:
    """KL(real || synthetic) of ``bins`` x ``bins`` histograms of (n, 2) points on their joint range."""
    both = np.concatenate([real, synthetic])
    ex = np.linspace(both[:, 0].min(), both[:, 0].max() + 1e-9, bins + 1)
    ey = np.linspace(both[:, 1].min(), both[:, 1].max() + 1e-9, bins + 1)
    return _kl(np.histogram2d(real[:, 0], real[:, 1], (ex, ey))[0],
               np.histogram2d(synthetic[:, 0], synthetic[:, 1], (ex, ey))[0])


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of Gaussians fitted to (n, d) features ``a`` and ``b`` (FID's formula)."""
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))


def pca_fit(pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the first ``k`` principal axes (k, d) of the (n, d) ``pool`` (fewer when n or d is smaller)."""
    pool = np.asarray(pool, np.float64)
    mean = pool.mean(0)
    _, _, vt = np.linalg.svd(pool - mean, full_matrices=False)
    return mean, vt[:k]


def project(features: np.ndarray, basis: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean, axes = basis
    return (np.asarray(features, np.float64) - mean) @ axes.T


def tsne_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


def embed_2d(features: np.ndarray, method: str = "tsne", seed: int = 0, threads: int | None = None) -> np.ndarray:
    """(n, d) features → (n, 2): t-SNE (scikit-learn; on the first 50 principal components) or PCA-2D.

    Identical feature vectors get identical coordinates: the t-SNE maps the distinct vectors only (its
    placement of exact duplicates is otherwise arbitrary, so that two identical sets would differ on the map)
    and the copies take their original's place. Fewer than 5 distinct vectors: PCA-2D of them.
    """
    x = np.asarray(features, np.float64)
    if method not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {method!r}")
    if method == "pca":
        return project(x, pca_fit(x, 2))
    unique, inverse = np.unique(x, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    if len(unique) < MIN_POINTS:
        return project(unique, pca_fit(unique, 2))[inverse]
    from sklearn.manifold import TSNE

    if unique.shape[1] > TSNE_PCA:
        unique = project(unique, pca_fit(unique, TSNE_PCA))
    perplexity = min(TSNE_PERPLEXITY, (len(unique) - 1) / 3.0)
    y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=int(seed),
             n_jobs=threads).fit_transform(unique.astype(np.float32)).astype(np.float64)
    return y[inverse]


def compare(real: np.ndarray, synthetic: np.ndarray, *, embedding: str = "tsne", seed: int = 0,
            fallback_pca: bool = False, threads: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """KS and KL on the joint 2-D embedding of two feature sets, and their Fréchet distance.

    Returns (the numbers, the embedded points ``{"real", "synthetic"}`` for a figure; empty when skipped).
    ``fallback_pca``: the Fréchet distance is taken on the first 16 principal components of the pooled
    features (``frechet_pca16``) rather than on the features themselves (``frechet``). Too few points for an
    embedding (< 5 per side) or a Fréchet distance (< 2) give nulls and a ``skipped`` reason, not an error.
    """
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    n_r, n_s = len(real), len(synthetic)
    key = "frechet_pca16" if fallback_pca else "frechet"
    out: dict[str, Any] = {"n_real": n_r, "n_synthetic": n_s, "embedding": embedding, "ks_2d": None,
                           "ks_axes": None, "kl_2d": None, key: None, "skipped": None}
    points: dict[str, np.ndarray] = {}
    reasons = []
    if min(n_r, n_s) < MIN_POINTS:
        reasons.append(f"a 2-D embedding needs at least {MIN_POINTS} masks per side, got {n_r} real and "
                       f"{n_s} synthetic (KS / KL skipped)")
    else:
        both = embed_2d(np.concatenate([real, synthetic]), embedding, seed, threads)
        points = {"real": both[:n_r], "synthetic": both[n_r:]}
        out["ks_2d"], out["ks_axes"] = ks_2d(points["real"], points["synthetic"])
        out["kl_2d"] = kl_2d(points["real"], points["synthetic"])
    if min(n_r, n_s) < 2:
        reasons.append(f"a Fréchet distance needs at least 2 masks per side, got {n_r} real and {n_s} synthetic")
    else:
        try:
            if fallback_pca:
                basis = pca_fit(np.concatenate([real, synthetic]), PCA_COMPONENTS)
                out[key] = frechet(project(real, basis), project(synthetic, basis))
            else:
                out[key] = frechet(real, synthetic)
        except ValueError as e:
            reasons.append(f"Fréchet distance not computed: {e}")
    out["skipped"] = "; ".join(reasons) or None
    return out, points
