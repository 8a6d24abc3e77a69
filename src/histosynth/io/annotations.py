"""Read nucleus outlines from any common annotation format into one model.

``read(path, class_map)`` returns an :class:`AnnotationSet`: one
:class:`Nucleus` (id, class name, type id, shapely polygon) per outline, the
microns per pixel when the file states it, and a report of everything that was
skipped, repaired or clipped. ``detect_format(path)`` names the format from the
file's content first and its extension second.

Coordinate convention (project-wide)
------------------------------------
Coordinates are continuous level-0 pixel coordinates, x to the right, y down.
Pixel (row r, col c) covers ``[c, c+1) x [r, r+1)``; its centre is
``(c + 0.5, r + 0.5)`` (the QuPath / OpenSlide / ImageJ convention). A
rasteriser counts a pixel as inside a polygon iff its centre is inside, e.g.
``skimage.draw.polygon2mask(shape, rc_vertices - 0.5)``.

What each format's numbers mean, and what is done to them:

* **QuPath GeoJSON** (``geojson``) - native convention, taken verbatim. QuPath
  *cell* features carry a ``nucleusGeometry``; when present it is used instead
  of ``geometry`` (the cell outline). A ``MultiPolygon`` nucleus keeps its
  largest part (by area): one feature is one nucleus drawn by one person, and
  the extra parts are slivers left by editing (PUMA: 0.5-1 px^2 triangles);
  dropped parts are counted as ``multipolygon_parts_dropped``. Holes are kept.
* **Aperio ImageScope XML** (``imagescope``; MoNuSeg, MoNuSAC) - verbatim. The
  format does not define a pixel origin and the datasets' own mask makers
  disagree (MoNuSeg's MATLAB ``poly2mask`` is 1-based with pixel centres on
  integers, i.e. -0.5 px from ours; MoNuSAC's ``skimage.draw.polygon`` is
  0-based with centres on integers, +0.5 px); QuPath imports ImageScope
  vertices unchanged. Measured on the 13 MoNuSeg tiles (haematoxylin centroid
  minus outline centroid, ~1,500 nuclei) the residual offset is
  (-0.09, +0.29) px with the verbatim reading, against (-0.59, -0.21) and
  (+0.41, +0.79) px for the two shifts, so verbatim is the best of the three.
  Class = ``Annotation@Name``, else the first annotation-level
  ``Attributes/Attribute@Name`` other than ImageScope's default "Description"
  (MoNuSAC), else "". Region types: 0 polygon/free-form, 1 rectangle
  (polygon), 2 ellipse (ellipse inscribed in the box of its two vertices);
  others (arrow, ruler) are skipped as ``skipped_not_polygon``; negative
  regions (``NegativeROA``) are skipped as ``skipped_negative``.
  ``MicronsPerPixel`` -> ``AnnotationSet.mpp``. Parsed as a stream with
  expat (the elements an ElementTree ``iterparse`` would give, but no element
  objects are built), with defusedxml's refusal of DTDs and entities.
* **ASAP XML** (``asap``; Camelyon) - verbatim (level-0 pixels). Class =
  ``PartOfGroup``. ``Polygon`` and ``Rectangle`` are polygons; a ``Spline`` is
  a closed uniform Catmull-Rom spline through its control points, sampled with
  8 points per segment (the curve passes through every control point; that is
  ASAP's own spline type). Dots, point sets and rulers are skipped. Coordinates
  are put in ``Order`` when the file lists them out of order.
* **HoVer-Net/CoNSeP .mat** (``mat``: ``inst_map`` + ``inst_type`` or
  ``type_map``) and **label images** (``label``: 2-D integer ``.npy``,
  ``.png``, ``.tif``; 0 = background) - every instance is traced along pixel
  EDGES (corners on integer coordinates), so rasterising the polygon with the
  pixel-centre rule gives back exactly its pixels. Pixels that touch only at a
  corner (8-connected) are joined by a square of half-size 2**-8 px centred on
  the shared corner: it contains no pixel centre, so the round trip stays
  exact. An instance made of several 8-connected pieces keeps its largest
  piece; the others are counted (``dropped_pieces``, ``dropped_pixels``).
  Types come from ``inst_type`` (one per instance, in ascending instance id -
  or indexed by id-1 when it is as long as the largest id) or from a pixel type
  map (majority of non-zero types in the instance). For label images a type
  map is optional: ``types=`` (a .mat or an image/.npy), or a sibling
  ``<stem>.mat`` / ``<stem>_type(s).<ext>`` / ``<stem>_class(es).<ext>``;
  HoVer-Net ``(H, W, 2)`` [inst, type] and ``(H, W, 5)`` [R, G, B, inst, type]
  ``.npy`` patches carry their own. The class name is the type number as a
  string ("1", "2", ...); map it with ``class_map={"1": 1, ...}`` if needed.
  With ``slide_size``, the image must be exactly that size (error otherwise).
* **ImageJ ROI** (``imagej``; ``RoiSet.zip`` or one ``.roi``) - ImageJ's own
  convention equals ours (integer coordinates are pixel corners; a mask
  counts pixel centres), so coordinates are verbatim; sub-pixel float
  coordinates are used when flagged, shifted by +0.5 when ImageJ's "draw
  offset" flag says they refer to pixel centres. Polygon, freehand and traced
  ROIs are polygons; rectangles are boxes (rounded corners ignored); ovals are
  the ellipse inscribed in their box; spline-fitted ROIs are sampled as
  Catmull-Rom splines; composite (shape) ROIs are combined even-odd and keep
  their largest part. Lines and points are skipped. No class names ("").
* **Boundary-point JSON** (``points_json``; the CRLM case) - a list (or a dict,
  or a dict with a "nuclei"/"annotations"/... list) of nuclei, each a list of
  ``[x, y]`` boundary points, ``{"x": [...], "y": [...]}``, or an object with a
  ``points``/``boundary``/``coordinates`` list and an optional ``class``/
  ``type``/``label``. The points are boundary *pixels*, not necessarily
  adjacent. They are joined in file order by straight segments when that gives
  a simple polygon; otherwise (unordered points) they are sorted by angle
  around their centroid (``reordered``). Every pair of consecutive points that
  are not 8-neighbours is one gap closed (``gaps_closed``). The polygon through
  the pixel centres (+0.5) is then grown by half a pixel (mitre joins) so the
  boundary pixels themselves are inside, as in the seed paper's mask maker.
* **COCO JSON** (``coco``) - polygons verbatim (COCO's convention, as used by
  detectron2, is ours); RLE masks are decoded and traced like label images;
  ``category_id`` -> category name; crowd regions are skipped
  (``skipped_crowd``); an instance with several polygons keeps the largest
  (``multipolygon_parts_dropped``). A COCO file holds many images: pass
  ``image=`` (file name or id) to :func:`read`, or use :func:`read_coco_all`.
  The image's ``width``/``height`` act as ``slide_size`` when none is given.
  Files made by pycococreator (``skimage.measure.find_contours``) put pixel
  centres on integers: on the CoNSeP test COCO file, object Dice against the
  instance maps is 0.88 verbatim and 0.93 with ``offset=(0.5, 0.5)``; pass
  that offset for such files.

Class names and types
---------------------
Names are normalised (surrounding white space removed, case-folded) and
matched against ``class_map`` case-insensitively, first as they are, then with
a known prefix (``nuclei_``, ``nucleus_``, ``cell_``) removed. ``Nucleus.class_name``
is the ``class_map`` key that matched (the normalised, prefix-stripped name
when ``class_map`` is None; then every type id is 1). Names that match nothing
raise one :class:`~histosynth.errors.HistosynthError` listing every unknown
name with its count, unless ``catch_all`` names a class of ``class_map`` (or a
type id), in which case they get that class and are counted in
``report["catch_all"]``.

Bad input
---------
One ``HistosynthError`` naming the file, the item and the reason for: a missing
or empty file, an unknown format, malformed JSON/XML, XML with a DTD or entity
declarations (refused as defusedxml refuses them, so entity-expansion bombs cost nothing),
NaN/infinite coordinates (the file is corrupt), unknown class names, a label
image whose size differs from ``slide_size``. Repairable geometry is repaired
and counted (one summary line on this module's logger): outlines with fewer
than 3 distinct points or no area are skipped (``skipped_degenerate``);
self-intersecting outlines are repaired with ``shapely.make_valid(...,
method="structure")`` - the union of the areas the outline encloses, so a
small loop drawn by a shaky hand stays inside - keeping the largest polygon
when the outline falls apart (a figure-eight keeps its larger lobe;
``repaired_invalid``, other parts ``repair_parts_dropped``). Repair is
routine on hand-drawn files: 3,403 of the 4,951 MoNuSeg outlines self-touch or
self-cross. With ``slide_size`` (width, height), outlines wholly outside the
slide (or touching only its edge) are skipped (``outside_slide``) and those
partly outside are clipped to it (``clipped``). ``skipped_nonfinite`` is
always 0 (non-finite coordinates are an error); it is kept so the report has a
fixed set of keys. ``read`` = ``kept`` + every ``skipped_*`` + ``outside_slide``.

Performance: cyclic garbage collection is paused while a file is read (it
would otherwise traverse the millions of lists a large JSON file parses into).
GeoJSON is walked once; the coordinates of every ring go into one float64
array and all polygons are made by one ``shapely.from_ragged_array`` call
(files with anything unusual - errors, 3-D points, numbers as strings - are
read feature by feature, with the same result). ImageScope XML is streamed
through expat handlers that keep only two attribute strings per vertex until
they are converted to floats in chunks through orjson; each chunk of regions
becomes polygons at once. Polygons are validated and clipped with vectorised
shapely calls, and label images are traced in one vectorised pass over the
whole image. On 100,000 nuclei (``benchmarks/rasterize.py``): a 75 MB QuPath
GeoJSON reads in about 1.5 s more than ``orjson.loads`` of it alone; a 140 MB
ImageScope file in about half the time of a bare ``defusedxml`` ``iterparse``
loop over it, at a peak memory of about the 100,000 polygons themselves.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import shapely
from shapely.geometry import Polygon, mapping

from histosynth.errors import HistosynthError
from histosynth.io import _annotation_formats as _f
from histosynth.io._annotation_formats import instance_polygons

log = logging.getLogger(__name__)

FORMATS = ("geojson", "imagescope", "asap", "mat", "label", "imagej", "points_json", "coco")
CLASS_PREFIXES = ("nuclei_", "nucleus_", "cell_")
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

__all__ = [
    "FORMATS",
    "AnnotationSet",
    "Nucleus",
    "detect_format",
    "instance_polygons",
    "normalise_class_name",
    "read",
    "read_coco_all",
    "write_geojson",
]


@dataclass(frozen=True, slots=True)
class Nucleus:
    """One nucleus outline in level-0 pixel coordinates (see the module docstring)."""

    id: int  # 1..n in file order, after skipped items are removed
    class_name: str  # normalised class name as matched ("" when the format has none)
    type_id: int  # from class_map; never 0
    polygon: Polygon  # valid, holes kept
    source: str = ""  # the item in the file ("feature 12 (id ...)", "instance 57", ...)


@dataclass
class AnnotationSet:
    """All nuclei read from one annotation file."""

    path: str
    format: str
    nuclei: list[Nucleus]
    mpp: float | None
    report: dict[str, int]
    class_counts: dict[str, int]
    source_class_counts: dict[str, int] = field(default_factory=dict)  # normalised names before mapping
    image_size: tuple[int, int] | None = None  # (width, height) when the file states it

    def __len__(self) -> int:
        return len(self.nuclei)


# --------------------------------------------------------------------------- #
# Class names
# --------------------------------------------------------------------------- #


def normalise_class_name(name: Any) -> str:
    """White space trimmed and case-folded."""
    return " ".join(str(name).split()).casefold()


def _strip_prefix(n: str) -> str:
    for p in CLASS_PREFIXES:
        if n.startswith(p) and len(n) > len(p):
            return n[len(p) :]
    return n


class _ClassMapper:
    def __init__(self, class_map: Mapping[str, int] | None, catch_all: str | int | None, path: Path):
        self.path = path
        self.map = None
        self.catch: tuple[str, int] | None = None
        if class_map is None:
            return
        lookup: dict[str, tuple[str, int]] = {}
        for key, tid in class_map.items():
            if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)) or int(tid) < 1:
                raise HistosynthError(
                    f"class_map[{key!r}] = {tid!r}: type ids must be integers >= 1 (0 is background)", path
                )
            k = normalise_class_name(key)
            if k in lookup and lookup[k][1] != int(tid):
                raise HistosynthError(
                    f"class_map has {lookup[k][0]!r} and {key!r} (same name) with different type ids", path
                )
            lookup.setdefault(k, (str(key), int(tid)))
        self.map = lookup
        if catch_all is not None:
            if isinstance(catch_all, str):
                hit = self._match(catch_all)
                if hit is None:
                    raise HistosynthError(f"catch_all {catch_all!r} is not a class in class_map", path)
                self.catch = hit
            elif (
                isinstance(catch_all, (int, np.integer))
                and not isinstance(catch_all, bool)
                and catch_all >= 1
            ):
                names = sorted({v[0] for v in lookup.values() if v[1] == int(catch_all)})
                self.catch = (names[0] if len(names) == 1 else str(int(catch_all)), int(catch_all))
            else:
                raise HistosynthError(f"catch_all {catch_all!r} must be a class name or a type id >= 1", path)

    def _match(self, raw: str) -> tuple[str, int] | None:
        assert self.map is not None
        n = normalise_class_name(raw)
        hit = self.map.get(n)
        if hit is None:
            s = _strip_prefix(n)
            if s != n:
                hit = self.map.get(s)
        return hit

    def resolve(self, raw_names: list[str], report: Counter) -> tuple[list[str], list[int], list[str]]:
        """(class_name, type_id, source name) per item; raises on unknown names."""
        unknown: Counter = Counter()
        table: dict[str, tuple[str, int, str]] = {}
        for raw, count in Counter(raw_names).items():  # each distinct name once
            src = _strip_prefix(normalise_class_name(raw))
            if self.map is None:
                table[raw] = (src, 1, src)
                continue
            hit = self._match(raw)
            if hit is not None:
                table[raw] = (hit[0], hit[1], src)
            elif self.catch is None:
                unknown[src] += count
            else:
                report["catch_all"] += count
                table[raw] = (self.catch[0], self.catch[1], src)
        if unknown:
            listing = ", ".join(
                f"{n!r} ({c})" + (" [no class name in the file]" if n == "" else "")
                for n, c in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
            )
            raise HistosynthError(
                f"unknown class names: {listing}; add them to classes in config.yaml or set catch_all",
                self.path,
            )
        rows = list(map(table.__getitem__, raw_names))
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


# --------------------------------------------------------------------------- #
# Format detection
# --------------------------------------------------------------------------- #

_EXT_FORMATS = {
    ".geojson": "geojson",
    ".json": "json",
    ".xml": "xml",
    ".mat": "mat",
    ".npy": "label",
    ".png": "label",
    ".tif": "label",
    ".tiff": "label",
    ".roi": "imagej",
    ".zip": "imagej",
}
_GEOJSON_TYPES = {"FeatureCollection", "Feature", "Polygon", "MultiPolygon"}


def _check_file(path: Path) -> None:
    if not path.exists():
        raise HistosynthError("annotation file not found", path)
    if not path.is_file():
        raise HistosynthError("not a regular file", path)
    if path.stat().st_size == 0:
        raise HistosynthError("empty annotation file", path)


def _load_json(path: Path) -> Any:
    raw = path.read_bytes()
    if not raw or raw.isspace():  # (raw.strip() would copy the whole file)
        raise HistosynthError("empty annotation file", path)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # the standard library accepts NaN/Infinity literals: let the reader name the item
        import json

        try:
            return json.loads(raw.decode("utf-8-sig"))
        except (ValueError, UnicodeDecodeError):
            pass
        raise HistosynthError(f"malformed JSON: {exc}", path) from None


def _classify_json(data: Any) -> str | None:
    if isinstance(data, dict):
        if data.get("type") in _GEOJSON_TYPES:
            return "geojson"
        if isinstance(data.get("annotations"), list) and ("categories" in data or "images" in data):
            return "coco"
    elif isinstance(data, list):
        if not data:
            return "geojson"  # an empty feature list: an empty set
        first = data[0]
        if isinstance(first, dict) and (first.get("type") == "Feature" or "geometry" in first):
            return "geojson"
    if _f.points_container(data) is not None:
        return "points_json"
    return None


def _detect(path: Path) -> tuple[str, Any]:
    """(format, parsed JSON or None)."""
    _check_file(path)
    head = _f.read_bytes_limited(path, 65536)
    if head.startswith(b"PK\x03\x04"):
        if _f.zip_has_roi(path):
            return "imagej", None
        raise HistosynthError("zip archive without .roi entries (or corrupt): not an ImageJ RoiSet", path)
    if head.startswith(b"Iout"):
        return "imagej", None
    if head.startswith((b"\x89PNG", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x93NUMPY")):
        return "label", None
    if head.startswith(b"MATLAB") or head[512:520] == b"\x89HDF\r\n\x1a\n":
        return "mat", None
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        raise HistosynthError("empty annotation file", path)
    ext = _EXT_FORMATS.get(path.suffix.lower())
    is_xml, is_json = text[:1] == b"<", text[:1] in (b"{", b"[")
    if is_xml or (ext == "xml" and not is_json):
        root = _f.xml_root_tag(text)
        if root == "ASAP_Annotations":
            return "asap", None
        if root == "Annotations":
            return "imagescope", None
        # not one of ours: let defusedxml refuse DTDs/entities or report malformed XML first
        for _ in _f.xml_events(path):
            pass
        raise HistosynthError(f"unknown XML annotation format (root element <{root}>)", path)
    if is_json or ext in ("json", "geojson"):
        data = _load_json(path)
        kind = _classify_json(data)
        if kind is None:
            raise HistosynthError(
                "unknown JSON annotation format (not GeoJSON, COCO or a list of boundary points)", path
            )
        return kind, data
    if ext in ("label", "mat", "imagej"):
        return ext, None
    raise HistosynthError("unknown annotation format (content and extension not recognised)", path)


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS`, from the file's content first and its extension second."""
    return _detect(Path(path))[0]


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


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
) -> AnnotationSet:
    """Read nucleus outlines from ``path`` (any of :data:`FORMATS`).

    ``slide_size`` is (width, height) in level-0 pixels. ``types`` is an optional
    type map for label images (a .mat with ``inst_type``/``type_map``, or an
    image/.npy). ``image`` selects one image of a COCO file. ``offset`` (dx, dy)
    is added to every coordinate before clipping, for files whose producer used
    another pixel origin (e.g. (0.5, 0.5) for pycococreator COCO files).
    """
    p = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise HistosynthError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", p)
    with _gc_paused():
        return _read(p, class_map, catch_all, slide_size, fmt, types, image, offset)


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
) -> AnnotationSet:
    mapper = _ClassMapper(class_map, catch_all, p)
    size = _check_slide_size(slide_size, p)
    data = None
    if fmt is None:
        fmt, data = _detect(p)
    else:
        _check_file(p)
    if fmt in ("geojson", "points_json", "coco") and data is None:
        data = _load_json(p)
    if fmt == "geojson":
        parsed = _f.parse_geojson(data, p)
    elif fmt == "imagescope":
        parsed = _f.parse_imagescope(p)
    elif fmt == "asap":
        parsed = _f.parse_asap(p)
    elif fmt in ("mat", "label"):
        parsed = _f.parse_label(p, None if types is None else Path(types), from_mat=fmt == "mat")
    elif fmt == "imagej":
        parsed = _f.parse_imagej(p)
    elif fmt == "points_json":
        parsed = _f.parse_points_json(data, p)
    else:  # coco
        if not isinstance(data, dict):
            raise HistosynthError("not a COCO file (top level is not an object)", p)
        images, cats, by_image = _f.coco_images(data, p)
        iid = _f.select_coco_image(images, by_image, image, p)
        parsed = _f.parse_coco_image(by_image.get(iid, []), cats, images.get(iid), p)
    return _finish(p, fmt, parsed, mapper, size, offset=offset)


def read_coco_all(
    path: str | os.PathLike,
    class_map: Mapping[str, int] | None = None,
    *,
    catch_all: str | int | None = None,
    slide_size: tuple[int, int] | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
) -> dict[str, AnnotationSet]:
    """Every image of a COCO file, keyed by ``file_name`` (or the image id as a string)."""
    p = Path(path)
    mapper = _ClassMapper(class_map, catch_all, p)
    size = _check_slide_size(slide_size, p)
    _check_file(p)
    with _gc_paused():
        data = _load_json(p)
    if _classify_json(data) != "coco":
        raise HistosynthError("not a COCO file", p)
    images, cats, by_image = _f.coco_images(data, p)
    out: dict[str, AnnotationSet] = {}
    for iid in list(images) + [k for k in by_image if k not in images]:
        info = images.get(iid)
        key = str(info.get("file_name", iid)) if info else str(iid)
        parsed = _f.parse_coco_image(by_image.get(iid, []), cats, info, p)
        out[key] = _finish(p, "coco", parsed, mapper, size, item=key, offset=offset)
    return out


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
    parsed: _f.Parsed,
    mapper: _ClassMapper,
    slide_size: tuple[int, int] | None,
    item: str | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
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
    present = shapely.is_geometry(g)
    rep["skipped_degenerate"] += int((~present).sum())
    if (dx or dy) and present.any():
        g[present] = shapely.transform(g[present], lambda c: c + [dx, dy])
    invalid = present & ~shapely.is_valid(g)
    if invalid.any():
        # "structure" repair: the union of the rings' interiors (a small loop
        # drawn by a shaky hand stays inside), 4-7x faster than "linework"
        fixed = shapely.make_valid(g[invalid], method="structure", keep_collapsed=False)
        for j, geom in zip(np.flatnonzero(invalid), fixed):
            poly, dropped = _f.largest_polygon(geom)
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
            clipped, _ = _f.largest_polygon(shapely.intersection(g[j], box))
            rep["outside_slide" if clipped is None else "clipped"] += 1
            g[j] = clipped

    keep = np.flatnonzero(shapely.is_geometry(g)).tolist()
    pnames, prefs = parsed.names, parsed.refs
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


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def write_geojson(path: str | os.PathLike, nuclei: AnnotationSet | Iterable[Nucleus]) -> None:
    """Write nuclei as a QuPath-style GeoJSON FeatureCollection (atomically)."""
    items = nuclei.nuclei if isinstance(nuclei, AnnotationSet) else list(nuclei)
    feats = []
    for n in items:
        props: dict[str, Any] = {"objectType": "annotation", "type_id": int(n.type_id)}
        if n.class_name:
            props["classification"] = {"name": n.class_name}
        feats.append(
            {"type": "Feature", "id": str(n.id), "geometry": mapping(n.polygon), "properties": props}
        )
    payload = orjson.dumps({"type": "FeatureCollection", "features": feats})
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
