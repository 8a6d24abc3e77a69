"""The one exception type that the CLI turns into a clean, one-line error."""

from __future__ import annotations

import os


class HistosynthError(Exception):
    """Bad input or an impossible request: message names the file and the problem.

    The CLI prints ``error: <message>`` and exits with status 2; no traceback.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
