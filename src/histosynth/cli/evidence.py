"""CLI of the learning-curve experiment: evidence-report."""

from __future__ import annotations

import argparse
import re

from histosynth.cli._args import add_option
from histosynth.errors import HistosynthError

_K = re.compile(r"\s*(all|\d+)\s*", re.IGNORECASE)


def _run_arg(text: str) -> tuple[str, str]:
    """``K=RUN_DIR`` as (k, folder): the first ``=`` splits (k holds none)."""
    k, sep, path = text.partition("=")
    if not sep or not k or not path:
        raise HistosynthError(f"a run is K=RUN_DIR (K a number of train slides or 'all'), got {text!r}")
    return k, path


def _generator_arg(text: str, what: str = "a generator log") -> tuple[str, str, str]:
    """``K:SEED=PATH`` as (k, seed, path): the first ``=`` splits, then the first ``:``."""
    head, sep, path = text.partition("=")
    k, colon, seed = head.partition(":")
    if not sep or not colon or not k or not seed or not path:
        raise HistosynthError(f"{what} is K:SEED=PATH, got {text!r}")
    return k, seed, path


def _add_evidence_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evidence-report",
                       help="the learning curve: per k and arm the test scores, paired differences to real, "
                            "seeds needed, validation curves and cost")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="K=RUN_DIR... OUT_DIR (each run folder of one k, seed and arm holds scores.csv and "
                        "train.json, optionally validation.csv; the output folder: runs.csv, means.csv, "
                        "differences.csv, cost.csv, learning_curve.png, validation.png, evidence.md, evidence.json)")
    p.add_argument("--generator-log", action="append", default=[], metavar="K:SEED=PATH",
                   help="log.csv (with a seconds column) of a generator training of that k and seed, counted in "
                        "the cost of every arm but real (repeatable)")
    for kind in ("masks", "images"):
        p.add_argument(f"--{kind}-evaluation", action="append", default=[], metavar="K:SEED=PATH",
                       help=f"evaluation.json of evaluate-{kind} for the synthetic {kind} of that k and seed, "
                            "reported per k (repeatable)")
    add_option(p, "--delta", key="evidence.delta", type=float,
               help="the PQ difference the seeds should resolve (target 95 %% CI half-width)")
    p.set_defaults(func=_run_evidence_report)


def _run_evidence_report(args: argparse.Namespace) -> None:
    from histosynth.segmentation.evidence import build_evidence_report

    if len(args.paths) < 2:
        raise HistosynthError("evidence-report needs at least one K=RUN_DIR and an output folder")
    out_dir = args.paths[-1]
    head, sep, _ = out_dir.partition("=")
    if sep and _K.fullmatch(head):
        raise HistosynthError(f"the last PATH is the output folder, got the run {out_dir!r}")
    runs = [_run_arg(text) for text in args.paths[:-1]]
    logs = [_generator_arg(text) for text in args.generator_log]
    evaluations = [(*_generator_arg(text, f"a {kind} evaluation"), kind)
                   for kind in ("masks", "images") for text in getattr(args, f"{kind}_evaluation")]
    build_evidence_report(runs, out_dir, delta=args.delta, generator_logs=logs,
                          evaluations=[(k, seed, kind, path) for k, seed, path, kind in evaluations])


def register(sub: argparse._SubParsersAction) -> None:
    _add_evidence_report(sub)
