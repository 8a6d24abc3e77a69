"""Atomic files: written under a temporary name and renamed into place, so a killed job leaves no half-written output.

Torch-free: stages that only write tables (``report``) import this, not torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_csv(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
