"""Shared fixtures: where the real public data lives, and skipping without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("HISTOSYNTH_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $HISTOSYNTH_SHARED_DATA); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set HISTOSYNTH_SHARED_DATA)")
    return SHARED_DATA


def shared_file(*parts: str) -> Path:
    """A file under the shared data folder, or skip the calling test with a reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not found: {path}")
    return path
