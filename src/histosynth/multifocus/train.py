"""Train MI-GAN (:mod:`histosynth.models.migan`) on cell stack sets, and sample synthetic stacks from it.

- :func:`train_g1` (``histosynth train-migan-g1``): G1 / D1 on each stack's best-focus plane, WGAN-GP.
- :func:`train_g2` (``histosynth train-migan-g2``): G2 / D2, the best-focus plane → the whole stack, 3-D
  WGAN-GP. Trained on real best-focus images (the two generators are trained independently, as in the
  paper); at sampling time G1's image goes in.
- :func:`sample_stacks` (``histosynth sample-stacks``): z → G1 → G2 → a stack set (``source`` synthetic).

**Centring.** G2's plane k stands for the focal offset k − Z//2 *from the cell's best plane*: the paper's
I₋₅ … I₊₅ around the in-focus I₀. A real stack's best plane is wherever its focus was, so each target stack
is re-indexed to put its best plane at Z//2 (plane k ← plane best − Z//2 + k); planes beyond the recorded
ones repeat the nearest recorded plane (the most defocused one there is), and the share of cells that needed
that is logged. So G2's base image maps to plane Z//2, which is the ``best_plane`` of every sampled stack.
This assumes evenly spaced planes (the offsets of ``g2.pt`` are relative to the best plane).

**Losses** (paper eqs. 1–6): the critic minimises E[D(fake)] − E[D(real)] + λ·E[(‖∇D(x̂)‖₂ − 1)²] at
x̂ = ε·real + (1 − ε)·fake (:func:`histosynth.models.pix2pix.critic_penalty`, on images and on stacks),
``n_critic`` times per generator step (each on a fresh batch), the generator −E[D(fake)]; for G2 an optional
``lambda_l1`` · L1 to the real stack (0, the paper's loss, by default). Adam with the WGAN-GP paper's
β = (0, 0.9) (MI-GAN names no optimizer), constant learning rate. A batch is a pure function of (seed,
step, critic iteration): stacks drawn uniformly over all cells of all sets, each with one of the 8 flips /
quarter turns when ``augment`` (the paper's 90° / 180° / 270° rotations and mirror flips).

**Transfer learning** (the paper's MI-GAN2): ``init_from`` starts the generator *and* critic from a trained
model of the same architecture (its g1.pt / g2.pt or checkpoint.pt); the optimizers start afresh.

Each trainer writes ``g1.pt`` / ``g2.pt``, ``log.csv`` (step, G_loss, [G_l1,] D_real, D_fake, D_gp, W —
the critic's Wasserstein estimate E[D(real)] − E[D(fake)] — lr, seconds), ``samples.png`` and
``checkpoint.pt`` through :class:`histosynth.training.StepLoop` (resume; a SIGTERM saves and stops; on the
CPU a killed-and-resumed run ends with the weights of an uninterrupted one).
"""

from __future__ import annotations

import contextlib

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histosynth.errors import HistosynthError
from histosynth.figures import save_figure
from histosynth.io.pool import dihedral
from histosynth.models import migan
from histosynth.models.checkpoint import atomic_torch_save
from histosynth.models.pix2pix import critic_penalty, interpolate
from histosynth.multifocus.stackset import StackSet, StackSetWriter, read_stackset
from histosynth.training import StepLoop

log = logging.getLogger(__name__)

BETAS = (0.0, 0.9)
_RESUME_KEYS = ("kind", "generator", "critic", "batch_size", "lr", "n_critic", "lambda_gp", "lambda_l1", "seed",
                "augment", "init_from", "data")


# -- data --------------------------------------------------------------------------------------------------
def read_stacks(stack_dirs: Sequence[str | os.PathLike], batch_size: int) -> list[StackSet]:
    """The stack sets, checked: one plane count, 64 × 64 cells, at least ``batch_size`` cells in all."""
    if not stack_dirs:
        raise HistosynthError("MI-GAN training needs at least one stack set")
    sets = [read_stackset(p, min_stacks=0) for p in stack_dirs]
    for s in sets:
        if s.size != (migan.IMAGE_SIZE, migan.IMAGE_SIZE):
            raise HistosynthError(f"cells of {s.size[0]} x {s.size[1]} px; MI-GAN's networks take "
                                  f"{migan.IMAGE_SIZE} x {migan.IMAGE_SIZE} (four stride-2 layers from a 4 x 4 map)",
                                  s.path)
        if s.planes != sets[0].planes:
            raise HistosynthError(f"{s.planes} planes, but {sets[0].path} has {sets[0].planes}: one MI-GAN is "
                                  "trained on stacks of one plane count", s.path)
    n = sum(len(s) for s in sets)
    if n < batch_size:
        raise HistosynthError(f"{n} cells in {', '.join(str(s.path) for s in sets)}: fewer than one batch "
                              f"(batch_size {batch_size})")
    return sets


def centre_indices(best: int, planes: int, available: int) -> np.ndarray:
    """Plane indices of a stack re-indexed so that ``best`` lands at ``planes // 2`` (clipped to the stack)."""
    return np.clip(np.arange(planes) - planes // 2 + int(best), 0, available - 1)


def draw_stacks(sets: Sequence[StackSet], batch_size: int, seed: int, step: int, k: int, augment: bool,
                centre_only: bool = False) -> np.ndarray:
    """(B, Z, 64, 64, 3) uint8 stacks, each centred on its best plane: a pure function of (seed, step, k).

    ``centre_only``: only the best plane, (B, 1, 64, 64, 3) — the same cells and transforms (G1 reads
    nothing else, and a whole stack is Z times the bytes)."""
    rng = np.random.default_rng([int(seed), 0x316A, int(step) + 1, int(k)])  # step -1: the fixed figure batch
    sizes = np.array([len(s) for s in sets])
    bounds = np.cumsum(sizes)
    picks = rng.integers(0, int(bounds[-1]), size=batch_size)
    flips = rng.integers(0, 8, size=batch_size) if augment else np.zeros(batch_size, np.int64)
    z = sets[0].planes
    out = np.empty((batch_size, 1 if centre_only else z, *sets[0].size, 3), np.uint8)
    for b, (g, d) in enumerate(zip(picks, flips)):
        s = int(np.searchsorted(bounds, g, side="right"))
        i = int(g - (bounds[s - 1] if s else 0))
        best = int(sets[s].index["best_plane"].to_numpy()[i])
        planes = [best] if centre_only else centre_indices(best, z, z)
        stack = np.asarray(sets[s].stacks[i, planes])
        out[b] = dihedral(stack.transpose(1, 2, 0, 3), int(d)).transpose(2, 0, 1, 3)
    return out


def _to_tensor(stacks: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, Z, H, W, 3) → float (B, Z, 3, H, W) in [−1, 1]."""
    return torch.from_numpy(stacks).to(device).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(…, 3, H, W) in [−1, 1] → uint8 (…, H, W, 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def _fingerprint(sets: Sequence[StackSet]) -> list[list[Any]]:
    return [[str(s.path), len(s), s.planes] for s in sets]


# -- transfer learning ----------------------------------------------------------------------------------
def read_init(path: str | os.PathLike, kind: str, G: torch.nn.Module, D: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint ``path`` to start ``G`` and ``D`` from, refused unless it is the same architecture."""
    ckpt = migan.read_checkpoint(path)
    if ckpt["kind"] != kind:
        raise HistosynthError(f"--init-from is an MI-GAN {ckpt['kind'].upper()} checkpoint; this trains "
                              f"{kind.upper()}: start from a trained {kind.upper()}", path)
    theirs, ours = ckpt.get("config") or {}, {"generator": G.config, "critic": D.config}
    if kind == "g2" and (theirs.get("generator") or {}).get("planes") != G.config["planes"]:
        raise HistosynthError(f"--init-from G2 makes {(theirs.get('generator') or {}).get('planes')} planes; the "
                              f"stacks have {G.config['planes']}: transfer learning needs the same plane count", path)
    differ = [f"{part}.{k} {theirs.get(part, {}).get(k)!r} (here {v!r})" for part in ("generator", "critic")
              for k, v in ours[part].items() if theirs.get(part, {}).get(k) != v]
    if differ:
        raise HistosynthError(f"--init-from has another architecture: {', '.join(differ)}; transfer learning needs "
                              "the same one (use the settings it was trained with)", path)
    return ckpt


# -- figures ---------------------------------------------------------------------------------------------
def _mosaic(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of (n, H, W, 3) tiles → one image, a 2-px white gutter between tiles."""
    h, w = rows[0].shape[1:3]
    n = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + 2), n * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            out[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = tile
    return out


def _save_mosaic(rows: list[np.ndarray], labels: list[str], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = _mosaic(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, img.shape[1] / 60), max(2.0, img.shape[0] / 60 + 0.5)))
    ax.imshow(img, interpolation="nearest")
    h = rows[0].shape[1] + 2
    ax.set_yticks([i * h + h / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    save_figure(fig, out_png)


def _eval(G: torch.nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    was = G.training
    G.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        G.train(was)


# -- the shared WGAN-GP loop -------------------------------------------------------------------------------
def _train(kind: str, sets: list[StackSet], out_dir: Path, G: torch.nn.Module, D: torch.nn.Module, *,
           settings: dict[str, Any], init: dict[str, Any] | None, make_fake: Callable[[torch.Tensor, torch.Generator],
                                                                                      torch.Tensor],
           real_of: Callable[[torch.Tensor], torch.Tensor], plot: Callable[[str], None], extra: dict[str, Any],
           dev: torch.device, steps: int, checkpoint_every: int, log_every: int, sample_every: int, resume: bool,
           progress: bool | None) -> dict[str, Any]:
    s = settings
    columns = ["step", "G_loss", *(["G_l1"] if kind == "g2" else []), "D_real", "D_fake", "D_gp", "W", "lr",
               "seconds"]
    opt_G = torch.optim.Adam(G.parameters(), lr=s["lr"], betas=BETAS)
    opt_D = torch.optim.Adam(D.parameters(), lr=s["lr"], betas=BETAS)
    rngs = {"noise": torch.Generator().manual_seed(s["seed"] + 0x2101),
            "draws": torch.Generator().manual_seed(s["seed"] + 0x2102)}
    loop = StepLoop(out_dir, total=steps, checkpoint_every=checkpoint_every, log_every=log_every, device=dev,
                    settings=s, keys=_RESUME_KEYS, reader=lambda p: migan.read_checkpoint(p, kind),
                    required="optimizer_G", resume=resume, columns=columns, generators=rngs,
                    desc=f"train-migan-{kind}", progress=progress)
    if loop.ckpt is not None:
        G.load_state_dict(loop.ckpt["generator"])
        D.load_state_dict(loop.ckpt["critic"])
        opt_G.load_state_dict(loop.ckpt["optimizer_G"])
        opt_D.load_state_dict(loop.ckpt["optimizer_D"])
    elif init is not None:
        G.load_state_dict(init["generator"])
        D.load_state_dict(init["critic"])
        log.info("%s starts from %s (step %s of its training)", kind.upper(), s["init_from"], init.get("step"))

    def contents() -> dict[str, Any]:
        return migan.checkpoint_dict(kind, G, D, step=loop.step, train=s, **extra,
                                     optimizer_G=opt_G.state_dict(), optimizer_D=opt_D.state_dict())

    def step_fn(step: int) -> tuple[dict[str, float], float]:
        sums = {"D_real": 0.0, "D_fake": 0.0, "D_gp": 0.0}
        for k in range(s["n_critic"]):
            stacks = _to_tensor(draw_stacks(sets, s["batch_size"], s["seed"], step, k, s["augment"],
                                            centre_only=kind == "g1"), dev)
            with torch.no_grad():
                fake = make_fake(stacks, rngs["noise"])
            real = real_of(stacks)
            d_real, d_fake = D(real).mean(), D(fake).mean()
            gp = critic_penalty(D, interpolate(real, fake, rngs["draws"]))
            loss_D = d_fake - d_real + s["lambda_gp"] * gp
            values = loop.check_finite({"D_real": d_real, "D_fake": d_fake, "D_gp": gp})
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()
            for key in sums:
                sums[key] += values[key] / s["n_critic"]
        stacks = _to_tensor(draw_stacks(sets, s["batch_size"], s["seed"], step, s["n_critic"], s["augment"],
                                        centre_only=kind == "g1"), dev)
        D.requires_grad_(False)
        fake = make_fake(stacks, rngs["noise"])
        g_loss = -D(fake).mean()
        losses = {"G_loss": g_loss}
        loss_G = g_loss
        if kind == "g2":
            losses["G_l1"] = torch.nn.functional.l1_loss(fake, real_of(stacks))
            loss_G = loss_G + s["lambda_l1"] * losses["G_l1"] if s["lambda_l1"] else loss_G
        values = loop.check_finite(losses)
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        D.requires_grad_(True)
        return {**values, **sums, "W": sums["D_real"] - sums["D_fake"]}, s["lr"]

    def after_step(step: int) -> None:
        if step % sample_every == 0:
            plot(f"step {step}")

    t0 = time.perf_counter()
    G.train()
    D.train()
    loop.run(step_fn, contents, after_step=after_step,
             postfix=lambda row: {"W": f"{row['W']:.3f}", "G": f"{row['G_loss']:.3f}"})
    seconds = time.perf_counter() - t0
    plot(f"step {loop.step} (final)")
    atomic_torch_save(migan.checkpoint_dict(kind, G, D, step=loop.step, train=s, **extra), out_dir / f"{kind}.pt")
    loop.log.write()
    final = loop.log.rows[-1] if loop.log.rows else {}
    report = {"stage": f"train_migan_{kind}", "out_dir": str(out_dir), "step": loop.step,
              "cells": sum(len(x) for x in sets), "device": str(dev), "seconds": seconds,
              "seconds_per_step": loop.log.seconds_per_step(),
              **{c: final.get(c, float("nan")) for c in columns[1:-2]}}
    log.info("%s written to %s after %d steps: W %.4f, %.3f s per step", kind.upper(), out_dir / f"{kind}.pt",
             loop.step, report["W"], report["seconds_per_step"])
    return report


def _check(**values: tuple[float, float]) -> None:
    for name, (value, low) in values.items():
        if not value >= low:
            raise HistosynthError(f"{name} must be at least {low}, got {value}")


def _common_settings(kind: str, sets: list[StackSet], G: torch.nn.Module, D: torch.nn.Module, **kw: Any
                     ) -> dict[str, Any]:
    return {"kind": kind, "generator": dict(G.config), "critic": dict(D.config), "data": _fingerprint(sets),
            "stack_sets": [str(s.path) for s in sets], "optimizer": f"Adam betas {list(BETAS)}", **kw}


def train_g1(stack_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, z_dim: int = 100,
             width: int = 64, critic_width: int = 64, steps: int = 2000, batch_size: int = 64, lr: float = 1e-4,
             n_critic: int = 5, lambda_gp: float = 10.0, augment: bool = True, init_from: str | None = None,
             seed: int = 0, device: str = "auto", threads: int | None = 1, checkpoint_every: int = 200,
             log_every: int = 10, sample_every: int = 200, resume: bool = True, progress: bool | None = None
             ) -> dict[str, Any]:
    """Train G1 / D1 on the best-focus planes of ``stack_dirs`` into ``out_dir`` (module docstring)."""
    from histosynth.device import select_device

    _check(z_dim=(z_dim, 1), width=(width, 1), critic_width=(critic_width, 1), steps=(steps, 1),
           batch_size=(batch_size, 1), lr=(lr, 1e-12), n_critic=(n_critic, 1), lambda_gp=(lambda_gp, 0),
           checkpoint_every=(checkpoint_every, 1), log_every=(log_every, 1), sample_every=(sample_every, 1))
    sets = read_stacks(stack_dirs, batch_size)
    dev = select_device(device, threads)
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        G, D = migan.define_g1(z_dim, width, critic_width)
        init = read_init(init_from, "g1", G, D) if init_from else None
        G, D = G.to(dev), D.to(dev)
        settings = _common_settings("g1", sets, G, D, batch_size=int(batch_size), lr=float(lr),
                                    n_critic=int(n_critic), lambda_gp=float(lambda_gp), lambda_l1=0.0,
                                    seed=int(seed), augment=bool(augment),
                                    init_from=str(init_from) if init_from else None, steps=int(steps))
        z_fixed = torch.randn(16, z_dim, generator=torch.Generator().manual_seed(seed + 0x2103)).to(dev)
        real_fixed = draw_stacks(sets, 8, seed, -1, 0, False)[:, sets[0].planes // 2]

        def make_fake(stacks: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
            return G(torch.randn(len(stacks), z_dim, generator=noise).to(dev))

        def plot(title: str) -> None:
            fake = to_uint8(_eval(G, lambda: G(z_fixed)))
            _save_mosaic([real_fixed, fake[:8], fake[8:]], ["real", "G1", "G1"], out_dir / "samples.png", title)

        log.info("training MI-GAN G1 (z %d, width %d, critic width %d) on %d cells; %d steps x %d critic steps "
                 "on %s", z_dim, width, critic_width, sum(len(s) for s in sets), steps, n_critic, dev)
        return _train("g1", sets, out_dir, G, D, settings=settings, init=init, make_fake=make_fake,
                      real_of=lambda stacks: stacks[:, stacks.shape[1] // 2], plot=plot, extra={}, dev=dev,
                      steps=steps, checkpoint_every=checkpoint_every, log_every=log_every,
                      sample_every=sample_every, resume=resume, progress=progress)


def relative_offsets(sets: Sequence[StackSet]) -> list[float | None]:
    """The first set's plane offsets relative to its centre plane (G2's planes), or nulls where unknown."""
    offsets = sets[0].plane_offsets_um
    c = len(offsets) // 2
    if any(o is None for o in offsets):
        return [None] * len(offsets)
    return [float(o) - float(offsets[c]) for o in offsets]


def train_g2(stack_dirs: Sequence[str | os.PathLike], g1: str | os.PathLike | None, out_dir: str | os.PathLike, *,
             width: int = 32, code_channels: int = 128, res_blocks: int = 7, critic_width: int = 32,
             steps: int = 2000, batch_size: int = 16, lr: float = 1e-4, n_critic: int = 5, lambda_gp: float = 10.0,
             lambda_l1: float = 0.0, augment: bool = True, init_from: str | None = None, seed: int = 0,
             device: str = "auto", threads: int | None = 1, checkpoint_every: int = 200, log_every: int = 10,
             sample_every: int = 200, resume: bool = True, progress: bool | None = None) -> dict[str, Any]:
    """Train G2 / D2 (best-focus plane → stack) on ``stack_dirs`` into ``out_dir``; ``g1`` (a g1.pt, or None)
    only adds rows of G2 on G1's images to samples.png."""
    from histosynth.device import select_device

    _check(width=(width, 1), code_channels=(code_channels, 1), res_blocks=(res_blocks, 0),
           critic_width=(critic_width, 1), steps=(steps, 1), batch_size=(batch_size, 1), lr=(lr, 1e-12),
           n_critic=(n_critic, 1), lambda_gp=(lambda_gp, 0), lambda_l1=(lambda_l1, 0),
           checkpoint_every=(checkpoint_every, 1), log_every=(log_every, 1), sample_every=(sample_every, 1))
    sets = read_stacks(stack_dirs, batch_size)
    G1 = migan.load(g1, "g1")[0] if g1 else None
    planes = sets[0].planes
    shifted = sum(int((s.index["best_plane"] != planes // 2).sum()) for s in sets)
    log.info("G2 planes are offsets from the best plane: %d of %d cells re-indexed (best plane not the centre "
             "%d), their outer planes repeating the last recorded one", shifted, sum(len(s) for s in sets),
             planes // 2)
    dev = select_device(device, threads)
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        G, D = migan.define_g2(planes, width, code_channels, res_blocks, critic_width)
        init = read_init(init_from, "g2", G, D) if init_from else None
        G, D = G.to(dev), D.to(dev)
        settings = _common_settings("g2", sets, G, D, batch_size=int(batch_size), lr=float(lr),
                                    n_critic=int(n_critic), lambda_gp=float(lambda_gp), lambda_l1=float(lambda_l1),
                                    seed=int(seed), augment=bool(augment),
                                    init_from=str(init_from) if init_from else None, steps=int(steps),
                                    recentred_cells=shifted)
        real_fixed = draw_stacks(sets, 2, seed, -1, 0, False)
        base_fixed = _to_tensor(real_fixed, dev)[:, planes // 2]
        if G1 is not None:
            with torch.no_grad():
                z = torch.randn(2, G1.config["z_dim"], generator=torch.Generator().manual_seed(seed + 0x2103))
                g1_fixed = G1(z).to(dev)

        def make_fake(stacks: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
            return G(stacks[:, planes // 2])

        def plot(title: str) -> None:
            fake = to_uint8(_eval(G, lambda: G(base_fixed)))
            rows, labels = [], []
            for i in range(len(real_fixed)):
                rows += [real_fixed[i], fake[i]]
                labels += ["real", "G2(real best)"]
            if G1 is not None:
                from_g1 = to_uint8(_eval(G, lambda: G(g1_fixed)))
                rows += list(from_g1)
                labels += ["G2(G1)"] * len(from_g1)
            _save_mosaic(rows, labels, out_dir / "samples.png", f"{title}; planes left to right, best at "
                                                                 f"{planes // 2}")

        log.info("training MI-GAN G2 (%d planes, width %d, code %d, %d residual blocks, critic width %d) on %d "
                 "cells; %d steps x %d critic steps on %s", planes, width, code_channels, res_blocks, critic_width,
                 sum(len(s) for s in sets), steps, n_critic, dev)
        return _train("g2", sets, out_dir, G, D, settings=settings, init=init, make_fake=make_fake,
                      real_of=lambda stacks: stacks, plot=plot, extra={"plane_offsets_um": relative_offsets(sets)},
                      dev=dev, steps=steps, checkpoint_every=checkpoint_every, log_every=log_every,
                      sample_every=sample_every, resume=resume, progress=progress)


# -- sampling ----------------------------------------------------------------------------------------------
def sample_stacks(g1: str | os.PathLike, g2: str | os.PathLike, out_dir: str | os.PathLike, n: int, seed: int = 0,
                  *, batch_size: int = 16, device: str = "auto", threads: int | None = 1,
                  g1_out: str | os.PathLike | None = None) -> dict[str, Any]:
    """``n`` synthetic stacks z → G1 → G2 into the stack set ``out_dir``: x = y = −1, source synthetic and
    best_plane = G2's centre plane (the plane its base image stands for; module docstring, "Centring").

    ``g1_out``: also write G1's images themselves, row for row, as one-plane stacks (the base images of the
    baselines of ``stack-baselines --base``)."""
    from histosynth.device import select_device

    _check(n=(n, 1), batch_size=(batch_size, 1))
    G1, _, _ = migan.load(g1, "g1")
    G2, _, meta2 = migan.load(g2, "g2")
    dev = select_device(device, threads)
    G1, G2 = G1.to(dev), G2.to(dev)
    offsets = meta2.get("plane_offsets_um") or [None] * G2.planes
    noise = torch.Generator().manual_seed(int(seed))
    size = (migan.IMAGE_SIZE, migan.IMAGE_SIZE)
    row = {"slide": "synthetic", "x": -1, "y": -1, "source": "synthetic"}
    with contextlib.ExitStack() as writers, torch.no_grad():
        w = writers.enter_context(StackSetWriter(out_dir, G2.planes, size, offsets))
        w1 = writers.enter_context(StackSetWriter(g1_out, 1, size, [0.0])) if g1_out is not None else None
        done = 0
        while done < n:
            b = min(batch_size, n - done)
            base = G1(torch.randn(b, G1.config["z_dim"], generator=noise).to(dev))
            stacks = to_uint8(G2(base))
            images = to_uint8(base[:, None]) if w1 is not None else None
            for i, stack in enumerate(stacks):
                w.add({**row, "best_plane": G2.center}, stack)
                if w1 is not None:
                    w1.add({**row, "best_plane": 0}, images[i])
            done += b
        w.report.update(stage="sample_stacks", g1=str(g1), g2=str(g2), n=int(n), seed=int(seed),
                        best_plane=G2.center)
        if w1 is not None:
            w1.report.update(stage="sample_stacks", what="G1's base images of the stacks in " + str(out_dir),
                             g1=str(g1), n=int(n), seed=int(seed))
    return {"stage": "sample_stacks", "out_dir": str(out_dir), "n": int(n), "planes": G2.planes}
