"""import-patches: a patch dataset (images + instance maps + types) → one typed patch set per group."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from histosynth.cli import main
from histosynth.config import slide_table, validate_config
from histosynth.errors import HistosynthError
from histosynth.io.patchset import read_patchset
from histosynth.patches.importer import (
    ImportParams,
    find_patch_groups,
    import_patches,
    resample,
    window_offsets,
)

CLASSES = {"other": 1, "inflammatory": 2, "epithelial": 3, "spindle": 4}


def disc_patch(rng: np.random.Generator, size: int, n: int, first_id: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and an instance map of ``n`` non-overlapping discs with sparse ids (first_id, +3, ...)."""
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    placed = 0
    while placed < n:
        cy, cx = rng.integers(6, size - 6, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
        if inst[disc].any():
            continue
        inst[disc] = first_id + 3 * placed
        placed += 1
    img = np.full((size, size, 3), 230, np.uint8)
    img[inst > 0] = (90, 40, 140)
    return img, inst


def write_dataset(root: Path, groups: dict[str, int], size: int = 64, n: int = 3, seed: int = 0,
                  mat_types: bool = True) -> dict[str, list[int]]:
    """images/<g>_<k>.png, inst/<stem>.npy, types/<stem>.mat (inst_type, ascending id): returns stem → types."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "inst", "types"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    types = {}
    for g, count in groups.items():
        for k in range(count):
            stem = f"{g}_{k:03d}"
            img, inst = disc_patch(rng, size, n)
            cv2.imwrite(str(root / "images" / f"{stem}.png"), img[..., ::-1])
            np.save(root / "inst" / f"{stem}.npy", inst)
            t = [int(v) for v in rng.integers(1, 5, n)]
            types[stem] = t
            if mat_types:
                scipy.io.savemat(root / "types" / f"{stem}.mat", {"inst_type": np.array(t, np.int32)[:, None]})
    return types


def params(root: Path, **kw) -> ImportParams:
    base = {"images": str(root / "images" / "*.png"), "inst": str(root / "inst" / "{stem}.npy"),
            "types": str(root / "types" / "{stem}.mat"), "mpp": 0.5, "target_mpp": 0.5, "size": 64}
    return ImportParams(**{**base, **kw})


def test_groups_relabel_and_types(tmp_path):
    types = write_dataset(tmp_path / "ds", {"tileA": 3, "tileB": 2})
    reports = import_patches(params(tmp_path / "ds"), tmp_path / "out", CLASSES)
    assert sorted(reports) == ["tileA", "tileB"]
    for g, count in (("tileA", 3), ("tileB", 2)):
        ps = read_patchset(tmp_path / "out" / g, require=("images", "inst", "types"))
        assert len(ps) == count and set(ps.index["slide"]) == {g}
        assert ps.inst.dtype == np.int32 and ps.types.dtype == np.uint8
        for i in range(count):
            inst, typ = np.asarray(ps.inst[i]), np.asarray(ps.types[i])
            assert sorted(np.unique(inst)) == [0, 1, 2, 3]  # contiguous ids, ascending source id
            got = [int(typ[inst == k][0]) for k in (1, 2, 3)]
            assert got == types[ps.index["patch"][i]]
            assert ((typ > 0) == (inst > 0)).all()
            assert ps.index["n_nuclei"][i] == 3
        # distinct, non-overlapping places on the group's virtual strip
        assert list(ps.index["x"]) == [64.0 * k for k in range(count)] and (ps.index["y"] == 0).all()
        rep = ps.report
        assert rep["stage"] == "import-patches" and rep["classes"] == {"1": "other", "2": "inflammatory",
                                                                       "3": "epithelial", "4": "spindle"}
        assert rep["counts"]["instances_read"] == rep["counts"]["instances_written"] == 3 * count
        want = Counter(t for s, ts in types.items() if s.startswith(g) for t in ts)
        assert rep["source_type_counts"] == {str(k): v for k, v in sorted(want.items())}
        assert sum(ps.index[f"n_{n}"].sum() for n in CLASSES) == 3 * count
        assert np.array_equal(ps.images[0], cv2.imread(str(tmp_path / "ds" / "images" / f"{g}_000.png"))[..., ::-1])


def test_one_group_by_the_cli_with_overlay(tmp_path):
    write_dataset(tmp_path / "ds", {"t1": 2, "t2": 2})
    root = tmp_path / "ds"
    code = main(["import-patches", str(tmp_path / "t2"), "--group", "t2", "--images", str(root / "images/*.png"),
                 "--inst", str(root / "inst/{stem}.npy"), "--types", str(root / "types/{stem}.mat"),
                 "--mpp", "0.5", "--size", "64", "--classes", *[f"{k}={v}" for k, v in CLASSES.items()],
                 "--overlay", str(tmp_path / "t2.png")])
    assert code == 0 and (tmp_path / "t2.png").is_file()
    assert set(read_patchset(tmp_path / "t2").index["slide"]) == {"t2"}


def test_resampling_halves_and_counts_vanished_instances(tmp_path, caplog):
    root = tmp_path / "ds"
    write_dataset(root, {"g": 1}, size=64, n=2)
    inst = np.load(root / "inst" / "g_000.npy")
    inst[0, 0] = 99  # one pixel that nearest sampling at pixel centres (source rows 1, 3, ...) skips
    inst[63, 63] = 101  # one it keeps
    np.save(root / "inst" / "g_000.npy", inst)
    scipy.io.savemat(root / "types" / "g_000.mat", {"inst_type": np.array([[1], [2], [3], [4]], np.int32)})
    with caplog.at_level(logging.WARNING):
        rep = import_patches(params(root, mpp=0.25, target_mpp=0.5, size=32), tmp_path / "out", CLASSES)["g"]
    ps = read_patchset(tmp_path / "out" / "g", require=("images", "inst", "types"))
    assert ps.images.shape == (1, 32, 32, 3) and ps.index["downsample"][0] == 2.0 and ps.index["mpp"][0] == 0.5
    assert rep["counts"]["instances_read"] == 4 and rep["counts"]["instances_vanished"] == 1
    assert rep["vanished_by_file"] == {"g_000": 1} and "vanished" in caplog.text
    inst, typ = np.asarray(ps.inst[0]), np.asarray(ps.types[0])
    assert sorted(np.unique(inst)) == [0, 1, 2, 3]
    assert int(typ[inst == 3][0]) == 4  # id 101 kept its type; 99 (type 3) is gone
    # each disc halves in area (radius 4 -> ~2)
    assert 8 <= (inst == 1).sum() <= 20


def test_resample_and_windows_units():
    img = np.zeros((10, 6, 3), np.uint8)
    inst = np.arange(60).reshape(10, 6)
    i2, l2 = resample(img, inst, 2.0)
    assert i2.shape == (5, 3, 3) and l2.tolist()[0] == [7, 9, 11]
    assert window_offsets(64, 64) == [0] and window_offsets(40, 64) == [0]
    assert window_offsets(128, 64) == [0, 64] and window_offsets(100, 64) == [0, 36]


def test_larger_patches_are_cut_and_smaller_padded(tmp_path):
    write_dataset(tmp_path / "big", {"b": 1}, size=48, n=4)
    rep = import_patches(params(tmp_path / "big", size=32), tmp_path / "out", CLASSES)["b"]
    ps = read_patchset(tmp_path / "out" / "b")
    assert len(ps) == 4 and rep["counts"]["files_cut"] == 1 and not ps.index["padded"].any()
    assert sorted(zip(ps.index["x"], ps.index["y"])) == [(0, 0), (0, 16), (16, 0), (16, 16)]
    for i in range(4):  # ids contiguous per window
        ids = np.unique(ps.inst[i])
        assert ids.tolist() == list(range(len(ids)))
    write_dataset(tmp_path / "small", {"s": 1}, size=24, n=1)
    rep = import_patches(params(tmp_path / "small", size=32), tmp_path / "out2", CLASSES)["s"]
    ps = read_patchset(tmp_path / "out2" / "s")
    assert len(ps) == 1 and bool(ps.index["padded"][0]) and rep["counts"]["padded"] == 1
    assert (ps.images[0][24:] == 255).all() and (ps.inst[0][24:] == 0).all()


def test_type_map_images_and_type_values(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, {"g": 2}, mat_types=False)
    for f in sorted((root / "inst").glob("*.npy")):
        inst = np.load(f)
        cv2.imwrite(str(root / "types" / f"{f.stem}.png"), np.where(inst > 0, 7, 0).astype(np.uint8))
    p = params(root, types=str(root / "types" / "{stem}.png"))
    with pytest.raises(HistosynthError, match=r"type 7 .*not one of the type ids of classes"):
        import_patches(p, tmp_path / "out", CLASSES)
    import_patches(p, tmp_path / "out", CLASSES, type_values={"7": "Spindle"})
    ps = read_patchset(tmp_path / "out" / "g")
    assert set(np.unique(ps.types[:]).tolist()) == {0, 4}
    assert ps.report["source_type_counts"] == {"7": 6} and ps.report["class_counts"] == {"spindle": 6}
    # without classes: every nucleus type 1, the dataset's types counted
    import_patches(p, tmp_path / "plain", None)
    ps = read_patchset(tmp_path / "plain" / "g")
    assert set(np.unique(ps.types[:]).tolist()) == {0, 1} and ps.report["classes"] == {"1": "nucleus"}


# --------------------------------------------------------------------------- bad input: named, nothing written
def _cli(root: Path, out: Path, *extra: str) -> int:
    return main(["import-patches", str(out), "--images", str(root / "images/*.png"),
                 "--inst", str(root / "inst/{stem}.npy"), "--types", str(root / "types/{stem}.mat"),
                 "--mpp", "0.5", "--size", "64", "--classes", *[f"{k}={v}" for k, v in CLASSES.items()], *extra])


@pytest.mark.parametrize("damage, message", [
    ("no_inst", r"g_001\.png: image without its instance map: .*g_001\.npy not found"),
    ("inst_size", r"g_001\.npy: the instance map is 32 x 32 but its image .*g_001\.png is 64 x 64"),
    ("type_count", r"g_001\.mat: inst_type has 2 entries but the instance map has 3 instances"),
    ("type_id", r"g_001\.mat: type 9 of 1 instance\(s\).*not one of the type ids of classes"),
    ("regex", r"matches no group in the name 'nounderscore'"),
    ("no_images", r"no image matches the glob"),
])
def test_bad_input_is_one_named_error_and_writes_nothing(tmp_path, capsys, damage, message):
    root = tmp_path / "ds"
    write_dataset(root, {"g": 2})
    if damage == "no_inst":
        (root / "inst" / "g_001.npy").unlink()
    elif damage == "inst_size":
        np.save(root / "inst" / "g_001.npy", np.zeros((32, 32), np.int32))
    elif damage == "type_count":
        scipy.io.savemat(root / "types" / "g_001.mat", {"inst_type": np.array([[1], [2]], np.int32)})
    elif damage == "type_id":
        scipy.io.savemat(root / "types" / "g_001.mat", {"inst_type": np.array([[1], [9], [2]], np.int32)})
    elif damage == "regex":
        (root / "images" / "g_001.png").rename(root / "images" / "nounderscore.png")
    elif damage == "no_images":
        for f in (root / "images").glob("*.png"):
            f.unlink()
    out = tmp_path / "out"
    assert _cli(root, out) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_unknown_group_and_missing_mpp(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, {"g": 1})
    with pytest.raises(HistosynthError, match="no image of group 'h'.*groups: g"):
        import_patches(params(root), tmp_path / "out", CLASSES, group="h")
    with pytest.raises(HistosynthError, match="slides.patches.mpp"):
        import_patches(params(root, mpp=None), tmp_path / "out", CLASSES)
    with pytest.raises(HistosynthError, match="has no \\(group\\)"):
        find_patch_groups(str(root / "images" / "*.png"), "^g_")


def test_config_lists_the_groups_as_slides(tmp_path):
    write_dataset(tmp_path / "ds", {"tileA": 2, "tileB": 1})
    patches = {"images": "ds/images/*.png", "inst": "ds/inst/{stem}.npy", "types": "ds/types/{stem}.mat",
               "mpp": 0.25}
    cfg = validate_config({"slides": {"source": "patches", "patches": patches}})
    table = slide_table(cfg, workdir=tmp_path)
    assert list(table["slide"]) == ["tileA", "tileB"] and set(table["mpp"]) == {0.25}
    assert table["annotations"].notna().all()  # every group is annotated: the split takes them all
    with pytest.raises(HistosynthError, match="slides.patches.mpp"):
        validate_config({"slides": {"source": "patches", "patches": {**patches, "mpp": None}}})


# --------------------------------------------------------------------------- the real CoNSeP patches
def test_consep_patches_become_14_typed_patch_sets(shared_data, tmp_path):
    root = shared_data / "consep-patches"
    if not (root / "images" / "test").is_dir():
        pytest.skip("CoNSeP patches not found")
    p = ImportParams(images=str(root / "images/test/*.jpg"), inst=str(root / "inst/test/{stem}.npy"),
                     types=str(root / "type_mat/test/{stem}.mat"), group_regex=r"^(test_\d+)_", mpp=0.25,
                     target_mpp=0.5, size=128)
    groups = find_patch_groups(p.images, p.group_regex)
    assert len(groups) == 14 and {len(f) for f in groups.values()} == {16}
    reports = import_patches(p, tmp_path / "consep", CLASSES)
    read = Counter()
    counts = Counter()
    for g, rep in reports.items():
        ps = read_patchset(tmp_path / "consep" / g, require=("images", "inst", "types"))
        assert ps.images.shape == (16, 128, 128, 3) and not ps.index["padded"].any()
        read.update(rep["class_counts"])
        counts.update(rep["counts"])
        assert ps.index["n_nuclei"].sum() == rep["counts"]["instances_written"]
    # PROVENANCE.md: 10,330 patch-instances, by class 658 / 1,879 / 3,844 / 3,949
    assert read == {"other": 658, "inflammatory": 1879, "epithelial": 3844, "spindle": 3949}
    assert counts["instances_read"] == 10330 and counts["patches"] == 224 and counts["empty_patches"] == 2
    # halving the resolution loses only nuclei a few source pixels large, all counted
    assert 0 < counts["instances_vanished"] < 0.01 * 10330
    assert counts["instances_written"] + counts["instances_vanished"] == 10330
    json.dumps(reports)
