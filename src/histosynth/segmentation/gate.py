"""A quality gate on painted pairs: keep a synthetic pair only when a real-trained segmenter finds its nuclei.

A painted image whose nuclei do not look like nuclei teaches a segmenter the
wrong label: the mask says "nucleus" where the image shows none. The gate
(``gate.enabled``, off by default; the ``gate_pairs`` rule) runs the HoVer-Net
of the ``real`` arm — trained on real tiles only, never on a test slide — on
every painted image of a shard, post-processes it as ``score`` does
(:func:`histosynth.models.hovernet.sizes_at` the patch's resolution), and
scores the prediction against the mask the image was painted from. A pair is
kept when that PQ is at least ``min_pq``; a pair whose mask holds no nucleus
is kept when nothing is predicted either. With ``keep_fraction`` (0 < f ≤ 1)
the gate is relative instead: the round(f · n) pairs of highest PQ are kept
(ties by the pair's order), whatever their PQ. A fixed ``min_pq`` depends on
how good the real arm's segmenter is: on the k = 1 regimes of
``config/evidence-cpu.yaml`` PQ ≥ 0.5 kept 57 of 200 pairs of one seed and
all 200 of another (docs/results.md), where a fraction keeps the same share.

It writes the kept pairs as a patch set (every array and index column, plus
``gate_pq``) with ``report.json`` counting what was kept and dropped and the
PQ quantiles of both; every dropped pair is counted and logged, and a gate
that would drop every pair is an error (there would be nothing left to
train on), not an empty set.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter, patch_mpp, read_paired_sets

log = logging.getLogger(__name__)


def gate_pairs(model_path: str | os.PathLike, pairs: str | os.PathLike, out_dir: str | os.PathLike, *,
               min_pq: float = 0.5, keep_fraction: float | None = None, batch: int = 4, device: str = "auto",
               threads: int | None = 1) -> dict[str, Any]:
    """Keep the pairs of ``pairs`` whose nuclei the segmenter of ``model_path`` finds (PQ >= ``min_pq``, or the
    ``keep_fraction`` of highest PQ)."""
    from histosynth.device import select_device
    from histosynth.models.hovernet import postprocess, sizes_at
    from histosynth.segmentation.metrics import MetricAccumulator
    from histosynth.segmentation.segmenter import load_segmenter, predict

    if not 0.0 <= float(min_pq) <= 1.0:
        raise HistosynthError(f"gate.min_pq must be in [0, 1], got {min_pq}")
    if keep_fraction is not None and not 0.0 < float(keep_fraction) <= 1.0:
        raise HistosynthError(f"gate.keep_fraction must be in (0, 1], got {keep_fraction}")
    if int(batch) < 1:
        raise HistosynthError(f"the batch must be at least 1, got {batch}")
    (ps,) = read_paired_sets([pairs], "painted pairs")
    dev = select_device(device, threads)
    seg = load_segmenter(model_path, dev)
    t0 = time.perf_counter()
    scores = np.empty(len(ps))
    for i in range(len(ps)):
        maps = predict(seg, np.asarray(ps.images[i]), batch=batch)
        inst, _ = postprocess(maps["np"], maps["hv"], None, **sizes_at(patch_mpp(ps.index, i)))
        true = np.asarray(ps.inst[i])
        if not true.any():
            scores[i] = 1.0 if not inst.any() else 0.0
            continue
        scores[i] = MetricAccumulator().add(inst, true)["pq"]
    if keep_fraction is not None:
        keep = np.zeros(len(ps), bool)
        keep[np.argsort(-scores, kind="stable")[:max(1, round(float(keep_fraction) * len(ps)))]] = True
    else:
        keep = scores >= float(min_pq)
    if not keep.any():
        raise HistosynthError(f"the gate (PQ >= {min_pq} by the real arm's segmenter {model_path}) drops every one "
                              f"of the {len(ps)} painted pairs (best PQ {scores.max():.3f}): lower gate.min_pq or "
                              "train the GAN longer", pairs)
    extra = tuple(c for c in ps.index.columns) + ("gate_pq",)
    with PatchSetWriter(out_dir, ("images", "inst", "types"), ps.inst.shape[1:3], extra_columns=extra) as w:
        for i in np.flatnonzero(keep):
            w.add({**ps.index.iloc[i].to_dict(), "gate_pq": round(float(scores[i]), 5)}, images=ps.images[i],
                  inst=ps.inst[i], types=ps.types[i])
        report = {
            **(ps.report or {}), "stage": "gate-pairs", "gated_from": os.fspath(pairs),
            "gate_model": os.fspath(model_path), "min_pq": None if keep_fraction is not None else float(min_pq),
            "keep_fraction": None if keep_fraction is None else float(keep_fraction), "pairs": int(len(ps)),
            "kept": int(keep.sum()), "dropped": int((~keep).sum()),
            "pq_quantiles": {"kept": _quantiles(scores[keep]), "dropped": _quantiles(scores[~keep])},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        w.report = report
    rule = f"the best {keep_fraction:g} by PQ" if keep_fraction is not None else f"PQ >= {min_pq:g}"
    log.info("gate: kept %d of %d painted pairs of %s (%s by %s), dropped %d; median PQ %.3f kept, %s dropped",
             report["kept"], report["pairs"], pairs, rule, model_path, report["dropped"],
             float(np.median(scores[keep])),
             f"{float(np.median(scores[~keep])):.3f}" if (~keep).any() else "none")
    return report


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {k: round(float(v), 4) for k, v in zip(("min", "q25", "median", "q75", "max"), q)}
