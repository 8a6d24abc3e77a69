"""Benchmark: how HoVer-Net's post-processing depends on the size of the window it runs on.

One forward pass of a trained segmenter over a square region of a slide; the
same NP / HV maps are then post-processed (``histosynth.models.hovernet.postprocess``,
the official procedure) as one window and as a grid of smaller windows, and
the nuclei are counted. The network's output is identical in every case, so
any difference comes from the post-processing alone: it rescales the HV maps
and their Sobel gradients by their min / max over the window, and a larger
window holds more extreme values. Whole-slide segmentation post-processes
tile by tile (``segment.tile``), as HoVer-Net's own whole-slide mode does with
its chunks; this measures what that choice does to the counts.

    python benchmarks/postprocess_window.py --model MODEL.pt --slide ../shared/data/wsi/CMU-1-Small-Region.svs \
        --size 2048 --mpp 0.5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--slide", required=True)
    ap.add_argument("--size", type=int, default=2048, help="side of the region, level-0 pixels, from (0, 0)")
    ap.add_argument("--windows", type=int, nargs="+", default=[1024, 512, 256])
    ap.add_argument("--mpp", type=float, default=None, help="um/px for the post-processing sizes (default: model's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from histosynth.io.slides import open_slide
    from histosynth.models.hovernet import postprocess, sizes_at
    from histosynth.segmentation.segmenter import load_segmenter, predict

    torch.set_num_threads(args.threads)
    seg = load_segmenter(args.model)
    with open_slide(args.slide) as slide:
        image = slide.read_region(0, 0, 0, args.size, args.size)
    t0 = time.perf_counter()
    maps = predict(seg, image)
    forward_s = time.perf_counter() - t0
    sizes = sizes_at(args.mpp or seg.mpp)
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "region": args.size,
              "forward_s": forward_s, "one_window": int(postprocess(maps["np"], maps["hv"], **sizes)[0].max()),
              "hv_percentiles_0.1_99.9": [float(v) for v in np.percentile(maps["hv"], [0.1, 99.9])], "grids": {}}
    for w in args.windows:
        n = 0
        for y in range(0, args.size, w):
            for x in range(0, args.size, w):
                n += int(postprocess(maps["np"][y : y + w, x : x + w], maps["hv"][:, y : y + w, x : x + w],
                                     **sizes)[0].max())
        result["grids"][w] = n  # a nucleus cut by a window border counts once per window here
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
