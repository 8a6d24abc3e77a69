"""The rasterize stage: annotations + a tile patch set → a typed patch set.

:func:`rasterize_patchset` reads a slide's annotation file (any format
:mod:`histosynth.io.annotations` knows), draws every nucleus onto the tiles
of that slide with :func:`histosynth.patches.rasterize.rasterize_tiles` (exact
pixel-centre rule, smallest nucleus wins where outlines overlap), and writes a
new, self-contained patch set with ``images.npy``, ``inst.npy`` (int32, ids
1..n per patch) and ``types.npy`` (uint8). ``index.csv`` gains ``n_nuclei``
and one ``n_<class>`` column per class. Every skipped, repaired, clipped or
overlapping item is counted in ``report.json`` and in the log; its
``classes`` is the class map in the one form, ``{"1": "Epithelial", ...}``
(:mod:`histosynth.io.labels`; without a class map ``{"1": "nucleus"}``).

A file that yields little is an error, not an empty or thin patch set that the
DAG would train on (:func:`check_dropped`): a file with no items at all, one
whose every item was dropped (wholly outside the slide, not a polygon - e.g.
point annotations -, degenerate, ...), or one of whose items more than
``max_dropped_fraction`` (the schema's ``rasterize.max_dropped_fraction``,
0.5) were dropped. The error counts what was dropped and names the most likely
cause: outlines outside the slide are compared with the slide's size
(coordinates at another level or magnification?). Unknown class names are
already an error of the reader (unless a catch-all class takes them).

With ``tissue_regions`` (``--tissue-regions tumor=1 stroma=2``, the schema's
``rasterize.tissue_regions``) the polygons of those classes - from the same
file, or from ``regions_file`` - are not nuclei: they are filled into the
set's ``tissue.npy`` (uint8, 0 = air) and named by ``report.json``
``tissue_classes``; the rules are :mod:`histosynth.patches.regions`'. The
report's ``tissue_regions`` counts polygons per class, the classes with none
(``missing``), pixels per label and the patches with any region.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io import annotations
from histosynth.io.labels import DEFAULT_CLASS, class_columns, class_map_to_json
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.patches import regions as tissue_regions_
from histosynth.patches.rasterize import rasterize_tiles

log = logging.getLogger(__name__)

#: default of ``max_dropped_fraction`` (the schema's rasterize.max_dropped_fraction)
MAX_DROPPED_FRACTION = 0.5
#: the reader's counts of dropped items (``read`` = ``kept`` + these), in words
DROPPED = {
    "outside_slide": "wholly outside the slide",
    "skipped_not_polygon": "not polygons",
    "skipped_degenerate": "degenerate (fewer than 3 distinct points, or no area)",
    "skipped_no_geometry": "without a geometry",
    "skipped_negative": "negative (excluded) regions",
    "skipped_crowd": "COCO crowd regions",
}
# the most likely cause when most dropped items are of one kind (outside_slide and skipped_not_polygon: computed)
_CAUSES = {
    "skipped_degenerate": "the outlines have no area: a broken export, or points exported as polygons?",
    "skipped_no_geometry": "the features carry no geometry: a measurements-only export?",
    "skipped_negative": "negative regions mark areas to exclude, not nuclei",
    "skipped_crowd": "COCO crowd regions cover groups of objects, not single nuclei",
}


def rasterize_patchset(
    annotation_path: str | os.PathLike,
    tiles_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    class_map: Mapping[str, int] | None = None,
    catch_all: str | int | None = None,
    mpp_tolerance: float = 0.05,
    max_dropped_fraction: float = MAX_DROPPED_FRACTION,
    max_vertices: int | None = None,
    tissue_regions: Mapping[str, int] | None = None,
    regions_file: str | os.PathLike | None = None,
) -> dict:
    """Write the typed patch set of one slide; returns its report.

    ``max_vertices``: the most vertices one outline may have (None: the reader's
    ``MAX_VERTICES``, the schema's ``rasterize.max_vertices``).
    ``tissue_regions``: ``{class name: tissue label}`` of region classes drawn
    into ``tissue.npy`` instead of as nuclei, read from ``regions_file`` when
    given, else from ``annotation_path`` (:mod:`histosynth.patches.regions`).

    Raises :class:`HistosynthError`, writing nothing, when the annotation file
    yields too little (see :func:`check_dropped`).
    """
    if not 0.0 <= max_dropped_fraction <= 1.0:
        raise HistosynthError(f"max_dropped_fraction must be between 0 and 1, got {max_dropped_fraction}")
    if regions_file is not None and not tissue_regions:
        raise HistosynthError("a regions file was given without --tissue-regions (rasterize.tissue_regions) "
                              "naming its classes", regions_file)
    region_map = tissue_regions_.parse_tissue_regions(tissue_regions)
    tiles = read_patchset(tiles_dir, require=("images",))
    slide_info = tiles.report.get("slide", {})
    dims = slide_info.get("dimensions")
    slide_size = (int(dims[0]), int(dims[1])) if dims else None
    aset = annotations.read(annotation_path, class_map, catch_all=catch_all, slide_size=slide_size,
                            max_vertices=max_vertices, exclude_classes=list(region_map))
    check_dropped(aset, slide_size, max_dropped_fraction)
    _check_mpp(aset.mpp, slide_info, mpp_tolerance, annotation_path)
    regions = None
    if region_map:
        separate = regions_file is not None
        regions = tissue_regions_.read_regions(regions_file if separate else annotation_path, region_map,
                                               separate_file=separate, slide_size=slide_size,
                                               max_vertices=max_vertices)
        if separate:
            _check_mpp(regions.mpp, slide_info, mpp_tolerance, regions_file)
        n_excluded = aset.report.get("excluded_classes", 0)
        if n_excluded:
            log.info("%s: %d items of the tissue region classes %s taken out of the nuclei", annotation_path,
                     n_excluded, ", ".join(region_map))
    columns = class_columns(class_map)
    unknown_types = sorted({n.type_id for n in aset.nuclei} - set(columns))
    if unknown_types:
        raise HistosynthError(f"type ids {unknown_types} have no class in the class map", annotation_path)
    polygons = [n.polygon for n in aset.nuclei]
    type_ids = np.array([n.type_id for n in aset.nuclei], dtype=np.int64)
    index = tiles.index
    boxes = list(zip(index["x"], index["y"], index["downsample"], index["width"], index["height"]))
    h, w = tiles.images.shape[1:3]
    totals = {"overlap_pixels": 0, "hidden_nuclei": 0, "instances": 0}
    seen = np.zeros(len(polygons), dtype=bool)
    arrays = ("images", "inst", "types") + (("tissue",) if regions is not None else ())
    region_maps = tissue_regions_.region_maps(regions, boxes) if regions is not None else None
    region_pixels: Counter = Counter()
    with_regions = 0
    with PatchSetWriter(out_dir, arrays, (h, w),
                        extra_columns=tuple(c for c in index.columns) + tuple(columns.values())) as writer:
        for i, (inst, types, info) in enumerate(rasterize_tiles(polygons, type_ids, boxes)):
            row = index.iloc[i].to_dict()
            row["n_nuclei"] = int(info["n_nuclei"])
            counts = info.get("type_counts", {})
            for tid, col in columns.items():
                row[col] = int(counts.get(tid, 0))
            extra = {}
            if region_maps is not None:
                tissue = next(region_maps)
                labels, n = np.unique(tissue, return_counts=True)
                region_pixels.update(dict(zip(labels.tolist(), n.tolist())))
                with_regions += bool(tissue.any())
                extra["tissue"] = tissue
            writer.add(row, images=tiles.images[i], inst=inst, types=types, **extra)
            totals["overlap_pixels"] += int(info.get("overlap_pixels", 0))
            totals["hidden_nuclei"] += int(info.get("n_hidden", 0))
            totals["instances"] += int(info["n_nuclei"])
            ids = info.get("ids")
            if ids is not None and len(ids):
                seen[np.asarray(ids, dtype=np.int64)] = True
        report = {
            "stage": "rasterize",
            "annotations": str(annotation_path),
            "format": aset.format,
            "tiles": str(tiles_dir),
            "slide": slide_info,
            "parse": dict(aset.report),
            "class_counts": dict(aset.class_counts),
            "nuclei_read": len(polygons),
            "nuclei_on_kept_tiles": int(seen.sum()),
            "nuclei_on_no_kept_tile": int(len(polygons) - seen.sum()),
            "rasterize": totals,
            "patches": len(index),
            "classes": class_map_to_json(class_map or {DEFAULT_CLASS: 1}),
        }
        if regions is not None:
            report["tissue_classes"] = tissue_regions_.tissue_classes(region_map)
            report["tissue_regions"] = tissue_regions_.region_report(
                regions, region_pixels, len(index), with_regions, separate_file=regions_file is not None)
            if not with_regions:
                log.warning("%s: no patch of this slide holds any tissue region of %s (tissue.npy is all air)",
                            regions.path, ", ".join(region_map))
        writer.report = report
    log.info(
        "%s: %d nuclei read (%s), %d on kept tiles, %d on none (background or outside the tiled area); "
        "%d instances over %d patches, %d overlapping pixels resolved, %d nuclei hidden by smaller ones",
        annotation_path, len(polygons), aset.format, seen.sum(), len(polygons) - seen.sum(),
        totals["instances"], len(index), totals["overlap_pixels"], totals["hidden_nuclei"],
    )
    return report


def _check_mpp(mpp: float | None, slide_info: Mapping, tolerance: float, path: str | os.PathLike) -> None:
    """Refuse annotations that state another resolution than the slide's."""
    slide_mpp = slide_info.get("mpp")
    if mpp and slide_mpp:
        ratio = mpp / float(np.mean(slide_mpp))
        if abs(ratio - 1) > tolerance:
            raise HistosynthError(
                f"the annotations state {mpp:.4g} um/px but the slide has {np.mean(slide_mpp):.4g} um/px: "
                "they were drawn on another scan or level",
                path,
            )


def check_dropped(
    aset: annotations.AnnotationSet,
    slide_size: tuple[int, int] | None,
    max_dropped_fraction: float = MAX_DROPPED_FRACTION,
) -> None:
    """Refuse an annotation file that held nothing, or whose items were all or mostly dropped by the reader.

    Dropped items are the reader's counts in :data:`DROPPED`; more than
    ``max_dropped_fraction`` of the items read (or all of them, whatever the
    fraction) is an error that lists the counts and the most likely cause.
    """
    rep = aset.report
    read, kept = rep["read"], rep["kept"]
    if read == 0:
        raise HistosynthError(
            f"the annotation file holds no annotations ({aset.format}, 0 items): nothing to rasterise; a slide "
            "without annotations is declared by giving it no annotation file (an empty annotations cell in the "
            "slide table), and it is then tiled but not rasterised", aset.path
        )
    if not kept and rep.get("excluded_classes", 0) and not any(rep.get(key, 0) for key in DROPPED):
        raise HistosynthError(
            f"the annotation file holds only tissue regions ({rep['excluded_classes']} items of the "
            "--tissue-regions classes), no nuclei: rasterize needs nucleus outlines (give the regions as "
            "--regions-file next to a nuclei file)", aset.path
        )
    dropped = {key: rep[key] for key in DROPPED if rep.get(key, 0)}
    n_dropped = sum(dropped.values())
    if kept and n_dropped <= max_dropped_fraction * read:
        return
    how_many = (
        f"all {read} items" if not kept else
        f"{n_dropped} of {read} items ({n_dropped / read:.0%}, more than rasterize.max_dropped_fraction "
        f"{max_dropped_fraction:g})"
    )
    counts = ", ".join(f"{n} {DROPPED[key]}" for key, n in dropped.items())
    main = max(dropped, key=dropped.get)
    raise HistosynthError(
        f"{how_many} of the annotation file were dropped ({counts}): {_likely_cause(aset, main, slide_size)}",
        aset.path,
    )


def _likely_cause(aset: annotations.AnnotationSet, reason: str, slide_size: tuple[int, int] | None) -> str:
    """What most likely made the reader drop the items of ``reason`` (a key of :data:`DROPPED`)."""
    rep = aset.report
    size = slide_size or aset.image_size
    if reason == "outside_slide" and aset.extent is not None and size is not None:
        x0, y0, x1, y1 = aset.extent
        w, h = size
        return (
            f"the outlines span x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f} but the slide is {w} x {h} level-0 "
            f"pixels ({max(x1 / w, y1 / h):.2g} times as far): coordinates at another level or magnification, "
            "or the annotations of another slide?"
        )
    if reason == "skipped_not_polygon":
        points = rep.get("not_polygon_points", 0)
        if points == rep["skipped_not_polygon"]:
            return (
                f"the file holds point annotations ({points} points), not outlines; this stage needs nucleus "
                "outlines (polygons). Point annotations can feed the DAFF centroid library instead "
                "(histosynth daff-library --points FILE --classes NAME=ID ..., used by sample_masks.method: daff)"
            )
        return (
            f"the file holds items that are not outlines ({points} of them points; others lines, arrows or rulers); "
            "this stage needs nucleus outlines (polygons)"
        )
    return _CAUSES.get(reason, "check how the file was exported")
