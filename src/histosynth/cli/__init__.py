"""`histosynth <stage> ...`: every Snakemake rule is one call of this CLI.

One module per stage family (``slides``, ``patches``, ``masks``, ``gan``,
``segmentation``, ``evidence``, ``serve``, ``tissue``, ``multifocus``, ``migan``), each with a
``register(sub)`` that adds its subcommands.
The modules only parse arguments: a stage's code is imported when its command
runs, so ``histosynth tile`` never imports torch.

Errors from bad input print one line, ``error: <file>: <problem>``, and exit
with status 2; nothing half-written is left behind (stages write through
temporary names). So does an output the environment refuses (a full disk, a
file-size limit, a quota, a read-only or forbidden folder): ``error: <file>:
cannot write: <reason>``. SIGTERM stops a stage cleanly (temporary files
removed; a trainer saves its checkpoint first) with status 128 + 15. Any other
exception is a bug: one line names it and the file that holds its full
traceback (also logged at DEBUG, shown with ``-v``), and the exit status is 1.

Every stage holds a lock on its output for as long as it runs
(:mod:`histosynth.io.lock`, the output named by :data:`OUTPUTS`): a second
``histosynth`` pointed at the same output refuses at once, naming the first
one's pid.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from histosynth import __version__
from histosynth.cli import (evidence, gan, masks, migan, multifocus, patches, segmentation, serve, slides,
                            tissue)
from histosynth.errors import HistosynthError, Terminated

log = logging.getLogger("histosynth")

EXIT_BAD_INPUT = 2
EXIT_BUG = 1

#: the stage families, in the order of the DAG
FAMILIES = (slides, patches, masks, tissue, gan, segmentation, evidence, multifocus, migan, serve)

#: each command's output, which it holds the lock of while it runs: the attribute of its arguments that
#: names it, "paths" for the last of ``paths`` (PATH... OUT), None for a command that writes nothing
OUTPUTS: dict[str, str | None] = {
    "demo-slides": "out_dir", "tile": "out_dir", "slide-info": None,
    "rasterize": "out_dir", "import-patches": "out", "export": "out", "overlay": "out_png", "split": "out",
    "fit-stats": "out_dir", "nuclei-library": "paths", "train-dvae": "out_dir", "dvae-sweep": "out_dir",
    "sample-masks": "out_dir", "evaluate-masks": "paths", "train-tissue": "paths", "sample-tissue": "out_dir",
    "daff-library": "paths", "train-daff-g1": "paths",
    "train-gan": "paths", "stain-styles": "paths", "translate": "out_dir", "evaluate-images": "paths",
    "train-segmenter": "paths", "score": "paths", "gate-pairs": "out_dir", "segment": "out_dir",
    "report": "paths",
    "evidence-report": "paths",
    "demo-zstack": "out_dir", "extract-stacks": "paths", "evaluate-stacks": "paths", "stack-baselines": "out_dir",
    "train-migan-g1": "paths", "train-migan-g2": "paths", "sample-stacks": "out_dir",
    "check-config": None, "serve": None,
}

#: OSError numbers that mean the environment refused (a write): a one-line error, not a bug
ENVIRONMENT_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT", "EROFS", "EACCES", "EPERM",
                                                           "EIO", "EMFILE", "ENFILE", "ESTALE") if hasattr(errno, n))


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
    in_main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        with _lock_output(args):
            args.func(args)
    except HistosynthError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Terminated as err:
        print(f"error: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            print(f"error: {_report_bug(err)}", file=sys.stderr)
            return EXIT_BUG
        from histosynth.io.atomic import describe_os_error

        log.debug("environment error:\n%s", traceback.format_exc())
        output = None if err.filename else output_of(args)  # a failed write names no file: name the output
        print(f"error: {f'{output}: ' if output else ''}{describe_os_error(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - anything else is a bug in histosynth, not bad input
        print(f"error: {_report_bug(err)}", file=sys.stderr)
        return EXIT_BUG
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: unwind the stage like Ctrl-C does (temporary files are removed on the way out)."""
    raise Terminated(signum)


def output_of(args: argparse.Namespace) -> str | None:
    """The output the command of ``args`` writes (see :data:`OUTPUTS`), or None."""
    attr = OUTPUTS[args.command]
    if attr is None:
        return None
    if attr == "paths":
        return args.paths[-1] if len(args.paths) >= 2 else None
    return getattr(args, attr)


@contextmanager
def _lock_output(args: argparse.Namespace) -> Iterator[None]:
    """Hold the lock of the command's output (:func:`histosynth.io.lock.output_lock`), if it has one.

    Once it is held, what a killed writer of that output left is removed (temporary files of dead processes).
    """
    output = output_of(args)
    if output is None:
        yield
        return
    from histosynth.io.atomic import sweep_stale_temps
    from histosynth.io.lock import output_lock

    with output_lock(output):
        for path in sweep_stale_temps(output):
            log.info("removed %s, left by a writer that was killed", path)
        yield


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
