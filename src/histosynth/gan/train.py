"""Train Optional pix2pix: masks (+ option layer) → H&E patches.

:func:`train_gan` reads the real (image, inst, types) patches of the given
patch sets, conditions the generator (``generator``: the pix2pix U-Net by default,
pix2pixHD, DAFF-GAN or SPADE; :mod:`histosynth.models.generators`) on
:func:`histosynth.gan.conditioning.build_conditioning` of the masks with the
option of each patch's slide (``options``: slide → option name, e.g. the
stain style; slides without an entry get ``"default"``), and trains it
against a PatchGAN (default), a global (seed 001's) or a multi-scale
discriminator with λ·L1 (+ feature matching for the multi-scale one). It
writes into ``out_dir``:

- ``gan.pt`` — generator state (the EMA generator's when ``ema`` is on),
  ``config`` (generator architecture with its ``kind``, the training settings,
  and ``ema``: the decay, when on), ``options`` (sorted option names; index =
  option layer value), ``classes``, ``n_types``, ``noise``, ``step``; readable with
  ``torch.load(weights_only=True)`` and :func:`histosynth.models.pix2pix.load_gan`; with
  ``tissue_channel`` also ``tissue: True`` (and ``tissue`` in ``config["train"]["channels"]``);
- ``log.csv`` — every ``log_every`` steps the mean of each loss over those
  steps: step, G_gan, G_l1, G_fm, D_real, D_fake (+ D_gp with wgan-gp), lr, seconds;
- ``samples.png`` — conditioning | generated | real for a fixed batch, every
  ``sample_every`` steps and at the end (the EMA generator when ``ema`` is on);
- ``checkpoint.pt`` — atomically every ``checkpoint_every`` steps: G (and its
  EMA copy), D, both optimizers, the AMP scaler, the step, the log so far, the RNG states.

**Data.** Each step draws ``batch_size`` patches uniformly over all patches,
a random ``crop``, a random flip / 90° rotation — a pure function of
(seed, step), read straight from the memory-mapped arrays (no workers).

**Tissue channel.** With ``tissue_channel`` the conditioning gets the ``tissue`` channel
(:mod:`histosynth.gan.conditioning`: +1 tissue, −1 air) of every crop: the crop of the patch set's
``tissue.npy`` when the set has one, else :func:`histosynth.gan.conditioning.tissue_from_images` of the
crop's own image (grey > 204 = air, :func:`histosynth.masks.tissue.tissue_mask`). The real image is where
the air is, so the generator learns to paint air where the layout says air.

**Schedule.** Adam (β 0.5, 0.999); lr constant for ``steps``, then linear
decay to 0 over ``decay_steps``.

**Losses.** ``gan_mode`` vanilla / lsgan / hinge: D's loss is the mean of its
real and fake terms. ``wgan-gp`` (Gulrajani et al. 2017): D's loss is
E[D(fake)] − E[D(real)] + ``lambda_gp``·E[(‖∇D(x̂)‖₂ − 1)²] at random
interpolates x̂ of the real and the fake image (the conditioning shared;
:func:`histosynth.models.pix2pix.gradient_penalty`), G's is −E[D(fake)]. The
penalty is per sample, which BatchNorm in D breaks (the paper, section 4): with
``norm: batch`` the discriminator of a wgan-gp run has no normalisation at all
(the generator keeps its BatchNorm); ``norm: instance`` is per sample and kept.
With the multi-scale D the penalty is the mean of the scales' penalties, as the
loss is the mean of their terms. ``spectral_norm`` spectrally normalises every
conv / linear layer of D.

**Few images.** ``diffaugment`` (:mod:`histosynth.gan.diffaugment`, Zhao et al.
2020) transforms every (conditioning, image) pair on its way into D, real and
fake, in D's step, in G's step and at the gradient penalty's interpolates,
each time with a fresh draw — except that feature matching (multi-scale D)
compares the fake's features with those of the real pair under the same draw
(one more no-grad pass of D over the reals), so that the maps it compares stay
aligned. ``ema`` > 0 keeps an exponential moving average of G's weights,
updated after every G step (p ← d·p + (1 − d)·p_G); its buffers (BatchNorm
running statistics) are copied from G, not averaged. The decay warms up:
d = min(ema, (1 + t) / (10 + t)) at the t-th update (0-based; TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``), so a run shorter than
1 / (1 − ema) steps averages its recent weights instead of dragging the
untrained initial ones along (without it, ema 0.999 over 700 steps keeps
~50 % of the initial weights).

**Resume.** The step loop is :class:`histosynth.training.StepLoop`; this
module supplies the step and the checkpoint contents. Rerunning with the
same data and settings continues from ``checkpoint.pt`` (``steps`` /
``decay_steps`` may change; the generator's kind and architecture may not).
The batches depend only on (seed, step); dropout, the noise channel, DiffAugment
and wgan-gp's interpolates draw from checkpointed torch RNG states, so on the
CPU a killed-and-resumed run ends with weights equal (``torch.equal``) to an
uninterrupted one. A checkpoint written with other settings is set aside with
a warning.

**Precision.** ``"auto"``: on CUDA bf16 autocast where supported, else fp16
with a GradScaler; on the CPU bf16 autocast only if a timing of a few steps at
start-up says it is faster (the decision is logged). ``"float32"`` / ``"bf16"``
force it.

A non-finite loss stops training with a :class:`HistosynthError` naming the
step; the last good ``checkpoint.pt`` is left as it was.
"""

from __future__ import annotations

import copy
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
from histosynth.gan.conditioning import (build_conditioning, conditioning_channels, render_conditioning,
                                        tissue_from_images)
from histosynth.gan.diffaugment import check_policies, diff_augment
from histosynth.io.labels import classes_of_patch_sets, read_class_map
from histosynth.io.pool import PatchPool, dihedral, load_pool, max_type, pool_fingerprint
from histosynth.models import generators
from histosynth.models import pix2pix as p2p
from histosynth.models.checkpoint import atomic_torch_save
from histosynth.models.gan_layers import Generator
from histosynth.training import StepLoop, choose_precision, grad_scaler, precision_name
from histosynth.training import autocast as _autocast

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "G_gan", "G_l1", "G_fm", "D_real", "D_fake", "lr", "seconds"]
DEFAULT_STEPS = 2000
DEFAULT_DECAY_STEPS = 2000
#: training settings that must match for a checkpoint to be resumed
_RESUME_KEYS = ("generator", "disc", "num_d", "ndf", "gan_mode", "lambda_l1", "lambda_fm", "lambda_gp", "noise",
                "diffaugment", "ema", "spectral_norm", "batch_size", "lr", "seed", "crop", "options", "n_types", "data",
                "tissue_channel")
_l1 = p2p.l1_loss  # module-level so a test can make it fail


# -- data -----------------------------------------------------------------------------------------
def sample_batch(data: PatchPool, batch_size: int, crop: int, seed: int, step: int, tissue: bool = False
                 ) -> tuple[np.ndarray, ...]:
    """(images (B, crop, crop, 3) uint8, inst, types, option (B,)) for ``step``: a pure function of (seed, step).

    With ``tissue`` a fifth array: the crops' tissue layouts (B, crop, crop) uint8 (> 0 = tissue), cut from
    the set's ``tissue.npy`` or made from the crop's image (:func:`tissue_from_images`); the draws are the same.
    """
    # step -1 is the fixed batch of samples.png
    rng = np.random.default_rng([int(seed), 0x9A2 if step >= 0 else 0x5A3, abs(int(step))])
    k = rng.integers(0, len(data), size=batch_size)
    h, w = data.size
    ys = rng.integers(0, h - crop + 1, size=batch_size)
    xs = rng.integers(0, w - crop + 1, size=batch_size)
    flips = rng.integers(0, 8, size=batch_size)
    s_idx, p_idx = data.locate(k)
    imgs = np.empty((batch_size, crop, crop, 3), np.uint8)
    inst = np.empty((batch_size, crop, crop), np.int32)
    types = np.empty((batch_size, crop, crop), np.uint8)
    opts = np.empty(batch_size, np.int64)
    for b in range(batch_size):
        s, p, y, x, d = int(s_idx[b]), int(p_idx[b]), int(ys[b]), int(xs[b]), int(flips[b])
        for out, arr in ((imgs, data.images), (inst, data.inst), (types, data.types)):
            out[b] = dihedral(arr[s][p, y : y + crop, x : x + crop], d)
        opts[b] = data.option[s][p]
    if not tissue:
        return imgs, inst, types, opts
    layout = np.empty((batch_size, crop, crop), np.uint8)
    sets_tissue = data.tissue or [None] * len(data.images)
    for b in range(batch_size):
        s, p, y, x, d = int(s_idx[b]), int(p_idx[b]), int(ys[b]), int(xs[b]), int(flips[b])
        if sets_tissue[s] is not None:
            layout[b] = dihedral(sets_tissue[s][p, y : y + crop, x : x + crop], d)
        else:
            layout[b] = tissue_from_images(imgs[b])[0]
    return imgs, inst, types, opts, layout


def _with_tissue(tissue: bool) -> dict[str, bool]:
    """sample_batch's keyword for the tissue layouts, only when asked (its callers' arguments stay as they were)."""
    return {"tissue": True} if tissue else {}


# -- schedule and precision -------------------------------------------------------------------------
def learning_rate(step: int, lr: float, steps: int, decay_steps: int) -> float:
    """lr for 0-based ``step``: constant for ``steps``, then linear to 0 over ``decay_steps``."""
    if step < steps or decay_steps <= 0:
        return lr
    return lr * max(0.0, 1.0 - (step - steps) / decay_steps)


def ema_decay(decay: float, updates: int) -> float:
    """The EMA decay at 0-based update ``updates``: min(decay, (1 + t) / (10 + t)) (the warm-up)."""
    return min(float(decay), (1.0 + updates) / (10.0 + updates))


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One EMA step: each parameter p_ema ← decay·p_ema + (1 − decay)·p; buffers (BatchNorm statistics) copied."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1.0 - decay)
        for b_ema, b in zip(ema.buffers(), model.buffers()):
            b_ema.copy_(b)


def _to_tensor_images(imgs: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _choose_precision(precision: str, device: torch.device, G: torch.nn.Module, D: torch.nn.Module,
                      in_ch: int, d_in: int, crop: int, batch_size: int) -> torch.dtype | None:
    """The autocast dtype (None = float32); 'auto' on the CPU times fp32 vs bf16 on copies of the nets."""
    g, d = copy.deepcopy(G), copy.deepcopy(D)
    cond = None

    def probe(dtype: torch.dtype | None) -> None:
        nonlocal cond
        if cond is None:
            cond = torch.randn(min(batch_size, 2), in_ch, crop, crop)
        with _autocast(device, dtype):
            fake = g(cond)
            feats = d.features(torch.cat([cond[:, : d_in - 3], fake], 1))
            loss = sum(scale[-1].float().mean() for scale in feats)
        loss.backward()

    return choose_precision(precision, device, probe)


# -- figures ---------------------------------------------------------------------------------------
def plot_samples(G: Generator, data: PatchPool, out_png: Path, *, n_types: int, noise: bool, crop: int,
                 seed: int, n: int = 4, title: str = "", tissue: bool = False) -> Path:
    """Rows of conditioning | generated | real for a fixed batch (a pure function of seed); RNG untouched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(G.parameters()).device
    imgs, inst, types, opts, *layout = sample_batch(data, n, crop, seed, -1, **_with_tissue(tissue))
    modes = [(m, m.training) for m in G.modules()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        cond = build_conditioning(inst, types, n_types, opts, len(data.options), noise=noise, generator=gen,
                                  tissue=layout[0] if tissue else None)
        G.set_inference_mode()
        fake = G(cond.to(device)).float().clamp(-1, 1).cpu()
    for m, mode in modes:
        m.training = mode
    fake_rgb = ((fake.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    cond_rgb = render_conditioning(cond, n_types, tissue=tissue)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n + 0.4), squeeze=False)
    for i in range(n):
        for j, (img, name) in enumerate(((cond_rgb[i], "conditioning"), (fake_rgb[i], "generated"),
                                         (imgs[i], "real"))):
            ax = axes[i, j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        axes[i, 0].set_ylabel(data.options[int(opts[i])], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png)
    return out_png


# -- training ------------------------------------------------------------------------------------------
def train_gan(
    patch_sets: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    options: dict[str, str] | None = None,
    crop: int = 128,
    generator: str = "unet",
    depth: int = 7,
    width: int = 32,
    max_width: int = 512,
    n_down: int = 3,
    n_blocks: int = 3,
    local_enhancer: bool = False,
    attention_recurrence: int = 2,
    norm: str = "batch",
    disc: str = "patch",
    num_d: int = 2,
    ndf: int | None = None,
    gan_mode: str = "lsgan",
    lambda_l1: float = 100.0,
    lambda_fm: float = 10.0,
    lambda_gp: float = 10.0,
    spectral_norm: bool = False,
    diffaugment: Sequence[str] = (),
    ema: float = 0.0,
    noise: bool = False,
    tissue_channel: bool = False,
    dropout_at_inference: bool = True,
    steps: int = DEFAULT_STEPS,
    decay_steps: int = DEFAULT_DECAY_STEPS,
    batch_size: int = 4,
    lr: float = 2e-4,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = 1,
    sample_every: int = 500,
    checkpoint_every: int = 500,
    log_every: int = 10,
    precision: str = "auto",
    classes: dict[str, int] | dict[int, str] | None = None,
    resume: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train Optional pix2pix on ``patch_sets`` into ``out_dir`` (see the module docstring); returns a report.

    ``generator`` picks the generator (:data:`histosynth.models.generators.GENERATORS`): ``unet`` takes
    ``depth``, ``width``, ``max_width``, ``dropout_at_inference``; ``pix2pixhd`` takes ``width``, ``n_down``,
    ``n_blocks``, ``local_enhancer``; ``daff`` takes those and ``attention_recurrence``; ``spade`` takes
    ``width``, ``n_down``; all take ``norm``. Each ignores
    the others' settings. ``crop`` must be divisible by the generator's ``multiple``.
    ``ndf`` (discriminator width) defaults to ``width`` (pix2pix: ngf = ndf = 64). ``lambda_gp`` weighs
    wgan-gp's gradient penalty (ignored by the other modes); ``spectral_norm``, ``diffaugment`` (policies of
    :data:`histosynth.gan.diffaugment.POLICIES`; empty: off) and ``ema`` (decay in [0, 1); 0: off) are
    described in the module docstring, as is ``tissue_channel``. ``classes`` is a class
    map in any form :func:`histosynth.io.labels.read_class_map` reads (NAME→ID as on the CLI, or ID→NAME);
    by default it is read from the patch sets' report.json.
    """
    from histosynth.device import select_device

    for name, value, low in (("crop", crop, 1), ("depth", depth, 2), ("width", width, 1), ("steps", steps, 0),
                             ("decay_steps", decay_steps, 0), ("batch_size", batch_size, 1),
                             ("sample_every", sample_every, 1), ("checkpoint_every", checkpoint_every, 1),
                             ("log_every", log_every, 1), ("num_d", num_d, 1), ("n_down", n_down, 1),
                             ("n_blocks", n_blocks, 1), ("attention_recurrence", attention_recurrence, 1)):
        if int(value) < low:
            raise HistosynthError(f"{name} must be at least {low}, got {value}")
    if steps + decay_steps < 1:
        raise HistosynthError("steps + decay_steps must be at least 1")
    if not lr > 0 or not lambda_l1 >= 0 or not lambda_fm >= 0 or not lambda_gp >= 0:
        raise HistosynthError(f"lr must be > 0 and the lambdas >= 0, got lr={lr}, lambda_l1={lambda_l1}, "
                              f"lambda_fm={lambda_fm}, lambda_gp={lambda_gp}")
    if not 0 <= ema < 1:
        raise HistosynthError(f"ema (the decay of the generator's moving average) must be in [0, 1), got {ema}")
    policies = check_policies(diffaugment)
    generators.generator_class(generator)  # an unknown name is an error before anything is read
    if local_enhancer and generator not in ("pix2pixhd", "daff"):
        raise HistosynthError(f"local_enhancer is part of the pix2pixhd generator (and of daff, built on it), "
                              f"not of {generator!r}")
    if disc not in p2p.DISCRIMINATORS:
        raise HistosynthError(f"disc must be one of {p2p.DISCRIMINATORS}, got {disc!r}")
    if gan_mode not in p2p.GAN_MODES:
        raise HistosynthError(f"gan_mode must be one of {p2p.GAN_MODES}, got {gan_mode!r}")
    data = load_pool(patch_sets, options)
    if crop > min(data.size):
        raise HistosynthError(f"crop {crop} is larger than the patches ({data.size[0]}x{data.size[1]})")
    class_map = read_class_map(classes, "classes") if classes else classes_of_patch_sets(patch_sets)
    n_types = max([max_type(data), *class_map.keys()], default=0)
    out_dir = Path(out_dir)
    dev = select_device(device, threads)
    n_options = len(data.options)
    tissue_channel = bool(tissue_channel)
    channels = conditioning_channels(n_types, noise, tissue_channel)
    in_ch = len(channels)
    d_in = in_ch - int(noise) + 3  # the discriminator sees the conditioning without the noise, and the image
    ndf = int(ndf) if ndf else int(width)
    # WGAN-GP penalises each sample's gradient: BatchNorm, which mixes the samples of a batch, has no place in D
    d_norm = None if gan_mode == "wgan-gp" and norm == "batch" else norm

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        G = generators.define_G(generator, in_ch, 3, depth=depth, width=width, max_width=max_width,
                                dropout_innermost=3, norm=norm, dropout_at_inference=dropout_at_inference,
                                n_down=n_down, n_blocks=n_blocks, local_enhancer=local_enhancer,
                                attention_recurrence=attention_recurrence).to(dev)
        if crop % G.multiple:
            raise HistosynthError(f"crop {crop} is not divisible by {G.multiple} ({G.why_multiple}); use a crop "
                                  f"that is a multiple of {G.multiple} or a shallower {generator} generator")
        D = p2p.define_D(disc, d_in, ndf, None, num_d, d_norm, size=crop, spectral_norm=spectral_norm).to(dev)
        if disc == "global" and d_norm == "batch" and batch_size == 1 and D.side == 1:
            raise HistosynthError(f"at crop {crop} the global discriminator's last map is 1x1, where BatchNorm needs "
                                  "batch_size > 1; use a larger --batch-size or --crop")
        settings: dict[str, Any] = {
            "generator": dict(G.config), "disc": disc, "num_d": int(num_d) if disc == "multiscale" else 1,
            "ndf": ndf, "gan_mode": gan_mode, "lambda_l1": float(lambda_l1),
            "lambda_fm": float(lambda_fm) if disc == "multiscale" else 0.0,
            "lambda_gp": float(lambda_gp) if gan_mode == "wgan-gp" else 0.0, "d_norm": d_norm or "none",
            "spectral_norm": bool(spectral_norm), "diffaugment": policies, "ema": float(ema), "noise": bool(noise),
            "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed), "crop": int(crop),
            "options": list(data.options), "n_types": int(n_types),
            "data": pool_fingerprint(data), "patch_sets": [str(p) for p in patch_sets],
            "slide_options": dict(options or {}), "steps": int(steps), "decay_steps": int(decay_steps),
            "channels": channels, "patch_size": list(data.size), "tissue_channel": tissue_channel,
        }
        G.eval()
        try:
            with torch.no_grad():
                G(torch.zeros(1, in_ch, crop, crop, device=dev))
        except (RuntimeError, ValueError) as err:  # a padding or a norm over a 1x1 feature map
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise HistosynthError(f"crop {crop} is too small for the {generator} generator ({first}); use a larger "
                                  "--crop or a shallower generator") from err
        G.train()
        D.eval()
        try:
            with torch.no_grad():
                D(torch.zeros(1, d_in, crop, crop, device=dev))
        except (RuntimeError, ValueError) as err:  # a map below the 4x4 kernel, or a norm over a 1x1 map
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise HistosynthError(f"crop {crop} is too small for the {disc} discriminator"
                                  f"{f' with {num_d} scales' if disc == 'multiscale' else ''} (its deepest layers "
                                  f"shrink it too far: {first}); use a larger --crop") from err
        D.train()
        opt_G = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_D = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
        amp_dtype = _choose_precision(precision, dev, G, D, in_ch, d_in, crop, batch_size)
        scaler = grad_scaler(amp_dtype)
        settings["precision"] = precision_name(amp_dtype)
        criterion = p2p.GANLoss(gan_mode)
        noise_gen = torch.Generator().manual_seed(int(seed) + 0x6E01)
        rngs = {"noise": noise_gen}
        draws = None  # DiffAugment's transforms and wgan-gp's interpolation weights
        if policies or gan_mode == "wgan-gp":
            draws = rngs["draws"] = torch.Generator().manual_seed(int(seed) + 0xDA01)
        G_ema = None
        if ema:
            G_ema = copy.deepcopy(G).requires_grad_(False)
        columns = [*LOG_COLUMNS[:6], "D_gp", *LOG_COLUMNS[6:]] if gan_mode == "wgan-gp" else LOG_COLUMNS

        total = int(steps) + int(decay_steps)
        out_dir.mkdir(parents=True, exist_ok=True)  # after every check: a refused run leaves nothing behind
        loop = StepLoop(out_dir, total=total, checkpoint_every=checkpoint_every, log_every=log_every, device=dev,
                        settings=settings, keys=_RESUME_KEYS, reader=p2p.read_gan_checkpoint, required="optimizer_G",
                        resume=resume, columns=columns, scaler=scaler, generators=rngs,
                        desc="train-gan", progress=progress)
        if loop.ckpt is not None:
            G.load_state_dict(loop.ckpt["generator"])
            D.load_state_dict(loop.ckpt["discriminator"])
            opt_G.load_state_dict(loop.ckpt["optimizer_G"])
            opt_D.load_state_dict(loop.ckpt["optimizer_D"])
            if G_ema is not None:
                G_ema.load_state_dict(loop.ckpt["generator_ema"])
        painter = G_ema if G_ema is not None else G  # the generator of samples.png and gan.pt
        gan_config: dict[str, Any] = {"train": settings, **({"ema": float(ema)} if ema else {})}

        def contents() -> dict[str, Any]:
            ema_state = {} if G_ema is None else {
                "generator_ema": {k: v.detach().cpu().clone() for k, v in G_ema.state_dict().items()}}
            return p2p.gan_checkpoint_dict(
                G, options=data.options, classes=class_map, n_types=n_types, noise=noise, step=loop.step,
                tissue=tissue_channel,
                config={"train": settings}, train=settings,
                discriminator={k: v.detach().cpu().clone() for k, v in D.state_dict().items()},
                optimizer_G=opt_G.state_dict(), optimizer_D=opt_D.state_dict(), **ema_state)

        def augment(image: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(image, conditioning) as D sees them: DiffAugment'ed when on (a fresh draw per call)."""
            return diff_augment(image, cond, policies, draws) if policies else (image, cond)

        def d_input(image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            image, cond = augment(image, cond)
            return torch.cat([cond, image], 1)

        def sample(tag: str) -> None:
            plot_samples(painter, data, out_dir / "samples.png", n_types=n_types, noise=noise, crop=crop, seed=seed,
                         n=min(4, max(1, len(data))), title=f"step {loop.step} {tag}".strip(), tissue=tissue_channel)

        def train_step(step: int) -> tuple[dict[str, float], float]:
            imgs, inst, types, opts, *layout = sample_batch(data, batch_size, crop, seed, step,
                                                             **_with_tissue(tissue_channel))
            cond = build_conditioning(inst, types, n_types, opts, n_options, noise=noise, generator=noise_gen,
                                      tissue=layout[0] if tissue_channel else None).to(dev)
            real = _to_tensor_images(imgs, dev)
            d_cond = cond[:, : d_in - 3]
            rate = learning_rate(step, lr, steps, decay_steps)
            for opt in (opt_G, opt_D):
                for group in opt.param_groups:
                    group["lr"] = rate

            with _autocast(dev, amp_dtype):
                fake = G(cond)
            # discriminator: real vs. the detached fake
            with _autocast(dev, amp_dtype):
                pred_fake = D.features(d_input(fake.detach(), d_cond))
                pred_real = D.features(d_input(real, d_cond))
                d_fake = criterion(pred_fake, False)
                d_real = criterion(pred_real, True)
            penalty = {}
            if gan_mode == "wgan-gp":  # the critic: E[D(fake)] - E[D(real)] + lambda_gp * penalty (in float32)
                x_hat, x_cond = augment(p2p.interpolate(real, fake, draws), d_cond)
                penalty["D_gp"] = p2p.gradient_penalty(D, x_cond, x_hat)
                loss_D = d_fake + d_real + lambda_gp * penalty["D_gp"]
            else:
                loss_D = 0.5 * (d_fake + d_real)
            loop.check_finite({"D_real": d_real, "D_fake": d_fake, **penalty})
            opt_D.zero_grad(set_to_none=True)
            scaler.scale(loss_D).backward()
            scaler.step(opt_D)
            # generator: fool the updated D, stay close to the real image (L1), match D's features
            D.requires_grad_(False)
            with _autocast(dev, amp_dtype):
                replay = draws.get_state() if policies and disc == "multiscale" else None
                pred = D.features(d_input(fake, d_cond))
                if replay is not None:  # feature matching needs the real pair under the fake's draw (aligned maps)
                    draws.set_state(replay)
                    with torch.no_grad():
                        pred_real = D.features(d_input(real, d_cond))
                g_gan = criterion(pred, True, for_discriminator=False)
                g_l1 = _l1(fake, real, lambda_l1)
                g_fm = (lambda_fm * p2p.feature_matching_loss(pred, pred_real) if disc == "multiscale"
                        else torch.zeros((), device=dev))
                loss_G = g_gan + g_l1 + g_fm
            values = loop.check_finite({"G_gan": g_gan, "G_l1": g_l1, "G_fm": g_fm, "D_real": d_real,
                                        "D_fake": d_fake, **penalty})
            opt_G.zero_grad(set_to_none=True)
            scaler.scale(loss_G).backward()
            scaler.step(opt_G)
            scaler.update()
            D.requires_grad_(True)
            if G_ema is not None:
                update_ema(G_ema, G, ema_decay(ema, step))
            return values, rate

        def after_step(step: int) -> None:
            if step % sample_every == 0:
                sample("")

        architecture = " ".join(f"{k} {v}" for k, v in G.config.items() if k not in ("kind", "in_ch", "out_ch"))
        few = "".join((f", DiffAugment {','.join(policies)}" if policies else "", f", EMA {ema:g}" if ema else "",
                       ", spectral norm" if spectral_norm else "",
                       f", lambda_GP {lambda_gp:g}, D norm {settings['d_norm']}" if gan_mode == "wgan-gp" else ""))
        log.info("training pix2pix (%s generator: %s; %s D, %s, lambda_L1 %g%s%s) on %d patches of %s, "
                 "options %s, %d types; %d steps on %s (%s)", generator, architecture, disc, gan_mode, lambda_l1,
                 ", noise" if noise else "", few + (", tissue channel" if tissue_channel else ""), len(data), "x".join(map(str, data.size)), data.options, n_types,
                 total, dev, settings["precision"])
        t_start = time.perf_counter()
        G.train()
        D.train()
        loop.run(train_step, contents, after_step=after_step,
                 postfix=lambda row: {"G_l1": f"{row['G_l1']:.2f}", "D": f"{row['D_real']:.2f}"})
        seconds = time.perf_counter() - t_start
        step = loop.step
        sample("(final)")
        atomic_torch_save(p2p.gan_checkpoint_dict(
            painter, options=data.options, classes=class_map, n_types=n_types, noise=noise, step=step,
            config=gan_config, tissue=tissue_channel), out_dir / "gan.pt")
        steplog = loop.log
        steplog.write()
    final = steplog.rows[-1] if steplog.rows else {}
    report = {
        "stage": "train_gan", "out_dir": str(out_dir), "step": step, "patches": len(data),
        "options": list(data.options), "n_types": n_types, "precision": settings["precision"],
        "device": str(dev), "seconds": seconds,
        "seconds_per_step": steplog.seconds_per_step(),
        **{k: final.get(k, float("nan")) for k in ("G_gan", "G_l1", "G_fm", "D_real", "D_fake")},
        **({"D_gp": final.get("D_gp", float("nan"))} if gan_mode == "wgan-gp" else {}),
    }
    log.info("GAN written to %s after %d steps: G_l1 %.3f, G_gan %.3f, D real %.3f / fake %.3f; %.3f s per step",
             out_dir / "gan.pt", step, report["G_l1"], report["G_gan"], report["D_real"], report["D_fake"],
             report["seconds_per_step"])
    return report
