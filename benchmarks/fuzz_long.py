"""A long fuzz session over every input path: the strategies of tests/test_fuzz.py with many examples.

The suite runs each target with a few dozen examples; this runs thousands,
outside the suite, and keeps going after a failure so that one run counts
every distinct fault (an exception other than HistosynthError, an invalid
result, a leftover file, or an example past the time limit). Each distinct
fault (exception type + the innermost histosynth frame, or the assertion
message) is printed once with the first input that caused it, and that input
is saved under ``--failures`` for a regression test.

    python benchmarks/fuzz_long.py --examples 10000
    python benchmarks/fuzz_long.py --examples 500 --formats geojson mat slide

Prints, per target: examples run, seconds, the slowest example, faults found.
Exit status 1 when any fault was found.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import pickle
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as fixed_seed

from tests import test_fuzz


def _signature(exc: BaseException) -> str:
    """What makes two faults the same: the exception type and the innermost frame in histosynth (or its message)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "histosynth" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    if isinstance(exc, AssertionError):
        return f"AssertionError: {str(exc).splitlines()[0] if str(exc) else '?'} at {where}"
    return f"{type(exc).__name__} at {where}"


def fuzz(name: str, examples: int, seed: int, failures: Path) -> dict:
    target = test_fuzz.TARGETS[name]
    failures.mkdir(parents=True, exist_ok=True)
    stats = {"examples": 0, "slowest": 0.0, "faults": {}}

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @fixed_seed(seed)  # reproducible: the same seed draws the same cases
    @given(case=target.cases)
    def run(case):
        stats["examples"] += 1
        # the case under way, kept on disk: a crash of the interpreter itself (a segfault in a C extension)
        # leaves no Python exception to record, only this file and faulthandler's traceback
        with open(failures / "current.pickle", "wb") as f:
            pickle.dump((name, case), f)
        t = time.perf_counter()
        try:
            test_fuzz.run_case(target, case)
        except (Exception, test_fuzz.Hang) as exc:  # noqa: BLE001 - every fault, counted once per signature
            sig = _signature(exc)
            if sig not in stats["faults"]:
                k = len(stats["faults"])
                failures.mkdir(parents=True, exist_ok=True)
                with open(failures / f"{name}-{k}.pickle", "wb") as f:
                    pickle.dump(case, f)
                stats["faults"][sig] = {"count": 0, "case": repr(case)[:2000], "error": f"{type(exc).__name__}: {exc}"[:500],
                                        "traceback": "".join(traceback.format_exception(exc))[-3000:]}
            stats["faults"][sig]["count"] += 1
        finally:
            stats["slowest"] = max(stats["slowest"], time.perf_counter() - t)

    start = time.perf_counter()
    run()
    stats["seconds"] = time.perf_counter() - start
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10_000, help="examples per target")
    ap.add_argument("--formats", nargs="+", default=sorted(test_fuzz.TARGETS), choices=sorted(test_fuzz.TARGETS),
                    metavar="TARGET", help=f"targets to fuzz (default: all of {', '.join(sorted(test_fuzz.TARGETS))})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--failures", type=Path, default=Path("results/fuzz-failures"),
                    help="folder for the first input of every fault (pickled cases)")
    args = ap.parse_args(argv)
    faulthandler.enable()  # a segfault prints the Python stack to stderr
    logging.disable(logging.CRITICAL)  # the readers' summaries of repaired items and tifffile's complaints, thousands
    warnings.simplefilter("ignore")
    total = 0
    print(f"{'target':<12} {'examples':>8} {'seconds':>8} {'slowest s':>9} {'faults':>6}", flush=True)
    for name in args.formats:
        s = fuzz(name, args.examples, args.seed, args.failures)
        total += len(s["faults"])
        print(f"{name:<12} {s['examples']:>8} {s['seconds']:>8.1f} {s['slowest']:>9.2f} {len(s['faults']):>6}",
              flush=True)
        for sig, f in s["faults"].items():
            print(f"    FAULT x{f['count']}: {sig}\n      error: {f['error']}\n      case: {f['case']}\n"
                  + "      " + f["traceback"].replace("\n", "\n      "), flush=True)
    print(f"total faults: {total}", flush=True)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
