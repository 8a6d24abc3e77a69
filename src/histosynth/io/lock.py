"""One writer per output: an advisory lock beside the output that a second ``histosynth`` refuses on.

Every stage run through the CLI holds :func:`output_lock` on its output (a
patch-set directory, a training folder, a CSV ...) for as long as it runs.
The lock is ``fcntl.flock`` on ``.<name>.lock`` in the output's parent
folder — beside the output, never inside it, so a Snakemake ``directory()``
output holds only what the stage wrote. The file records the holder's pid,
host and command; a second process pointed at the same output fails at once
with a :class:`LockedError` naming the output and that pid (Snakemake users
expect a refusal, not a silent wait).

The kernel releases the lock when its holder dies, even by SIGKILL, so a
stale lock file never blocks the next run; a holder that ends normally
removes the file. Before taking the lock a process checks that the file it
locked is still the one under the name (a holder may have just removed it),
so two processes never both believe they hold it.

flock works between processes of one machine and, on Linux, on NFS (as an
fcntl lock); on a file system without locks (some FUSE mounts) the lock is
skipped with a warning rather than stopping the run.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histosynth.errors import HistosynthError

log = logging.getLogger(__name__)


class LockedError(HistosynthError):
    """Another live process holds the output's lock."""

    def __init__(self, output: str | os.PathLike, holder: str):
        self.holder = holder
        super().__init__(f"another histosynth process ({holder}) is writing this output; wait for it to finish "
                         "or stop it (its lock is released when it ends)", output)


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of ``output``: ``.<name>.lock`` in its parent folder."""
    output = Path(os.path.abspath(output))
    return output.parent / f".{output.name}.lock"


def _describe(text: str) -> str:
    """'pid 123 on host, histosynth tile ...' from a lock file's contents (or what it says when unreadable)."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if "pid" not in fields:
        return "pid unknown"
    out = f"pid {fields['pid']}"
    if fields.get("host") and fields["host"] != socket.gethostname():
        out += f" on {fields['host']}"
    if fields.get("command"):
        out += f": {fields['command'][:120]}"
    return out


@contextmanager
def output_lock(output: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold the lock of ``output`` for the ``with`` block; :class:`LockedError` when another process holds it.

    Yields the lock file's path. The output's parent folder is created if missing.
    """
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = command if command is not None else " ".join(["histosynth", *sys.argv[1:]])
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                finally:
                    os.close(fd)
                raise LockedError(output, holder) from None
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: this file system has no locks; not guarding against a second writer", path)
                yield path
                return
            raise
        try:  # the holder before us may have removed the file after we opened it: lock the one under the name
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\ncommand={command}\n".encode(), 0)
        except OSError as err:  # a full disk: the lock holds all the same, only the holder goes unnamed
            log.debug("%s: could not record the holder: %s", path, err)
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)  # while still holding it: a waiting process re-checks the name
        finally:
            os.close(fd)
