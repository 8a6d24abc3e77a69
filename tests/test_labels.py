"""io.labels (the one class-map format, the majority type of an instance) and io.pool (the training pool)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histosynth.errors import HistosynthError
from histosynth.io.labels import (
    class_columns,
    class_key,
    class_map_to_json,
    classes_of_patch_sets,
    instance_types,
    parse_class_map,
    read_class_map,
    report_class_map,
)
from histosynth.io.patchset import PatchSetWriter
from histosynth.io.pool import dihedral, load_pool, max_type, pool_fingerprint


# -- class maps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("obj", [
    {"1": "Epithelial", "2": "Lymphocyte"},  # canonical (JSON)
    {2: "Lymphocyte", 1: "Epithelial"},  # canonical (Python), any order
    {"Epithelial": 1, "Lymphocyte": 2},  # name → id (config.yaml, --classes)
    {"Lymphocyte": "2", "Epithelial": "1"},  # name → id with ids as strings
])
def test_every_form_reads_the_same(obj):
    assert read_class_map(obj) == {1: "Epithelial", 2: "Lymphocyte"}
    assert list(read_class_map(obj)) == [1, 2]
    assert class_map_to_json(obj) == {"1": "Epithelial", "2": "Lymphocyte"}


def test_legacy_column_form_with_and_without_spellings():
    legacy = {"n_epithelial": 1, "n_spindle_cell": 3}
    assert read_class_map(legacy) == {1: "epithelial", 3: "spindle_cell"}
    assert read_class_map(legacy, spellings=["Spindle cell", "Epithelial"]) == {1: "Epithelial", 3: "Spindle cell"}
    report = {"classes": legacy, "class_counts": {"Epithelial": 4}}
    assert report_class_map(report) == {1: "Epithelial", 3: "spindle_cell"}
    assert report_class_map({"stage": "tile"}) == {} and read_class_map({}) == {}
    sampled = {"classes": {"n_epithelial": 1, "n_spindle": 3}, "class_names": {"1": "Epithelial", "3": "Spindle"}}
    assert report_class_map(sampled) == {1: "Epithelial", 3: "Spindle"}


def test_merged_classes_take_the_first_name_like_the_index_columns():
    merged = {"Tumour": 1, "Tumor": 1, "Lymph": 2}
    assert read_class_map(merged) == {1: "Tumor", 2: "Lymph"}
    assert class_columns(merged) == {1: "n_tumor", 2: "n_lymph"}
    assert class_columns(None) == {1: "n_nucleus"}


@pytest.mark.parametrize("obj, message", [
    (["Epithelial"], "not a mapping"),
    ("1=Epithelial", "not a mapping"),
    ({"1": "Epithelial", "Lymphocyte": 2}, "mixed"),
    ({"Epithelial": "one"}, "non-integer"),
    ({"1": "Epithelial", "01": "Tumour"}, "given twice"),
    ({"256": "Big"}, "outside 0..255"),
    ({"-1": "Neg"}, "outside"),
    ({"1": " "}, "empty name"),
    ({"n_a": 1, "n_b": 1}, "given twice"),
])
def test_unreadable_maps_are_named_never_empty(obj, message):
    with pytest.raises(HistosynthError, match=f"somewhere/report.json: unreadable class map.*{message}"):
        read_class_map(obj, "somewhere/report.json")


def test_cli_pairs_and_loose_keys():
    assert parse_class_map(["Epithelial=1", "Lymphocyte=2"]) == {"Epithelial": 1, "Lymphocyte": 2}
    assert parse_class_map([]) is None and parse_class_map(None) is None
    assert parse_class_map(["a=b=3"]) == {"a=b": 3}
    for bad in (["x"], ["x=0"], ["x=256"], ["x=one"], ["x=1", "x=2"], ["=1"]):
        with pytest.raises(HistosynthError):
            parse_class_map(bad)
    assert class_key("n_Spindle cell") == class_key("spindle-cell") == "spindle_cell"


def _set(path, report, n=2, size=16, slide="s", image=0):
    with PatchSetWriter(path, ("images", "inst", "types"), (size, size)) as w:
        for i in range(n):
            inst = np.zeros((size, size), np.int32)
            inst[2:6, 2:6] = 1
            types = (inst > 0).astype(np.uint8) * (1 + i % 2)
            w.add({"slide": slide, "x": 0, "y": i * size, "level": 0, "downsample": 1.0, "mpp": 0.5, "width": size,
                   "height": size, "tissue_fraction": 1.0, "n_nuclei": 1, "source": "t"},
                  images=np.full((size, size, 3), image + i, np.uint8), inst=inst, types=types)
        if report is not None:
            w.report = report
    return path


def test_classes_of_patch_sets_merges_and_refuses_contradictions(tmp_path):
    new = _set(tmp_path / "new", {"classes": {"1": "Epithelial"}})
    old = _set(tmp_path / "old", {"classes": {"n_epithelial": 1, "n_lymphocyte": 2}})
    bare = _set(tmp_path / "bare", None)
    assert classes_of_patch_sets([old, bare, new]) == {1: "Epithelial", 2: "lymphocyte"}  # canonical spelling wins
    assert classes_of_patch_sets([bare]) == {}
    other = _set(tmp_path / "other", {"classes": {"1": "Tumour"}})
    with pytest.raises(HistosynthError, match=r"other/report.json: type 1 is 'Tumour' here but 'Epithelial' in "
                                              r".*new/report.json: contradictory"):
        classes_of_patch_sets([new, other])
    (bare / "report.json").write_text("{not json")
    with pytest.raises(HistosynthError, match="bare/report.json: unreadable report.json"):
        classes_of_patch_sets([bare])
    (bare / "report.json").write_text(json.dumps({"classes": {"1": 2.5}}))
    with pytest.raises(HistosynthError, match="bare/report.json: unreadable class map"):
        classes_of_patch_sets([bare])


# -- the type of an instance ---------------------------------------------------------------------------------
def _majority_by_loop(inst, types):
    out = {}
    for i in np.unique(inst[inst > 0]):
        t = types[inst == i]
        t = t[t > 0]
        out[int(i)] = int(np.bincount(t).argmax()) if t.size else 0  # argmax: the smaller type on ties
    return out


@pytest.mark.parametrize("seed", range(6))
def test_instance_types_is_the_majority_nonzero_type(seed):
    rng = np.random.default_rng(seed)
    inst = rng.integers(0, 6, (20, 20)) * (10 ** 6 if seed == 5 else 1 + seed % 3)  # sparse and huge ids too
    types = rng.integers(0, 4, (20, 20)).astype(np.uint8)
    types[inst == inst.max()] = 0  # one instance without a typed pixel
    ids, t = instance_types(inst, types)
    assert ids.dtype == t.dtype == np.int64
    assert dict(zip(ids.tolist(), t.tolist())) == _majority_by_loop(inst, types)


def test_instance_types_ties_and_edges():
    inst = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    types = np.array([[3, 3, 0, 0], [2, 2, 0, 5]])
    ids, t = instance_types(inst, types)
    assert ids.tolist() == [1, 2] and t.tolist() == [2, 5]  # tie 2/3 -> 2; background never wins over a type
    ids, t = instance_types(np.zeros((3, 3), np.int32), np.zeros((3, 3), np.uint8))
    assert ids.size == 0 and t.size == 0
    with pytest.raises(HistosynthError, match="differ in shape"):
        instance_types(np.zeros((2, 2)), np.zeros((2, 3)))


# -- the pool --------------------------------------------------------------------------------------------------
def test_dihedral_gives_the_eight_symmetries_of_every_array():
    a = np.arange(12).reshape(2, 2, 3)
    seen = {dihedral(a, k).tobytes() for k in range(8)}
    assert len(seen) == 8
    assert np.array_equal(dihedral(a, 1), np.rot90(a)) and np.array_equal(dihedral(a, 4), a[:, ::-1])
    assert np.array_equal(dihedral(a[..., 0], 6), dihedral(a, 6)[..., 0])  # images and masks move together


def test_pool_options_fingerprint_and_max_type(tmp_path):
    a = _set(tmp_path / "a", None, n=3, slide="sa")
    b = _set(tmp_path / "b", None, n=1, slide="sb", image=9)
    pool = load_pool([a, b], {"sa": "pale", "elsewhere": "dark"})
    assert len(pool) == 4 and pool.options == ["default", "pale"] and pool.size == (16, 16)
    assert [o.tolist() for o in pool.option] == [[1, 1, 1], [0]]
    s, p = pool.locate(np.array([0, 2, 3]))
    assert s.tolist() == [0, 0, 1] and p.tolist() == [0, 2, 0]
    assert max_type(pool) == 2
    assert pool_fingerprint(pool) == pool_fingerprint(load_pool([a, b])) != pool_fingerprint(load_pool([b, a]))
    with pytest.raises(HistosynthError, match="different patch sizes"):
        load_pool([a, _set(tmp_path / "c", None, size=8)])
