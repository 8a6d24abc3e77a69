"""Synthetic H&E "demo slides" with exact nuclei ground truth, generated offline.

:func:`make_demo_slides` writes pyramidal, tiled, JPEG-compressed generic TIFFs
that OpenSlide opens (with MPP), one QuPath-style GeoJSON of every nucleus per
slide, ``slides.csv`` (the slide table) and ``demo.json`` (parameters, counts).

How a slide is made:

* **Fields** — every texture is a pure function of global level-0 pixel
  coordinates: value noise from an integer hash of lattice points (several
  octaves), evaluated either on a pixel grid (separable matrix products) or at
  scattered points (nuclei placement), plus hashed per-pixel white noise.
  Bands and tiles therefore join without seams, and nothing slide-sized is ever
  held in memory.
* **Layout** — tissue is thresholded low-frequency noise (40-70 % of the
  slide); inside it, epithelial nests / glands (with lumens on some slides),
  lymphoid aggregates, loose and dense stroma whose collagen fibres follow a
  smooth direction field, and small vessels with red blood cells.
* **Nuclei** — three classes placed by random sequential adsorption with a
  minimum distance that allows overlap; each polygon is then cut by the union of
  the nuclei drawn after it, so annotations never overlap and equal what is
  visible (touching nuclei share a boundary). A pixel belongs to a nucleus
  exactly when its centre lies inside the polygon (QuPath convention: pixel
  (r, c) covers [c, c+1) x [r, r+1)).
* **Colour** — stain concentrations (hematoxylin, eosin) are turned into RGB by
  Beer-Lambert, ``RGB = 255 exp(-(od0 + c_H v_H + c_E v_E))``, with per-style
  stain vectors and strengths ("pale", "dark").
* **File** — level 0 is rendered band by band and streamed into tifffile as
  tiles; each band is also downsampled (2x2 area) into raw temporary files for
  the lower levels, which are written afterwards. Everything is written under a
  hidden staging folder in ``out_dir`` and moved into place at the end.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from histosynth import __version__
from histosynth.errors import HistosynthError
from histosynth.slides.demo.model import STYLES, _Slide
from histosynth.slides.demo.nuclei import _CLASS_NAMES, CLASS_COLORS
from histosynth.slides.demo.write import _write_geojson, _write_regions, _write_tiff

log = logging.getLogger(__name__)

__all__ = ["CLASS_COLORS", "SLIDE_COLUMNS", "STYLES", "make_demo_slides"]

#: Columns of ``slides.csv`` (and of the table :func:`make_demo_slides` returns).
SLIDE_COLUMNS = ("slide", "image", "annotations", "stain", "mpp", "width", "height", "n_nuclei")
MIN_SIZE = 512
MAX_MPP = 2.0


def _check_args(n_slides: Any, size: Any, seed: Any, mpp: Any, tile: Any, quality: Any) -> tuple[int, int]:
    def _int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not _int(n_slides) or n_slides < 1:
        raise HistosynthError(f"n_slides must be an integer >= 1, got {n_slides!r}")
    try:
        w, h = (int(v) for v in size)
        if any(not _int(v) and float(v) != int(v) for v in size):
            raise ValueError
    except (TypeError, ValueError):
        raise HistosynthError(f"size must be two integers (width, height), got {size!r}") from None
    if w < MIN_SIZE or h < MIN_SIZE:
        raise HistosynthError(f"size must be at least {MIN_SIZE} x {MIN_SIZE} pixels, got {w} x {h}")
    if w * h > 200_000 * 200_000:
        raise HistosynthError(f"size {w} x {h} is too large for a demo slide")
    if not _int(seed) or seed < 0:
        raise HistosynthError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        mppf = float(mpp)
    except (TypeError, ValueError):
        raise HistosynthError(f"mpp must be a number, got {mpp!r}") from None
    if not math.isfinite(mppf) or mppf <= 0:
        raise HistosynthError(f"mpp (micrometres per pixel) must be > 0, got {mpp!r}")
    if mppf > MAX_MPP:
        raise HistosynthError(f"mpp must be <= {MAX_MPP} (nuclei would be too small to draw), got {mpp!r}")
    if not _int(tile) or tile < 16 or tile % 16:
        raise HistosynthError(f"tile must be a positive multiple of 16, got {tile!r}")
    if not _int(quality) or not 1 <= quality <= 100:
        raise HistosynthError(f"quality must be an integer in 1..100, got {quality!r}")
    return w, h


def make_demo_slides(
    out_dir: str | os.PathLike,
    n_slides: int = 4,
    size: tuple[int, int] = (4096, 4096),
    seed: int = 0,
    mpp: float = 0.25,
    tile: int = 256,
    quality: int = 90,
    progress: bool = False,
) -> pd.DataFrame:
    """Write ``n_slides`` synthetic H&E slides with nuclei GeoJSON into ``out_dir``.

    Files (slide names ``demo-000``, ``demo-001``, ...):

    * ``demo-XXX.tif`` — pyramidal generic TIFF, JPEG tiles of ``tile`` px,
      levels downsampled by 2 (successive IFDs, ``subfiletype=1``), resolution
      in centimetres so that OpenSlide reports ``openslide.mpp-x == mpp``;
    * ``demo-XXX.geojson`` — FeatureCollection, one Polygon per nucleus in
      level-0 pixels, ``properties.classification.name`` in
      Epithelial / Lymphocyte / Spindle;
    * ``demo-XXX.regions.geojson`` — the tissue regions of the layout, one
      Polygon per piece, classified ``epithelium`` / ``stroma``, traced on a
      8 px grid (:meth:`_Slide.regions`): a regions file for
      ``histosynth rasterize --regions-file ... --tissue-regions epithelium=1
      stroma=2`` (multi-label tissue layouts, seed 002). Not in ``slides.csv``
      (the slide table names the nuclei file only);
    * ``slides.csv`` — ``slide,image,annotations,stain,mpp,width,height,n_nuclei``
      (paths relative to ``out_dir``), also returned as a DataFrame;
    * ``demo.json`` — generation parameters and per-class counts.

    ``size`` is (width, height). Slide k uses stain style ``STYLES[k % 2]`` and
    depends only on (seed, k, size, mpp), so the same arguments give identical
    bytes. Raises :class:`HistosynthError` for bad arguments.
    """
    width, height = _check_args(n_slides, size, seed, mpp, tile, quality)
    seed, n_slides, tile, quality, mpp = int(seed), int(n_slides), int(tile), int(quality), float(mpp)
    out = Path(out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HistosynthError(f"cannot create output folder: {exc.strerror}", out) from None
    staging = out / f".demo-slides.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    rows: list[dict[str, Any]] = []
    per_slide: list[dict[str, Any]] = []
    bar = None
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_slides * height, unit="row", desc="demo slides")
        for k in range(n_slides):
            name = f"demo-{k:03d}"
            slide = _Slide(width, height, mpp, seed, k)
            nu = slide.nuclei
            counts = {c: int((nu.cls == i).sum()) for i, c in enumerate(_CLASS_NAMES)}
            log.info(
                "%s: %d x %d px, stain %s, %d nuclei (%s), %d dropped as tiny",
                name, width, height, slide.style.name, len(nu),
                ", ".join(f"{c} {n}" for c, n in counts.items()), nu.dropped,
            )
            desc = (
                f"histosynth demo slide {name}; histosynth {__version__}; seed={seed}; "
                f"slide_index={k}; stain={slide.style.name}; mpp={mpp}; width={width}; height={height}"
            )
            levels = _write_tiff(slide, staging / f"{name}.tif", staging, tile, quality, desc, bar)
            _write_geojson(staging / f"{name}.geojson", nu, seed, k)
            n_regions = _write_regions(staging / f"{name}.regions.geojson", slide.regions())
            rows.append(
                {
                    "slide": name,
                    "image": f"{name}.tif",
                    "annotations": f"{name}.geojson",
                    "stain": slide.style.name,
                    "mpp": mpp,
                    "width": width,
                    "height": height,
                    "n_nuclei": len(nu),
                }
            )
            per_slide.append(
                {
                    "slide": name,
                    "stain": slide.style.name,
                    "levels": [list(lv) for lv in levels],
                    "n_nuclei": len(nu),
                    "counts": counts,
                    "dropped_tiny": nu.dropped,
                    "tissue_fraction_target": round(slide.tissue_frac, 4),
                    "regions": {"file": f"{name}.regions.geojson", "polygons": n_regions},
                }
            )
            del slide
        table = pd.DataFrame(rows, columns=list(SLIDE_COLUMNS))
        table.to_csv(staging / "slides.csv", index=False)
        totals = {c: sum(s["counts"][c] for s in per_slide) for c in _CLASS_NAMES}
        meta = {
            "generator": "histosynth.slides.demo.make_demo_slides",
            "version": __version__,
            "parameters": {
                "n_slides": n_slides, "size": [width, height], "seed": seed, "mpp": mpp,
                "tile": tile, "quality": quality,
            },
            "classes": {c: list(v) for c, v in CLASS_COLORS.items()},
            "stains": [s.name for s in STYLES],
            "counts": totals,
            "slides": per_slide,
        }
        (staging / "demo.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        names = [f for r in rows for f in (r["image"], r["annotations"], f"{r['slide']}.regions.geojson")]
        names += ["slides.csv", "demo.json"]
        for f in names:
            os.replace(staging / f, out / f)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            try:
                out.rmdir()  # only if still empty
            except OSError:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
    shutil.rmtree(staging, ignore_errors=True)
    return table
