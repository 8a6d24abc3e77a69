"""Benchmark: sampling synthetic nuclei masks (histosynth.masks.sampling) on one core.

Times ``sample_masks`` for N (default 200) masks of 256 x 256 px with about 50
nuclei each, on one core (OMP_NUM_THREADS=1, torch.set_num_threads(1)),
writing the patch set to a temporary directory, with the per-step breakdown
the sampler records: count draws, shape decoding (incl. cleaning), resize /
rotate, the spatial field, placement, writing. Target: >= 20 masks/s.

The statistics come from ``--stats`` (a stats.json) or, by default, from a toy
real set made here: 24 patches of 256 x 256 with ~50 non-overlapping ellipses
of three types (type 1 clustered in nests, types 2 and 3 scattered), fitted
with ``fit_stats`` (2 calibration rounds). Its total count is rescaled so that
the masks carry ~50 nuclei.

The shape source, in order of preference: the trained β-VAE at ``--dvae``; a
fresh, untrained ``DVAE`` (same architecture, same decoding cost) when
``histosynth.models.dvae`` imports; else fitted ellipses. The output says which.
With a DVAE it also times the plain ``model.decode`` path (``--no-fast``
semantics) on the same latents, to show what the fast decoder buys.

    OMP_NUM_THREADS=1 python benchmarks/sample_masks.py --n 200 --out benchmarks/out/sample_masks.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

cv2.setNumThreads(1)


def toy_real_set(path: Path, n_patches: int = 24, size: int = 256, seed: int = 0) -> Path:
    """Non-overlapping ellipses: type 1 in two nests per patch, types 2 and 3 anywhere (~50 nuclei)."""
    from histosynth.io.patchset import PatchSetWriter

    rng = np.random.default_rng(seed)
    cols = {1: "n_epithelial", 2: "n_lymphocyte", 3: "n_spindle"}
    radius = {1: (5.5, 7.5), 2: (3.5, 4.5), 3: (2.5, 3.5)}
    elong = {1: 1.3, 2: 1.1, 3: 2.8}
    with PatchSetWriter(path, ("inst", "types"), (size, size), extra_columns=tuple(cols.values())) as w:
        for i in range(n_patches):
            inst = np.zeros((size, size), np.int32)
            typ = np.zeros((size, size), np.uint8)
            nests = rng.uniform(0.2 * size, 0.8 * size, (2, 2))
            want = {1: int(rng.integers(15, 35)), 2: int(rng.integers(8, 20)), 3: int(rng.integers(5, 12))}
            nid = 0
            for t, n in want.items():
                for _ in range(n):
                    for _try in range(100):
                        if t == 1:
                            cy, cx = nests[rng.integers(2)] + rng.normal(0, size / 10, 2)
                        else:
                            cy, cx = rng.uniform(0, size, 2)
                        r = rng.uniform(*radius[t])
                        one = np.zeros((size, size), np.uint8)
                        cv2.ellipse(one, (int(cx), int(cy)), (int(round(r * elong[t])), int(round(r))),
                                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
                        if not one.any() or np.any(inst[one > 0]):
                            continue
                        nid += 1
                        inst[one > 0] = nid
                        typ[one > 0] = t
                        break
            row = {"slide": "toy", "x": i * size, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5, "width": size,
                   "height": size, "tissue_fraction": 1.0, "n_nuclei": nid, "source": "benchmark"}
            row.update({c: int(len(np.unique(inst[typ == t]))) for t, c in cols.items()})
            w.add(row, inst=inst, types=typ)
        w.report = {"classes": {str(t): c[2:].capitalize() for t, c in cols.items()}}  # {"1": "Epithelial", ...}
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="masks to sample (default 200)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--nuclei", type=float, default=50.0, help="mean nuclei per mask (default 50)")
    ap.add_argument("--stats", help="a stats.json to sample from (default: fit a toy set)")
    ap.add_argument("--dvae", help="a trained dvae.pt (default: an untrained DVAE, else ellipses)")
    ap.add_argument("--ellipses", action="store_true", help="use the ellipse shape source")
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="FastDecoder arithmetic (auto: bfloat16 where the CPU has it natively)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from histosynth.masks.counts import scale_counts
    from histosynth.masks.sampling import sample_masks
    from histosynth.masks.shapes import FastDecoder, dvae_source, ellipse_source
    from histosynth.masks.stats import fit_stats
    from histosynth.masks.statsfile import load_stats

    tmp = Path(tempfile.mkdtemp(prefix="bench-sample-masks-"))
    t0 = time.perf_counter()
    if args.stats:
        stats = load_stats(args.stats)
        stats_from = args.stats
    else:
        real = toy_real_set(tmp / "real", size=args.size)
        stats = fit_stats([real], tmp / "stats", class_names={1: "Epithelial", 2: "Lymphocyte", 3: "Spindle"},
                          calibrate=2, calibrate_masks=16, figures=False)
        stats_from = "toy set (24 patches, 3 types, nests)"
    fit_seconds = time.perf_counter() - t0
    # rescale the total count so that masks of --size carry about --nuclei nuclei
    ph, pw = stats["patch_size"]
    mean_here = stats["counts"]["total"]["mean"] * args.size * args.size / float(ph * pw)
    if mean_here > 0:
        factor = args.nuclei / mean_here
        stats = dict(stats)
        stats["counts"] = {k: scale_counts(v, factor) for k, v in stats["counts"].items()}

    source_name, fast = "ellipses", None
    if args.ellipses:
        source = ellipse_source(stats)
    else:
        try:
            from histosynth.models import dvae as dvae_mod
        except ImportError:
            dvae_mod = None
        if args.dvae and dvae_mod is not None:
            model = dvae_mod.load_dvae(args.dvae, device="cpu")
            source_name = f"trained DVAE {args.dvae}"
        elif dvae_mod is not None:
            torch.manual_seed(0)
            model = dvae_mod.define_dvae(classes={int(k): v for k, v in stats["classes"].items()}).eval()
            source_name = "untrained DVAE (fresh weights; same decoding cost as a trained one)"
        else:
            model = None
            source = ellipse_source(stats)
            source_name = "ellipses (histosynth.models.dvae not importable)"
        if model is not None:
            fast = FastDecoder.build(model, args.precision) is not None
            source = dvae_source(model, 0.5, precision=args.precision)

    rep = sample_masks(stats, source, args.n, args.size, args.seed, out_dir=tmp / "masks", batch=args.batch,
                       source_name=source_name)
    seconds = rep["seconds"]
    result = {
        "masks": args.n, "size": args.size, "nuclei_per_mask": rep["nuclei"] / args.n, "dropped": rep["dropped"],
        "seconds": seconds, "masks_per_second": args.n / seconds, "target_masks_per_second": 20.0,
        "meets_target": args.n / seconds >= 20.0, "timings": rep["timings"], "shape_source": source_name,
        "fast_decoder": fast, "decoder": getattr(source, "info", {}).get("decoder"), "stats": stats_from,
        "fit_seconds": round(fit_seconds, 2),
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg()},
    }
    if fast is not None and model is not None:  # the plain decode on the same number of shapes
        n_shapes = int(rep["nuclei"] + rep["dropped"])
        t = time.perf_counter()
        kinds = np.array(sorted(model.classes), dtype=np.int64) if model.conditional else None
        shape_types = None if kinds is None else kinds[np.arange(n_shapes) % len(kinds)]
        dvae_source(model, 0.5, fast=False)(n_shapes, shape_types, np.random.default_rng(0))
        plain = time.perf_counter() - t
        result["plain_decode_seconds"] = round(plain, 3)
        result["masks_per_second_with_plain_decode"] = args.n / (seconds - rep["timings"]["decode"] + plain)

    decoder = f" (decoder: {result['decoder']})" if fast is not None else ""
    print(f"shape source: {source_name}{decoder}")
    print(f"stats: {stats_from}; {args.n} masks of {args.size}x{args.size}, "
          f"{result['nuclei_per_mask']:.1f} nuclei per mask, {rep['dropped']} dropped")
    print(f"{'step':<16}{'seconds':>10}{'share':>8}{'ms/mask':>10}")
    for step, sec in rep["timings"].items():
        print(f"{step:<16}{sec:>10.3f}{100 * sec / seconds:>7.1f}%{1000 * sec / args.n:>10.2f}")
    print(f"{'total':<16}{seconds:>10.3f}{'':>8}{1000 * seconds / args.n:>10.2f}")
    print(f"masks/s: {result['masks_per_second']:.1f} (target >= 20: {'met' if result['meets_target'] else 'MISSED'})")
    if "plain_decode_seconds" in result:
        print(f"with the plain model.decode instead: {result['masks_per_second_with_plain_decode']:.1f} masks/s "
              f"(decode {result['plain_decode_seconds']:.2f} s vs {rep['timings']['decode']:.2f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
