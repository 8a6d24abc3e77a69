"""Model selection on real held-out tiles of the TRAIN slides: the split, the score and the plateau check.

A segmenter is trained to its plateau, not to a step count: every
``val_every`` steps it is scored on validation tiles, and the best
checkpoint (by validation PQ) is the one written as ``model.pt`` and
scored on the test slides.

**The split** (:func:`spatial_holdout`). Per slide, the tiles are ordered
along the longer axis of the slide's tile grid and the last
``round(fraction × n)`` of them (at least one, when the slide has two tiles
or more) are validation tiles: one spatial block at an edge of the slide,
not a scatter of tiles between training ones. Training tiles that share more
than ``max_overlap`` pixels in both axes with a validation tile are left out
of training (counted and logged), so no nucleus is both trained on and
validated on except within that border (MoNuSeg's tiles overlap by 4 px).
A slide with a single tile gives no validation tile. No arm trains on a
validation tile: synthetic patch sets whose rows sit at a held-out
(slide, x, y) — the GAN's painting of a validation tile's mask — are left
out too (:func:`held_out_rows`).

**The plateau** (:func:`still_rising`). An arm is flagged as still rising
when its best validation PQ in the last quarter of its steps exceeds its
best before that by more than ``tolerance``: its budget was too short, and
a comparison with it is void.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError

log = logging.getLogger(__name__)

VALIDATION_COLUMNS = ["step", "pq", "aji", "dice", "dq", "sq", "n_true", "n_pred", "seconds"]


@dataclass
class Holdout:
    """Row numbers (per patch set) of the training, validation and left-out tiles."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    dropped: list[np.ndarray]
    keys: set[tuple[str, int, int]] = field(default_factory=set)  # (slide, x, y) of validation and left-out tiles

    @property
    def n_train(self) -> int:
        return int(sum(len(a) for a in self.train))

    @property
    def n_val(self) -> int:
        return int(sum(len(a) for a in self.val))

    @property
    def n_dropped(self) -> int:
        return int(sum(len(a) for a in self.dropped))


def _split_slide(tiles: pd.DataFrame, fraction: float, max_overlap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, dropped) row positions of one slide's tiles (positions into ``tiles``)."""
    n = len(tiles)
    if n < 2:
        return np.arange(n), np.zeros(0, int), np.zeros(0, int)
    x = tiles["x"].to_numpy(float)
    y = tiles["y"].to_numpy(float)
    ds = tiles["downsample"].to_numpy(float) if "downsample" in tiles else np.ones(n)
    w = tiles["width"].to_numpy(float) * ds
    h = tiles["height"].to_numpy(float) * ds
    along, across = (x, y) if np.ptp(x) >= np.ptp(y) else (y, x)
    order = np.lexsort((across, along))  # by the long axis, ties by the other
    n_val = min(n - 1, max(1, round(fraction * n)))
    val = np.sort(order[n - n_val:])
    rest = np.sort(order[: n - n_val])
    # overlap in patch pixels with any validation tile, per axis
    ox = np.minimum(x[rest, None] + w[rest, None], x[None, val] + w[None, val]) - np.maximum(x[rest, None],
                                                                                           x[None, val])
    oy = np.minimum(y[rest, None] + h[rest, None], y[None, val] + h[None, val]) - np.maximum(y[rest, None],
                                                                                           y[None, val])
    limit = max_overlap * ds[rest, None]
    touching = ((ox > limit) & (oy > limit)).any(axis=1)
    return rest[~touching], val, rest[touching]


def spatial_holdout(indexes: Sequence[pd.DataFrame], fraction: float, max_overlap: int,
                    names: Sequence[str] | None = None) -> Holdout:
    """Split each slide of the patch sets' ``index.csv`` tables into training, validation and left-out tiles.

    ``indexes``: one table per patch set (columns slide, x, y, width, height and downsample). Returns row
    numbers per set. An empty validation set is an error naming the sets.
    """
    if not 0.0 < fraction < 1.0:
        raise HistosynthError(f"the validation fraction must be in (0, 1), got {fraction}")
    if max_overlap < 0:
        raise HistosynthError(f"the validation overlap must be at least 0 pixels, got {max_overlap}")
    train, val, dropped, keys = [], [], [], set()
    for index in indexes:
        missing = {"slide", "x", "y", "width", "height"} - set(index.columns)
        if missing:
            raise HistosynthError(f"a patch set's index lacks the columns {sorted(missing)} needed to hold out "
                                  "validation tiles")
        parts = {"train": [], "val": [], "dropped": []}
        for _, rows in index.groupby(index["slide"].astype(str), sort=True):
            positions = rows.index.to_numpy()
            local = index.index.get_indexer(positions)
            tr, va, dr = _split_slide(rows.reset_index(drop=True), fraction, max_overlap)
            parts["train"].append(local[tr])
            parts["val"].append(local[va])
            parts["dropped"].append(local[dr])
        merged = {k: np.sort(np.concatenate(v)) if v else np.zeros(0, int) for k, v in parts.items()}
        train.append(merged["train"])
        val.append(merged["val"])
        dropped.append(merged["dropped"])
        for rows in (merged["val"], merged["dropped"]):
            sub = index.iloc[rows]
            keys |= set(zip(sub["slide"].astype(str), sub["x"].astype(int), sub["y"].astype(int)))
    holdout = Holdout(train, val, dropped, keys)
    what = ", ".join(map(str, names)) if names else f"{len(indexes)} patch sets"
    if holdout.n_val == 0:
        raise HistosynthError(f"the validation set came out empty: every train slide has a single tile ({what}); "
                              "give more tiles per slide (a smaller tile size) or more slides")
    if holdout.n_train == 0:
        raise HistosynthError(f"no training tile is left after holding out validation tiles ({what}); lower "
                              "the validation fraction or overlap")
    log.info("validation: %d tiles held out (fraction %.2f), %d training tiles, %d left out for sharing more "
             "than %d px with a validation tile", holdout.n_val, fraction, holdout.n_train, holdout.n_dropped,
             max_overlap)
    return holdout


def held_out_rows(index: pd.DataFrame, keys: set[tuple[str, int, int]]) -> np.ndarray:
    """Boolean mask of the rows of a patch set's index that sit at a held-out (slide, x, y)."""
    if not keys or not {"slide", "x", "y"} <= set(index.columns):
        return np.zeros(len(index), bool)
    triples = zip(index["slide"].astype(str), index["x"].astype(int), index["y"].astype(int))
    return np.fromiter((t in keys for t in triples), bool, count=len(index))


def still_rising(rows: Sequence[dict[str, Any]], total: int, tolerance: float) -> bool:
    """True when the best validation PQ after 3/4 of ``total`` steps beats the best before by > ``tolerance``."""
    cut = 0.75 * total
    before = [float(r["pq"]) for r in rows if r["step"] <= cut]
    after = [float(r["pq"]) for r in rows if r["step"] > cut]
    if not before or not after:
        return False
    return max(after) - max(before) > tolerance


def effective_val_every(val_every: int, steps: int) -> int:
    """``val_every``, at most a quarter of ``steps`` so the curve can show whether it still rises."""
    quarter = max(1, steps // 4)
    if val_every > quarter:
        log.info("validating every %d steps rather than %d: at least four scores over %d steps", quarter,
                 val_every, steps)
        return quarter
    return int(val_every)
