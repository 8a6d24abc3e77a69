"""CLI of the patches family: rasterize, split, export, overlay."""

from __future__ import annotations

import argparse
import logging

from histosynth.cli._args import add_classes, add_option, add_seed, fraction
from histosynth.errors import HistosynthError

log = logging.getLogger("histosynth")


# -- rasterize / export / overlay ---------------------------------------------------
def _add_rasterize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rasterize", help="draw annotated nuclei onto a slide's tiles (inst + types)")
    p.add_argument("annotations", help="annotation file (GeoJSON, ImageScope/ASAP XML, .mat, label image, ...)")
    p.add_argument("tiles_dir", help="the slide's tile patch set (from `histosynth tile`)")
    p.add_argument("out_dir", help="output patch set (images + inst + types)")
    add_classes(p, "class name to type id (1..255); none: every nucleus is type 1", nargs="*")
    add_option(p, "--catch-all", key="catch_all", metavar="NAME_OR_ID",
               help="class for names not in --classes (none: unknown names are an error)")
    add_option(p, "--max-dropped-fraction", key="rasterize.max_dropped_fraction", type=fraction,
               help="stop when the reader drops more than this fraction of the file's items (all: always)")
    add_option(p, "--max-vertices", key="rasterize.max_vertices", type=int,
               help="the most vertices one outline may have (a longer one: the file is refused as corrupt)")
    add_option(p, "--tissue-regions", key="rasterize.tissue_regions", nargs="*", metavar="NAME=LABEL",
               help="annotation classes that are tissue regions, not nuclei: filled into tissue.npy with these "
                    "labels (1..255; outside every region 0 = air; the smallest region wins where they overlap)")
    p.add_argument("--regions-file", metavar="FILE",
                   help="read the --tissue-regions polygons from this annotation file (any format; e.g. an ASAP "
                        "XML of tissue groups) instead of from the nuclei's file")
    p.add_argument("--overlay", metavar="PNG", help="also draw outlines on a few patches into this PNG")
    add_option(p, "--overlay-per-slide", key="rasterize.overlay_per_slide", type=int,
               help="patches drawn in the --overlay PNG")
    p.set_defaults(func=_run_rasterize)


def _run_rasterize(args: argparse.Namespace) -> None:
    from histosynth.patches.export import overlay
    from histosynth.io.labels import parse_class_map, read_class_map
    from histosynth.patches.annotate import rasterize_patchset
    from histosynth.patches.regions import parse_tissue_regions

    class_map = parse_class_map(args.classes)
    catch_all = int(args.catch_all) if args.catch_all and args.catch_all.isdigit() else args.catch_all
    rasterize_patchset(args.annotations, args.tiles_dir, args.out_dir, class_map, catch_all,
                       max_dropped_fraction=args.max_dropped_fraction, max_vertices=args.max_vertices,
                       tissue_regions=parse_tissue_regions(args.tissue_regions), regions_file=args.regions_file)
    if args.overlay:
        names = read_class_map(class_map) if class_map else None
        overlay(args.out_dir, args.overlay, per_slide=args.overlay_per_slide, class_names=names)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from histosynth.patches.formats import FORMATS  # no numpy: the parser is built for every command

    p = sub.add_parser("export", help="copy a patch set out as PNG files, PanNuke arrays, HoVer-Net .npy/.mat "
                                      "or QuPath GeoJSON")
    p.add_argument("patch_set")
    p.add_argument("out", help="output directory (replaced when it exists)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="geojson: one SLIDE.geojson per slide in level-0 slide coordinates (patches without "
                        "them: patches/NAME.geojson in patch pixels); hovernet-mat: one NAME.mat per patch "
                        "(inst_map, inst_uid, inst_type, inst_centroid, type_map)")
    p.add_argument("--n-types", type=int, help="type channels for pannuke (default: the largest type id)")
    p.add_argument("--object-type", metavar="TYPE",
                   help="QuPath object type of geojson features: annotation (the default) or detection "
                        "(for predictions, or very many nuclei, which QuPath draws faster as detections)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from histosynth.patches.export import export

    extra = {} if args.object_type is None else {"object_type": args.object_type}  # default: export()'s
    export(args.patch_set, args.out, args.format, n_types=args.n_types, **extra)


def _add_overlay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("overlay", help="PNG of nucleus outlines on a few patches per slide")
    p.add_argument("patch_set")
    p.add_argument("out_png")
    add_option(p, "--per-slide", key="rasterize.overlay_per_slide", type=int, help="patches drawn per slide")
    add_seed(p, help="breaks ties between equally full patches")
    p.set_defaults(func=_run_overlay)


def _run_overlay(args: argparse.Namespace) -> None:
    from histosynth.patches.export import overlay

    overlay(args.patch_set, args.out_png, per_slide=args.per_slide, seed=args.seed)


# -- split ------------------------------------------------------------------------
def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="assign whole slides to train / test (split.csv)")
    p.add_argument("out", help="output CSV (slide, split)")
    p.add_argument("--slides", nargs="*", required=True,
                   help="all (annotated) slide names of the run; fewer than two all go to train")
    add_option(p, "--test-fraction", key="split.test_fraction", type=float, help="fraction of slides for test")
    add_seed(p, key="split.seed")
    add_option(p, "--train", key="split.train", nargs="*", help="explicit train slides (with --test: no random split)")
    add_option(p, "--test", key="split.test", nargs="*", help="explicit test slides")
    p.add_argument("--groups", nargs="*", metavar="SLIDE=GROUP",
                   help="split each group (e.g. stain style) on its own")
    p.set_defaults(func=_run_split)


def _run_split(args: argparse.Namespace) -> None:
    from histosynth.patches.split import split_slides, write_split

    groups = None
    if args.groups:
        bad = [g for g in args.groups if "=" not in g]
        if bad:
            raise HistosynthError(f"--groups takes SLIDE=GROUP pairs, got {bad}")
        groups = dict(g.split("=", 1) for g in args.groups)
    table = split_slides(args.slides, args.test_fraction, args.seed, train=args.train, test=args.test,
                         groups=groups)
    write_split(table, args.out)


def register(sub: argparse._SubParsersAction) -> None:
    _add_rasterize(sub)
    _add_split(sub)
    _add_export(sub)
    _add_overlay(sub)
