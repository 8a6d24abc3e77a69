"""Stain styles by k-means (gan.option_by: cluster): features, fit, assignment, the files and the CLI flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from histosynth.cli import build_parser
from histosynth.errors import HistosynthError
from histosynth.gan.options import slide_option
from histosynth.gan.styles import assign_styles, fit_styles, read_styles, slide_features, stain_styles, style_of
from histosynth.io.patchset import PatchSetWriter

REPO = Path(__file__).resolve().parents[1]
# two H&E-like palettes: pale (little haematoxylin) and dark (much), on a white background
PALE, DARK = (225, 150, 200), (120, 60, 150)


def _slide(path: Path, name: str, colour: tuple[int, int, int], seed: int, n: int = 3, size: int = 32) -> Path:
    """A patch set of one slide: tiles of ``colour`` with noise, a quarter of each tile white background."""
    rng = np.random.default_rng(seed)
    with PatchSetWriter(path, ("images", "inst", "types"), (size, size)) as w:
        for i in range(n):
            image = np.clip(np.array(colour) + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
            image[: size // 4] = 250
            w.add({"slide": name, "x": i * size, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
                   "width": size, "height": size}, images=image, inst=np.zeros((size, size), np.int32),
                  types=np.zeros((size, size), np.uint8))
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("styles")
    train = [_slide(d / f"p{i}", f"pale-{i}", PALE, i) for i in range(2)]
    train += [_slide(d / f"d{i}", f"dark-{i}", DARK, 10 + i) for i in range(2)]
    test = [_slide(d / "t-dark", "test-dark", DARK, 20), _slide(d / "t-pale", "test-pale", PALE, 21)]
    return d, train, test


def test_features_measure_haematoxylin_on_tissue_only(slides):
    _, train, _ = slides
    feats = slide_features(train)
    assert sorted(feats) == ["dark-0", "dark-1", "pale-0", "pale-1"]
    assert feats["dark-0"][0] > feats["pale-0"][0]  # more haematoxylin optical density
    assert np.allclose(feats["pale-0"], feats["pale-1"], atol=0.01)  # the white quarter is left out alike


def test_k_means_separates_the_palettes_and_assigns_new_slides(slides, tmp_path):
    _, train, test = slides
    result = stain_styles(train, tmp_path / "styles.json", k=2, seed=0, assign=test)
    styles = result["slides"]
    assert styles["pale-0"] == styles["pale-1"] == "style-1"  # style-1: the palest haematoxylin
    assert styles["dark-0"] == styles["dark-1"] == "style-2"
    assert (styles["test-pale"], styles["test-dark"]) == ("style-1", "style-2")
    assert result["fitted"] == ["dark-0", "dark-1", "pale-0", "pale-1"]  # the test slides are assigned, not fitted
    assert read_styles(tmp_path / "styles.json") == styles
    again = stain_styles(train, tmp_path / "again.json", k=2, seed=0)
    assert again["centroids"] == result["centroids"]  # seeded; the assignment did not move the fit
    one = fit_styles(slide_features(train), 1)
    assert set(assign_styles(slide_features(test), one).values()) == {"style-1"}


def test_bad_inputs(slides, tmp_path):
    _, train, _ = slides
    with pytest.raises(HistosynthError, match="4 train slide"):
        stain_styles(train, tmp_path / "s.json", k=5)
    with pytest.raises(HistosynthError, match="at least 1"):
        fit_styles({"a": np.ones(4)}, 0)
    assert not (tmp_path / "s.json").exists()
    white = tmp_path / "white"
    with PatchSetWriter(white, ("images",), (8, 8)) as w:
        w.add({"slide": "glass", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5, "width": 8,
               "height": 8}, images=np.full((8, 8, 3), 250, np.uint8))
    with pytest.raises(HistosynthError, match="no tissue pixel"):
        slide_features([white])
    with pytest.raises(HistosynthError, match="no such stain-styles file"):
        read_styles(tmp_path / "missing.json")
    (tmp_path / "foreign.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(HistosynthError, match="not a stain-styles file"):
        read_styles(tmp_path / "foreign.json")
    with pytest.raises(HistosynthError, match=r"\['c'\] have no stain style"):
        style_of({"a": "style-1"}, ["a", "c"], "styles.json")
    with pytest.raises(HistosynthError, match="several stain styles"):
        style_of({"a": "style-1", "b": "style-2"}, ["a", "b"], "styles.json")
    with pytest.raises(HistosynthError, match="styles.json"):
        slide_option("a", "pale", "cluster")  # no parse-time option under cluster


def test_cli_writes_the_file_and_the_stages_read_it(slides, tmp_path):
    _, train, test = slides
    parser = build_parser()
    out = tmp_path / "styles.json"
    args = parser.parse_args(["stain-styles", *map(str, train), str(out), "--assign", *map(str, test), "--k", "2"])
    args.func(args)
    assert read_styles(out)["test-dark"] == "style-2"
    args = parser.parse_args(["train-gan", "ps", "o", "--options-file", str(out)])
    assert args.options_file == str(out) and args.options is None
    with pytest.raises(SystemExit):  # --options and --options-file exclude each other
        parser.parse_args(["train-gan", "ps", "o", "--options-file", str(out), "--options", "a=b"])
    assert parser.parse_args(["translate", "g", "m", "o", "--styles", str(out)]).styles == str(out)
    assert parser.parse_args(["evaluate-images", "g", "o", "--real", "r", "--real-options-file",
                              str(out)]).real_options_file == str(out)


def _dry_run(tmp_path: Path, gan: dict) -> subprocess.CompletedProcess:
    cfg = {"results": "results", "slides": {"source": "demo", "demo": {"n_slides": 4, "size": [512, 512]}},
           "gan": gan}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "snakemake", "synthetic", "-n", "-p", "--snakefile",
                           str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                           str(tmp_path / "config.yaml"), "--cores", "1", "--resources", "gpu=1"],
                          capture_output=True, text=True, timeout=300)


def test_the_dag_runs_stain_styles_before_the_gan_under_cluster(tmp_path):
    res = _dry_run(tmp_path, {"option_by": "cluster", "clusters": 2})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "rule stain_styles:" in out and "--options-file results/stain/styles.json" in out
    assert "--styles results/stain/styles.json" in out and "--real-options-file results/stain/styles.json" in out
    res = _dry_run(tmp_path, {"option_by": "cluster", "clusters": 9})
    assert res.returncode != 0 and "gan.clusters = 9 stain styles" in res.stdout + res.stderr
    res = _dry_run(tmp_path, {"option_by": "stain"})
    assert res.returncode == 0 and "rule stain_styles:" not in res.stdout


def test_train_gan_and_translate_read_the_styles(slides, tmp_path):
    from histosynth.io.patchset import read_patchset
    from histosynth.models.pix2pix import load_gan

    _, train, test = slides
    parser = build_parser()
    styles = tmp_path / "styles.json"
    stain_styles(train, styles, k=2, assign=test)
    args = parser.parse_args(["train-gan", *map(str, train), str(tmp_path / "gan"), "--options-file", str(styles),
                              "--crop", "32", "--depth", "3", "--width", "4", "--steps", "1", "--decay-steps", "0",
                              "--batch-size", "2", "--device", "cpu", "--threads", "1", "--precision", "float32"])
    args.func(args)
    assert load_gan(tmp_path / "gan" / "gan.pt").options == ["style-1", "style-2"]
    args = parser.parse_args(["translate", str(tmp_path / "gan" / "gan.pt"), str(test[0]), str(tmp_path / "painted"),
                              "--styles", str(styles), "--no-montage", "--device", "cpu", "--threads", "1"])
    args.func(args)
    assert set(read_patchset(tmp_path / "painted").index["option"]) == {"style-2"}  # test-dark: the dark style
