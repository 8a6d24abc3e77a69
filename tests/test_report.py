"""The report: confidence intervals, the table over arms and seeds, the page, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.segmentation.report import METRICS, build_report, mean_ci, read_scores, summarise, what_it_can_show


def _scores(path, arm, seed, values, mpq=None):
    """A scores.csv with one row per value (every metric = that value) and a summary.json beside it."""
    path.mkdir(parents=True, exist_ok=True)
    rows = [{"arm": arm, "seed": seed, "slide": "s", "x": 0, "y": 0, "patch": i, **{m: v for m in METRICS}}
            for i, v in enumerate(values)]
    pd.DataFrame(rows).to_csv(path / "scores.csv", index=False)
    (path / "summary.json").write_text(json.dumps({"mpq": mpq, "mpq_plus": None}))
    return path / "scores.csv"


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, np.zeros((4, 4, 3)))
    return path


def test_mean_ci_is_student_t_and_degenerates_for_one_value():
    v = [0.5, 0.6, 0.7]
    m, lo, hi = mean_ci(v)
    half = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / np.sqrt(3)
    assert m == pytest.approx(0.6) and lo == pytest.approx(0.6 - half) and hi == pytest.approx(0.6 + half)
    assert mean_ci([0.4]) == (0.4, 0.4, 0.4)
    assert all(np.isnan(mean_ci([])))


def test_ci_over_seeds_with_several_seeds_else_over_images(tmp_path):
    files = [_scores(tmp_path / f"real/seed-{s}", "real", s, [0.5 + 0.1 * s, 0.5 + 0.1 * s], mpq=0.3 + s * 0.1)
             for s in range(3)]
    files.append(_scores(tmp_path / "synthetic/seed-0", "synthetic", 0, [0.2, 0.4]))
    images, runs = read_scores(files)
    table = summarise(images, runs).set_index(["arm", "metric"])
    real = table.loc[("real", "pq")]
    assert real["ci_over"] == "seeds" and real["n_seeds"] == 3 and real["mean"] == pytest.approx(0.6)
    assert real["ci_low"] == pytest.approx(mean_ci([0.5, 0.6, 0.7])[1])
    assert table.loc[("real", "mpq"), "mean"] == pytest.approx(0.4)
    synth = table.loc[("synthetic", "pq")]
    assert synth["ci_over"] == "images" and synth["mean"] == pytest.approx(0.3)
    assert synth["ci_low"] == pytest.approx(mean_ci([0.2, 0.4])[1])
    assert ("synthetic", "mpq") not in table.index  # absent from its summary: not invented


def test_build_report_writes_table_chart_figures_and_page(tmp_path):
    files = [_scores(tmp_path / f"{a}/seed-{s}", a, s, [0.3, 0.5]) for a in ("real", "real+synthetic", "synthetic")
             for s in (0, 1)]
    fig = _png(tmp_path / "samples.png")
    out = tmp_path / "report"
    result = build_report(files, out, [("GAN samples", fig)])
    assert sorted(result["arms"]) == ["real", "real+synthetic", "synthetic"] and result["runs"] == 6
    for name in ("index.html", "summary.csv", "scores.csv", "comparison.png"):
        assert (out / name).is_file(), name
    page = (out / "index.html").read_text()
    assert "GAN samples" in page and "real+synthetic" in page and "comparison.png" in page
    copied = list((out / "figures").iterdir())
    assert len(copied) == 1 and copied[0].name in page
    assert len(pd.read_csv(out / "scores.csv")) == 12
    summary = pd.read_csv(out / "summary.csv")
    assert list(dict.fromkeys(summary["arm"])) == ["real", "real+synthetic", "synthetic"]


@pytest.mark.parametrize("problem, message", [
    ("missing-column", "lacks columns"),
    ("empty", "no rows"),
    ("nan", "missing metric values"),
    ("duplicate", "appear twice"),
])
def test_bad_scores_are_named(tmp_path, problem, message):
    path = _scores(tmp_path / "a", "real", 0, [0.5])
    files = [path]
    frame = pd.read_csv(path)
    if problem == "missing-column":
        frame.drop(columns=["aji"]).to_csv(path, index=False)
    elif problem == "empty":
        frame.iloc[:0].to_csv(path, index=False)
    elif problem == "nan":
        frame.assign(pq=np.nan).to_csv(path, index=False)
    else:
        files.append(_scores(tmp_path / "b", "real", 0, [0.4]))
    with pytest.raises(HistosynthError, match=message):
        read_scores(files)


def test_cli_report_and_missing_figure(tmp_path, capsys):
    path = _scores(tmp_path / "a", "real", 0, [0.5])
    fig = _png(tmp_path / "f.png")
    assert main(["report", str(path), str(tmp_path / "out"), "--figure", f"Some figure={fig}"]) == 0
    assert (tmp_path / "out" / "index.html").is_file()
    assert main(["report", str(path), str(tmp_path / "out2"), "--figure", f"Gone={tmp_path / 'nope.png'}"]) == 2
    assert "figures not found" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "index.html").exists()


def test_report_never_imports_torch(tmp_path):
    """The report stage runs without torch: neither its module nor what it imports loads it, nor does a run."""
    import histosynth

    files = [_scores(tmp_path / f"{a}/seed-0", a, 0, [0.3, 0.5]) for a in ("real", "synthetic")]
    script = (
        "import sys\n"
        "from histosynth.cli import main\n"
        "from histosynth.segmentation.report import build_report\n"
        f"build_report({[str(f) for f in files]!r}, {str(tmp_path / 'out')!r})\n"
        f"assert main(['report', {str(files[0])!r}, {str(tmp_path / 'cli')!r}]) == 0\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    src = str(Path(histosynth.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "index.html").is_file() and (tmp_path / "cli" / "index.html").is_file()


def test_the_page_says_plainly_when_the_models_are_too_weak_to_compare(tmp_path):
    """Counts from summary.json and the rising flag from train.json decide the sentence under the table."""
    weak = _scores(tmp_path / "real" / "seed-0", "real", 0, [0.2, 0.3])
    summary = json.loads((weak.parent / "summary.json").read_text())
    (weak.parent / "summary.json").write_text(json.dumps({**summary, "n_true": 100, "n_pred": 40}))
    (weak.parent / "train.json").write_text(json.dumps({"rising": True}))
    _, runs = read_scores([weak])
    text = what_it_can_show(runs)
    assert "under-trained" in text and "40–40 %" in text and "still rising" in text and "real seed 0" in text
    build_report([weak], tmp_path / "out")
    assert "under-trained" in (tmp_path / "out" / "index.html").read_text()
    # trained well, two seeds per arm: nothing to warn of; one seed: the intervals ignore training noise
    good = []
    for seed in (0, 1):
        path = _scores(tmp_path / "good" / f"seed-{seed}", "real", seed, [0.6])
        (path.parent / "summary.json").write_text(json.dumps({"n_true": 100, "n_pred": 90}))
        (path.parent / "train.json").write_text(json.dumps({"rising": False}))
        good.append(path)
    assert what_it_can_show(read_scores(good)[1]) == ""
    assert "One seed per arm" in what_it_can_show(read_scores(good[:1])[1])
