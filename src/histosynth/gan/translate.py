"""translate: paint synthetic masks into H&E images with the trained pix2pix GAN.

``histosynth translate GAN MASKS OUT`` reads a mask patch set (``inst.npy`` +
``types.npy``, e.g. a ``sample-masks`` shard), builds the generator's
conditioning for each mask (:func:`histosynth.gan.conditioning.build_conditioning`),
runs the generator in batches (memory bounded by one batch) and writes a full
patch set (``images.npy`` + ``inst.npy`` + ``types.npy``). ``inst`` and
``types`` are copied unchanged; ``index.csv`` keeps the mask rows (and their
extra columns), adds an ``option`` column (the option *name* each patch was
painted with) and sets ``source = "translate <gan> seed S"``.

Option assignment (the stain / domain each mask is painted in)
--------------------------------------------------------------
- no ``--option``: every mask gets the model's **first** option (its
  reference domain; for a single-option model the only one);
- ``--option NAME``: every mask gets ``NAME``;
- ``--option A --option B ...``: a **balanced, shuffled mix**: the list is
  repeated to cover the N masks (so the counts differ by at most one, and a
  name given twice gets twice the share), then shuffled with the seed;
- ``--option all`` or ``--mix``: the same with every option the model knows.

An option the model was not trained with is an error that lists the known
ones. The assignment depends only on (N, options, seed), not on ``--batch``.

Determinism
-----------
The same masks, model and seed give the same images on the CPU. The noise
channel (when the model has one) is drawn per *patch* from a generator seeded
by (seed, patch index), so it does not depend on the batch size. Dropout
draws (pix2pix keeps dropout at inference) are seeded per batch from (seed,
batch start) through ``generate(..., seed=)`` (or a forked global RNG), so a
model with dropout is reproducible for a given ``--batch``; one without
dropout gives the same images for any ``--batch``.

Tissue channel
--------------
A GAN trained with ``gan.tissue_channel`` (its checkpoint says ``tissue: True``) is conditioned on the
masks' tissue layout as well (+1 tissue, −1 air; :mod:`histosynth.gan.conditioning`), so that air is
painted as air. ``translate`` takes it from the mask set's ``tissue.npy`` (``sample-masks --tissue`` writes
it: the layout the nuclei were placed in); a mask set without ``tissue.npy`` but with ``images.npy`` (the
real patches of ``translate_test_masks`` / ``translate_train_masks``) gets it from its own images, with the
rule the training crops had (:func:`histosynth.gan.conditioning.tissue_from_images`: grey > 204 = air). A
set with neither is an error naming ``tissue.npy`` — never a silent all-tissue. A GAN without the channel
ignores any ``tissue.npy``. The report says where the layout came from (``tissue``).

A ``montage.png`` (per option: a row of masks coloured by type above a row of
the images painted from them, up to 8 each) is written beside the patch set,
at ``<OUT>.montage.png`` unless ``--montage`` names another path.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.labels import class_map_to_json, report_class_map
from histosynth.io.patchset import PatchSetWriter, read_patchset

log = logging.getLogger(__name__)

MONTAGE_PER_OPTION = 8
MONTAGE_TILE = 128
#: config keys that may say how many times the generator halves its input
_DEPTH_KEYS = ("n_down", "num_downs", "n_downs", "depth", "downs")


# --------------------------------------------------------------------------- options
def assign_options(n: int, model_options: Sequence[str], requested: Sequence[str] | None,
                   seed: int = 0) -> np.ndarray:
    """Option id (index into ``model_options``) for each of ``n`` masks, by the module's rule."""
    model_options = [str(o) for o in model_options]
    if not model_options:
        raise HistosynthError("the GAN lists no options")
    requested = [str(o) for o in (requested or [])]
    if not requested:
        return np.zeros(n, dtype=np.int64)
    if "all" in requested:
        if len(requested) > 1:
            raise HistosynthError(f"option 'all' cannot be combined with other names, got {requested}")
        requested = list(model_options)
    unknown = [o for o in requested if o not in model_options]
    if unknown:
        raise HistosynthError(f"unknown option(s) {unknown}; the GAN was trained with {model_options}")
    ids = np.array([model_options.index(o) for o in requested], dtype=np.int64)
    if len(ids) == 1:
        return np.full(n, ids[0], dtype=np.int64)
    assigned = np.resize(ids, n)
    np.random.default_rng([int(seed), 0x0F7]).shuffle(assigned)
    return assigned


# --------------------------------------------------------------------------- GAN plumbing
def size_multiple(bundle: Any) -> int:
    """The factor the generator needs H and W divisible by (1 when the bundle does not say)."""
    for holder in (bundle, getattr(bundle, "generator", None)):
        for attr in ("size_multiple", "multiple"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and value > 0:
                return int(value)
    config = getattr(bundle, "config", None) or {}
    if config.get("size_multiple"):
        return int(config["size_multiple"])
    for source in (config, config.get("generator") if isinstance(config.get("generator"), dict) else {}):
        for key in _DEPTH_KEYS:
            if isinstance(source.get(key), int):
                return 2 ** int(source[key])
    return 1


def _default_api() -> tuple[Callable, Callable, Callable]:
    try:
        from histosynth.gan.conditioning import build_conditioning
        from histosynth.models.pix2pix import generate, load_gan
    except ImportError as err:  # pragma: no cover - the GAN modules ship with the package
        raise HistosynthError(f"the GAN modules are not available ({err})") from err
    return build_conditioning, generate, load_gan


def _to_uint8(images: Any) -> np.ndarray:
    """Generator output (N, 3, H, W) in [-1, 1] → uint8 (N, H, W, 3)."""
    import torch

    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _patch_generator(seed: int, index: int):
    import torch

    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([int(seed), int(index), 0x7A]).generate_state(1)[0]))
    return g


def paint(bundle: Any, inst: np.ndarray, types: np.ndarray, options: np.ndarray | Sequence[int], *, seed: int = 0,
          first: int = 0, device: Any = "cpu", conditioner: Callable | None = None,
          generate_fn: Callable | None = None, where: str | os.PathLike | None = None,
          tissue: np.ndarray | None = None) -> np.ndarray:
    """Paint masks ``inst`` / ``types`` (N, H, W) with option ids ``options`` (N,): uint8 images (N, H, W, 3).

    The one painting step of :func:`translate` (and of ``histosynth serve``): per mask the conditioning
    (its noise channel drawn from (seed, ``first`` + i), the mask's index in its set), then one generator
    call for the batch, its dropout seeded by (seed, ``first``), under ``torch.no_grad``. ``tissue``
    (N, H, W), > 0 = tissue, is required by a GAN with the tissue channel (``bundle.tissue``) and ignored
    by one without.
    """
    import torch

    if conditioner is None or generate_fn is None:
        build, gen, _ = _default_api()
        conditioner = conditioner or build
        generate_fn = generate_fn or gen
    dev = torch.device(device) if isinstance(device, str) else device
    n, h, w = np.shape(inst)
    n_options = len(bundle.options)
    n_types = int(bundle.n_types)
    noise = bool(getattr(bundle, "noise", False))
    opt = np.asarray(options, dtype=np.int64).reshape(-1)
    extra: list[dict[str, Any]] = [{} for _ in range(n)]
    if getattr(bundle, "tissue", False):
        if tissue is None:
            raise HistosynthError("this GAN takes the tissue channel: give the masks' tissue layouts", where)
        if np.shape(tissue) != (n, h, w):
            raise HistosynthError(f"tissue layouts of shape {np.shape(tissue)} for masks {(n, h, w)}", where)
        extra = [{"tissue": np.asarray(tissue[i:i + 1])} for i in range(n)]
    cond = torch.cat([
        conditioner(inst[i:i + 1], types[i:i + 1], n_types, int(opt[i]), n_options,
                    noise=noise, generator=_patch_generator(seed, first + i) if noise else None, **extra[i])
        for i in range(n)
    ])
    batch_seed = int(np.random.SeedSequence([int(seed), int(first), 0x5D]).generate_state(1)[0])
    with torch.no_grad():
        if "seed" in inspect.signature(generate_fn).parameters:
            out = generate_fn(bundle, cond.to(dev), seed=batch_seed)
        else:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(batch_seed)
                out = generate_fn(bundle, cond.to(dev))
    images = _to_uint8(out)
    if images.shape != (n, h, w, 3):
        raise HistosynthError(f"the generator returned images of shape {images.shape}, expected {(n, h, w, 3)}",
                              where)
    return images


# --------------------------------------------------------------------------- montage
def type_colour_image(inst: np.ndarray, types: np.ndarray) -> np.ndarray:
    """A mask drawn for people: nuclei filled with their type's colour, outlined in black, on white."""
    from skimage.segmentation import find_boundaries

    from histosynth.patches.export import PALETTE

    out = np.full((*inst.shape, 3), 255, np.uint8)
    fg = inst > 0
    ids = np.clip(np.asarray(types, dtype=np.intp), 1, len(PALETTE) - 1)
    out[fg] = PALETTE[ids[fg]]
    out[find_boundaries(inst, mode="inner") & fg] = 0
    return out


def _tile(img: np.ndarray) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    scale = MONTAGE_TILE / max(h, w)
    if scale < 1:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return img


def write_montage(samples: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
                  path: str | os.PathLike) -> Path:
    """Per option: masks coloured by type (top row) above the images painted from them."""
    import cv2

    path = Path(path)
    blocks = []
    width = 0
    for name, items in samples.items():
        masks = [_tile(type_colour_image(inst, typ)) for inst, typ, _ in items]
        imgs = [_tile(np.asarray(img)) for _, _, img in items]
        h, w = masks[0].shape[:2]
        gap = np.full((h, 2, 3), 255, np.uint8)

        def strip(tiles: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1)

        body = np.concatenate([strip(masks), np.full((2, strip(masks).shape[1], 3), 255, np.uint8), strip(imgs)])
        label = np.full((22, body.shape[1], 3), 255, np.uint8)
        cv2.putText(label, f"option {name}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        blocks.append(np.concatenate([label, body]))
        width = max(width, body.shape[1])
    blocks = [np.pad(b, ((0, 6), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in blocks]
    canvas = np.concatenate(blocks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise HistosynthError("could not write the montage", path)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- translate
def translate(
    gan: str | os.PathLike | Any,
    masks_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    options: Sequence[str] | None = None,
    batch: int = 16,
    seed: int = 0,
    device: str = "auto",
    threads: int = 1,
    montage: bool = True,
    montage_path: str | os.PathLike | None = None,
    progress: bool = False,
    conditioner: Callable | None = None,
    generate_fn: Callable | None = None,
) -> dict[str, Any]:
    """Paint the mask patch set at ``masks_dir`` into a full patch set at ``out_dir``.

    ``gan`` is a checkpoint path (loaded with :func:`histosynth.models.pix2pix.load_gan`)
    or an already loaded bundle with ``generator``, ``options``, ``n_types``,
    ``noise``, ``classes`` and ``config``. ``conditioner`` and ``generate_fn``
    default to :func:`histosynth.gan.conditioning.build_conditioning` and
    :func:`histosynth.models.pix2pix.generate`. Returns the report (also in
    ``report.json``).
    """
    from tqdm import tqdm

    from histosynth.device import select_device

    if batch < 1:
        raise HistosynthError(f"batch must be at least 1, got {batch}")
    dev = select_device(device, threads)
    if conditioner is None or generate_fn is None or isinstance(gan, (str, os.PathLike)):
        build, gen, load = _default_api()
        conditioner = conditioner or build
        generate_fn = generate_fn or gen
    if isinstance(gan, (str, os.PathLike)):
        if not Path(gan).is_file():
            raise HistosynthError("no such GAN checkpoint", gan)
        bundle = load(gan, device=str(dev))
        gan_name = Path(gan).name
    else:
        bundle = gan
        gan_name = str((getattr(bundle, "config", None) or {}).get("name", "gan"))

    masks = read_patchset(masks_dir, require=("inst", "types"))
    n = len(masks)
    h, w = masks.inst.shape[1:3]
    model_options = [str(o) for o in bundle.options]
    n_types = int(bundle.n_types)
    assigned = assign_options(n, model_options, options, seed)

    multiple = size_multiple(bundle)
    if h % multiple or w % multiple:
        raise HistosynthError(f"masks are {h}x{w} px; the generator needs sides divisible by {multiple}",
                              masks_dir)
    for start in range(0, n, 4096):
        top = int(np.max(masks.types[start:start + 4096]))
        if top > n_types:
            raise HistosynthError(f"masks hold type id {top}; the GAN knows type ids 1..{n_types} "
                                  f"({getattr(bundle, 'classes', {})})", masks_dir)

    noise = bool(getattr(bundle, "noise", False))
    tissue_source = None
    if getattr(bundle, "tissue", False):
        if masks.tissue is not None:
            tissue_source = "tissue.npy"
            if masks.tissue.shape != masks.inst.shape:
                raise HistosynthError(f"tissue.npy is {masks.tissue.shape}, inst.npy {masks.inst.shape}", masks_dir)
        elif masks.images is not None:
            tissue_source = "images"
        else:
            raise HistosynthError(
                "this GAN was trained with the tissue channel (gan.tissue_channel) and needs the masks' tissue "
                f"layout, but {Path(masks_dir) / 'tissue.npy'} does not exist (and there are no images to make it "
                "from); sample the masks inside tissue layouts: sample-masks ... --tissue TISSUE_MODEL_OR_SET "
                "(in the DAG: tissue.enabled: true)", masks_dir)
        log.info("tissue channel from the mask set's %s", tissue_source)
    out_dir = Path(out_dir)
    montage_path = Path(montage_path) if montage_path is not None else out_dir.with_name(out_dir.name + ".montage.png")
    samples: dict[str, list] = {}
    counts = {name: int(np.sum(assigned == i)) for i, name in enumerate(model_options)}
    report: dict[str, Any] = {
        "stage": "translate", "gan": str(gan) if isinstance(gan, (str, os.PathLike)) else gan_name,
        "masks": str(masks_dir), "n": n, "seed": int(seed), "batch": int(batch), "device": str(dev),
        "options_requested": list(options or []), "option_counts": counts, "noise": noise,
        **({"tissue": tissue_source} if tissue_source else {}),
        "classes": class_map_to_json(dict(getattr(bundle, "classes", {}) or {})),
    }
    if "classes" in masks.report:
        report["mask_classes"] = class_map_to_json(report_class_map(masks.report, masks.path / "report.json"))
    extra = [c for c in masks.index.columns if c not in ("option",)] + ["option"]
    source = f"translate {gan_name} seed {seed}"
    bar = tqdm(total=n, desc="translate", disable=not progress)
    with PatchSetWriter(out_dir, ("images", "inst", "types"), (h, w), extra_columns=tuple(extra)) as writer:
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            inst = np.array(masks.inst[start:stop])
            typ = np.array(masks.types[start:stop])
            opt = assigned[start:stop]
            layout = None
            if tissue_source == "tissue.npy":
                layout = np.array(masks.tissue[start:stop])
            elif tissue_source == "images":
                from histosynth.gan.conditioning import tissue_from_images

                layout = tissue_from_images(np.array(masks.images[start:stop]))
            images = paint(bundle, inst, typ, opt, seed=seed, first=start, device=dev, conditioner=conditioner,
                           generate_fn=generate_fn, where=masks_dir, tissue=layout)
            rows = masks.index.iloc[start:stop].to_dict("records")
            for i, row in enumerate(rows):
                name = model_options[int(opt[i])]
                row = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                row.update(source=source, option=name)
                writer.add(row, images=images[i], inst=inst[i], types=typ[i])
                if montage and len(samples.setdefault(name, [])) < MONTAGE_PER_OPTION:
                    samples[name].append((inst[i].copy(), typ[i].copy(), images[i].copy()))
            bar.update(stop - start)
        bar.close()
        writer.report = report
    if montage and samples:
        write_montage({o: samples[o] for o in model_options if o in samples}, montage_path)
        report["montage"] = str(montage_path)
    log.info("translated %d masks with %s into %s (options %s)", n, gan_name, out_dir, counts)
    return report
