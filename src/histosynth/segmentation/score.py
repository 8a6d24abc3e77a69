"""Score a trained HoVer-Net on held-out patch sets: the ``score`` stage.

:func:`score` runs :func:`histosynth.segmentation.segmenter.predict` (overlapping windows,
so images larger than the network's patch are covered) and
:func:`histosynth.models.hovernet.postprocess` on every patch of the test
patch sets and compares the instances with the true masks
(:mod:`histosynth.segmentation.metrics`). It writes into ``out_dir``:

- ``scores.csv`` — one row per image: arm, seed, slide, x, y, patch index,
  Dice, AJI, AJI+, DQ, SQ, PQ, n_true, n_pred (and mPQ when typed);
- ``summary.json`` — the means over images, the type-aware mPQ (PanNuke) and
  multi-class PQ (CoNIC) with their per-class values, counts and timings;
- ``overlay.png`` — a few test images with true (yellow) and predicted
  (cyan) outlines.

A test set without any nucleus, or with types the model was not trained
on, is an error rather than a meaningless score.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.atomic import atomic_csv, atomic_write
from histosynth.io.labels import report_class_map, same_classes
from histosynth.io.patchset import PatchSet, patch_mpp, read_paired_sets

log = logging.getLogger(__name__)


def open_test_sets(paths: Sequence[str | os.PathLike]) -> list[PatchSet]:
    """The test patch sets (images, inst and types), checked to hold at least one nucleus."""
    sets = read_paired_sets(paths, "test patch sets")
    if not any(_any_nucleus(ps.inst) for ps in sets):
        raise HistosynthError("the test patch sets hold no nuclei, so there is nothing to score: "
                              + ", ".join(str(ps.path) for ps in sets))
    return sets


def _any_nucleus(inst: np.ndarray) -> bool:
    return any(bool(inst[i : i + 64].any()) for i in range(0, len(inst), 64))


def check_types(model_classes: dict[int, str], model_types: int, sets: Sequence[PatchSet]) -> None:
    """Refuse test masks whose type ids mean other classes than the model's, or that it never learned."""
    for ps in sets:
        theirs = report_class_map(ps.report, ps.path / "report.json")
        if theirs and model_classes:
            if not same_classes(theirs, model_classes):
                raise HistosynthError(f"the test masks' types {theirs} are not the ones the model was trained with "
                                      f"{model_classes}", ps.path)
        top = max((int(ps.types[i : i + 64].max()) for i in range(0, len(ps), 64)), default=0)
        if top > max(model_types, 1):
            raise HistosynthError(f"the test masks use type {top} but the model knows types 1..{model_types}",
                                  ps.path)


def score(
    model_path: str | os.PathLike,
    patch_sets: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    overlap: int = 0,
    batch: int = 4,
    device: str = "auto",
    threads: int | None = 1,
    n_overlays: int = 4,
    precision: str = "float32",
) -> dict[str, Any]:
    """Score the model of ``model_path`` on ``patch_sets`` into ``out_dir``; returns the summary."""
    import torch

    from histosynth.device import select_device
    from histosynth.segmentation.metrics import MetricAccumulator
    from histosynth.models.hovernet import postprocess, sizes_at, type_map
    from histosynth.segmentation.segmenter import load_segmenter, predict

    dev = select_device(device, threads)
    seg = load_segmenter(model_path, dev)
    sets = open_test_sets(patch_sets)
    check_types(seg.classes, seg.n_types, sets)
    amp = {"float32": None, "bf16": torch.bfloat16}.get(precision, "bad")
    if amp == "bad":
        raise HistosynthError(f"precision must be float32 or bf16, got {precision!r}")
    typed = seg.n_types > 1
    acc = MetricAccumulator(classes=sorted(seg.classes) or range(1, seg.n_types + 1) if typed else None)
    rows: list[dict[str, Any]] = []
    overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
    total = sum(len(ps) for ps in sets)
    picks = set(np.linspace(0, total - 1, min(n_overlays, total)).round().astype(int).tolist())
    t0 = time.perf_counter()
    k = 0
    for ps in sets:
        for i in range(len(ps)):
            image = np.asarray(ps.images[i])
            maps = predict(seg, image, overlap=overlap, batch=batch, amp_dtype=amp)
            inst, inst_types = postprocess(maps["np"], maps["hv"], maps.get("tp"), **sizes_at(patch_mpp(ps.index, i)))
            true_inst = np.asarray(ps.inst[i])
            metrics = acc.add(inst, true_inst, pred_types=type_map(inst, inst_types or {}) if typed else None,
                              true_types=np.asarray(ps.types[i]) if typed else None)
            row = ps.index.iloc[i]
            rows.append({"arm": seg.arm, "seed": seg.seed, "slide": row["slide"], "x": int(row["x"]),
                         "y": int(row["y"]), "patch": i, "set": ps.path.name, **metrics})
            if k in picks:
                overlays.append((image, true_inst, inst, f"{row['slide']} ({int(row['x'])}, {int(row['y'])})"))
            k += 1
    seconds = time.perf_counter() - t0
    summary = {"stage": "score", "model": os.fspath(model_path), "arm": seg.arm, "seed": seg.seed,
               "step": seg.step, "n_images": len(rows), "seconds": seconds,
               "seconds_per_image": seconds / max(1, len(rows)), **acc.summary()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_overlays(overlays, out_dir / "overlay.png", title=f"{seg.arm}, seed {seg.seed}: true (yellow) vs "
                                                            "predicted (cyan)")
    atomic_write(out_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=float)))
    atomic_csv(pd.DataFrame(rows), out_dir / "scores.csv")
    log.info("scored %s (%s, seed %d) on %d images in %.1f s: PQ %.3f, AJI %.3f, Dice %.3f", model_path, seg.arm,
             seg.seed, len(rows), seconds, summary.get("pq", float("nan")), summary.get("aji", float("nan")),
             summary.get("dice", float("nan")))
    return summary


def plot_overlays(items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: Path,
                  title: str = "") -> Path:
    """Images with true (yellow) and predicted (cyan) instance outlines, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    n = max(1, len(items))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.5), squeeze=False)
    for ax, (image, true, pred, name) in zip(axes[0], items):
        over = image.copy()
        over[find_boundaries(true, mode="inner")] = (255, 220, 0)
        over[find_boundaries(pred, mode="inner")] = (0, 220, 255)
        ax.imshow(over, interpolation="nearest")
        ax.set_title(name, fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
