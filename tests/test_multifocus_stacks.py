"""multifocus.stacks and histosynth extract-stacks: cells found, best planes, augmentation, errors (#20)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.multifocus.demo import make_demo_zstacks, write_ome_zstack
from histosynth.multifocus.stacks import AUGMENTS, extract_stacks
from histosynth.multifocus.stackset import read_stackset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cells = make_demo_zstacks(out, n_slides=1, size=(384, 384), planes=7, n_cells=14, seed=2)
    return out, cells


def test_extraction_finds_the_cells_with_their_best_planes(demo, tmp_path):
    folder, truth = demo
    report = extract_stacks([folder / "zstack-00.ome.tif"], tmp_path / "st", size=64, planes=7)
    ss = read_stackset(tmp_path / "st")
    assert ss.planes == 7 and ss.size == (64, 64) and ss.plane_offsets_um == [-3.0, -2.0, -1.0, 0, 1.0, 2.0, 3.0]
    counts = report["slides"][str(folder / "zstack-00.ome.tif")]
    assert counts["found"] == counts["kept"] + counts["skipped_border"] == len(truth)
    inside = truth[(truth.x >= 32) & (truth.y >= 32) & (truth.x <= 384 - 32) & (truth.y <= 384 - 32)]
    assert len(ss) >= len(inside) - 1 and (ss.index.source == "real").all()
    matched = right = 0
    for row in ss.index.itertuples():
        d = np.hypot(truth.x - row.x, truth.y - row.y)
        i = d.idxmin()
        if d[i] <= 10:
            matched += 1
            right += int(truth.best_plane[i] == row.best_plane)
    assert matched >= 0.9 * len(ss) and right >= 0.9 * matched
    # each stack is the 64 x 64 window around its cell, in the cell's own plane the nucleus is dark
    first = ss.index.iloc[0]
    assert ss.stacks[0, int(first.best_plane), 28:36, 28:36].mean() < 200


def test_augmentation_counts_and_transforms(demo, tmp_path):
    folder, _ = demo
    extract_stacks([folder / "zstack-00.ome.tif"], tmp_path / "plain", planes=7)
    extract_stacks([folder / "zstack-00.ome.tif"], tmp_path / "aug", planes=7, augment=True)
    plain, aug = read_stackset(tmp_path / "plain"), read_stackset(tmp_path / "aug")
    assert len(aug) == 6 * len(plain)
    assert (aug.index.source == "augmented").sum() == 5 * len(plain)
    assert sorted(aug.index.augment.dropna().unique()) == sorted(AUGMENTS)
    stack = np.asarray(aug.stacks[0])
    assert np.array_equal(aug.stacks[1], np.rot90(stack, 1, axes=(1, 2)))
    assert np.array_equal(aug.stacks[5], stack[:, :, ::-1])
    assert (aug.index.best_plane.to_numpy().reshape(-1, 6) == plain.index.best_plane.to_numpy()[:, None]).all()


def test_max_cells_is_a_seeded_subset(demo, tmp_path):
    folder, _ = demo
    slide = folder / "zstack-00.ome.tif"
    extract_stacks([slide], tmp_path / "a", max_cells=3, seed=5)
    extract_stacks([slide], tmp_path / "b", max_cells=3, seed=5)
    a, b = read_stackset(tmp_path / "a"), read_stackset(tmp_path / "b")
    assert len(a) == 3 and a.index.equals(b.index)


def test_bad_requests_are_named(demo, tmp_path):
    folder, _ = demo
    slide = folder / "zstack-00.ome.tif"
    with pytest.raises(HistosynthError, match=r"7 focal planes; 11 were asked for"):
        extract_stacks([slide], tmp_path / "x", planes=11)
    with pytest.raises(HistosynthError, match=r"at least 500 needed \(--min-cells\)"):
        extract_stacks([slide], tmp_path / "x", min_cells=500)
    one = tmp_path / "one.ome.tif"
    write_ome_zstack(one, np.full((1, 128, 128, 3), 240, np.uint8), mpp=0.25, spacing_um=1.0)
    with pytest.raises(HistosynthError, match="1 focal plane") as err:
        extract_stacks([one], tmp_path / "x")
    assert str(one) in str(err.value)
    other = tmp_path / "five.ome.tif"
    write_ome_zstack(other, np.full((5, 128, 128, 3), 240, np.uint8), mpp=0.25, spacing_um=1.0)
    with pytest.raises(HistosynthError, match="one stack set holds one plane count"):
        extract_stacks([slide, other], tmp_path / "x", planes=None)
    assert not (tmp_path / "x").exists()


def test_border_cells_are_counted_and_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="histosynth.multifocus.stacks")
    make_demo_zstacks(tmp_path / "d", size=(128, 128), planes=3, n_cells=6, seed=1)
    report = extract_stacks([tmp_path / "d" / "zstack-00.ome.tif"], tmp_path / "s", planes=3)
    counts = next(iter(report["slides"].values()))
    assert counts["skipped_border"] > 0 and "skipped" in caplog.text
    assert json.loads((tmp_path / "s" / "report.json").read_text())["slides"] == report["slides"]


def test_cli_end_to_end(tmp_path, capsys):
    demo = tmp_path / "demo"
    assert main(["demo-zstack", str(demo), "--size", "256", "256", "--planes", "5", "--n-cells", "8"]) == 0
    out = tmp_path / "stacks"
    assert main(["extract-stacks", str(demo / "zstack-00.ome.tif"), str(out), "--planes", "5", "--augment",
                 "--size", "48"]) == 0
    ss = read_stackset(out)
    assert ss.size == (48, 48) and len(ss) % 6 == 0 and len(ss) > 0
    assert set(pd.unique(ss.index.source)) == {"real", "augmented"}
    assert main(["extract-stacks", str(demo / "zstack-00.ome.tif"), str(tmp_path / "bad"), "--planes", "11"]) == 2
    err = capsys.readouterr().err
    assert "zstack-00.ome.tif: 5 focal planes; 11 were asked for" in err
    assert main(["extract-stacks", str(out)]) == 2  # no slide, only the output
