"""Stack sets (histosynth.multifocus.stackset): atomic writing, reading back, and named errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histosynth.errors import HistosynthError
from histosynth.multifocus.stackset import StackSetWriter, read_stackset


def write(path, n=3, planes=5, size=(8, 8), offsets=None):
    rng = np.random.default_rng(0)
    stacks = rng.integers(0, 256, (n, planes, *size, 3), dtype=np.uint8)
    with StackSetWriter(path, planes, size, offsets) as w:
        for i in range(n):
            w.add({"slide": "s", "x": i, "y": 2 * i, "best_plane": i % planes, "source": "real"}, stacks[i])
        w.report["stage"] = "test"
    return stacks


def test_round_trip(tmp_path):
    stacks = write(tmp_path / "set", offsets=[-2.0, -1.0, 0.0, 1.0, 2.0])
    s = read_stackset(tmp_path / "set")
    assert len(s) == 3 and s.planes == 5 and s.size == (8, 8)
    np.testing.assert_array_equal(s.stacks, stacks)
    assert s.plane_offsets_um == [-2.0, -1.0, 0.0, 1.0, 2.0] and s.report["stage"] == "test"
    assert list(s.index["best_plane"]) == [0, 1, 2]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        with StackSetWriter(tmp_path / "set", 5, (8, 8)) as w:
            w.add({"slide": "s", "x": 0, "y": 0, "best_plane": 0, "source": "real"}, np.zeros((4, 8, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "index.csv").unlink(), "no index.csv"),
    (lambda p: (p / "report.json").write_text(json.dumps({"planes": 4, "plane_offsets_um": [0] * 4})), "4 planes"),
    (lambda p: (p / "report.json").write_text("{"), "unreadable report.json"),
    (lambda p: (p / "stacks.npy").write_bytes(b"junk"), "unreadable stacks.npy"),
    (lambda p: np.save(p / "stacks.npy", np.zeros((3, 5, 8, 8), np.uint8)), "expected uint8"),
    (lambda p: (p / "index.csv").write_text("slide,x,y,best_plane,source\ns,0,0,9,real\ns,1,1,0,real\n"
                                            "s,2,2,0,real\n"), "best_plane"),
])
def test_damaged_sets_are_named(tmp_path, damage, message):
    write(tmp_path / "set")
    damage(tmp_path / "set")
    with pytest.raises(HistosynthError, match=message) as e:
        read_stackset(tmp_path / "set")
    assert "set" in str(e.value)


def test_too_few_stacks_for_a_stage(tmp_path):
    write(tmp_path / "set", n=2)
    with pytest.raises(HistosynthError, match="2 stacks; this stage needs at least 8"):
        read_stackset(tmp_path / "set", min_stacks=8)
