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
``report["catch_all"]``. Names matching ``exclude_classes`` (the same way) are not
nuclei at all (tissue regions: :mod:`histosynth.patches.regions`): left out
before the mapping and counted as ``report["excluded_classes"]``.

Bad input
---------
One ``HistosynthError`` naming the file, the item and the reason for: a missing
or empty file, an unknown format, malformed JSON/XML, XML with a DTD or entity
declarations (refused as defusedxml refuses them, so entity-expansion bombs cost nothing),
a file larger than 2 GiB (``_detect.MAX_ANNOTATION_BYTES``), JSON nested more
than 64 levels deep (``_detect.MAX_JSON_DEPTH``) (checked on the bytes before parsing; GeoJSON
needs 8), an outline of more than 1,000,000 vertices (``_detect.MAX_VERTICES``; ``read(...,
max_vertices=N)`` raises it; checked before any geometry work), NaN/infinite coordinates or coordinates beyond ±2**53 (``_detect.MAX_COORDINATE``; no slide has such
pixels, and shapely's clipping overflows near 1e308) (the file is corrupt), XML whose declared encoding is
unknown, a JSON coordinate (or
COCO RLE size or count, or image width/height) given as a string or a boolean
(``"12.5"`` is not converted: a number is a number), unknown class names, a label
image whose size differs from ``slide_size``, one without pixels or of more than 2**30 pixels
(``label.MAX_LABEL_PIXELS``, checked from the PNG/TIFF/.npy header before decoding), a ``.mat`` file that
crashes scipy's reader (``scipy.io.loadmat`` runs in a forked child process, so a segfault on a damaged
file is an error, not the end of the process). Repairable geometry is repaired
and counted (one summary line on this package's logger): outlines with fewer
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
Of the ``skipped_not_polygon`` items, those that are points (GeoJSON
``Point``/``MultiPoint``, ASAP ``Dot``/``PointSet``, ImageJ point ROIs) are
also counted as ``not_polygon_points``. ``AnnotationSet.extent`` is the
bounding box of every outline read, before clipping (how far a file misses
the slide). A file whose items were all or mostly dropped is refused by the
rasterize stage (``histosynth.patches.annotate.check_dropped``), not here.

Performance: cyclic garbage collection is paused while a file is read (it
would otherwise traverse the millions of lists a large JSON file parses into).
GeoJSON is walked once; the coordinates of every ring go into one float64
array and all polygons are made by one ``shapely.from_ragged_array`` call
(files with anything unusual - errors such as numbers as strings, 3-D points - are
read feature by feature, with the same result or the error naming the feature). ImageScope XML is streamed
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

from histosynth.io.annotations._classes import CLASS_PREFIXES, normalise_class_name, strip_prefix
from histosynth.io.annotations._detect import detect_format
from histosynth.io.annotations._geometry import instance_polygons
from histosynth.io.annotations._model import AnnotationSet, Nucleus
from histosynth.io.annotations._read import FORMATS, REPORT_KEYS, read, read_coco_all
from histosynth.io.annotations.geojson import read_geojson_points, write_geojson

__all__ = [
    "CLASS_PREFIXES",
    "FORMATS",
    "REPORT_KEYS",
    "AnnotationSet",
    "Nucleus",
    "detect_format",
    "instance_polygons",
    "normalise_class_name",
    "read",
    "read_coco_all",
    "read_geojson_points",
    "strip_prefix",
    "write_geojson",
]
