"""CLI of the multifocus family (issue 20): demo-zstack, extract-stacks; the MI-GAN commands below them.

``demo-zstack`` is its own command rather than a flag of ``demo-slides``: its output is not a slide table
with nucleus annotations for the main DAG but multi-plane OME-TIFFs with a table of cell depths, and it
takes settings (planes, focal spacing, cells) that no other demo has.
"""

from __future__ import annotations

import argparse
import logging

from histosynth.cli._args import add_option, add_seed, positive_float

log = logging.getLogger("histosynth")


# -- demo-zstack -----------------------------------------------------------------
def _add_demo_zstack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-zstack", help="write demo multi-focus OME-TIFF z-stacks of cytology-like cells")
    p.add_argument("out_dir", help="output directory (zstack-NN.ome.tif, cells.csv, preview.png)")
    add_option(p, "--n-slides", key="multifocus.demo.n_slides", type=int, help="number of z-stacks")
    add_option(p, "--size", key="multifocus.demo.size", type=int, nargs=2, metavar=("W", "H"),
               help="width and height in pixels")
    add_option(p, "--planes", key="multifocus.demo.planes", type=int, help="focal planes")
    add_option(p, "--spacing-um", key="multifocus.demo.spacing_um", type=positive_float,
               help="focal step between planes in um")
    add_option(p, "--mpp", key="multifocus.demo.mpp", type=positive_float, help="micrometres per pixel")
    add_option(p, "--n-cells", key="multifocus.demo.n_cells", type=int, help="cells per z-stack")
    add_seed(p, key="multifocus.demo.seed")
    p.set_defaults(func=_run_demo_zstack)


def _run_demo_zstack(args: argparse.Namespace) -> None:
    from histosynth.multifocus.demo import make_demo_zstacks

    table = make_demo_zstacks(args.out_dir, n_slides=args.n_slides, size=tuple(args.size), planes=args.planes,
                              spacing_um=args.spacing_um, mpp=args.mpp, n_cells=args.n_cells, seed=args.seed)
    log.info("wrote %d demo z-stacks (%d cells) to %s", args.n_slides, len(table), args.out_dir)


# -- extract-stacks --------------------------------------------------------------
def _add_extract_stacks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract-stacks", help="cut a size x size x Z stack around every cell of z-stack slides")
    p.add_argument("paths", nargs="+", metavar="SLIDE... OUT_DIR",
                   help="z-stack slides (OME-TIFF with a Z axis, NDPI with focal planes), then the stack set")
    add_option(p, "--size", key="multifocus.stack_size", type=int, help="stack side in pixels")
    add_option(p, "--planes", key="multifocus.planes", type=int, none="any count (the same in every slide)",
               help="focal planes each slide must have")
    add_option(p, "--max-cells", key="multifocus.max_cells", type=int,
               help="keep at most this many cells (a seeded subset; none: all)")
    add_option(p, "--min-cells", key="multifocus.min_cells", type=int, help="fewer cells found is an error")
    add_option(p, "--augment", key="multifocus.augment",
               help="add rotations 90/180/270 and up-down / left-right mirrors (source=augmented)")
    add_seed(p, key="multifocus.seed", help="seed of the --max-cells subset")
    add_option(p, "--mpp-fallback", key="mpp_fallback", type=positive_float,
               help="um/px to assume when a slide states none (none: that is an error)")
    p.set_defaults(func=_run_extract_stacks)


def _run_extract_stacks(args: argparse.Namespace) -> None:
    from histosynth.errors import HistosynthError
    from histosynth.multifocus.stacks import extract_stacks

    if len(args.paths) < 2:
        raise HistosynthError("extract-stacks takes SLIDE... OUT_DIR: at least one slide and the output")
    report = extract_stacks(args.paths[:-1], args.paths[-1], size=args.size, planes=args.planes,
                            max_cells=args.max_cells, min_cells=args.min_cells, augment=args.augment,
                            seed=args.seed, mpp_fallback=args.mpp_fallback)
    log.info("wrote %d stacks (%d cells) to %s", report["stacks"], report["cells"], args.paths[-1])


def register(sub: argparse._SubParsersAction) -> None:
    _add_demo_zstack(sub)
    _add_extract_stacks(sub)


# -- MI-GAN commands (train-migan-g1, ...) go below
