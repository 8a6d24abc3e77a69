"""Assign whole slides to train / test, so nothing fitted ever sees a test slide.

Either explicit lists (every slide named exactly once) or a seeded random
split by fraction; with ``groups`` (e.g. the stain style of each slide) each
group is split on its own so both sides see every group when it has at least
two slides. The result does not depend on the order the slides are given in.
A run with fewer than two slides has nothing to test on: its slides all go to
train.

:func:`split_slides` is the one split: the workflow calls it at parse time
(:func:`split_from_config`, to know which slides fit what) and ``rule split``
calls it through ``histosynth split`` with the flags :func:`split_inputs`
gives, so the two agree by construction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_csv

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


def split_slides(
    slides: Sequence[str],
    test_fraction: float = 0.34,
    seed: int = 0,
    *,
    train: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """A table ``slide, split`` with one row per slide, sorted by slide name.

    Explicit ``train``/``test`` lists are checked and taken as they are. Otherwise fewer than two slides all
    go to train (there is nothing to test on; a warning says so), and more are split at random.
    """
    names = sorted(set(slides))
    if len(names) != len(slides):
        dupes = sorted({s for s in slides if list(slides).count(s) > 1})
        raise HistosynthError(f"slide names repeat: {dupes}")
    if train is not None or test is not None:
        return _explicit(names, list(train or []), list(test or []))
    if len(names) < 2:
        log.warning("%d slide(s): nothing to test on, every slide goes to train", len(names))
        return pd.DataFrame({"slide": names, "split": ["train"] * len(names)}, dtype=object)
    if not 0.0 < test_fraction < 1.0:
        raise HistosynthError(f"test fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[str]] = {}
    for s in names:
        by_group.setdefault(str(groups.get(s, "")) if groups else "", []).append(s)
    test_set: set[str] = set()
    for _, members in sorted(by_group.items()):
        n_test = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        order = rng.permutation(len(members))
        test_set.update(members[i] for i in order[:n_test])
    if not test_set:  # tiny groups of one slide each: take one test slide overall
        test_set.add(names[int(rng.integers(len(names)))])
    if len(test_set) == len(names):
        test_set.discard(sorted(test_set)[0])
    table = pd.DataFrame({"slide": names, "split": ["test" if s in test_set else "train" for s in names]})
    log.info("split %d slides: %d train, %d test (fraction %.2f, seed %d)",
             len(names), (table["split"] == "train").sum(), len(test_set), test_fraction, seed)
    return table


def _explicit(names: list[str], train: list[str], test: list[str]) -> pd.DataFrame:
    both = sorted(set(train) & set(test))
    if both:
        raise HistosynthError(f"slides listed as both train and test: {both}")
    unknown = sorted((set(train) | set(test)) - set(names))
    if unknown:
        raise HistosynthError(f"split lists name slides that are not in the run: {unknown}")
    missing = sorted(set(names) - set(train) - set(test))
    if missing:
        raise HistosynthError(f"slides in neither the train nor the test list: {missing}")
    if not train or not test:
        raise HistosynthError("both the train and the test list need at least one slide")
    return pd.DataFrame({"slide": names, "split": ["test" if s in set(test) else "train" for s in names]})


def split_inputs(config: Mapping[str, Any], slides: pd.DataFrame) -> dict[str, Any]:
    """The arguments of :func:`split_slides` for a validated config and its slide table
    (:func:`histosynth.config.slide_table`): the annotated slides, the ``split`` settings and, with
    ``split.by_stain``, each slide's stain style as its group."""
    cfg = config["split"]
    names = [s for s, a in zip(slides["slide"], slides["annotations"]) if a is not None]
    groups = None
    if cfg["by_stain"]:
        groups = {s: g for s, g in zip(slides["slide"], slides["stain"]) if g is not None} or None
    return {"slides": names, "test_fraction": cfg["test_fraction"], "seed": cfg["seed"], "train": cfg["train"],
            "test": cfg["test"], "groups": groups}


def split_from_config(config: Mapping[str, Any], slides: pd.DataFrame) -> dict[str, str]:
    """slide -> ``train``/``test`` for the annotated slides of a run: what ``rule split`` writes to split.csv."""
    table = split_slides(**split_inputs(config, slides))
    return dict(zip(table["slide"], table["split"]))


def write_split(table: pd.DataFrame, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_csv(table, path)


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise HistosynthError("no such split file", path)
    table = pd.read_csv(path, dtype=str)
    if list(table.columns[:2]) != ["slide", "split"] or not table["split"].isin(SPLITS).all():
        raise HistosynthError("a split file has columns slide, split with values train/test", path)
    return table


def slides_in(path: str | os.PathLike, split: str) -> list[str]:
    """The slides of one side of a split file."""
    if split not in SPLITS:
        raise HistosynthError(f"split must be one of {SPLITS}, got {split!r}")
    table = read_split(path)
    return table.loc[table["split"] == split, "slide"].tolist()
