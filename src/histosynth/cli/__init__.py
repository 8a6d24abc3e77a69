"""`histosynth <stage> ...`: every Snakemake rule is one call of this CLI.

One module per stage family (``slides``, ``patches``, ``masks``, ``gan``,
``segmentation``, ``evidence``), each with a ``register(sub)`` that adds its subcommands.
The modules only parse arguments: a stage's code is imported when its command
runs, so ``histosynth tile`` never imports torch.

Errors from bad input print one line, ``error: <file>: <problem>``, and exit
with status 2; nothing half-written is left behind (stages write through
temporary names). Any other exception is a bug: one line names it and the file
that holds its full traceback (also logged at DEBUG, shown with ``-v``), and the
exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import traceback
from collections.abc import Sequence

from histosynth import __version__
from histosynth.cli import evidence, gan, masks, patches, segmentation, slides
from histosynth.errors import HistosynthError

log = logging.getLogger("histosynth")

EXIT_BAD_INPUT = 2
EXIT_BUG = 1

#: the stage families, in the order of the DAG
FAMILIES = (slides, patches, masks, gan, segmentation, evidence)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histosynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"histosynth {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--progress", action="store_true", help="progress bars (tqdm) on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for family in FAMILIES:
        family.register(sub)
    _add_check_config(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
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
    except Exception as err:  # noqa: BLE001 - anything else is a bug in histosynth, not bad input
        print(f"error: {_report_bug(err)}", file=sys.stderr)
        return EXIT_BUG
    return 0


def _report_bug(err: Exception) -> str:
    """One line naming an unexpected exception and where its full traceback went (a file, and the DEBUG log)."""
    text = traceback.format_exc()
    log.debug("internal error:\n%s", text)
    lines = str(err).strip().splitlines()
    what = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    try:
        with tempfile.NamedTemporaryFile("w", prefix="histosynth-bug-", suffix=".txt", delete=False) as f:
            f.write(text)
        where = f"full traceback in {f.name}"
    except OSError as exc:
        where = f"the traceback could not be saved ({exc}); run again with -v to log it"
    return f"internal error (a bug in histosynth, please report it): {what}; {where}"


if __name__ == "__main__":
    sys.exit(main())
