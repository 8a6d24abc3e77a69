"""MI-GAN speed (issue #20): training-loop overhead of train_g1 / train_g2 over the bare networks, s/iter.

Each row of :data:`CONFIGS` (G1 or G2 with its settings) is measured twice, in one process and on the same
stack sets:

- ``bare``: the generator and critic :func:`histosynth.multifocus.train.train_g1` / ``train_g2`` build for
  those settings (``migan.define_g1`` / ``define_g2`` under the same seed), Adam with the trainer's betas
  (0, 0.9) and learning rate, on **one fixed batch** already on the device (G1: a fixed z and the batch's
  best-focus planes; G2: the batch's stacks, centred on their best plane, and their centre planes as the base
  images). Per generator step: ``n_critic`` critic steps (the fake made under ``no_grad``, E[D(fake)] −
  E[D(real)] + λ_gp · :func:`~histosynth.models.pix2pix.critic_penalty` at
  :func:`~histosynth.models.pix2pix.interpolate`'d points), then one generator step (−E[D(fake)], for G2
  plus λ_L1 · L1 to the real stack when ``--lambda-l1`` > 0), the critic frozen for it — nothing else;
- ``full``: ``train_g1`` / ``train_g2`` with the same settings for the same number of steps (drawing,
  centring and flipping a fresh batch from the memory-mapped stack sets for every critic step and the
  generator step, fresh noise, finite checks, ``log.csv``; ``log_every`` 1, checkpoint and sample intervals
  beyond the run), its per-step seconds read from ``log.csv`` with the first and the last step (start-up;
  the final checkpoint, samples.png and g1.pt / g2.pt) left out. ``bare`` leaves its first step out.

The issue's target: ``full`` within 10 % of ``bare``. Each row prints and records its settings, bare and
full s/iter, the overhead full / bare − 1, and the parameters of G and D.

Rows (``--configs``; groups ``cpu``, ``paper``, ``all``; default ``cpu``), all with ``n_critic`` 5 unless
``--n-critic`` says otherwise:

- ``g1-paper``: G1 at the paper's / DCGAN's size: z 100, width 64, critic width 64, batch 16;
- ``g2-paper``: G2 at the defaults of ``train-migan-g2``: 11 planes, width 32, code channels 128, 7
  residual blocks, critic width 32, batch 4;
- ``g1-cpu``: G1 width 32, critic width 32, batch 16;
- ``g2-cpu``: G2 width 16, code channels 32, 3 residual blocks, critic width 16, batch 4.

CPU rows run 10 steps, paper rows 5, unless ``--steps`` says otherwise (at least 3: the full run's first
and last step are dropped). Without ``--stacks`` one demo z-stack (768 × 768 px, 11 planes, 40 cells,
seed 0: ``multifocus.demo.make_demo_zstacks``) is written and its 64-px cell stacks extracted with the
8 flips / quarter turns (``multifocus.stacks.extract_stacks``, ``augment=True``) into
``--workdir``/migan-demo first (kept and reused). ``--threads`` (default 1) sets torch's CPU threads;
on ``--device cuda`` the bare loop synchronises before each timing.

    OMP_NUM_THREADS=1 python benchmarks/migan.py --out benchmarks/out/migan.json
    OMP_NUM_THREADS=1 python benchmarks/migan.py --configs all --out benchmarks/out/migan-all.json
    python benchmarks/migan.py --configs all --device cuda --steps 20 --out benchmarks/out/migan-cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any


from _rows import bare_result, select_rows, steady, sync  # benchmarks/_rows.py (run as a script: its folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
PLANES = 11

#: the trainers' defaults that a row does not set
DEFAULTS: dict[str, Any] = {"lr": 1e-4, "lambda_gp": 10.0, "lambda_l1": 0.0, "augment": True, "seed": 0}
CONFIGS: list[dict[str, Any]] = [
    # DCGAN's sizes (models/migan.py, choice 7): ngf 64, ndf 64, z 100
    {"name": "g1-paper", "kind": "g1", "z_dim": 100, "width": 64, "critic_width": 64, "batch": 16, "steps": 5},
    # train_g2's defaults (models/migan.py, choices 5-7): Z 11, w 32, C 128, 7 residual blocks, D2 w 32
    {"name": "g2-paper", "kind": "g2", "width": 32, "code_channels": 128, "res_blocks": 7, "critic_width": 32,
     "batch": 4, "steps": 5},
    {"name": "g1-cpu", "kind": "g1", "z_dim": 100, "width": 32, "critic_width": 32, "batch": 16, "steps": 10},
    {"name": "g2-cpu", "kind": "g2", "width": 16, "code_channels": 32, "res_blocks": 3, "critic_width": 16,
     "batch": 4, "steps": 10},
]
GROUPS = {"cpu": [c["name"] for c in CONFIGS if c["name"].endswith("-cpu")],
          "paper": [c["name"] for c in CONFIGS if c["name"].endswith("-paper")],
          "all": [c["name"] for c in CONFIGS]}


def select_configs(names: list[str] | None) -> list[dict[str, Any]]:
    """The rows ``names`` picks (row names or groups of :data:`GROUPS`); no names: the CPU rows."""
    return select_rows(CONFIGS, GROUPS, DEFAULTS, names, "cpu")


def _demo_stacks(workdir: Path) -> list[Path]:
    """One demo z-stack's cell stacks (64 px, 11 planes, augmented), written once into ``workdir``."""
    from histosynth.multifocus.demo import make_demo_zstacks
    from histosynth.multifocus.stacks import extract_stacks

    demo = workdir / "migan-demo"
    slide = demo / "zstacks" / "zstack-00.ome.tif"
    if not slide.exists():
        make_demo_zstacks(demo / "zstacks", n_slides=1, size=(768, 768), planes=PLANES, n_cells=40, seed=0)
    stacks = demo / "stacks"
    if not (stacks / "report.json").exists():
        extract_stacks([slide], stacks, size=64, planes=PLANES, augment=True)
    return [stacks]


def _networks(cfg: dict[str, Any], planes: int):
    """(G, D) as train_g1 / train_g2 build them (same seed, same constructor)."""
    import torch

    from histosynth.models import migan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        if cfg["kind"] == "g1":
            return migan.define_g1(cfg["z_dim"], cfg["width"], cfg["critic_width"])
        return migan.define_g2(planes, cfg["width"], cfg["code_channels"], cfg["res_blocks"], cfg["critic_width"])


def _bare(sets, cfg: dict[str, Any], steps: int, n_critic: int, device: str) -> dict[str, Any]:
    """s/iter of the trainer's networks, optimizers and losses for ``cfg`` on one fixed batch; G's and D's
    parameters."""
    import torch
    import torch.nn.functional as F

    from histosynth.models.pix2pix import critic_penalty, interpolate
    from histosynth.multifocus import train as mt

    dev = torch.device(device)
    planes = sets[0].planes
    G, D = _networks(cfg, planes)
    G, D = G.to(dev), D.to(dev)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg["lr"], betas=mt.BETAS)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg["lr"], betas=mt.BETAS)
    stacks = mt._to_tensor(mt.draw_stacks(sets, cfg["batch"], cfg["seed"], 0, 0, cfg["augment"]), dev)
    if cfg["kind"] == "g1":
        real = stacks[:, planes // 2].contiguous()
        g_in = torch.randn(cfg["batch"], cfg["z_dim"], generator=torch.Generator().manual_seed(1)).to(dev)
    else:
        real = stacks
        g_in = stacks[:, planes // 2].contiguous()
    lambda_gp, lambda_l1 = cfg["lambda_gp"], cfg["lambda_l1"] if cfg["kind"] == "g2" else 0.0
    G.train()
    D.train()
    times = []
    for _ in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        for _k in range(n_critic):
            with torch.no_grad():
                fake = G(g_in)
            d_real, d_fake = D(real).mean(), D(fake).mean()
            gp = critic_penalty(D, interpolate(real, fake))
            loss_D = d_fake - d_real + lambda_gp * gp
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()
        D.requires_grad_(False)
        fake = G(g_in)
        loss_G = -D(fake).mean()
        if lambda_l1:
            loss_G = loss_G + lambda_l1 * F.l1_loss(fake, real)
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        D.requires_grad_(True)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return bare_result(times, G, D)


def _full(stack_dirs, out, cfg: dict[str, Any], steps: int, n_critic: int, device: str, threads: int) -> float:
    """Median per-step seconds of train_g1 / train_g2 for ``cfg`` from its log.csv (first and last step
    dropped)."""
    import pandas as pd

    from histosynth.multifocus.train import train_g1, train_g2

    common = {"critic_width": cfg["critic_width"], "steps": steps, "batch_size": cfg["batch"], "lr": cfg["lr"],
              "n_critic": n_critic, "lambda_gp": cfg["lambda_gp"], "augment": cfg["augment"], "seed": cfg["seed"],
              "device": device, "threads": threads, "checkpoint_every": 10**6, "log_every": 1,
              "sample_every": 10**6, "resume": False, "progress": False}
    if cfg["kind"] == "g1":
        train_g1(stack_dirs, out, z_dim=cfg["z_dim"], width=cfg["width"], **common)
    else:
        train_g2(stack_dirs, None, out, width=cfg["width"], code_channels=cfg["code_channels"],
                 res_blocks=cfg["res_blocks"], lambda_l1=cfg["lambda_l1"], **common)
    log = pd.read_csv(Path(out) / "log.csv")
    return steady(log["seconds"].tolist(), drop_last=True)


def _describe(cfg: dict[str, Any]) -> str:
    if cfg["kind"] == "g1":
        return f"G1 z {cfg['z_dim']} width {cfg['width']}, D1 width {cfg['critic_width']}"
    return (f"G2 width {cfg['width']} code {cfg['code_channels']} {cfg['res_blocks']} res blocks, D2 width "
            f"{cfg['critic_width']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", metavar="NAME",
                    help=f"rows to measure: {', '.join(c['name'] for c in CONFIGS)} or the groups "
                         f"{', '.join(GROUPS)} (default: cpu)")
    ap.add_argument("--stacks", nargs="*", help="stack sets of 64-px cells (default: one demo z-stack's)")
    ap.add_argument("--steps", type=int, help="generator steps per measurement (default: 10 for CPU rows, 5 for "
                                              "paper rows)")
    ap.add_argument("--n-critic", type=int, default=5, help="critic steps per generator step (default 5)")
    ap.add_argument("--lambda-l1", type=float, default=0.0, help="G2's L1 weight (default 0, the paper's loss)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out"))
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    configs = select_configs(args.configs)
    if args.n_critic < 1:
        raise SystemExit("--n-critic must be at least 1")

    import torch

    from histosynth.multifocus.train import read_stacks

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stack_dirs = [Path(p) for p in args.stacks] if args.stacks else _demo_stacks(workdir)
    sets = read_stacks(stack_dirs, max(c["batch"] for c in configs))
    print(f"{sum(len(s) for s in sets)} stacks of {sets[0].planes} planes in {', '.join(map(str, stack_dirs))}",
          flush=True)

    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for cfg in configs:
            cfg = {**cfg, "lambda_l1": args.lambda_l1 if cfg["kind"] == "g2" else 0.0}
            steps = args.steps or cfg["steps"]
            t0 = time.perf_counter()
            bare = _bare(sets, cfg, steps, args.n_critic, args.device)
            full = _full(stack_dirs, Path(tmp) / cfg["name"], cfg, steps, args.n_critic, args.device, args.threads)
            row = {k: v for k, v in cfg.items() if k != "steps"}
            row.update({"planes": sets[0].planes if cfg["kind"] == "g2" else 1, "n_critic": args.n_critic,
                        "steps": steps, "bare_s_per_iter": bare["s_per_iter"], "full_s_per_iter": full,
                        "overhead": full / bare["s_per_iter"] - 1, "params_G": bare["params_G"],
                        "params_D": bare["params_D"]})
            print(f"{cfg['name']}: {_describe(cfg)}, batch {cfg['batch']}, n_critic {args.n_critic}; G "
                  f"{bare['params_G'] / 1e6:.2f} M D {bare['params_D'] / 1e6:.2f} M params; bare "
                  f"{bare['s_per_iter']:.3f} s/iter, full {full:.3f} s/iter, overhead {100 * row['overhead']:+.1f} % "
                  f"(target <= 10 %) [{steps} steps, {time.perf_counter() - t0:.0f} s]", flush=True)
            rows.append(row)

    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "device": args.device, "threads": args.threads, "torch": torch.__version__,
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "stacks": [str(p) for p in stack_dirs], "train": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
