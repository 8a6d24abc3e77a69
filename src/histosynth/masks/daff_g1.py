"""Train DAFF-GAN's G1 (:mod:`histosynth.models.daff_g1`): centroid-point images → typed nucleus masks, on
(point image, real typed mask) pairs of the train patch sets (``histosynth train-daff-g1``).

Why not :func:`histosynth.gan.train.train_gan`: that trainer conditions on
:func:`histosynth.gan.conditioning.build_conditioning` of a mask and targets a 3-channel image; G1's
conditioning is a point image and its target a 1 + K channel mask, and ``gan`` sits above ``masks`` in the
layers. So this is a small loop on :class:`histosynth.training.StepLoop` (checkpoint / resume, log.csv, the
NaN stop) reusing the networks and losses of :mod:`histosynth.models.pix2pix`.

**Pairs.** Each step draws ``batch_size`` patches uniformly over all patches, a random ``crop`` and one of
the 8 flips / quarter turns, a pure function of (seed, step). The crop's instances give the centroids
(:func:`histosynth.masks.daff_layout.centroids`: a nucleus cut by the crop has its centroid in the crop),
rendered as :func:`~histosynth.masks.daff_layout.point_image`; the target is the crop's mask: channel 0 +1 on
nuclei, −1 elsewhere; channel t +1 on type t.

**Losses** (the paper's DAFF-GAN recipe: multi-scale D, feature matching, log loss): D1 (``num_d`` scales of
PatchGAN, input point image ‖ mask) with the vanilla (BCE) GAN loss; G1 with its GAN loss + ``lambda_fm`` ·
feature matching + ``lambda_l1`` · L1 to the target. Adam (β 0.5, 0.999), lr constant for ``steps`` then
linearly to 0 over ``decay_steps``.

Writes ``g1.pt``, ``log.csv`` (step, G_gan, G_l1, G_fm, D_real, D_fake, fg_dice, lr, seconds: fg_dice is the
Dice of G1's foreground with the real one on the step's batch), ``samples.png`` (points | G1 | real) and
``checkpoint.pt`` (resumable; on the CPU a killed-and-resumed run ends with the weights of an uninterrupted one).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.labels import classes_of_patch_sets, read_class_map
from histosynth.io.patchset import read_patchset
from histosynth.io.pool import dihedral
from histosynth.masks.daff_layout import centroids, point_image
from histosynth.models import pix2pix as p2p
from histosynth.models.checkpoint import atomic_torch_save
from histosynth.models.daff_g1 import define_g1, g1_checkpoint_dict, read_g1_checkpoint
from histosynth.training import StepLoop

log = logging.getLogger(__name__)

COLUMNS = ["step", "G_gan", "G_l1", "G_fm", "D_real", "D_fake", "fg_dice", "lr", "seconds"]
_RESUME_KEYS = ("generator", "num_d", "ndf", "lambda_l1", "lambda_fm", "batch_size", "lr", "seed", "crop",
                "n_types", "point_radius", "data")


def mask_target(inst: np.ndarray, types: np.ndarray, n_types: int) -> np.ndarray:
    """G1's target (1 + K, H, W) float32 in {−1, 1}: foreground, then one channel per type."""
    out = np.full((1 + n_types, *inst.shape), -1.0, np.float32)
    out[0][inst > 0] = 1.0
    for t in range(1, n_types + 1):
        out[t][types == t] = 1.0
    return out


def pair_batch(insts: Sequence[np.ndarray], types: Sequence[np.ndarray], batch_size: int, crop: int, seed: int,
               step: int, n_types: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(point images (B, K, crop, crop), targets (B, 1 + K, crop, crop)) of ``step``: a function of (seed, step)."""
    rng = np.random.default_rng([int(seed), 0xDAF1 if step >= 0 else 0xDAF2, abs(int(step))])
    sizes = np.array([len(a) for a in insts])
    k = rng.integers(0, int(sizes.sum()), size=batch_size)
    bounds = np.cumsum(sizes)
    x_in = np.empty((batch_size, n_types, crop, crop), np.float32)
    y = np.empty((batch_size, 1 + n_types, crop, crop), np.float32)
    for b in range(batch_size):
        s = int(np.searchsorted(bounds, k[b], side="right"))
        p = int(k[b] - (bounds[s - 1] if s else 0))
        h, w = insts[s].shape[1:]
        y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        d = int(rng.integers(0, 8))
        inst = np.ascontiguousarray(dihedral(insts[s][p, y0:y0 + crop, x0:x0 + crop], d))
        typ = np.ascontiguousarray(dihedral(types[s][p, y0:y0 + crop, x0:x0 + crop], d))
        x_in[b] = point_image(centroids(inst, typ), crop, n_types, radius)
        y[b] = mask_target(inst, typ, n_types)
    return x_in, y


def _dice(fake: torch.Tensor, real: torch.Tensor) -> float:
    a, b = fake[:, 0] > 0, real[:, 0] > 0
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def _colour(mask: np.ndarray) -> np.ndarray:
    """(1 + K, H, W) in [−1, 1] → RGB: foreground pixels coloured by their argmax type."""
    palette = np.array([[0.9, 0.2, 0.2], [0.95, 0.8, 0.1], [0.2, 0.7, 0.2], [0.2, 0.4, 0.9], [0.7, 0.3, 0.8],
                        [0.3, 0.8, 0.8]])
    rgb = np.zeros((*mask.shape[1:], 3))
    if mask.shape[0] > 1:
        t = mask[1:].argmax(axis=0)
        rgb[mask[0] > 0] = palette[t[mask[0] > 0] % len(palette)]
    else:
        rgb[mask[0] > 0] = 1.0
    return rgb


def plot_samples(G: torch.nn.Module, x: np.ndarray, y: np.ndarray, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = G.training
    G.eval()
    with torch.no_grad():
        fake = G(torch.from_numpy(x)).float().numpy()
    G.train(was_training)
    n = len(x)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        pts = (x[i] > 0).any(axis=0)
        for ax, img, name in zip(axes[i], (pts, _colour(fake[i]), _colour(y[i])), ("points", "G1", "real")):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name)
    fig.suptitle(title)
    save_figure(fig, out_png)


def train_daff_g1(
    patch_sets: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    crop: int = 128,
    width: int = 32,
    n_down: int = 3,
    n_blocks: int = 3,
    attention_recurrence: int = 2,
    norm: str = "batch",
    point_radius: int = 2,
    num_d: int = 2,
    ndf: int | None = None,
    lambda_l1: float = 100.0,
    lambda_fm: float = 10.0,
    steps: int = 500,
    decay_steps: int = 500,
    batch_size: int = 4,
    lr: float = 2e-4,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = 1,
    checkpoint_every: int = 200,
    log_every: int = 10,
    sample_every: int = 200,
    classes: Any = None,
    resume: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train G1 on the typed patch sets ``patch_sets`` into ``out_dir`` (module docstring); returns a report."""
    from histosynth.device import select_device

    for name, value, low in (("crop", crop, 8), ("width", width, 1), ("n_down", n_down, 1),
                             ("n_blocks", n_blocks, 1), ("num_d", num_d, 1), ("steps", steps, 0),
                             ("decay_steps", decay_steps, 0), ("batch_size", batch_size, 1),
                             ("point_radius", point_radius, 0), ("checkpoint_every", checkpoint_every, 1),
                             ("log_every", log_every, 1), ("sample_every", sample_every, 1)):
        if int(value) < low:
            raise HistosynthError(f"{name} must be at least {low}, got {value}")
    if steps + decay_steps < 1:
        raise HistosynthError("steps + decay_steps must be at least 1")
    if not lr > 0 or lambda_l1 < 0 or lambda_fm < 0:
        raise HistosynthError(f"lr must be > 0 and the lambdas >= 0, got lr={lr}, lambda_l1={lambda_l1}, "
                              f"lambda_fm={lambda_fm}")
    if not patch_sets:
        raise HistosynthError("train-daff-g1 needs at least one typed patch set")
    sets = [read_patchset(p, require=("inst", "types")) for p in patch_sets]
    insts = [ps.inst for ps in sets if len(ps)]
    typs = [ps.types for ps in sets if len(ps)]
    if not insts:
        raise HistosynthError(f"the patch sets hold no patches: {', '.join(map(str, patch_sets))}")
    too_small = [str(ps.path) for ps in sets if len(ps) and min(ps.inst.shape[1:]) < crop]
    if too_small:
        raise HistosynthError(f"crop {crop} is larger than the patches of {', '.join(too_small)}")
    class_map = read_class_map(classes, "classes") if classes else classes_of_patch_sets(patch_sets)
    n_types = max([int(max(int(t.max()) for t in typs)), *class_map.keys()], default=0)
    if n_types < 1:
        raise HistosynthError("the patch sets have no typed nuclei and no class map names a type")
    dev = select_device(device, threads)
    out_dir = Path(out_dir)
    ndf = int(ndf) if ndf else int(width)
    d_in = 2 * n_types + 1
    fingerprint = [[str(ps.path), len(ps), list(ps.inst.shape[1:])] for ps in sets]
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        G = define_g1(n_types, width=width, n_down=n_down, n_blocks=n_blocks, norm=norm,
                      attention_recurrence=attention_recurrence).to(dev)
        if crop % G.multiple:
            raise HistosynthError(f"crop {crop} is not divisible by {G.multiple} ({G.why_multiple})")
        D = p2p.define_D("multiscale", d_in, ndf, None, num_d, norm, size=crop).to(dev)
        D.eval()
        try:
            with torch.no_grad():
                D(torch.zeros(1, d_in, crop, crop, device=dev))
        except (RuntimeError, ValueError) as err:
            raise HistosynthError(f"crop {crop} is too small for a {num_d}-scale discriminator; use a larger "
                                  "--crop or fewer --num-d") from err
        D.train()
        settings: dict[str, Any] = {
            "generator": dict(G.config), "num_d": int(num_d), "ndf": ndf, "lambda_l1": float(lambda_l1),
            "lambda_fm": float(lambda_fm), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
            "crop": int(crop), "n_types": int(n_types), "point_radius": int(point_radius), "data": fingerprint,
            "steps": int(steps), "decay_steps": int(decay_steps), "gan_mode": "vanilla",
            "patch_sets": [str(p) for p in patch_sets],
        }
        opt_G = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_D = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
        criterion = p2p.GANLoss("vanilla")
        total = int(steps) + int(decay_steps)
        loop = StepLoop(out_dir, total=total, checkpoint_every=checkpoint_every, log_every=log_every, device=dev,
                        settings=settings, keys=_RESUME_KEYS, reader=read_g1_checkpoint, required="optimizer_G",
                        resume=resume, columns=COLUMNS, desc="train-daff-g1", progress=progress)
        if loop.ckpt is not None:
            G.load_state_dict(loop.ckpt["generator"])
            D.load_state_dict(loop.ckpt["discriminator"])
            opt_G.load_state_dict(loop.ckpt["optimizer_G"])
            opt_D.load_state_dict(loop.ckpt["optimizer_D"])
        fixed_x, fixed_y = pair_batch(insts, typs, min(4, batch_size), crop, seed, -1, n_types, point_radius)

        def contents() -> dict[str, Any]:
            return g1_checkpoint_dict(
                G, classes=class_map, n_types=n_types, point_radius=point_radius, step=loop.step, train=settings,
                discriminator={k: v.detach().cpu().clone() for k, v in D.state_dict().items()},
                optimizer_G=opt_G.state_dict(), optimizer_D=opt_D.state_dict())

        def step_fn(step: int) -> tuple[dict[str, float], float]:
            x, y = pair_batch(insts, typs, batch_size, crop, seed, step, n_types, point_radius)
            cond, real = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
            rate = lr if step < steps else lr * (total - step) / max(1, decay_steps)
            for opt in (opt_G, opt_D):
                for group in opt.param_groups:
                    group["lr"] = rate
            fake = G(cond)
            pred_fake = D.features(torch.cat([cond, fake.detach()], 1))
            pred_real = D.features(torch.cat([cond, real], 1))
            d_fake, d_real = criterion(pred_fake, False), criterion(pred_real, True)
            loss_D = 0.5 * (d_fake + d_real)
            loop.check_finite({"D_real": d_real, "D_fake": d_fake})
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()
            D.requires_grad_(False)
            pred = D.features(torch.cat([cond, fake], 1))
            g_gan = criterion(pred, True, for_discriminator=False)
            g_l1 = p2p.l1_loss(fake, real, lambda_l1)
            g_fm = lambda_fm * p2p.feature_matching_loss(pred, pred_real)
            loss_G = g_gan + g_l1 + g_fm
            values = loop.check_finite({"G_gan": g_gan, "G_l1": g_l1, "G_fm": g_fm, "D_real": d_real,
                                        "D_fake": d_fake})
            opt_G.zero_grad(set_to_none=True)
            loss_G.backward()
            opt_G.step()
            D.requires_grad_(True)
            values["fg_dice"] = _dice(fake.detach(), real)
            return values, rate

        def after_step(step: int) -> None:
            if step % sample_every == 0:
                plot_samples(G, fixed_x, fixed_y, out_dir / "samples.png", f"step {step}")

        log.info("training DAFF G1 (%s) on %d patches, %d types, crop %d, %d steps on %s",
                 " ".join(f"{k} {v}" for k, v in G.config.items() if k != "kind"), sum(len(a) for a in insts),
                 n_types, crop, total, dev)
        t0 = time.perf_counter()
        G.train()
        loop.run(step_fn, contents, after_step=after_step,
                 postfix=lambda row: {"G_l1": f"{row['G_l1']:.2f}", "dice": f"{row['fg_dice']:.2f}"})
        seconds = time.perf_counter() - t0
        plot_samples(G, fixed_x, fixed_y, out_dir / "samples.png", f"step {loop.step} (final)")
        atomic_torch_save(g1_checkpoint_dict(G, classes=class_map, n_types=n_types, point_radius=point_radius,
                                             step=loop.step, train=settings), out_dir / "g1.pt")
        loop.log.write()
    final = loop.log.rows[-1] if loop.log.rows else {}
    report = {"stage": "train_daff_g1", "out_dir": str(out_dir), "step": loop.step, "n_types": n_types,
              "seconds": seconds, "seconds_per_step": loop.log.seconds_per_step(),
              **{k: final.get(k, float("nan")) for k in ("G_gan", "G_l1", "G_fm", "D_real", "D_fake", "fg_dice")}}
    log.info("G1 written to %s after %d steps: G_l1 %.3f, foreground Dice %.3f on the last rows' batches",
             out_dir / "g1.pt", loop.step, report["G_l1"], report["fg_dice"])
    return report
