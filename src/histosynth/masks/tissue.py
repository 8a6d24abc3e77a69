"""Tissue layouts (seed 002, DEPAS): tissue masks from tiles, training the tissue generator, sampling masks.

**Tissue masks from tiles** (:func:`tissue_mask`): a pixel is air when its grey value (OpenCV's BT.601
luma, as the tiler measures background) is above the tiler's ``background_threshold`` (204 for H&E, the
seed's threshold; :class:`histosynth.slides.tiling.TileParams`). Cleaning rule: 8-connected tissue
components smaller than ``min_area`` pixels become air, and air holes smaller than ``min_area`` become
tissue (specks of stain and pale nuclei interiors are not layout). A patch set that already holds a
``tissue.npy`` (multi-label, e.g. regions from annotations) is used as it is, with its
``report.json`` ``tissue_classes`` (``histosynth rasterize --tissue-regions``:
:mod:`histosynth.patches.regions`). Masks that are all air, every one of them, are an error.

**Training** (:func:`train_tissue`): ``kind`` ``depas`` or the ``dcgan`` baseline
(:mod:`histosynth.models.depas`), Adam (lr 2e-4, β 0.5, 0.999; the paper's), batch ``batch_size``
(the paper's 8), the annealing stage every ``anneal_every`` steps (0: a tenth of the steps, the paper's
schedule). Each step draws ``batch_size`` masks and a random (H, W) crop with a random flip — a pure
function of (seed, step) — so non-square masks (the paper's 512 x 1024) come from square tiles. The
loop is :class:`histosynth.training.StepLoop`: ``checkpoint.pt`` to resume from, ``log.csv`` (step,
G, D_real, D_fake, delta, temperature, lr, seconds), NaN stop, SIGTERM. Outputs in ``out_dir``:
``tissue.pt`` (generator state, ``config`` = architecture + training settings, ``tissue_classes``
{"1": "tissue", ...}, ``step``), ``samples.png`` (real | generated), ``log.csv``.

**Sampling** (:func:`sample_tissue`): ``n`` masks from the generator in eval mode (the discrete step /
argmax), written as a patch set with ``tissue.npy`` uint8 (N, H, W), 0 = air.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from histosynth.errors import HistosynthError
from histosynth.io.labels import class_map_to_json, read_class_map
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.models import depas
from histosynth.models.checkpoint import atomic_torch_save, read_torch_checkpoint
from histosynth.slides.tiling import TileParams

log = logging.getLogger(__name__)

FORMAT = "histosynth-tissue"
VERSION = 1
#: the tiler's background threshold: grey above it is air (H&E; the seed's 204)
AIR_THRESHOLD = TileParams.background_threshold
DEFAULT_CLASSES = {1: "tissue"}
LOG_COLUMNS = ["step", "G", "D_real", "D_fake", "delta", "temperature", "lr", "seconds"]
_RESUME_KEYS = ("kind", "size", "nz", "widths", "ndf", "n_labels", "batch_size", "lr", "seed", "data",
                "anneal_every", "noise_init")


# -- masks from tiles ------------------------------------------------------------------------------
def tissue_mask(rgb: np.ndarray, threshold: int = AIR_THRESHOLD, min_area: int = 64) -> np.ndarray:
    """uint8 (H, W): 1 = tissue, 0 = air (grey > ``threshold``), specks and holes under ``min_area`` px removed."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    tissue = (grey <= threshold).astype(np.uint8)
    if min_area > 0:
        for value in (1, 0):  # small tissue specks -> air, then small air holes -> tissue
            _, lab, stats, _ = cv2.connectedComponentsWithStats((tissue == value).astype(np.uint8), connectivity=8)
            small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_area)
            small = small[small > 0]
            if small.size:
                tissue[np.isin(lab, small)] = 1 - value
    return tissue


def tissue_classes_of(report: Mapping[str, Any], source: str | os.PathLike) -> dict[int, str]:
    """The ``tissue_classes`` of a patch set's report.json (default {1: tissue})."""
    raw = report.get("tissue_classes")
    return read_class_map(raw, source) if raw else dict(DEFAULT_CLASSES)


def load_tissue_masks(patch_sets: Sequence[str | os.PathLike], classes: Mapping[int, str] | None = None,
                      threshold: int = AIR_THRESHOLD, min_area: int = 64) -> tuple[np.ndarray, dict[int, str]]:
    """(masks uint8 (N, H, W), class map) of ``patch_sets``: their ``tissue.npy``, else made from ``images.npy``.

    A set whose tissue labels differ from ``classes`` (or from the first set's) is an error naming it.
    """
    if not patch_sets:
        raise HistosynthError("no patch sets given (at least one tile patch set is needed)")
    masks, want = [], dict(classes) if classes else None
    for path in patch_sets:
        ps = read_patchset(path)
        if ps.tissue is not None:
            have = tissue_classes_of(ps.report, ps.path / "report.json")
            arr = np.asarray(ps.tissue)
        elif ps.images is not None:
            have = dict(DEFAULT_CLASSES)
            arr = np.stack([tissue_mask(im, threshold, min_area) for im in ps.images]) if len(ps) else \
                np.zeros((0, *ps.images.shape[1:3]), np.uint8)
        else:
            raise HistosynthError("patch set has neither tissue.npy nor images.npy to make tissue masks from", path)
        if want is None:
            want = have
        elif {k: v.lower() for k, v in have.items()} != {k: v.lower() for k, v in want.items()}:
            raise HistosynthError(f"tissue_classes {class_map_to_json(have)} differ from the ones asked for "
                                  f"{class_map_to_json(want)}", ps.path)
        if arr.size and int(arr.max()) > max(want):
            raise HistosynthError(f"tissue.npy holds label {int(arr.max())}, outside tissue_classes "
                                  f"{class_map_to_json(want)}", ps.path)
        masks.append(arr)
    shapes = {m.shape[1:] for m in masks}
    if len(shapes) > 1:
        raise HistosynthError(f"the patch sets have different patch sizes {sorted(shapes)}")
    out = np.concatenate(masks).astype(np.uint8)
    if len(out) == 0:
        raise HistosynthError("the patch sets hold no patches: " + ", ".join(map(str, patch_sets)))
    if not out.any():
        raise HistosynthError(
            f"every tissue mask of the {len(out)} patches is air (label 0) - nothing to learn a layout from: "
            "with tissue regions (rasterize --tissue-regions), no file had a polygon of the classes "
            f"{class_map_to_json(want)} on a tile (see report.json tissue_regions: missing, "
            "patches_with_regions); from tiles, every tile is blank: " + ", ".join(map(str, patch_sets)))
    return out, want


def sample_batch(masks: np.ndarray, batch_size: int, size: Sequence[int], seed: int, step: int) -> np.ndarray:
    """(B, H, W) uint8 crops of random masks with a random horizontal / vertical flip: a pure function of (seed, step)."""
    rng = np.random.default_rng([int(seed), 0x7155, abs(int(step)), int(step < 0)])
    h, w = int(size[0]), int(size[1])
    n, mh, mw = masks.shape
    k = rng.integers(0, n, batch_size)
    ys, xs = rng.integers(0, mh - h + 1, batch_size), rng.integers(0, mw - w + 1, batch_size)
    flips = rng.integers(0, 4, batch_size)
    out = np.empty((batch_size, h, w), np.uint8)
    for i in range(batch_size):
        crop = masks[k[i], ys[i]:ys[i] + h, xs[i]:xs[i] + w]
        if flips[i] & 1:
            crop = crop[:, ::-1]
        if flips[i] & 2:
            crop = crop[::-1]
        out[i] = crop
    return out


# -- checkpoints ------------------------------------------------------------------------------------
def read_tissue_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return read_torch_checkpoint(path, FORMAT, VERSION, "tissue model")


def load_tissue_model(path: str | os.PathLike, classes: Mapping[int, str] | None = None
                      ) -> tuple[depas.TissueGenerator, dict[int, str]]:
    """The generator (eval mode) and tissue class map of ``tissue.pt``; ``classes`` must match when given."""
    ckpt = read_tissue_checkpoint(path)
    have = read_class_map(ckpt.get("tissue_classes") or {}, path)
    if classes is not None:
        want = {int(k): str(v) for k, v in classes.items()}
        if {k: v.lower() for k, v in have.items()} != {k: v.lower() for k, v in want.items()}:
            raise HistosynthError(f"tissue_classes: the model was trained on {class_map_to_json(have)}, not on the "
                                  f"labels asked for {class_map_to_json(want)}", path)
    arch = ckpt["config"]["generator"]
    G = depas.TissueGenerator(arch["size"], arch["nz"], arch["widths"], arch["n_labels"], arch["kind"],
                              arch["noise_init"])
    G.load_state_dict(ckpt["generator"])
    return G.eval(), have


def generate(G: depas.TissueGenerator, n: int, seed: int, batch: int = 16) -> np.ndarray:
    """``n`` label maps uint8 (n, H, W) from ``G`` in eval mode: a pure function of (weights, seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    dev = next(G.parameters()).device
    out = []
    was = G.training
    G.eval()
    with torch.no_grad():
        for start in range(0, n, batch):
            b = min(batch, n - start)
            z = torch.randn(b, G.nz, generator=gen)
            noise = torch.randn(b, 1, *G.size, generator=gen) if G.spatial_noise else None
            y = G(z.to(dev), None if noise is None else noise.to(dev))
            out.append(G.labels(y).cpu().numpy().astype(np.uint8))
    G.train(was)
    return np.concatenate(out) if out else np.zeros((0, *G.size), np.uint8)


# -- training ---------------------------------------------------------------------------------------
def train_tissue(patch_sets: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, kind: str = "depas",
                 size: Sequence[int] = (128, 256), nz: int = 100, widths: Sequence[int] = (256, 128, 64, 32),
                 ndf: int = 32, steps: int = 2000, batch_size: int = 8, lr: float = 2e-4, anneal_every: int = 0,
                 noise_init: float = 0.1, min_area: int = 64, classes: Mapping[int, str] | None = None,
                 seed: int = 0, device: str = "auto", threads: int = 1, checkpoint_every: int = 500,
                 log_every: int = 10, sample_every: int = 500, resume: bool = True,
                 progress: bool | None = None) -> dict[str, Any]:
    """Train a tissue-layout generator on the tissue masks of ``patch_sets`` into ``out_dir`` (module docstring)."""
    from histosynth.device import select_device
    from histosynth.training import StepLoop

    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("nz", nz, 1), ("ndf", ndf, 1),
                             ("checkpoint_every", checkpoint_every, 1), ("log_every", log_every, 1),
                             ("sample_every", sample_every, 1), ("anneal_every", anneal_every, 0),
                             ("min_area", min_area, 0)):
        if int(value) < low:
            raise HistosynthError(f"{name} must be at least {low}, got {value}")
    if not lr > 0:
        raise HistosynthError(f"lr must be > 0, got {lr}")
    if kind not in depas.KINDS:
        raise HistosynthError(f"tissue model kind must be one of {depas.KINDS}, got {kind!r}")
    masks, class_map = load_tissue_masks(patch_sets, classes, min_area=min_area)
    h, w = int(size[0]), int(size[1])
    if h > masks.shape[1] or w > masks.shape[2]:
        raise HistosynthError(f"tissue mask size {h}x{w} is larger than the patches ({masks.shape[1]}x"
                              f"{masks.shape[2]}); use a smaller --size")
    n_labels = 1 + max(class_map)
    every = int(anneal_every) or depas.anneal_every_default(steps)
    dev = select_device(device, threads)
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        G = depas.TissueGenerator((h, w), nz, widths, n_labels, kind, noise_init).to(dev)
        in_ch = 1 if n_labels == 2 else n_labels
        D = depas.discriminator_for(kind, in_ch, (h, w), ndf).to(dev)
        opt_G = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_D = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
        fingerprint = [int(masks.shape[0]), int(masks.shape[1]), int(masks.shape[2]),
                       float(masks.mean(dtype=np.float64))]
        settings = {"kind": kind, "size": [h, w], "nz": int(nz), "widths": [int(c) for c in widths], "ndf": int(ndf),
                    "n_labels": int(n_labels), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
                    "data": fingerprint, "anneal_every": every, "noise_init": float(noise_init), "steps": int(steps),
                    "min_area": int(min_area), "air_threshold": int(AIR_THRESHOLD),
                    "patch_sets": [str(p) for p in patch_sets]}
        noise_gen = torch.Generator().manual_seed(int(seed) + 0x5E)
        out_dir.mkdir(parents=True, exist_ok=True)
        loop = StepLoop(out_dir, total=steps, checkpoint_every=checkpoint_every, log_every=log_every, device=dev,
                        settings=settings, keys=_RESUME_KEYS, reader=read_tissue_checkpoint, required="optimizer_G",
                        resume=resume, columns=LOG_COLUMNS, generators={"noise": noise_gen}, desc="train-tissue",
                        progress=progress)
        if loop.ckpt is not None:
            G.load_state_dict(loop.ckpt["generator"])
            D.load_state_dict(loop.ckpt["discriminator"])
            opt_G.load_state_dict(loop.ckpt["optimizer_G"])
            opt_D.load_state_dict(loop.ckpt["optimizer_D"])

        def model_dict(step: int) -> dict[str, Any]:
            return {"format": FORMAT, "version": VERSION, "step": int(step),
                    "config": {"generator": dict(G.config), "train": settings},
                    "tissue_classes": class_map_to_json(class_map),
                    "generator": {k: v.detach().cpu().clone() for k, v in G.state_dict().items()}}

        def contents() -> dict[str, Any]:
            return {**model_dict(loop.step), "train": settings,
                    "discriminator": {k: v.detach().cpu().clone() for k, v in D.state_dict().items()},
                    "optimizer_G": opt_G.state_dict(), "optimizer_D": opt_D.state_dict()}

        def train_step(step: int) -> tuple[dict[str, float], float]:
            G.set_step(step, every)
            real = depas.to_channels(torch.from_numpy(sample_batch(masks, batch_size, (h, w), seed, step)),
                                     n_labels).to(dev)
            z = torch.randn(batch_size, nz, generator=noise_gen).to(dev)
            noise = torch.randn(batch_size, 1, h, w, generator=noise_gen).to(dev) if G.spatial_noise else None
            fake = G(z, noise)
            d_real = depas.gan_loss(D(real), True)
            d_fake = depas.gan_loss(D(fake.detach()), False)
            loop.check_finite({"D_real": d_real, "D_fake": d_fake})
            opt_D.zero_grad(set_to_none=True)
            (0.5 * (d_real + d_fake)).backward()
            opt_D.step()
            D.requires_grad_(False)
            g = depas.gan_loss(D(fake), True)
            values = loop.check_finite({"G": g, "D_real": d_real, "D_fake": d_fake})
            opt_G.zero_grad(set_to_none=True)
            g.backward()
            opt_G.step()
            D.requires_grad_(True)
            values.update(delta=float(G.block.delta), temperature=float(G.block.temperature))
            return values, lr

        def after_step(step: int) -> None:
            if step % sample_every == 0:
                plot_samples(G, masks, out_dir / "samples.png", seed, f"{kind}, step {step}")

        log.info("training %s tissue generator %dx%d (%d labels) on %d masks of %s; %d steps on %s, anneal every %d",
                 kind, h, w, n_labels, len(masks), "x".join(map(str, masks.shape[1:])), steps, dev, every)
        t0 = time.perf_counter()
        G.train()
        D.train()
        loop.run(train_step, contents, after_step=after_step)
        seconds = time.perf_counter() - t0
        plot_samples(G, masks, out_dir / "samples.png", seed, f"{kind}, step {loop.step} (final)")
        atomic_torch_save(model_dict(loop.step), out_dir / "tissue.pt")
        loop.log.write()
    final = loop.log.rows[-1] if loop.log.rows else {}
    return {"stage": "train_tissue", "out_dir": str(out_dir), "kind": kind, "step": loop.step, "masks": len(masks),
            "seconds": seconds, "seconds_per_step": loop.log.seconds_per_step(),
            **{k: final.get(k, float("nan")) for k in ("G", "D_real", "D_fake")}}


def plot_samples(G: depas.TissueGenerator, masks: np.ndarray, path: Path, seed: int, title: str, n: int = 4) -> None:
    """samples.png: a row of real crops above a row of generated masks (grey levels = labels, black = air)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histosynth.figures import save_figure

    fake = generate(G, n, seed + 0x5A)
    real = sample_batch(masks, n, G.size, seed, -1)
    top = max(1, G.n_labels - 1)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n * G.size[1] / G.size[0], 4.6), squeeze=False)
    for row, (name, arr) in enumerate((("real", real), ("generated", fake))):
        for i in range(n):
            ax = axes[row][i]
            ax.imshow(arr[i], cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name)
    fig.suptitle(title)
    save_figure(fig, path)


# -- sampling ---------------------------------------------------------------------------------------
def sample_tissue(model: str | os.PathLike, out_dir: str | os.PathLike, n: int, seed: int = 0, batch: int = 16,
                  classes: Mapping[int, str] | None = None, device: str = "cpu", threads: int = 1) -> dict[str, Any]:
    """``n`` tissue masks from ``model`` as a patch set with ``tissue.npy`` (0 = air) and ``tissue_classes``."""
    from histosynth.device import select_device

    if n < 1 or batch < 1:
        raise HistosynthError(f"--n and --batch must be at least 1, got {n} and {batch}")
    G, class_map = load_tissue_model(model, classes)
    G.to(select_device(device, threads))
    masks = generate(G, n, seed, batch)
    h, w = G.size
    with PatchSetWriter(out_dir, arrays=("tissue",), patch_size=(h, w)) as writer:
        for i, m in enumerate(masks):
            writer.add({"slide": "synthetic", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": np.nan,
                        "width": w, "height": h, "tissue_fraction": float((m > 0).mean()), "n_nuclei": 0,
                        "source": f"tissue-{i}"}, tissue=m)
        writer.report = {"stage": "sample_tissue", "model": str(model), "n": int(n), "seed": int(seed),
                         "kind": G.kind, "tissue_classes": class_map_to_json(class_map),
                         "tissue_fraction_mean": float((masks > 0).mean())}
    return writer.report
