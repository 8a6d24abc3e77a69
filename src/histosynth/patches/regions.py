"""Tissue regions from annotations → the multi-label ``tissue.npy`` of a patch set (seed 002, DEPAS).

``histosynth rasterize ... --tissue-regions tumor=1 stroma=2`` (config ``rasterize.tissue_regions``,
``{tumor: 1, stroma: 2}``) fills the polygons of the named annotation classes into ``tissue.npy`` uint8
(N, H, W) of the output patch set, and writes ``report.json`` ``tissue_classes`` ``{"1": "tumor",
"2": "stroma"}``: the labels that ``histosynth train-tissue`` (:func:`histosynth.masks.tissue.load_tissue_masks`)
trains a multi-label DEPAS generator on (``n_labels`` = 1 + the largest label).

Where the regions come from
---------------------------
From the nuclei's own annotation file by default (QuPath GeoJSON classifications, ImageScope layers, ASAP
``PartOfGroup`` groups: whatever class name the reader of :mod:`histosynth.io.annotations` gives), or from
a separate file (``--regions-file``, any format that reader knows). A separate file is what users often
have: region outlines are drawn at low magnification by other people (e.g. Camelyon's ASAP XML with
tissue / background groups), while the nuclei come from a cell-level tool. In a separate regions file,
items of classes not named are ignored (counted as ``other_items`` in the report); in the nuclei file
they are nuclei as before. Either way, items of the region classes are taken OUT of the nuclei
(``annotations.read(..., exclude_classes=...)``, counted as the parse report's ``excluded_classes``
and logged): a tumour outline is never drawn as a giant nucleus. (Regions in the nuclei file make the
stage read that file twice, once for each; region files are small, nuclei files can be large.) Class names are matched as nuclei
classes are: case-insensitively, ignoring the ``nuclei_`` / ``nucleus_`` / ``cell_`` prefixes.

The file is read through the one annotation reader, so regions get its treatment: repaired when
self-intersecting (largest piece kept), clipped to the slide, degenerate items skipped; a GeoJSON
``MultiPolygon`` keeps its largest part (the reader's nucleus rule; export multi-part regions as
several features). Holes (polygon interiors, e.g. GeoJSON) are holes.

Pixels, labels and overlaps
---------------------------
Polygons are filled with the exact pixel-centre rule of :mod:`histosynth.patches.rasterize` on the same
tiles, with the same transform as the nuclei: patch pixel (r, c) is labelled when its level-0 centre
``(x + (c + 0.5)·downsample, y + (r + 0.5)·downsample)`` lies in the closed polygon, so the slide's and the
patch's mpp are taken care of by the tile's ``downsample``. Where regions overlap, **the smallest
polygon (by area) wins** (ties: the earlier item in the file) - the nuclei's rule, and the one that
matches how regions are drawn: an artifact or background outline drawn inside a tissue outline cuts it
out. A hole of a polygon is not part of it, so it shows whatever else covers it, else air.

**Outside every region is air (0)**; nothing falls back to the grey-threshold mask of the tiles. To
label the area around the regions, annotate it and map it, e.g. ``--tissue-regions tumor=1
background=2``.

Bad input
---------
A label below 1 or above 255, a label given to two names, a name given twice or a pair that is not
``NAME=LABEL`` is one :class:`~histosynth.errors.HistosynthError` naming ``--tissue-regions``
(:func:`parse_tissue_regions`). A regions file that does not parse is the reader's one error naming the
file; the rasterize stage writes nothing then (the patch set is written atomically, after both files
were read). A requested class without any polygon in the file is a warning, counted in the report
(``tissue_regions.missing``), not an error: a slide may hold no tumour. A slide none of whose tiles gets
any region pixel is logged as a warning and counted (``tissue_regions.patches_with_regions`` 0);
:func:`histosynth.masks.tissue.load_tissue_masks` refuses to train when every mask of the run is air.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io import annotations
from histosynth.io.annotations import normalise_class_name, strip_prefix
from histosynth.patches.rasterize import rasterize_tiles

log = logging.getLogger(__name__)

#: the CLI flag (and config key) named in errors
OPTION = "--tissue-regions (rasterize.tissue_regions)"
MAX_LABEL = 255


def region_key(name: Any) -> str:
    """A class name as region names are matched (case-folded, known prefix removed)."""
    return strip_prefix(normalise_class_name(name))


def parse_tissue_regions(regions: Sequence[str] | Mapping[str, Any] | None) -> dict[str, int]:
    """``["tumor=1", "stroma=2"]`` (the CLI) or ``{"tumor": 1, ...}`` (the config) as ``{name: label}``.

    Labels are integers 1..255 (0 is air) and unique; names are unique as matched (:func:`region_key`).
    None or empty: ``{}`` (no regions). Any other input is one error naming the option.
    """
    if not regions:
        return {}
    if isinstance(regions, Mapping):
        items = list(regions.items())
    else:
        items = []
        for pair in regions:
            name, sep, value = str(pair).rpartition("=")
            if not sep or not name.strip():
                raise HistosynthError(f"{OPTION}: a region is NAME=LABEL, got {pair!r}")
            items.append((name, value))
    out: dict[str, int] = {}
    seen: dict[str, str] = {}
    by_label: dict[int, str] = {}
    for name, value in items:
        name = str(name).strip()
        if isinstance(value, bool):
            raise HistosynthError(f"{OPTION}: the label of {name!r} must be an integer 1..{MAX_LABEL}, got {value!r}")
        try:
            label = int(value)
            if isinstance(value, float) and label != value:
                raise ValueError
        except (TypeError, ValueError):
            raise HistosynthError(
                f"{OPTION}: the label of {name!r} must be an integer 1..{MAX_LABEL}, got {value!r}") from None
        if not 1 <= label <= MAX_LABEL:
            raise HistosynthError(
                f"{OPTION}: the label of {name!r} is {label}; labels are 1..{MAX_LABEL} (0 is air, outside "
                "every region)")
        key = region_key(name)
        if key in seen:
            raise HistosynthError(f"{OPTION}: {seen[key]!r} and {name!r} name the same class")
        if label in by_label:
            raise HistosynthError(
                f"{OPTION}: label {label} is given to both {by_label[label]!r} and {name!r}; each region class "
                "needs its own label")
        seen[key], by_label[label] = name, label
        out[name] = label
    return out


def tissue_classes(regions: Mapping[str, int]) -> dict[str, str]:
    """The ``tissue_classes`` of report.json: ``{"1": "tumor", ...}`` in label order."""
    return {str(label): name for name, label in sorted(regions.items(), key=lambda kv: kv[1])}


@dataclass
class Regions:
    """The region polygons of one file: shapely polygons and their labels, in file order."""

    path: str
    polygons: list[Any]
    labels: np.ndarray
    counts: dict[str, int]  # region name -> polygons
    missing: list[str]  # names asked for with no polygon in the file
    other_items: int = 0  # items of classes not asked for (a separate regions file only)
    mpp: float | None = None  # as the file states it
    parse: dict[str, int] = field(default_factory=dict)  # the reader's report of the file


def read_regions(path: str | os.PathLike, regions: Mapping[str, int], *, separate_file: bool,
                 slide_size: tuple[int, int] | None = None, max_vertices: int | None = None) -> Regions:
    """The polygons of the ``regions`` classes in ``path`` (any annotation format), with their labels.

    ``separate_file``: the file holds regions only, so other classes are counted as ``other_items``
    (in the nuclei file they are the nuclei). A file that does not parse raises the reader's error.
    """
    aset = annotations.read(path, None, slide_size=slide_size, max_vertices=max_vertices)
    label_of = {region_key(name): (name, label) for name, label in regions.items()}
    polygons, labels = [], []
    counts: Counter = Counter()
    other = 0
    for item in aset.nuclei:
        hit = label_of.get(item.class_name)  # class_map None: the name as region_key gives it
        if hit is None:
            other += 1
            continue
        polygons.append(item.polygon)
        labels.append(hit[1])
        counts[hit[0]] += 1
    missing = [name for name in regions if not counts[name]]
    for name in missing:
        log.warning("%s: no polygon of the tissue region class %r (%s)", path, name,
                    "classes in the file: " + (", ".join(sorted(aset.class_counts)) or "none"))
    return Regions(str(path), polygons, np.asarray(labels, dtype=np.int64),
                   {name: int(counts[name]) for name in regions}, missing,
                   other if separate_file else 0, aset.mpp, dict(aset.report))


def region_maps(regions: Regions, tiles: Iterable[Sequence[float]]) -> Iterator[np.ndarray]:
    """uint8 (height, width) label map per tile ``(x0, y0, downsample, width, height)``: 0 = air.

    The rasterizer's types map of the region polygons (smallest area wins, then file order).
    """
    for _, labels, _ in rasterize_tiles(regions.polygons, regions.labels, tiles):
        yield labels


def region_report(regions: Regions, pixels: Mapping[int, int], n_patches: int, with_regions: int,
                  separate_file: bool) -> dict[str, Any]:
    """The ``tissue_regions`` entry of the rasterize report."""
    return {
        "file": regions.path,
        "separate_file": separate_file,
        "polygons": regions.counts,
        "missing": regions.missing,
        "other_items": regions.other_items,
        "pixels": {str(k): int(v) for k, v in sorted(pixels.items())},
        "patches": n_patches,
        "patches_with_regions": with_regions,
        # the reader's counts (repaired, clipped, dropped items) of a separate regions file
        **({"parse": regions.parse} if separate_file else {}),
    }
