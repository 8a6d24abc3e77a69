"""GAN speed: training-loop overhead over the bare networks, s/iter at 128 and 256 px, translation patches/s.

For each configuration, in one process and on the same data:

- ``bare``: the same generator and discriminator, one fixed batch already
  on the device, D step + G step (LSGAN + lambda L1) with Adam — nothing
  else;
- ``full``: :func:`histosynth.gan.train.train_gan` for the same number of
  steps (sampling crops, flips and rotations from the memory-mapped patch
  sets, conditioning, logging), its per-step seconds read from ``log.csv``
  (the first and the last step, which carry start-up and the final
  checkpoint, left out).

The issue's target: ``full`` within 10 % of ``bare``. Then the trained
128-px generator translates ``--translate-n`` masks and the patches/s are
reported. Without ``--patch-sets`` two demo slides are generated, tiled and
rasterized into ``--workdir`` first.

    OMP_NUM_THREADS=1 python benchmarks/gan.py --out benchmarks/out/gan.json
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"Epithelial": 1, "Lymphocyte": 2, "Spindle": 3}


def _demo_patch_sets(workdir: Path) -> tuple[list[Path], dict[str, str]]:
    from histosynth.slides.demo import make_demo_slides
    from histosynth.patches.annotate import rasterize_patchset
    from histosynth.slides.tiling import TileParams, tile_slide

    demo = workdir / "gan-demo"
    table = make_demo_slides(demo / "slides", n_slides=2, size=(2048, 2048), seed=0) \
        if not (demo / "slides" / "slides.csv").exists() else None
    sets = []
    for k in range(2):
        name = f"demo-{k:03d}"
        tiles, patches = demo / "tiles" / name, demo / "patches" / name
        if not patches.exists():
            tile_slide(demo / "slides" / f"{name}.tif", tiles, TileParams(size=256, target_mpp=0.5))
            rasterize_patchset(demo / "slides" / f"{name}.geojson", tiles, patches, CLASSES)
        sets.append(patches)
    del table
    return sets, {"demo-000": "pale", "demo-001": "dark"}


def _bare(sets, options, crop, depth, width, batch, steps) -> float:
    import torch

    from histosynth.gan import train as tg
    from histosynth.gan.conditioning import build_conditioning
    from histosynth.io.pool import load_pool
    from histosynth.models import pix2pix as p2p

    data = load_pool(sets, options)
    torch.manual_seed(0)
    n_types, n_options = 3, len(set(options.values()))
    cond_ch = 2 + n_types + 1
    G = p2p.define_G(cond_ch, 3, depth, width)
    D = p2p.define_D("patch", cond_ch + 3, width)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    crit = p2p.GANLoss("lsgan")
    imgs, inst, types, opts = tg.sample_batch(data, batch, crop, 0, 0)
    cond = build_conditioning(inst, types, n_types, opts, n_options)
    real = tg._to_tensor_images(imgs, torch.device("cpu"))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fake = G(cond)
        loss_d = 0.5 * (crit(D.features(torch.cat([cond, fake.detach()], 1)), False)
                        + crit(D.features(torch.cat([cond, real], 1)), True))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        D.requires_grad_(False)
        loss_g = crit(D.features(torch.cat([cond, fake], 1)), True, for_discriminator=False) + p2p.l1_loss(fake, real)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def _full(sets, options, out, crop, depth, width, batch, steps) -> float:
    import pandas as pd

    from histosynth.gan.train import train_gan

    train_gan(sets, out, options=options, crop=crop, depth=depth, width=width, batch_size=batch, steps=steps,
              decay_steps=0, device="cpu", threads=1, precision="float32", log_every=1,
              sample_every=10**6, checkpoint_every=10**6)
    log = pd.read_csv(Path(out) / "log.csv")
    return float(log["seconds"].iloc[1:-1].median())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch-sets", nargs="*", help="typed patch sets with images (default: two demo slides)")
    ap.add_argument("--options", nargs="*", default=[], metavar="SLIDE=NAME")
    ap.add_argument("--steps", type=int, default=25, help="steps per measurement (default 25)")
    ap.add_argument("--translate-n", type=int, default=128, help="masks to translate (default 128)")
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out"))
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    from histosynth.io.patchset import PatchSetWriter, read_patchset
    from histosynth.gan.translate import translate

    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.patch_sets:
        sets = [Path(p) for p in args.patch_sets]
        options = dict(o.split("=", 1) for o in args.options)
    else:
        sets, options = _demo_patch_sets(workdir)

    configs = [(128, 7, 32, 4), (256, 8, 64, 1)]  # CPU default; the seed's size
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for crop, depth, width, batch in configs:
            bare = _bare(sets, options, crop, depth, width, batch, args.steps)
            full = _full(sets, options, f"{tmp}/gan-{crop}", crop, depth, width, batch, args.steps)
            rows.append({"crop": crop, "depth": depth, "width": width, "batch": batch, "bare_s_per_iter": bare,
                         "full_s_per_iter": full, "overhead": full / bare - 1})
            print(f"crop {crop} depth {depth} width {width} batch {batch}: bare {bare:.3f} s/iter, "
                  f"full {full:.3f} s/iter, overhead {100 * (full / bare - 1):+.1f} % (target <= 10 %)", flush=True)

        # translation: the 128-px generator paints masks cut from the patch sets
        src = read_patchset(sets[0], require=("inst", "types"))
        n = args.translate_n
        masks = Path(tmp) / "masks"
        with PatchSetWriter(masks, ("inst", "types"), src.inst.shape[1:3]) as w:
            for k in range(n):  # cycle through the patches as often as needed
                i = k % len(src)
                w.add(src.index.iloc[i].to_dict(), inst=src.inst[i], types=src.types[i])
        t0 = time.perf_counter()
        translate(f"{tmp}/gan-128/gan.pt", masks, Path(tmp) / "pairs", options=["all"], batch=16, device="cpu",
                  threads=1, montage=False)
        seconds = time.perf_counter() - t0
        print(f"translate: {n} masks of {src.inst.shape[1]} px in {seconds:.2f} s = {n / seconds:.1f} patches/s "
              "(one thread, model loading included)")

    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "steps": args.steps, "train": rows,
              "translate": {"masks": n, "seconds": seconds, "patches_per_s": n / seconds}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
