"""The quality gate on painted pairs: which pairs it keeps, what it counts, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.cli import build_parser
from histosynth.errors import HistosynthError
from histosynth.io.patchset import read_patchset
from histosynth.segmentation import segmenter as sg
from histosynth.segmentation.gate import gate_pairs
from tests.test_segmenter import TINY, _write_set

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    real = [_write_set(root / "real", "r", seed=1)]
    sg.train_segmenter(real, root / "model", arm="real", steps=2, checkpoint_every=2, val_every=2, seed=0, **TINY)
    pairs = _write_set(root / "pairs", "synthetic", n=4, seed=5, source="translate")
    return root / "model" / "model.pt", pairs


def test_keeps_the_pairs_whose_nuclei_are_found_and_counts_the_rest(model_and_pairs, tmp_path, monkeypatch):
    import histosynth.models.hovernet as hn

    model, pairs = model_and_pairs
    source = read_patchset(pairs)
    calls = {"n": 0}

    def found_on_even_pairs(np_map, hv, tp=None, **sizes):  # a segmenter that finds pairs 0 and 2 exactly
        i = calls["n"]
        calls["n"] += 1
        inst = np.asarray(source.inst[i]) if i % 2 == 0 else np.zeros(np_map.shape, np.int32)
        return inst, {}

    monkeypatch.setattr(hn, "postprocess", found_on_even_pairs)
    report = gate_pairs(model, pairs, tmp_path / "gated", min_pq=0.5, device="cpu")
    kept = read_patchset(tmp_path / "gated", require=("images", "inst", "types"))
    assert (report["pairs"], report["kept"], report["dropped"]) == (4, 2, 2)
    assert list(kept.index["y"]) == [source.index["y"][0], source.index["y"][2]]
    assert list(kept.index["gate_pq"]) == [1.0, 1.0] and set(kept.index["source"]) == {"translate"}
    for j, i in enumerate((0, 2)):
        assert np.array_equal(kept.images[j], source.images[i]) and np.array_equal(kept.inst[j], source.inst[i])
        assert np.array_equal(kept.types[j], source.types[i])
    assert kept.report["stage"] == "gate-pairs" and kept.report["pq_quantiles"]["dropped"]["max"] == 0.0
    assert kept.report["classes"] == source.report["classes"]  # the painted set's report is carried over


@pytest.mark.parametrize("fraction, kept_rows", [(0.25, [0]), (0.5, [0, 2]), (0.75, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_keep_fraction_keeps_the_best_share_whatever_their_pq(model_and_pairs, tmp_path, monkeypatch, fraction,
                                                              kept_rows):
    """round(f · n) pairs of highest PQ (ties in the pairs' order), also below min_pq; the report says the rule."""
    import histosynth.models.hovernet as hn

    model, pairs = model_and_pairs
    source = read_patchset(pairs)
    calls = {"n": 0}

    def found_on_even_pairs(np_map, hv, tp=None, **sizes):
        i = calls["n"]
        calls["n"] += 1
        return (np.asarray(source.inst[i]) if i % 2 == 0 else np.zeros(np_map.shape, np.int32)), {}

    monkeypatch.setattr(hn, "postprocess", found_on_even_pairs)
    report = gate_pairs(model, pairs, tmp_path / "gated", min_pq=0.9, keep_fraction=fraction, device="cpu")
    kept = read_patchset(tmp_path / "gated")
    assert report["kept"] == len(kept_rows) and report["dropped"] == 4 - len(kept_rows)
    assert list(kept.index["y"]) == [source.index["y"][i] for i in kept_rows]
    assert report["keep_fraction"] == fraction and report["min_pq"] is None


def test_the_real_segmenter_runs_and_min_pq_zero_keeps_everything(model_and_pairs, tmp_path):
    model, pairs = model_and_pairs
    report = gate_pairs(model, pairs, tmp_path / "all", min_pq=0.0, device="cpu")
    assert report["kept"] == 4 and report["dropped"] == 0
    assert read_patchset(tmp_path / "all").index["gate_pq"].between(0, 1).all()


def test_bad_inputs_leave_nothing_behind(model_and_pairs, tmp_path, monkeypatch):
    import histosynth.models.hovernet as hn

    model, pairs = model_and_pairs
    with pytest.raises(HistosynthError, match=r"min_pq must be in \[0, 1\]"):
        gate_pairs(model, pairs, tmp_path / "o", min_pq=1.5)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(HistosynthError, match=r"keep_fraction must be in \(0, 1\]"):
            gate_pairs(model, pairs, tmp_path / "o", keep_fraction=bad)
    monkeypatch.setattr(hn, "postprocess", lambda np_map, hv, tp=None, **k: (np.zeros(np_map.shape, np.int32), {}))
    with pytest.raises(HistosynthError, match="drops every one of the 4 painted pairs"):
        gate_pairs(model, pairs, tmp_path / "o", min_pq=0.5, device="cpu")
    with pytest.raises(HistosynthError, match="not a patch set"):
        gate_pairs(model, tmp_path / "missing", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_flags():
    args = build_parser().parse_args(["gate-pairs", "m.pt", "p", "o", "--min-pq", "0.3", "--batch", "2"])
    assert (args.min_pq, args.batch, args.func.__name__) == (0.3, 2, "_run_gate")
    assert args.keep_fraction is None
    assert build_parser().parse_args(["gate-pairs", "m.pt", "p", "o", "--keep-fraction", "0.3"]).keep_fraction == 0.3
