"""Benchmark: HoVer-Net post-processing (histosynth.models.hovernet.postprocess).

(a) Speed. A synthetic 1000 x 1000 tile with ~900 nuclei (jittered ellipses,
radius 4-11 px, a third of them in touching clusters; labels grown by 2 px so
that neighbours touch) is turned into its perfect HoVer-Net outputs (NP
probability = 1 inside nuclei, HV = the training targets,
``hovernet_targets``) and ``postprocess`` is timed, best of ``--repeats``,
against the 0.15 s target. For comparison it also times a plain transcription
of the official ``__proc_np_hv`` (scipy label / binary_fill_holes, skimage
remove_small_objects, one skimage watershed over the whole tile, CV_64F
Sobel) and reports how far the two outputs agree (PQ of one against the
other, fraction of identical pixels after matching ids).

(b) Sanity on real outlines. For every MoNuSeg training tile
(``<data>/monuseg-train``: 1000 x 1000, ImageScope XML), the instance map is
rasterised with histosynth's own reader and rasteriser
(``histosynth.io.annotations.read`` + ``histosynth.patches.rasterize.rasterize_tile``),
its perfect NP / HV maps are post-processed, and the result is scored against
the instance map with ``histosynth.segmentation.metrics.instance_metrics`` (PQ, DQ, SQ,
AJI, counts). Target: PQ >= 0.9 on each tile.

    python benchmarks/postprocess.py --repeats 7 --out benchmarks/out/postprocess.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 0.15
TARGET_PQ = 0.9


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def synthetic_tile(n: int = 900, size: int = 1000, seed: int = 0) -> np.ndarray:
    """~``n`` jittered ellipses, a third in touching clusters, painted on background only, grown 2 px."""
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    centres = np.zeros((0, 2))
    radii = np.zeros(0)
    k = 0
    n_clusters = max(1, n // 30)
    cluster_centres = rng.uniform(0.05 * size, 0.95 * size, (n_clusters, 2))
    tries = 0
    while k < n and tries < 50 * n:
        tries += 1
        r = rng.uniform(4, 11)
        if rng.random() < 1 / 3:
            c = cluster_centres[rng.integers(n_clusters)] + rng.normal(0, 25, 2)
        else:
            c = rng.uniform(0, size, 2)
        if len(centres):
            d = np.hypot(*(centres - c).T)
            if (d < 0.9 * (radii + r)).any():
                continue
        aspect = rng.uniform(0.6, 1.0)
        mask = np.zeros_like(inst, np.uint8)
        cv2.ellipse(mask, (int(round(c[0])), int(round(c[1]))), (int(round(r)), max(2, int(round(r * aspect)))),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
        free = (mask > 0) & (inst == 0)
        if free.sum() < 20:
            continue
        k += 1
        inst[free] = k
        centres = np.vstack([centres, c])
        radii = np.append(radii, r)
    inst = expand_labels(inst, 2).astype(np.int32)
    # a nucleus cut into pieces by its neighbours keeps only its largest piece
    from scipy import ndimage

    out = np.zeros_like(inst)
    nid = 0
    for i, sl in enumerate(ndimage.find_objects(inst), start=1):
        if sl is None:
            continue
        lab, m = ndimage.label(inst[sl] == i)
        if m == 0:
            continue
        keep = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        nid += 1
        out[sl][keep] = nid
    return out


def monuseg_instances(data: Path) -> dict[str, np.ndarray]:
    from histosynth.io.annotations import read
    from histosynth.patches.rasterize import rasterize_tile

    out = {}
    for xml in sorted((data / "monuseg-train" / "annotations").glob("*.xml")):
        aset = read(xml, slide_size=(1000, 1000))
        polys = [nuc.polygon for nuc in aset.nuclei]
        inst, _, _ = rasterize_tile(polys, [1] * len(polys), 0, 0, 1.0, 1000, 1000)
        out[xml.stem] = inst
    return out


def perfect_outputs(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from histosynth.models.hovernet import hovernet_targets

    t = hovernet_targets(inst)
    return t["np"].astype(np.float32), t["hv"]


# --------------------------------------------------------------------------- #
# the plain transcription of the official __proc_np_hv, for timing and agreement
# --------------------------------------------------------------------------- #
def _remove_small_objects(lab: np.ndarray, min_size: int) -> np.ndarray:
    """skimage's remove_small_objects dropping components under ``min_size`` px (0.26 renamed the argument)."""
    from skimage.morphology import remove_small_objects

    try:
        return remove_small_objects(lab, max_size=min_size - 1)
    except TypeError:
        return remove_small_objects(lab, min_size=min_size)


def reference_postprocess(np_prob: np.ndarray, hv: np.ndarray, sobel_size: int = 21) -> np.ndarray:
    from scipy import ndimage
    from skimage.segmentation import watershed

    blb = ndimage.label((np_prob >= 0.5).astype(np.int32))[0]
    blb = _remove_small_objects(blb, 10)
    blb = (blb > 0).astype(np.int32)
    h = cv2.normalize(hv[0], None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    v = cv2.normalize(hv[1], None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sh = cv2.Sobel(h, cv2.CV_64F, 1, 0, ksize=sobel_size)
    sv = cv2.Sobel(v, cv2.CV_64F, 0, 1, ksize=sobel_size)
    sh = 1 - cv2.normalize(sh, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sv = 1 - cv2.normalize(sv, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    overall = np.maximum(sh, sv) - (1 - blb)
    overall[overall < 0] = 0
    dist = -cv2.GaussianBlur((1.0 - overall) * blb, (3, 3), 0)
    marker = blb - (overall >= 0.4).astype(np.int32)
    marker[marker < 0] = 0
    marker = ndimage.binary_fill_holes(marker).astype(np.uint8)
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    marker = _remove_small_objects(ndimage.label(marker)[0], 10)
    return watershed(dist, marker, mask=blb)


def same_partition(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels whose (a, b) id pair is the dominant pair of its a id (1.0 = identical partitions)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    ai, bi = ai.ravel(), bi.ravel()
    nb = int(bi.max()) + 1
    table = np.bincount(ai.astype(np.int64) * nb + bi, minlength=(int(ai.max()) + 1) * nb).reshape(-1, nb)
    return float(table.max(1).sum() / ai.size)


def best_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


# --------------------------------------------------------------------------- #
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-nuclei", type=int, default=900)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sobel-size", type=int, default=21)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("HISTOSYNTH_SHARED_DATA",
                                                                     REPO.parent / "shared" / "data")))
    ap.add_argument("--no-reference", action="store_true", help="skip the official-style reference")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    logging.getLogger("histosynth").setLevel(logging.ERROR)  # the annotation reader's per-file repair summaries
    from histosynth.segmentation.metrics import instance_metrics
    from histosynth.models.hovernet import postprocess

    result: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "cv2_threads": cv2.getNumThreads(),
                    "target_seconds": TARGET_S, "target_pq": TARGET_PQ, "sobel_size": args.sobel_size}

    # (a) speed on a synthetic tile
    inst = synthetic_tile(args.n_nuclei, args.size, args.seed)
    n_true = int(inst.max())
    t0 = time.perf_counter()
    np_prob, hv = perfect_outputs(inst)
    t_targets = time.perf_counter() - t0
    postprocess(np_prob, hv, sobel_size=args.sobel_size)  # warm-up (imports)
    best, times = best_time(lambda: postprocess(np_prob, hv, sobel_size=args.sobel_size), args.repeats)
    pred, _ = postprocess(np_prob, hv, sobel_size=args.sobel_size)
    m = instance_metrics(pred, inst)
    synth = {"size": args.size, "n_true": n_true, "n_pred": m["n_pred"], "pq": m["pq"], "dq": m["dq"],
             "sq": m["sq"], "targets_seconds": t_targets, "best_seconds": best,
             "median_seconds": float(np.median(times)),
             "times": times, "meets_target": best <= TARGET_S}
    if not args.no_reference:
        reference_postprocess(np_prob, hv, args.sobel_size)
        rbest, rtimes = best_time(lambda: reference_postprocess(np_prob, hv, args.sobel_size), args.repeats)
        ref = reference_postprocess(np_prob, hv, args.sobel_size)
        synth.update({"reference_best_seconds": rbest, "reference_median_seconds": float(np.median(rtimes)),
                      "speedup": rbest / best, "reference_pq": instance_metrics(ref, inst)["pq"],
                      "pq_vs_reference": instance_metrics(pred, ref)["pq"],
                      "same_partition_vs_reference": same_partition(pred, ref)})
    result["synthetic"] = synth

    # (b) MoNuSeg
    tiles = {}
    if (args.data / "monuseg-train" / "annotations").is_dir():
        for name, true in monuseg_instances(args.data).items():
            npp, hvm = perfect_outputs(true)
            t = time.perf_counter()
            pred, _ = postprocess(npp, hvm, sobel_size=args.sobel_size)
            secs = time.perf_counter() - t
            mm = instance_metrics(pred, true)
            tiles[name] = {k: mm[k] for k in ("pq", "dq", "sq", "aji", "dice", "n_true", "n_pred", "tp", "fp", "fn")}
            tiles[name]["seconds"] = secs
        pqs = np.array([r["pq"] for r in tiles.values()])
        result["monuseg"] = {"tiles": tiles, "mean_pq": float(pqs.mean()), "min_pq": float(pqs.min()),
                             "n_tiles": len(tiles), "all_meet_target": bool((pqs >= TARGET_PQ).all())}
    else:
        result["monuseg"] = None

    # report
    print(f"postprocess on a {args.size}x{args.size} tile, {n_true} nuclei (perfect NP/HV), "
          f"best of {args.repeats}, cv2 threads {cv2.getNumThreads()}")
    print(f"  {'method':<28}{'best s':>9}{'median s':>10}{'PQ':>8}")
    print(f"  {'histosynth postprocess':<28}{synth['best_seconds']:>9.3f}{synth['median_seconds']:>10.3f}"
          f"{synth['pq']:>8.4f}   target <= {TARGET_S} s: {'yes' if synth['meets_target'] else 'NO'}")
    if "reference_best_seconds" in synth:
        print(f"  {'official-style reference':<28}{synth['reference_best_seconds']:>9.3f}"
              f"{synth['reference_median_seconds']:>10.3f}{synth['reference_pq']:>8.4f}")
        print(f"  speed-up {synth['speedup']:.2f}x; agreement with the reference: PQ {synth['pq_vs_reference']:.4f}, "
              f"identical partition on {100 * synth['same_partition_vs_reference']:.3f} % of pixels")
    if tiles:
        print(f"\nMoNuSeg training tiles, perfect NP/HV -> postprocess (target PQ >= {TARGET_PQ})")
        print(f"  {'tile':<26}{'n_true':>7}{'n_pred':>7}{'PQ':>8}{'DQ':>8}{'SQ':>8}{'AJI':>8}{'s':>7}")
        for name, r in tiles.items():
            print(f"  {name:<26}{r['n_true']:>7}{r['n_pred']:>7}{r['pq']:>8.4f}{r['dq']:>8.4f}{r['sq']:>8.4f}"
                  f"{r['aji']:>8.4f}{r['seconds']:>7.3f}")
        mo = result["monuseg"]
        print(f"  mean PQ {mo['mean_pq']:.4f}, min PQ {mo['min_pq']:.4f}; all >= {TARGET_PQ}: {mo['all_meet_target']}")
    else:
        print(f"\nMoNuSeg not found under {args.data}; part (b) skipped")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
