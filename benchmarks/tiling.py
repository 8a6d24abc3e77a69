"""Tiles per second of `histosynth tile` against two peers measured in the same run.

For each slide, over the same grid of tiles (``--size`` px at the slide's
level-0 resolution unless ``--mpp`` is given):

- ``histosynth``: :func:`histosynth.slides.tiling.tile_slide`, the whole stage:
  low-resolution tissue pre-filter, decoding, tissue filter, writing
  ``images.npy`` + ``index.csv``;
- ``read_region``: a plain OpenSlide loop, ``read_region`` + RGB conversion
  for every grid tile (what a naive tiler does before any filtering);
- ``decode floor``: reading and decoding, with tifffile/imagecodecs, every
  JPEG tile of the TIFF level under the grid, and nothing else — the
  minimum any tiler that decodes the whole grid must pay;
- ``kept floor``: reading and decoding only the JPEG tiles under the tiles
  that ``histosynth`` keeps, and writing as many bytes as those tiles hold —
  the least work any tiler that writes the same tiles must do (a lower
  bound: no tissue test, no assembly of tiles from TIFF tiles, no index).
  ``read_region / kept floor`` is thus the most any tiler could reach
  against the read_region loop with this decoder on one thread.

Rates are grid tiles per second (grid tiles / wall time), so a tiler that
rules out background without decoding it can beat the floor. Each method runs
in a fresh child process (one thread; ``histosynth_2threads`` decodes with
two, shown for information, not used in the ratios) so its peak RSS is its own; the best of
``--repeat`` runs is kept. Without ``--slides`` it uses
``../shared/data/wsi/CMU-1-Small-Region.svs`` and a demo slide of
``--demo-size`` px generated into ``--workdir`` (reused when present), and with
``--single-level`` a copy of that slide with no pyramid (240-px JPEG tiles).

    python benchmarks/tiling.py --demo-size 20480 --out benchmarks/out/tiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM starts afresh at exec; ru_maxrss would include the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(method: str, slide: str, size: int, mpp: float | None, out: str) -> dict:
    from histosynth.io.slides import open_slide
    from histosynth.slides.tiling import TileParams, plan_tiles

    params = TileParams(size=size, target_mpp=mpp)
    with open_slide(slide) as s:
        plan = plan_tiles(s, params)
        plan.level_dimensions = s.level_dimensions[plan.level]
    n_grid = len(plan.grid)
    if method == "kept_floor":  # the tiles histosynth keeps and the TIFF tiles under them, untimed
        import pandas as pd

        from histosynth.slides.tiling import tile_slide

        tile_slide(slide, out, params)
        index = pd.read_csv(Path(out) / "index.csv")
        plan.kept = list(zip(index["x"], index["y"]))
        shutil.rmtree(out)
        with open_slide(slide) as s:
            level = s._fast[plan.level]  # the reader's direct-TIFF level (a JPEG-tiled slide)
            ds, read = plan.level_downsample, plan.read_size
            plan.needed = sorted({i for x, y in plan.kept for i in level.tile_indices(int(x // ds), int(y // ds), read, read)})
    # small slides take milliseconds: repeat inside the process and keep the fastest
    inner = max(1, min(10, 2000 // max(n_grid, 1)))
    best = None
    for _ in range(inner):
        result = _measure(method, slide, plan, params, out)
        shutil.rmtree(out, ignore_errors=True)  # outside the timing: a pipeline job starts with no output
        if best is None or result["seconds"] < best["seconds"]:
            best = result
    best.update({"method": method, "grid": n_grid, "tiles_per_s": n_grid / best["seconds"],
                 "peak_rss_mb": _peak_rss_mb(), "inner_repeats": inner})
    return best


def _measure(method, slide, plan, params, out) -> dict:
    import numpy as np
    import openslide

    from histosynth.slides.tiling import tile_slide

    start = time.perf_counter()
    extra: dict = {}
    if method.startswith("histosynth"):
        threads = 2 if method.endswith("2threads") else 1
        stats = tile_slide(slide, out, params, threads=threads)
        extra = {"kept": stats.kept, "decoded": stats.decoded, "ruled_out_lowres": stats.ruled_out_lowres}
    elif method == "read_region":
        osr = openslide.OpenSlide(slide)
        read = plan.read_size
        for t in plan.grid:
            np.asarray(osr.read_region((t.x, t.y), plan.level, (read, read)).convert("RGB"))
        osr.close()
    elif method == "decode_floor":
        extra = _decode_tiles(slide, plan, None)
    elif method == "kept_floor":
        extra = _decode_tiles(slide, plan, plan.needed)
        buf = memoryview(np.full((params.size, params.size, 3), 255, np.uint8)).cast("B")
        Path(out).mkdir()
        with open(Path(out) / "images.npy", "wb") as fh:
            for _ in plan.kept:
                fh.write(buf)
        extra["kept"] = len(plan.kept)
    else:
        raise SystemExit(f"unknown method {method}")
    return {"seconds": time.perf_counter() - start, **extra}


def _decode_tiles(slide, plan, indices) -> dict:
    """Read and decode, with tifffile/imagecodecs, these TIFF tiles (None: all) of the level under the grid."""
    import tifffile

    with tifffile.TiffFile(slide) as tf:
        w, h = plan.level_dimensions
        page = next(p for p in tf.pages if p.is_tiled and (p.imagewidth, p.imagelength) == (w, h))
        indices = range(len(page.dataoffsets)) if indices is None else indices
        fd = os.open(slide, os.O_RDONLY)
        tables = page.jpegtables
        for i in indices:
            page.decode(os.pread(fd, page.databytecounts[i], page.dataoffsets[i]), i, jpegtables=tables)
        os.close(fd)
        return {"tiff_tiles": len(indices), "tiff_tile_size": [page.tilewidth, page.tilelength]}


def _run_child(method: str, slide: Path, size: int, mpp: float | None, workdir: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", method, "--slides", str(slide), "--size", str(size),
           "--workdir", str(workdir)]
    if mpp:
        cmd += ["--mpp", str(mpp)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{method} on {slide} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _demo_slide(workdir: Path, size: int) -> Path:
    from histosynth.slides.demo import make_demo_slides

    out = workdir / f"demo-{size}"
    path = out / "demo-000.tif"
    if not path.exists():
        print(f"generating a {size} x {size} demo slide in {out} ...", flush=True)
        t = time.perf_counter()
        make_demo_slides(out, n_slides=1, size=(size, size), seed=0)
        print(f"  took {time.perf_counter() - t:.0f} s", flush=True)
    return path


def _single_level_copy(demo: Path) -> Path:
    """Level 0 of the demo slide re-saved with no pyramid, in 240-px JPEG tiles (as some converters write)."""
    import tifffile

    from histosynth.io.slides import open_slide

    path = demo.with_name(demo.stem + "-single-level.tif")
    if not path.exists():
        print(f"writing a single-level copy of {demo.name} ...", flush=True)
        with open_slide(demo) as slide:
            level0 = slide.read_level(0)
            res = 1e4 / slide.mpp
        tifffile.imwrite(path, level0, tile=(240, 240), compression="jpeg", photometric="rgb",
                         resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", nargs="*", help="slides to measure (default: CMU small region + a demo slide)")
    ap.add_argument("--demo-size", type=int, default=20480, help="side of the generated demo slide (px)")
    ap.add_argument("--single-level", action="store_true",
                    help="also measure a single-level copy of the demo slide (240-px JPEG tiles, no pyramid)")
    ap.add_argument("--size", type=int, default=256, help="tile size (px)")
    ap.add_argument("--mpp", type=float, default=None, help="target um/px (default: native)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the best is kept")
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out"), help="scratch + demo slide")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    if args.child:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            print(json.dumps(_child(args.child, args.slides[0], args.size, args.mpp, f"{tmp}/tiles")))
        return

    slides = [Path(s) for s in args.slides] if args.slides else []
    if not args.slides:
        cmu = REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
        if cmu.exists():
            slides.append(cmu)
        else:
            print(f"note: {cmu} not found; measuring the demo slide only")
        slides.append(_demo_slide(workdir, args.demo_size))
        if args.single_level:
            slides.append(_single_level_copy(slides[-1]))

    results = []
    for slide in slides:
        methods = ("histosynth", "histosynth_2threads", "read_region", "decode_floor", "kept_floor")
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(args.repeat):  # interleaved, so drift in machine load hits every method alike
            for method in methods:
                runs[method].append(_run_child(method, slide, args.size, args.mpp, workdir))
        rows = {m: min(r, key=lambda x: x["seconds"]) for m, r in runs.items()}
        h = rows["histosynth"]
        result = {
            "slide": slide.name,
            "grid_tiles": h["grid"],
            "kept": h["kept"],
            "decoded": h["decoded"],
            "ruled_out_lowres": h["ruled_out_lowres"],
            "methods": rows,
            "vs_read_region": h["tiles_per_s"] / rows["read_region"]["tiles_per_s"],
            "vs_decode_floor": h["tiles_per_s"] / rows["decode_floor"]["tiles_per_s"],
            "vs_kept_floor": h["tiles_per_s"] / rows["kept_floor"]["tiles_per_s"],
            "kept_floor_vs_read_region": rows["kept_floor"]["tiles_per_s"] / rows["read_region"]["tiles_per_s"],
        }
        results.append(result)
        print(f"\n{slide.name}: {h['grid']} grid tiles of {args.size} px, {h['kept']} kept, "
              f"{h['ruled_out_lowres']} ruled out at low resolution")
        print(f"  {'method':<14}{'seconds':>9}{'tiles/s':>10}{'peak MB':>9}")
        for m, r in rows.items():
            print(f"  {m:<14}{r['seconds']:>9.2f}{r['tiles_per_s']:>10.0f}{r['peak_rss_mb']:>9.0f}")
        print(f"  histosynth / read_region = {result['vs_read_region']:.2f}x (target >= 5), "
              f"histosynth / decode floor = {result['vs_decode_floor']:.2f}x (target >= 0.5)")
        print(f"  histosynth / kept floor = {result['vs_kept_floor']:.2f}x; kept floor / read_region = "
              f"{result['kept_floor_vs_read_region']:.2f}x (the most any tiler writing these tiles could reach)")

    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "tile_size": args.size,
        "target_mpp": args.mpp,
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
