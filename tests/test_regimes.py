"""The learning-curve grid: nested seeded draws of k train slides, and its start-up checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from histosynth.errors import HistosynthError
from histosynth.segmentation.regimes import (
    draw_train_slides,
    evidence_arms,
    parse_regime_path,
    plan_regimes,
    regime_path,
)

TRAIN = [f"s{i}" for i in range(9)]


@given(seed=st.integers(0, 2**31), n=st.integers(2, 12))
def test_draws_are_nested_seeded_and_order_free(seed, n):
    train = [f"slide-{i}" for i in range(n)]
    draws = [draw_train_slides(train, k, seed) for k in range(1, n + 1)]
    for small, big in zip(draws, draws[1:]):
        assert set(small) < set(big)
    assert draws[-1] == sorted(train) == draw_train_slides(train, "all", seed)
    assert draw_train_slides(list(reversed(train)), 1, seed) == draws[0]


def test_seeds_draw_different_slides():
    assert len({tuple(draw_train_slides(TRAIN, 2, s)) for s in range(10)}) > 3


def test_plan_checks_k_and_arms_before_anything_runs():
    plan = plan_regimes({"k": [1, "all"], "seeds": [0, 1], "arms": ["real", "synthetic"]}, TRAIN)
    assert [(r.k, r.seed, len(r.slides)) for r in plan] == [("1", 0, 1), ("1", 1, 1), ("all", 0, 9),
                                                            ("all", 1, 9)]
    assert plan[0].path == "evidence/k-1/seed-0/"
    with pytest.raises(HistosynthError, match="asks for 10 train slides but the split has 9"):
        plan_regimes({"k": [10], "seeds": [0, 1], "arms": ["real"]}, TRAIN)
    with pytest.raises(HistosynthError, match="no arm 'both'"):
        plan_regimes({"k": [1], "seeds": [0, 1], "arms": ["both"]}, TRAIN)
    with pytest.raises(HistosynthError, match="needs train slides"):
        plan_regimes({"k": [1], "seeds": [0, 1], "arms": ["real"]}, [])


def test_real_is_always_the_first_arm():
    assert evidence_arms(["synthetic", "real+synthetic"]) == ["real", "synthetic", "real+synthetic"]
    assert evidence_arms(["painted-real", "real"]) == ["real", "painted-real"]


def test_regime_paths_round_trip():
    assert parse_regime_path(regime_path("all", 3)) == ("all", 3)
    assert parse_regime_path("") is None
    with pytest.raises(HistosynthError, match="not a regime path"):
        parse_regime_path("evidence/k-x/seed-0/")
