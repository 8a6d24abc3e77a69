"""Gather every arm and seed into one report: the ``report`` stage.

:func:`build_report` reads the ``scores.csv`` files of ``histosynth score``
(one per arm and seed, with the ``summary.json`` beside each) and writes into
``out_dir``:

- ``scores.csv`` — every per-image row of every arm and seed;
- ``summary.csv`` — per arm and metric: the mean, the 95 % confidence
  interval and how it was computed. With two or more seeds the unit is the
  seed (the mean over images of each seed, Student's t over seeds), which is
  what tells arms apart in a run-to-run sense; with one seed the interval is
  over images and says nothing about training noise (``ci_over`` names which);
- ``comparison.png`` — a bar chart of each metric per arm with those intervals;
- ``figures/`` — copies of the per-stage figures it is given;
- ``index.html`` — the table, the chart and the figures on one page.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.atomic import atomic_csv, atomic_write

log = logging.getLogger(__name__)

METRICS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")
DATASET_METRICS = ("mpq", "mpq_plus")  # from summary.json: type-aware, one value per arm and seed
ARM_ORDER = ("real", "real+synthetic", "synthetic")


def read_scores(paths: Sequence[str | os.PathLike]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-image rows, per arm/seed rows) from ``scores.csv`` files and the ``summary.json`` beside each."""
    if not paths:
        raise HistosynthError("report needs at least one scores.csv")
    frames, per_run = [], []
    for path in paths:
        path = Path(path)
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise HistosynthError(f"unreadable scores file: {err}", path) from err
        missing = [c for c in ("arm", "seed", *METRICS) if c not in frame.columns]
        if missing:
            raise HistosynthError(f"scores file lacks columns {missing}", path)
        if frame.empty:
            raise HistosynthError("scores file has no rows", path)
        if frame[list(METRICS)].isna().any().any():
            raise HistosynthError("scores file has missing metric values", path)
        frames.append(frame)
        run = {"arm": str(frame["arm"].iloc[0]), "seed": int(frame["seed"].iloc[0]),
               **{m: float(frame[m].mean()) for m in METRICS}}
        summary_path = path.with_name("summary.json")
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            for m in DATASET_METRICS:
                if summary.get(m) is not None:
                    run[m] = float(summary[m])
            if summary.get("n_true"):
                run["found"] = float(summary.get("n_pred", 0)) / float(summary["n_true"])  # as evidence-report
        train_path = path.with_name("train.json")
        if train_path.is_file():
            run["rising"] = bool(json.loads(train_path.read_text()).get("rising", False))
        per_run.append(run)
    runs = pd.DataFrame(per_run)
    dup = runs.duplicated(["arm", "seed"])
    if dup.any():
        raise HistosynthError("the same arm and seed appear twice: "
                              + ", ".join(f"{a} seed {s}" for a, s in runs.loc[dup, ["arm", "seed"]].values))
    return pd.concat(frames, ignore_index=True), runs


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval; with one value the interval is that value."""
    from scipy import stats

    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


def summarise(images: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per arm and metric: mean, 95 % CI (over seeds when there are ≥ 2, else over images)."""
    rows = []
    arms = sorted(runs["arm"].unique(), key=lambda a: (ARM_ORDER.index(a) if a in ARM_ORDER else 99, a))
    for arm in arms:
        arm_runs = runs[runs["arm"] == arm]
        n_seeds = len(arm_runs)
        for metric in (*METRICS, *DATASET_METRICS):
            if metric not in arm_runs or arm_runs[metric].isna().all():
                continue
            if n_seeds >= 2:
                mean, low, high = mean_ci(arm_runs[metric])
                over = "seeds"
            else:
                mean, low, high = (mean_ci(images.loc[images["arm"] == arm, metric]) if metric in METRICS
                                   else (float(arm_runs[metric].iloc[0]),) * 3)
                over = "images" if metric in METRICS else "none"
            rows.append({"arm": arm, "metric": metric, "mean": mean, "ci_low": low, "ci_high": high,
                         "n_seeds": n_seeds, "n_images": int((images["arm"] == arm).sum()), "ci_over": over})
    return pd.DataFrame(rows)


def plot_comparison(table: pd.DataFrame, path: Path) -> Path:
    """Grouped bars: one group per metric, one bar per arm, 95 % CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in (*METRICS, *DATASET_METRICS) if m in set(table["metric"])]
    arms = list(dict.fromkeys(table["arm"]))
    fig, ax = plt.subplots(figsize=(1.3 * len(metrics) + 2, 3.6))
    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        sub = table[table["arm"] == arm].set_index("metric").reindex(metrics)
        x = np.arange(len(metrics)) + (j - (len(arms) - 1) / 2) * width
        err = np.vstack([sub["mean"] - sub["ci_low"], sub["ci_high"] - sub["mean"]])
        ax.bar(x, sub["mean"], width, yerr=np.nan_to_num(err), capsize=3, label=arm)
    ax.set_xticks(np.arange(len(metrics)))
    ax.set_xticklabels([m.replace("_plus", "+").upper() for m in metrics])
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean (95 % CI)")
    ax.legend(fontsize=8, ncol=len(arms), loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def _html_table(table: pd.DataFrame) -> str:
    metrics = list(dict.fromkeys(table["metric"]))
    head = "".join(f"<th>{html.escape(m.replace('_plus', '+').upper())}</th>" for m in metrics)
    body = []
    for arm, sub in table.groupby("arm", sort=False):
        sub = sub.set_index("metric")
        cells = "".join(
            f"<td>{sub.at[m, 'mean']:.3f} <small>[{sub.at[m, 'ci_low']:.3f}, {sub.at[m, 'ci_high']:.3f}]</small></td>"
            if m in sub.index else "<td></td>" for m in metrics)
        first = sub.iloc[0]
        body.append(f"<tr><th>{html.escape(str(arm))}</th><td>{int(first['n_seeds'])}</td>"
                    f"<td>{int(first['n_images'])}</td>{cells}</tr>")
    return (f"<table><tr><th>arm</th><th>seeds</th><th>images</th>{head}</tr>{''.join(body)}</table>")


def what_it_can_show(runs: pd.DataFrame) -> str:
    """One plain paragraph: are these models trained enough for the arms' differences to mean anything?"""
    problems = []
    if "found" in runs and runs["found"].notna().any():
        low, high = runs["found"].min(), runs["found"].max()
        if low < 0.8:
            problems.append(f"the runs predict only {100 * low:.0f}–{100 * high:.0f} % as many nuclei as the test "
                            "slides hold (a segmenter worth comparing finds at least 80 %)")
    if "rising" in runs and runs["rising"].fillna(False).astype(bool).any():
        rising = runs.loc[runs["rising"].fillna(False).astype(bool)]
        problems.append("validation PQ was still rising at the end for "
                        + ", ".join(f"{a} seed {s}" for a, s in rising[["arm", "seed"]].values))
    if problems:
        return ("These models are under-trained: " + "; ".join(problems) + ". The scores show that the pipeline "
                "runs end to end, not whether the synthetic data helps; the learning curve "
                "(<code>snakemake evidence</code>, docs/results.md) is the measurement of that.")
    if runs.groupby("arm")["seed"].nunique().min() < 2:
        return "One seed per arm: differences between arms cannot be told from training noise."
    return ""


def build_report(score_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 figures: Sequence[tuple[str, str | os.PathLike]] = ()) -> dict[str, Any]:
    """Write the report (see the module docstring); ``figures`` are (caption, path) pairs, all required."""
    images, runs = read_scores(score_files)
    missing = [os.fspath(p) for _, p in figures if not Path(p).is_file()]
    if missing:
        raise HistosynthError(f"figures not found: {', '.join(missing)}")
    table = summarise(images, runs)
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    plot_comparison(table, out_dir / "comparison.png")
    copied = []
    for k, (caption, src) in enumerate(figures):
        src = Path(src)
        name = f"{k:02d}-{src.parent.name}-{src.name}"
        atomic_write(out_dir / "figures" / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        copied.append((caption, f"figures/{name}"))
    atomic_csv(images, out_dir / "scores.csv")
    atomic_csv(table, out_dir / "summary.csv")
    over = sorted(set(table["ci_over"]) - {"none"})
    figs = "\n".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
                     "</figcaption></figure>" for c, p in copied)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>histosynth report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:.2em .6em;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}img{{max-width:100%}}
figure{{margin:1.5em 0}}</style></head><body>
<h1>HoVer-Net: real vs real + synthetic vs synthetic</h1>
<p>Scores on the held-out TEST slides, mean over images per seed; 95&nbsp;% confidence interval over
{html.escape(" / ".join(over) or "-")} in brackets ({'seeds: Student t over the per-seed means'
if 'seeds' in over else 'one seed per arm: the interval is over images and ignores training noise'}).</p>
{_html_table(table)}
<p><b>{what_it_can_show(runs)}</b></p>
<figure><img src="comparison.png" alt="comparison"><figcaption>Each metric per arm, 95&nbsp;% CI.</figcaption></figure>
<h2>Stages</h2>
{figs}
<p>Files: <a href="scores.csv">scores.csv</a> (every image), <a href="summary.csv">summary.csv</a> (this table).</p>
</body></html>
"""
    atomic_write(out_dir / "index.html", lambda tmp: tmp.write_text(page))
    log.info("report written to %s: %d arms, %d runs, %d images", out_dir, runs["arm"].nunique(), len(runs),
             len(images))
    return {"stage": "report", "out_dir": str(out_dir), "arms": sorted(runs["arm"].unique()),
            "runs": len(runs), "table": table.to_dict("records")}
