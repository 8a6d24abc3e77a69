"""The nuclei library: complete nuclei framed, counted, de-duplicated and typed."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from skimage.draw import ellipse

from histosynth.cli.masks import register as add_cli
from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter
from histosynth.masks.library import (
    DEFAULT_MIN_BBOX_AREA,
    build_library,
    extract_nuclei,
    find_duplicates,
    frame_shape,
    load_library,
)

P = 128  # patch side
D = 2.0  # downsample (0.25 um/px slide, 0.5 um/px tiles)


def _row(slide: str, x: int, y: int, mpp: float = 0.5) -> dict:
    return {"slide": slide, "x": x, "y": y, "level": 0, "downsample": D, "mpp": mpp, "width": P, "height": P,
            "tissue_fraction": 1.0, "n_nuclei": 0, "source": "test"}


def _draw(inst: np.ndarray, types: np.ndarray, iid: int, tid: int, r: float, c: float, rr: float, rc: float):
    pr, pc = ellipse(r, c, rr, rc, shape=inst.shape)
    inst[pr, pc] = iid
    types[pr, pc] = tid
    return pr, pc


def _patches():
    """Two overlapping 128-px tiles (stride 64 px) of slide s1 with known nuclei.

    patch 0: 1 complete (type 1), 2 cut by the left border, 3 too small (3x3 box),
             4 complete with types 60 % 3 / 40 % 2, 5 elongated (91 px tall, downscaled)
    patch 1: 4 again (shifted by the stride: a duplicate), 5 cut, 6 complete (type 2)
    """
    inst0 = np.zeros((P, P), np.int32)
    ty0 = np.zeros((P, P), np.uint8)
    _draw(inst0, ty0, 1, 1, 30, 30, 10, 6)
    _draw(inst0, ty0, 2, 1, 60, 3, 8, 8)
    inst0[100:103, 20:23] = 3
    ty0[100:103, 20:23] = 1
    pr, pc = _draw(inst0, ty0, 4, 3, 90, 100, 8, 12)
    left = pc < np.quantile(pc, 0.4)
    ty0[pr[left], pc[left]] = 2
    _draw(inst0, ty0, 5, 1, 60, 60, 45.5, 10)

    inst1 = np.zeros((P, P), np.int32)
    ty1 = np.zeros((P, P), np.uint8)
    inst1[:, : P - 64] = inst0[:, 64:]
    ty1[:, : P - 64] = ty0[:, 64:]
    inst1[inst1 == 1] = 0  # (none there; keeps ids as in patch 0)
    _draw(inst1, ty1, 6, 2, 40, 100, 7, 7)
    return (inst0, ty0), (inst1, ty1)


def _write_set(path, patches, slide="s1", xs=(0, 128), mpp=0.5, report=None, arrays=("inst", "types")):
    with PatchSetWriter(path, arrays, (P, P)) as w:
        for (inst, ty), x in zip(patches, xs):
            data = {"inst": inst, "types": ty, "images": np.zeros((P, P, 3), np.uint8)}
            w.add(_row(slide, x, 0, mpp), **{k: data[k] for k in arrays})
        if report:
            w.report = report
    return path


@pytest.fixture
def patch_set(tmp_path):
    return _write_set(tmp_path / "ps", _patches(),
                      report={"classes": {"n_epithelial": 1, "n_lymphocyte": 2, "n_spindle_cell": 3},
                              "class_counts": {"Epithelial": 3, "Lymphocyte": 2, "Spindle cell": 1}})


def test_counts_dedup_types_and_npz(patch_set, tmp_path):
    out = tmp_path / "lib" / "nuclei.npz"
    rep = build_library([patch_set], out)
    assert rep["instances"] == 8
    assert rep["cut_by_border"] == 2
    assert rep["too_small"] == 1
    assert rep["complete"] == 5
    assert rep["duplicates"] == 1
    assert rep["kept"] == 4
    assert rep["downscaled"] == 1
    assert (tmp_path / "lib" / "montage.png").stat().st_size > 1000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    npz = np.load(out)
    assert npz["shapes"].dtype == np.uint8 and npz["shapes"].shape == (4, 64, 64)
    assert set(np.unique(npz["shapes"])) == {0, 1}
    assert npz["types"].dtype == np.uint8 and npz["areas"].dtype == np.float32
    assert npz["scales"].dtype == np.float32 and npz["centroids"].dtype == np.float64
    assert npz["slides"].dtype.kind == "U" and set(npz["slides"]) == {"s1"}
    assert float(npz["mpp"]) == 0.5
    assert json.loads(str(npz["classes"])) == {"1": "Epithelial", "2": "Lymphocyte", "3": "Spindle cell"}

    # first copy kept: patch 0 ids 1, 4, 5, then patch 1 id 6
    assert list(npz["patch_rows"]) == [0, 0, 0, 1]
    assert list(npz["inst_ids"]) == [1, 4, 5, 6]
    assert list(npz["types"]) == [1, 3, 1, 2]  # nucleus 4: majority type 3
    inst0 = _patches()[0][0]
    for k, iid in enumerate((1, 4)):
        assert npz["areas"][k] == (inst0 == iid).sum()
        assert npz["shapes"][k].sum() == (inst0 == iid).sum()  # unscaled: every pixel kept
        rr, cc = np.nonzero(inst0 == iid)
        assert npz["centroids"][k] == pytest.approx([(cc.mean() + 0.5) * D, (rr.mean() + 0.5) * D])
    assert list(npz["scales"][[0, 1, 3]]) == [1, 1, 1]
    tall = (inst0 == 5).any(axis=1).sum()
    assert tall > 62 and npz["scales"][2] == pytest.approx(62 / tall)
    assert npz["areas"][2] == (inst0 == 5).sum()  # area before the downscale

    lib = load_library(out)
    assert len(lib) == 4 and lib.classes[3] == "Spindle cell" and lib.mpp == 0.5


def test_frame_shape_centres_by_box_and_never_upscales():
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:30] = True  # 10 x 20 box
    framed, scale = frame_shape(mask, 64)
    assert scale == 1.0 and framed.sum() == 200
    rows = np.flatnonzero(framed.any(1))
    cols = np.flatnonzero(framed.any(0))
    assert (rows[0], cols[0]) == ((64 - 10) // 2, (64 - 20) // 2)

    big = np.ones((100, 40), bool)
    framed, scale = frame_shape(big, 64)
    assert scale == pytest.approx(0.62)
    rows = np.flatnonzero(framed.any(1))
    cols = np.flatnonzero(framed.any(0))
    assert rows[0] == 1 and rows[-1] == 62  # one background pixel of margin
    assert len(cols) == round(40 * 0.62)

    tiny = np.ones((2, 3), bool)
    framed, scale = frame_shape(tiny, 16)
    assert scale == 1.0 and framed.sum() == 6


def test_extract_nuclei_min_bbox_area_is_rows_times_cols():
    inst = np.zeros((50, 50), np.int32)
    inst[10:18, 10:18] = 1  # 64 px² box: kept at the default
    inst[30:37, 30:39] = 2  # 63 px² box: too small
    types = (inst > 0).astype(np.uint8)
    nuc = extract_nuclei(inst, types)
    assert DEFAULT_MIN_BBOX_AREA == 64
    assert list(nuc.inst_ids) == [1] and nuc.n_small == 1 and nuc.n_cut == 0
    nuc = extract_nuclei(inst, types, min_bbox_area=0)
    assert list(nuc.inst_ids) == [1, 2]


def test_find_duplicates_per_slide_within_tolerance():
    slides = np.array(["a", "a", "b", "a", "a"])
    cents = np.array([[10.0, 10.0], [10.4, 9.8], [10.0, 10.0], [30.0, 30.0], [31.5, 30.0]])
    assert list(find_duplicates(slides, cents, 1.0)) == [False, True, False, False, False]


def test_bad_inputs(patch_set, tmp_path):
    out = tmp_path / "nuclei.npz"
    images_only = _write_set(tmp_path / "tiles", _patches(), arrays=("images",))
    with pytest.raises(HistosynthError, match="inst.npy") as err:
        build_library([patch_set, images_only], out)
    assert str(images_only) in str(err.value)

    other = _write_set(tmp_path / "ps25", _patches(), slide="s2", mpp=0.25)
    with pytest.raises(HistosynthError, match="um/px") as err:
        build_library([patch_set, other], out)
    assert str(other) in str(err.value)

    all_cut = np.zeros((P, P), np.int32)
    all_cut[0:20, 50:70] = 1
    cut_set = _write_set(tmp_path / "cut", [(all_cut, (all_cut > 0).astype(np.uint8))], xs=(0,))
    with pytest.raises(HistosynthError, match="empty library"):
        build_library([cut_set], out)
    with pytest.raises(HistosynthError, match="not a patch set"):
        build_library([tmp_path / "nowhere"], out)
    assert not out.exists()

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(HistosynthError, match="junk.npz"):
        load_library(tmp_path / "junk.npz")
    with pytest.raises(HistosynthError, match="not found"):
        load_library(tmp_path / "missing.npz")


def test_cli_registers_and_runs(patch_set, tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_cli(sub)
    out = tmp_path / "cli" / "nuclei.npz"
    args = parser.parse_args(["nuclei-library", str(patch_set), str(out), "--min-bbox-area", "0",
                              "--classes", "Tumour=1", "Immune=2", "Stroma=3"])
    args.func(args)
    npz = np.load(out)
    assert json.loads(str(npz["classes"])) == {"1": "Tumour", "2": "Immune", "3": "Stroma"}
    assert len(npz["shapes"]) == 5  # the 3x3 nucleus now counts
    assert float(npz["min_bbox_area"]) == 0


def test_class_names_from_canonical_and_legacy_reports(tmp_path):
    """A legacy set ({"n_<class>": id}, lower case without class_counts) takes the canonical set's spelling."""
    canonical = _write_set(tmp_path / "new", _patches(), report={"classes": {"1": "Epithelial", "2": "Lymphocyte",
                                                                             "3": "Spindle cell"}})
    legacy = _write_set(tmp_path / "old", _patches(), slide="s2",
                        report={"classes": {"n_epithelial": 1, "n_lymphocyte": 2, "n_spindle_cell": 3}})
    for order in ([legacy, canonical], [canonical, legacy]):
        build_library(order, tmp_path / "lib.npz")
        assert load_library(tmp_path / "lib.npz").classes == {1: "Epithelial", 2: "Lymphocyte", 3: "Spindle cell"}
    build_library([legacy], tmp_path / "lib.npz")
    assert load_library(tmp_path / "lib.npz").classes == {1: "epithelial", 2: "lymphocyte", 3: "spindle_cell"}
    other = _write_set(tmp_path / "other", _patches(), slide="s3", report={"classes": {"1": "Tumour"}})
    with pytest.raises(HistosynthError, match=r"other/report.json.*type 1 is 'Tumour'.*contradictory"):
        build_library([canonical, other], tmp_path / "lib.npz")
    broken = _write_set(tmp_path / "broken", _patches(), slide="s4", report={"classes": ["Epithelial"]})
    with pytest.raises(HistosynthError, match=r"broken/report.json.*unreadable class map"):
        build_library([broken], tmp_path / "lib.npz")
