"""CLI of the segmentation family: train-segmenter, score, gate-pairs, segment, report."""

from __future__ import annotations

import argparse

from histosynth.cli._args import (add_classes, add_device, add_option, add_threads, add_training_args, fraction,
                                  positive_float, schema_choices)
from histosynth.errors import HistosynthError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-segmenter", help="train HoVer-Net for one arm (real, real+synthetic, synthetic, synthetic-then-real, painted-real)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="REAL_PATCH_SETS... OUT_DIR (the train slides' real patch sets with images, inst and types "
                        "- every arm validates on their held-out tiles; the output folder: model.pt, log.csv, "
                        "validation.csv, train.json, checkpoint.pt)")
    p.add_argument("--arm", choices=schema_choices("segmenter.arms"), required=True, help="which data to train on")
    p.add_argument("--synthetic", nargs="+", default=[], metavar="PATCH_SET",
                   help="synthetic pairs (translate's output) for every arm but real; for painted-real, translate's "
                        "painting of the real patch sets' masks")
    add_option(p, "--mix", key="segmenter.mix", type=float,
               help="real+synthetic: the chance that a batch patch is synthetic")
    add_option(p, "--pretrain", key="segmenter.pretrain", type=float,
               help="synthetic-then-real: the fraction of the steps trained on synthetic pairs")
    add_option(p, "--mode", key="segmenter.mode", help="HoVer-Net mode: fast 256 -> 164 px, original 270 -> 80 px")
    add_option(p, "--width", key="segmenter.width", type=int, help="encoder base width (64: the paper's)")
    add_option(p, "--units", key="segmenter.units", type=int, nargs=4, metavar="N",
               help="residual units per encoder stage (3 4 6 3: ResNet-50)")
    add_option(p, "--padding", key="segmenter.padding",
               help="decoder padding: valid (the paper's; output = centre of the input) or same (output = input)")
    add_option(p, "--input-size", key="segmenter.input_size", type=int, help="network input side (none: the mode's)")
    add_option(p, "--steps", key="segmenter.steps", type=int, help="training steps, the same for every arm")
    add_option(p, "--batch-size", key="segmenter.batch_size", type=int, help="batch size")
    add_option(p, "--lr", key="segmenter.lr", type=float, help="Adam learning rate")
    add_option(p, "--lr-drop", key="segmenter.lr_drop", type=float,
               help="fraction of the steps after which the learning rate is divided by 10")
    add_option(p, "--val-fraction", key="segmenter.val_fraction", type=float,
               help="share of each real slide's tiles held out (one spatial block) to select the best checkpoint")
    add_option(p, "--val-overlap", key="segmenter.val_overlap", type=int,
               help="training tiles sharing more pixels than this with a validation tile are left out")
    add_option(p, "--val-every", key="segmenter.val_every", type=int,
               help="steps between validation scores (at most a quarter of the steps)")
    add_option(p, "--rising-tolerance", key="segmenter.rising_tolerance", type=float,
               help="validation PQ gained in the last quarter above which the arm is flagged as still rising")
    add_option(p, "--augment", key="segmenter.augment", help="augment the training windows")
    add_option(p, "--hed-jitter", key="segmenter.hed_jitter", type=float, help="HED stain jitter")
    add_option(p, "--color-jitter", key="segmenter.color_jitter", type=float,
               help="brightness, contrast and saturation jitter")
    add_option(p, "--scale-jitter", key="segmenter.scale_jitter", type=float, help="random zoom by 1 +- this")
    add_option(p, "--blur", key="segmenter.blur", type=float, help="chance of a Gaussian blur")
    add_option(p, "--noise", key="segmenter.noise", type=float, help="largest standard deviation of added noise")
    add_training_args(p, "segmenter")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from histosynth.io.labels import parse_class_map
    from histosynth.segmentation.augment import augment_from_settings
    from histosynth.segmentation.segmenter import train_segmenter

    augment = augment_from_settings(args.augment, hed=args.hed_jitter, color=args.color_jitter,
                                    scale=args.scale_jitter, blur=args.blur, noise=args.noise)
    train_segmenter(args.paths[:-1], args.paths[-1], arm=args.arm, synthetic=args.synthetic, mix=args.mix,
                    pretrain=args.pretrain, mode=args.mode, width=args.width, units=args.units, padding=args.padding,
                    input_size=args.input_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    lr_drop=args.lr_drop, val_fraction=args.val_fraction, val_overlap=args.val_overlap,
                    val_every=args.val_every, rising_tolerance=args.rising_tolerance, augment=augment, seed=args.seed,
                    device=args.device, threads=args.threads, checkpoint_every=args.checkpoint_every,
                    log_every=args.log_every, precision=args.precision, classes=parse_class_map(args.classes),
                    resume=args.resume, progress=getattr(args, "progress", False) or None)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a trained HoVer-Net on held-out patch sets (Dice, AJI, PQ, ...)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="MODEL PATCH_SETS... OUT_DIR (model.pt of train-segmenter; test patch sets with images, "
                        "inst and types; the output folder: scores.csv, summary.json, overlay.png)")
    add_option(p, "--overlap", key="score.overlap", type=int,
               help="overlap of the sliding windows in output pixels (0: they tile the image)")
    add_option(p, "--batch", key="score.batch", type=int, help="windows per forward pass")
    add_device(p)
    add_threads(p, "score")
    add_option(p, "--overlays", key="score.overlays", type=int, help="test images drawn in overlay.png")
    add_option(p, "--precision", key="score.precision", help="arithmetic of the forward passes")
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> None:
    from histosynth.segmentation.score import score

    if len(args.paths) < 3:
        raise HistosynthError("score needs a model, at least one test patch set and an output folder")
    score(args.paths[0], args.paths[1:-1], args.paths[-1], overlap=args.overlap, batch=args.batch,
          device=args.device, threads=args.threads, n_overlays=args.overlays, precision=args.precision)


def _add_gate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gate-pairs", help="keep the painted pairs whose nuclei a real-trained segmenter finds")
    p.add_argument("model", help="model.pt of the real arm (train-segmenter)")
    p.add_argument("pairs", help="painted pairs (a translate shard: images + inst + types)")
    p.add_argument("out_dir", help="output patch set of the kept pairs (report.json counts the dropped ones)")
    add_option(p, "--min-pq", key="gate.min_pq", type=float, help="least PQ of a kept pair against its mask")
    add_option(p, "--keep-fraction", key="gate.keep_fraction", type=float,
               help="keep this fraction of the pairs, those of highest PQ, instead of --min-pq (0 < f <= 1)")
    add_option(p, "--batch", key="gate.batch", type=int, help="windows per forward pass")
    add_device(p)
    add_threads(p, "gate")
    p.set_defaults(func=_run_gate)


def _run_gate(args: argparse.Namespace) -> None:
    from histosynth.segmentation.gate import gate_pairs

    gate_pairs(args.model, args.pairs, args.out_dir, min_pq=args.min_pq, keep_fraction=args.keep_fraction,
               batch=args.batch, device=args.device, threads=args.threads)


def _add_segment(sub: argparse._SubParsersAction) -> None:
    from histosynth.cli.slides import add_max_pixels

    p = sub.add_parser("segment", help="segment the nuclei of a whole slide with a trained HoVer-Net "
                                       "(QuPath GeoJSON, CSV, label TIFF)")
    p.add_argument("model", help="model.pt of train-segmenter")
    p.add_argument("slide", help="a slide (any format the tiler reads)")
    p.add_argument("out_dir", help="output folder: nuclei.geojson, nuclei.csv, segment.json (and labels.tif)")
    add_option(p, "--tile", key="segment.tile", type=int, help="core tile side in model pixels")
    add_option(p, "--margin", key="segment.margin", type=int,
               help="model pixels predicted around each core tile (the largest reach of a nucleus past it)")
    add_option(p, "--min-tissue", key="segment.min_tissue", type=fraction,
               help="share of tissue pixels that makes a tile worth segmenting")
    add_option(p, "--background-threshold", key="segment.background_threshold", type=int,
               help="grey value above which a pixel is background")
    add_option(p, "--mpp", key="segment.mpp", type=positive_float,
               help="um/px to segment at (none: the model's training resolution)")
    add_option(p, "--batch", key="segment.batch", type=int, help="windows per forward pass")
    add_option(p, "--label-tiff", key="segment.label_tiff", help="also write labels.tif (uint32 instance ids)")
    add_option(p, "--precision", key="segment.precision", help="arithmetic of the forward passes")
    add_option(p, "--mpp-fallback", key="mpp_fallback", type=positive_float,
               help="um/px of a slide whose file does not record it")
    add_max_pixels(p)
    add_classes(p, "the class map the output must use, NAME=ID ...; refused when the model's differs "
                   "(default: the model's own)")
    add_device(p)
    add_threads(p, "segment")
    p.set_defaults(func=_run_segment)


def _run_segment(args: argparse.Namespace) -> None:
    from histosynth.io.labels import parse_class_map
    from histosynth.segmentation.wsi import SegmentParams, segment_slide

    params = SegmentParams(tile=args.tile, margin=args.margin, min_tissue=args.min_tissue,
                           background_threshold=args.background_threshold, batch=args.batch,
                           label_tiff=args.label_tiff)
    segment_slide(args.model, args.slide, args.out_dir, params, classes=_class_map_or_none(parse_class_map(args.classes)),
                  mpp=args.mpp, mpp_fallback=args.mpp_fallback, max_pixels=args.max_pixels, device=args.device,
                  threads=args.threads, precision=args.precision,
                  progress=args.progress)


def _class_map_or_none(pairs):
    from histosynth.io.labels import read_class_map

    return read_class_map(pairs, "--classes") if pairs else None


def _figure_arg(text: str) -> tuple[str, str]:
    caption, sep, path = text.rpartition("=")
    if not sep or not caption or not path:
        raise HistosynthError(f"a figure is CAPTION=PATH, got {text!r}")
    return caption, path


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="gather the scores of every arm and seed into a table, chart and HTML page")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SCORES_CSV... OUT_DIR (scores.csv of histosynth score, summary.json beside each)")
    p.add_argument("--figure", action="append", default=[], metavar="CAPTION=PATH",
                   help="a per-stage figure to include (repeatable)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> None:
    from histosynth.segmentation.report import build_report

    if len(args.paths) < 2:
        raise HistosynthError("report needs at least one scores.csv and an output folder")
    build_report(args.paths[:-1], args.paths[-1], [_figure_arg(f) for f in args.figure])


def register(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_score(sub)
    _add_gate(sub)
    _add_segment(sub)
    _add_report(sub)
