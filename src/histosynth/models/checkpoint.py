"""Checkpoint files of the networks: written atomically, read with ``weights_only=True`` and one clear error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_write


class _WriteThrough:
    """A binary file for ``torch.save`` that keeps the OSError of a failed write.

    torch's zip writer turns an exception of ``write`` into a RuntimeError ("unexpected pos ..."); the
    OSError kept here is raised instead, so a full disk reads as one (and names the file).
    """

    def __init__(self, fh: Any):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_save(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as fh:
        out = _WriteThrough(fh)
        try:
            torch.save(obj, out)
        except RuntimeError as err:
            if out.error is not None:
                raise out.error from err
            raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary sibling, flushed and renamed into place (see :func:`atomic_write`).

    A write the environment refuses (full disk, file-size limit, ...) raises
    :class:`~histosynth.io.atomic.WriteError` naming ``path``; the file at
    ``path`` is then the previous one, untouched.
    """
    atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def read_torch_checkpoint(path: str | os.PathLike, fmt: str, version: int, what: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a ``fmt`` file with one clear error for a missing, corrupt or foreign one.

    ``what`` names the kind in messages ("GAN", "DVAE", ...); a file newer than
    ``version`` is refused.
    """
    if not os.path.isfile(path):
        raise HistosynthError(f"{what} checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise HistosynthError(
            f"unreadable {what} checkpoint (corrupt, truncated or not a torch file): {type(err).__name__} {first}"
            .rstrip(), path) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        found = ckpt.get("format", "no format entry") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise HistosynthError(f"not a {what} checkpoint ({found})", path)
    if int(ckpt.get("version", 0)) > version:
        raise HistosynthError(f"{what} checkpoint version {ckpt['version']} is newer than this histosynth reads", path)
    return ckpt
