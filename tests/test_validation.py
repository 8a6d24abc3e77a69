"""The validation split (one spatial block per slide), held-out synthetic rows, and the plateau flag."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.errors import HistosynthError
from histosynth.segmentation.validation import (
    effective_val_every,
    held_out_rows,
    spatial_holdout,
    still_rising,
)


def grid(slide, rows, cols, size=128, stride=128, downsample=1.0):
    return pd.DataFrame([{"slide": slide, "x": int(c * stride * downsample), "y": int(r * stride * downsample),
                          "width": size, "height": size, "downsample": downsample}
                         for r in range(rows) for c in range(cols)])


def test_holdout_is_one_block_at_the_end_of_the_long_axis():
    index = grid("a", 2, 5)  # wider than tall: the block is the right-hand columns
    h = spatial_holdout([index], 0.2, 0)
    val = index.iloc[h.val[0]]
    assert len(val) == 2 and set(val["x"]) == {4 * 128}
    assert h.n_train == 8 and h.n_dropped == 0
    assert set(h.train[0]).isdisjoint(h.val[0])


def test_overlapping_neighbours_are_left_out_beyond_the_tolerance():
    index = grid("a", 4, 4, size=128, stride=124)  # MoNuSeg: 4-px overlap between neighbours
    kept = spatial_holdout([index], 0.25, 8)
    assert kept.n_val == 4 and kept.n_dropped == 0 and kept.n_train == 12
    strict = spatial_holdout([index], 0.25, 0)
    assert strict.n_val == 4 and strict.n_dropped == 4 and strict.n_train == 8
    # the left-out tiles are counted in the keys an arm must not train on
    assert len(strict.keys) == 8


def test_each_slide_gets_its_own_block_and_single_tiles_stay_in_training():
    index = pd.concat([grid("a", 1, 4), grid("b", 1, 1)], ignore_index=True)
    h = spatial_holdout([index], 0.25, 0)
    assert set(index.iloc[h.val[0]]["slide"]) == {"a"}
    assert "b" in set(index.iloc[h.train[0]]["slide"])


def test_empty_validation_set_is_an_error_naming_the_sets():
    with pytest.raises(HistosynthError, match="validation set came out empty.*only.csv"):
        spatial_holdout([grid("a", 1, 1)], 0.2, 0, names=["only.csv"])
    with pytest.raises(HistosynthError, match=r"fraction must be in \(0, 1\)"):
        spatial_holdout([grid("a", 2, 2)], 1.0, 0)
    with pytest.raises(HistosynthError, match="lacks the columns"):
        spatial_holdout([pd.DataFrame({"slide": ["a"], "x": [0]})], 0.2, 0)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 6), fraction=st.floats(0.05, 0.95), overlap=st.integers(0, 4),
       stride=st.sampled_from([120, 124, 128]))
def test_holdout_partitions_the_tiles(rows, cols, fraction, overlap, stride):
    index = grid("a", rows, cols, stride=stride)
    if rows * cols < 2:
        with pytest.raises(HistosynthError):
            spatial_holdout([index], fraction, overlap)
        return
    try:
        h = spatial_holdout([index], fraction, overlap)
    except HistosynthError as err:  # everything left out for touching the block: said so
        assert "no training tile" in str(err)
        return
    parts = np.concatenate([h.train[0], h.val[0], h.dropped[0]])
    assert sorted(parts.tolist()) == list(range(rows * cols))
    assert h.n_val >= 1 and h.n_train >= 1
    # no training tile shares more than `overlap` px in both axes with a validation tile
    tr, va = index.iloc[h.train[0]], index.iloc[h.val[0]]
    for _, t in tr.iterrows():
        for _, v in va.iterrows():
            ox = min(t.x + 128, v.x + 128) - max(t.x, v.x)
            oy = min(t.y + 128, v.y + 128) - max(t.y, v.y)
            assert not (ox > overlap and oy > overlap)


def test_held_out_rows_match_slide_and_position():
    index = pd.DataFrame({"slide": ["a", "a", "b"], "x": [0, 128, 0], "y": [0, 0, 0]})
    assert held_out_rows(index, {("a", 128, 0)}).tolist() == [False, True, False]
    assert held_out_rows(index, set()).tolist() == [False, False, False]
    assert held_out_rows(pd.DataFrame({"slide": ["a"]}), {("a", 0, 0)}).tolist() == [False]


def test_still_rising_compares_the_last_quarter_with_the_rest():
    flat = [{"step": s, "pq": p} for s, p in [(25, 0.3), (50, 0.4), (75, 0.41), (100, 0.405)]]
    rising = [{"step": s, "pq": p} for s, p in [(25, 0.3), (50, 0.35), (75, 0.4), (100, 0.45)]]
    assert not still_rising(flat, 100, 0.01)
    assert still_rising(rising, 100, 0.01)
    assert not still_rising(rising, 100, 0.06)
    assert not still_rising([{"step": 100, "pq": 0.5}], 100, 0.01)  # nothing before: cannot tell


def test_val_every_is_at_most_a_quarter_of_the_steps():
    assert effective_val_every(500, 2000) == 500
    assert effective_val_every(500, 64) == 16
    assert effective_val_every(5, 2) == 1
