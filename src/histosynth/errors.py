"""The one exception type that the CLI turns into a clean, one-line error."""

from __future__ import annotations

import os
import signal


class HistosynthError(Exception):
    """Bad input or an impossible request: message names the file and the problem.

    The CLI prints ``error: <message>`` and exits with status 2; no traceback.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class Terminated(BaseException):
    """The process was asked to stop by a signal (SIGTERM from Snakemake, SLURM or ``kill``).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it: it unwinds the
    stage (temporary files are removed on the way out), and the CLI prints ``error: <message>`` and exits
    with 128 + the signal number. A trainer that catches the signal between two steps saves a checkpoint
    first and says so in the message.
    """

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        super().__init__(message or f"stopped by {signal_name(self.signum)}")


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15, ... ('signal N' for a number with no name)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
