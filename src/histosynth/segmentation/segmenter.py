"""Train HoVer-Net on real, real + synthetic or synthetic patches, and run it on images of any size.

:func:`train_segmenter` is the ``train_segmenter`` stage. Every arm gets the
same recipe and the same step budget; only where a batch's patches come
from differs:

- ``real`` — the TRAIN slides' real patch sets;
- ``synthetic`` — the translated synthetic pairs only;
- ``real+synthetic`` — each patch of a batch comes from the synthetic pool
  with probability ``mix`` (default 0.5), else from the real one.

**Data.** Each step draws ``batch_size`` patches, a random ``input_size``
window of each (a patch smaller than the window is reflect-padded and the
padding is left out of the loss), a random flip / 90° rotation — a pure
function of (seed, step), read from the memory-mapped arrays. Targets
(:func:`histosynth.models.hovernet.hovernet_targets`) are computed on the
window and cropped to the network's output, as the official code does.

**Recipe.** Adam (lr 1e-4, betas 0.9, 0.999), the learning rate ×0.1 after
``lr_drop`` of the steps (the official schedule drops it half-way);
:func:`~histosynth.models.hovernet.hovernet_loss`.

**Files** (``out_dir``): ``model.pt`` (weights, architecture, classes, arm,
seed, step; ``torch.load(weights_only=True)``), ``log.csv`` (the mean of each
loss term every ``log_every`` steps), ``checkpoint.pt`` (model, optimizer,
RNG, log; training resumes from it — on the CPU a killed and resumed run ends
with the same weights as an uninterrupted one). The loop is
:class:`histosynth.training.StepLoop`, the patches a
:class:`histosynth.io.pool.PatchPool` per source; ``classes`` in the files is
the one class-map form ``{"1": "Epithelial", ...}``.

:func:`predict` runs a model over an image of any size with overlapping
windows and returns the stitched NP / HV / TP maps.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histosynth.errors import HistosynthError
from histosynth.io.labels import class_map_to_json, classes_of_patch_sets, read_class_map
from histosynth.io.pool import PatchPool, dihedral, load_pool, max_type, pool_fingerprint
from histosynth.models import hovernet as hn
from histosynth.models.checkpoint import atomic_torch_save, read_torch_checkpoint
from histosynth.training import StepLoop, autocast, choose_precision, grad_scaler, precision_name

log = logging.getLogger(__name__)

ARMS = ("real", "real+synthetic", "synthetic")
CHECKPOINT_FORMAT = "histosynth-hovernet"
CHECKPOINT_VERSION = 1
_RESUME_KEYS = ("arch", "arm", "mix", "batch_size", "lr", "lr_drop", "seed", "input_size", "steps", "data")


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
                        output_size=int(ckpt["output_size"]), path=os.fspath(path))
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
                 step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (B, S, S, 3) uint8, inst int32, types uint8, valid bool) for ``step``, a pure function of (seed, step).

    Each patch comes from pool ``i`` with probability ``weights[i]``. A window
    larger than a patch is centred on it at random offsets; ``valid`` marks
    the pixels that lie inside the patch.
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
def _pools_for(arm: str, real: Sequence[str | os.PathLike], synthetic: Sequence[str | os.PathLike],
               mix: float) -> tuple[list[PatchPool], list[float], list[str]]:
    if arm not in ARMS:
        raise HistosynthError(f"arm must be one of {ARMS}, got {arm!r}")
    if not 0.0 < mix < 1.0:
        raise HistosynthError(f"mix (the synthetic share of a real+synthetic batch) must be in (0, 1), got {mix}")
    need_real, need_synth = arm in ("real", "real+synthetic"), arm in ("synthetic", "real+synthetic")
    if need_real and not real:
        raise HistosynthError(f"arm {arm!r} needs real patch sets")
    if need_synth and not synthetic:
        raise HistosynthError(f"arm {arm!r} needs synthetic patch sets (--synthetic)")
    if not need_real and real:
        raise HistosynthError(f"arm {arm!r} trains on synthetic data only; real patch sets were given")
    if not need_synth and synthetic:
        raise HistosynthError(f"arm {arm!r} trains on real data only; synthetic patch sets were given")
    pools, weights, paths = [], [], []
    if need_real:
        pools.append(load_pool(real))
        weights.append(1.0 - mix if need_synth else 1.0)
        paths += [os.fspath(p) for p in real]
    if need_synth:
        pools.append(load_pool(synthetic))
        weights.append(mix if need_real else 1.0)
        paths += [os.fspath(p) for p in synthetic]
    return pools, weights, paths


def train_segmenter(
    real: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    arm: str = "real",
    synthetic: Sequence[str | os.PathLike] = (),
    mix: float = 0.5,
    mode: str = "fast",
    width: int = 64,
    units: Sequence[int] = (3, 4, 6, 3),
    input_size: int | None = None,
    steps: int = 2000,
    batch_size: int = 4,
    lr: float = 1e-4,
    lr_drop: float = 0.5,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = 1,
    checkpoint_every: int = 200,
    log_every: int = 10,
    precision: str = "auto",
    classes: dict[str, int] | dict[int, str] | None = None,
    resume: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train one arm's HoVer-Net into ``out_dir`` (see the module docstring); returns a report.

    ``input_size`` defaults to the mode's (fast 256, original 270). ``classes`` is a class map in any form
    :func:`histosynth.io.labels.read_class_map` reads; by default it is read from the patch sets' report.json.
    """
    from histosynth.device import select_device

    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("width", width, 1),
                             ("checkpoint_every", checkpoint_every, 1), ("log_every", log_every, 1)):
        if int(value) < low:
            raise HistosynthError(f"{name} must be at least {low}, got {value}")
    if not lr > 0 or not 0.0 <= lr_drop <= 1.0:
        raise HistosynthError(f"lr must be > 0 and lr_drop in [0, 1], got lr={lr}, lr_drop={lr_drop}")
    if mode not in hn.MODES:
        raise HistosynthError(f"mode must be one of {hn.MODES}, got {mode!r}")
    input_size = int(input_size or hn.INPUT_SIZE[mode])
    pools, weights, paths = _pools_for(arm, real, synthetic, mix)
    class_map = read_class_map(classes, "classes") if classes else classes_of_patch_sets(paths)
    n_types = max([*(max_type(p) for p in pools), *class_map.keys()], default=0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = select_device(device, threads)
    arch = {"n_types": int(n_types) or None, "mode": mode, "width": int(width),
            "units": [int(u) for u in units]}

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = hn.HoVerNet(**arch).to(dev)
        out_size = int(model.output_size(input_size))  # a HistosynthError names an input size that cannot work
        settings: dict[str, Any] = {
            "arch": arch, "arm": arm, "mix": float(mix) if arm == "real+synthetic" else None,
            "batch_size": int(batch_size), "lr": float(lr), "lr_drop": float(lr_drop), "seed": int(seed),
            "input_size": input_size, "output_size": out_size, "steps": int(steps),
            "data": "|".join(pool_fingerprint(pool) for pool in pools),
            "patch_sets": paths,
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
        if loop.ckpt is not None:
            model.load_state_dict(loop.ckpt["model"])
            optimizer.load_state_dict(loop.ckpt["optimizer"])

        def model_dict(**extra: Any) -> dict[str, Any]:
            return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    "arch": arch, "classes": class_map_to_json(class_map), "n_types": int(n_types), "arm": arm,
                    "seed": int(seed), "step": loop.step, "input_size": input_size, "output_size": out_size,
                    "train": settings, **extra}

        def train_step(step: int) -> tuple[dict[str, float], float]:
            imgs, inst, types, valid = sample_batch(pools, weights, batch_size, input_size, seed, step)
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

        log.info("training HoVer-Net (%s mode, width %d, units %s, %d types) arm %s seed %d on %s patches; "
                 "%d steps of batch %d at %d px -> %d px on %s (%s)", mode, width, list(units), n_types, arm, seed,
                 " + ".join(str(len(p)) for p in pools), steps, batch_size, input_size, out_size, dev,
                 settings["precision"])
        t_start = time.perf_counter()
        model.train()
        loop.run(train_step, lambda: model_dict(optimizer=optimizer.state_dict()),
                 postfix=lambda row: {"loss": f"{row['loss']:.3f}"})
        seconds = time.perf_counter() - t_start
        step = loop.step
        atomic_torch_save(model_dict(), out_dir / "model.pt")
        steplog = loop.log
        steplog.write()
    final = steplog.rows[-1] if steplog.rows else {}
    report = {"stage": "train_segmenter", "out_dir": str(out_dir), "arm": arm, "seed": int(seed), "step": step,
              "patches": {name: len(p) for name, p in zip(("real", "synthetic") if len(pools) == 2 else (arm,),
                                                           pools)},
              "n_types": int(n_types), "precision": settings["precision"], "device": str(dev),
              "seconds": seconds, "seconds_per_step": steplog.seconds_per_step(),
              "loss": final.get("loss", float("nan"))}
    log.info("HoVer-Net written to %s after %d steps: loss %.4f; %.3f s per step", out_dir / "model.pt", step,
             report["loss"], report["seconds_per_step"])
    return report


# -- inference ---------------------------------------------------------------------------------------
def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every ``stride``, the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def predict(seg: Segmenter, image: np.ndarray, *, overlap: int | None = None, batch: int = 4,
            amp_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """NP probability (H, W), HV (2, H, W) and TP probabilities (T+1, H, W) for an RGB image of any size.

    The image is reflect-padded by the network's margin and covered by
    output-sized windows that overlap by ``overlap`` pixels (default a
    quarter of the output); overlapping predictions are averaged.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise HistosynthError(f"predict needs an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    model = seg.model
    device = next(model.parameters()).device
    s_in, s_out = seg.input_size, seg.output_size
    margin = (s_in - s_out) // 2
    overlap = s_out // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < s_out:
        raise HistosynthError(f"overlap must be in [0, {s_out}) for a {s_out}-px output, got {overlap}")
    h, w = image.shape[:2]
    big_h, big_w = max(h, s_out), max(w, s_out)
    padded = np.pad(image, ((margin, margin + big_h - h), (margin, margin + big_w - w), (0, 0)), mode="symmetric")
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
