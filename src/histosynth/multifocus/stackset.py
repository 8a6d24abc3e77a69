"""Stack sets: cell z-stacks on disk, the multi-focus branch's counterpart of a patch set.

A stack set is a folder, written atomically (a temporary sibling renamed into place, as patch sets are):

- ``stacks.npy`` — uint8, shape (N, Z, H, W, 3): N cells, Z focal planes (ordered by focal offset, lowest
  first), RGB. Memory-mapped on reading.
- ``index.csv`` — one row per stack: ``slide``, ``x``, ``y`` (the cell's centre in level-0 pixels of its
  slide; -1 for synthetic stacks), ``best_plane`` (0-based index of the cell's in-focus plane), ``source``
  (``real`` / ``synthetic`` / ``augmented``); extra columns are kept.
- ``report.json`` — at least ``planes`` (Z) and ``plane_offsets_um`` (Z focal offsets in µm, increasing,
  null where the source has none), plus the writing stage's settings.

:func:`read_stackset` checks all of this and names the folder and the problem.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.io.atomic import WriteError, fsync_path, is_write_failure, remove_stale_temps
from histosynth.io.patchset import NpyStream

log = logging.getLogger(__name__)

STACK_COLUMNS = ["slide", "x", "y", "best_plane", "source"]


@dataclass
class StackSet:
    """A stack set opened for reading (``stacks`` memory-mapped)."""

    path: Path
    stacks: np.ndarray
    index: pd.DataFrame
    report: dict[str, Any]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def planes(self) -> int:
        return int(self.stacks.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.stacks.shape[2]), int(self.stacks.shape[3])

    @property
    def plane_offsets_um(self) -> list[float | None]:
        return list(self.report["plane_offsets_um"])


class StackSetWriter:
    """Write a stack set stack by stack; on a clean exit the temporary folder is renamed to ``out_dir``.

    ::

        with StackSetWriter(out, planes=11, size=(64, 64), plane_offsets_um=offsets) as w:
            w.add({"slide": "s1", "x": 10, "y": 20, "best_plane": 5, "source": "real"}, stack)
            w.report.update(stage="extract_stacks", ...)
    """

    def __init__(self, out_dir: str | os.PathLike, planes: int, size: tuple[int, int],
                 plane_offsets_um: Sequence[float | None] | None = None, extra_columns: Sequence[str] = ()):
        if planes < 1:
            raise ValueError(f"a stack needs at least one plane, got {planes}")
        offsets = list(plane_offsets_um) if plane_offsets_um is not None else [None] * planes
        if len(offsets) != planes:
            raise ValueError(f"{len(offsets)} plane offsets for {planes} planes")
        self.out_dir = Path(out_dir)
        self.planes = int(planes)
        self.size = (int(size[0]), int(size[1]))
        self.columns = STACK_COLUMNS + [c for c in extra_columns if c not in STACK_COLUMNS]
        self.report: dict[str, Any] = {"planes": self.planes,
                                       "plane_offsets_um": [None if o is None else float(o) for o in offsets]}
        self._rows: list[dict[str, Any]] = []
        self._tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        self._stream: NpyStream | None = None

    def __enter__(self) -> StackSetWriter:
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out_dir)
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp.mkdir()
            self._stream = NpyStream(self._tmp / "stacks.npy", np.dtype(np.uint8), (self.planes, *self.size, 3))
        except OSError as err:
            self._discard()
            if is_write_failure(err, self._tmp, self.out_dir, self.out_dir.parent):
                raise WriteError(self.out_dir, err, "stack set") from err
            raise
        return self

    def add(self, row: dict[str, Any], stack: np.ndarray) -> None:
        """Append one (Z, H, W, 3) uint8 stack and its index row."""
        stack = np.asarray(stack)
        if stack.dtype != np.uint8:
            raise ValueError(f"stacks are uint8, got {stack.dtype}")
        assert self._stream is not None, "use StackSetWriter as a context manager"
        self._stream.append(stack)
        self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    def _discard(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            assert self._stream is not None
            self._stream.close()
            pd.DataFrame(self._rows, columns=self.columns).to_csv(self._tmp / "index.csv", index=False)
            (self._tmp / "report.json").write_text(json.dumps(self.report, indent=2))
            for file in self._tmp.iterdir():
                fsync_path(file)
            if self.out_dir.exists():
                shutil.rmtree(self.out_dir)
            os.replace(self._tmp, self.out_dir)
        except OSError as err:
            self._discard()
            if is_write_failure(err, self._tmp, self.out_dir, self.out_dir.parent):
                raise WriteError(self.out_dir, err, "stack set") from err
            raise
        except BaseException:
            self._discard()
            raise
        fsync_path(self.out_dir.parent)
        log.info("wrote %d stacks of %d planes to %s", len(self._rows), self.planes, self.out_dir)


def read_stackset(path: str | os.PathLike, *, min_stacks: int = 1) -> StackSet:
    """Open a stack set, checking its three files agree; ``min_stacks``: fewer is an error naming the folder."""
    path = Path(path)
    for name in ("stacks.npy", "index.csv", "report.json"):
        if not (path / name).is_file():
            raise HistosynthError(f"not a stack set (no {name})", path)
    try:
        report = json.loads((path / "report.json").read_bytes())
    except (ValueError, OSError) as err:
        raise HistosynthError(f"unreadable report.json: {err}", path) from err
    if not isinstance(report, dict) or not isinstance(report.get("planes"), int) \
            or not isinstance(report.get("plane_offsets_um"), list):
        raise HistosynthError("report.json lacks 'planes' (an integer) and 'plane_offsets_um' (a list)", path)
    try:
        index = pd.read_csv(path / "index.csv")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise HistosynthError(f"unreadable index.csv: {err}", path) from err
    missing = [c for c in STACK_COLUMNS if c not in index.columns]
    if missing:
        raise HistosynthError(f"index.csv lacks columns {missing}", path)
    try:
        stacks = np.load(path / "stacks.npy", mmap_mode="r", allow_pickle=False)
    except Exception as err:  # a damaged header: ValueError, OSError, EOFError, ...
        raise HistosynthError(f"unreadable stacks.npy: {type(err).__name__}: {err}", path) from err
    if stacks.dtype != np.uint8 or stacks.ndim != 5 or stacks.shape[-1] != 3 or stacks.shape[0] != len(index):
        raise HistosynthError(f"stacks.npy has dtype {stacks.dtype} shape {stacks.shape}; expected uint8 "
                              f"({len(index)}, Z, H, W, 3)", path)
    z = stacks.shape[1]
    if report["planes"] != z or len(report["plane_offsets_um"]) != z:
        raise HistosynthError(f"report.json says {report['planes']} planes and {len(report['plane_offsets_um'])} "
                              f"offsets; stacks.npy holds {z}", path)
    best = pd.to_numeric(index["best_plane"], errors="coerce").to_numpy(np.float64)
    if len(best) and (~np.isfinite(best) | (best < 0) | (best >= z)).any():
        raise HistosynthError(f"index.csv 'best_plane' must be a plane number in [0, {z - 1}]", path)
    if len(index) < min_stacks:
        raise HistosynthError(f"{len(index)} stacks; this stage needs at least {min_stacks}", path)
    return StackSet(path=path, stacks=stacks, index=index, report=report)
