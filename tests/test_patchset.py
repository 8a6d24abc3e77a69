"""Patch sets: streamed .npy writing, atomic rename, reading with checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histosynth.errors import HistosynthError
from histosynth.io.patchset import INDEX_COLUMNS, PatchSetWriter, read_patchset


def _row(i):
    return {"slide": "s", "x": i * 10, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5, "width": 8,
            "height": 8, "tissue_fraction": 1.0, "n_nuclei": i, "source": "s.tif"}


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    inst = rng.integers(0, 4, (5, 8, 8)).astype(np.int32)
    types = (inst > 0).astype(np.uint8)
    with PatchSetWriter(tmp_path / "ps", ("images", "inst", "types"), (8, 8)) as w:
        for i in range(5):
            w.add(_row(i), images=images[i], inst=inst[i], types=types[i])
        w.report = {"stage": "test", "kept": np.int64(5)}
    ps = read_patchset(tmp_path / "ps", require=("images", "inst", "types"))
    assert len(ps) == 5 and list(ps.index.columns) == INDEX_COLUMNS
    assert np.array_equal(ps.images, images) and np.array_equal(ps.inst, inst) and np.array_equal(ps.types, types)
    assert isinstance(ps.images, np.memmap)
    assert ps.report == {"stage": "test", "kept": 5}
    # the files are ordinary .npy files
    assert np.load(tmp_path / "ps" / "inst.npy").dtype == np.int32


def test_empty_set_is_valid(tmp_path):
    with PatchSetWriter(tmp_path / "ps", ("images",), (8, 8)):
        pass
    ps = read_patchset(tmp_path / "ps")
    assert len(ps) == 0 and ps.images.shape == (0, 8, 8, 3)


def test_absent_arrays_and_require(tmp_path):
    with PatchSetWriter(tmp_path / "ps", ("images",), (8, 8)) as w:
        w.add(_row(0), images=np.zeros((8, 8, 3), np.uint8))
    ps = read_patchset(tmp_path / "ps")
    assert ps.inst is None and ps.types is None
    assert not (tmp_path / "ps" / "inst.npy").exists()
    with pytest.raises(HistosynthError, match="no inst.npy"):
        read_patchset(tmp_path / "ps", require=("inst",))


def test_exception_leaves_nothing_and_keeps_old_set(tmp_path):
    with PatchSetWriter(tmp_path / "ps", ("images",), (8, 8)) as w:
        w.add(_row(0), images=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(RuntimeError):
        with PatchSetWriter(tmp_path / "ps", ("images",), (8, 8)) as w:
            w.add(_row(1), images=np.ones((8, 8, 3), np.uint8))
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ps"]
    assert read_patchset(tmp_path / "ps").index["x"].tolist() == [0]


def test_wrong_shapes_and_names(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        PatchSetWriter(tmp_path / "ps", ("pixels",), (8, 8))
    with pytest.raises(ValueError, match="expected"):
        with PatchSetWriter(tmp_path / "ps", ("images",), (8, 8)) as w:
            w.add(_row(0), images=np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="needs arrays"):
        with PatchSetWriter(tmp_path / "ps", ("images",), (8, 8)) as w:
            w.add(_row(0), inst=np.zeros((8, 8), np.int32))
    assert not (tmp_path / "ps").exists()


def test_bad_sets_are_named(tmp_path):
    with pytest.raises(HistosynthError, match="no index.csv"):
        read_patchset(tmp_path)
    with PatchSetWriter(tmp_path / "ps", ("images",), (8, 8)) as w:
        w.add(_row(0), images=np.zeros((8, 8, 3), np.uint8))
    np.save(tmp_path / "ps" / "inst.npy", np.zeros((2, 8, 8), np.int32))  # wrong count
    with pytest.raises(HistosynthError, match="inst.npy"):
        read_patchset(tmp_path / "ps")
    (tmp_path / "ps" / "inst.npy").unlink()
    pd.DataFrame({"slide": ["s"]}).to_csv(tmp_path / "ps" / "index.csv", index=False)
    with pytest.raises(HistosynthError, match="lacks columns"):
        read_patchset(tmp_path / "ps")
