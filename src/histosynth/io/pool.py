"""A pool of training patches: several paired patch sets opened as one, memory-mapped.

The GAN (:mod:`histosynth.gan.train`) and the segmenter
(:mod:`histosynth.segmentation.segmenter`) draw their batches from a
:class:`PatchPool`. :func:`load_pool` opens the patch sets (images, inst and
types, all of one patch size) and gives each patch an *option* (the stain /
domain its slide is assigned, ``"default"`` for slides without one);
:func:`pool_fingerprint` identifies the data a checkpoint was trained on;
:func:`max_type` is the largest type id in the pool; :func:`dihedral` is the
flip / 90° rotation every trainer augments with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from histosynth.errors import HistosynthError
from histosynth.io.patchset import read_paired_sets

log = logging.getLogger(__name__)


@dataclass
class PatchPool:
    """The training patches of several patch sets (memory-mapped) and each patch's option index."""

    paths: list[str]  # the patch sets, as given
    images: list[np.ndarray]
    inst: list[np.ndarray]
    types: list[np.ndarray]
    option: list[np.ndarray]  # per set, per patch: index into ``options``
    offsets: np.ndarray  # cumulative patch counts, len = sets + 1
    options: list[str]  # sorted option names
    size: tuple[int, int]  # patch (height, width)
    indexes: list[pd.DataFrame] = field(default_factory=list)  # each set's index.csv
    members: np.ndarray | None = None  # the global patch numbers in the pool (None: all); see :func:`subset`
    tissue: list[np.ndarray | None] = field(default_factory=list)  # per set: its tissue.npy, None when absent

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.members is None else len(self.members)

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(set index, patch index within the set) of pool indices ``k``."""
        if self.members is not None:
            k = self.members[k]
        s = np.searchsorted(self.offsets, k, side="right") - 1
        return s, k - self.offsets[s]


def subset(pool: PatchPool, keep: Sequence[np.ndarray]) -> PatchPool:
    """The pool restricted to the patches ``keep[i]`` (row numbers) of each patch set ``i``."""
    if len(keep) != len(pool.images):
        raise ValueError(f"subset needs one array of rows per patch set ({len(pool.images)}), got {len(keep)}")
    members = np.concatenate([pool.offsets[i] + np.asarray(rows, np.int64) for i, rows in enumerate(keep)]
                             + [np.zeros(0, np.int64)])
    if pool.members is not None:
        members = np.intersect1d(members, pool.members)
    return dataclasses.replace(pool, members=np.sort(members))


def load_pool(patch_sets: Sequence[str | os.PathLike], options: dict[str, str] | None = None) -> PatchPool:
    """Open the patch sets (images, inst and types required, all of one patch size) as one pool.

    ``options`` maps slide → option name; slides without an entry get
    ``"default"``, and entries for slides not in the data are logged and ignored.
    """
    sets = read_paired_sets(patch_sets)
    sizes = {ps.images.shape[1:3] for ps in sets}
    if len(sizes) > 1:
        raise HistosynthError(f"patch sets of different patch sizes {sorted(sizes)}: "
                              + ", ".join(f"{ps.path} {ps.images.shape[1:3]}" for ps in sets))
    options = dict(options or {})
    slide_names = [ps.index["slide"].astype(str).to_numpy() for ps in sets]
    all_slides = set(np.concatenate(slide_names).tolist())
    unused = sorted(set(options) - all_slides)
    if unused:
        log.warning("options for slides not in the training data (ignored): %s", ", ".join(unused))
    per_patch = [np.array([options.get(s, "default") for s in names], dtype=object) for names in slide_names]
    names = sorted(set(np.concatenate(per_patch).tolist()))
    lookup = {n: i for i, n in enumerate(names)}
    return PatchPool(
        paths=[os.fspath(p) for p in patch_sets],
        images=[ps.images for ps in sets], inst=[ps.inst for ps in sets], types=[ps.types for ps in sets],
        option=[np.array([lookup[o] for o in opts], dtype=np.int64) for opts in per_patch],
        offsets=np.concatenate([[0], np.cumsum([len(ps) for ps in sets])]).astype(np.int64),
        options=names, size=tuple(int(v) for v in next(iter(sizes))), indexes=[ps.index for ps in sets],
        tissue=[ps.tissue for ps in sets],
    )


def pool_fingerprint(pool: PatchPool) -> str:
    """SHA-1 of the patch sets' absolute paths, shapes and first and last images: cheap, catches a re-tiled set."""
    h = hashlib.sha1()
    for p, img in zip(pool.paths, pool.images):
        h.update(os.path.abspath(p).encode())
        h.update(str(img.shape).encode())
        if len(img):
            h.update(np.ascontiguousarray(img[0]).tobytes())
            h.update(np.ascontiguousarray(img[-1]).tobytes())
    if pool.members is not None:
        h.update(np.ascontiguousarray(pool.members, np.int64).tobytes())
    return h.hexdigest()


def max_type(pool: PatchPool) -> int:
    """The largest type id in the pool's type maps (0 when untyped), read 256 patches at a time."""
    top = 0
    for t in pool.types:
        for start in range(0, len(t), 256):
            top = max(top, int(t[start : start + 256].max()))
    return top


def dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips / 90° rotations of the first two axes of ``a`` (a view).

    ``k`` in 0..7: ``k % 4`` quarter turns (``np.rot90``), then the columns
    reversed when ``k >= 4``.
    """
    k = int(k)
    a = np.rot90(a, k % 4)
    return a[:, ::-1] if k >= 4 else a
