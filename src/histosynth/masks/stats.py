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
    log g (:func:`~histosynth.masks.spatial.fit_field`; signs and relative
    sizes of the cross-type correlations, length scale);
  - per-type *packing fraction* (visible nucleus area / territory area, the
    territory being the union of discs of the median same-type NN distance
    around the type's centroids;
    :func:`~histosynth.masks.spatial.packing_fraction`) and *contact rate*
    (fraction of nuclei touching another, 4-adjacency);
  - the *tissue*: per patch, the fraction within the 90th-percentile NN
    distance of any centroid (:func:`~histosynth.masks.spatial.tissue_fractions`),
    kept as (total count, fraction) pairs;
  - then, unless ``calibrate=0``, a few rounds of simulation adjust packing,
    contact and length scale until the sampler's median NN distances,
    touching fractions and g(r) match the real ones
    (:func:`histosynth.masks.calibrate.calibrate_field`); the simulated g(r) is
    kept as ``g_sampler`` and drawn dashed in ``spatial.png``.

Where the code is
-----------------
This module is the stage (reading the patch sets, fitting, writing
stats.json and the figures). The measurements and fits it uses live in
:mod:`histosynth.masks.features` (per nucleus), :mod:`histosynth.masks.counts`
(count distributions; how ``scale_counts`` rescales a fit to another patch
AREA is in its docstring), :mod:`histosynth.masks.spatial` (NN distances,
g(r), packing, the field fit) and :mod:`histosynth.masks.calibrate` (the
simulation rounds); :mod:`histosynth.masks.statsfile` has the format
constants, the quantile summaries and :func:`~histosynth.masks.statsfile.load_stats`.

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

import numpy as np
from scipy import stats as sps

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.atomic import atomic_write
from histosynth.io.labels import classes_of_patch_sets, read_class_map
from histosynth.io.patchset import read_patchset
from histosynth.masks.calibrate import calibrate_field
from histosynth.masks.counts import count_logpmf, fit_counts
from histosynth.masks.features import nucleus_features, orientation_alignment, touching
from histosynth.masks.spatial import (
    MAX_PACKING,
    PairCorrelation,
    default_r_edges,
    fit_field,
    nearest_psd,
    nn_distances,
    packing_fraction,
    tissue_fractions,
)
from histosynth.masks.statsfile import FORMAT, QUANTILE_P, VERSION, quantile_summary

log = logging.getLogger(__name__)

LEAK = 0.05  # fraction of a type's nuclei placed outside its territory
MAX_TISSUE_PAIRS = 5000  # (count, tissue fraction) pairs kept in stats.json
MORPH_FEATURES = ("area", "eccentricity", "orientation", "perimeter", "solidity", "major_axis", "minor_axis")


# --------------------------------------------------------------------------- helpers
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
    corr = nearest_psd(corr)
    d = np.sqrt(np.maximum(np.diag(corr), 1e-12))
    corr = corr / np.outer(d, d)
    np.fill_diagonal(corr, 1.0)
    return corr


def class_names_of(patch_set_paths: Sequence[str | os.PathLike]) -> dict[int, str] | None:
    """The class map recorded in the patch sets' report.json, or None when none records one.

    Contradictory maps, or an unreadable report.json, are a HistosynthError (:func:`classes_of_patch_sets`).
    """
    return classes_of_patch_sets(patch_set_paths) or None


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
    simulation (:func:`histosynth.masks.calibrate.calibrate_field`, ``calibrate_masks``
    masks a round, seeded by ``seed``); 0 keeps the direct fit g = exp(C).
    """
    data = collect(patch_sets, border_margin=border_margin, progress=progress)
    if class_names is None:
        class_names = class_names_of(patch_sets)
    seen = data["type_ids"]
    if class_names:
        classes = read_class_map(class_names, "class_names")
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
        stats["field"] = calibrate_field(stats, iterations=calibrate, n_masks=calibrate_masks, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "stats.json", lambda tmp: tmp.write_text(json.dumps(stats, indent=1)))
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
