"""Aperio ImageScope XML (MoNuSeg, MoNuSAC), streamed through expat."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import ellipse_ring, nonfinite_error, polygons_from_flat
from histosynth.io.annotations._model import Parsed
from histosynth.io.annotations._xml import Coords, expat_parser, expat_run, to_floats

_IMAGESCOPE_NOT_CLASSES = {"description", ""}


class _RegionStream:
    """Vertex strings of the regions read so far -> float64 chunks -> polygons, in bulk.

    Strings are converted (:func:`to_floats`) every :attr:`CHUNK` strings, and each
    converted chunk of whole regions is turned into polygons straight away, so
    neither the strings nor the float coordinates of the whole file are held.
    A non-finite coordinate is remembered (the first region that has one) and
    reported by :meth:`finish`, after every string has been converted.
    """

    CHUNK = Coords.CHUNK

    def __init__(self, path: Path):
        self.path = path
        self.refs: list[str] = []
        self.lens: list[int] = []  # vertices per region
        self.ellipse: list[bool] = []
        self.buf: list[Any] = []
        self.base = 0  # index of buf[0] among all coordinate strings
        self.done = 0  # regions converted so far
        self.geoms: list[np.ndarray] = []
        self.first_bad: int | None = None  # first region with a non-finite coordinate

    def add(self, ref: str, strs: list[Any], ellipse: bool) -> None:
        self.refs.append(ref)
        self.lens.append(len(strs) // 2)
        self.ellipse.append(ellipse)
        if strs:
            self.buf.extend(strs)
            if len(self.buf) >= self.CHUNK:
                self._flush()

    def _flush(self) -> None:
        lo, hi = self.done, len(self.refs)
        if hi == lo:
            return
        vals = to_floats(self.buf, self.path, self.refs, self.lens, self.base)
        self.base += len(self.buf)
        self.buf = []
        self.done = hi
        lens = np.asarray(self.lens[lo:hi], dtype=np.int64)
        xy = vals.reshape(-1, 2)
        if self.first_bad is not None:
            return  # the read fails in finish(): skip building
        finite = np.isfinite(xy).all(axis=1)
        if not finite.all():
            k = int(np.searchsorted(np.cumsum(lens), int(np.argmin(finite)), side="right"))
            self.first_bad = lo + k
            return
        ell = self.ellipse[lo:hi]
        if any(ell):
            rings = np.split(xy, np.cumsum(lens)[:-1])
            for k in np.flatnonzero(ell).tolist():
                r = rings[k]
                if len(r) >= 2:
                    rings[k] = ellipse_ring(r[:, 0].min(), r[:, 1].min(), r[:, 0].max(), r[:, 1].max())
            lens = np.fromiter(map(len, rings), dtype=np.int64, count=len(rings))
            xy = np.concatenate(rings) if rings else xy
        polys, _ = polygons_from_flat(xy, lens, np.ones(len(lens), dtype=bool))
        self.geoms.append(polys)

    def finish(self) -> np.ndarray:
        """Polygon (or None) per region, in order; raises on a non-finite coordinate."""
        self._flush()
        if self.first_bad is not None:
            raise nonfinite_error(self.path, self.refs[self.first_bad])
        out = np.empty(len(self.refs), dtype=object)
        if self.geoms:
            out[:] = np.concatenate(self.geoms)
        self.geoms = []
        return out


# per open element: what it is to the ImageScope reader
_OTHER, _REGION, _VERTICES, _ANNOTATION, _ANN_ATTRIBUTES, _ROOT = range(6)
_SPECIAL = frozenset({"Region", "Annotation", "Annotations"})


def parse_imagescope(path: Path) -> Parsed:
    """Aperio ImageScope XML (MoNuSeg, MoNuSAC), streamed with expat.

    Reads exactly what an ElementTree ``iterparse`` over the file gives (a
    region's vertices are the children of its first ``Vertices`` child, the
    annotation's class comes from its ``Name`` or the ``Attribute`` elements of
    its first ``Attributes`` child), but keeps no elements: a vertex costs two
    attribute strings until its chunk is converted to float64, and polygons are
    built per chunk of regions.
    """
    out = Parsed()
    report = out.report
    stream = _RegionStream(path)
    ann_of: list[int] = []  # annotation index per region
    ann_names: list[str] = []
    root: list[Any] = [None]  # attributes of the last <Annotations> closed
    stack: list[list[Any]] = []  # [kind, data] per open element
    p = expat_parser(path)

    # --- vertex mode: inside a region's first <Vertices>, its children are vertices
    pts: list[Any] = []
    add_pt = pts.append
    depth = 0  # 1 inside a vertex element

    def vertex_start(name, attrs):
        nonlocal depth
        if depth == 0 and (name == "Vertex" or name not in _SPECIAL):
            get = attrs.get
            add_pt(get("X"))
            add_pt(get("Y"))
            depth = 1
            return
        # an element inside a vertex, or a Region/Annotation(s) among the
        # vertices: the general handlers take over until the vertex ends
        if depth:
            stack.append([_OTHER, None])  # the vertex itself
            depth = 0
        p.StartElementHandler = start
        p.EndElementHandler = end
        start(name, attrs)

    def vertex_end(name):
        nonlocal depth
        if depth:
            depth = 0
        else:  # </Vertices>
            stack.pop()
            p.StartElementHandler = start
            p.EndElementHandler = end

    def enter_vertices(region: list[Any]) -> None:
        nonlocal pts, add_pt, depth
        if region[2] is None:
            region[2] = []
        pts = region[2]
        add_pt = pts.append
        depth = 0
        p.StartElementHandler = vertex_start
        p.EndElementHandler = vertex_end

    # --- general mode
    def start(name, attrs):
        parent = stack[-1] if stack else None
        if parent is not None and parent[0] == _VERTICES:  # a vertex of the region
            if name in ("Region", "Annotation"):
                # ElementTree clears these when they end, before the region reads them
                parent[1][2].extend((None, None))
            else:
                parent[1][2].extend((attrs.get("X"), attrs.get("Y")))
        if name == "Region":
            stack.append([_REGION, attrs, None])  # attrs, vertex strings of its first <Vertices>
        elif name == "Vertices" and parent is not None and parent[0] == _REGION and parent[2] is None:
            stack.append([_VERTICES, parent])
            enter_vertices(parent)
        elif name == "Annotation":
            stack.append([_ANNOTATION, attrs, None])  # attrs, Attribute names of its first <Attributes>
        elif name == "Attributes" and parent is not None and parent[0] == _ANNOTATION and parent[2] is None:
            parent[2] = []
            stack.append([_ANN_ATTRIBUTES, parent])
        else:
            if name == "Attribute":
                # an Attribute anywhere below an annotation's first <Attributes>
                # (not inside a region or annotation nested there)
                for kind, data, *_ in reversed(stack):
                    if kind == _ANN_ATTRIBUTES:
                        data[2].append(attrs.get("Name"))
                        break
                    if kind in (_REGION, _ANNOTATION):
                        break
            stack.append([_ROOT, attrs] if name == "Annotations" else [_OTHER, None])

    def end(name):
        kind, data, *rest = stack.pop()
        if kind == _REGION:
            region_end(data, rest[0])
        elif kind == _ANNOTATION:
            annotation_end(data, rest[0])
        elif kind == _ROOT:
            root[0] = data
        if stack and stack[-1][0] == _VERTICES:  # a vertex with children ended
            enter_vertices(stack[-1][1])

    def region_end(attrs, strs):
        report["read"] += 1
        ann_i = len(ann_names)
        ref = f"Annotation {ann_i + 1} Region {attrs.get('Id', '?')}"
        if attrs.get("NegativeROA", "0") not in ("0", ""):
            report["skipped_negative"] += 1
            return
        rtype = attrs.get("Type", "0")
        if rtype in ("0", "1", ""):  # free-form/polygon, rectangle (4 corners)
            ellipse = False
        elif rtype == "2":  # ellipse: vertices are two corners of its box
            ellipse = True
        else:  # arrow, ruler, ...
            report["skipped_not_polygon"] += 1
            return
        stream.add(ref, strs or [], ellipse)
        ann_of.append(ann_i)

    def annotation_end(attrs, attr_names):
        name = (attrs.get("Name") or "").strip()
        if not name and attr_names:
            for n in attr_names:
                n = (n or "").strip()
                if n.casefold() not in _IMAGESCOPE_NOT_CLASSES:
                    name = n
                    break
        ann_names.append(name)

    p.StartElementHandler = start
    p.EndElementHandler = end
    expat_run(p, path)
    attrs = root[0]
    if attrs is None:
        raise HistosynthError("not an ImageScope XML file (no <Annotations> root)", path)
    mpp = attrs.get("MicronsPerPixel")
    if mpp:
        try:
            out.mpp = float(mpp)
        except ValueError:
            raise HistosynthError(f"MicronsPerPixel {mpp!r} is not a number", path) from None
        if not (math.isfinite(out.mpp) and out.mpp > 0):
            raise HistosynthError(f"MicronsPerPixel {mpp!r} is not a positive number", path)
    out.geoms = stream.finish()
    out.refs = stream.refs
    out.names = [ann_names[a] if a < len(ann_names) else "" for a in ann_of]
    return out
