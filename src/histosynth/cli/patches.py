"""CLI of the patches family: rasterize, import-patches, split, export, overlay."""

from __future__ import annotations

import argparse
import logging

from histosynth.cli._args import add_classes, add_option, add_seed, fraction, parse_pairs, positive_float
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

# -- import-patches -------------------------------------------------------------------
def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-patches", help="a patch dataset (images + instance maps + types) -> one typed "
                                              "patch set per group (histosynth.patches.importer)")
    p.add_argument("out", help="the patch set of --group; without --group a folder of one patch set per group")
    p.add_argument("--group", help="write only this group's patch set (the regex's first group; default: all)")
    add_option(p, "--images", key="slides.patches.images",
               help="glob of the patch images (relative paths: to the current folder)")
    add_option(p, "--inst", key="slides.patches.inst", metavar="PATTERN",
               help="instance-map path of an image, {stem} = its name without suffix (.npy/.png/.tif/.mat)")
    add_option(p, "--types", key="slides.patches.types", metavar="PATTERN",
               help="types file of an image, {stem} as in --inst: .mat (inst_type in ascending id order, or "
                    "type_map) or a type-map image (none: every nucleus type 1)")
    add_option(p, "--group-regex", key="slides.patches.group_regex", metavar="REGEX",
               help="searched in each image's stem; its first group is the patch set (slide) name")
    add_option(p, "--mpp", key="slides.patches.mpp", type=positive_float, dest="mpp",
               help="the dataset's resolution in um/px (required)")
    add_option(p, "--target-mpp", key="tile.target_mpp", type=positive_float,
               help="resample the patches to this um/px", none="keep the dataset's resolution")
    add_option(p, "--size", key="tile.size", type=int,
               help="output patch side in pixels: larger patches are cut into windows, smaller ones padded")
    add_option(p, "--background-threshold", key="tile.background_threshold", type=int,
               help="grey value above which a pixel is background (index.csv tissue_fraction)")
    add_classes(p, "class name to type id (1..255); the dataset's type values are these ids (or mapped by "
                   "--type-values); none: every nucleus is type 1", nargs="*")
    add_option(p, "--type-values", key="slides.patches.type_values", nargs="*", metavar="VALUE=CLASS",
               help="dataset type value -> class name of --classes (none: the values are the type ids)")
    p.add_argument("--overlay", metavar="PNG", help="also draw outlines on a few patches into this PNG "
                                                    "(with --group)")
    add_option(p, "--overlay-per-slide", key="rasterize.overlay_per_slide", type=int,
               help="patches drawn in the --overlay PNG")
    p.set_defaults(func=_run_import)


def _run_import(args: argparse.Namespace) -> None:
    from histosynth.io.labels import parse_class_map, read_class_map
    from histosynth.patches.export import overlay
    from histosynth.patches.importer import ImportParams, import_patches

    if args.overlay and args.group is None:
        raise HistosynthError("--overlay draws one group's patch set: give --group too")
    if not args.images or not args.inst:
        raise HistosynthError("import-patches needs --images GLOB and --inst PATTERN (slides.patches.images, "
                              "slides.patches.inst)")
    params = ImportParams(images=args.images, inst=args.inst, types=args.types, group_regex=args.group_regex,
                          mpp=args.mpp, target_mpp=args.target_mpp, size=args.size,
                          background_threshold=args.background_threshold)
    class_map = parse_class_map(args.classes)
    type_values = parse_pairs(args.type_values, "--type-values", "VALUE=CLASS") or None
    import_patches(params, args.out, class_map, type_values, group=args.group)
    if args.overlay:
        names = read_class_map(class_map) if class_map else None
        overlay(args.out, args.overlay, per_slide=args.overlay_per_slide, class_names=names)


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
    _add_import(sub)
    _add_split(sub)
    _add_export(sub)
    _add_overlay(sub)
