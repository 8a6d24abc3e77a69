"""What the training stages share: atomic files, deterministic CPU runs, resuming from a checkpoint."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_csv

log = logging.getLogger(__name__)


class Deterministic:
    """Turn torch's deterministic algorithms on (CPU only) and restore the previous setting."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.previous = torch.are_deterministic_algorithms_enabled()

    def __enter__(self) -> None:
        if self.enabled:
            torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            torch.use_deterministic_algorithms(self.previous)


def load_resume(
    path: Path,
    settings: dict[str, Any],
    keys: Sequence[str],
    reader: Callable[[Path], dict[str, Any]],
    required: str,
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if training can resume from it, else None (with a warning).

    It must be readable by ``reader``, hold ``required`` (the optimizer state)
    and have been written with the same ``settings`` for every key in ``keys``.
    """
    if not path.exists():
        return None
    try:
        ckpt = reader(path)
    except HistosynthError as err:
        log.warning("ignoring unreadable checkpoint (training starts afresh): %s", err)
        return None
    old = ckpt.get("train") or {}
    differ = [k for k in keys if old.get(k) != settings.get(k)]
    if differ or required not in ckpt:
        log.warning("%s was written with other settings (%s); training starts afresh", path,
                    ", ".join(differ) or "no optimizer state")
        return None
    return ckpt


PRECISIONS = ("auto", "float32", "bf16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for float32 (None)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def choose_precision(precision: str, device: torch.device, probe: Callable[[torch.dtype | None], None]
                     ) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None = float32).

    On CUDA 'auto' is bf16 where supported, else fp16 (use a GradScaler). On the
    CPU 'auto' times ``probe(dtype)`` — one forward/backward on copies of the
    networks — in float32 and bf16 and takes bf16 only when it is clearly faster.
    """
    if precision not in PRECISIONS:
        raise HistosynthError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return None
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    times = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
            best = math.inf
            for rep in range(3):
                t0 = time.perf_counter()
                probe(dtype)
                if rep:  # the first is a warm-up
                    best = min(best, time.perf_counter() - t0)
            times[name] = best
    use = times["bf16"] < 0.9 * times["float32"]
    log.info("precision auto on the CPU: float32 %.3f s, bf16 %.3f s per probe step -> %s",
             times["float32"], times["bf16"], "bf16" if use else "float32")
    return torch.bfloat16 if use else None


def check_finite(losses: dict[str, Any], step: int, last_good: str | None, out_dir: str | os.PathLike
                 ) -> dict[str, float]:
    """The losses as floats; a non-finite one stops training with the step and the last good checkpoint."""
    values = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in losses.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise HistosynthError(
            f"training stopped: non-finite loss ({', '.join(f'{k}={values[k]}' for k in bad)}) at step {step + 1} "
            f"(try a lower --lr or --precision float32); last good checkpoint: {last_good or 'none written yet'}",
            out_dir)
    return values


class StepLog:
    """``log.csv`` of a training loop: the mean of each loss term over every ``every`` steps, with its seconds.

    ``rows`` and ``partial`` (the sums since the last row) go into the
    checkpoint, so a resumed run writes the same log as an uninterrupted one;
    :meth:`pause` banks the time so far before a checkpoint is written.
    """

    def __init__(self, path: str | os.PathLike, every: int, total: int, columns: Sequence[str] | None = None,
                 rows: Sequence[dict[str, Any]] = (), partial: dict[str, float] | None = None):
        self.path = Path(path)
        self.every, self.total = int(every), int(total)
        self.columns = list(columns) if columns else None
        self.rows = [dict(r) for r in rows]
        self.partial = dict(partial or {})
        self.mark = time.perf_counter()

    def add(self, step: int, values: dict[str, float], lr: float) -> dict[str, Any] | None:
        """Count the losses of (1-based) ``step``; returns the row when one is written."""
        for k, v in values.items():
            self.partial[k] = self.partial.get(k, 0.0) + v
        self.partial["n"] = self.partial.get("n", 0.0) + 1
        if step % self.every and step != self.total:
            return None
        n = max(1.0, self.partial.pop("n"))
        now = time.perf_counter()
        row = {"step": step, **{k: self.partial.get(k, 0.0) / n for k in values}, "lr": lr,
               "seconds": self.partial.get("seconds", 0.0) + now - self.mark}
        self.rows.append(row)
        self.mark = now
        self.partial = {}
        self.write()
        return row

    def pause(self) -> None:
        now = time.perf_counter()
        self.partial["seconds"] = self.partial.get("seconds", 0.0) + now - self.mark
        self.mark = now

    def write(self) -> None:
        atomic_csv(pd.DataFrame(self.rows, columns=self.columns), self.path)

    def seconds_per_step(self) -> float:
        """Median seconds per step over the rows (NaN before the first row)."""
        previous = [0] + [r["step"] for r in self.rows[:-1]]
        timed = [r["seconds"] / max(1, r["step"] - p) for p, r in zip(previous, self.rows)]
        return float(statistics.median(timed)) if timed else float("nan")
