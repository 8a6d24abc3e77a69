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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io import annotations
from histosynth.io.labels import DEFAULT_CLASS, class_columns, class_map_to_json
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.patches.rasterize import rasterize_tiles

log = logging.getLogger(__name__)


def rasterize_patchset(
    annotation_path: str | os.PathLike,
    tiles_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    class_map: Mapping[str, int] | None = None,
    catch_all: str | int | None = None,
    mpp_tolerance: float = 0.05,
) -> dict:
    """Write the typed patch set of one slide; returns its report."""
    tiles = read_patchset(tiles_dir, require=("images",))
    slide_info = tiles.report.get("slide", {})
    dims = slide_info.get("dimensions")
    slide_size = (int(dims[0]), int(dims[1])) if dims else None
    aset = annotations.read(annotation_path, class_map, catch_all=catch_all, slide_size=slide_size)
    slide_mpp = slide_info.get("mpp")
    if aset.mpp and slide_mpp:
        ratio = aset.mpp / float(np.mean(slide_mpp))
        if abs(ratio - 1) > mpp_tolerance:
            raise HistosynthError(
                f"the annotations state {aset.mpp:.4g} um/px but the slide has {np.mean(slide_mpp):.4g} um/px: "
                "they were drawn on another scan or level",
                annotation_path,
            )
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
    with PatchSetWriter(out_dir, ("images", "inst", "types"), (h, w),
                        extra_columns=tuple(c for c in index.columns) + tuple(columns.values())) as writer:
        for i, (inst, types, info) in enumerate(rasterize_tiles(polygons, type_ids, boxes)):
            row = index.iloc[i].to_dict()
            row["n_nuclei"] = int(info["n_nuclei"])
            counts = info.get("type_counts", {})
            for tid, col in columns.items():
                row[col] = int(counts.get(tid, 0))
            writer.add(row, images=tiles.images[i], inst=inst, types=types)
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
        writer.report = report
    log.info(
        "%s: %d nuclei read (%s), %d on kept tiles, %d on none (background or outside the tiled area); "
        "%d instances over %d patches, %d overlapping pixels resolved, %d nuclei hidden by smaller ones",
        annotation_path, len(polygons), aset.format, seen.sum(), len(polygons) - seen.sum(),
        totals["instances"], len(index), totals["overlap_pixels"], totals["hidden_nuclei"],
    )
    return report
