"""CLI of the multifocus family (issue 20): demo-zstack, extract-stacks, evaluate-stacks, stack-baselines.

``demo-zstack`` is its own command rather than a flag of ``demo-slides``: its output is not a slide table
with nucleus annotations for the main DAG but multi-plane OME-TIFFs with a table of cell depths, and it
takes settings (planes, focal spacing, cells) that no other demo has.
"""

from __future__ import annotations

import argparse
import logging

from histosynth.cli._args import add_device, add_option, add_seed, add_threads, positive_float

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


# -- evaluate-stacks -------------------------------------------------------------
def _add_evaluate_stacks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-stacks", help="score generated cell stacks against real ones: FID per focal "
                                               "plane, focus curve, outline consistency, real-vs-real floor")
    p.add_argument("paths", nargs="+", metavar="REAL_STACKS GENERATED_STACKS... OUT_DIR",
                   help="the real (held-out) stack set, one or more generated stack sets, then the output folder "
                        "(evaluation.json, table.md, montage.png)")
    p.add_argument("--names", nargs="+", metavar="NAME", help="a name per generated set (default: folder names)")
    add_option(p, "--fid", key="multifocus.evaluate_fid",
               help="FID / KID per plane when the optional Inception package is installed")
    add_option(p, "--max-images", key="multifocus.evaluate_max_images", type=int,
               help="at most this many images per side and plane for FID / KID")
    add_option(p, "--montage-stacks", key="multifocus.evaluate_montage_stacks", type=int,
               help="stacks per set in montage.png")
    add_seed(p, key="multifocus.evaluate_seed", help="seed of the floor's halves, the FID draws and the montage")
    add_device(p)
    add_threads(p, "multifocus")
    p.set_defaults(func=_run_evaluate_stacks)


def _run_evaluate_stacks(args: argparse.Namespace) -> None:
    from histosynth.errors import HistosynthError
    from histosynth.multifocus.evaluate import evaluate_stacks

    if len(args.paths) < 3:
        raise HistosynthError("evaluate-stacks takes REAL_STACKS GENERATED_STACKS... OUT_DIR: the real set, at "
                              "least one generated set and the output")
    evaluate_stacks(args.paths[0], args.paths[1:-1], args.paths[-1], names=args.names, seed=args.seed,
                    fid=args.fid, max_images=args.max_images, device=args.device, threads=args.threads,
                    montage_stacks=args.montage_stacks)
    log.info("wrote evaluation.json, table.md and montage.png to %s", args.paths[-1])


# -- stack-baselines -------------------------------------------------------------
def _add_stack_baselines(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack-baselines", help="write a baseline stack set (copy: the base image on every plane; "
                                               "blur: the base image blurred by the real mean focus curve)")
    p.add_argument("real", help="real stack set (best planes = base images; its mean focus curve for blur)")
    p.add_argument("out_dir", help="output stack set")
    p.add_argument("--kind", required=True, choices=("copy", "blur"), help="which baseline")
    p.add_argument("--base", metavar="STACKS", help="take the base images from this stack set's best planes "
                                                    "(e.g. G1 samples) instead of the real ones")
    add_seed(p, key="multifocus.evaluate_seed", help="seed of the images the blur is fitted on")
    p.set_defaults(func=_run_stack_baselines)


def _run_stack_baselines(args: argparse.Namespace) -> None:
    from histosynth.multifocus.baselines import make_baseline

    make_baseline(args.real, args.out_dir, args.kind, base_dir=args.base, seed=args.seed)


def register(sub: argparse._SubParsersAction) -> None:
    _add_demo_zstack(sub)
    _add_extract_stacks(sub)
    _add_evaluate_stacks(sub)
    _add_stack_baselines(sub)


# -- MI-GAN commands (train-migan-g1, ...) go below
