"""Per-nucleus features of instance masks: moments (as ``skimage.measure.regionprops``), contacts, alignment.

The same code measures real masks (fit-stats, evaluate-masks) and sampled
ones (the calibration of :mod:`histosynth.masks.calibrate`); what is measured
and why is in :mod:`histosynth.masks.stats`.
"""

from __future__ import annotations

import math

import numpy as np

from histosynth.io.labels import instance_types


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
    out["type"] = instance_types(inst, types)[1] if types is not None else np.zeros(len(p), np.int64)
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


def touching(inst: np.ndarray) -> np.ndarray:
    """Ids (sorted) of the nuclei that touch another nucleus (4-adjacent pixels of different ids)."""
    inst = np.asarray(inst)
    ids = []
    for a, b in ((inst[:, 1:], inst[:, :-1]), (inst[1:, :], inst[:-1, :])):
        m = (a > 0) & (b > 0) & (a != b)
        ids.append(a[m])
        ids.append(b[m])
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, inst.dtype)


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
