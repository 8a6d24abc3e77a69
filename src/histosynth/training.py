"""THE step loop of the trainers, and what they share: resume, precision, NaN stop, ``log.csv``, progress.

A step-based trainer (the GAN, HoVer-Net) builds its networks, optimizers
and settings, then hands :class:`StepLoop` only what is its own: a step
function (one optimizer step at a 0-based step, returning its losses and
learning rate) and the contents of its checkpoint. The loop

- resumes from ``checkpoint.pt`` when it was written with the same settings
  (:func:`load_resume`), restoring the global torch RNG (and CUDA's), the
  trainer's own generators, the AMP scaler and the log so far;
- runs the steps under :class:`Deterministic` (CPU) with a tqdm bar;
- writes ``log.csv`` through :class:`StepLog` (the mean of each loss over
  every ``log_every`` steps);
- writes ``checkpoint.pt`` atomically every ``checkpoint_every`` steps and at
  the last one;
- stops on a non-finite loss (:meth:`StepLoop.check_finite`) naming the step
  and the last good checkpoint;
- on SIGTERM (what Snakemake, SLURM and ``kill`` send before SIGKILL) finishes
  the current step, writes ``checkpoint.pt`` and stops with
  :class:`~histosynth.errors.Terminated` (:class:`StopAtStep`); the next run
  resumes there. A SIGKILL leaves the previous checkpoint: it is replaced
  atomically, never written in place.

The β-VAE trains by epochs (one log row per epoch, with hold-out metrics);
it shares :class:`CheckpointFile`, :func:`check_finite`, :class:`Deterministic`,
:class:`StopAtStep` and :func:`progress_bar` rather than the step loop.

Precision: :func:`choose_precision` picks the autocast dtype, :func:`grad_scaler`
and :func:`precision_name` go with it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from histosynth.errors import HistosynthError, Terminated, signal_name
from histosynth.io.atomic import atomic_csv
from histosynth.models.checkpoint import atomic_torch_save

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


class StopAtStep:
    """SIGTERM while training: finish the step, save a checkpoint, then stop.

    Inside the ``with`` block (in the main thread; elsewhere it does nothing)
    the first SIGTERM only records itself in :attr:`signum` and the trainer,
    between two steps, saves its checkpoint and calls :meth:`stop`. A second
    SIGTERM stops at once (an atomic write under way is abandoned and the
    previous checkpoint stays). The previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopAtStep:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Terminated(signum, f"stopped by {signal_name(signum)} twice: stopped at once, without a new "
                                     "checkpoint (the previous one is intact)")
        self.signum = signum
        log.warning("%s received: stopping after this step, with a checkpoint", signal_name(signum))

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def stop(self, checkpoint: str | None) -> None:
        """Raise :class:`Terminated` naming the checkpoint just saved (call it after saving)."""
        raise Terminated(self.signum or signal.SIGTERM,
                         f"stopped by {signal_name(self.signum or signal.SIGTERM)}; training state saved to "
                         f"{checkpoint}: run the same command again to resume")


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


#: CPU flags (/proc/cpuinfo) of native bf16 arithmetic: x86 AVX512-BF16 / AMX-BF16, Arm BF16
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU does bf16 natively (its flags name it), or None where ``cpuinfo`` cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS) if flags else None


def choose_precision(precision: str, device: torch.device, probe: Callable[[torch.dtype | None], None],
                     *, cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None = float32).

    On CUDA 'auto' is bf16 where supported, else fp16 (use a GradScaler). On a
    CPU whose flags show no native bf16 'auto' is float32 at once (emulated bf16
    is many times slower); otherwise it times ``probe(dtype)`` — one
    forward/backward on copies of the networks — in float32 and bf16 and takes
    bf16 only when it is clearly faster.
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
    if cpu_native_bf16(cpuinfo) is False:
        log.info("precision auto on the CPU: no native bf16 in the CPU flags -> float32")
        return None
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


def check_finite(losses: Mapping[str, Any], step: int, last_good: str | None, out_dir: str | os.PathLike, *,
                 at: str | None = None, hint: str = "try a lower --lr or --precision float32") -> dict[str, float]:
    """The losses as floats; a non-finite one stops training with the step and the last good checkpoint.

    ``step`` is 0-based; ``at`` replaces "step <step + 1>" in the message (e.g. with the epoch too).
    """
    values = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in losses.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise HistosynthError(
            f"training stopped: non-finite loss ({', '.join(f'{k}={values[k]}' for k in bad)}) at "
            f"{at or f'step {step + 1}'} ({hint}); last good checkpoint: {last_good or 'none written yet'}",
            out_dir)
    return values


def precision_name(dtype: torch.dtype | None) -> str:
    """'float32', 'bf16' or 'fp16': the name of an autocast dtype from :func:`choose_precision`."""
    return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The AMP gradient scaler for ``dtype``: enabled for fp16 only (a no-op otherwise)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def progress_bar(total: int, initial: int, desc: str, progress: bool | None):
    """A tqdm bar on stderr (``progress`` None: shown when stderr is a terminal)."""
    from tqdm import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    return tqdm(total=total, initial=min(initial, total), desc=desc, unit="step", disable=not progress,
                file=sys.stderr)


class CheckpointFile:
    """A trainer's ``checkpoint.pt``: the one to resume from, writing it atomically, the last good one.

    ``ckpt`` is the checkpoint to resume from (None: start afresh; see
    :func:`load_resume` for when one is set aside), ``last_good`` names the
    newest checkpoint written or resumed for the NaN-stop message.
    """

    def __init__(self, out_dir: str | os.PathLike, *, settings: dict[str, Any], keys: Sequence[str],
                 reader: Callable[[Path], dict[str, Any]], required: str, resume: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "checkpoint.pt"
        self.ckpt = load_resume(self.path, settings, keys, reader, required) if resume else None
        self.last_good = f"{self.path} (step {int(self.ckpt['step'])})" if self.ckpt is not None else None

    def save(self, contents: dict[str, Any], step: int) -> None:
        atomic_torch_save(contents, self.path)
        self.last_good = f"{self.path} (step {step})"

    def check_finite(self, losses: Mapping[str, Any], step: int, **kwargs: Any) -> dict[str, float]:
        """:func:`check_finite` naming this trainer's folder and last good checkpoint."""
        return check_finite(losses, step, self.last_good, self.out_dir, **kwargs)


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

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` just spent on something else (e.g. a validation pass) out of the next row's time."""
        self.mark += seconds

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


StepFn = Callable[[int], tuple[Mapping[str, float], float]]


class StepLoop:
    """THE loop of a step-based trainer (see the module docstring).

    Build it after the networks, optimizers, precision and the trainer's own
    generators; it resumes at once: ``step`` is where training continues and
    ``ckpt`` the checkpoint to load the networks and optimizers from (None
    when starting afresh). Then :meth:`run` it with the step function.

    The checkpoint holds the trainer's ``contents()`` followed by ``scaler``,
    ``rng`` (``torch``, each of ``generators`` by name, ``cuda``), ``log`` and
    ``partial`` (the :class:`StepLog` state), so a resumed run on the CPU
    ends with the weights and log of an uninterrupted one.
    """

    def __init__(self, out_dir: str | os.PathLike, *, total: int, checkpoint_every: int, log_every: int,
                 device: torch.device, settings: dict[str, Any], keys: Sequence[str],
                 reader: Callable[[Path], dict[str, Any]], required: str, resume: bool = True,
                 columns: Sequence[str] | None = None, scaler: torch.amp.GradScaler | None = None,
                 generators: Mapping[str, torch.Generator] | None = None, desc: str = "train",
                 progress: bool | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.total, self.checkpoint_every = int(total), int(checkpoint_every)
        self.device, self.scaler = device, scaler
        self.generators = dict(generators or {})
        self.desc, self.progress = desc, progress
        self.file = CheckpointFile(out_dir, settings=settings, keys=keys, reader=reader, required=required,
                                   resume=resume)
        ckpt = self.file.ckpt
        self.step = 0
        if ckpt is not None:
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            for name, gen in self.generators.items():
                gen.set_state(ckpt["rng"][name])
            if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
            self.step = int(ckpt["step"])
            log.info("resuming %s from %s at step %d", self.out_dir, self.file.path, self.step)
        self.log = StepLog(self.out_dir / "log.csv", log_every, self.total, columns,
                           rows=ckpt["log"] if ckpt is not None else (),
                           partial=ckpt["partial"] if ckpt is not None else None)

    @property
    def ckpt(self) -> dict[str, Any] | None:
        return self.file.ckpt

    def check_finite(self, losses: Mapping[str, Any]) -> dict[str, float]:
        """The losses of the current step as floats, or the NaN stop (naming the step and the last good checkpoint)."""
        return self.file.check_finite(losses, self.step)

    def save_checkpoint(self, contents: dict[str, Any]) -> None:
        """Write ``checkpoint.pt``: ``contents`` + scaler, RNG states and the log so far."""
        dev = self.device
        rng = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in self.generators.items()},
               "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
        scaler = self.scaler
        self.file.save({**contents, "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled()
                        else {}, "rng": rng, "log": [dict(r) for r in self.log.rows],
                        "partial": dict(self.log.partial)}, self.step)

    def run(self, step_fn: StepFn, contents: Callable[[], dict[str, Any]], *,
            after_step: Callable[[int], None] | None = None,
            postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None) -> None:
        """Train from ``step`` to ``total``.

        ``step_fn(step)`` (0-based) does one optimizer step and returns
        (losses as floats, learning rate); ``after_step(step)`` (1-based, e.g.
        a sample figure) runs after its log row and before its checkpoint;
        ``postfix(row)`` gives the progress bar's postfix for a log row.
        """
        with StopAtStep() as stop, Deterministic(self.device.type == "cpu"), \
                progress_bar(self.total, self.step, self.desc, self.progress) as bar:
            while self.step < self.total:
                values, rate = step_fn(self.step)
                self.step += 1
                bar.update(1)
                row = self.log.add(self.step, dict(values), rate)
                if row is not None and postfix is not None:
                    bar.set_postfix(**postfix(row))
                if after_step is not None:
                    after_step(self.step)
                if self.step % self.checkpoint_every == 0 or self.step == self.total or stop.signum is not None:
                    self.log.pause()
                    self.save_checkpoint(contents())
                if stop.signum is not None:
                    stop.stop(self.file.last_good)
