"""`histosynth <stage> ...`: every Snakemake rule is one call of this CLI.

Errors from bad input print one line, ``error: <file>: <problem>``, and exit
with status 2; nothing half-written is left behind (stages write through
temporary names).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from histosynth import __version__
from histosynth.errors import HistosynthError

log = logging.getLogger("histosynth")

EXIT_BAD_INPUT = 2


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _region(text: str) -> tuple[int, int, int, int]:
    parts = text.replace(",", " ").split()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"a region is X,Y,W,H in level-0 pixels, got {text!r}")
    x, y, w, h = (int(float(p)) for p in parts)
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"region width and height must be positive, got {text!r}")
    return x, y, w, h


# -- demo-slides --------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-slides", help="write synthetic H&E demo slides with nucleus GeoJSON")
    p.add_argument("out_dir", help="output directory (slides.csv, *.tif, *.geojson)")
    p.add_argument("--n-slides", type=int, default=4, help="number of slides (default 4)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(4096, 4096),
                   help="level-0 width and height in pixels (default 4096 4096)")
    p.add_argument("--mpp", type=_positive_float, default=0.25, help="micrometres per pixel (default 0.25, 40x)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from histosynth.demo import make_demo_slides

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
    p.add_argument("--mpp", type=_positive_float, dest="target_mpp",
                   help="tile resolution in um/px (default: the slide's level-0 resolution)")
    p.add_argument("--stride", type=int, help="step between tiles in output pixels (default: --size)")
    p.add_argument("--background-threshold", type=int, default=204,
                   help="grey value above which a pixel is background (default 204)")
    p.add_argument("--max-background", type=_fraction, default=0.85,
                   help="drop tiles with more background than this fraction (default 0.85; 1 keeps all)")
    p.add_argument("--edge", choices=("pad", "drop"), default="pad",
                   help="tiles past the slide edge: pad with background and flag, or drop (default pad)")
    p.add_argument("--region", type=_region, action="append", default=[], metavar="X,Y,W,H",
                   help="tile only this level-0 region (repeatable)")
    p.add_argument("--regions-from", metavar="ANNOTATIONS",
                   help="tile only the annotated areas of this annotation file")
    p.add_argument("--mpp-fallback", type=_positive_float,
                   help="um/px to assume when the slide states none (otherwise that is an error)")
    p.add_argument("--threads", type=int, default=1, help="threads decoding slide tiles and probing them for background (default 1)")
    p.set_defaults(func=_run_tile)


def _run_tile(args: argparse.Namespace) -> None:
    from histosynth.tiling import TileParams, annotation_regions, tile_slide

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


# -- rasterize / export / overlay ---------------------------------------------------
def _add_rasterize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rasterize", help="draw annotated nuclei onto a slide's tiles (inst + types)")
    p.add_argument("annotations", help="annotation file (GeoJSON, ImageScope/ASAP XML, .mat, label image, ...)")
    p.add_argument("tiles_dir", help="the slide's tile patch set (from `histosynth tile`)")
    p.add_argument("out_dir", help="output patch set (images + inst + types)")
    p.add_argument("--classes", nargs="*", metavar="NAME=ID",
                   help="class name to type id (1..255); omitted: every nucleus is type 1")
    p.add_argument("--catch-all", metavar="NAME_OR_ID",
                   help="class for names not in --classes (otherwise unknown names are an error)")
    p.add_argument("--overlay", metavar="PNG", help="also draw outlines on a few patches into this PNG")
    p.set_defaults(func=_run_rasterize)


def _run_rasterize(args: argparse.Namespace) -> None:
    from histosynth.export import overlay
    from histosynth.patches import parse_class_map, rasterize_patchset

    class_map = parse_class_map(args.classes)
    catch_all = int(args.catch_all) if args.catch_all and args.catch_all.isdigit() else args.catch_all
    rasterize_patchset(args.annotations, args.tiles_dir, args.out_dir, class_map, catch_all)
    if args.overlay:
        names = {v: k for k, v in class_map.items()} if class_map else None
        overlay(args.out_dir, args.overlay, class_names=names)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="copy a patch set out as PNG files, PanNuke arrays or HoVer-Net .npy")
    p.add_argument("patch_set")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", required=True, choices=("png", "pannuke", "hovernet"))
    p.add_argument("--n-types", type=int, help="type channels for pannuke (default: the largest type id)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from histosynth.export import export

    export(args.patch_set, args.out, args.format, n_types=args.n_types)


def _add_overlay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("overlay", help="PNG of nucleus outlines on a few patches per slide")
    p.add_argument("patch_set")
    p.add_argument("out_png")
    p.add_argument("--per-slide", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_overlay)


def _run_overlay(args: argparse.Namespace) -> None:
    from histosynth.export import overlay

    overlay(args.patch_set, args.out_png, per_slide=args.per_slide, seed=args.seed)


# -- split ------------------------------------------------------------------------
def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="assign whole slides to train / test (split.csv)")
    p.add_argument("out", help="output CSV (slide, split)")
    p.add_argument("--slides", nargs="+", required=True, help="all slide names of the run")
    p.add_argument("--test-fraction", type=float, default=0.25, help="fraction of slides for test (default 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", nargs="*", help="explicit train slides (with --test: no random split)")
    p.add_argument("--test", nargs="*", help="explicit test slides")
    p.add_argument("--groups", nargs="*", metavar="SLIDE=GROUP",
                   help="split each group (e.g. stain style) on its own")
    p.set_defaults(func=_run_split)


def _run_split(args: argparse.Namespace) -> None:
    from histosynth.split import split_slides, write_split

    groups = None
    if args.groups:
        bad = [g for g in args.groups if "=" not in g]
        if bad:
            raise HistosynthError(f"--groups takes SLIDE=GROUP pairs, got {bad}")
        groups = dict(g.split("=", 1) for g in args.groups)
    table = split_slides(args.slides, args.test_fraction, args.seed, train=args.train, test=args.test,
                         groups=groups)
    write_split(table, args.out)


# -- slide-info / check-config --------------------------------------------------
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slide-info", help="print what the reader sees in a slide (JSON)")
    p.add_argument("slide")
    p.add_argument("--mpp-fallback", type=_positive_float)
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from histosynth.io.slides import open_slide

    with open_slide(args.slide, mpp_fallback=args.mpp_fallback) as slide:
        print(json.dumps(slide.describe(), indent=2))


def _add_check_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-config", help="validate a config.yaml against the schema and list its slides")
    p.add_argument("config", help="config.yaml")
    p.set_defaults(func=_run_check_config)


def _run_check_config(args: argparse.Namespace) -> None:
    from pathlib import Path

    from histosynth.config import load_config_file, slide_table

    cfg = load_config_file(args.config)
    table = slide_table(cfg, Path(args.config).parent)
    print(f"{args.config}: valid; {len(table)} slides ({cfg['slides']['source']})")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_tile, _add_rasterize, _add_split, _add_export, _add_overlay, _add_info, _add_check_config,
]


#: stages whose modules register their own subcommands (``add_cli``); imported
#: only when their command is run (or for --help), since some import torch
STAGE_MODULES: dict[str, str] = {
    "fit-stats": "histosynth.stats",
    "nuclei-library": "histosynth.library",
    "train-dvae": "histosynth.train_dvae",
    "dvae-sweep": "histosynth.train_dvae",
    "sample-masks": "histosynth.sample_masks",
    "evaluate-masks": "histosynth.evaluate_masks",
    "train-gan": "histosynth.train_gan",
    "translate": "histosynth.translate",
    "evaluate-images": "histosynth.evaluate_images",
    "train-segmenter": "histosynth.segmenter",
    "score": "histosynth.score",
    "report": "histosynth.report",
}
#: subcommands each module's add_cli registers
_MODULE_COMMANDS: dict[str, set[str]] = {}
for _cmd, _mod in STAGE_MODULES.items():
    _MODULE_COMMANDS.setdefault(_mod, set()).add(_cmd)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv`` only the module of the command being run is imported."""
    import importlib

    parser = argparse.ArgumentParser(prog="histosynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"histosynth {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--progress", action="store_true", help="progress bars (tqdm) on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for add in COMMANDS:
        add(sub)
    command = next((a for a in (argv or []) if not a.startswith("-")), None)
    wanted = [STAGE_MODULES[command]] if command in STAGE_MODULES else []
    if argv is None or (command not in STAGE_MODULES and command not in sub.choices):
        wanted = list(STAGE_MODULES.values())  # help, or an unknown command: list every stage
    for module in dict.fromkeys(wanted):
        if not _MODULE_COMMANDS[module] & set(sub.choices):
            importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except HistosynthError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
