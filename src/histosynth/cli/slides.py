"""CLI of the slides family: demo-slides, tile, slide-info."""

from __future__ import annotations

import argparse
import json
import logging

from histosynth.cli._args import add_option, add_seed, add_threads, fraction, positive_float, region
from histosynth.errors import HistosynthError

log = logging.getLogger("histosynth")


# -- demo-slides --------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-slides", help="write synthetic H&E demo slides with nucleus GeoJSON")
    p.add_argument("out_dir", help="output directory (slides.csv, *.tif, *.geojson)")
    add_option(p, "--n-slides", key="slides.demo.n_slides", type=int, help="number of slides")
    add_option(p, "--size", key="slides.demo.size", type=int, nargs=2, metavar=("W", "H"),
               help="level-0 width and height in pixels")
    add_option(p, "--mpp", key="slides.demo.mpp", type=positive_float, help="micrometres per pixel (0.25: 40x)")
    add_seed(p, key="slides.demo.seed")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from histosynth.slides.demo import make_demo_slides

    table = make_demo_slides(
        args.out_dir, n_slides=args.n_slides, size=tuple(args.size), seed=args.seed, mpp=args.mpp,
        progress=args.progress,
    )
    log.info("wrote %d demo slides to %s", len(table), args.out_dir)


# -- tile ------------------------------------------------------------------------
def add_max_pixels(p: argparse.ArgumentParser) -> None:
    """``--max-pixels`` (tile.max_pixels): the largest image read whole, checked from its header."""
    add_option(p, "--max-pixels", key="tile.max_pixels", type=int,
               help="refuse an image read whole (not through OpenSlide) whose header claims more pixels")


def _add_tile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tile", help="cut a slide into tiles at a target resolution (a patch set)")
    p.add_argument("slide", help="slide or image file")
    p.add_argument("out_dir", help="output patch-set directory (index.csv + images.npy)")
    p.add_argument("--name", help="slide name recorded in index.csv (default: file name without suffix)")
    add_option(p, "--size", key="tile.size", type=int, help="tile side in output pixels")
    add_option(p, "--mpp", key="tile.target_mpp", type=positive_float, dest="target_mpp",
               help="tile resolution in um/px", none="the slide's level-0 resolution")
    add_option(p, "--stride", key="tile.stride", type=int,
               help="step between tiles in output pixels (none: --size, no overlap)")
    add_option(p, "--background-threshold", key="tile.background_threshold", type=int,
               help="grey value above which a pixel is background")
    add_option(p, "--max-background", key="tile.max_background", type=fraction,
               help="drop tiles with more background than this fraction (1 keeps all)")
    add_option(p, "--edge", key="tile.edge",
               help="tiles past the slide edge: pad with background and flag, or drop")
    p.add_argument("--region", type=region, action="append", default=[], metavar="X,Y,W,H",
                   help="tile only this level-0 region (repeatable)")
    p.add_argument("--regions-from", metavar="ANNOTATIONS",
                   help="tile only the annotated areas of this annotation file")
    add_option(p, "--mpp-fallback", key="mpp_fallback", type=positive_float,
               help="um/px to assume when the slide states none (none: that is an error)")
    add_max_pixels(p)
    add_threads(p, "tile", help="threads decoding slide tiles and probing them for background")
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
    tile_slide(args.slide, args.out_dir, params, mpp_fallback=args.mpp_fallback, max_pixels=args.max_pixels,
               slide_name=args.name, progress=args.progress, threads=args.threads)


# -- slide-info --------------------------------------------------
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slide-info", help="print what the reader sees in a slide (JSON)")
    p.add_argument("slide")
    add_option(p, "--mpp-fallback", key="mpp_fallback", type=positive_float,
               help="um/px to assume when the slide states none")
    add_max_pixels(p)
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from histosynth.io.slides import open_slide
    from histosynth.multifocus.zstack import focal_planes

    with open_slide(args.slide, mpp_fallback=args.mpp_fallback, max_pixels=args.max_pixels) as slide:
        info = slide.describe()
    planes = focal_planes(args.slide)  # None for a single-plane slide: its output stays as it was
    if planes is not None:
        info["focal_planes"] = planes
    print(json.dumps(info, indent=2))


def register(sub: argparse._SubParsersAction) -> None:
    _add_demo(sub)
    _add_tile(sub)
    _add_info(sub)
