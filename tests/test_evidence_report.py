"""The evidence report: paired differences over seeds, seeds needed, void comparisons, cost, the files, bad input."""

from __future__ import annotations

import argparse
import json
import math
import zlib

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from histosynth.cli import evidence as evidence_cli
from histosynth.errors import HistosynthError
from histosynth.segmentation.evidence import (
    build_evidence_report,
    k_order,
    parse_k,
    seeds_needed,
    wilcoxon_p,
)

ARMS = ("real", "real+synthetic", "synthetic", "synthetic-then-real", "painted-real")
#: PQ offset of each arm from real (the same on every image and seed, plus noise from _noise)
OFFSET = {"real": 0.0, "real+synthetic": 0.03, "synthetic": -0.10, "synthetic-then-real": 0.01, "painted-real": -0.04}
IMAGES = [("A", i) for i in range(5)] + [("B", i) for i in range(3)]


def _noise(k, seed, arm, n):
    rng = np.random.default_rng(zlib.crc32(f"{k}/{seed}/{arm}".encode()))
    return rng.normal(0, 0.01, n)


def make_run(root, k, seed, arm, *, pq=None, images=IMAGES, rising=False, device="cuda", threads=4, seconds=600.0,
             validation=True, slides=None, write_scores=True, write_train=True, scores_arm=None):
    """A run folder: scores.csv (pq given or real's base + the arm's offset + noise), train.json, validation.csv."""
    path = root / f"k{k}" / f"seed-{seed}" / arm
    path.mkdir(parents=True, exist_ok=True)
    if pq is None:
        base = np.linspace(0.5, 0.7, len(images))
        pq = base + OFFSET[arm] + _noise(k, seed, arm, len(images))
    pq = np.asarray(pq, float)
    rows = [{"arm": scores_arm or arm, "seed": seed, "slide": s, "x": 10 * p, "y": 0, "patch": p, "set": s,
             "dice": v + 0.1, "aji": v - 0.05, "aji_plus": v - 0.04, "dq": min(1.0, v + 0.2), "sq": 0.8, "pq": v,
             "n_true": 10, "n_pred": 9 if arm == "synthetic" else 11, "tp": 8, "fp": 1, "fn": 2}
            for (s, p), v in zip(images, pq)]
    if write_scores:
        pd.DataFrame(rows).to_csv(path / "scores.csv", index=False)
    (path / "summary.json").write_text(json.dumps({"stage": "score", "arm": arm, "seed": seed, "seconds": 3.0}))
    train = {"arm": arm, "seed": seed, "steps": 1000, "best_step": 750, "best_pq": 0.6, "rising": rising,
             "seconds": seconds, "validation_seconds": 60.0, "threads": threads, "device": device,
             "precision": "float32", "patches": {"real": 100}}
    if slides is not None:
        train["slides"] = slides
    if write_train:
        (path / "train.json").write_text(json.dumps(train))
    if validation:
        steps = np.arange(250, 1001, 250)
        pd.DataFrame({"step": steps, "pq": 0.4 + 0.05 * np.arange(len(steps)) * (1 if rising else 0.2),
                      "aji": 0.4, "dice": 0.6, "dq": 0.5, "sq": 0.8, "n_true": 100, "n_pred": 90,
                      "seconds": 5.0}).to_csv(path / "validation.csv", index=False)
    pd.DataFrame({"step": [500, 1000], "loss": [1.0, 0.5], "lr": [1e-4, 1e-5], "seconds": [300.0, 300.0]}).to_csv(
        path / "log.csv", index=False)
    return path


def gen_log(root, k, seed, seconds):
    path = root / "gen" / f"k{k}-seed{seed}-{len(seconds)}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"step": range(1, len(seconds) + 1), "loss_g": 1.0, "seconds": seconds}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """k 1, 2, all x seeds 0-2 x five arms; synthetic rising at k 2 seed 1; generator logs for every k and seed."""
    root = tmp_path_factory.mktemp("evidence")
    runs = []
    for k in ("1", "2", "all"):
        for seed in (0, 1, 2):
            for arm in ARMS:
                path = make_run(root, k, seed, arm, rising=(k == "2" and seed == 1 and arm == "synthetic"),
                                device="cpu" if k == "1" else "cuda", threads=4,
                                slides=["s1", "s2", "s3", "s4", "s5"] if k == "all" else None)
                runs.append((k, str(path)))
    logs = []
    for k in ("1", "2", "all"):
        for seed in (0, 1, 2):
            logs.append((k, str(seed), str(gen_log(root, k, seed, [60.0, 60.0]))))  # GAN: 2 minutes
            logs.append((k, str(seed), str(gen_log(root, k, seed, [30.0]))))  # beta-VAE: half a minute
    out = root / "report"
    result = build_evidence_report(runs, out, delta=0.02, generator_logs=logs)
    return root, runs, out, result


def _per_seed_diff(root, k, arm, metric="pq"):
    values = []
    for seed in (0, 1, 2):
        a = pd.read_csv(root / f"k{k}" / f"seed-{seed}" / arm / "scores.csv")[metric]
        b = pd.read_csv(root / f"k{k}" / f"seed-{seed}" / "real" / "scores.csv")[metric]
        values.append(float((a - b).mean()))
    return values


def test_writes_every_file_and_no_temporaries(grid):
    _, _, out, result = grid
    names = {"runs.csv", "means.csv", "differences.csv", "cost.csv", "generators.csv", "learning_curve.png",
             "validation.png", "evidence.md", "evidence.json"}
    assert names <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    for png in ("learning_curve.png", "validation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["files"]) == names
    assert json.loads((out / "evidence.json").read_text()) == result
    assert result["k"] == ["1", "2", "all"] and result["all_slides"] == 5 and result["n_runs"] == 45
    assert result["arms"] == list(ARMS) and result["seeds"] == [0, 1, 2]


def test_runs_csv_has_one_row_per_run_with_means_counts_and_minutes(grid):
    root, _, out, _ = grid
    runs = pd.read_csv(out / "runs.csv", dtype={"k": str})
    assert len(runs) == 45
    row = runs[(runs["k"] == "1") & (runs["seed"] == 2) & (runs["arm"] == "synthetic")].iloc[0]
    scores = pd.read_csv(root / "k1" / "seed-2" / "synthetic" / "scores.csv")
    for m in ("dice", "aji", "pq", "dq", "sq"):
        assert row[m] == pytest.approx(scores[m].mean())
    assert row["n_true"] == 80 and row["n_pred"] == 72 and row["found"] == pytest.approx(0.9)
    assert row["best_step"] == 750 and row["best_pq"] == pytest.approx(0.6) and not row["rising"]
    assert row["train_minutes"] == pytest.approx(10.0)
    assert row["cpu_minutes"] == pytest.approx(40.0) and math.isnan(row["gpu_minutes"])  # cpu: x 4 threads
    gpu = runs[(runs["k"] == "2") & (runs["arm"] == "real")].iloc[0]
    assert gpu["gpu_minutes"] == pytest.approx(10.0) and math.isnan(gpu["cpu_minutes"])
    assert list(runs["k"].drop_duplicates()) == ["1", "2", "all"]


def test_paired_differences_t_interval_wilcoxon_and_seeds_needed(grid):
    root, _, out, _ = grid
    diffs = pd.read_csv(out / "differences.csv", dtype={"k": str})
    assert set(diffs["arm"]) == set(ARMS) - {"real"} and set(diffs["metric"]) == {"pq", "aji", "dice"}
    assert len(diffs) == 3 * 4 * 3
    row = diffs[(diffs["k"] == "1") & (diffs["arm"] == "real+synthetic") & (diffs["metric"] == "pq")].iloc[0]
    per_seed = _per_seed_diff(root, "1", "real+synthetic")
    sd = np.std(per_seed, ddof=1)
    t = stats.t.ppf(0.975, 2)
    assert row["n_seeds"] == 3 and row["mean"] == pytest.approx(np.mean(per_seed))
    assert row["sd"] == pytest.approx(sd)
    assert row["ci_low"] == pytest.approx(np.mean(per_seed) - t * sd / np.sqrt(3))
    assert row["ci_high"] == pytest.approx(np.mean(per_seed) + t * sd / np.sqrt(3))
    assert row["seeds_needed"] == max(2, math.ceil((t * sd / 0.02) ** 2))
    # Wilcoxon over the 8 test images of the per-image differences averaged over the seeds
    per_image = np.mean([pd.read_csv(root / "k1" / f"seed-{s}" / "real+synthetic" / "scores.csv")["pq"]
                         - pd.read_csv(root / "k1" / f"seed-{s}" / "real" / "scores.csv")["pq"]
                         for s in (0, 1, 2)], axis=0)
    assert row["n_images"] == 8
    assert row["wilcoxon_p"] == pytest.approx(stats.wilcoxon(per_image).pvalue)
    assert row["mean"] == pytest.approx(0.03, abs=0.02) and not row["void"]
    # aji and dice differences are the pq difference here (the fabricated metrics are pq + constants)
    aji = diffs[(diffs["k"] == "1") & (diffs["arm"] == "real+synthetic") & (diffs["metric"] == "aji")].iloc[0]
    assert aji["mean"] == pytest.approx(row["mean"])


def test_rising_voids_every_comparison_of_that_k_with_the_arm(grid):
    _, _, out, result = grid
    diffs = pd.read_csv(out / "differences.csv", dtype={"k": str}, keep_default_na=False)
    void = diffs[diffs["void"].astype(str) == "True"]
    assert set(zip(void["k"], void["arm"])) == {("2", "synthetic")}
    assert set(void["void_reason"]) == {"validation PQ still rising: synthetic seed 1"}
    assert result["rising"] == [{"k": "2", "seed": 1, "arm": "synthetic"}]
    md = (out / "evidence.md").read_text()
    assert "comparison void: validation PQ still rising" in md
    assert "k = 2, seed 1, synthetic: validation PQ still rising" in md


def test_cost_adds_generator_minutes_to_every_arm_but_real(grid):
    _, _, out, _ = grid
    cost = pd.read_csv(out / "cost.csv", dtype={"k": str}).set_index(["k", "arm"])
    assert cost.loc[("1", "real"), "generator_minutes"] == 0
    assert cost.loc[("1", "real"), "total_minutes"] == pytest.approx(10.0)
    for arm in ARMS[1:]:
        assert cost.loc[("1", arm), "generator_minutes"] == pytest.approx(2.5)
        assert cost.loc[("1", arm), "total_minutes"] == pytest.approx(12.5)
    assert cost.loc[("1", "real"), "cpu_minutes"] == pytest.approx(40.0)
    assert cost.loc[("all", "real"), "gpu_minutes"] == pytest.approx(10.0)
    assert cost.loc[("all", "synthetic"), "n_seeds"] == 3


def test_markdown_states_tables_goal_share_and_diagnosis(grid):
    _, _, out, result = grid
    md = (out / "evidence.md").read_text()
    for text in ("| k | arm | seeds | PQ | AJI | Dice |", "## Paired differences", "## Cost",
                 "## What this run can and cannot show", "95 % CI half-width of the PQ differences",
                 "differences smaller than that are not resolved", "Goal (at k ≤ 2", "Synthetic alone vs 90 %",
                 "Diagnosis, image realism at k = 1", "Diagnosis, mask realism at k = 1", "all (5)",
                 "learning_curve.png", "validation.png"):
        assert text in md, text
    goal = result["goal"]
    assert {(c["k"], c["arm"]) for c in goal["checked"]} == {(k, a) for k in ("1", "2")
                                                            for a in ("real+synthetic", "synthetic-then-real")}
    beats = {(c["k"], c["arm"]): c["beats"] for c in goal["checked"]}
    assert not beats[("1", "synthetic-then-real")]  # +0.01 < delta
    assert goal["met"] == any(beats.values())
    share = {s["k"]: s for s in goal["synthetic_share"]}
    assert share["1"]["ratio"] == pytest.approx(share["1"]["synthetic_pq"] / share["1"]["real_pq"])
    assert not share["1"]["reaches"]  # 0.5 vs 0.6: 83 %
    diag = {(d["k"], d["measures"]): d for d in result["diagnosis"]}
    assert diag[("1", "image realism")]["arm"] == "painted-real" and diag[("1", "image realism")]["baseline"] == "real"
    assert diag[("1", "mask realism")]["mean"] == pytest.approx(-0.06, abs=0.02)


def test_goal_met_when_the_mixed_arm_clearly_beats_real(tmp_path):
    runs = []
    for seed in (0, 1, 2):
        base = np.linspace(0.4, 0.6, 8) + 0.01 * seed
        runs.append(("1", make_run(tmp_path, 1, seed, "real", pq=base)))
        runs.append(("1", make_run(tmp_path, 1, seed, "real+synthetic", pq=base + 0.05 + 0.002 * seed)))
    result = build_evidence_report(runs, tmp_path / "out")
    assert result["goal"]["met"] is True
    assert "**met**" in (tmp_path / "out" / "evidence.md").read_text()
    diff = next(d for d in result["differences"] if d["metric"] == "pq")
    assert diff["mean"] == pytest.approx(0.052) and diff["ci_low"] > 0
    assert diff["seeds_needed"] == 2  # tiny sd: the floor
    assert result["cost"][1]["generator_minutes"] is None  # no generator logs: unknown, not zero


def test_one_seed_has_no_interval_and_few_images_no_test(tmp_path):
    images = IMAGES[:4]
    runs = [("2", make_run(tmp_path, 2, 0, "real", pq=[0.5, 0.6, 0.7, 0.8], images=images)),
            ("2", make_run(tmp_path, 2, 0, "synthetic", pq=[0.4, 0.6, 0.6, 0.7], images=images))]
    build_evidence_report(runs, tmp_path / "out")
    row = pd.read_csv(tmp_path / "out" / "differences.csv").query("metric == 'pq'").iloc[0]
    assert row["n_seeds"] == 1 and row["mean"] == pytest.approx(-0.075)
    for col in ("sd", "ci_low", "ci_high", "wilcoxon_p", "seeds_needed"):
        assert math.isnan(row[col]), col
    md = (tmp_path / "out" / "evidence.md").read_text()
    assert "one seed, so no confidence interval" in md
    assert "Goal (at k ≤ 2" in md and "not tested" in md


def test_pairing_is_on_slide_and_patch_not_row_order(tmp_path):
    pq = np.linspace(0.3, 0.7, 8)
    real = make_run(tmp_path, 1, 0, "real", pq=pq)
    other = make_run(tmp_path, 1, 0, "synthetic", pq=pq + 0.1)
    scores = pd.read_csv(other / "scores.csv")
    scores.iloc[::-1].to_csv(other / "scores.csv", index=False)  # same images, other order
    result = build_evidence_report([("1", real), ("1", other)], tmp_path / "out")
    assert result["differences"][0]["mean"] == pytest.approx(0.1)


def test_helpers():
    assert [parse_k(k) for k in ("1", " 02", "all", "ALL", 3)] == ["1", "2", "all", "all", "3"]
    assert sorted(["all", "10", "2", "1"], key=k_order) == ["1", "2", "10", "all"]
    assert seeds_needed(float("nan"), 1, 0.02) is None and seeds_needed(0.0, 3, 0.02) == 2
    sd = 0.03
    assert seeds_needed(sd, 5, 0.02) == math.ceil((stats.t.ppf(0.975, 4) * sd / 0.02) ** 2)
    assert math.isnan(wilcoxon_p([0.0] * 10)) and math.isnan(wilcoxon_p([0.1] * 5))
    d = [0.1, -0.02, 0.03, 0.05, 0.04, 0.02, -0.01]
    assert wilcoxon_p(d) == pytest.approx(stats.wilcoxon(d).pvalue)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-scores", "lacks scores.csv"),
        ("no-train", "lacks train.json"),
        ("k-zero", "positive integer or 'all'"),
        ("k-word", "positive integer or 'all'"),
        ("k-float", "positive integer or 'all'"),
        ("no-real", "has no real arm"),
        ("duplicate", "appears twice"),
        ("other-images", "same test patches"),
        ("arm-mismatch", "is not train.json's"),
        ("missing-folder", "run folder not found"),
        ("stray-generator-log", "without any run"),
        ("generator-log-no-seconds", "lacks a seconds column"),
        ("stray-evaluation", "without any run"),
        ("not-an-evaluation", "not an evaluate-masks evaluation.json"),
    ],
)
def test_bad_input_is_one_error_naming_the_problem(tmp_path, case, message):
    real = make_run(tmp_path, 1, 0, "real")
    synth = make_run(tmp_path, 1, 0, "synthetic")
    runs, logs, named = [("1", real), ("1", synth)], [], None
    if case == "no-scores":
        bad = make_run(tmp_path, 1, 1, "real", write_scores=False)
        runs, named = [*runs, ("1", bad)], bad
    elif case == "no-train":
        bad = make_run(tmp_path, 1, 1, "real", write_train=False)
        runs, named = [*runs, ("1", bad)], bad
    elif case in ("k-zero", "k-word", "k-float"):
        runs = [({"k-zero": "0", "k-word": "some", "k-float": "1.5"}[case], real)]
        named = real
    elif case == "no-real":
        lone = make_run(tmp_path, 2, 0, "synthetic")
        runs, named = [*runs, ("2", lone)], lone
    elif case == "duplicate":
        runs, named = [*runs, ("01", make_run(tmp_path / "again", 1, 0, "synthetic"))], None
    elif case == "other-images":
        odd = make_run(tmp_path / "odd", 1, 0, "synthetic", images=[("A", i) for i in range(8)])
        runs, named = [("1", real), ("1", odd)], odd
    elif case == "arm-mismatch":
        bad = make_run(tmp_path / "mis", 1, 0, "synthetic", scores_arm="painted-real")
        runs, named = [("1", real), ("1", bad)], bad
    elif case == "missing-folder":
        named = tmp_path / "nowhere"
        runs = [*runs, ("1", named)]
    elif case == "stray-generator-log":
        logs = [("2", "0", gen_log(tmp_path, 2, 0, [10.0]))]
    elif case == "generator-log-no-seconds":
        named = tmp_path / "g.csv"
        pd.DataFrame({"step": [1], "loss": [0.1]}).to_csv(named, index=False)
        logs = [("1", "0", named)]
    out = tmp_path / "out"
    evaluations = []
    if case == "stray-evaluation":
        evaluations = [("3", "0", "masks", _mask_evaluation(tmp_path, 3, 0))]
    elif case == "not-an-evaluation":
        named = tmp_path / "e.json"
        named.write_text(json.dumps({"features": {}}))
        evaluations = [("1", "0", "masks", named)]
    with pytest.raises(HistosynthError, match=message) as err:
        build_evidence_report(runs, out, generator_logs=logs, evaluations=evaluations)
    if named is not None:
        assert str(named) in str(err.value)
    assert not out.exists() or not list(out.iterdir())


def _mask_evaluation(root, k, seed, ks=0.05):
    path = root / "eval" / f"masks-k{k}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = {n: {"statistic": ks * (i + 1), "pass": True} for i, n in enumerate(
        ("count", "area", "nn_distance", "eccentricity"))}
    path.write_text(json.dumps({"features": feats, "all_pass": ks < 0.03}))
    return path


def _image_evaluation(root, k, seed, distance, fid=None):
    path = root / "eval" / f"images-k{k}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stain": {"generated": {"combined": distance}, "baseline_ratio": 3.0},
                                "consistency": {"ratio": 0.9},
                                "fid": {"fid": fid, "kid": None if fid is None else fid / 1000,
                                        "floor": None if fid is None else {"fid": 150.0, "kid": 0.03}}}))
    return path


def test_generator_evaluations_are_tabled_per_k(tmp_path):
    runs, evaluations = [], []
    for seed in (0, 1):
        for arm in ("real", "synthetic"):
            runs.append(("1", make_run(tmp_path, 1, seed, arm)))
        evaluations += [("1", str(seed), "masks", _mask_evaluation(tmp_path, 1, seed, ks=0.02 * (seed + 1))),
                        ("1", str(seed), "images", _image_evaluation(tmp_path, 1, seed, 0.2 + 0.2 * seed))]
    result = build_evidence_report(runs, tmp_path / "out", evaluations=evaluations)
    table = pd.read_csv(tmp_path / "out" / "generators.csv")
    assert list(table["seed"]) == [0, 1] and table["mask_ks_count"].tolist() == pytest.approx([0.02, 0.04])
    assert table["masks_pass"].tolist() == [True, False] and table["stain_distance"].tolist() == pytest.approx([0.2, 0.4])
    assert result["generators"][1]["nuclei_consistency"] == pytest.approx(0.9)
    text = (tmp_path / "out" / "evidence.md").read_text()
    assert "## The generators of each regime" in text and "0.300 [0.200, 0.400]" in text  # mean [range] of seeds
    assert "fid" not in table.columns and "| FID |" not in text  # FID skipped (the optional network absent)
    # with FID: the painted images' FID and KID beside the real-vs-real floor
    with_fid = [(k, seed, kind, _image_evaluation(tmp_path / "f", 1, seed, 0.3, fid=300.0 + 100 * int(seed))
                 if kind == "images" else path) for k, seed, kind, path in evaluations]
    build_evidence_report(runs, tmp_path / "out-fid", evaluations=with_fid)
    table = pd.read_csv(tmp_path / "out-fid" / "generators.csv")
    assert table["fid"].tolist() == [300.0, 400.0] and table["fid_floor"].tolist() == [150.0, 150.0]
    text = (tmp_path / "out-fid" / "evidence.md").read_text()
    assert "| FID | FID floor (real) | KID | KID floor (real) |" in text and "350.000 [300.000, 400.000]" in text
    # no evaluations: no section, an empty table
    build_evidence_report(runs, tmp_path / "bare")
    assert "generators of each regime" not in (tmp_path / "bare" / "evidence.md").read_text()


def _parser():
    parser = argparse.ArgumentParser(prog="histosynth")
    sub = parser.add_subparsers(dest="command", required=True)
    evidence_cli.register(sub)
    return parser


def test_cli_parses_runs_generator_logs_and_delta(tmp_path):
    runs = []
    for seed in (0, 1):
        for arm in ("real", "synthetic"):
            runs.append(f"{1}={make_run(tmp_path, 1, seed, arm)}")
    logs = [f"1:{s}={gen_log(tmp_path, 1, s, [120.0])}" for s in (0, 1)]
    out = tmp_path / "out"
    args = _parser().parse_args(["evidence-report", *runs, str(out),
                                 *[x for log in logs for x in ("--generator-log", log)]])
    assert args.delta == pytest.approx(0.02)  # the schema's default
    assert args.generator_log == logs
    args.func(args)
    result = json.loads((out / "evidence.json").read_text())
    assert result["delta"] == pytest.approx(0.02) and result["n_runs"] == 4
    cost = {c["arm"]: c for c in result["cost"]}
    assert cost["synthetic"]["generator_minutes"] == pytest.approx(2.0) and cost["real"]["generator_minutes"] == 0
    args = _parser().parse_args(["evidence-report", *runs, str(tmp_path / "out2"), "--delta", "0.05"])
    args.func(args)
    assert json.loads((tmp_path / "out2" / "evidence.json").read_text())["delta"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["1=somewhere"], "at least one K=RUN_DIR and an output folder"),
        (["somewhere", "out"], "a run is K=RUN_DIR"),
        (["1=a", "2=b"], "the last PATH is the output folder"),
        (["1=a", "out", "--generator-log", "1=log.csv"], "a generator log is K:SEED=PATH"),
        (["1=a", "out", "--masks-evaluation", "1=e.json"], "a masks evaluation is K:SEED=PATH"),
    ],
)
def test_cli_bad_arguments(argv, message):
    args = _parser().parse_args(["evidence-report", *argv])
    with pytest.raises(HistosynthError, match=message):
        args.func(args)


def test_cli_help_renders():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["evidence-report"].format_help()
    assert "--generator-log" in text and "--delta" in text and "default 0.02" in text
