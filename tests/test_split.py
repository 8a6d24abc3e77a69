"""Train/test split by slide: one function, the same at Snakefile parse time and in split.csv."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from histosynth.cli import main
from histosynth.config import slide_table, validate_config
from histosynth.errors import HistosynthError
from histosynth.patches.split import read_split, slides_in, split_from_config, split_inputs, split_slides

REPO = Path(__file__).resolve().parents[1]
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


def test_fewer_than_two_slides_all_train():
    assert split_slides(["a"]).to_dict("list") == {"slide": ["a"], "split": ["train"]}
    assert split_slides([]).empty
    with pytest.raises(HistosynthError, match="at least one"):  # explicit lists are still checked
        split_slides(["a"], train=["a"], test=[])


def test_bad_input():
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
    assert main(["split", str(out), "--slides", "a"]) == 0
    assert slides_in(out, "train") == ["a"] and slides_in(out, "test") == []
    assert main(["split", str(tmp_path / "x.csv"), "--slides", "a", "a", "b"]) == 2
    assert not (tmp_path / "x.csv").exists()


def test_split_inputs_from_the_config_and_slide_table():
    cfg = validate_config({"slides": {"demo": {"n_slides": 4}}, "split": {"seed": 5}})
    inputs = split_inputs(cfg, slide_table(cfg))
    assert inputs["slides"] == ["demo-000", "demo-001", "demo-002", "demo-003"] and inputs["seed"] == 5
    assert inputs["groups"] == {"demo-000": "pale", "demo-001": "dark", "demo-002": "pale", "demo-003": "dark"}
    cfg["split"]["by_stain"] = False
    assert split_inputs(cfg, slide_table(cfg))["groups"] is None


def _snakemake(workdir: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res.stdout + res.stderr


def _patch_slides(command: str) -> set[str]:
    return set(re.findall(r"results/patches/([\w.-]+)", command))


@pytest.mark.parametrize(
    "config",
    [
        {"slides": {"demo": {"n_slides": 1}}},
        {"slides": {"demo": {"n_slides": 3}}, "split": {"seed": 4}},
        {"slides": {"demo": {"n_slides": 4}}, "split": {"by_stain": False, "test_fraction": 0.5, "seed": 1}},
    ],
    ids=["one-slide", "by-stain", "plain"],
)
def test_parse_time_split_equals_the_rules_split_csv(tmp_path, config):
    """The Snakefile decides at parse time which slides fit what (SPLIT_OF); rule split writes split.csv.
    Both come from split_slides, also with fewer than two slides."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    _snakemake(tmp_path, "split")  # the rule itself, through `histosynth split`
    written = read_split(tmp_path / "results" / "split.csv")
    split_csv = dict(zip(written["slide"], written["split"]))
    # the parse-time split, as the DAG uses it: fit-stats reads the train slides, evaluate-masks the test ones
    # (the rules carry the {fit} prefix of the learning curve, so they are asked for by their default outputs)
    dry = _snakemake(tmp_path, "-n", "-p", "results/stats/stats.json",
                     "results/synthetic/masks-evaluation/evaluation.json")
    commands = [line for line in dry.splitlines() if "python -m histosynth" in line]
    fit = next(c for c in commands if " fit-stats " in c)
    evaluate = next(c for c in commands if " evaluate-masks " in c).split("--real", 1)[1]
    assert _patch_slides(fit) == {s for s, v in split_csv.items() if v == "train"}
    assert _patch_slides(evaluate) == {s for s, v in split_csv.items() if v == "test"}
    cfg = validate_config(config)
    assert split_from_config(cfg, slide_table(cfg)) == split_csv
    n = config["slides"]["demo"]["n_slides"]
    assert len(split_csv) == n and ("test" in split_csv.values()) == (n > 1)
