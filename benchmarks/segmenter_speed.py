"""HoVer-Net training speed on this machine: loop overhead, and which tricks pay (issue #14).

In one process, on the same patch sets, for each network size (``--widths``):

- ``bare valid``: the paper's valid-padded network, one fixed batch already on
  the device, forward + HoVer-Net loss + backward + Adam step — nothing else.
  Its input is ``--valid-input`` (224 → 132 px output by default).
- ``bare valid channels_last``: the same with the model and batch in
  channels-last memory format.
- ``bare same``: the same-padded network (``padding="same"``) at
  ``--same-input`` (128 → 128 px).
- ``bare same channels_last``, ``bare same compile`` (``torch.compile``; its
  compile time reported apart) and ``bare same bf16`` (autocast; only where
  :func:`histosynth.training.cpu_native_bf16` finds native bf16 — emulated
  bf16 is many times slower and is not measured).
- ``loop same``: :func:`histosynth.segmentation.segmenter.train_segmenter` for
  the same steps and batch (window sampling, augmentation, targets,
  logging); seconds per step from ``train.json`` (training steps only, the
  validation passes timed apart).

Figures: seconds per step, and output pixels per second (what a segmenter
learns from: a valid-padded network sees only the centre of each window).
The target is ``loop same`` within 10 % of its peer, ``bare same
channels_last``: the loop's batches reach the network as a channels-last
view (``to_input`` permutes the NHWC arrays), and convolutions keep that
layout. Without
``--patch-sets`` two demo slides are generated, tiled and rasterized into
``--workdir``.

    python benchmarks/segmenter_speed.py --threads 2 --out benchmarks/out/segmenter_speed.json
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


def _demo_patch_sets(workdir: Path) -> list[Path]:
    """Two demo slides tiled and rasterized (built as benchmarks/gan.py builds them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gan import _demo_patch_sets as gan_demo_sets

    return gan_demo_sets(workdir)[0]


def _fixed_batch(sets, size: int, batch: int):
    from histosynth.io.pool import load_pool
    from histosynth.segmentation.segmenter import sample_batch

    return sample_batch([load_pool(sets)], [1.0], batch, size, seed=0, step=0)


def _bare(sets, *, width: int, padding: str, size: int, batch: int, steps: int, n_types: int,
          channels_last: bool = False, compile_: bool = False, bf16: bool = False) -> dict:
    import torch

    from histosynth.models import hovernet as hn
    from histosynth.segmentation.segmenter import batch_targets, to_input

    torch.manual_seed(0)
    model = hn.HoVerNet(n_types=n_types or None, width=width, units=(1, 1, 1, 1), padding=padding)
    out = int(model.output_size(size))
    imgs, inst, types, valid = _fixed_batch(sets, size, batch)
    x = to_input(imgs, torch.device("cpu")).contiguous()  # to_input gives a channels-last view; this is NCHW
    targets = batch_targets(inst, types, valid, out, n_types, torch.device("cpu"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if compile_ else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = step_model(x)
        loss, _ = hn.hovernet_loss({k: v.float() for k, v in outputs.items()}, targets, valid=targets["valid"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()  # warm-up (and, for compile, the compilation)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    per = (time.perf_counter() - t0) / steps
    return {"s_per_step": per, "out_px_per_s": batch * out * out / per, "first_step_s": first, "output": out}


def _loop(sets, workdir: Path, *, width: int, size: int, batch: int, steps: int, threads: int) -> dict:
    from histosynth.segmentation.segmenter import train_segmenter

    out_dir = workdir / f"loop-w{width}-{time.time_ns()}"
    info = train_segmenter(sets, out_dir, width=width, units=(1, 1, 1, 1), padding="same", input_size=size,
                           steps=steps + 1, batch_size=batch, val_every=steps + 1, checkpoint_every=steps + 1,
                           log_every=1, device="cpu", threads=threads, precision="float32", progress=False)
    import pandas as pd

    rows = pd.read_csv(out_dir / "log.csv")
    per = float(rows["seconds"].iloc[1:-1].median()) if len(rows) > 3 else info["seconds_per_step"]
    return {"s_per_step": per, "out_px_per_s": batch * size * size / per, "validation_s": info["validation_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch-sets", nargs="*", type=Path, help="typed patch sets (default: two demo slides)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "histosynth-bench")
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--valid-input", type=int, default=224)
    ap.add_argument("--same-input", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from histosynth.io.labels import classes_of_patch_sets
    from histosynth.training import cpu_native_bf16

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    sets = args.patch_sets or _demo_patch_sets(args.workdir)
    n_types = max(classes_of_patch_sets(sets), default=0)
    native = cpu_native_bf16()
    results = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "native_bf16": native,
               "batch": args.batch, "steps": args.steps, "configs": {}}
    common = {"batch": args.batch, "steps": args.steps, "n_types": n_types}
    for width in args.widths:
        rows = {
            "bare valid": _bare(sets, width=width, padding="valid", size=args.valid_input, **common),
            "bare valid channels_last": _bare(sets, width=width, padding="valid", size=args.valid_input,
                                              channels_last=True, **common),
            "bare same": _bare(sets, width=width, padding="same", size=args.same_input, **common),
            "bare same channels_last": _bare(sets, width=width, padding="same", size=args.same_input,
                                             channels_last=True, **common),
        }
        if args.compile:
            rows["bare same compile"] = _bare(sets, width=width, padding="same", size=args.same_input,
                                              compile_=True, **common)
        if native:
            rows["bare same bf16"] = _bare(sets, width=width, padding="same", size=args.same_input, bf16=True,
                                           **common)
        else:
            rows["bare same bf16"] = {"skipped": "no native bf16 in the CPU flags"}
        rows["loop same"] = _loop(sets, args.workdir, width=width, size=args.same_input, batch=args.batch,
                                  steps=args.steps, threads=args.threads)
        # the loop's input is a channels-last view (to_input permutes NHWC), so its peer is the channels-last bare
        base = rows["bare same channels_last"]["s_per_step"]
        rows["loop same"]["overhead"] = rows["loop same"]["s_per_step"] / base - 1
        for name, row in rows.items():
            if "s_per_step" in row:
                row["px_per_s_vs_bare_valid"] = row["out_px_per_s"] / rows["bare valid"]["out_px_per_s"]
            print(f"width {width:3d}  {name:26s} " + "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        results["configs"][f"width-{width}"] = rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
