"""evaluate-stacks: are generated cell z-stacks like real ones, plane by plane and along the focal axis?

``histosynth evaluate-stacks REAL_STACKS GENERATED_STACKS... OUT_DIR`` compares each generated stack set with
held-out real stacks and writes ``evaluation.json``, ``table.md`` and ``montage.png``. Metrics the MI-GAN paper
lacks, each next to a **real-vs-real floor**: the real stacks are split in two halves by a permutation seeded
with ``seed`` (half A = the first ⌊N/2⌋ of it, half B the rest) and half A is scored against half B exactly as a
generated set is scored against all real stacks (so the floor's sides hold half as many stacks: its FID, which
is biased upwards at small n, is a conservative floor). At least :data:`MIN_REAL` real stacks are needed.

**Planes are focal offsets from each stack's best plane** (``best_plane`` of index.csv): offset d of a stack is
its plane ``best_plane + d``, where that plane exists. Generated stacks (``sample-stacks``) have their best plane
at Z//2, so their plane k is offset k − Z//2; real stacks have their best plane wherever the cell was in focus,
so a real stack contributes to offset d only when it recorded that plane (nothing is padded or repeated).

1. **FID / KID per focal plane** — for each offset d ∈ [−Z//2, Z − 1 − Z//2] (the Z offsets a generated stack
   holds), the images at offset d of the generated stacks vs those of the real stacks, on the Inception network
   of :mod:`histosynth.gan.evaluate` (:func:`~histosynth.gan.evaluate.inception_features`,
   :func:`~histosynth.gan.evaluate.frechet_distance`, :func:`~histosynth.gan.evaluate.kernel_inception_distance`),
   up to ``max_images`` images per side and offset (drawn by seed). When the optional package is absent (or
   ``fid=False``) every entry is null and ``fid_skipped`` says why; nothing is downloaded. ``fid_mean``: the
   mean over the offsets that have a value.
2. **Focus curve** — per stack, :func:`histosynth.multifocus.stacks.focus_measure` (variance of the Laplacian
   of the grey plane, whole window) of every plane, divided by the stack's maximum (a stack with no texture
   at all: a curve of zeros). *Peak offset*: the plane of the maximum (of tied planes, the one nearest the best
   plane: a flat curve peaks at its best plane) minus the stack's ``best_plane`` (0: the sharpest plane is the one the set calls in focus). *Width*: the full width
   at half maximum in planes — from the peak, walk each way to the first plane below 0.5 and interpolate the
   crossing linearly between it and its neighbour; where the curve stays ≥ 0.5 to the stack's end, the
   crossing is half a plane beyond the end plane (so a flat curve is Z wide, a lone sharp plane 1 wide).
   Generated vs real: the two-sample KS statistics (:func:`scipy.stats.ks_2samp`) of peak offset
   (``ks_peak``) and of width (``ks_width``); ``mean_curve``: the mean normalised curve per offset
   d ∈ [−(Z−1), Z−1] over the stacks that recorded offset d (null where none did), and ``curve_l1``: the mean
   absolute difference to the real mean curve over the offsets where both are defined.
3. **Plane-to-plane consistency of the nucleus outline** — per plane, the grey image (smoothed, sigma 1 px) is
   thresholded with Otsu's method (the dark side is nucleus); the nucleus is the connected component (8-
   connected) under the window's centre pixel, else the component nearest to it; a flat plane has an empty
   mask. Per stack and gap g = 1 … Z−1, the IoU of the masks of planes i and i + g, averaged over i (two
   empty masks: IoU 1). ``per_gap``: mean over stacks per g; ``mean_iou``: the g = 1 value (neighbouring
   planes); ``diff_to_real``: |mean_iou − real mean_iou| (the floor: |A − B|).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_write
from histosynth.multifocus.stacks import focus_measure
from histosynth.multifocus.stackset import StackSet, read_stackset

log = logging.getLogger(__name__)

MIN_REAL = 4
MAX_IMAGES = 1000
MONTAGE_STACKS = 4
FID_BATCH = 16


# --------------------------------------------------------------------------- inputs
def open_real(path: str | os.PathLike) -> StackSet:
    """The real stack set; fewer than :data:`MIN_REAL` stacks is an error (no floor)."""
    real = read_stackset(path)
    if len(real) < MIN_REAL:
        raise HistosynthError(f"{len(real)} real stacks; at least {MIN_REAL} are needed to split them into two "
                              "halves for the real-vs-real floor", path)
    return real


def open_generated(path: str | os.PathLike, real: StackSet) -> StackSet:
    """A generated stack set with the real set's plane count and stack size (else an error naming it)."""
    gen = read_stackset(path)
    if gen.planes != real.planes:
        raise HistosynthError(f"{gen.planes} planes, but the real stacks {real.path} have {real.planes}", path)
    if gen.size != real.size:
        raise HistosynthError(f"stacks of {gen.size[0]} x {gen.size[1]} px, but the real stacks {real.path} are "
                              f"{real.size[0]} x {real.size[1]} px", path)
    if len(gen) < 2:
        raise HistosynthError(f"{len(gen)} generated stack(s); at least 2 are needed", path)
    return gen


def best_planes(ss: StackSet) -> np.ndarray:
    return ss.index["best_plane"].to_numpy(np.int64)


# --------------------------------------------------------------------------- focus curve
def half_width(curve: np.ndarray) -> float:
    """Full width at half maximum (planes) of a curve normalised to peak 1 (see the module's docstring)."""
    c = np.asarray(curve, np.float64)
    p = int(np.argmax(c))
    if c[p] <= 0:
        return 0.0
    half = 0.5 * c[p]

    def crossing(step: int) -> float:
        i = p
        while 0 <= i + step < len(c):
            j = i + step
            if c[j] < half:
                return i + step * (c[i] - half) / (c[i] - c[j])
            i = j
        return i + 0.5 * step

    return float(crossing(1) - crossing(-1))


@dataclass
class StackStats:
    """What the metrics need of each stack of one set (all arrays of length N first)."""

    best: np.ndarray  # (N,) best plane
    curves: np.ndarray  # (N, Z) focus measure / its max
    peak: np.ndarray  # (N,) plane of the maximum
    width: np.ndarray  # (N,) FWHM in planes
    iou: np.ndarray  # (N, Z - 1) mean IoU of planes g apart, g = 1..Z-1

    @property
    def peak_offset(self) -> np.ndarray:
        return self.peak - self.best

    def take(self, rows: np.ndarray) -> StackStats:
        return StackStats(self.best[rows], self.curves[rows], self.peak[rows], self.width[rows], self.iou[rows])


def focus_curve(stack: np.ndarray) -> np.ndarray:
    """(Z, h, w, 3) → (Z,) focus measure divided by its maximum (zeros for a textureless stack)."""
    f = focus_measure(np.asarray(stack))
    top = float(f.max()) if len(f) else 0.0
    return f / top if top > 0 else np.zeros_like(f)


def mean_curve(stats: StackStats, planes: int) -> dict[str, Any]:
    """Mean normalised focus curve per offset from the best plane, −(Z−1) … Z−1 (null where no stack has it)."""
    offsets = np.arange(-(planes - 1), planes)
    total = np.zeros(len(offsets))
    count = np.zeros(len(offsets), np.int64)
    for b, c in zip(stats.best, stats.curves):
        k = np.arange(planes) - b + (planes - 1)
        total[k] += c
        count[k] += 1
    mean = [float(t / n) if n else None for t, n in zip(total, count)]
    return {"offsets": offsets.tolist(), "mean": mean, "n": count.tolist()}


# --------------------------------------------------------------------------- nucleus outline
def nucleus_mask(plane: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 → (h, w) bool: the Otsu-dark component at (or nearest) the centre (module docstring)."""
    import cv2
    from skimage.filters import threshold_otsu

    grey = cv2.GaussianBlur(cv2.cvtColor(np.ascontiguousarray(plane), cv2.COLOR_RGB2GRAY).astype(np.float32),
                            (0, 0), 1.0)
    h, w = grey.shape
    if float(grey.max() - grey.min()) < 1e-3:
        return np.zeros((h, w), bool)
    dark = (grey <= threshold_otsu(grey)).astype(np.uint8)
    _, labels = cv2.connectedComponents(dark, connectivity=8)
    cy, cx = h // 2, w // 2
    lab = int(labels[cy, cx])
    if lab == 0:
        ys, xs = np.nonzero(labels)
        if len(ys) == 0:
            return np.zeros((h, w), bool)
        k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        lab = int(labels[ys[k], xs[k]])
    return labels == lab


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def outline_ious(stack: np.ndarray) -> np.ndarray:
    """(Z, h, w, 3) → (Z − 1,) mean IoU of the nucleus masks of planes g apart, g = 1 … Z − 1."""
    masks = [nucleus_mask(p) for p in np.asarray(stack)]
    z = len(masks)
    return np.array([np.mean([iou(masks[i], masks[i + g]) for i in range(z - g)]) for g in range(1, z)])


def stack_stats(ss: StackSet) -> StackStats:
    """Focus curves and outline IoUs of every stack of a set (one stack in memory at a time)."""
    z = ss.planes
    n = len(ss)
    curves = np.zeros((n, z))
    ious = np.zeros((n, max(z - 1, 0)))
    for i in range(n):
        stack = np.asarray(ss.stacks[i])
        curves[i] = focus_curve(stack)
        ious[i] = outline_ious(stack)
    best = best_planes(ss)
    # the peak: of the planes at the maximum (ties within 1e-9), the one nearest the best plane
    at_max = curves >= curves.max(1, keepdims=True) - 1e-9
    dist = np.abs(np.arange(z)[None, :] - best[:, None]) + np.where(at_max, 0, 10 * z)
    peak = dist.argmin(1)
    width = np.array([half_width(c) for c in curves])
    return StackStats(best, curves, peak, width, ious)


# --------------------------------------------------------------------------- comparisons
def _f(x: Any) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def compare_focus(gen: StackStats, real: StackStats, planes: int) -> dict[str, Any]:
    from scipy.stats import ks_2samp

    g_curve, r_curve = mean_curve(gen, planes), mean_curve(real, planes)
    both = [(a, b) for a, b in zip(g_curve["mean"], r_curve["mean"]) if a is not None and b is not None]
    return {
        "ks_peak": _f(ks_2samp(gen.peak_offset, real.peak_offset).statistic),
        "ks_width": _f(ks_2samp(gen.width, real.width).statistic),
        "mean_peak_offset": _f(np.mean(gen.peak_offset)),
        "share_peak_at_best": _f(np.mean(gen.peak_offset == 0)),
        "mean_width": _f(np.mean(gen.width)),
        "curve_l1": _f(np.mean([abs(a - b) for a, b in both])) if both else None,
        "mean_curve": g_curve,
    }


def consistency(stats: StackStats) -> dict[str, Any]:
    per_gap = [_f(v) for v in stats.iou.mean(0)] if stats.iou.size else []
    return {"mean_iou": per_gap[0] if per_gap else None, "per_gap": per_gap}


def compare_consistency(gen: StackStats, real: StackStats) -> dict[str, Any]:
    g, r = consistency(gen), consistency(real)
    diff = None if g["mean_iou"] is None or r["mean_iou"] is None else abs(g["mean_iou"] - r["mean_iou"])
    return {**g, "diff_to_real": diff, "real_mean_iou": r["mean_iou"]}


# --------------------------------------------------------------------------- FID / KID per plane
def plane_offsets(planes: int) -> list[int]:
    """The focal offsets FID is computed at: those of a stack whose best plane is Z // 2."""
    return list(range(-(planes // 2), planes - planes // 2))


def _rows_at(best: np.ndarray, d: int, planes: int, cap: int, seed: int, tag: int) -> np.ndarray:
    rows = np.flatnonzero((best + d >= 0) & (best + d < planes))
    if len(rows) > cap:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(tag), int(d) + 1000]))
        rows = np.sort(rng.choice(rows, int(cap), replace=False))
    return rows


def _features(gev: Any, model: Any, ss: StackSet, best: np.ndarray, rows: np.ndarray, d: int, device: Any
              ) -> np.ndarray:
    out = []
    for k in range(0, len(rows), FID_BATCH):
        chunk = rows[k:k + FID_BATCH]
        imgs = np.stack([np.asarray(ss.stacks[int(i), int(best[i]) + d]) for i in chunk])
        out.append(gev.inception_features(model, imgs, device))
    return np.concatenate(out) if out else np.zeros((0, 0))


def _pair(gev: Any, fa: np.ndarray, fr: np.ndarray, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"fid": None, "kid": None, "kid_std": None, "n_generated": len(fa), "n_real": len(fr),
                           "skipped": None}
    if min(len(fa), len(fr)) < 2:
        out["skipped"] = f"FID/KID need at least 2 images per side, got {len(fa)} and {len(fr)}"
        return out
    try:
        out["fid"] = gev.frechet_distance(*gev.gaussian_fit(fa), *gev.gaussian_fit(fr))
    except ValueError as e:
        out["skipped"] = f"FID not computed: {e}"
    out["kid"], out["kid_std"] = gev.kernel_inception_distance(fa, fr, seed=seed)
    return out


def _fid_lists(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    fids = [p["fid"] for p in pairs]
    have = [f for f in fids if f is not None]
    return {"fid_per_plane": fids,
            "kid_per_plane": [None if p["kid"] is None else {"kid": p["kid"], "kid_std": p["kid_std"]}
                              for p in pairs],
            "fid_n": [[p["n_generated"], p["n_real"]] for p in pairs],
            "fid_mean": float(np.mean(have)) if have else None,
            "fid_skipped": next((p["skipped"] for p in pairs if p["skipped"]), None)}


def _fid_null(planes: int, reason: str) -> dict[str, Any]:
    return {"fid_per_plane": [None] * planes, "kid_per_plane": [None] * planes, "fid_n": None, "fid_mean": None,
            "fid_skipped": reason}


def fid_per_plane(real: StackSet, generated: Sequence[StackSet], half_a: np.ndarray, half_b: np.ndarray, *,
                  fid: bool = True, seed: int = 0, max_images: int = MAX_IMAGES, device: str = "auto",
                  threads: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """FID / KID per offset: one entry per generated set, the floor (B as generated vs A), the model's name."""
    import histosynth.gan.evaluate as gev

    z = real.planes
    if not fid:
        reason = "FID/KID not asked for (--no-fid)"
        return [_fid_null(z, reason) for _ in generated], _fid_null(z, reason), None
    try:
        path, model_name = gev.locate_inception()
        from histosynth.device import select_device

        dev = select_device(device, threads)
        model = gev.load_inception(path, dev)
    except gev.FidUnavailable as e:
        (log.info if "not installed" in str(e) else log.warning)("%s", e)
        return [_fid_null(z, str(e)) for _ in generated], _fid_null(z, str(e)), None
    r_best = best_planes(real)
    in_a = np.zeros(len(real), bool)
    in_a[half_a] = True
    per_gen: list[list[dict[str, Any]]] = [[] for _ in generated]
    floor: list[dict[str, Any]] = []
    for d in plane_offsets(z):
        r_rows = _rows_at(r_best, d, z, max_images, seed, 0)
        fr = _features(gev, model, real, r_best, r_rows, d, dev)
        a, b = in_a[r_rows], ~in_a[r_rows]
        floor.append(_pair(gev, fr[b], fr[a], seed))
        for k, gen in enumerate(generated):
            g_best = best_planes(gen)
            g_rows = _rows_at(g_best, d, z, max_images, seed, k + 1)
            per_gen[k].append(_pair(gev, _features(gev, model, gen, g_best, g_rows, d, dev), fr, seed))
    out = [_fid_lists(p) for p in per_gen]
    for o in out:
        o["fid_model"] = model_name
    fl = _fid_lists(floor)
    fl["fid_model"] = model_name
    return out, fl, model_name


# --------------------------------------------------------------------------- the stage
def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half A (the first ⌊n/2⌋ of a permutation seeded with ``seed``) and half B, each sorted."""
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF100])).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def evaluate_stacks(real_dir: str | os.PathLike, generated_dirs: Sequence[str | os.PathLike],
                    out_dir: str | os.PathLike, *, names: Sequence[str] | None = None, seed: int = 0,
                    fid: bool = True, max_images: int = MAX_IMAGES, device: str = "auto",
                    threads: int | None = None, montage_stacks: int = MONTAGE_STACKS) -> dict[str, Any]:
    """Score generated stack sets against real ones (module docstring); writes the three outputs, returns the
    evaluation."""
    if not generated_dirs:
        raise HistosynthError("no generated stack sets given")
    names = list(names) if names else [Path(p).name or str(p) for p in generated_dirs]
    if len(names) != len(generated_dirs):
        raise HistosynthError(f"{len(names)} --names for {len(generated_dirs)} generated stack sets")
    if len(set(names)) != len(names):
        raise HistosynthError(f"the generated sets' names must differ, got {names} (use --names)")
    real = open_real(real_dir)
    gens = [open_generated(p, real) for p in generated_dirs]
    z = real.planes
    half_a, half_b = split_halves(len(real), seed)
    log.info("real %s: %d stacks of %d planes; floor: halves of %d and %d stacks (seed %d)", real.path, len(real),
             z, len(half_a), len(half_b), seed)
    r_stats = stack_stats(real)
    g_stats = [stack_stats(g) for g in gens]
    a_stats, b_stats = r_stats.take(half_a), r_stats.take(half_b)
    fids, fid_floor, model = fid_per_plane(real, gens, half_a, half_b, fid=fid, seed=seed, max_images=max_images,
                                           device=device, threads=threads)
    result: dict[str, Any] = {
        "real": {"path": str(real.path), "n": len(real), "planes": z, "size": list(real.size),
                 "plane_offsets_um": real.plane_offsets_um, "fid_offsets": plane_offsets(z),
                 "focus": {"mean_curve": mean_curve(r_stats, z), "mean_width": _f(np.mean(r_stats.width)),
                           "share_peak_at_best": _f(np.mean(r_stats.peak_offset == 0))},
                 "consistency": consistency(r_stats)},
        "floor": {"n_a": len(half_a), "n_b": len(half_b), "seed": int(seed), **fid_floor,
                  "focus": compare_focus(b_stats, a_stats, z),
                  "consistency": compare_consistency(b_stats, a_stats)},
        "generated": {},
        "fid_model": model,
        "settings": {"seed": int(seed), "fid": bool(fid), "max_images": int(max_images)},
        "definitions": {
            "planes": "focal offset from each stack's best_plane; FID at offsets -Z//2 .. Z-1-Z//2",
            "floor": "real half B scored against real half A (seeded permutation), as a generated set vs all real",
            "focus_curve": "variance of the Laplacian per plane / the stack's max; peak offset = argmax - best_plane;"
                           " width = FWHM in planes (linear interpolation; half a plane past an end)",
            "consistency": "Otsu-dark component at the centre per plane (grey, sigma 1); IoU of planes g apart; "
                           "mean_iou = g 1",
        },
    }
    for name, gen, stats, f in zip(names, gens, g_stats, fids):
        result["generated"][name] = {"path": str(gen.path), "n": len(gen), **f,
                                     "focus": compare_focus(stats, r_stats, z),
                                     "consistency": compare_consistency(stats, r_stats)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(table(result)))
    montage(real, dict(zip(names, gens)), out_dir / "montage.png", per_set=montage_stacks, seed=seed)
    for name, g in result["generated"].items():
        log.info("%s: FID mean %s, KS peak %.3f, KS width %.3f, IoU %.3f (real %.3f)", name, g["fid_mean"],
                 g["focus"]["ks_peak"], g["focus"]["ks_width"], g["consistency"]["mean_iou"] or 0.0,
                 g["consistency"]["real_mean_iou"] or 0.0)
    return result


def _cell(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def table(result: dict[str, Any]) -> str:
    """One markdown row per generated set and one for the real-vs-real floor."""
    head = ("| set | n | FID (mean over planes) | KS peak | KS width | curve L1 | IoU (gap 1) | |ΔIoU| to real |\n"
            "|---|---|---|---|---|---|---|---|\n")
    rows = []
    fl = result["floor"]
    for name, g in [*result["generated"].items(), ("real-vs-real floor", fl)]:
        n = g["n"] if "n" in g else f"{fl['n_b']} vs {fl['n_a']}"
        rows.append(f"| {name} | {n} | {_cell(g['fid_mean'], '.2f')} | {_cell(g['focus']['ks_peak'])} | "
                    f"{_cell(g['focus']['ks_width'])} | {_cell(g['focus']['curve_l1'])} | "
                    f"{_cell(g['consistency']['mean_iou'])} | {_cell(g['consistency']['diff_to_real'])} |")
    skipped = next((g["fid_skipped"] for g in [*result["generated"].values(), fl] if g["fid_skipped"]), None)
    note = f"\nFID: {skipped}\n" if skipped and all(g["fid_mean"] is None for g in result["generated"].values()) \
        else ""
    return head + "\n".join(rows) + "\n" + note


def montage(real: StackSet, generated: dict[str, StackSet], out_png: str | os.PathLike, *, per_set: int = 4,
            seed: int = 0) -> None:
    """A few stacks per set (drawn by seed), one row each, planes as columns (lowest focal offset left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histosynth.figures import save_figure

    rows, labels = [], []
    for k, (name, ss) in enumerate([("real", real), *generated.items()]):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x3017, k]))
        pick = np.sort(rng.choice(len(ss), min(per_set, len(ss)), replace=False))
        for i in pick:
            rows.append(np.asarray(ss.stacks[int(i)]))
            labels.append(f"{name} #{int(i)} (best {int(ss.index['best_plane'].iloc[int(i)])})")
    z, h, w = rows[0].shape[:3]
    img = np.full((len(rows) * (h + 2), z * (w + 2), 3), 255, np.uint8)
    for r, stack in enumerate(rows):
        for c in range(z):
            img[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = stack[c]
    fig, ax = plt.subplots(figsize=(max(4.0, img.shape[1] / 40 + 2), max(2.0, img.shape[0] / 40 + 0.5)))
    ax.imshow(img, interpolation="nearest")
    ax.set_yticks([r * (h + 2) + h / 2 for r in range(len(rows))], labels, fontsize=6)
    ax.set_xticks([c * (w + 2) + w / 2 for c in range(z)], [str(c) for c in range(z)], fontsize=6)
    ax.set_xlabel("plane")
    ax.set_title("real and generated stacks, plane by plane", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
