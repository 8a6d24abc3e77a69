"""Layout methods compared on one table (issue #16), inside one regime of the evidence protocol.

Every method (``sample_masks.method``: ``statistical``, ``uniform``, ``daff``) lays out the synthetic masks
of the **same** regime of ``snakemake evidence`` that has already run (by default
``config/evidence-cpu.yaml``'s k = 1, seed 0: one MoNuSeg train slide). Its tiles, patches, split,
statistics, nuclei library, β-VAE, **mask → H&E GAN** and real-arm segmenter are copied unchanged (file
times kept, so Snakemake sees them as done); only the masks differ, so the comparison is paired: the same
painter, the same real arm, the same test patches. ``statistical`` is the evidence run's own masks, pairs and
``real+synthetic`` arm (reused). For each method:

1. **Realism** (``evaluate-masks`` against the test slides' real masks): KS of the nuclei count per patch,
   area, eccentricity and nearest-neighbour distance, their Wasserstein distances, the fraction of radii at
   which Ripley's L lies inside the real masks' bootstrap band, and what else evaluate-masks reports.
2. **Speed**: masks/s of ``sample-masks`` as it ran in the DAG (its report.json; 2 cores shared with
   nothing else only if the machine was quiet).
3. **Downstream** (``--downstream``): the ``real+synthetic`` arm trained on the method's masks painted by the
   shared GAN, scored on the test patches and compared image by image with the copied ``real`` arm (mean
   per-image PQ difference, 95 % t interval over test images, Wilcoxon p; one training seed: the spread is
   over test images, not training runs), and with ``statistical``'s own arm the same way.

    .venv/bin/python benchmarks/layouts.py --methods statistical uniform daff --downstream \\
        --json results/layouts/table.json
    .venv/bin/python benchmarks/layouts.py --markdown results/layouts/table.json

``daff`` trains its point → mask G1 first at the CPU size of ``DAFF_CPU`` (a fraction of the paper's);
rerunning skips what is done (Snakemake).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

from generators import (  # benchmarks/generators.py
    REPO,
    copy_regime,
    downstream_rows,
    regime_arguments,
    snakemake,
)

#: the regime's parts every method reuses (the masks are what differs)
SHARED = ("stats", "library", "models/dvae", "models/gan")
#: the evidence run's own statistical masks and everything painted from them
STATISTICAL = ("synthetic/masks", "synthetic/pairs", "segmentation/real+synthetic")
#: DAFF's G1 at a CPU size (docs/results.md "Layouts: daff vs uniform" used 200 steps at width 16)
DAFF_CPU = {"crop": 128, "tile": 128, "width": 16, "n_blocks": 2, "steps": 240, "decay_steps": 80, "threads": 2,
            "checkpoint_every": 100}
METHODS = ("statistical", "uniform", "daff")


def method_config(base_cfg: dict, out: Path, seed: int, method: str) -> dict:
    cfg = json.loads(json.dumps(base_cfg))
    cfg["results"] = str(out)
    cfg["evidence"] = {**cfg.get("evidence", {}), "k": [1], "seeds": sorted({seed, seed + 1}),
                       "arms": ["real", "real+synthetic"]}
    cfg["sample_masks"] = {**cfg.get("sample_masks", {}), "method": method}
    if method == "daff":
        cfg["daff"] = {**cfg.get("daff", {}), **DAFF_CPU}
    return cfg


def realism_row(ev: dict) -> dict:
    feats = ev["features"]
    return {
        **{f"ks_{k}": feats[k]["statistic"] for k in feats},
        **{f"w_{k}": ev["wasserstein"][k]["per_sd"] for k in ev["wasserstein"]},
        "ripley_inside": ev["ripley"]["inside"], "ripley_max_abs": ev["ripley"]["max_abs_difference"],
        "n_synthetic": ev["n_patches"]["synthetic"], "n_real": ev["n_patches"]["real"],
        **({"realism": ev["realism"]} if "realism" in ev else {}),
    }


def paired(out: Path, other: Path, regime: str, seed: int) -> dict:
    """This method's real+synthetic arm against another folder's, image by image (mean, 95 % t CI)."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    from histosynth.segmentation.evidence import wilcoxon_p

    path = f"{regime}/segmentation/real+synthetic/seed-{seed}/scores.csv"
    m = pd.read_csv(other / path).merge(pd.read_csv(out / path), on=["slide", "x", "y"], suffixes=("_other", ""))
    d = (m["pq"] - m["pq_other"]).to_numpy()
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return {"diff": float(d.mean()), "ci_low": float(d.mean() - half), "ci_high": float(d.mean() + half),
            "wilcoxon_p": wilcoxon_p(d), "n_images": len(d)}


def _f(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _realism(r: dict, kind: str, key: str, digits: int = 2) -> str:
    """A realism measure (``evaluate-masks``' ``realism`` block) with its real-vs-real floor in brackets."""
    block = (r.get("realism") or {}).get(kind) or {}
    return f"{_f(block.get(key), digits)} ({_f((block.get('floor') or {}).get(key), digits)})"


def markdown(table: dict) -> str:
    rows = table["rows"]
    out = [f"Regime {table['regime']}; {table['date']}, {table['machine']}, {table['cpus']} cores.", "",
           "| method | masks/s | KS count | KS area | KS eccentricity | KS NN distance | W count (SD) | W area (SD) "
           "| Ripley L inside band | t-SNE KS, mask grid (floor) | mask FID, Inception (floor) "
           "| real+synthetic PQ | − real [95 % CI] | − statistical [95 % CI] |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, s = r.get("downstream") or {}, r.get("vs_statistical") or {}
        out.append(
            f"| {r['method']} | {_f(r.get('masks_per_second'), 1)} | {_f(r['ks_count'])} | {_f(r['ks_area'])} | "
            f"{_f(r['ks_eccentricity'])} | {_f(r['ks_nn_distance'])} | {_f(r['w_count'], 2)} | {_f(r['w_area'], 2)} | "
            f"{_f(r['ripley_inside'], 2)} | {_realism(r, 'area', 'ks_2d')} | {_realism(r, 'inception', 'fid', 0)} | "
            f"{_f(d.get('pq'))} | "
            + (f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if d else "—") + " | "
            + (f"{s['diff']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]" if s else "—") + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    regime_arguments(ap, "method", "results/layouts")
    ap.add_argument("--downstream", action="store_true", help="also train and score real+synthetic")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())), end="")
        return

    import yaml

    base_cfg = yaml.safe_load((REPO / args.config).read_text())
    base = REPO / base_cfg["results"]
    regime = f"evidence/k-1/seed-{args.seed}"
    out_root = REPO / args.out
    rows = []
    for method in args.methods:
        out = out_root / method
        copy_regime(base, out, regime, args.seed, STATISTICAL if method == "statistical" else (), shared=SHARED)
        cfg = method_config(base_cfg, out.relative_to(REPO), args.seed, method)
        cfg_path = out / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        rel = out.relative_to(REPO)
        targets = [f"{rel}/{regime}/synthetic/masks-evaluation/evaluation.json"]
        if args.downstream:
            targets.append(f"{rel}/{regime}/segmentation/real+synthetic/seed-{args.seed}/scores.csv")
        t0 = time.perf_counter()
        snakemake(cfg_path, targets, out / "snakemake.log", args.cores)
        ev = json.loads((out / regime / "synthetic/masks-evaluation/evaluation.json").read_text())
        masks = json.loads((out / regime / "synthetic/masks/shard-0/report.json").read_text())
        mps = masks.get("masks_per_second") or (masks["masks"] / masks["seconds"] if masks.get("seconds") else None)
        row = {"method": method, "masks_per_second": mps,
               "nuclei": masks.get("nuclei"), **realism_row(ev), "wall_s": time.perf_counter() - t0}
        if args.downstream:
            row["downstream"] = downstream_rows(method, out, regime, args.seed, ("real+synthetic",))[0]
            if method != "statistical" and (out_root / "statistical" / regime).exists():
                row["vs_statistical"] = paired(out, out_root / "statistical", regime, args.seed)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        path = Path(args.json)
        table = {r["method"]: r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
        table.update({r["method"]: r for r in rows})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor()
                                    or platform.machine(), "cpus": os.cpu_count(), "regime": regime,
                                    "rows": [table[m] for m in METHODS if m in table]}, indent=2))


if __name__ == "__main__":
    main()
