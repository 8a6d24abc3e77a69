"""GAN speed per generator: training-loop overhead over the bare networks, s/iter, translation patches/s.

Each configuration (a row of :data:`CONFIGS`: the generator and its settings, the discriminator, the loss)
is measured twice, in one process and on the same data:

- ``bare``: the generator, discriminator and losses :func:`histosynth.gan.train.train_gan` builds for
  that configuration (``generators.define_G``, ``pix2pix.define_D``, ``GANLoss(gan_mode)``, lambda_L1 · L1,
  and lambda_FM · feature matching with the multiscale D), on **one fixed batch** already on the device
  (conditioning built once), D step + G step with Adam — nothing else;
- ``full``: :func:`~histosynth.gan.train.train_gan` with the same settings for the same number of steps
  (sampling crops, flips and rotations from the memory-mapped patch sets, conditioning, the learning-rate
  schedule, finite checks, logging), its per-step seconds read from ``log.csv`` (the first and the last
  step, which carry start-up and the final checkpoint, left out).

The issue's target: ``full`` within 10 % of ``bare``. Each row prints and records the generator, crop,
batch, bare and full s/iter, the overhead, and the parameters of G and D. Then the first CPU-size row's
trained generator translates ``--translate-n`` masks and the patches/s are reported (``--translate all``:
every CPU-size row's — SPADE's 128 masks take minutes on one thread; ``none``: skipped).

Rows: the CPU size (crop 128, width 32, batch 4: ``unet``, ``pix2pixhd``, ``daff``, ``spade``; the
default) and each generator at its paper / seed size (``unet-seed``, ``pix2pixhd-seed``, ``daff-seed``,
``spade-seed``; see the comments in :data:`CONFIGS`), picked with ``--configs`` (``cpu``, ``seed`` and
``all`` name the groups). CPU rows run 25 steps, seed rows 10, unless ``--steps`` says otherwise. Without
``--patch-sets`` two demo slides are generated, tiled (256 px, or the largest crop asked for) and
rasterized into ``--workdir`` first.

    OMP_NUM_THREADS=1 python benchmarks/gan.py --out benchmarks/out/gan.json
    OMP_NUM_THREADS=1 python benchmarks/gan.py --configs seed --out benchmarks/out/gan-seed.json
    python benchmarks/gan.py --configs all --device cuda --out benchmarks/out/gan-cuda.json
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
CLASSES = {"Epithelial": 1, "Lymphocyte": 2, "Spindle": 3}

#: train_gan's defaults: what a row does not set
DEFAULTS: dict[str, Any] = {
    "depth": 7, "n_down": 3, "n_blocks": 3, "local_enhancer": False, "attention_recurrence": 2, "norm": "batch",
    "disc": "patch", "num_d": 2, "gan_mode": "lsgan", "lambda_l1": 100.0, "lambda_fm": 10.0,
}
_CPU = {"crop": 128, "width": 32, "batch": 4, "steps": 25}
_HD = {"disc": "multiscale", "num_d": 2, "lambda_fm": 10.0, "norm": "instance"}  # benchmarks/generators.py's
CONFIGS: list[dict[str, Any]] = [
    # CPU size: the generators as benchmarks/generators.py compares them
    {"name": "unet", "generator": "unet", **_CPU, "depth": 7},
    {"name": "pix2pixhd", "generator": "pix2pixhd", **_CPU, "n_down": 3, "n_blocks": 3, **_HD},
    {"name": "daff", "generator": "daff", **_CPU, "n_down": 3, "n_blocks": 3, **_HD, "attention_recurrence": 2,
     "gan_mode": "vanilla"},
    {"name": "spade", "generator": "spade", **_CPU, "n_down": 3, **_HD, "gan_mode": "hinge"},
    # seed 000's Optional pix2pix (config/seed000-pix2pix.yaml): U-Net depth 8, width 64, 70-px PatchGAN,
    # vanilla loss + 100 L1, batch 1 at 256 px
    {"name": "unet-seed", "generator": "unet", "crop": 256, "width": 64, "batch": 1, "steps": 10, "depth": 8,
     "disc": "patch", "gan_mode": "vanilla"},
    # pix2pixHD's global generator G1 at the paper's sizes (models/pix2pixhd.py: width 64, 4 downsamplings,
    # 9 residual blocks; no local enhancer) at 512 px, its 3-scale D + feature matching (config/daff-gan.yaml),
    # instance norm, LSGAN (pix2pixHD's default), no L1 (its objective has none), batch 1
    {"name": "pix2pixhd-seed", "generator": "pix2pixhd", "crop": 512, "width": 64, "batch": 1, "steps": 10,
     "n_down": 4, "n_blocks": 9, "norm": "instance", "disc": "multiscale", "num_d": 3, "gan_mode": "lsgan",
     "lambda_l1": 0.0, "lambda_fm": 10.0},
    # config/daff-gan.yaml (seed 003): G1 + local enhancer, criss-cross attention, 3-scale D, log loss, no L1
    {"name": "daff-seed", "generator": "daff", "crop": 512, "width": 32, "batch": 1, "steps": 10, "n_down": 4,
     "n_blocks": 9, "local_enhancer": True, "attention_recurrence": 2, "norm": "instance", "disc": "multiscale",
     "num_d": 3, "gan_mode": "vanilla", "lambda_l1": 0.0, "lambda_fm": 10.0},
    # SPADE at 256 px, width 64: n_down 4 gives the paper's 1024 channels at the bottom (5 blocks, not the
    # paper's 7: here the channels double at every block, models/spade.py); hinge, 2-scale D + feature
    # matching (SPADE's defaults), instance norm, no L1 (its objective has none), batch 1
    {"name": "spade-seed", "generator": "spade", "crop": 256, "width": 64, "batch": 1, "steps": 10, "n_down": 4,
     "disc": "multiscale", "num_d": 2, "gan_mode": "hinge", "norm": "instance", "lambda_l1": 0.0,
     "lambda_fm": 10.0},
]
GROUPS = {"cpu": [c["name"] for c in CONFIGS if not c["name"].endswith("-seed")],
          "seed": [c["name"] for c in CONFIGS if c["name"].endswith("-seed")],
          "all": [c["name"] for c in CONFIGS]}


def select_configs(names: list[str] | None) -> list[dict[str, Any]]:
    """The rows ``names`` picks (row names or groups of :data:`GROUPS`); no names: the CPU rows."""
    return select_rows(CONFIGS, GROUPS, DEFAULTS, names, "cpu")


def _demo_patch_sets(workdir: Path, tile: int = 256) -> tuple[list[Path], dict[str, str]]:
    from histosynth.patches.annotate import rasterize_patchset
    from histosynth.slides.demo import make_demo_slides
    from histosynth.slides.tiling import TileParams, tile_slide

    demo = workdir / "gan-demo"
    if not (demo / "slides" / "slides.csv").exists():
        make_demo_slides(demo / "slides", n_slides=2, size=(2048, 2048), seed=0)
    suffix = "" if tile == 256 else f"-{tile}"
    sets = []
    for k in range(2):
        name = f"demo-{k:03d}"
        tiles, patches = demo / f"tiles{suffix}" / name, demo / f"patches{suffix}" / name
        if not patches.exists():
            tile_slide(demo / "slides" / f"{name}.tif", tiles, TileParams(size=tile, target_mpp=0.5))
            rasterize_patchset(demo / "slides" / f"{name}.geojson", tiles, patches, CLASSES)
        sets.append(patches)
    return sets, {"demo-000": "pale", "demo-001": "dark"}


def _bare(sets, options, cfg: dict[str, Any], steps: int, device: str) -> dict[str, Any]:
    """s/iter of train_gan's networks and losses for ``cfg`` on one fixed batch; G's and D's parameters."""
    import torch

    from histosynth.gan import train as tg
    from histosynth.gan.conditioning import build_conditioning, conditioning_channels
    from histosynth.io.labels import classes_of_patch_sets
    from histosynth.io.pool import load_pool, max_type
    from histosynth.models import generators
    from histosynth.models import pix2pix as p2p

    if cfg["gan_mode"] == "wgan-gp":
        raise SystemExit("the bare loop has no gradient penalty: wgan-gp rows are not supported")
    dev = torch.device(device)
    data = load_pool(sets, options)
    n_types = max([max_type(data), *classes_of_patch_sets(sets).keys()], default=0)
    n_options = len(data.options)
    in_ch = len(conditioning_channels(n_types, False))
    d_in = in_ch + 3
    crop, width, multiscale = cfg["crop"], cfg["width"], cfg["disc"] == "multiscale"
    torch.manual_seed(0)
    G = generators.define_G(cfg["generator"], in_ch, 3, depth=cfg["depth"], width=width, max_width=512,
                            dropout_innermost=3, norm=cfg["norm"], dropout_at_inference=True,
                            n_down=cfg["n_down"], n_blocks=cfg["n_blocks"], local_enhancer=cfg["local_enhancer"],
                            attention_recurrence=cfg["attention_recurrence"]).to(dev)
    D = p2p.define_D(cfg["disc"], d_in, width, None, cfg["num_d"], cfg["norm"], size=crop).to(dev)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    crit = p2p.GANLoss(cfg["gan_mode"])
    lambda_l1, lambda_fm = cfg["lambda_l1"], cfg["lambda_fm"]
    imgs, inst, types, opts = tg.sample_batch(data, cfg["batch"], crop, 0, 0)
    cond = build_conditioning(inst, types, n_types, opts, n_options).to(dev)
    real = tg._to_tensor_images(imgs, dev)
    G.train()
    D.train()
    times = []
    for _ in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        fake = G(cond)
        pred_real = D.features(torch.cat([cond, real], 1))
        loss_d = 0.5 * (crit(D.features(torch.cat([cond, fake.detach()], 1)), False) + crit(pred_real, True))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        D.requires_grad_(False)
        pred = D.features(torch.cat([cond, fake], 1))
        loss_g = crit(pred, True, for_discriminator=False) + p2p.l1_loss(fake, real, lambda_l1)
        if multiscale:
            loss_g = loss_g + lambda_fm * p2p.feature_matching_loss(pred, pred_real)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return bare_result(times, G, D)


def _full(sets, options, out, cfg: dict[str, Any], steps: int, device: str, threads: int) -> float:
    import pandas as pd

    from histosynth.gan.train import train_gan

    settings = {k: cfg[k] for k in (*DEFAULTS, "generator", "crop", "width")}
    train_gan(sets, out, options=options, **settings, batch_size=cfg["batch"], steps=steps, decay_steps=0,
              device=device, threads=threads, precision="float32", log_every=1, sample_every=10**6,
              checkpoint_every=10**6, progress=False)
    log = pd.read_csv(Path(out) / "log.csv")
    return steady(log["seconds"].tolist(), drop_last=True)


def _translate(gan_pt: Path, sets, tmp: Path, n: int, device: str, threads: int) -> dict[str, Any]:
    from histosynth.gan.translate import translate
    from histosynth.io.patchset import PatchSetWriter, read_patchset

    src = read_patchset(sets[0], require=("inst", "types"))
    masks = tmp / "masks"
    if not masks.exists():
        with PatchSetWriter(masks, ("inst", "types"), src.inst.shape[1:3]) as w:
            for k in range(n):  # cycle through the patches as often as needed
                i = k % len(src)
                w.add(src.index.iloc[i].to_dict(), inst=src.inst[i], types=src.types[i])
    t0 = time.perf_counter()
    translate(gan_pt, masks, gan_pt.parent / "pairs", options=["all"], batch=16, device=device, threads=threads,
              montage=False)
    seconds = time.perf_counter() - t0
    return {"masks": n, "side": int(src.inst.shape[1]), "seconds": seconds, "patches_per_s": n / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", metavar="NAME",
                    help=f"rows to measure: {', '.join(c['name'] for c in CONFIGS)} or the groups "
                         f"{', '.join(GROUPS)} (default: cpu)")
    ap.add_argument("--patch-sets", nargs="*", help="typed patch sets with images (default: two demo slides)")
    ap.add_argument("--options", nargs="*", default=[], metavar="SLIDE=NAME")
    ap.add_argument("--steps", type=int, help="steps per measurement (default: 25 for CPU rows, 10 for seed rows)")
    ap.add_argument("--translate", choices=("all", "first", "none"), default="first",
                    help="translate with the first CPU row's generator (default), every CPU row's, or none")
    ap.add_argument("--translate-n", type=int, default=128, help="masks to translate (default 128)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out"))
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    configs = select_configs(args.configs)

    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.patch_sets:
        sets = [Path(p) for p in args.patch_sets]
        options = dict(o.split("=", 1) for o in args.options)
    else:
        sets, options = _demo_patch_sets(workdir, max(256, *(c["crop"] for c in configs)))

    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for cfg in configs:
            steps = args.steps or cfg["steps"]
            t0 = time.perf_counter()
            bare = _bare(sets, options, cfg, steps, args.device)
            run = Path(tmp) / cfg["name"]
            full = _full(sets, options, run, cfg, steps, args.device, args.threads)
            row = {k: v for k, v in cfg.items() if k not in ("steps", "batch")}
            row.update({"batch": cfg["batch"], "steps": steps, "bare_s_per_iter": bare["s_per_iter"],
                        "full_s_per_iter": full, "overhead": full / bare["s_per_iter"] - 1,
                        "params_G": bare["params_G"], "params_D": bare["params_D"]})
            print(f"{cfg['name']}: {cfg['generator']} crop {cfg['crop']} batch {cfg['batch']}, G {bare['params_G'] / 1e6:.2f} M "
                  f"D {bare['params_D'] / 1e6:.2f} M params; bare {bare['s_per_iter']:.3f} s/iter, full {full:.3f} "
                  f"s/iter, overhead {100 * row['overhead']:+.1f} % (target <= 10 %) [{steps} steps, "
                  f"{time.perf_counter() - t0:.0f} s]", flush=True)
            cpu_row = not cfg["name"].endswith("-seed")
            if cpu_row and (args.translate == "all" or (args.translate == "first" and not rows)):
                tr = row["translate"] = _translate(run / "gan.pt", sets, Path(tmp), args.translate_n, args.device,
                                                   args.threads)
                print(f"  translate: {tr['masks']} masks of {tr['side']} px in {tr['seconds']:.2f} s = "
                      f"{tr['patches_per_s']:.1f} patches/s ({args.threads} thread(s), model loading included)",
                      flush=True)
            rows.append(row)

    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "device": args.device, "threads": args.threads, "torch": torch.__version__,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "train": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
