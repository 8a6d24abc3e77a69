"""What the training stages share: atomic files, deterministic CPU runs, resuming from a checkpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from histosynth.errors import HistosynthError

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_csv(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


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
