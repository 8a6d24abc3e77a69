"""CLI of the slides family: demo-slides, tile, slide-info."""

from __future__ import annotations

import argparse
import json
import logging

from histosynth.cli._args import fraction, positive_float, region
from histosynth.errors import HistosynthError

log = logging.getLogger("histosynth")


# -- demo-slides --------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-slides", help="write synthetic H&E demo slides with nucleus GeoJSON")
    p.add_argument("out_dir", help="output directory (slides.csv, *.tif, *.geojson)")
    p.add_argument("--n-slides", type=int, default=4, help="number of slides (default 4)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(4096, 4096),
                   help="level-0 width and height in pixels (default 4096 4096)")
    p.add_argument("--mpp", type=positive_float, default=0.25, help="micrometres per pixel (default 0.25, 40x)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from histosynth.slides.demo import make_demo_slides

    table = make_demo_slides(
        args.out_dir, n_slides=args.n_slides, size=tuple(args.size), seed=args.seed, mpp=args.mpp,
        progress=args.progress,
    )
    log.info("wrote %d demo slides to %s", len(table), args.out_dir)


# -- tile ------------------------------------------------------------------------
def _add_tile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tile", help="cut a slide into tiles at a target resolution (a patch set)")
    p.add_argument("slide", help="slide or image file")
    p.add_argument("out_dir", help="output patch-set directory (index.csv + images.npy)")
    p.add_argument("--name", help="slide name recorded in index.csv (default: file name without suffix)")
    p.add_argument("--size", type=int, default=256, help="tile side in output pixels (default 256)")
    p.add_argument("--mpp", type=positive_float, dest="target_mpp",
                   help="tile resolution in um/px (default: the slide's level-0 resolution)")
    p.add_argument("--stride", type=int, help="step between tiles in output pixels (default: --size)")
    p.add_argument("--background-threshold", type=int, default=204,
                   help="grey value above which a pixel is background (default 204)")
    p.add_argument("--max-background", type=fraction, default=0.85,
                   help="drop tiles with more background than this fraction (default 0.85; 1 keeps all)")
    p.add_argument("--edge", choices=("pad", "drop"), default="pad",
                   help="tiles past the slide edge: pad with background and flag, or drop (default pad)")
    p.add_argument("--region", type=region, action="append", default=[], metavar="X,Y,W,H",
                   help="tile only this level-0 region (repeatable)")
    p.add_argument("--regions-from", metavar="ANNOTATIONS",
                   help="tile only the annotated areas of this annotation file")
    p.add_argument("--mpp-fallback", type=positive_float,
                   help="um/px to assume when the slide states none (otherwise that is an error)")
    p.add_argument("--threads", type=int, default=1, help="threads decoding slide tiles and probing them for background (default 1)")
    p.set_defaults(func=_run_tile)


def _run_tile(args: argparse.Namespace) -> None:
    from histosynth.slides.tiling import TileParams, annotation_regions, tile_slide

    regions = list(args.region)
    if args.regions_from:
        regions += annotation_regions(args.regions_from)
    params = TileParams(
        size=args.size,
        target_mpp=args.target_mpp,
        stride=args.stride,
        background_threshold=args.background_threshold,
        max_background=args.max_background,
        edge=args.edge,
        regions=regions,
    )
    if args.threads < 1:
        raise HistosynthError(f"--threads must be at least 1, got {args.threads}")
    tile_slide(args.slide, args.out_dir, params, mpp_fallback=args.mpp_fallback, slide_name=args.name,
               progress=args.progress, threads=args.threads)


# -- slide-info --------------------------------------------------
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slide-info", help="print what the reader sees in a slide (JSON)")
    p.add_argument("slide")
    p.add_argument("--mpp-fallback", type=positive_float)
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from histosynth.io.slides import open_slide

    with open_slide(args.slide, mpp_fallback=args.mpp_fallback) as slide:
        print(json.dumps(slide.describe(), indent=2))



def register(sub: argparse._SubParsersAction) -> None:
    _add_demo(sub)
    _add_tile(sub)
    _add_info(sub)
