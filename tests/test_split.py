"""Train/test split by slide."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.patches.split import read_split, slides_in, split_slides

NAMES = [f"s{i}" for i in range(8)]


def test_fraction_and_seed():
    t = split_slides(NAMES, 0.25, seed=1)
    assert (t["split"] == "test").sum() == 2 and len(t) == 8
    assert t.equals(split_slides(list(reversed(NAMES)), 0.25, seed=1))  # order does not matter
    assert any(not split_slides(NAMES, 0.25, seed=s).equals(t) for s in range(2, 6))


@given(n=st.integers(2, 30), frac=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_both_sides_never_empty(n, frac, seed):
    t = split_slides([f"s{i}" for i in range(n)], frac, seed)
    assert set(t["split"]) == {"train", "test"}


def test_groups_are_each_split():
    groups = {s: ("pale" if i % 2 else "dark") for i, s in enumerate(NAMES)}
    t = split_slides(NAMES, 0.25, seed=0, groups=groups)
    test = t.loc[t["split"] == "test", "slide"]
    assert {groups[s] for s in test} == {"pale", "dark"}


def test_explicit_lists():
    t = split_slides(["a", "b", "c"], train=["a", "b"], test=["c"])
    assert t["split"].tolist() == ["train", "train", "test"]
    for train, test, msg in [
        (["a", "b"], ["b", "c"], "both"),
        (["a", "b"], ["x"], "not in the run"),
        (["a"], ["c"], "neither"),
        (["a", "b", "c"], [], "at least one"),
    ]:
        with pytest.raises(HistosynthError, match=msg):
            split_slides(["a", "b", "c"], train=train, test=test)


def test_bad_input():
    with pytest.raises(HistosynthError, match="at least 2"):
        split_slides(["a"])
    with pytest.raises(HistosynthError, match="repeat"):
        split_slides(["a", "a", "b"])
    with pytest.raises(HistosynthError, match="between 0 and 1"):
        split_slides(NAMES, 1.0)


def test_cli(tmp_path):
    out = tmp_path / "split.csv"
    assert main(["split", str(out), "--slides", *NAMES, "--test-fraction", "0.25", "--seed", "3"]) == 0
    assert len(read_split(out)) == 8 and len(slides_in(out, "test")) == 2
    assert main(["split", str(out), "--slides", "a", "b", "--train", "a", "--test", "b"]) == 0
    assert slides_in(out, "train") == ["a"]
    assert main(["split", str(tmp_path / "x.csv"), "--slides", "a"]) == 2
    assert not (tmp_path / "x.csv").exists()
