"""Reading: dispatch to the format parser, then the common validation, repair, clipping and class mapping."""

from __future__ import annotations

import gc
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from histosynth.errors import HistosynthError
from histosynth.io.annotations import _detect
from histosynth.io.annotations._classes import ClassMapper, normalise_class_name, strip_prefix
from histosynth.io.annotations._detect import check_file, classify_json, detect, load_json
from histosynth.io.annotations._geometry import largest_polygon, nonfinite_error
from histosynth.io.annotations._model import AnnotationSet, Nucleus, Parsed
from histosynth.io.annotations.asap import parse_asap
from histosynth.io.annotations.coco import coco_images, parse_coco_image, select_coco_image
from histosynth.io.annotations.geojson import parse_geojson
from histosynth.io.annotations.imagej import parse_imagej
from histosynth.io.annotations.imagescope import parse_imagescope
from histosynth.io.annotations.label import parse_label
from histosynth.io.annotations.points import parse_points_json

# the package's logger (one summary line per file read), whichever module logs it
log = logging.getLogger("histosynth.io.annotations")


FORMATS = ("geojson", "imagescope", "asap", "mat", "label", "imagej", "points_json", "coco")
REPORT_KEYS = (
    "read",
    "kept",
    "skipped_degenerate",
    "skipped_nonfinite",
    "skipped_not_polygon",
    "repaired_invalid",
    "outside_slide",
    "clipped",
    "gaps_closed",
    "multipolygon_parts_dropped",
    "catch_all",
)
_SKIP_KEYS = (
    "skipped_degenerate",
    "skipped_not_polygon",
    "skipped_no_geometry",
    "skipped_negative",
    "skipped_crowd",
    "outside_slide",
)


def read(
    path: str | os.PathLike,
    class_map: Mapping[str, int] | None = None,
    *,
    catch_all: str | int | None = None,
    slide_size: tuple[int, int] | None = None,
    fmt: str | None = None,
    types: str | os.PathLike | None = None,
    image: str | int | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    max_vertices: int | None = None,
    exclude_classes: Iterable[str] = (),
) -> AnnotationSet:
    """Read nucleus outlines from ``path`` (any of :data:`FORMATS`).

    ``slide_size`` is (width, height) in level-0 pixels. ``types`` is an optional
    type map for label images (a .mat with ``inst_type``/``type_map``, or an
    image/.npy). ``image`` selects one image of a COCO file. ``offset`` (dx, dy)
    is added to every coordinate before clipping, for files whose producer used
    another pixel origin (e.g. (0.5, 0.5) for pycococreator COCO files).
    ``max_vertices`` is the most vertices one outline may have (holes
    included; default ``_detect.MAX_VERTICES``, 1,000,000): a larger one is a
    HistosynthError naming the item. ``exclude_classes``: class names (matched
    like ``class_map`` keys: case-insensitive, known prefixes removed) whose
    items are not nuclei - e.g. the tissue-region classes of
    ``histosynth.patches.regions`` -, left out before the class mapping (so
    they need no ``class_map`` entry) and counted as ``excluded_classes``.
    """
    p = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise HistosynthError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", p)
    limit = _vertex_limit(max_vertices, p)
    with _gc_paused():
        return _read(p, class_map, catch_all, slide_size, fmt, types, image, offset, limit,
                     _exclusion(exclude_classes))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a file is read.

    Parsing a large JSON file creates millions of lists and dicts, and each
    allocation burst makes the collector traverse everything built so far: with
    it running, ``orjson.loads`` of a 75 MB GeoJSON takes 3-6x longer. Nothing
    read here forms reference cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read(
    p: Path,
    class_map: Mapping[str, int] | None,
    catch_all: str | int | None,
    slide_size: tuple[int, int] | None,
    fmt: str | None,
    types: str | os.PathLike | None,
    image: str | int | None,
    offset: tuple[float, float],
    max_vertices: int,
    exclude: frozenset[str] = frozenset(),
) -> AnnotationSet:
    mapper = ClassMapper(class_map, catch_all, p)
    size = _check_slide_size(slide_size, p)
    data = None
    if fmt is None:
        fmt, data = detect(p)
    else:
        check_file(p)
    if fmt in ("geojson", "points_json", "coco") and data is None:
        data = load_json(p)
    if fmt == "geojson":
        parsed = parse_geojson(data, p)
    elif fmt == "imagescope":
        parsed = parse_imagescope(p)
    elif fmt == "asap":
        parsed = parse_asap(p)
    elif fmt in ("mat", "label"):
        parsed = parse_label(p, None if types is None else Path(types), from_mat=fmt == "mat")
    elif fmt == "imagej":
        parsed = parse_imagej(p)
    elif fmt == "points_json":
        parsed = parse_points_json(data, p)
    else:  # coco
        if not isinstance(data, dict):
            raise HistosynthError("not a COCO file (top level is not an object)", p)
        images, cats, by_image = coco_images(data, p)
        iid = select_coco_image(images, by_image, image, p)
        parsed = parse_coco_image(by_image.get(iid, []), cats, images.get(iid), p)
    return _finish(p, fmt, parsed, mapper, size, offset=offset, max_vertices=max_vertices, exclude=exclude)


def _exclusion(names: Iterable[str]) -> frozenset[str]:
    """Class names to leave out, in the form :func:`_class_key` gives the file's names."""
    if isinstance(names, str):
        names = (names,)
    return frozenset(_class_key(n) for n in names)


def _class_key(name: Any) -> str:
    return strip_prefix(normalise_class_name(name))


def read_coco_all(
    path: str | os.PathLike,
    class_map: Mapping[str, int] | None = None,
    *,
    catch_all: str | int | None = None,
    slide_size: tuple[int, int] | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    max_vertices: int | None = None,
) -> dict[str, AnnotationSet]:
    """Every image of a COCO file, keyed by ``file_name`` (or the image id as a string)."""
    p = Path(path)
    limit = _vertex_limit(max_vertices, p)
    mapper = ClassMapper(class_map, catch_all, p)
    size = _check_slide_size(slide_size, p)
    check_file(p)
    with _gc_paused():
        data = load_json(p)
    if classify_json(data) != "coco":
        raise HistosynthError("not a COCO file", p)
    images, cats, by_image = coco_images(data, p)
    out: dict[str, AnnotationSet] = {}
    for iid in list(images) + [k for k in by_image if k not in images]:
        info = images.get(iid)
        key = str(info.get("file_name", iid)) if info else str(iid)
        parsed = parse_coco_image(by_image.get(iid, []), cats, info, p)
        out[key] = _finish(p, "coco", parsed, mapper, size, item=key, offset=offset, max_vertices=limit)
    return out


def _vertex_limit(max_vertices: Any, path: Path) -> int:
    if max_vertices is None:
        return _detect.MAX_VERTICES  # looked up per call, like the other limits of _detect
    if isinstance(max_vertices, bool) or not isinstance(max_vertices, (int, np.integer)) or max_vertices < 4:
        raise HistosynthError(f"max_vertices {max_vertices!r} must be an integer >= 4 (a triangle, closed)", path)
    return int(max_vertices)


def _check_vertices(g: np.ndarray, refs: list[str], limit: int, path: Path, item: str | None) -> None:
    """Refuse an outline with more than ``limit`` vertices, before any geometry work on it."""
    counts = shapely.get_num_coordinates(g)  # 0 for None
    over = np.flatnonzero(counts > limit)
    if over.size:
        j = int(over[0])
        where = refs[j] if item is None else f"{item}: {refs[j]}"
        raise HistosynthError(
            f"{where}: an outline of {int(counts[j]):,} vertices is over the limit of {limit:,} vertices per "
            f"outline ({over.size} such outline{'s' if over.size > 1 else ''} in the file): a corrupt file, or "
            "simplify the outline (e.g. QuPath's Simplify shape); if it is genuine, raise the limit "
            "(rasterize.max_vertices in config.yaml, histosynth rasterize --max-vertices N, or "
            "histosynth.io.annotations.read(..., max_vertices=N))",
            path,
        )


def _check_magnitude(g: np.ndarray, refs: list[str], path: Path, item: str | None) -> None:
    """Refuse coordinates beyond ±MAX_COORDINATE: no slide has such pixels, and geometry on them overflows."""
    b = shapely.bounds(g)  # NaN rows for None
    with np.errstate(invalid="ignore"):
        inside = (np.abs(b) <= _detect.MAX_COORDINATE).all(axis=1)  # False for NaN: overflow in a shape's maths
    over = np.flatnonzero(shapely.is_geometry(g) & ~inside)
    if over.size:
        j = int(over[0])
        where = refs[j] if item is None else f"{item}: {refs[j]}"
        if not np.isfinite(b[j]).all():
            raise nonfinite_error(path, where)
        v = float(b[j][np.argmax(np.abs(b[j]))])
        raise HistosynthError(
            f"{where}: coordinate {v:g} is beyond ±{_detect.MAX_COORDINATE:g} pixels: not a position on any slide "
            "(a corrupt file?)",
            path,
        )


def _check_slide_size(slide_size: Any, path: Path) -> tuple[int, int] | None:
    if slide_size is None:
        return None
    try:
        w, h = (int(v) for v in slide_size)
    except (TypeError, ValueError):
        raise HistosynthError(f"slide_size {slide_size!r} must be (width, height)", path) from None
    if w <= 0 or h <= 0:
        raise HistosynthError(f"slide_size {slide_size!r} must be positive", path)
    return w, h


def _finish(
    path: Path,
    fmt: str,
    parsed: Parsed,
    mapper: ClassMapper,
    slide_size: tuple[int, int] | None,
    item: str | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    max_vertices: int | None = None,
    exclude: frozenset[str] = frozenset(),
) -> AnnotationSet:
    """Validate, repair, clip, map classes and number the parsed items."""
    rep = parsed.report
    try:
        dx, dy = (float(v) for v in offset)
    except (TypeError, ValueError):
        raise HistosynthError(f"offset {offset!r} must be (dx, dy)", path) from None
    if not (np.isfinite(dx) and np.isfinite(dy)):
        raise HistosynthError(f"offset {offset!r} must be finite", path)
    if parsed.size_is_exact and slide_size is not None and parsed.size != slide_size:
        w, h = parsed.size  # type: ignore[misc]
        raise HistosynthError(
            f"label image is {w} x {h} (width x height) but the slide is {slide_size[0]} x {slide_size[1]}",
            path,
        )
    bounds = slide_size if slide_size is not None else (None if parsed.size_is_exact else parsed.size)

    g = np.empty(len(parsed.geoms), dtype=object)
    g[:] = parsed.geoms
    _check_vertices(g, parsed.refs, _detect.MAX_VERTICES if max_vertices is None else max_vertices, path, item)
    _check_magnitude(g, parsed.refs, path, item)
    present = shapely.is_geometry(g)
    rep["skipped_degenerate"] += int((~present).sum())
    if (dx or dy) and present.any():
        g[present] = shapely.transform(g[present], lambda c: c + [dx, dy])
    # the extent of everything read, before clipping: the clue when outlines miss the slide
    extent = tuple(float(v) for v in shapely.total_bounds(g[present])) if present.any() else None
    invalid = present & ~shapely.is_valid(g)
    if invalid.any():
        # "structure" repair: the union of the rings' interiors (a small loop
        # drawn by a shaky hand stays inside), 4-7x faster than "linework"
        fixed = shapely.make_valid(g[invalid], method="structure", keep_collapsed=False)
        for j, geom in zip(np.flatnonzero(invalid), fixed):
            poly, dropped = largest_polygon(geom)
            g[j] = poly
            if poly is not None:
                rep["repaired_invalid"] += 1
                rep["repair_parts_dropped"] += dropped
    area = shapely.area(g)  # NaN for None
    zero = present & ~(area > 0)
    if zero.any():
        rep["skipped_degenerate"] += int(zero.sum())
        g[zero] = None
    if bounds is not None:
        box = shapely.box(0, 0, bounds[0], bounds[1])
        live = shapely.is_geometry(g)
        for j in np.flatnonzero(live & ~shapely.covered_by(g, box)):
            clipped, _ = largest_polygon(shapely.intersection(g[j], box))
            rep["outside_slide" if clipped is None else "clipped"] += 1
            g[j] = clipped

    keep = np.flatnonzero(shapely.is_geometry(g)).tolist()
    pnames, prefs = parsed.names, parsed.refs
    if exclude:
        n_before = len(keep)
        keep = [i for i in keep if _class_key(pnames[i]) not in exclude]
        rep["excluded_classes"] += n_before - len(keep)
    names, tids, srcs = mapper.resolve([pnames[i] for i in keep], rep)
    kept = g[keep].tolist()
    nuclei = [
        Nucleus(k, name, tid, poly, prefs[i])
        for k, name, tid, poly, i in zip(range(1, len(keep) + 1), names, tids, kept, keep)
    ]
    rep["kept"] = len(nuclei)
    report = {k: int(rep.get(k, 0)) for k in REPORT_KEYS}
    report.update({k: int(v) for k, v in rep.items() if k not in report})
    result = AnnotationSet(
        path=str(path),
        format=fmt,
        nuclei=nuclei,
        mpp=parsed.mpp,
        report=report,
        class_counts=dict(Counter(names)),
        source_class_counts=dict(Counter(srcs)),
        image_size=parsed.size,
        extent=extent,
    )
    _log_summary(path if item is None else f"{path} [{item}]", fmt, report)
    return result


def _log_summary(where: Any, fmt: str, report: dict[str, int]) -> None:
    extra = ", ".join(f"{k} {v}" for k, v in report.items() if v and k not in ("read", "kept"))
    line = f"{where}: {fmt}, read {report['read']}, kept {report['kept']}" + (f", {extra}" if extra else "")
    noisy = any(
        report.get(k, 0)
        for k in (*_SKIP_KEYS, "repaired_invalid", "clipped", "dropped_pieces", "multipolygon_parts_dropped")
    )
    log.log(logging.WARNING if noisy else logging.INFO, line)
