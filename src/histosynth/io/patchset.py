"""Patch sets: the one on-disk format every stage reads and writes.

A patch set is a directory holding

- ``index.csv``: one row per patch with at least the columns of
  :data:`INDEX_COLUMNS` (x, y in level-0 pixels of the source slide);
- ``images.npy`` uint8 (N, H, W, 3), ``inst.npy`` int32 (N, H, W) and
  ``types.npy`` uint8 (N, H, W), ``tissue.npy`` uint8 (N, H, W) (0 = air, 1.. = tissue labels) — each only
  when the stage produces it;
  absent arrays are absent, never zero-filled;
- optionally ``report.json``: what the stage did (counts of kept, skipped and
  repaired items, parameters), for people and for the next stage's log.

Arrays are plain ``.npy`` files, read with ``np.load(mmap_mode="r")``. A set is
written into a temporary sibling directory and renamed into place when
complete, so a killed job never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.io.atomic import WriteError, fsync_path, is_write_failure, remove_stale_temps

log = logging.getLogger(__name__)

INDEX_COLUMNS = [
    "slide",
    "x",
    "y",
    "level",
    "downsample",
    "mpp",
    "width",
    "height",
    "tissue_fraction",
    "n_nuclei",
    "source",
]

# index columns that are a patch's place and size, finite numbers in every patch set
_NUMERIC_COLUMNS = ("x", "y", "level", "downsample", "width", "height")

#: array name → (dtype, number of trailing dimensions after (H, W))
ARRAYS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "images": (np.dtype(np.uint8), (3,)),
    "inst": (np.dtype(np.int32), ()),
    "types": (np.dtype(np.uint8), ()),
    "tissue": (np.dtype(np.uint8), ()),  # tissue layout: 0 = air, 1.. = tissue labels (report.json tissue_classes)
}

# A fixed-size .npy header (format 1.0) lets a writer stream patches of unknown
# count and fix the shape when it closes. 128 bytes hold any 4-D shape.
_NPY_HEADER_BYTES = 128


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    descr = np.lib.format.dtype_to_descr(dtype)
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    room = _NPY_HEADER_BYTES - 10 - 1  # magic(6) + version(2) + length(2), newline
    if len(text) > room:
        raise ValueError(f"shape {shape} does not fit a {_NPY_HEADER_BYTES}-byte .npy header")
    text = text.ljust(room) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


class _NpyStream:
    """Append equally-shaped items to a .npy file without holding them in memory."""

    def __init__(self, path: Path, dtype: np.dtype, item_shape: tuple[int, ...]):
        self.path = path
        self.dtype = dtype
        self.item_shape = item_shape
        self.count = 0
        self._fh = open(path, "wb")
        self._fh.write(_npy_header(dtype, (0, *item_shape)))

    def append(self, item: np.ndarray) -> None:
        item = np.asarray(item)
        if item.shape != self.item_shape:
            raise ValueError(f"{self.path.name}: patch of shape {item.shape}, expected {self.item_shape}")
        self._fh.write(memoryview(np.ascontiguousarray(item, dtype=self.dtype)).cast("B"))
        self.count += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            self._fh.seek(0)
            self._fh.write(_npy_header(self.dtype, (self.count, *self.item_shape)))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()


class PatchSetWriter:
    """Write a patch set patch by patch, atomically.

    Use as a context manager; on a clean exit the temporary directory is
    renamed to ``out_dir`` (replacing an older set there), on an exception it is
    removed and nothing is left behind::

        with PatchSetWriter(out, arrays=("images",), patch_size=(256, 256)) as w:
            w.add(row, images=tile)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        arrays: tuple[str, ...],
        patch_size: tuple[int, int],
        extra_columns: tuple[str, ...] = (),
    ):
        unknown = set(arrays) - set(ARRAYS)
        if unknown:
            raise ValueError(f"unknown patch-set arrays {sorted(unknown)}; known: {sorted(ARRAYS)}")
        self.out_dir = Path(out_dir)
        self.arrays = tuple(arrays)
        self.height, self.width = int(patch_size[0]), int(patch_size[1])
        self.columns = INDEX_COLUMNS + [c for c in extra_columns if c not in INDEX_COLUMNS]
        self.report: dict[str, Any] = {}
        self._rows: list[dict[str, Any]] = []
        self._tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        self._streams: dict[str, _NpyStream] = {}

    @contextmanager
    def _or_discard(self) -> Iterator[None]:
        """Remove the temporary set when the block fails; a refused write becomes a named WriteError."""
        try:
            yield
        except OSError as err:
            self._discard()
            self._raise_write_error(err)
            raise
        except BaseException:
            self._discard()
            raise

    def __enter__(self) -> PatchSetWriter:
        with self._or_discard():
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out_dir)
            if self._tmp.exists():
                shutil.rmtree(self._tmp)
            self._tmp.mkdir()
            for name in self.arrays:
                dtype, trailing = ARRAYS[name]
                self._streams[name] = _NpyStream(
                    self._tmp / f"{name}.npy", dtype, (self.height, self.width, *trailing)
                )
        return self

    def add(self, row: dict[str, Any], **arrays: np.ndarray) -> None:
        """Append one patch: its index row and one array per name in ``arrays``."""
        if set(arrays) != set(self.arrays):
            raise ValueError(f"patch needs arrays {sorted(self.arrays)}, got {sorted(arrays)}")
        try:
            for name, value in arrays.items():
                self._streams[name].append(value)
        except OSError as err:
            self._raise_write_error(err)
            raise
        self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    def _raise_write_error(self, err: OSError) -> None:
        """Raise a :class:`WriteError` naming the output for an OSError of the environment on the temporary set."""
        if is_write_failure(err, self._tmp, self.out_dir, self.out_dir.parent):
            raise WriteError(self.out_dir, err, "patch set") from err

    def _discard(self) -> None:
        """Close the streams (ignoring their errors: the set is thrown away) and remove the temporary set."""
        for stream in self._streams.values():
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        with self._or_discard():
            for stream in self._streams.values():
                stream.close()
            index = pd.DataFrame(self._rows, columns=self.columns)
            index.to_csv(self._tmp / "index.csv", index=False)
            if self.report:
                (self._tmp / "report.json").write_text(json.dumps(self.report, indent=2, default=_json_default))
            for file in self._tmp.iterdir():
                fsync_path(file)
            if self.out_dir.exists():
                shutil.rmtree(self.out_dir)
            os.replace(self._tmp, self.out_dir)
        fsync_path(self.out_dir.parent)
        log.info("wrote %d patches to %s", len(self._rows), self.out_dir)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path,)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class PatchSet:
    """A patch set opened for reading; arrays are memory-mapped, absent ones are None."""

    path: Path
    index: pd.DataFrame
    images: np.ndarray | None
    inst: np.ndarray | None
    types: np.ndarray | None
    tissue: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def report(self) -> dict[str, Any]:
        path = self.path / "report.json"
        if not path.exists():
            return {}
        try:
            report = json.loads(path.read_bytes())
        except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise HistosynthError(f"unreadable report.json: {err}", path) from err
        if not isinstance(report, dict):
            raise HistosynthError("report.json is not a JSON object", path)
        return report


def patch_mpp(index: pd.DataFrame, row: int) -> float | None:
    """The µm/px of patch ``row`` of an index.csv (its ``mpp`` column), or None where it has none."""
    if "mpp" not in index.columns:
        return None
    try:
        value = float(index["mpp"].iloc[row])
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def read_patchset(path: str | os.PathLike, require: tuple[str, ...] = ()) -> PatchSet:
    """Open a patch set; ``require`` names arrays that must be present."""
    path = Path(path)
    index_path = path / "index.csv"
    if not index_path.is_file():
        raise HistosynthError("not a patch set (no index.csv)", path)
    try:
        index = pd.read_csv(index_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise HistosynthError(f"unreadable index.csv: {err}", path) from err
    missing_cols = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing_cols:
        raise HistosynthError(f"index.csv lacks columns {missing_cols}", path)
    for col in _NUMERIC_COLUMNS:  # the patch's place and size: every stage computes with them
        numbers = pd.to_numeric(index[col], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(numbers.to_numpy(np.float64)))
        if bad.size:
            value = index[col].iloc[bad[0]]
            raise HistosynthError(
                f"index.csv column {col!r} holds {'an empty cell' if pd.isna(value) else repr(str(value))} "
                f"for patch {bad[0]}; expected finite numbers",
                path,
            )
        if not pd.api.types.is_numeric_dtype(index[col]):  # e.g. an integer too large for int64, read as text
            index[col] = numbers
    arrays: dict[str, np.ndarray | None] = {}
    for name, (dtype, trailing) in ARRAYS.items():
        file = path / f"{name}.npy"
        if not file.exists():
            if name in require:
                raise HistosynthError(f"patch set has no {name}.npy, which this stage needs", path)
            arrays[name] = None
            continue
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except Exception as err:  # a damaged header: ValueError, OSError, EOFError, SyntaxError, TokenError, ...
            raise HistosynthError(f"unreadable {name}.npy: {type(err).__name__}: {err}", path) from err
        if arr.dtype != dtype or arr.ndim != 3 + len(trailing) or arr.shape[0] != len(index):
            raise HistosynthError(
                f"{name}.npy has dtype {arr.dtype} shape {arr.shape}; expected {dtype} "
                f"({len(index)}, H, W{', 3' if trailing else ''})",
                path,
            )
        arrays[name] = arr
    shapes = {a.shape[1:3] for a in arrays.values() if a is not None}
    if len(shapes) > 1:
        raise HistosynthError(f"arrays of different patch sizes {sorted(shapes)}", path)
    return PatchSet(path=path, index=index, **arrays)


def read_paired_sets(paths: Sequence[str | os.PathLike], what: str = "patch sets") -> list[PatchSet]:
    """Open patch sets holding images with their masks (images, inst, types of one shape each), not all empty."""
    if not paths:
        raise HistosynthError(f"no {what} given (at least one patch set is needed)")
    sets = [read_patchset(p, require=("images", "inst", "types")) for p in paths]
    for ps in sets:
        if ps.images.shape[:3] != ps.inst.shape or ps.inst.shape != ps.types.shape:
            raise HistosynthError(f"images {ps.images.shape}, inst {ps.inst.shape} and types {ps.types.shape} "
                                  "do not match", ps.path)
    if sum(len(ps) for ps in sets) == 0:
        raise HistosynthError(f"the {what} hold no patches: " + ", ".join(str(ps.path) for ps in sets))
    return sets



#: the public name of the streaming .npy writer, which the stack-set writer (histosynth.multifocus.stackset) shares
NpyStream = _NpyStream
