"""CLI of the segmentation family: train-segmenter, score, report."""

from __future__ import annotations

import argparse

from histosynth.cli._args import add_training_args
from histosynth.errors import HistosynthError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-segmenter", help="train HoVer-Net for one arm (real, real+synthetic, synthetic)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="[REAL_PATCH_SETS...] OUT_DIR (real patch sets with images, inst and types; the output "
                        "folder: model.pt, log.csv, checkpoint.pt)")
    p.add_argument("--arm", choices=("real", "real+synthetic", "synthetic"), required=True, help="which data to train on")
    p.add_argument("--synthetic", nargs="+", default=[], metavar="PATCH_SET",
                   help="synthetic pairs (translate's output), for the synthetic and real+synthetic arms")
    p.add_argument("--mix", type=float, default=0.5,
                   help="real+synthetic: the chance that a batch patch is synthetic (default 0.5)")
    p.add_argument("--mode", choices=("fast", "original"), default="fast",
                   help="HoVer-Net mode: fast 256 -> 164 px, original 270 -> 80 px (default fast)")
    p.add_argument("--width", type=int, default=64, help="encoder base width (default 64, the paper's)")
    p.add_argument("--units", type=int, nargs=4, default=[3, 4, 6, 3], metavar="N",
                   help="residual units per encoder stage (default 3 4 6 3, ResNet-50)")
    p.add_argument("--input-size", type=int, default=None, help="network input side (default: the mode's)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000), the same for every arm")
    p.add_argument("--batch-size", type=int, default=4, help="default 4")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--lr-drop", type=float, default=0.5,
                   help="fraction of the steps after which the learning rate is divided by 10 (default 0.5)")
    add_training_args(p, checkpoint_every=200)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from histosynth.patches.annotate import parse_class_map
    from histosynth.segmentation.segmenter import train_segmenter

    train_segmenter(args.paths[:-1], args.paths[-1], arm=args.arm, synthetic=args.synthetic, mix=args.mix,
                    mode=args.mode, width=args.width, units=args.units, input_size=args.input_size,
                    steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_drop=args.lr_drop, seed=args.seed,
                    device=args.device, threads=args.threads, checkpoint_every=args.checkpoint_every,
                    log_every=args.log_every, precision=args.precision, classes=parse_class_map(args.classes),
                    resume=args.resume, progress=getattr(args, "progress", False) or None)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a trained HoVer-Net on held-out patch sets (Dice, AJI, PQ, ...)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="MODEL PATCH_SETS... OUT_DIR (model.pt of train-segmenter; test patch sets with images, "
                        "inst and types; the output folder: scores.csv, summary.json, overlay.png)")
    p.add_argument("--overlap", type=int, default=None,
                   help="overlap of the sliding windows in output pixels (default a quarter of the output)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--overlays", type=int, default=4, help="test images drawn in overlay.png (default 4)")
    p.add_argument("--precision", choices=("float32", "bf16"), default="float32", help="default float32")
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> None:
    from histosynth.segmentation.score import score

    if len(args.paths) < 3:
        raise HistosynthError("score needs a model, at least one test patch set and an output folder")
    score(args.paths[0], args.paths[1:-1], args.paths[-1], overlap=args.overlap, batch=args.batch,
          device=args.device, threads=args.threads, n_overlays=args.overlays, precision=args.precision)


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
    _add_report(sub)
