"""The statistics and report of the learning-curve experiment: the ``evidence-report`` stage.

For each k (number of train slides: a positive int or ``all``) and seed (a replicate: its own draw of k
slides, its own generators and segmenters) several arms (real, real+synthetic, synthetic,
synthetic-then-real, painted-real) each trained one HoVer-Net and scored it on THE SAME test patches.
:func:`build_evidence_report` reads one run folder per (k, seed, arm):

- ``scores.csv`` (required) — one row per test image (``histosynth score``): slide, patch, dice, aji, dq,
  sq, pq, n_true, n_pred (arm and seed, when present, must agree with ``train.json``);
- ``train.json`` (required) — arm, seed, steps, best_step, best_pq (validation), rising, seconds,
  validation_seconds, threads, device, precision, patches (and, optionally, ``slides``: the train slides,
  a list or a count, which labels ``all`` on the learning curve);
- ``validation.csv`` (optional) — step, pq, ...: validation scores during training (``validation.png``);
- ``summary.json``, ``log.csv`` — not needed.

and writes into ``out_dir`` (every file through a temporary name):

- ``runs.csv`` — one row per run: k, seed, arm, the means over test images, counts, found = n_pred / n_true,
  best_step, best_pq, rising, minutes, cpu_minutes (seconds × threads / 60 on a CPU) or gpu_minutes;
- ``means.csv`` — per k, arm and metric: mean over seeds of the per-seed means, 95 % CI over seeds;
- ``differences.csv`` — per k, arm ≠ real and metric (pq, aji, dice): the paired difference arm − real
  (same k, seed and test images; one value per seed), its sd, 95 % CI (Student t over seeds), a Wilcoxon
  signed-rank test over the test images (per-image differences averaged over the seeds), the seeds needed
  for a CI half-width ≤ delta, and ``void`` (the arm or real still rising in a seed of that k);
- ``learning_curve.png``, ``validation.png``, ``cost.csv``, ``evidence.md`` and ``evidence.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.atomic import atomic_csv, atomic_write

log = logging.getLogger(__name__)

ARM_ORDER = ("real", "real+synthetic", "synthetic", "synthetic-then-real", "painted-real")
BASELINE = "real"
#: the metrics averaged per run (runs.csv, means.csv)
RUN_METRICS = ("pq", "aji", "dice", "dq", "sq")
#: the metrics compared between arms (differences.csv, learning_curve.png)
DIFF_METRICS = ("pq", "aji", "dice")
SCORE_COLUMNS = ("slide", "patch", *RUN_METRICS, "n_true", "n_pred")
#: arms that the goal asks to beat real at small k
GOAL_ARMS = ("real+synthetic", "synthetic-then-real")
GOAL_MAX_K = 2
SYNTHETIC_SHARE = 0.9
MIN_WILCOXON_IMAGES = 6


@dataclass
class Run:
    """One run folder: (k, seed, arm), its per-image scores indexed by (slide, patch) and its train.json."""

    k: str
    seed: int
    arm: str
    path: Path
    scores: pd.DataFrame
    train: dict[str, Any]
    validation: pd.DataFrame | None = None
    row: dict[str, Any] = field(default_factory=dict)


# -- reading ----------------------------------------------------------------------------------------------------
def parse_k(k: Any, where: str | os.PathLike | None = None) -> str:
    """A k as its label: ``"all"`` or a positive int as text (``"01"`` -> ``"1"``); else HistosynthError."""
    text = str(k).strip()
    if text.lower() == "all":
        return "all"
    if isinstance(k, bool) or not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise HistosynthError(f"k must be a positive integer or 'all', got {k!r}", where)
    return str(int(text))


def k_order(k: str) -> tuple[int, int]:
    """Sort key: numbers in numeric order, ``all`` last."""
    return (1, 0) if k == "all" else (0, int(k))


def arm_order(arm: str) -> tuple[int, str]:
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise HistosynthError(f"unreadable {what}: {err}", path) from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise HistosynthError(f"unreadable JSON: {err}", path) from err
    if not isinstance(data, dict):
        raise HistosynthError("expected a JSON object", path)
    return data


def _number(value: Any) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def read_run(k: Any, run_dir: str | os.PathLike) -> Run:
    """One run folder, checked: scores.csv and train.json present and consistent, one row per test image."""
    path = Path(run_dir)
    k = parse_k(k, path)
    if not path.is_dir():
        raise HistosynthError("run folder not found", path)
    for name in ("scores.csv", "train.json"):
        if not (path / name).is_file():
            raise HistosynthError(f"run folder lacks {name}", path)
    train = _read_json(path / "train.json")
    for key in ("arm", "seed"):
        if key not in train:
            raise HistosynthError(f"train.json lacks {key!r}", path / "train.json")
    arm = str(train["arm"])
    try:
        seed = int(train["seed"])
    except (TypeError, ValueError) as err:
        raise HistosynthError(f"train.json seed is not an integer: {train['seed']!r}", path / "train.json") from err
    rising = train.get("rising", False)
    if rising not in (True, False, 0, 1, None):
        raise HistosynthError(f"train.json 'rising' must be true or false, got {rising!r}", path / "train.json")
    train["rising"] = bool(rising)

    scores = _read_csv(path / "scores.csv", "scores file")
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise HistosynthError(f"scores file lacks columns {missing}", path / "scores.csv")
    if scores.empty:
        raise HistosynthError("scores file has no rows", path / "scores.csv")
    numeric = [*RUN_METRICS, "n_true", "n_pred", "patch"]
    values = scores[numeric].apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any():
        raise HistosynthError("scores file has missing or non-numeric values", path / "scores.csv")
    scores[numeric] = values
    for col, want in (("arm", arm), ("seed", seed)):
        if col in scores.columns:
            found = set(scores[col].astype(str))
            if found != {str(want)}:
                raise HistosynthError(f"scores file {col} {sorted(found)} is not train.json's {want!r}",
                                      path / "scores.csv")
    scores = scores.assign(slide=scores["slide"].astype(str), patch=scores["patch"].astype(int))
    dup = scores.duplicated(["slide", "patch"])
    if dup.any():
        first = scores.loc[dup, ["slide", "patch"]].iloc[0]
        raise HistosynthError(f"scores file has the test image (slide {first['slide']}, patch {first['patch']}) "
                              "twice", path / "scores.csv")
    scores = scores.set_index(["slide", "patch"]).sort_index()

    validation = None
    if (path / "validation.csv").is_file():
        validation = _read_csv(path / "validation.csv", "validation file")
        if not {"step", "pq"} <= set(validation.columns):
            raise HistosynthError("validation file lacks the columns step and pq", path / "validation.csv")
    return Run(k=k, seed=seed, arm=arm, path=path, scores=scores, train=train, validation=validation)


def _run_row(run: Run) -> dict[str, Any]:
    s, t = run.scores, run.train
    n_true, n_pred = int(s["n_true"].sum()), int(s["n_pred"].sum())
    seconds, threads = _number(t.get("seconds")), _number(t.get("threads"))
    device = str(t.get("device", ""))
    on_cpu = device.lower().startswith("cpu")
    minutes = seconds / 60
    return {
        "k": run.k, "seed": run.seed, "arm": run.arm, "n_images": len(s),
        **{m: float(s[m].mean()) for m in RUN_METRICS},
        "n_true": n_true, "n_pred": n_pred, "found": n_pred / n_true if n_true else float("nan"),
        "steps": _number(t.get("steps")), "best_step": _number(t.get("best_step")),
        "best_pq": _number(t.get("best_pq")), "rising": bool(t["rising"]),
        "train_minutes": minutes, "validation_minutes": _number(t.get("validation_seconds")) / 60,
        "device": device, "threads": threads,
        "cpu_minutes": minutes * (threads if math.isfinite(threads) else 1.0) if on_cpu else float("nan"),
        "gpu_minutes": float("nan") if on_cpu or not device else minutes,
        "run_dir": str(run.path),
    }


def read_runs(runs: Sequence[tuple[Any, str | os.PathLike]]) -> list[Run]:
    """Every run folder, checked together: no duplicate (k, seed, arm), a real arm beside every other arm."""
    if not runs:
        raise HistosynthError("evidence-report needs at least one run folder")
    out: list[Run] = []
    seen: dict[tuple[str, int, str], Path] = {}
    for k, run_dir in runs:
        run = read_run(k, run_dir)
        key = (run.k, run.seed, run.arm)
        if key in seen:
            raise HistosynthError(f"k {run.k}, seed {run.seed}, arm {run.arm} appears twice (also {seen[key]})",
                                  run.path)
        seen[key] = run.path
        run.row = _run_row(run)
        out.append(run)
    groups: dict[tuple[str, int], dict[str, Run]] = {}
    for run in out:
        groups.setdefault((run.k, run.seed), {})[run.arm] = run
    for (k, seed), arms in groups.items():
        if BASELINE not in arms:
            others = ", ".join(str(r.path) for r in arms.values())
            raise HistosynthError(f"k {k}, seed {seed} has no {BASELINE} arm to compare with (runs: {others})")
        base = arms[BASELINE]
        for arm, run in arms.items():
            if arm == BASELINE:
                continue
            a, b = set(run.scores.index), set(base.scores.index)
            if a != b:
                raise HistosynthError(
                    f"k {k}, seed {seed}: arm {arm} was scored on other test images than {BASELINE} "
                    f"({base.path}): {len(a - b)} only in {arm}, {len(b - a)} only in {BASELINE}; the arms must "
                    "be scored on the same test patches", run.path)
    return sorted(out, key=lambda r: (k_order(r.k), r.seed, arm_order(r.arm)))


def _regime_file(k: Any, seed: Any, path: str | os.PathLike, what: str) -> tuple[str, int, Path]:
    """(k, seed, path) of a file that belongs to one regime, checked: k parsed, seed an integer, file there."""
    path = Path(path)
    k = parse_k(k, path)
    try:
        seed = int(seed)
    except (TypeError, ValueError) as err:
        raise HistosynthError(f"a {what}'s seed must be an integer, got {seed!r}", path) from err
    if not path.is_file():
        raise HistosynthError(f"{what} not found", path)
    return k, seed, path


def read_generator_logs(logs: Sequence[tuple[Any, Any, str | os.PathLike]]) -> dict[tuple[str, int], float]:
    """Generator minutes per (k, seed): the sum of the ``seconds`` column of each log.csv, over the logs."""
    minutes: dict[tuple[str, int], float] = {}
    for k, seed, path in logs:
        k, seed, path = _regime_file(k, seed, path, "generator log")
        frame = _read_csv(path, "generator log")
        if "seconds" not in frame.columns:
            raise HistosynthError("generator log lacks a seconds column", path)
        seconds = pd.to_numeric(frame["seconds"], errors="coerce")
        if seconds.isna().any():
            raise HistosynthError("generator log has non-numeric seconds", path)
        minutes[(k, seed)] = minutes.get((k, seed), 0.0) + float(seconds.sum()) / 60
    return minutes


#: the numbers of evaluate-masks / evaluate-images that say how realistic a regime's generators are
MASK_FEATURES = ("count", "area", "nn_distance", "eccentricity")
#: the columns of generators.csv shown in evidence.md, with their headers
GENERATOR_COLUMNS = {**{f"mask_ks_{n}": f"mask KS {n.replace('_', ' ')}" for n in MASK_FEATURES},
                     "masks_pass": "masks pass", "stain_distance": "stain distance",
                     "stain_vs_baseline": "× closer than baseline", "nuclei_consistency": "nuclei consistency",
                     "fid": "FID", "fid_floor": "FID floor (real)", "kid": "KID", "kid_floor": "KID floor (real)"}


def read_evaluations(evaluations: Sequence[tuple[Any, Any, str, str | os.PathLike]]) -> pd.DataFrame:
    """One row per (k, seed) from evaluation.json files: (k, seed, kind 'masks' | 'images', path).

    masks: the KS statistic of each of :data:`MASK_FEATURES` (synthetic vs real masks) and whether all pass
    their bars; images: the stain distance of the painted images to real ones (W1 / sd, lower is closer),
    how many times closer than the flat-colour baseline, and the nucleus consistency ratio (Otsu nuclei of
    the painted images against their masks, relative to real images), and where the optional Inception
    network ran, FID and KID against the test slides with the real-vs-real floor of the same run.
    """
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for k, seed, kind, path in evaluations:
        k, seed, path = _regime_file(k, seed, path, f"{kind} evaluation")
        data = _read_json(path)
        row = rows.setdefault((k, seed), {"k": k, "seed": seed})
        try:
            if kind == "masks":
                for name in MASK_FEATURES:
                    row[f"mask_ks_{name}"] = _number(data["features"][name]["statistic"])
                row["masks_pass"] = bool(data["all_pass"])
            elif kind == "images":
                row["stain_distance"] = _number(data["stain"]["generated"]["combined"])
                row["stain_vs_baseline"] = _number(data["stain"].get("baseline_ratio"))
                row["nuclei_consistency"] = _number(data["consistency"].get("ratio"))
                fid = data.get("fid") or {}
                if fid.get("fid") is not None or fid.get("kid") is not None:  # the optional network ran
                    floor = fid.get("floor") or {}
                    row.update(fid=_number(fid.get("fid")), kid=_number(fid.get("kid")),
                               fid_floor=_number(floor.get("fid")), kid_floor=_number(floor.get("kid")))
            else:
                raise HistosynthError(f"an evaluation is 'masks' or 'images', got {kind!r}", path)
        except (KeyError, TypeError) as err:
            raise HistosynthError(f"not an evaluate-{kind} evaluation.json (no {err})", path) from err
    return pd.DataFrame(sorted(rows.values(), key=lambda r: (k_order(r["k"]), r["seed"])))


# -- statistics -------------------------------------------------------------------------------------------------
def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """n, mean, sd, CI (Student t); sd and CI NaN with fewer than two values."""
    from scipy import stats

    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    n = len(v)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "sd": nan, "ci_low": nan, "ci_high": nan, "half_width": nan}
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": nan, "ci_low": nan, "ci_high": nan, "half_width": nan}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "half_width": half}


def seeds_needed(sd: float, n: int, delta: float) -> int | None:
    """ceil((t_{0.975, n-1} · sd / delta)²), at least 2: seeds for a 95 % CI half-width ≤ delta (None: n < 2)."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return None
    need = (float(stats.t.ppf(0.975, n - 1)) * sd / delta) ** 2
    return max(2, math.ceil(need - 1e-9))


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p over per-image differences; NaN below 6 images or all zero."""
    from scipy import stats

    d = np.asarray(differences, float)
    d = d[np.isfinite(d)]
    if len(d) < MIN_WILCOXON_IMAGES or not np.any(d != 0):
        return float("nan")
    try:
        return float(stats.wilcoxon(d).pvalue)
    except ValueError:
        return float("nan")


def paired(runs: Sequence[Run], k: str, arm: str, base: str, metric: str, delta: float) -> dict[str, Any] | None:
    """The paired difference ``arm − base`` of ``metric`` at ``k`` (None when no seed has both)."""
    by = {(r.seed, r.arm): r for r in runs if r.k == k}
    seeds = sorted(s for s, a in by if a == arm and (s, base) in by)
    if not seeds:
        return None
    per_seed, per_image = [], []
    for s in seeds:
        a, b = by[(s, arm)].scores[metric], by[(s, base)].scores[metric]
        d = a - b.reindex(a.index)  # the same images (checked on reading)
        per_seed.append(float(d.mean()))
        per_image.append(d.rename(s))
    images = pd.concat(per_image, axis=1).mean(axis=1)
    ci = t_interval(per_seed)
    rising = sorted({(r.arm, r.seed) for r in runs if r.k == k and r.arm in (arm, base) and r.train["rising"]},
                    key=lambda x: (arm_order(x[0]), x[1]))
    return {
        "k": k, "arm": arm, "baseline": base, "metric": metric, "n_seeds": len(seeds),
        "mean": ci["mean"], "sd": ci["sd"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
        "half_width": ci["half_width"], "n_images": len(images), "wilcoxon_p": wilcoxon_p(images.to_numpy()),
        "seeds_needed": seeds_needed(ci["sd"], ci["n"], delta), "void": bool(rising),
        "void_reason": ("validation PQ still rising: " + ", ".join(f"{a} seed {s}" for a, s in rising))
        if rising else "",
        "per_seed": dict(zip(seeds, per_seed)),
    }


def differences(runs: Sequence[Run], delta: float, base: str = BASELINE,
                arms: Sequence[str] | None = None) -> pd.DataFrame:
    """Every arm ≠ ``base`` against ``base``, per k and metric of :data:`DIFF_METRICS`."""
    ks = sorted({r.k for r in runs}, key=k_order)
    arms = arms or sorted({r.arm for r in runs} - {base}, key=arm_order)
    rows = [row for k in ks for arm in arms for m in DIFF_METRICS
            if (row := paired(runs, k, arm, base, m, delta)) is not None]
    columns = ["k", "arm", "baseline", "metric", "n_seeds", "mean", "sd", "ci_low", "ci_high", "half_width",
               "n_images", "wilcoxon_p", "seeds_needed", "void", "void_reason", "per_seed"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["seeds_needed"] = frame["seeds_needed"].astype("Int64")
    return frame


def _by_k_arm(table: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    groups = list(table.groupby(["k", "arm"], sort=False))
    return sorted(groups, key=lambda g: (k_order(g[0][0]), arm_order(g[0][1])))


def means(table: pd.DataFrame) -> pd.DataFrame:
    """Per k, arm and metric: the mean over seeds of the per-run means and its 95 % CI over seeds."""
    rows = []
    for (k, arm), sub in _by_k_arm(table):
        for m in (*RUN_METRICS, "found"):
            ci = t_interval(sub[m])
            rows.append({"k": k, "arm": arm, "metric": m, "n_seeds": len(sub), "mean": ci["mean"],
                         "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "rising": bool(sub["rising"].any())})
    return pd.DataFrame(rows)


def cost(table: pd.DataFrame, generator: dict[tuple[str, int], float]) -> pd.DataFrame:
    """Per k and arm: mean minutes over seeds; generator minutes count for every arm but real."""
    rows = []
    for (k, arm), sub in _by_k_arm(table):
        train = float(sub["train_minutes"].mean())
        if arm == BASELINE:
            gen = 0.0
        else:
            per_seed = [generator.get((k, int(s)), float("nan")) for s in sub["seed"]]
            gen = float(np.mean(per_seed))
        rows.append({"k": k, "arm": arm, "n_seeds": len(sub), "train_minutes": train,
                     "validation_minutes": _nanmean(sub["validation_minutes"]),
                     "cpu_minutes": _nanmean(sub["cpu_minutes"]), "gpu_minutes": _nanmean(sub["gpu_minutes"]),
                     "generator_minutes": gen, "total_minutes": train + gen})
    return pd.DataFrame(rows)


def _nanmean(values: Any) -> float:
    v = np.asarray(values, float)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")


def all_slides(runs: Sequence[Run]) -> int | None:
    """The number of train slides behind k = all, from train.json's ``slides`` (a list or a count) if given."""
    counts = set()
    for r in runs:
        if r.k != "all":
            continue
        value = r.train.get("slides", r.train.get("n_slides"))
        if isinstance(value, list):
            counts.add(len(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            counts.add(int(value))
    return counts.pop() if len(counts) == 1 else None


# -- figures ----------------------------------------------------------------------------------------------------
def _colors(arms: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {a: cmap(arm_order(a)[0] if a in ARM_ORDER else len(ARM_ORDER) + i) for i, a in enumerate(arms)}


def _k_label(k: str, n_all: int | None) -> str:
    return f"all ({n_all})" if k == "all" and n_all else k


def plot_learning_curve(table: pd.DataFrame, path: Path, n_all: int | None) -> Path:
    """PQ / AJI / Dice vs k: one line per arm, the mean over seeds with its 95 % CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(set(table["k"]), key=k_order)
    arms = sorted(set(table["arm"]), key=arm_order)
    colors = _colors(arms)
    x = np.arange(len(ks))
    fig, axes = plt.subplots(1, len(DIFF_METRICS), figsize=(4.2 * len(DIFF_METRICS), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], DIFF_METRICS):
        for arm in arms:
            stats = [t_interval(table.loc[(table["k"] == k) & (table["arm"] == arm), metric]) for k in ks]
            mean = np.array([s["mean"] for s in stats])
            low = np.array([s["ci_low"] for s in stats])
            high = np.array([s["ci_high"] for s in stats])
            ok = np.isfinite(mean)
            ax.plot(x[ok], mean[ok], "o-", color=colors[arm], label=arm, lw=1.5, ms=4)
            band = np.isfinite(low) & np.isfinite(high)
            if band.any():
                ax.fill_between(x, np.where(band, low, np.nan), np.where(band, high, np.nan), color=colors[arm],
                                alpha=0.18, lw=0)
        ax.set_xticks(x)
        ax.set_xticklabels([_k_label(k, n_all) for k in ks])
        ax.set_xlabel("k (train slides)")
        ax.set_title(metric.upper())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean over seeds (95 % CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, frameon=False, loc="upper center", ncol=len(arms))
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return save_figure(fig, path)


def plot_validation(runs: Sequence[Run], path: Path, n_all: int | None) -> Path:
    """Validation PQ vs step, one panel per k, one colour per arm (a thin line per seed); rising runs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r.k for r in runs}, key=k_order)
    arms = sorted({r.arm for r in runs}, key=arm_order)
    colors = _colors(arms)
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks):
        drawn = False
        for arm in arms:
            mine = [r for r in runs if r.k == k and r.arm == arm and r.validation is not None
                    and not r.validation.empty]
            if mine:
                together = pd.concat([r.validation[["step", "pq"]] for r in mine]).groupby("step")["pq"].mean()
                ax.plot(together.index, together.to_numpy(), color=colors[arm], lw=1.8, label=arm)
            for r in mine:
                v = r.validation.sort_values("step")
                ax.plot(v["step"], v["pq"], color=colors[arm], lw=0.6, alpha=0.45)
                if r.train["rising"]:
                    ax.plot(v["step"].iloc[-1], v["pq"].iloc[-1], "^", color=colors[arm], ms=8, mec="k", mew=0.6,
                            label=None)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no validation.csv", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"k = {_k_label(k, n_all)}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation PQ")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if any(r.train["rising"] for r in runs):
        handles.append(plt.Line2D([], [], marker="^", ls="", color="grey", mec="k", ms=8))
        labels.append("still rising")
    if handles:
        fig.legend(handles, labels, fontsize=8, frameon=False, loc="upper center", ncol=len(labels))
    fig.suptitle("validation PQ (thick: mean over seeds; thin: each seed)", fontsize=9, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 0.92))
    return save_figure(fig, path)


# -- the report -------------------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{v:.{digits}f}" if math.isfinite(v) else "—"


def _signed(value: Any, digits: int = 3) -> str:
    return f"{float(value):+.{digits}f}" if _finite(value) else "—"


def _finite(value: Any) -> bool:
    try:
        return value is not None and value is not pd.NA and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _ci(low: Any, high: Any, signed: bool = False) -> str:
    if not (_finite(low) and _finite(high)):
        return "—"
    f = _signed if signed else _f
    return f"[{f(low)}, {f(high)}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def goal_check(diffs: pd.DataFrame, table: pd.DataFrame, delta: float) -> dict[str, Any]:
    """Did real+synthetic or synthetic-then-real beat real by ≥ delta PQ (CI above 0, not void) at k ≤ 2?
    And does synthetic alone reach ≥ 90 % of real's PQ (per k)?"""
    pq = diffs[diffs["metric"] == "pq"]
    checked = []
    for _, r in pq.iterrows():
        if r["arm"] not in GOAL_ARMS or r["k"] == "all" or int(r["k"]) > GOAL_MAX_K:
            continue
        beats = bool(_finite(r["mean"]) and r["mean"] >= delta and _finite(r["ci_low"]) and r["ci_low"] > 0
                     and not r["void"])
        checked.append({"k": r["k"], "arm": r["arm"], "mean": r["mean"], "ci_low": r["ci_low"],
                        "ci_high": r["ci_high"], "void": bool(r["void"]), "beats": beats})
    ratios = []
    for k in sorted(set(table["k"]), key=k_order):
        sub = table[table["k"] == k]
        real, synth = sub.loc[sub["arm"] == BASELINE, "pq"], sub.loc[sub["arm"] == "synthetic", "pq"]
        if len(real) and len(synth) and real.mean() > 0:
            ratio = float(synth.mean() / real.mean())
            ratios.append({"k": k, "synthetic_pq": float(synth.mean()), "real_pq": float(real.mean()),
                           "ratio": ratio, "reaches": ratio >= SYNTHETIC_SHARE})
    return {"met": any(c["beats"] for c in checked) if checked else None, "checked": checked,
            "synthetic_share": ratios}


def _diagnosis(runs: Sequence[Run], delta: float) -> list[dict[str, Any]]:
    """painted-real − real (image realism) and synthetic − painted-real (mask realism), PQ, per k."""
    out = []
    for k in sorted({r.k for r in runs}, key=k_order):
        for arm, base, what in (("painted-real", "real", "image realism"),
                                ("synthetic", "painted-real", "mask realism")):
            row = paired(runs, k, arm, base, "pq", delta)
            if row is not None:
                row.pop("per_seed")
                out.append({**row, "measures": what})
    return out


def _markdown(table: pd.DataFrame, mean_table: pd.DataFrame, diffs: pd.DataFrame, costs: pd.DataFrame,
              runs: Sequence[Run], goal: dict[str, Any], diagnosis: list[dict[str, Any]], delta: float,
              n_all: int | None, generator_given: bool, generators: pd.DataFrame) -> str:
    ks = sorted(set(table["k"]), key=k_order)
    arms = sorted(set(table["arm"]), key=arm_order)
    seeds = sorted(set(table["seed"]))
    out = ["# Evidence: HoVer-Net trained on real and synthetic data, by number of train slides", "",
           (f"{len(table)} runs: k = {', '.join(_k_label(k, n_all) for k in ks)}; seeds {', '.join(map(str, seeds))}; "
            f"arms {', '.join(arms)}. Every arm of a k and seed is scored on the same held-out test images; "
            f"delta (the PQ difference the seeds should resolve) = {delta:g}."), ""]

    out += ["## Scores on the test slides", "",
            ("Mean over seeds of each seed's mean over test images; 95 % CI over seeds (Student t) in brackets "
             "(— with one seed). found = predicted / true nuclei."), ""]
    m = mean_table.set_index(["k", "arm", "metric"])
    rows = []
    for k in ks:
        for arm in arms:
            if (k, arm, "pq") not in m.index:
                continue
            cells = [f"{_f(m.at[(k, arm, x), 'mean'])} {_ci(m.at[(k, arm, x), 'ci_low'], m.at[(k, arm, x), 'ci_high'])}"
                     for x in DIFF_METRICS]
            rising = "rising" if m.at[(k, arm, "pq"), "rising"] else ""
            rows.append([_k_label(k, n_all), arm, str(int(m.at[(k, arm, "pq"), "n_seeds"])), *cells,
                         _f(m.at[(k, arm, "found"), "mean"], 2), rising])
    out += [_md_table(["k", "arm", "seeds", "PQ", "AJI", "Dice", "found", "validation"], rows), "",
            "![learning curve](learning_curve.png)", ""]

    out += ["## Paired differences: arm − real", "",
            ("Per seed, the mean over the same test images of arm − real; mean and 95 % CI over seeds (Student t); "
             "p: Wilcoxon signed-rank over test images of the per-image differences averaged over seeds (— below "
             f"{MIN_WILCOXON_IMAGES} images or all zero); seeds needed: for a 95 % CI half-width ≤ {delta:g} given "
             "this run's sd."), ""]
    rows = []
    for _, r in diffs.iterrows():
        note = f"comparison void: {r['void_reason']}" if r["void"] else ""
        rows.append([_k_label(r["k"], n_all), r["arm"], r["metric"].upper(), str(r["n_seeds"]), _signed(r["mean"]),
                     _ci(r["ci_low"], r["ci_high"], signed=True), _f(r["wilcoxon_p"], 4),
                     str(int(r["seeds_needed"])) if _finite(r["seeds_needed"]) else "—", note])
    out += [_md_table(["k", "arm", "metric", "seeds", "mean", "95 % CI", "p", "seeds needed", ""], rows)
            if rows else "No arm besides real: nothing to compare.", ""]

    out += ["## Validation", "", "![validation PQ](validation.png)", ""]
    rising = [r for r in runs if r.train["rising"]]
    if rising:
        out += [f"- k = {_k_label(r.k, n_all)}, seed {r.seed}, {r.arm}: validation PQ still rising in the last "
                "quarter of training; every comparison with it at this k is void." for r in rising]
    else:
        out += ["No run's validation PQ was still rising in the last quarter of training."]
    out += [""]

    if not generators.empty:
        out += ["## The generators of each regime", "",
                "Mean over seeds (range in brackets) of each regime's evaluations against the test slides: the KS "
                "statistic of synthetic vs real masks per feature (0 = the same distribution; masks pass = the "
                "share of seeds whose every feature is under evaluate-masks' bar), the stain distance of the painted "
                "images (W1 / sd of real, lower is closer) and how many times closer than a flat-colour baseline, "
                "and the nucleus consistency of painted images relative to real ones (1 = as findable); where the "
                "optional Inception network is installed, FID and KID of the painted images against the test "
                "slides beside the floor (the other real train slides against the same test slides, same n).", ""]
        cols = [c for c in GENERATOR_COLUMNS if c in generators.columns]
        rows = []
        for k in sorted(set(generators["k"]), key=k_order):
            sub = generators[generators["k"] == k]
            cells = []
            for c in cols:
                v = pd.to_numeric(sub[c].astype(float) if c == "masks_pass" else sub[c], errors="coerce").dropna()
                cells.append("—" if v.empty else (_f(v.mean()) if len(v) == 1 or v.min() == v.max()
                                                   else f"{_f(v.mean())} [{_f(v.min())}, {_f(v.max())}]"))
            rows.append([_k_label(k, n_all), str(sub["seed"].nunique()), *cells])
        out += [_md_table(["k", "seeds", *[GENERATOR_COLUMNS[c] for c in cols]], rows), ""]

    out += ["## Cost", "",
            "Mean over seeds, in minutes: training wall time, CPU-minutes (× threads) or GPU-minutes, and the "
            "generator trainings (GAN, β-VAE) of the same k and seed, counted for every arm that uses synthetic "
            "data" + ("" if generator_given else " (no generator logs were given: —)") + ".", ""]
    rows = [[_k_label(r["k"], n_all), r["arm"], str(r["n_seeds"]), _f(r["train_minutes"], 1),
             _f(r["cpu_minutes"], 1), _f(r["gpu_minutes"], 1), _f(r["generator_minutes"], 1),
             _f(r["total_minutes"], 1)] for _, r in costs.iterrows()]
    out += [_md_table(["k", "arm", "seeds", "train", "CPU", "GPU", "generator", "total"], rows), ""]

    out += ["## What this run can and cannot show", ""]
    pq = diffs[diffs["metric"] == "pq"]
    for k in ks:
        sub = pq[pq["k"] == k]
        if sub.empty:
            continue
        n = sorted(set(sub["n_seeds"]))
        halves = sub["half_width"].dropna()
        label = _k_label(k, n_all)
        if halves.empty:
            out.append(f"- k = {label}: one seed, so no confidence interval over seeds; training noise is not "
                       "measured and no difference is resolved.")
            continue
        need = sub["seeds_needed"].dropna()
        span = (f"{_f(halves.min())}" if len(halves) == 1 or halves.min() == halves.max()
                else f"{_f(halves.min())}–{_f(halves.max())}")
        out.append(f"- k = {label}: with {'/'.join(map(str, n))} seeds the 95 % CI half-width of the PQ "
                   f"differences is {span}; differences smaller than that are not resolved."
                   + (f" A half-width ≤ {delta:g} would take up to {int(need.max())} seeds." if len(need) else ""))
    if goal["checked"]:
        verdict = "met" if goal["met"] else "not met"
        parts = [f"{c['arm']} at k = {c['k']}: {_signed(c['mean'])} {_ci(c['ci_low'], c['ci_high'], signed=True)}"
                 + (" (void: still rising)" if c["void"] else "") for c in goal["checked"]]
        out.append(f"- Goal (at k ≤ {GOAL_MAX_K}, real+synthetic or synthetic-then-real beats real by ≥ {delta:g} "
                   f"PQ with the CI above 0): **{verdict}** — " + "; ".join(parts) + ".")
    else:
        out.append(f"- Goal (at k ≤ {GOAL_MAX_K}, real+synthetic or synthetic-then-real beats real by ≥ {delta:g} "
                   "PQ): not tested, those arms or k are not in this run.")
    if goal["synthetic_share"]:
        parts = [f"k = {_k_label(s['k'], n_all)}: {_f(s['synthetic_pq'])} / {_f(s['real_pq'])} = "
                 f"{100 * s['ratio']:.0f} % ({'reaches' if s['reaches'] else 'does not reach'})"
                 for s in goal["synthetic_share"]]
        out.append(f"- Synthetic alone vs {100 * SYNTHETIC_SHARE:.0f} % of real's PQ: " + "; ".join(parts) + ".")
    else:
        out.append("- Synthetic alone vs real: not tested, the synthetic arm is not in this run.")
    for d in diagnosis:
        gap = ("painted-real − real: the cost of the generator's images on the real masks"
               if d["measures"] == "image realism" else
               "synthetic − painted-real: sampled masks in place of the real ones, under the same painter")
        out.append(f"- Diagnosis, {d['measures']} at k = {_k_label(d['k'], n_all)} ({gap}): PQ {_signed(d['mean'])} "
                   f"{_ci(d['ci_low'], d['ci_high'], signed=True)} over {d['n_seeds']} seeds"
                   + (f" (comparison void: {d['void_reason']})" if d["void"] else "") + ".")
    out += [("- The scores are on the test slides of this data set only: they say nothing about other "
             "scanners, stains or tissues, and a difference within its CI is not evidence of no difference."), ""]
    out += ["Files: runs.csv (one row per run), means.csv, differences.csv, cost.csv, generators.csv, "
            "evidence.json.", ""]
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def build_evidence_report(
    runs: Sequence[tuple[str, str | os.PathLike]],
    out_dir: str | os.PathLike,
    *,
    delta: float = 0.02,
    generator_logs: Sequence[tuple[str, str, str | os.PathLike]] = (),
    evaluations: Sequence[tuple[str, str, str, str | os.PathLike]] = (),
) -> dict[str, Any]:
    """Write the evidence report (see the module docstring) of ``runs``, (k, run folder) pairs, into ``out_dir``.

    ``generator_logs`` are (k, seed, log.csv) of the generator trainings whose ``seconds`` count toward the
    cost of every arm but real at that k and seed; ``evaluations`` are (k, seed, 'masks' | 'images',
    evaluation.json) of the regime's synthetic masks and images (:func:`read_evaluations`), reported per k
    and in ``generators.csv``. Returns what ``evidence.json`` holds.
    """
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise HistosynthError(f"delta must be a positive number, got {delta!r}")
    all_runs = read_runs(runs)
    generator = read_generator_logs(generator_logs)
    have = {(r.k, r.seed) for r in all_runs}
    generators = read_evaluations(evaluations)
    evaluated = set(zip(generators["k"], generators["seed"])) if len(generators) else set()
    stray = sorted((set(generator) | evaluated) - have, key=lambda x: (k_order(x[0]), x[1]))
    if stray:
        raise HistosynthError("generator logs or evaluations for a k and seed without any run: "
                              + ", ".join(f"k {k} seed {s}" for k, s in stray))
    table = pd.DataFrame([r.row for r in all_runs])
    for col in ("steps", "best_step"):
        table[col] = table[col].round().astype("Int64")
    mean_table = means(table)
    diffs = differences(all_runs, delta)
    costs = cost(table, generator)
    goal = goal_check(diffs, table, delta)
    diagnosis = _diagnosis(all_runs, delta)
    n_all = all_slides(all_runs)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / name for name in ("runs.csv", "means.csv", "differences.csv", "cost.csv",
                                                "generators.csv", "learning_curve.png", "validation.png",
                                                "evidence.md", "evidence.json")}
    plot_learning_curve(table, files["learning_curve.png"], n_all)
    plot_validation(all_runs, files["validation.png"], n_all)
    atomic_csv(table, files["runs.csv"])
    atomic_csv(mean_table, files["means.csv"])
    atomic_csv(diffs.drop(columns=["per_seed"]), files["differences.csv"])
    atomic_csv(costs, files["cost.csv"])
    atomic_csv(generators, files["generators.csv"])
    text = _markdown(table, mean_table, diffs, costs, all_runs, goal, diagnosis, delta, n_all, bool(generator),
                     generators)
    atomic_write(files["evidence.md"], lambda tmp: tmp.write_text(text, encoding="utf-8"))

    result = _jsonable({
        "stage": "evidence_report", "out_dir": str(out_dir), "files": {n: str(p) for n, p in files.items()},
        "delta": float(delta), "k": sorted(set(table["k"]), key=k_order), "all_slides": n_all,
        "arms": sorted(set(table["arm"]), key=arm_order), "seeds": sorted(int(s) for s in set(table["seed"])),
        "n_runs": len(table), "rising": [{"k": r.k, "seed": r.seed, "arm": r.arm} for r in all_runs
                                         if r.train["rising"]],
        "means": mean_table.to_dict("records"), "differences": diffs.to_dict("records"),
        "cost": costs.to_dict("records"), "goal": goal, "diagnosis": diagnosis,
        "generators": generators.to_dict("records"),
    })
    atomic_write(files["evidence.json"],
                 lambda tmp: tmp.write_text(json.dumps(result, indent=2, allow_nan=False), encoding="utf-8"))
    log.info("evidence report written to %s: %d runs, k %s, %d arms; goal %s", out_dir, len(table),
             ", ".join(result["k"]), len(result["arms"]),
             {True: "met", False: "not met", None: "not tested"}[goal["met"]])
    return result
