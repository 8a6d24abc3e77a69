"""evaluate-images: stain distances, mask consistency, the mean-colour baseline, option × domain table, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from histosynth.errors import HistosynthError
from histosynth.evaluate_images import add_cli, evaluate_images
from histosynth.io.patchset import PatchSetWriter, read_patchset
from tests.test_stats import toy_masks

STYLES = {"A": ([150, 90, 170], [235, 190, 215]), "B": ([70, 30, 110], [205, 120, 170])}


def paint(inst, style, rng):
    nuc, bg = (np.array(c, float) for c in STYLES[style])
    img = np.where((inst > 0)[..., None], nuc, bg) + rng.normal(0, 8, (*inst.shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_set(path, slides, n=6, size=64, seed=0, option_col=False, images=True, inst=True, mean_colour=None):
    """Patches of toy masks painted in each slide's style (slides: {slide: style})."""
    rng = np.random.default_rng(seed)
    arrays = tuple(a for a, keep in (("images", images), ("inst", inst), ("types", True)) if keep)
    with PatchSetWriter(path, arrays, (size, size), extra_columns=("option",) if option_col else ()) as w:
        for slide, style in slides.items():
            for i in range(n):
                m, t = toy_masks(rng, size, {1: 6, 2: 3})
                img = paint(m, style, rng)
                if mean_colour is not None:
                    img = np.where((m > 0)[..., None], mean_colour["inside"], mean_colour["outside"])
                    img = np.round(img).astype(np.uint8)
                row = {"slide": slide, "x": i * size, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
                       "width": size, "height": size, "tissue_fraction": 1.0, "n_nuclei": int(m.max()),
                       "source": "toy"}
                if option_col:
                    row["option"] = style
                data = {"images": img, "inst": m, "types": t}
                w.add(row, **{k: data[k] for k in arrays})
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("evi")
    return {
        "real": write_set(d / "real", {"a1": "A"}, seed=1),
        "real2": write_set(d / "real2", {"a2": "A"}, seed=2),
        "two": write_set(d / "two", {"a1": "A", "b1": "B"}, seed=3),
        "gen_opt": write_set(d / "gen_opt", {"g": "A", "h": "B"}, seed=4, option_col=True),
        "d": d,
    }


def test_real_against_itself(sets, tmp_path):
    ev = evaluate_images([sets["real"]], [sets["real"]], tmp_path)
    gen = ev["stain"]["generated"]
    for key in ("H_inside", "E_inside", "H_outside", "E_outside"):
        assert gen[key]["wasserstein"] == pytest.approx(0.0, abs=1e-12) and gen[key]["ks"] == 0.0
        assert gen[key]["n_generated"] == gen[key]["n_real"] > 0
    assert gen["combined"] == pytest.approx(0.0, abs=1e-12)
    assert ev["stain"]["baseline"]["combined"] > 0.5 and ev["stain"]["pass_2x"] is True
    assert ev["consistency"]["ratio"] == pytest.approx(1.0)
    assert 0.5 < ev["consistency"]["real"]["dice"] <= 1.0
    assert ev["option_domain"] is None
    assert ev["fid"]["fid"] is None and "not installed" in ev["fid"]["skipped"]
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["stain"]["generated"]["combined"] == pytest.approx(0.0, abs=1e-12)
    assert saved["fid"] == {"fid": None, "kid": None, "skipped": ev["fid"]["skipped"]}
    assert (tmp_path / "figure.png").stat().st_size > 5000


def test_mean_colour_images_are_farther_than_real(sets, tmp_path):
    first = evaluate_images([sets["real2"]], [sets["real"]], tmp_path / "r", figures=False, fid=False)
    assert first["stain"]["generated"]["combined"] < 0.3
    assert first["stain"]["pass_2x"] is True and first["stain"]["baseline_ratio"] > 2
    assert first["consistency"]["ratio"] == pytest.approx(1.0, abs=0.1)
    flat = write_set(tmp_path / "flat", {"a3": "A"}, seed=5, mean_colour=first["mean_colour"])
    ev = evaluate_images([flat], [sets["real"]], tmp_path / "f", figures=False, fid=False)
    assert ev["stain"]["generated"]["combined"] > 2 * first["stain"]["generated"]["combined"]
    assert ev["stain"]["pass_2x"] is False  # the baseline itself does not beat the baseline
    assert ev["stain"]["generated"]["combined"] == pytest.approx(ev["stain"]["baseline"]["combined"], rel=0.2)


def test_option_domain_table_picks_the_right_domain(sets, tmp_path):
    ev = evaluate_images([sets["gen_opt"]], [sets["two"]], tmp_path, real_options={"a1": "A", "b1": "B"},
                         max_samples=20_000)
    t = ev["option_domain"]
    assert t["options"] == ["A", "B"] and t["domains"] == ["A", "B"]
    grid = np.array(t["combined"])
    assert grid[0, 0] < grid[0, 1] and grid[1, 1] < grid[1, 0]
    assert t["closest_domain"] == {"A": "A", "B": "B"} and t["diagonal_wins"] is True
    assert (tmp_path / "figure.png").stat().st_size > 5000
    swapped = evaluate_images([sets["gen_opt"]], [sets["two"]], tmp_path / "s", real_options={"a1": "B", "b1": "A"},
                              figures=False, fid=False, max_samples=20_000)
    assert swapped["option_domain"]["diagonal_wins"] is False


def test_translated_real_masks_are_paired(sets, tmp_path):
    ev = evaluate_images([sets["real2"]], [sets["real"]], tmp_path, translated=[sets["real"]], figures=False,
                         fid=False)
    assert ev["paired"] == {"n_pairs": 6, "mae_H": 0.0, "mae_E": 0.0}
    assert ev["stain"]["translated"]["combined"] == pytest.approx(0.0, abs=1e-12)
    assert ev["consistency"]["translated"]["ratio"] == pytest.approx(1.0)


def test_sampling_is_bounded_and_deterministic(sets, tmp_path):
    a = evaluate_images([sets["real2"]], [sets["real"]], tmp_path / "a", max_samples=600, figures=False, fid=False)
    b = evaluate_images([sets["real2"]], [sets["real"]], tmp_path / "b", max_samples=600, figures=False, fid=False)
    assert a["stain"] == b["stain"]
    assert a["stain"]["generated"]["H_inside"]["n_real"] <= 600


def test_bad_inputs(sets, tmp_path):
    d = sets["d"]
    no_images = write_set(d / "no_images", {"a": "A"}, images=False)
    no_inst = write_set(d / "no_inst", {"a": "A"}, inst=False)
    with pytest.raises(HistosynthError, match="no images.npy"):
        evaluate_images([no_images], [sets["real"]], tmp_path / "x")
    with pytest.raises(HistosynthError, match="no inst.npy"):
        evaluate_images([sets["real"]], [no_inst], tmp_path / "x")
    with pytest.raises(HistosynthError, match="not a patch set"):
        evaluate_images([tmp_path / "missing"], [sets["real"]], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli(sets, tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(["evaluate-images", str(sets["gen_opt"]), str(out), "--real", str(sets["two"]),
                              "--real-options", "a1=A", "b1=B", "--max-samples", "5000", "--no-fid"])
    args.func(args)
    data = json.loads((out / "evaluation.json").read_text())
    assert data["option_domain"]["diagonal_wins"] is True and data["fid"]["skipped"] == "disabled"
    assert data["settings"]["real_options"] == {"a1": "A", "b1": "B"}
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate-images", "g", "o", "--real", "r", "--real-options", "a1"])
    args = parser.parse_args(["evaluate-images", "only", "--real", "r"])
    with pytest.raises(HistosynthError, match="GENERATED... OUT_DIR"):
        args.func(args)
    assert read_patchset(sets["two"]).images is not None
