"""Benchmark: instance-segmentation metrics (Dice, AJI, AJI+, DQ/SQ/PQ) on one large tile.

Builds a realistic 1000x1000 GT instance map with ~900 nuclei (jittered
ellipses on a jittered grid, drawn in random order so that neighbours touch
and later nuclei cut earlier ones) and a perturbed prediction: most nuclei
shifted by 0-2 px and eroded or dilated by one pixel, a few split in two,
merged with a neighbour, missing, or added as false positives. Then times,
in one run and on the same maps:

* ``histosynth.segmentation.metrics.instance_metrics`` (all metrics together; best of
  ``--repeats``) against the 0.15 s target;
* ``MetricAccumulator.add`` with per-pixel type maps (4 classes): the
  instance metrics plus the per-class counts of mPQ / mPQ+;
* a naive per-instance loop reference in the style of HoVer-Net's
  ``get_fast_pq`` / ``get_fast_aji`` / ``get_fast_aji_plus`` (boolean mask per
  instance, pairwise IoU matrix filled in a Python loop, dense
  ``linear_sum_assignment``) - the peer; its results are checked against ours.

With ``--monuseg`` (default: on when the shared data folder has it), the same
on a real MoNuSeg tile: its rasterised GT instance map against a perturbed
copy.

    OMP_NUM_THREADS=1 python benchmarks/metrics.py --out results/bench-metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from histosynth.segmentation.metrics import MetricAccumulator, instance_metrics

REPO = Path(__file__).resolve().parents[1]

TARGET_S = 0.15
KEYS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def make_gt(size: int = 1000, n_side: int = 30, seed: int = 0) -> np.ndarray:
    """~n_side**2 jittered ellipses on a jittered grid, drawn in random order (int32, ids 1..n)."""
    rng = np.random.default_rng(seed)
    cell = size / n_side
    gy, gx = np.mgrid[0:n_side, 0:n_side]
    cy = ((gy + 0.5) * cell + rng.uniform(-0.3, 0.3, gy.shape) * cell).ravel()
    cx = ((gx + 0.5) * cell + rng.uniform(-0.3, 0.3, gx.shape) * cell).ravel()
    n = len(cy)
    ax1 = rng.uniform(5, 13, n)
    ax2 = ax1 * rng.uniform(0.55, 1.0, n)
    ang = rng.uniform(0, 180, n)
    inst = np.zeros((size, size), np.int32)
    for k, i in enumerate(rng.permutation(n), start=1):
        cv2.ellipse(inst, (int(round(cx[i])), int(round(cy[i]))), (int(ax1[i]), int(ax2[i])), float(ang[i]),
                    0, 360, k, -1)
    ids, inv = np.unique(inst, return_inverse=True)
    return inv.reshape(inst.shape).astype(np.int32)  # contiguous ids (some nuclei fully hidden)


def perturb(gt: np.ndarray, seed: int = 1, p_split: float = 0.05, p_merge: float = 0.05,
            p_miss: float = 0.05, p_extra: float = 0.05) -> np.ndarray:
    """A plausible prediction of ``gt``: shifted / eroded / dilated nuclei, splits, merges, misses, extras."""
    rng = np.random.default_rng(seed)
    h, w = gt.shape
    n = int(gt.max())
    pred = np.zeros_like(gt)
    next_id = n + 1
    slices = ndi.find_objects(gt)
    se = np.ones((3, 3), bool)
    for i, sl in enumerate(slices, start=1):
        if sl is None or rng.random() < p_miss:
            continue
        y0, y1 = max(sl[0].start - 4, 0), min(sl[0].stop + 4, h)
        x0, x1 = max(sl[1].start - 4, 0), min(sl[1].stop + 4, w)
        m = gt[y0:y1, x0:x1] == i
        r = rng.random()
        if r < 0.3:
            m = ndi.binary_erosion(m, se) if m.sum() > 30 else m
        elif r < 0.6:
            m = ndi.binary_dilation(m, se)
        dy, dx = rng.integers(-2, 3, 2)
        m = np.roll(m, (dy, dx), axis=(0, 1))
        region = pred[y0:y1, x0:x1]
        take = m & (region == 0)
        region[take] = i
        if rng.random() < p_split:
            ys, xs = np.nonzero(take)
            if len(ys) > 10:
                a = rng.uniform(0, np.pi)
                side = (ys - ys.mean()) * np.cos(a) + (xs - xs.mean()) * np.sin(a) > 0
                region[ys[side], xs[side]] = next_id
                next_id += 1
    # merges: relabel some nuclei to the id of a touching neighbour
    right = (pred[:, :-1] != pred[:, 1:]) & (pred[:, :-1] > 0) & (pred[:, 1:] > 0)
    a, b = pred[:, :-1][right], pred[:, 1:][right]
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0)
    pick = pairs[rng.random(len(pairs)) < p_merge * n / max(len(pairs), 1)]
    lut = np.arange(next_id + 1 + int(p_extra * n) + 1)
    for x, y in pick:
        lut[lut == y] = lut[x]
    # extras: small blobs in the background
    for _ in range(int(p_extra * n)):
        cy, cx = rng.integers(10, h - 10), rng.integers(10, w - 10)
        blob = np.zeros((h, w), np.uint8)
        cv2.circle(blob, (int(cx), int(cy)), int(rng.integers(3, 8)), 1, -1)
        pred[(blob > 0) & (pred == 0)] = next_id
        next_id += 1
    return lut[pred].astype(np.int32)


def monuseg_gt(shared: Path) -> tuple[str, np.ndarray] | None:
    """The rasterised GT instance map of one MoNuSeg tile, or None without the data."""
    ann = shared / "monuseg-train" / "annotations"
    files = sorted(ann.glob("*.xml")) if ann.is_dir() else []
    if not files:
        return None
    from histosynth.io.annotations import read
    from histosynth.patches.rasterize import rasterize_tile

    path = files[0]
    aset = read(path, slide_size=(1000, 1000))
    polys = [n.polygon for n in aset.nuclei]
    inst, _, _ = rasterize_tile(polys, [1] * len(polys), 0, 0, 1.0, 1000, 1000)
    return path.stem, np.asarray(inst, np.int32)


# --------------------------------------------------------------------------- #
# naive reference (HoVer-Net compute_stats style: loops over instances)
# --------------------------------------------------------------------------- #
def naive_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Per-instance loops with boolean masks, as the official HoVer-Net metrics (non-degenerate maps)."""
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [i for i in np.unique(pred) if i]
    t_masks = [true == i for i in t_ids]
    p_masks = [pred == i for i in p_ids]
    p_pos = {pid: k for k, pid in enumerate(p_ids)}
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros((len(t_ids), len(p_ids)))
    for a, tm in enumerate(t_masks):
        for pid in np.unique(pred[tm]):
            if pid == 0:
                continue
            b = p_pos[pid]
            pm = p_masks[b]
            inter[a, b] = (tm & pm).sum()
            union[a, b] = (tm | pm).sum()
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    t_area = np.array([m.sum() for m in t_masks], float)
    p_area = np.array([m.sum() for m in p_masks], float)
    # PQ
    ti, pj = np.nonzero(iou > 0.5)
    tp = len(ti)
    dq = tp / (tp + 0.5 * (len(p_ids) - tp) + 0.5 * (len(t_ids) - tp))
    sq = iou[ti, pj].sum() / tp if tp else 0.0
    # AJI
    best = iou.argmax(axis=1)
    has = iou.max(axis=1) > 0
    rows = np.flatnonzero(has)
    used = np.zeros(len(p_ids), bool)
    used[best[rows]] = True
    aji = inter[rows, best[rows]].sum() / (union[rows, best[rows]].sum() + t_area[~has].sum() + p_area[~used].sum())
    # AJI+
    r, c = linear_sum_assignment(-iou)
    keep = iou[r, c] > 0
    r, c = r[keep], c[keep]
    mt = np.zeros(len(t_ids), bool)
    mt[r] = True
    mp = np.zeros(len(p_ids), bool)
    mp[c] = True
    aji_plus = inter[r, c].sum() / (union[r, c].sum() + t_area[~mt].sum() + p_area[~mp].sum())
    dice = 2 * ((true > 0) & (pred > 0)).sum() / ((true > 0).sum() + (pred > 0).sum())
    return {"dice": dice, "aji": aji, "aji_plus": aji_plus, "dq": dq, "sq": sq, "pq": dq * sq}


# --------------------------------------------------------------------------- #
def best_of(fn, repeats: int) -> tuple[float, object]:
    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def type_maps(pred: np.ndarray, true: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel type maps: a random class 1..4 per GT nucleus; predictions take their GT's class 80 % of the time."""
    rng = np.random.default_rng(seed)
    t_of = rng.integers(1, 5, int(true.max()) + 1).astype(np.uint8)
    true_types = np.where(true > 0, t_of[true], 0).astype(np.uint8)
    p_of = rng.integers(1, 5, int(pred.max()) + 1).astype(np.uint8)
    keep = rng.random(int(pred.max()) + 1) < 0.8
    flip = keep[pred]
    pred_types = np.where(pred > 0, np.where(flip & (true > 0), true_types, p_of[pred]), 0).astype(np.uint8)
    return pred_types, true_types


def bench_pair(name: str, pred: np.ndarray, true: np.ndarray, repeats: int, naive_repeats: int) -> dict:
    t_ours, ours = best_of(lambda: instance_metrics(pred, true), repeats)
    pt, tt = type_maps(pred, true)
    t_typed, _ = best_of(lambda: MetricAccumulator().add(pred, true, pt, tt), repeats)
    t_naive, ref = best_of(lambda: naive_metrics(pred, true), naive_repeats)
    diff = max(abs(ours[k] - ref[k]) for k in KEYS)
    return {
        "name": name,
        "shape": list(true.shape),
        "n_true": ours["n_true"],
        "n_pred": ours["n_pred"],
        "ours_s": t_ours,
        "ours_typed_s": t_typed,
        "naive_s": t_naive,
        "speedup": t_naive / t_ours,
        "target_s": TARGET_S,
        "meets_target": t_ours <= TARGET_S,
        "max_abs_diff_vs_naive": diff,
        "metrics": {k: float(ours[k]) for k in (*KEYS, "tp", "fp", "fn")},
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'map':<34}{'n_true':>7}{'n_pred':>7}{'ours s':>9}{'+types s':>9}{'naive s':>9}{'speedup':>9}"
          f"{'target':>8}{'max|diff|':>11}")
    for r in rows:
        ok = "ok" if r["meets_target"] else "MISS"
        print(f"{r['name']:<34}{r['n_true']:>7}{r['n_pred']:>7}{r['ours_s']:>9.4f}{r['ours_typed_s']:>9.4f}"
              f"{r['naive_s']:>9.2f}"
              f"{r['speedup']:>8.0f}x{ok:>8}{r['max_abs_diff_vs_naive']:>11.1e}")
    for r in rows:
        m = r["metrics"]
        print(f"  {r['name']}: " + ", ".join(f"{k} {m[k]:.4f}" for k in KEYS)
              + f", tp {m['tp']:.0f} fp {m['fp']:.0f} fn {m['fn']:.0f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--n-side", type=int, default=30, help="nuclei grid side (n_side**2 nuclei)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7, help="best of this many runs of instance_metrics")
    ap.add_argument("--naive-repeats", type=int, default=1)
    ap.add_argument("--monuseg", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a real MoNuSeg tile when the shared data has it")
    ap.add_argument("--shared-data", type=Path,
                    default=Path(os.environ.get("HISTOSYNTH_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    gt = make_gt(args.size, args.n_side, args.seed)
    pred = perturb(gt, args.seed + 1)
    rows = [bench_pair(f"synthetic {args.size}x{args.size}", pred, gt, args.repeats, args.naive_repeats)]
    if args.monuseg:
        real = monuseg_gt(args.shared_data)
        if real is None:
            print(f"(no MoNuSeg data under {args.shared_data}: real tile skipped)")
        else:
            name, inst = real
            rows.append(bench_pair(f"MoNuSeg {name[:20]}", perturb(inst, args.seed + 2), inst, args.repeats,
                                   args.naive_repeats))
    print_table(rows)
    results = {"threads": os.environ.get("OMP_NUM_THREADS"), "target_s": TARGET_S, "runs": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
