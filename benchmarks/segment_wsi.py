"""Benchmark: whole-slide segmentation (``histosynth segment``) against a bare forward pass, and its memory.

(a) Speed. For each slide, ``segment_slide`` runs end to end (tissue tiles,
reading, forward passes, stitching, post-processing, the seam rule, writing
the saved tiles and the GeoJSON / CSV) and its tissue tiles per second are
compared with a bare batched forward pass of the same model over the same
input windows of the same tiles, in the same process, after it (the regions
are read and cut into windows before that clock starts). Target: the
pipeline at >= 0.8x the bare forward's tiles/s.

(b) Memory. ``histosynth segment`` runs in a child process on a slide and on
a 2 x 2 mosaic of it (4x the area) and its peak RSS (``ru_maxrss`` of the
child) is reported for both: flat means the larger slide costs no more.

    python benchmarks/segment_wsi.py --model MODEL.pt --mpp 0.5 --threads 2 \
        --slides ../shared/data/wsi/CMU-1-Small-Region.svs DEMO.tif --out benchmarks/out/segment_wsi.json

A model that does not record its training resolution (checkpoints before
``mpp`` was saved) needs ``--mpp``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.8


def bare_forward(seg, regions: list[np.ndarray], context: int, batch: int) -> float:
    """Seconds of the model's forward passes alone over the windows ``predict`` would cut from ``regions``."""
    import torch

    from histosynth.segmentation.segmenter import _starts, network_margin, to_input

    s_in = seg.input_size
    trim = s_in // 8 if seg.arch.get("padding") == "same" else 0
    s_out = seg.output_size - 2 * trim
    margin = network_margin(seg)
    batches = []
    for image in regions:
        keep = min(context, margin)
        cut = context - keep
        img = image[cut : image.shape[0] - cut, cut : image.shape[1] - cut]
        h, w = img.shape[0] - 2 * keep, img.shape[1] - 2 * keep
        pad = margin - keep
        padded = np.pad(img, ((pad, pad + max(h, s_out) - h), (pad, pad + max(w, s_out) - w), (0, 0)),
                        mode="symmetric")
        wins = [padded[y : y + s_in, x : x + s_in] for y in _starts(max(h, s_out), s_out, s_out)
                for x in _starts(max(w, s_out), s_out, s_out)]
        batches += [to_input(np.stack(wins[i : i + batch]), torch.device("cpu")) for i in range(0, len(wins), batch)]
    with torch.no_grad():
        seg.model(batches[0])  # warm-up
        t0 = time.perf_counter()
        for x in batches:
            seg.model(x)
    return time.perf_counter() - t0


def speed(model: str, slide_path: str, mpp: float | None, threads: int, tile: int, margin: int, batch: int,
          repeats: int = 2) -> dict:
    """Pipeline and bare forward alternately, ``repeats`` times each; the best of each (load drifts on a shared
    machine: alternating keeps it from favouring one side)."""
    runs = [_speed_once(model, slide_path, mpp, threads, tile, margin, batch) for _ in range(repeats)]
    best = dict(runs[0])
    best["pipeline_s"] = min(r["pipeline_s"] for r in runs)
    best["bare_forward_s"] = min(r["bare_forward_s"] for r in runs)
    n = best["tissue_tiles"]
    best.update(pipeline_tiles_per_s=n / best["pipeline_s"], bare_tiles_per_s=n / best["bare_forward_s"],
                ratio=best["bare_forward_s"] / best["pipeline_s"], repeats=repeats,
                all_pipeline_s=[r["pipeline_s"] for r in runs], all_bare_forward_s=[r["bare_forward_s"] for r in runs])
    return best


def _speed_once(model: str, slide_path: str, mpp: float | None, threads: int, tile: int, margin: int,
                batch: int) -> dict:
    import torch

    from histosynth.io.slides import open_slide
    from histosynth.segmentation import wsi
    from histosynth.segmentation.segmenter import load_segmenter, network_margin

    torch.set_num_threads(threads)
    params = wsi.SegmentParams(tile=tile, margin=margin, batch=batch)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = wsi.segment_slide(model, slide_path, Path(tmp) / "out", params, mpp=mpp, device="cpu",
                                   threads=threads, precision="float32")
        pipeline_s = time.perf_counter() - t0
    n = report["counts"]["tissue_tiles"]
    # the same tissue tiles, read as the pipeline reads them
    seg = load_segmenter(model, "cpu")
    ctx = network_margin(seg)
    outer = margin + ctx
    t = report["tile_px"]
    with open_slide(slide_path) as slide:
        plan, candidates = wsi.plan_segment_tiles(slide, t, report["mpp"], params)
        regions = [image for _, _, image in wsi.tissue_regions(slide, plan, candidates, t, outer, params,
                                                                 {"tissue_tiles": 0, "resumed_tiles": 0,
                                                                  "background": 0})]
    assert len(regions) == n, (len(regions), n)
    bare_s = bare_forward(seg, regions, ctx, batch)
    return {"slide": slide_path, "dimensions": report["slide"]["dimensions"], "mpp": report["mpp"],
            "tissue_tiles": n, "nuclei": report["counts"]["nuclei"], "tile_px": t, "margin": margin,
            "pipeline_s": pipeline_s, "bare_forward_s": bare_s, "pipeline_tiles_per_s": n / pipeline_s,
            "bare_tiles_per_s": n / bare_s, "ratio": bare_s / pipeline_s,
            "forward_share_of_pipeline": report["forward_seconds"] / pipeline_s}


def mosaic(slide_path: str, out: Path) -> Path:
    """A 2 x 2 mosaic of the slide's level 0 as a tiled pyramid TIFF with the same µm/px."""
    import cv2
    import tifffile

    from histosynth.io.slides import open_slide

    with open_slide(slide_path) as slide:
        w, h = slide.dimensions
        img = slide.read_region(0, 0, 0, w, h)
        mpp = slide.mpp
    big = np.tile(img, (2, 2, 1))
    with tifffile.TiffWriter(out, bigtiff=True) as tw:
        data = big
        for lvl in range(3):
            res = 1e4 / (mpp * 2**lvl)
            tw.write(data, tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1 if lvl else 0,
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
            data = cv2.resize(data, (data.shape[1] // 2, data.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return out


def peak_rss(model: str, slide_path: str | Path, mpp: float | None, threads: int, tile: int, margin: int) -> dict:
    """Peak RSS (MB) of ``histosynth segment`` on one slide, in a fresh child process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c",
               "import resource, sys; from histosynth.cli import main; rc = 0\n"
               "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code or 0\n"
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)",
               "segment", model, str(slide_path), str(Path(tmp) / "out"), "--device", "cpu", "--threads",
               str(threads), "--tile", str(tile), "--margin", str(margin), "--precision", "float32",
               *(["--mpp", str(mpp)] if mpp else [])]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - t0
        rss = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("MAXRSS")][0]
        report = json.loads((Path(tmp) / "out" / "segment.json").read_text())
    return {"slide": str(slide_path), "dimensions": report["slide"]["dimensions"],
            "tissue_tiles": report["counts"]["tissue_tiles"], "nuclei": report["counts"]["nuclei"],
            "peak_rss_mb": rss / 1024, "seconds": seconds}


def seams(model: str, slide_path: str, mpp: float | None, threads: int, tile: int, margin: int, batch: int) -> dict:
    """The nuclei found whole-slide (tiles, margins, the centroid rule) against one window over the whole slide.

    Both at the model's resolution with the same network and post-processing. Duplicates: two whole-slide
    nuclei overlapping by more than half the smaller one's area (from the GeoJSON outlines). Agreement: the
    one-window nuclei matched by a whole-slide nucleus at IoU > 0.5 (label maps, the label TIFF).
    """
    import tifffile
    import torch
    from shapely import STRtree
    from shapely.geometry import shape

    from histosynth.io.slides import open_slide
    from histosynth.models.hovernet import postprocess, sizes_at
    from histosynth.segmentation import wsi
    from histosynth.segmentation.metrics import instance_metrics
    from histosynth.segmentation.segmenter import load_segmenter, predict

    torch.set_num_threads(threads)
    params = wsi.SegmentParams(tile=tile, margin=margin, batch=batch, label_tiff=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        report = wsi.segment_slide(model, slide_path, out, params, mpp=mpp, device="cpu", threads=threads,
                                   precision="float32")
        labels = tifffile.imread(out / "labels.tif")
        polys = [shape(f["geometry"]) for f in json.loads((out / "nuclei.geojson").read_text())["features"]]
    tree = STRtree(polys)
    dup = 0
    for i, j in zip(*tree.query(polys, predicate="intersects")):
        if i < j:
            a, b = polys[i], polys[j]
            if a.intersection(b).area > 0.5 * min(a.area, b.area):
                dup += 1
    seg = load_segmenter(model, "cpu")
    d = report["downsample"]
    with open_slide(slide_path) as slide:
        h, w = labels.shape
        whole = wsi.read_region_at(slide, 0, 1.0, 0, 0, max(h, w), d)[:h, :w]
    maps = predict(seg, whole, batch=batch)
    one, _ = postprocess(maps["np"], maps["hv"], maps.get("tp"), **sizes_at(report["mpp"]))
    m = instance_metrics(labels.astype(np.int32), one)
    n_one, n_wsi = int(one.max()), report["counts"]["nuclei"]
    return {"slide": slide_path, "nuclei_whole_slide": n_wsi, "nuclei_one_window": n_one,
            "relative_difference": abs(n_wsi - n_one) / max(n_one, 1), "duplicates": dup,
            "cut": report["counts"]["cut"], "dq_between_them": m.get("dq"), "pq_between_them": m.get("pq")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--slides", nargs="+", required=True)
    ap.add_argument("--mpp", type=float, default=None, help="um/px to segment at (for checkpoints without it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--margin", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="alternating pipeline / bare-forward runs per slide")
    ap.add_argument("--memory-slide", default=None, help="slide for the memory test (default: the first)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--seam-slide", default=None, help="also compare whole-slide and one-window nuclei on it")
    ap.add_argument("--only-seams", action="store_true", help="run the seam comparison only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
              or platform.machine(), "cpu": _cpu_name(), "threads": args.threads, "speed": [], "memory": []}
    if args.seam_slide:
        r = seams(args.model, args.seam_slide, args.mpp, args.threads, args.tile, args.margin, args.batch)
        result["seams"] = r
        print(f"seams on {Path(args.seam_slide).name}: {r['nuclei_whole_slide']} nuclei whole-slide vs "
              f"{r['nuclei_one_window']} in one window ({100 * r['relative_difference']:.2f} %), "
              f"{r['duplicates']} duplicates, DQ {r['dq_between_them']:.3f}", flush=True)
        if args.only_seams:
            print(json.dumps(result, indent=2, default=float))
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2, default=float))
            return
    for slide in args.slides:
        r = speed(args.model, slide, args.mpp, args.threads, args.tile, args.margin, args.batch, args.repeats)
        result["speed"].append(r)
        print(f"{Path(slide).name}: {r['tissue_tiles']} tissue tiles, {r['nuclei']} nuclei; pipeline "
              f"{r['pipeline_tiles_per_s']:.3f} tiles/s, bare forward {r['bare_tiles_per_s']:.3f} tiles/s -> "
              f"{r['ratio']:.2f}x (target >= {TARGET}x)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        small = args.memory_slide or args.slides[0]
        if args.skip_memory:
            small = None
        for path in (small, mosaic(small, Path(tmp) / "mosaic.tif")) if small else ():
            r = peak_rss(args.model, path, args.mpp, args.threads, args.tile, args.margin)
            result["memory"].append(r)
            print(f"{Path(path).name} {r['dimensions']}: peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"{r['tissue_tiles']} tissue tiles, {r['seconds']:.0f} s", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
