"""Atomic files: written under a temporary name and renamed into place, so a killed job leaves no half-written output.

A temporary sibling is named ``.<name>.tmp-<pid>``. It is flushed to disk
(fsync) before the rename, so a crash or a power cut after the rename never
leaves an empty file under the final name. Temporary siblings of a process
that no longer runs (one killed by SIGKILL, say) are removed by the next
writer of the same output (:func:`remove_stale_temps`); the CLI's lock on
the output (:mod:`histosynth.io.lock`) keeps two live writers apart.

A write that fails because of the environment — a full disk, a file-size
limit, a quota, a read-only or forbidden folder — raises :class:`WriteError`
(a :class:`~histosynth.errors.HistosynthError`) naming the output and the
reason, and leaves neither the temporary file nor a new output behind.

Torch-free: stages that only write tables (``report``) import this, not torch.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from histosynth.errors import HistosynthError

#: errno values that mean "the environment cannot take this output", not a bug or bad input
WRITE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EFBIG", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO", "ENAMETOOLONG",
                                      "EMFILE", "ENFILE", "ETXTBSY", "EISDIR", "ENOTDIR", "EEXIST", "ENOENT",
                                      "ESTALE")
    if hasattr(errno, name)
)


class WriteError(HistosynthError):
    """An output could not be written (disk full, file-size limit, quota, permissions): the path and the reason."""

    def __init__(self, path: str | os.PathLike, err: OSError, what: str = "file"):
        self.errno = err.errno
        name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
        reason = (err.strerror or str(err)).strip() + (f" [{name}]" if name else "")
        super().__init__(f"cannot write: {reason} (no partial {what} left)", path)


def describe_os_error(err: OSError) -> str:
    """``<file>: <reason> [ERRNO]`` of an OSError (the file when it names one)."""
    name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    reason = (err.strerror or str(err)).strip() + (f" [{name}]" if name else "")
    return f"{err.filename}: {reason}" if err.filename else reason


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary sibling ``.<name>.tmp-<pid>`` that this process writes ``path`` under."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


#: a temporary name of this module, the patch-set writer and the other atomic writers: ``.<name>.tmp-<pid>[.<ext>]``
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)(?:\..*)?$")


def _remove_dead(entries: list[Path]) -> list[Path]:
    """Remove the temporary files and folders among ``entries`` whose writer process no longer runs."""
    removed = []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings ``.<name>.tmp-<pid>*`` of ``path`` left by processes that no longer run.

    Those of live processes (this one included) are kept. Returns what was removed.
    """
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    return _remove_dead([e for e in _entries(path.parent) if e.name.startswith(prefix)])


def sweep_stale_temps(output: str | os.PathLike) -> list[Path]:
    """Remove what dead writers left of ``output``: its temporary siblings and, for a folder, those inside it.

    Run by the CLI once it holds the output's lock (:mod:`histosynth.io.lock`), so that a stage killed by
    SIGKILL leaves no ``.<name>.tmp-<pid>`` file for long, whichever writer made it. Returns what was removed.
    """
    output = Path(output)
    removed = remove_stale_temps(output)
    if output.is_dir():
        removed += _remove_dead(_entries(output))
    return removed


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file (or a directory's entries) to disk; a no-op where the system cannot."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EROFS, errno.EBADF):  # not supported here: nothing to flush
            raise
    finally:
        os.close(fd)


def is_write_failure(err: OSError, *paths: str | os.PathLike) -> bool:
    """Whether ``err`` is the environment refusing a write to one of ``paths`` (or to a file it does not name)."""
    if err.errno not in WRITE_ERRNOS:
        return False
    if err.filename is None:
        return err.errno not in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST)
    named = {os.fspath(p) for p in paths}
    return os.fspath(err.filename) in named or any(
        os.fspath(err.filename).startswith(p.rstrip(os.sep) + os.sep) for p in named)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, flush it, then rename it into place.

    An OSError of the environment while writing (see :data:`WRITE_ERRNOS`) becomes a :class:`WriteError`
    naming ``path``; the temporary file is removed whatever happens.
    """
    path = Path(path)
    tmp = temp_name(path)
    remove_stale_temps(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if is_write_failure(err, tmp, path, path.parent):
            raise WriteError(path, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_csv(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
