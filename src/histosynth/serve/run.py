"""The trained models of a finished run, loaded once for the page (``histosynth serve RESULTS_DIR``).

A results folder (the DAG's ``results/``) holds, each optional but the GAN:

- ``models/gan*/gan.pt`` and ``models/gan*/checkpoint.pt``: the generator checkpoints the page offers
  (``gan.pt`` is the final generator, the EMA one when training kept one; ``checkpoint.pt`` the last
  training checkpoint). One is needed: without it the run cannot paint and :class:`RunModels` refuses.
- ``stats/stats.json``: the fitted statistics; with them the page can **sample** a mask
  (:func:`histosynth.masks.sampling.sample_masks`, type mix and density on request).
- ``models/dvae/dvae.pt``: the β-VAE; it decodes the sampled nuclei's shapes (fitted ellipses without
  it) and the shapes offered for drawing.
- ``library/nuclei.npz``: the nucleus shape library; its shapes are offered for drawing when there is no
  β-VAE.

Generators are loaded on first use and kept (one per checkpoint); painting is
:func:`histosynth.gan.translate.paint`, the step ``translate`` runs, one call at a time (a lock: the
torch threads are the server's, shared by every request). A generator trained with the tissue channel
(``gan.tissue_channel``) is given an all-tissue layout: a drawn, uploaded or sampled mask of the page has no
tissue / air layout, so the whole canvas is painted as tissue (as a generator without the channel paints it);
the paint's answer says so (``tissue: "all"``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError

log = logging.getLogger(__name__)

#: the canvas sides the page offers (those the generator's size multiple divides)
SIDES = (256, 512)
#: shapes offered for drawing
N_SHAPES = 12
#: masks kept for painting and download (least recently used dropped first)
MASK_CACHE = 64
CHECKPOINT_NAMES = ("gan.pt", "checkpoint.pt")


@dataclass
class Mask:
    """A mask on the page: instance and type maps and where it came from."""

    inst: np.ndarray  # int32 (H, W), ids 1..n
    types: np.ndarray  # uint8 (H, W)
    origin: str  # "drawn", "sampled (...)", "uploaded name"
    #: what is drawn of it for the page, made once per mask however often it is painted (serve.masks)
    pictures: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_nuclei(self) -> int:
        return int(self.inst.max(initial=0))


def find_checkpoints(results: Path) -> dict[str, Path]:
    """name (path under ``models/``) -> file, for every GAN checkpoint of the run, ``gan.pt`` first."""
    models = results / "models"
    found: dict[str, Path] = {}
    if models.is_dir():
        for folder in sorted(p for p in models.iterdir() if p.is_dir() and p.name.startswith("gan")):
            for name in CHECKPOINT_NAMES:
                if (folder / name).is_file():
                    found[f"{folder.name}/{name}"] = folder / name
    return found


class RunModels:
    """What the page needs of the results folder ``results`` (see the module docstring)."""

    def __init__(self, results: str | os.PathLike, device: str = "cpu"):
        self.root = Path(results)
        if not self.root.is_dir():
            raise HistosynthError("no such results folder", self.root)
        self.device = device
        self.checkpoints = find_checkpoints(self.root)
        if not self.checkpoints:
            raise HistosynthError("no GAN in this results folder (expected models/gan/gan.pt from train-gan): "
                                  "the page has nothing to paint with", self.root)
        self.lock = threading.Lock()  # one generator / decoder call at a time
        self._gans: dict[str, Any] = {}
        self.masks: OrderedDict[str, Mask] = OrderedDict()
        self._masks_lock = threading.Lock()
        self._next = 0
        # the default generator is loaded now: a broken checkpoint stops the server before it serves
        self.default = next(iter(self.checkpoints))
        first = self.gan(self.default)
        self.classes: dict[int, str] = {int(k): str(v) for k, v in dict(first.classes).items()}
        self.stats = self._load_stats()
        self.dvae_path = self.root / "models" / "dvae" / "dvae.pt"
        self.shape_source, self.shape_source_name = self._shape_source()
        self.shapes = self._drawing_shapes()

    # -- models --------------------------------------------------------------------------------------------
    def gan(self, name: str | None = None) -> Any:
        """The loaded generator bundle of checkpoint ``name`` (default: the first, ``gan/gan.pt``)."""
        from histosynth.models.pix2pix import load_gan

        name = name or self.default
        if name not in self.checkpoints:
            raise HistosynthError(f"unknown generator checkpoint {name!r}; this run has "
                                  f"{', '.join(self.checkpoints)}")
        loaded = self._gans.get(name)
        if loaded is not None:  # no waiting for the lock (held while painting) for a loaded generator
            return loaded
        with self.lock:
            if name not in self._gans:
                self._gans[name] = load_gan(self.checkpoints[name], device=self.device)
                log.info("loaded %s (step %d, options %s)", self.checkpoints[name], self._gans[name].step,
                         self._gans[name].options)
            return self._gans[name]

    def describe(self, name: str) -> dict[str, Any]:
        """What the page says of checkpoint ``name``: step, generator, styles, EMA."""
        from histosynth.gan.translate import size_multiple

        b = self.gan(name)
        gen = dict(b.config.get("generator", {}))
        train = b.config.get("train") if isinstance(b.config.get("train"), dict) else {}
        multiple = size_multiple(b)
        return {"name": name, "path": str(self.checkpoints[name]), "step": int(b.step),
                "generator": str(gen.get("kind", "unet")), "styles": list(b.options),
                "ema": float(train.get("ema", 0.0) or 0.0) if name.endswith("gan.pt") else 0.0,
                "sides": [s for s in SIDES if s % multiple == 0], "n_types": int(b.n_types)}

    def _load_stats(self) -> dict[str, Any] | None:
        from histosynth.masks.statsfile import load_stats

        path = self.root / "stats" / "stats.json"
        if not path.is_file():
            log.info("no %s: sampling is off", path)
            return None
        return load_stats(path)

    def _shape_source(self) -> tuple[Any, str | None]:
        from histosynth.masks.shapes import build_shape_source

        if self.stats is None:
            return None, None
        if self.dvae_path.is_file():
            source, name, _ = build_shape_source(str(self.dvae_path), self.stats, 0.5,
                                                 threads=_torch_threads(), precision="float32")
            return source, name
        source, name, _ = build_shape_source("ellipses", self.stats, 0.5)
        return source, name

    def _drawing_shapes(self) -> tuple[np.ndarray, str]:
        """bool (k, 64, 64) shapes offered for drawing and where they came from (none: ellipses only)."""
        rng = np.random.default_rng(0)
        types = np.array([sorted(self.classes)[i % max(1, len(self.classes))] if self.classes else 1
                          for i in range(N_SHAPES)])
        if self.dvae_path.is_file():
            from histosynth.masks.shapes import clean_shapes, dvae_source
            from histosynth.models.dvae import load_dvae

            shapes = clean_shapes(dvae_source(load_dvae(self.dvae_path, device="cpu"), 0.5,
                                              precision="float32")(N_SHAPES, types, rng))
            keep = shapes.reshape(len(shapes), -1).sum(1) >= 9
            if keep.any():
                return shapes[keep], "β-VAE"
        library = self.root / "library" / "nuclei.npz"
        if library.is_file():
            from histosynth.masks.library import load_library

            lib = load_library(library)
            pick = rng.choice(len(lib), size=min(N_SHAPES, len(lib)), replace=False)
            return lib.shapes[np.sort(pick)] > 0, "library"
        return np.zeros((0, 64, 64), bool), "none"

    # -- masks ---------------------------------------------------------------------------------------------
    def keep(self, mask: Mask) -> str:
        """Store ``mask`` for later requests; its id."""
        with self._masks_lock:
            self._next += 1
            key = f"m{self._next}"
            self.masks[key] = mask
            while len(self.masks) > MASK_CACHE:
                self.masks.popitem(last=False)
            return key

    def mask(self, key: str) -> Mask:
        with self._masks_lock:
            if key not in self.masks:
                raise KeyError(key)
            self.masks.move_to_end(key)
            return self.masks[key]

    # -- painting and sampling -------------------------------------------------------------------------------
    def paint(self, mask: Mask, style: str | None, checkpoint: str | None, seed: int = 0) -> tuple[np.ndarray, dict]:
        """The H&E image (H, W, 3) uint8 of ``mask`` in ``style``, and what made it."""
        from histosynth.gan.translate import paint, size_multiple

        name = checkpoint or self.default
        bundle = self.gan(name)
        options = list(bundle.options)
        style = style or options[0]
        if style not in options:
            raise HistosynthError(f"unknown style {style!r}: the generator {name} was trained with "
                                  f"{', '.join(options)}")
        h, w = mask.inst.shape
        multiple = size_multiple(bundle)
        if h % multiple or w % multiple:
            raise HistosynthError(f"the mask is {w} x {h} px; the generator {name} needs sides divisible by "
                                  f"{multiple}")
        top = int(mask.types.max(initial=0))
        if top > int(bundle.n_types):
            raise HistosynthError(f"the mask holds type id {top}; the generator knows type ids 1..{bundle.n_types} "
                                  f"({', '.join(self.classes.values())})")
        # the page's masks have no tissue layout: a generator with the tissue channel paints all of it as tissue
        tissue = np.ones((1, h, w), np.uint8) if getattr(bundle, "tissue", False) else None
        with self.lock:
            image = paint(bundle, mask.inst[None], mask.types[None], [options.index(style)], seed=seed,
                          device=self.device, tissue=tissue)[0]
        return image, {"run": str(self.root), "checkpoint": name, "path": str(self.checkpoints[name]),
                       "step": int(bundle.step), "generator": str(bundle.config.get("generator", {}).get("kind")),
                       "style": style, "seed": int(seed), **({"tissue": "all"} if tissue is not None else {})}

    def sample(self, side: int, type_mix: dict[str, float] | None, density: float, seed: int,
               method: str = "statistical") -> Mask:
        """One mask from the fitted sampler (``sample_masks``), with the type mix and density asked for."""
        from histosynth.masks.sampling import sample_masks

        if self.stats is None:
            raise HistosynthError("this run has no fitted statistics (stats/stats.json): sampling is off",
                                  self.root)
        with self.lock:
            out = sample_masks(self.stats, self.shape_source, 1, side, seed, type_mix=type_mix or None,
                               density=density, method=method, source_name=self.shape_source_name or "")
        request = ", ".join(f"{k} {v:.0%}" for k, v in (type_mix or {}).items())
        origin = f"sampled ({method}, seed {seed}, density {density:g}{', ' + request if request else ''})"
        return Mask(out["inst"][0].astype(np.int32), out["types"][0].astype(np.uint8), origin)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
