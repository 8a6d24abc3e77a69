"""Layout methods compared on one table (issue #16), inside one regime of the evidence protocol.

Every method (``sample_masks.method``: ``statistical``, ``uniform``, ``daff``) lays out the synthetic masks
of the **same** regime of ``snakemake evidence`` that has already run (by default
``config/evidence-cpu.yaml``'s k = 1, seed 0: one MoNuSeg train slide; ``--k``, ``--seed`` pick another). Its tiles, patches, split,
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

**Controllability** (``--oversample-rarest F``, typed datasets such as ``config/consep.yaml``): one more row,
``statistical`` with ``sample_masks.type_mix`` asking for the rarest type of the regime's training statistics
(fewest nuclei in its ``stats.json``; nothing from the test slides chooses it) at F times its fitted
fraction. Its ``real+synthetic`` arm is compared with the unmodified ``statistical`` arm image by image on
that type's PQ (the images whose ground truth holds the type), and the masks' report gives the requested
fraction next to the one drawn. With classes, every row also reports PQ per type (mean over the test images
holding the type) next to the real arm's.

    .venv/bin/python benchmarks/layouts.py --config config/consep.yaml --k 2 --seed 1 --out results/layouts-consep \
        --methods statistical uniform daff --oversample-rarest 3 --downstream \
        --json results/layouts-consep/table.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

from generators import (  # benchmarks/generators.py
    REPO,
    copy_regime,
    downstream_rows,
    paired_difference,
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


def method_config(base_cfg: dict, out: Path, seed: int, method: str, type_mix: dict | None = None,
                  k: int = 1) -> dict:
    cfg = json.loads(json.dumps(base_cfg))
    cfg["results"] = str(out)
    cfg["evidence"] = {**cfg.get("evidence", {}), "k": [k], "seeds": sorted({seed, seed + 1}),
                       "arms": ["real", "real+synthetic"]}
    cfg["sample_masks"] = {**cfg.get("sample_masks", {}), "method": method}
    if type_mix:
        cfg["sample_masks"]["type_mix"] = dict(type_mix)
    if method == "daff":
        cfg["daff"] = {**cfg.get("daff", {}), **DAFF_CPU}
    return cfg


def realism_row(ev: dict) -> dict:
    feats = ev["features"]
    return {
        **{f"ks_{k}": feats[k]["statistic"] for k in feats},
        **{f"w_{k}": ev["wasserstein"][k]["per_sd"] for k in ev["wasserstein"]},
        "ripley_inside": ev["ripley"]["inside"], "ripley_max_abs": ev["ripley"]["max_abs_difference"],
        "touching": (ev.get("touching") or {}).get("synthetic"), "touching_real": (ev.get("touching") or {}).get("real"),
        "n_synthetic": ev["n_patches"]["synthetic"], "n_real": ev["n_patches"]["real"],
        **({"realism": ev["realism"]} if "realism" in ev else {}),
    }


def rarest_request(stats: dict, factor: float) -> dict:
    """The rarest type of a regime's training statistics and the ``type_mix`` asking for ``factor`` times it.

    Rarest: the fewest nuclei (``stats.json``'s morphology ``n``) among the types that occur; its fitted
    fraction is its share of all nuclei there, the request ``min(1, factor × fraction)``.
    """
    from histosynth.io.labels import read_class_map

    if not factor > 0:
        sys.exit(f"--oversample-rarest must be positive, got {factor}")
    classes = read_class_map(stats["classes"], "stats.json")
    n = {int(t): int(m.get("n", 0)) for t, m in stats["morphology"].items()}
    present = {t: c for t, c in n.items() if c > 0}
    if len(present) < 2:
        sys.exit(f"--oversample-rarest needs at least two types in the training masks; the statistics hold "
                 f"{len(present)}")
    tid = min(present, key=lambda t: (present[t], t))
    fraction = present[tid] / sum(present.values())
    name = classes.get(tid, str(tid))
    return {"type": tid, "class": name, "fitted_fraction": fraction, "factor": factor,
            "requested_fraction": min(1.0, factor * fraction), "type_mix": {name: min(1.0, factor * fraction)}}


def type_columns(scores) -> list[int]:
    """The type ids with a per-image PQ column (``pq_type{c}``) in a scores table."""
    return sorted(int(c[len("pq_type"):]) for c in scores.columns if c.startswith("pq_type"))


def per_type(scores, reference) -> dict[str, dict]:
    """Per type: this arm's PQ and the reference arm's (means over the test images whose ground truth holds
    the type), and their paired difference on those images."""
    m = reference.merge(scores, on=["slide", "x", "y"], suffixes=("_ref", ""))
    if len(m) != len(reference):
        sys.exit(f"scored {len(scores)} test patches, the reference arm {len(reference)}: not paired")
    out = {}
    for c in type_columns(scores):
        col = f"pq_type{c}"
        both = m[[col, f"{col}_ref"]].dropna()
        out[str(c)] = {"pq": float(both[col].mean()) if len(both) else None,
                       "pq_reference": float(both[f"{col}_ref"].mean()) if len(both) else None,
                       **paired_difference((both[col] - both[f"{col}_ref"]).to_numpy())}
    return out


def arm_scores(folder: Path, regime: str, arm: str, seed: int):
    import pandas as pd

    return pd.read_csv(folder / regime / f"segmentation/{arm}/seed-{seed}/scores.csv")


def paired(out: Path, other: Path, regime: str, seed: int) -> dict:
    """This method's real+synthetic arm against another folder's, image by image (mean, 95 % t CI); with
    classes, per type too."""
    mine, theirs = (arm_scores(f, regime, "real+synthetic", seed) for f in (out, other))
    m = theirs.merge(mine, on=["slide", "x", "y"], suffixes=("_other", ""))
    return {**paired_difference((m["pq"] - m["pq_other"]).to_numpy()),
            **({"per_type": per_type(mine, theirs)} if type_columns(mine) else {})}


def _f(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _realism(r: dict, kind: str, key: str, digits: int = 2) -> str:
    """A realism measure (``evaluate-masks``' ``realism`` block) with its real-vs-real floor in brackets."""
    block = (r.get("realism") or {}).get(kind) or {}
    return f"{_f(block.get(key), digits)} ({_f((block.get('floor') or {}).get(key), digits)})"


def _ci(d: dict | None) -> str:
    if not d or d.get("diff") is None:
        return "—"
    if d.get("ci_low") is None:
        return f"{d['diff']:+.3f}"
    return f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def type_markdown(table: dict) -> list[str]:
    """Per-type PQ of every row's real+synthetic arm against the real arm (typed datasets only)."""
    rows = [r for r in table["rows"] if (r.get("downstream") or {}).get("per_type")]
    if not rows:
        return []
    names = table.get("classes") or {}
    types = sorted({t for r in rows for t in r["downstream"]["per_type"]}, key=int)
    out = ["", ("Per-type PQ of real+synthetic (mean over the test images holding the type) − the real arm's "
           "[95 % CI over those images]:"), "",
           "| method | " + " | ".join(f"{names.get(t, t)} (n img)" for t in types) + " |",
           "|---|" + "---|" * len(types)]
    for r in rows:
        cells = []
        for t in types:
            v = r["downstream"]["per_type"].get(t) or {}
            cells.append("—" if v.get("pq") is None else
                         f"{v['pq']:.3f} ({_ci(v)}; {v['n_images']})")
        out.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    for r in table["rows"]:
        req = r.get("request")
        if req:
            t = str(req["type"])
            vs = ((r.get("vs_statistical") or {}).get("per_type") or {}).get(t) or {}
            out += ["", (f"**{r['method']}**: {req['class']} asked at {req['requested_fraction']:.3f} of the nuclei "
                        f"({req['factor']:g} × its fitted {req['fitted_fraction']:.3f}); drawn "
                        f"{_f(req.get('achieved_fraction'))}. {req['class']} PQ − the unmodified statistical "
                        f"arm's: {_ci(vs)} over {vs.get('n_images', 0)} test images (Wilcoxon p "
                        f"{_f(vs.get('wilcoxon_p'))}).")]
    return out


def markdown(table: dict) -> str:
    rows = table["rows"]
    out = [f"Regime {table['regime']}; {table['date']}, {table['machine']}, {table['cpus']} cores.", "",
           ("| method | masks/s | KS count | KS area | KS eccentricity | KS NN distance | W count (SD) | W area (SD) "
           "| Ripley L inside band | touching (real) | t-SNE KS, mask grid (floor) | mask FID, Inception (floor) "
           "| real+synthetic PQ | − real [95 % CI] | − statistical [95 % CI] |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, s = r.get("downstream") or {}, r.get("vs_statistical") or {}
        out.append(
            f"| {r['method']} | {_f(r.get('masks_per_second'), 1)} | {_f(r['ks_count'])} | {_f(r['ks_area'])} | "
            f"{_f(r['ks_eccentricity'])} | {_f(r['ks_nn_distance'])} | {_f(r['w_count'], 2)} | {_f(r['w_area'], 2)} | "
            f"{_f(r['ripley_inside'], 2)} | {_f(r.get('touching'), 2)} ({_f(r.get('touching_real'), 2)}) | {_realism(r, 'area', 'ks_2d')} | {_realism(r, 'inception', 'fid', 0)} | "
            f"{_f(d.get('pq'))} | {_ci(d)} | {_ci(s)} |")
    return "\n".join(out + type_markdown(table)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    regime_arguments(ap, "method", "results/layouts")
    ap.add_argument("--downstream", action="store_true", help="also train and score real+synthetic")
    ap.add_argument("--oversample-rarest", type=float, metavar="F",
                    help="also run statistical with the rarest training type asked at F x its fitted fraction")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())), end="")
        return

    import yaml

    from histosynth.io.labels import read_class_map

    base_cfg = yaml.safe_load((REPO / args.config).read_text())
    base = REPO / base_cfg["results"]
    regime = f"evidence/k-{args.k}/seed-{args.seed}"
    out_root = REPO / args.out
    stats = json.loads((base / regime / "stats/stats.json").read_text())
    runs = [(m, m, None) for m in args.methods]
    if args.oversample_rarest is not None:
        request = rarest_request(stats, args.oversample_rarest)
        runs.append((f"statistical, {request['class']} x{args.oversample_rarest:g}", "statistical", request))
    rows = []
    for name, method, request in runs:
        out = out_root / (name if request is None else f"statistical-rarest-{args.oversample_rarest:g}x")
        copy_regime(base, out, regime, args.seed, STATISTICAL if name == "statistical" else (), shared=SHARED)
        cfg = method_config(base_cfg, out.relative_to(REPO), args.seed, method,
                            request["type_mix"] if request else None, args.k)
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
        row = {"method": name, "masks_per_second": mps,
               "nuclei": masks.get("nuclei"), **realism_row(ev), "wall_s": time.perf_counter() - t0}
        if request is not None:
            achieved = (masks.get("achieved") or {}).get("type_fractions") or {}
            row["request"] = {**request, "achieved_fraction": achieved.get(request["class"])}
        if args.downstream:
            row["downstream"] = downstream_rows(name, out, regime, args.seed, ("real+synthetic",))[0]
            mine = arm_scores(out, regime, "real+synthetic", args.seed)
            if type_columns(mine):
                row["downstream"]["per_type"] = per_type(mine, arm_scores(out, regime, "real", args.seed))
            if name != "statistical" and (out_root / "statistical" / regime).exists():
                row["vs_statistical"] = paired(out, out_root / "statistical", regime, args.seed)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        path = Path(args.json)
        table = {r["method"]: r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
        table.update({r["method"]: r for r in rows})
        order = [m for m in METHODS if m in table] + sorted(m for m in table if m not in METHODS)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor()
                                    or platform.machine(), "cpus": os.cpu_count(), "regime": regime,
                                    "config": args.config,
                                    "classes": {str(k): v for k, v in read_class_map(stats["classes"]).items()},
                                    "rows": [table[m] for m in order]}, indent=2))


if __name__ == "__main__":
    main()
