"""Train HoVer-Net on real, synthetic or mixed patches, select it on real validation tiles, run it on any image.

:func:`train_segmenter` is the ``train_segmenter`` stage. Every arm gets the
same recipe, the same step budget, the same augmentation and the same
validation tiles; only where a batch's patches come from differs
(:data:`ARMS`):

- ``real`` — the TRAIN slides' real patch sets (minus the validation tiles);
- ``synthetic`` — the translated synthetic pairs only;
- ``real+synthetic`` — each patch of a batch comes from the synthetic pool
  with probability ``mix`` (default 0.5), else from the real one;
- ``synthetic-then-real`` — synthetic pairs for the first ``pretrain`` of
  the steps, then real patches (one optimizer, one schedule: the same total
  steps as every arm);
- ``painted-real`` — the GAN's painting of the train slides' own masks
  (``--synthetic`` = translate's output on the real patch sets), alone: it
  measures image realism apart from mask realism.

The real patch sets are given to every arm: their validation tiles
(:mod:`histosynth.segmentation.validation`, one spatial block per slide) are
never trained on; arms without real training data use them only to validate.

**Data.** Each step draws ``batch_size`` patches, a random ``input_size``
window of each (a patch smaller than the window is reflect-padded and the
padding is left out of the loss), a random flip / 90° rotation and the
augmentation of :mod:`histosynth.segmentation.augment` — a pure function of
(seed, step), read from the memory-mapped arrays. Targets
(:func:`histosynth.models.hovernet.hovernet_targets`) are computed on the
window and cropped to the network's output, as the official code does.

**Recipe.** Adam (betas 0.9, 0.999), the learning rate ×0.1 after
``lr_drop`` of the steps (the official schedule drops it half-way);
:func:`~histosynth.models.hovernet.hovernet_loss`. Every ``val_every`` steps
(and at the last) the model is scored on the validation tiles; the best by
validation PQ (the earliest of equals) is ``model.pt``.

**Files** (``out_dir``): ``model.pt`` (the best weights, architecture,
classes, arm, seed, its step, the validation scores;
``torch.load(weights_only=True)``), ``log.csv`` (the mean of each loss term
every ``log_every`` steps), ``validation.csv`` (step, PQ, AJI, Dice, DQ, SQ,
counts, seconds of each validation), ``train.json`` (what was trained: arm,
steps, best step and PQ, whether validation PQ was still rising in the last
quarter, seconds of training and of validation, threads, device, patches),
``checkpoint.pt`` (model, optimizer, RNG, logs, best weights; training
resumes from it — on the CPU a killed and resumed run ends with the same
weights as an uninterrupted one). The loop is
:class:`histosynth.training.StepLoop`, the patches a
:class:`histosynth.io.pool.PatchPool` per source; ``classes`` in the files is
the one class-map form ``{"1": "Epithelial", ...}``.

:func:`predict` runs a model over an image of any size with overlapping
windows and returns the stitched NP / HV / TP maps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_csv, atomic_write
from histosynth.io.labels import class_map_to_json, classes_of_patch_sets, read_class_map
from histosynth.io.patchset import patch_mpp
from histosynth.io.pool import PatchPool, dihedral, load_pool, max_type, pool_fingerprint, subset
from histosynth.models import hovernet as hn
from histosynth.models.checkpoint import atomic_torch_save, read_torch_checkpoint
from histosynth.segmentation.augment import Augment, augment_window
from histosynth.segmentation.validation import (
    VALIDATION_COLUMNS,
    effective_val_every,
    held_out_rows,
    spatial_holdout,
    still_rising,
)
from histosynth.training import StepLoop, autocast, choose_precision, grad_scaler, precision_name

log = logging.getLogger(__name__)

ARMS = ("real", "real+synthetic", "synthetic", "synthetic-then-real", "painted-real")
CHECKPOINT_FORMAT = "histosynth-hovernet"
CHECKPOINT_VERSION = 1
_RESUME_KEYS = ("arch", "arm", "mix", "pretrain_steps", "batch_size", "lr", "lr_drop", "seed", "input_size", "steps",
                "val_every", "augment", "data")


# -- checkpoints -----------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A segmenter ``model.pt`` / ``checkpoint.pt`` (``torch.load(weights_only=True)``), or one clear error."""
    return read_torch_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "segmenter")


@dataclass
class Segmenter:
    """A trained HoVer-Net in inference mode, with what it was trained on."""

    model: hn.HoVerNet
    arch: dict[str, Any]
    classes: dict[int, str]
    n_types: int
    arm: str
    seed: int
    step: int
    input_size: int
    output_size: int
    path: str
    mpp: float | None = None  # the µm/px of the real tiles it was trained on (None: older checkpoints)


def load_segmenter(path: str | os.PathLike, device: str | torch.device = "cpu") -> Segmenter:
    """The model of ``model.pt`` (or a training ``checkpoint.pt``) on ``device``, in eval mode."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = read_checkpoint(path)
    try:
        arch = dict(ckpt["arch"])
        model = hn.HoVerNet(**arch)
        model.load_state_dict(ckpt["model"], strict=True)
        seg = Segmenter(model=model, arch=arch, classes=read_class_map(ckpt["classes"], path),
                        n_types=int(ckpt["n_types"]), arm=str(ckpt["arm"]), seed=int(ckpt["seed"]),
                        step=int(ckpt["step"]), input_size=int(ckpt["input_size"]),
                        output_size=int(ckpt["output_size"]), path=os.fspath(path),
                        mpp=float(ckpt["mpp"]) if ckpt.get("mpp") else None)
    except (KeyError, TypeError, ValueError, RuntimeError, HistosynthError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HistosynthError(f"checkpoint does not fit the HoVer-Net architecture: {first}", path) from err
    model.to(device).eval()
    return seg


# -- data ------------------------------------------------------------------------------------------
def _window(arr: np.ndarray, y: int, x: int, size: int, mode: str) -> np.ndarray:
    """A ``size`` window of ``arr`` at (y, x), padded where it runs past the edge (reflect or zero)."""
    h, w = arr.shape[:2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + size, h), min(x + size, w)
    piece = np.asarray(arr[y0:y1, x0:x1])
    pad = [(y0 - y, y + size - y1), (x0 - x, x + size - x1)] + [(0, 0)] * (arr.ndim - 2)
    if not any(p for pair in pad for p in pair):
        return piece
    if mode == "reflect":
        return np.pad(piece, pad, mode="symmetric")
    return np.pad(piece, pad)


def sample_batch(pools: Sequence[PatchPool], weights: Sequence[float], batch_size: int, size: int, seed: int,
                 step: int, augment: Augment | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (B, S, S, 3) uint8, inst int32, types uint8, valid bool) for ``step``, a pure function of (seed, step).

    Each patch comes from pool ``i`` with probability ``weights[i]``. A window
    larger than a patch is centred on it at random offsets; ``valid`` marks
    the pixels that lie inside the patch. Each window is flipped / rotated at
    random, then augmented by ``augment`` (none: no more than that).
    """
    rng = np.random.default_rng([int(seed), 0x5E6, int(step)])
    which = rng.choice(len(pools), size=batch_size, p=np.asarray(weights, float) / sum(weights))
    imgs = np.empty((batch_size, size, size, 3), np.uint8)
    inst = np.empty((batch_size, size, size), np.int32)
    types = np.empty((batch_size, size, size), np.uint8)
    valid = np.empty((batch_size, size, size), bool)
    for b in range(batch_size):
        pool = pools[int(which[b])]
        k = int(rng.integers(0, len(pool)))
        s_idx, p_idx = pool.locate(np.array([k]))
        s, p = int(s_idx[0]), int(p_idx[0])
        h, w = pool.size
        # offsets of the window in patch coordinates: inside when the patch is larger, around it when smaller
        y = int(rng.integers(min(0, h - size), max(0, h - size) + 1))
        x = int(rng.integers(min(0, w - size), max(0, w - size) + 1))
        d = int(rng.integers(0, 8))
        ones = np.ones((h, w), bool)
        for out, arr, mode in ((imgs, pool.images[s][p], "reflect"), (inst, pool.inst[s][p], "zero"),
                               (types, pool.types[s][p], "zero"), (valid, ones, "zero")):
            out[b] = dihedral(_window(arr, y, x, size, mode), d)
        if augment is not None and augment.enabled:
            imgs[b], inst[b], types[b], valid[b] = augment_window(imgs[b], inst[b], types[b], valid[b], augment, rng)
    return imgs, inst, types, valid


def batch_targets(inst: np.ndarray, types: np.ndarray, valid: np.ndarray, out_size: int, n_types: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """HoVer-Net targets of a batch (computed on the window, cropped to the output) as tensors."""
    per = [hn.hovernet_targets(inst[b], types[b] if n_types else None) for b in range(len(inst))]
    out: dict[str, torch.Tensor] = {}
    for key in per[0]:
        stacked = np.stack([hn.center_crop(np.asarray(t[key]), out_size) for t in per])
        out[key] = torch.from_numpy(np.ascontiguousarray(stacked)).to(device)
    out["valid"] = torch.from_numpy(np.ascontiguousarray(hn.center_crop(valid, out_size))).to(device)
    return out


def to_input(imgs: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [0, 1] (HoVer-Net's input scaling)."""
    return torch.from_numpy(np.ascontiguousarray(imgs)).to(device).permute(0, 3, 1, 2).float() / 255.0


def learning_rate(step: int, lr: float, steps: int, lr_drop: float) -> float:
    return lr if step < int(round(lr_drop * steps)) else lr * 0.1


# -- training ----------------------------------------------------------------------------------------
@dataclass
class ArmData:
    """The pools an arm trains on, its batch mix at each step, and the real validation tiles."""

    pools: list[PatchPool]
    names: list[str]  # "real" / "synthetic" per pool
    mix: float
    pretrain_steps: int  # synthetic-then-real: steps on the synthetic pool before the real one
    val: PatchPool
    paths: list[str]  # every patch set read (the class map comes from their reports)
    slides: list[str]  # the real (train) slides

    def weights(self, step: int) -> list[float]:
        """The chance of each pool for a batch patch at ``step`` (0-based)."""
        if self.pretrain_steps:  # synthetic-then-real
            return [0.0, 1.0] if step < self.pretrain_steps else [1.0, 0.0]
        if self.names == ["real", "synthetic"]:
            return [1.0 - self.mix, self.mix]
        return [1.0]


def check_arm(arm: str, mix: float = 0.5, pretrain: float = 0.5) -> None:
    """One clear error for an arm name that does not exist or a mix / pretrain share out of range."""
    if arm not in ARMS:
        raise HistosynthError(f"arm must be one of {', '.join(ARMS)}; got {arm!r}")
    if not 0.0 <= mix <= 1.0:
        raise HistosynthError(f"mix (the synthetic share of a real+synthetic batch) must be in [0, 1], got {mix}")
    if not 0.0 < pretrain < 1.0:
        raise HistosynthError(f"pretrain (the synthetic share of synthetic-then-real's steps) must be in (0, 1), "
                              f"got {pretrain}")


def arm_data(arm: str, real: Sequence[str | os.PathLike], synthetic: Sequence[str | os.PathLike], *,
             mix: float = 0.5, pretrain: float = 0.5, steps: int = 1, val_fraction: float = 0.2,
             val_overlap: int = 8) -> ArmData:
    """Open an arm's patch sets, hold out the validation tiles of the real ones, and check what it needs."""
    check_arm(arm, mix, pretrain)
    if not real:
        raise HistosynthError(f"arm {arm!r} needs the real patch sets of the train slides (its validation tiles "
                              "come from them)")
    trains_real = arm in ("real", "real+synthetic", "synthetic-then-real")
    needs_synth = arm != "real"
    if needs_synth and not synthetic:
        raise HistosynthError(f"arm {arm!r} needs synthetic patch sets (--synthetic)")
    if not needs_synth and synthetic:
        raise HistosynthError(f"arm {arm!r} trains on real data only; synthetic patch sets were given")
    real_pool = load_pool(real)
    holdout = spatial_holdout(real_pool.indexes, val_fraction, val_overlap, names=[os.fspath(p) for p in real])
    pools, names = [], []
    if trains_real:
        pools.append(subset(real_pool, holdout.train))
        names.append("real")
    if needs_synth:
        synth = load_pool(synthetic)
        inside = [held_out_rows(index, holdout.keys) for index in synth.indexes]
        n_out = int(sum(m.sum() for m in inside))
        if n_out:
            log.info("%d synthetic patches sit at validation tiles of the train slides (painted from their "
                     "masks): left out of training", n_out)
        synth = subset(synth, [np.flatnonzero(~m) for m in inside])
        if not len(synth):
            raise HistosynthError("every synthetic patch sits at a validation tile; nothing is left to train on: "
                                  + ", ".join(map(os.fspath, synthetic)))
        pools.append(synth)
        names.append("synthetic")
    pretrain_steps = int(round(pretrain * steps)) if arm == "synthetic-then-real" else 0
    return ArmData(pools=pools, names=names, mix=float(mix) if arm == "real+synthetic" else 0.0,
                   pretrain_steps=pretrain_steps, val=subset(real_pool, holdout.val),
                   paths=[os.fspath(p) for p in (*real, *synthetic)],
                   slides=sorted({str(s) for index in real_pool.indexes for s in index["slide"]}))


def pool_mpp(pool: PatchPool) -> float | None:
    """The median µm/px of a pool's patches (None when no index records it): the model's resolution."""
    values = [m for index in pool.indexes for m in (patch_mpp(index, i) for i in range(len(index))) if m]
    return float(np.median(values)) if values else None


def validation_scores(seg: Segmenter, pool: PatchPool, *, batch: int = 4) -> dict[str, float]:
    """PQ, AJI, Dice, DQ, SQ (means over the tiles) and nucleus counts of ``seg`` on the tiles of ``pool``."""
    from histosynth.models.hovernet import postprocess, sizes_at
    from histosynth.segmentation.metrics import MetricAccumulator

    acc = MetricAccumulator()
    n_true = n_pred = 0
    was_training = seg.model.training
    seg.model.eval()
    try:
        s_idx, p_idx = pool.locate(np.arange(len(pool)))
        for s, p in zip(s_idx.tolist(), p_idx.tolist()):
            maps = predict(seg, np.asarray(pool.images[s][p]), batch=batch)
            inst, _ = postprocess(maps["np"], maps["hv"], **sizes_at(patch_mpp(pool.indexes[s], p)))
            true = np.asarray(pool.inst[s][p])
            acc.add(inst, true)
            n_true += len(np.unique(true[true > 0]))
            n_pred += len(np.unique(inst[inst > 0]))
    finally:
        seg.model.train(was_training)
    summary = acc.summary()
    return {**{k: float(summary.get(k, float("nan"))) for k in ("pq", "aji", "dice", "dq", "sq")},
            "n_true": n_true, "n_pred": n_pred}


def train_segmenter(
    real: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    arm: str = "real",
    synthetic: Sequence[str | os.PathLike] = (),
    mix: float = 0.5,
    pretrain: float = 0.5,
    mode: str = "fast",
    width: int = 64,
    units: Sequence[int] = (3, 4, 6, 3),
    padding: str = "valid",
    input_size: int | None = None,
    steps: int = 20000,
    batch_size: int = 8,
    lr: float = 1e-4,
    lr_drop: float = 0.5,
    val_fraction: float = 0.2,
    val_overlap: int = 8,
    val_every: int = 500,
    rising_tolerance: float = 0.01,
    augment: Augment | None = None,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = 4,
    checkpoint_every: int = 500,
    log_every: int = 10,
    precision: str = "auto",
    classes: dict[str, int] | dict[int, str] | None = None,
    resume: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train one arm's HoVer-Net into ``out_dir`` (see the module docstring); returns what train.json holds.

    ``input_size`` defaults to the mode's (fast 256, original 270). ``augment`` defaults to the schema's
    (:class:`histosynth.segmentation.augment.Augment`); ``Augment(0, 0, 0, 0, 0)`` is none. ``classes`` is a class
    map in any form :func:`histosynth.io.labels.read_class_map` reads; by default it is read from the patch sets'
    report.json.
    """
    from histosynth.device import select_device

    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("width", width, 1),
                             ("checkpoint_every", checkpoint_every, 1), ("log_every", log_every, 1),
                             ("val_every", val_every, 1)):
        if int(value) < low:
            raise HistosynthError(f"{name} must be at least {low}, got {value}")
    if not lr > 0 or not 0.0 <= lr_drop <= 1.0:
        raise HistosynthError(f"lr must be > 0 and lr_drop in [0, 1], got lr={lr}, lr_drop={lr_drop}")
    if mode not in hn.MODES:
        raise HistosynthError(f"mode must be one of {hn.MODES}, got {mode!r}")
    augment = Augment() if augment is None else augment
    input_size = int(input_size or hn.INPUT_SIZE[mode])
    data = arm_data(arm, real, synthetic, mix=mix, pretrain=pretrain, steps=steps, val_fraction=val_fraction,
                    val_overlap=val_overlap)
    pools = data.pools
    val_every = effective_val_every(int(val_every), int(steps))
    class_map = read_class_map(classes, "classes") if classes else classes_of_patch_sets(data.paths)
    train_mpp = pool_mpp(data.val)
    n_types = max([*(max_type(p) for p in pools), *class_map.keys()], default=0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = select_device(device, threads)
    arch = {"n_types": int(n_types) or None, "mode": mode, "width": int(width),
            "units": [int(u) for u in units], "padding": padding}

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = hn.HoVerNet(**arch).to(dev)
        out_size = int(model.output_size(input_size))  # a HistosynthError names an input size that cannot work
        settings: dict[str, Any] = {
            "arch": arch, "arm": arm, "mix": data.mix if arm == "real+synthetic" else None,
            "pretrain_steps": data.pretrain_steps, "batch_size": int(batch_size), "lr": float(lr),
            "lr_drop": float(lr_drop), "seed": int(seed), "input_size": input_size, "output_size": out_size,
            "steps": int(steps), "val_every": val_every, "augment": dataclasses.asdict(augment),
            "data": "|".join(pool_fingerprint(pool) for pool in (*pools, data.val)),
            "patch_sets": data.paths,
        }
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))

        def probe(dtype: torch.dtype | None) -> None:
            import copy

            m = copy.deepcopy(model)
            x = torch.rand(min(batch_size, 2), 3, input_size, input_size, device=dev)
            with autocast(dev, dtype):
                loss = sum(v.float().mean() for v in m(x).values())
            loss.backward()

        amp_dtype = choose_precision(precision, dev, probe)
        scaler = grad_scaler(amp_dtype)
        settings["precision"] = precision_name(amp_dtype)

        loop = StepLoop(out_dir, total=steps, checkpoint_every=checkpoint_every, log_every=log_every, device=dev,
                        settings=settings, keys=_RESUME_KEYS, reader=read_checkpoint, required="optimizer",
                        resume=resume, scaler=scaler, desc=f"train-segmenter {arm}", progress=progress)
        val_rows: list[dict[str, Any]] = []
        best: dict[str, Any] = {"step": 0, "pq": -1.0, "model": None}
        if loop.ckpt is not None:
            model.load_state_dict(loop.ckpt["model"])
            optimizer.load_state_dict(loop.ckpt["optimizer"])
            val_rows = [dict(r) for r in loop.ckpt.get("validation", [])]
            best = dict(loop.ckpt.get("best") or best)
        seg = Segmenter(model=model, arch=arch, classes=class_map, n_types=int(n_types), arm=arm, seed=int(seed),
                        step=0, input_size=input_size, output_size=out_size, path=os.fspath(out_dir))

        def weights_now() -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        def model_dict(weights: dict[str, torch.Tensor], step: int, **extra: Any) -> dict[str, Any]:
            return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": weights,
                    "arch": arch, "classes": class_map_to_json(class_map), "n_types": int(n_types), "arm": arm,
                    "seed": int(seed), "step": int(step), "input_size": input_size, "output_size": out_size,
                    "mpp": train_mpp, "train": settings, "validation": [dict(r) for r in val_rows], **extra}

        def train_step(step: int) -> tuple[dict[str, float], float]:
            imgs, inst, types, valid = sample_batch(pools, data.weights(step), batch_size, input_size, seed, step,
                                                    augment=augment)
            targets = batch_targets(inst, types, valid, out_size, n_types, dev)
            rate = learning_rate(step, lr, steps, lr_drop)
            for group in optimizer.param_groups:
                group["lr"] = rate
            with autocast(dev, amp_dtype):
                outputs = model(to_input(imgs, dev))
            loss, parts = hn.hovernet_loss({k: v.float() for k, v in outputs.items()}, targets,
                                           valid=targets["valid"])
            values = {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
            loop.check_finite(values)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return values, rate

        def validate(step: int) -> None:
            if step % val_every and step != steps:
                return
            t0 = time.perf_counter()
            scores = validation_scores(seg, data.val)
            row = {"step": step, **scores, "seconds": time.perf_counter() - t0}
            loop.log.exclude(row["seconds"])  # log.csv times the training steps alone
            val_rows.append(row)
            atomic_csv(pd.DataFrame(val_rows, columns=VALIDATION_COLUMNS), out_dir / "validation.csv")
            if row["pq"] > best["pq"]:
                best.update(step=step, pq=row["pq"], model=weights_now())
            log.info("step %d: validation PQ %.4f, AJI %.4f, Dice %.4f (%d of %d nuclei predicted); best %.4f at "
                     "step %d", step, row["pq"], row["aji"], row["dice"], row["n_pred"], row["n_true"],
                     best["pq"], best["step"])

        log.info("training HoVer-Net (%s mode, width %d, units %s, %d types) arm %s seed %d on %s patches, "
                 "validated on %d real tiles every %d steps; %d steps of batch %d at %d px -> %d px on %s (%s)%s",
                 mode, width, list(units), n_types, arm, seed,
                 " + ".join(f"{len(p)} {n}" for p, n in zip(pools, data.names)), len(data.val), val_every, steps,
                 batch_size, input_size, out_size, dev, settings["precision"],
                 "" if augment.enabled else ", no augmentation")
        t_start = time.perf_counter()
        model.train()
        loop.run(train_step, lambda: {**model_dict(weights_now(), loop.step, optimizer=optimizer.state_dict()),
                                      "best": dict(best)},
                 after_step=validate, postfix=lambda row: {"loss": f"{row['loss']:.3f}"})
        seconds = time.perf_counter() - t_start
        if best["model"] is None:  # resumed at the last step with no validation on record: score it now
            validate(steps)
        # written again at the end: a run resumed from the checkpoint of a finished one (Snakemake reruns it and
        # deletes its outputs when an input's date changes) validates nothing, and must still leave the file
        atomic_csv(pd.DataFrame(val_rows, columns=VALIDATION_COLUMNS), out_dir / "validation.csv")
        atomic_torch_save(model_dict(best["model"], best["step"]), out_dir / "model.pt")
        steplog = loop.log
        steplog.write()
    val_seconds = float(sum(r["seconds"] for r in val_rows))
    rising = still_rising(val_rows, steps, rising_tolerance)
    final = steplog.rows[-1] if steplog.rows else {}
    report = {"stage": "train_segmenter", "out_dir": str(out_dir), "arm": arm, "seed": int(seed),
              "steps": int(steps), "best_step": int(best["step"]), "best_pq": float(best["pq"]), "rising": rising,
              "rising_tolerance": float(rising_tolerance),
              "patches": {n: len(p) for n, p in zip(data.names, pools)} | {"validation": len(data.val)},
              "slides": data.slides,
              "n_types": int(n_types), "precision": settings["precision"], "device": str(dev),
              "threads": int(threads or torch.get_num_threads()),
              "seconds": float(sum(r["seconds"] for r in steplog.rows)),
              "validation_seconds": val_seconds, "wall_seconds": seconds,
              "seconds_per_step": steplog.seconds_per_step(), "loss": final.get("loss", float("nan")),
              "augment": dataclasses.asdict(augment)}
    atomic_write(out_dir / "train.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=float)))
    log.info("HoVer-Net written to %s: the step-%d weights (validation PQ %.4f)%s; final loss %.4f; %.3f s per "
             "step", out_dir / "model.pt", best["step"], best["pq"],
             "; VALIDATION PQ STILL RISING in the last quarter: train longer" if rising else "", report["loss"],
             report["seconds_per_step"])
    return report


# -- inference ---------------------------------------------------------------------------------------
def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every ``stride``, the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def network_margin(seg: Segmenter) -> int:
    """Pixels of input context the network needs on each side of the pixels it predicts."""
    trim = seg.input_size // 8 if seg.arch.get("padding") == "same" else 0
    return (seg.input_size - (seg.output_size - 2 * trim)) // 2


def predict(seg: Segmenter, image: np.ndarray, *, overlap: int = 0, batch: int = 4,
            amp_dtype: torch.dtype | None = None, context: int = 0) -> dict[str, np.ndarray]:
    """NP probability (H, W), HV (2, H, W) and TP probabilities (T+1, H, W) for an RGB image of any size.

    The image is reflect-padded by the network's margin and covered by
    output-sized windows that overlap by ``overlap`` pixels (default 0: the
    windows tile the image, each with its input context, as HoVer-Net's own
    inference does; the last one of a row or column is flush with the edge);
    overlapping predictions are averaged. A
    same-padded network (output = input) keeps only the centre of each
    window, an eighth of the side in from every edge, so that every pixel
    kept saw context on all sides.

    ``context``: the outer ``context`` pixels on each side of ``image`` are
    real surroundings, not to be predicted: the maps cover
    ``image[context:-context, context:-context]`` and the windows see those
    pixels instead of a mirror image where the network needs context (whole-
    slide inference reads each tile with :func:`network_margin` of them).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise HistosynthError(f"predict needs an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    model = seg.model
    device = next(model.parameters()).device
    s_in = seg.input_size
    trim = s_in // 8 if seg.arch.get("padding") == "same" else 0  # drop the border that saw zero padding
    s_out = seg.output_size - 2 * trim
    margin = network_margin(seg)
    overlap = int(overlap)
    if not 0 <= overlap < s_out:
        raise HistosynthError(f"overlap must be in [0, {s_out}) for a {s_out}-px output, got {overlap}")
    context = int(context)
    if context < 0 or 2 * context >= min(image.shape[:2]):
        raise HistosynthError(f"context must leave pixels to predict: {context} px around a {image.shape[1]}x"
                              f"{image.shape[0]} image")
    keep = min(context, margin)  # real context used; a mirror image supplies the rest
    cut = context - keep
    if cut:
        image = image[cut : image.shape[0] - cut, cut : image.shape[1] - cut]
    h, w = image.shape[0] - 2 * keep, image.shape[1] - 2 * keep
    big_h, big_w = max(h, s_out), max(w, s_out)
    pad = margin - keep
    padded = np.pad(image, ((pad, pad + big_h - h), (pad, pad + big_w - w), (0, 0)), mode="symmetric")
    ys, xs = _starts(big_h, s_out, s_out - overlap), _starts(big_w, s_out, s_out - overlap)
    windows = [(y, x) for y in ys for x in xs]
    sums: dict[str, np.ndarray] = {}
    count = np.zeros((big_h, big_w), np.float32)
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            chunk = windows[i : i + batch]
            x_in = np.stack([padded[y : y + s_in, x : x + s_in] for y, x in chunk])
            with autocast(device, amp_dtype):
                out = model(to_input(x_in, device))
            if trim:
                out = {k: v[..., trim : trim + s_out, trim : trim + s_out] for k, v in out.items()}
            maps = {"np": torch.softmax(out["np"].float(), 1)[:, 1:2], "hv": out["hv"].float()}
            if "tp" in out:
                maps["tp"] = torch.softmax(out["tp"].float(), 1)
            for key, value in maps.items():
                arr = value.cpu().numpy()
                acc = sums.setdefault(key, np.zeros((arr.shape[1], big_h, big_w), np.float32))
                for (y, x), a in zip(chunk, arr):
                    acc[:, y : y + s_out, x : x + s_out] += a
            for y, x in chunk:
                count[y : y + s_out, x : x + s_out] += 1
    result = {k: (v / count)[:, :h, :w] for k, v in sums.items()}
    result["np"] = result["np"][0]
    return result
