"""stats.json, the file fit-stats writes and sample-masks reads: format, quantile summaries, reading it back.

The layout of stats.json is described in :mod:`histosynth.masks.stats`. Every
fitted distribution of a continuous quantity (sizes, shapes, orientations, NN
distances) is stored as a quantile summary ``Q = {"n", "mean", "std",
"quantiles"}`` with the quantiles at ``QUANTILE_P`` (:func:`quantile_summary`);
:func:`sample_quantiles` draws from one by inverse CDF.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError

FORMAT = "histosynth-stats"
VERSION = 1
N_QUANTILES = 201
QUANTILE_P = np.linspace(0.0, 1.0, N_QUANTILES)


def quantile_summary(values: np.ndarray) -> dict[str, Any]:
    """{"n", "mean", "std", "quantiles"} at QUANTILE_P (empty → n 0 and no quantiles)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    q = np.quantile(v, QUANTILE_P)
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()),
            "quantiles": [float(f"{x:.6g}") for x in q]}


def sample_quantiles(summary: Mapping[str, Any], u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw from a quantile summary at probabilities u."""
    q = np.asarray(summary["quantiles"], dtype=np.float64)
    return np.interp(np.asarray(u, float), np.linspace(0.0, 1.0, len(q)), q)


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a stats.json (format, version, the keys the sampler needs)."""
    path = Path(path)
    if path.is_dir():
        path = path / "stats.json"
    if not path.is_file():
        raise HistosynthError("no such stats file", path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HistosynthError(f"not a JSON stats file: {err}", path) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise HistosynthError(f"not a {FORMAT} file (format {found!r})",
                              path)
    if int(data.get("version", 0)) > VERSION:
        raise HistosynthError(f"stats version {data.get('version')} is newer than this histosynth ({VERSION})", path)
    missing = [k for k in ("classes", "mpp", "patch_size", "counts", "morphology", "spatial", "field",
                           "count_copula") if k not in data]
    if missing:
        raise HistosynthError(f"stats file lacks {missing}", path)
    return data
