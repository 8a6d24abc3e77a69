"""Train the nucleus-shape β-VAE on the nuclei library (and sweep its latent size).

:func:`train_dvae` reads ``nuclei.npz`` (:mod:`histosynth.masks.library`), holds back
a seeded, type-stratified ``holdout`` fraction, trains
:class:`histosynth.models.dvae.DVAE` with Adam and writes into ``out_dir``:

- ``dvae.pt`` — the final model (``state_dict``, model ``config``, ``classes``,
  ``latent_dim``, ``epoch``, ``step``, training settings, final metrics and
  the ``posterior`` (mu, logvar, type) of every training shape),
  readable with ``torch.load(weights_only=True)`` and
  :func:`histosynth.models.dvae.load_dvae`;
- ``log.csv`` — one row per epoch: epoch, step, train_loss, recon, kl
  (epoch means), holdout_bce (per pixel), holdout_dice, holdout_iou (of the
  reconstruction from the posterior mean, thresholded at 0.5, mean over
  shapes), holdout_mse and holdout_mse_kl (seed 000's measures: squared
  error summed over a 64 × 64 shape, and that plus the KL, mean over shapes),
  seconds (wall time of the epoch);
- ``traversal.png`` — each latent dimension a row, swept −3…3 in 9 steps with
  the others at 0 (one block per type for a conditional model), labelled with
  the dimension's mean KL on the hold-out set (near 0 = unused dimension);
- ``samples.png`` — hold-out shapes, their reconstructions, shapes sampled
  at sigma 0.5 (with the same types, for a conditional model), and shapes
  drawn from the stored posterior of the training shapes
  (:func:`histosynth.models.dvae.sample_posterior_shapes`);
- ``checkpoint.pt`` — written atomically every ``checkpoint_every`` epochs
  (and every ``checkpoint_steps`` optimizer steps if set) with the model,
  the optimizer, the position (epoch, batch, step), the partial-epoch sums, the
  log so far and the RNG states (torch generator of the reparameterisation
  noise, numpy bit generator of the augmentation).

**Loss.** ``loss="bce"`` (default): binary cross-entropy of the logits,
summed over pixels, + β·KL — the right likelihood for binary shapes.
``loss="mse"``: the seed's MSE + β·KL (squared error of the sigmoid output),
so its Tables 4 / 5 can be set beside ours (``config/seed000-dvae.yaml``).

**Few shapes.** ``epochs`` is raised so that training takes at least
``min_steps`` optimizer steps: a library from one or two slides holds a few
hundred shapes, and ten epochs of three steps leave a model that decodes
nothing (hold-out Dice 0). The report and the log say when and by how much.

**Resume.** Rerunning with the same library and settings continues from
``checkpoint.pt`` (``epochs`` may be raised to train on). The order of the
training data in epoch *e* is a pure function of (seed, e), and all other
randomness comes from the two checkpointed generators, so on the CPU a run
that was killed and resumed ends with weights equal (``torch.equal``) to an
uninterrupted one. A checkpoint written with other settings or another library
is set aside (with a warning) and training starts afresh.

**Determinism.** Model initialisation, holdout split, data order,
augmentation (random flips / 90° rotations, ``augment=True``: nuclei have no
preferred orientation) and noise are seeded; on the CPU
``torch.use_deterministic_algorithms`` is on while training. CUDA runs are
not bitwise reproducible.

A non-finite loss stops training with a :class:`HistosynthError`; the last
good ``checkpoint.pt`` is left as it was.

:func:`dvae_sweep` trains one model per latent size (the seed's tables 4/5)
into ``out_dir/latent-{k}/`` and writes ``sweep.csv`` and ``sweep.png``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.atomic import atomic_csv
from histosynth.io.pool import dihedral
from histosynth.masks.library import load_library
from histosynth.models import dvae as dvae_mod
from histosynth.models.checkpoint import atomic_torch_save
from histosynth.models.dvae import DVAE, DVAEConfig, checkpoint_dict, encode, init_output_bias, kl_divergence
from histosynth.training import CheckpointFile, Deterministic, StopAtStep, progress_bar

log = logging.getLogger(__name__)

#: default number of epochs: a few minutes on the CPU for the demo library
DEFAULT_EPOCHS = 30
#: default least number of optimizer steps (epochs are raised to reach it on a small library)
DEFAULT_MIN_STEPS = 100
LOG_COLUMNS = ["epoch", "step", "train_loss", "recon", "kl", "holdout_bce", "holdout_dice", "holdout_iou",
               "holdout_mse", "holdout_mse_kl", "seconds"]
#: training settings that must match for a checkpoint to be resumed
_RESUME_KEYS = ("model", "beta", "batch_size", "lr", "seed", "holdout", "augment", "library_sha1", "conditional",
                "loss")


# -- data ------------------------------------------------------------------------------------
def split_holdout(types: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) index arrays: ``fraction`` of each type held out, seeded.

    Every type keeps at least one training item; with ``fraction`` > 0 at least
    one item is held out when there are two or more.
    """
    if not 0 <= fraction < 1:
        raise HistosynthError(f"holdout must be in [0, 1), got {fraction}")
    types = np.asarray(types)
    rng = np.random.default_rng([int(seed), 0x401D])
    hold: list[np.ndarray] = []
    for t in np.unique(types):
        idx = rng.permutation(np.flatnonzero(types == t))
        k = min(int(math.floor(fraction * len(idx) + 0.5)), len(idx) - 1)
        hold.append(idx[:k])
    held = np.sort(np.concatenate(hold)) if hold else np.zeros(0, np.int64)
    if fraction > 0 and len(held) == 0 and len(types) >= 2:
        held = np.array([int(rng.integers(len(types)))])
    mask = np.zeros(len(types), dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a pure function of (n, seed, epoch)."""
    return np.random.default_rng([int(seed), 0xE90C, int(epoch)]).permutation(n)


def _sha1(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(str(a.shape).encode())
    return h.hexdigest()


# -- evaluation ------------------------------------------------------------------------------
def reconstruction_metrics(model: DVAE, shapes: np.ndarray, types: np.ndarray | None,
                           batch: int = 512) -> dict[str, float]:
    """Of the reconstruction from the posterior mean: per-pixel BCE, mean Dice / IoU at 0.5, and seed 000's
    measures: ``mse`` (squared error of the sigmoid output summed over a shape's pixels, mean over shapes) and
    ``mse_kl`` (that plus the KL summed over the latent dimensions, mean over shapes)."""
    if len(shapes) == 0:
        return {"bce": float("nan"), "dice": float("nan"), "iou": float("nan"), "mse": float("nan"),
                "mse_kl": float("nan"), "kl_per_dim": []}
    mu, logvar = encode(model, shapes, types if model.conditional else None, batch=batch)
    device = next(model.parameters()).device
    bce_sum, se_sum, dice, iou = 0.0, 0.0, [], []
    c_all = model.one_hot(types, len(shapes))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(shapes), batch):
            x = torch.from_numpy(shapes[start : start + batch].astype(np.float32)).unsqueeze(1).to(device)
            z = torch.from_numpy(mu[start : start + batch]).to(device)
            c = None if c_all is None else c_all[start : start + batch]
            logits = model.decode(z, c)
            bce_sum += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum"))
            se_sum += float(torch.nn.functional.mse_loss(torch.sigmoid(logits), x, reduction="sum"))
            pred = (logits > 0).flatten(1)
            true = x.flatten(1) > 0.5
            inter = (pred & true).sum(1).float()
            p, t = pred.sum(1).float(), true.sum(1).float()
            union = p + t - inter
            dice.append(torch.where(p + t > 0, 2 * inter / (p + t).clamp(min=1), torch.ones_like(p)).cpu())
            iou.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(p)).cpu())
    model.train(was_training)
    kl = kl_divergence(torch.from_numpy(mu), torch.from_numpy(logvar)).mean(0)
    mse = se_sum / len(shapes)
    return {
        "bce": bce_sum / shapes[0].size / len(shapes),
        "dice": float(torch.cat(dice).mean()),
        "iou": float(torch.cat(iou).mean()),
        "mse": mse,
        "mse_kl": mse + float(kl.sum()),
        "kl_per_dim": [float(v) for v in kl],
    }


def _grid(images: np.ndarray, cols: int, pad: int = 1, fill: float = 0.35) -> np.ndarray:
    n, h, w = images.shape
    rows = max(1, math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), fill, dtype=np.float32)
    for k in range(n):
        r, c = divmod(k, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[k]
    return out


def plot_traversal(model: DVAE, out_png: str | os.PathLike, *, steps: int = 9, limit: float = 3.0,
                   kl_per_dim: Sequence[float] | None = None) -> Path:
    """Each latent dimension a row swept from −limit to limit (others 0); one block per type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    d = model.latent_dim
    values = np.linspace(-limit, limit, steps, dtype=np.float32)
    z = np.zeros((d * steps, d), dtype=np.float32)
    for i in range(d):
        z[i * steps : (i + 1) * steps, i] = values
    blocks = list(model.cfg.type_ids) if model.conditional else [None]
    fig, axes = plt.subplots(1, len(blocks), figsize=(0.75 * steps * len(blocks) + 1.2, 0.75 * d + 1.0),
                             squeeze=False)
    size = model.cfg.size
    for ax, t in zip(axes[0], blocks):
        probs = dvae_mod.decode(model, z, None if t is None else np.full(len(z), t))
        ax.imshow(_grid(probs, steps), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([1 + k * (size + 1) + size / 2 for k in range(steps)], [f"{v:g}" for v in values], fontsize=7)
        labels = [f"z{i}" + (f" ({kl_per_dim[i]:.2f})" if kl_per_dim is not None and len(kl_per_dim) > i else "")
                  for i in range(d)]
        ax.set_yticks([1 + i * (size + 1) + size / 2 for i in range(d)], labels, fontsize=7)
        ax.set_title("all types" if t is None else model.classes.get(t, f"type {t}"), fontsize=9)
    fig.suptitle("latent traversal (row: dimension, mean KL in brackets; column: value)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png)
    return out_png


def plot_samples(model: DVAE, shapes: np.ndarray, types: np.ndarray, out_png: str | os.PathLike, *,
                 n: int = 64, sigma: float = 0.5, seed: int = 0) -> Path:
    """Real shapes | reconstructions | sampled at ``sigma`` | from the posterior bank (same types)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(shapes), size=min(n, len(shapes)), replace=False))
    real = shapes[pick].astype(np.float32)
    ty = types[pick] if model.conditional else None
    mu, _ = encode(model, shapes[pick], ty)
    recon = (dvae_mod.decode(model, mu, ty) > 0.5).astype(np.float32)
    panels = [(real, "library (hold-out) shapes"), (recon, "reconstructions (posterior mean)"),
              (dvae_mod.sample_shapes(model, len(pick), ty, sigma=sigma, seed=seed).astype(np.float32),
               f"sampled, z ~ N(0, {sigma:g}²)")]
    if model.posterior:
        panels.append((dvae_mod.sample_posterior_shapes(model, len(pick), types[pick], seed=seed).astype(np.float32),
                       "sampled from the library posterior"))
    cols = max(1, int(math.ceil(math.sqrt(len(pick)))))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.4))
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(_grid(img, cols), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, out_png)
    return out_png


# -- training ------------------------------------------------------------------------------------
def epochs_for(epochs: int, steps_per_epoch: int, min_steps: int) -> int:
    """``epochs``, raised if needed so that ``epochs * steps_per_epoch >= min_steps``."""
    return max(int(epochs), math.ceil(int(min_steps) / max(1, int(steps_per_epoch))))


def train_dvae(
    library_npz: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    latent_dim: int = 10,
    beta: float = 4.0,
    epochs: int = DEFAULT_EPOCHS,
    min_steps: int = DEFAULT_MIN_STEPS,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = 1,
    conditional: bool = False,
    loss: str = "bce",
    holdout: float = 0.1,
    checkpoint_every: int = 1,
    checkpoint_steps: int = 0,
    augment: bool = True,
    enc_widths: Sequence[int] = DVAEConfig.enc_widths,
    dec_widths: Sequence[int] = DVAEConfig.dec_widths,
    dec_strides: Sequence[int] = DVAEConfig.dec_strides,
    hidden: int = DVAEConfig.hidden,
    dec_channels: int = DVAEConfig.dec_channels,
    resume: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train the DVAE on ``library_npz`` into ``out_dir`` (see the module docstring); returns a report.

    It trains by epochs (one log row per epoch, with hold-out metrics), so it
    shares the checkpoint file, the NaN stop and the progress bar of
    :mod:`histosynth.training` rather than its step loop.
    """
    from histosynth.device import select_device

    for name, value, low in (("epochs", epochs, 1), ("min_steps", min_steps, 0), ("batch_size", batch_size, 1),
                             ("checkpoint_every", checkpoint_every, 1), ("checkpoint_steps", checkpoint_steps, 0)):
        if int(value) < low:
            raise HistosynthError(f"{name} must be at least {low}, got {value}")
    if loss not in dvae_mod.RECONSTRUCTION_LOSSES:
        raise HistosynthError(f"dvae.loss must be one of {dvae_mod.RECONSTRUCTION_LOSSES}, got {loss!r}")
    if not beta >= 0 or not lr > 0:
        raise HistosynthError(f"beta must be >= 0 and lr > 0, got beta={beta}, lr={lr}")
    lib = load_library(library_npz)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = select_device(device, threads)
    type_ids = tuple(int(t) for t in np.unique(lib.types)) if conditional else ()
    try:
        cfg = DVAEConfig(latent_dim=int(latent_dim), size=int(lib.shapes.shape[1]), enc_widths=tuple(enc_widths),
                         hidden=int(hidden), dec_channels=int(dec_channels), dec_widths=tuple(dec_widths),
                         dec_strides=tuple(dec_strides), type_ids=type_ids)
    except ValueError as err:
        raise HistosynthError(f"impossible DVAE settings: {err}", library_npz) from err

    train_idx, hold_idx = split_holdout(lib.types, holdout, seed)
    if len(train_idx) == 0:
        raise HistosynthError("no training shapes left after the hold-out split", library_npz)
    train_shapes, train_types = np.ascontiguousarray(lib.shapes[train_idx]), lib.types[train_idx]
    hold_shapes, hold_types = np.ascontiguousarray(lib.shapes[hold_idx]), lib.types[hold_idx]
    settings: dict[str, Any] = {
        "model": cfg.to_dict(), "beta": float(beta), "batch_size": int(batch_size), "lr": float(lr),
        "seed": int(seed), "holdout": float(holdout), "augment": bool(augment), "conditional": bool(conditional),
        "loss": loss,
        "epochs": int(epochs), "min_steps": int(min_steps), "library": str(library_npz), "library_n": len(lib),
        "library_sha1": _sha1(lib.shapes, lib.types), "mpp": lib.mpp,
    }
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    requested_epochs = int(epochs)
    epochs = epochs_for(requested_epochs, steps_per_epoch, min_steps)
    if epochs > requested_epochs:
        log.info("%d training shapes make %d steps per epoch: %d epochs instead of %d, to train at least "
                 "min_steps = %d steps", len(train_idx), steps_per_epoch, epochs, requested_epochs, min_steps)
    cpu = dev.type == "cpu"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DVAE(cfg, lib.classes)
        init_output_bias(model, float(train_shapes.mean()))
    model.to(dev)
    if cpu:  # 1.5x faster transposed convolutions on the CPU
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    noise = torch.Generator(device=dev).manual_seed(int(seed))
    aug_rng = np.random.default_rng([int(seed), 0xA06])

    epoch, batch0, step = 0, 0, 0
    partial = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "n": 0, "seconds": 0.0}
    rows: list[dict[str, Any]] = []
    file = CheckpointFile(out_dir, settings=settings, keys=_RESUME_KEYS, reader=dvae_mod.read_checkpoint,
                          required="optimizer", resume=resume)
    ckpt = file.ckpt
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        noise.set_state(ckpt["rng"]["torch"])
        aug_rng.bit_generator.state = ckpt["rng"]["numpy"]
        epoch, batch0, step = int(ckpt["epoch"]), int(ckpt["batch"]), int(ckpt["step"])
        partial = dict(ckpt["partial"])
        rows = [dict(r) for r in ckpt["log"]]
        log.info("resuming %s from %s: epoch %d, batch %d, step %d", out_dir, file.path, epoch + 1, batch0, step)

    def save_checkpoint(next_epoch: int, next_batch: int) -> None:
        file.save(checkpoint_dict(
            model, train=settings, optimizer=optimizer.state_dict(), epoch=next_epoch, batch=next_batch,
            step=step, partial=dict(partial), log=[dict(r) for r in rows],
            rng={"torch": noise.get_state(), "numpy": aug_rng.bit_generator.state},
        ), step)

    log.info("training DVAE (latent %d, beta %g%s) on %d shapes, %d held out; %d epochs of %d steps on %s",
             latent_dim, beta, ", conditional on " + str(list(type_ids)) if conditional else "",
             len(train_idx), len(hold_idx), epochs, steps_per_epoch, dev)
    t_start = time.perf_counter()
    with StopAtStep() as stop, Deterministic(cpu), \
            progress_bar(epochs * steps_per_epoch, step, "train-dvae", progress) as bar:
        while epoch < epochs:
            t0 = time.perf_counter()
            order = epoch_order(len(train_idx), seed, epoch)
            for b in range(batch0, steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                batch = train_shapes[idx]
                if augment:
                    batch = np.stack([dihedral(s, k) for s, k in zip(batch, aug_rng.integers(0, 8, size=len(idx)))])
                x = torch.from_numpy(batch.astype(np.float32)).unsqueeze(1).to(dev)
                if cpu:
                    x = x.contiguous(memory_format=torch.channels_last)
                c = model.one_hot(train_types[idx], len(idx)) if conditional else None
                logits, mu, logvar = model(x, c, generator=noise)
                total, recon, kl = dvae_mod.vae_loss(logits, x, mu, logvar, beta, loss)
                value = file.check_finite({"loss": total}, step, at=f"epoch {epoch + 1}, step {step + 1}",
                                          hint="try a lower --lr or beta")["loss"]
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                step += 1
                partial["loss"] += value * len(idx)
                partial["recon"] += float(recon.detach()) * len(idx)
                partial["kl"] += float(kl.detach()) * len(idx)
                partial["n"] += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.1f}")
                if checkpoint_steps and step % checkpoint_steps == 0 and b + 1 < steps_per_epoch:
                    partial["seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save_checkpoint(epoch, b + 1)
                elif stop.signum is not None:  # SIGTERM: checkpoint now (batch b + 1 may end the epoch) and stop
                    partial["seconds"] += time.perf_counter() - t0
                    save_checkpoint(epoch, b + 1)
                if stop.signum is not None:
                    stop.stop(file.last_good)
            metrics = reconstruction_metrics(model, hold_shapes, hold_types)
            n = max(1, partial["n"])
            rows.append({
                "epoch": epoch + 1, "step": step, "train_loss": partial["loss"] / n, "recon": partial["recon"] / n,
                "kl": partial["kl"] / n, "holdout_bce": metrics["bce"], "holdout_dice": metrics["dice"],
                "holdout_iou": metrics["iou"], "holdout_mse": metrics["mse"], "holdout_mse_kl": metrics["mse_kl"],
                "seconds": partial["seconds"] + time.perf_counter() - t0,
            })
            r = rows[-1]
            log.info("epoch %d/%d step %d: loss %.2f (recon %.2f, kl %.2f); hold-out BCE %.4f/px, Dice %.3f, "
                     "IoU %.3f; %.1f s", r["epoch"], epochs, step, r["train_loss"], r["recon"], r["kl"],
                     r["holdout_bce"], r["holdout_dice"], r["holdout_iou"], r["seconds"])
            epoch, batch0 = epoch + 1, 0
            partial = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "n": 0, "seconds": 0.0}
            atomic_csv(pd.DataFrame(rows, columns=LOG_COLUMNS), out_dir / "log.csv")
            if epoch % checkpoint_every == 0 or epoch == epochs or stop.signum is not None:
                save_checkpoint(epoch, 0)
            if stop.signum is not None:
                stop.stop(file.last_good)

    model = model.to(memory_format=torch.contiguous_format).eval()
    metrics = reconstruction_metrics(model, hold_shapes, hold_types)
    final = rows[-1] if rows else {}
    report = {
        "stage": "train_dvae",
        "out_dir": str(out_dir),
        "epochs": epoch,
        "epochs_requested": requested_epochs,
        "step": step,
        "train_shapes": int(len(train_idx)),
        "holdout_shapes": int(len(hold_idx)),
        "final_train_loss": final.get("train_loss", float("nan")),
        "holdout_bce": metrics["bce"],
        "holdout_dice": metrics["dice"],
        "holdout_iou": metrics["iou"],
        "holdout_mse": metrics["mse"],
        "holdout_mse_kl": metrics["mse_kl"],
        "kl_per_dim": metrics["kl_per_dim"],
        "seconds": time.perf_counter() - t_start,
        "seconds_per_epoch": float(np.mean([r["seconds"] for r in rows])) if rows else float("nan"),
        "device": str(dev),
    }
    post_mu, post_logvar = encode(model, train_shapes, train_types if conditional else None)
    model.posterior = {"mu": post_mu, "logvar": post_logvar, "types": train_types.copy()}
    atomic_torch_save(checkpoint_dict(model, train=settings, epoch=epoch, step=step,
                                       metrics={k: v for k, v in report.items() if k != "kl_per_dim"},
                                       posterior={k: torch.from_numpy(np.ascontiguousarray(v))
                                                  for k, v in model.posterior.items()}),
                       out_dir / "dvae.pt")
    atomic_csv(pd.DataFrame(rows, columns=LOG_COLUMNS), out_dir / "log.csv")
    plot_traversal(model, out_dir / "traversal.png", kl_per_dim=metrics["kl_per_dim"] or None)
    show_shapes, show_types = (hold_shapes, hold_types) if len(hold_idx) else (train_shapes, train_types)
    plot_samples(model, show_shapes, show_types, out_dir / "samples.png", seed=seed)
    log.info("DVAE written to %s: hold-out BCE %.4f/px, Dice %.3f, IoU %.3f; %.1f s per epoch",
             out_dir / "dvae.pt", report["holdout_bce"], report["holdout_dice"], report["holdout_iou"],
             report["seconds_per_epoch"])
    return report


# -- latent-size sweep -----------------------------------------------------------------------------
def dvae_sweep(
    library_npz: str | os.PathLike,
    out_dir: str | os.PathLike,
    latent_dims: Sequence[int] = (8, 10, 16, 20, 30),
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Train one DVAE per latent size into ``out_dir/latent-{k}/``; write sweep.csv and sweep.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not latent_dims:
        raise HistosynthError("dvae-sweep needs at least one latent size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in latent_dims:
        rep = train_dvae(library_npz, out_dir / f"latent-{int(k)}", latent_dim=int(k), **train_kwargs)
        rows.append({"latent_dim": int(k), "final_train_loss": rep["final_train_loss"],
                     "holdout_bce": rep["holdout_bce"], "holdout_dice": rep["holdout_dice"],
                     "holdout_iou": rep["holdout_iou"], "holdout_mse": rep["holdout_mse"],
                     "holdout_mse_kl": rep["holdout_mse_kl"], "seconds": rep["seconds"]})
    table = pd.DataFrame(rows)
    atomic_csv(table, out_dir / "sweep.csv")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, col, label in zip(axes, ("final_train_loss", "holdout_bce", "holdout_dice", "holdout_mse"),
                              ("final train loss (reconstruction + beta KL)", "hold-out BCE per pixel",
                               "hold-out Dice", "hold-out MSE per 64 x 64 shape (seed 000)")):
        ax.plot(table["latent_dim"], table[col], "o-")
        ax.set_xlabel("latent size")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_dir / "sweep.png")
    log.info("latent-size sweep written to %s:\n%s", out_dir / "sweep.csv", table.to_string(index=False))
    return {"rows": rows, "csv": str(out_dir / "sweep.csv"), "png": str(out_dir / "sweep.png")}
