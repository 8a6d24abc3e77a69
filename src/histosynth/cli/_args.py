"""What the CLI modules share: argument types and the options of every training stage.

Nothing here imports torch or a stage: building the parser stays cheap.
"""

from __future__ import annotations

import argparse

from histosynth.errors import HistosynthError

#: autocast choices of the training stages (histosynth.training.choose_precision)
PRECISIONS = ("auto", "float32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def region(text: str) -> tuple[int, int, int, int]:
    parts = text.replace(",", " ").split()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"a region is X,Y,W,H in level-0 pixels, got {text!r}")
    x, y, w, h = (int(float(p)) for p in parts)
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"region width and height must be positive, got {text!r}")
    return x, y, w, h




def slide_option(text: str) -> tuple[str, str]:
    """An argparse type: ``SLIDE=OPTION`` as a pair (the first ``=`` splits)."""
    slide, sep, name = text.partition("=")
    if not sep or not slide or not name:
        raise argparse.ArgumentTypeError(f"expected SLIDE=OPTION, got {text!r}")
    return slide, name


def parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict (the last ``=`` splits); a malformed one is an error naming ``what``."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.rpartition("=")
        if not sep or not key or not value:
            raise HistosynthError(f"{what} is SLIDE=NAME, got {pair!r}")
        out[key] = value
    return out


def add_training_args(p: argparse.ArgumentParser, checkpoint_every: int) -> None:
    """The options every training stage shares: seed, device, threads, checkpoints, logging, precision, classes."""
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help=f"steps between checkpoints (default {checkpoint_every})")
    p.add_argument("--log-every", type=int, default=10, help="steps per log.csv row (default 10)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="default auto")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME=ID",
                   help="type names (default: from the patch sets' report.json)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint.pt")
