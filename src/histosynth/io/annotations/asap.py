"""ASAP XML (Camelyon): polygons, rectangles and Catmull-Rom splines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import catmull_rom_closed, linearrings, rings_to_polys_inplace
from histosynth.io.annotations._model import Parsed
from histosynth.io.annotations._xml import Coords, xml_events

_ASAP_POLYGONAL = {"polygon", "spline", "rectangle"}
_ASAP_POINTS = {"dot", "pointset"}


def parse_asap(path: Path, spline_samples: int = 8) -> Parsed:
    """ASAP XML (Camelyon), streamed; splines sampled as closed Catmull-Rom curves."""
    out = Parsed()
    coords = Coords(path)
    names: list[str] = []
    perms: list[np.ndarray | None] = []
    splines: list[bool] = []
    seen_root = False
    i = 0
    for _ev, el in xml_events(path):
        tag = el.tag
        if tag == "Annotation":
            i += 1
            out.report["read"] += 1
            atype = (el.get("Type") or "").strip()
            ref = f"Annotation {i - 1} ({el.get('Name', '')!s})"
            if atype.casefold() not in _ASAP_POLYGONAL:
                out.report["skipped_not_polygon"] += 1
                if atype.casefold() in _ASAP_POINTS:
                    out.report["not_polygon_points"] += 1
                el.clear()
                continue
            cel = el.find("Coordinates")
            cs = [] if cel is None else list(cel)
            order = [c.get("Order") for c in cs]
            perm = None
            if order and None not in order:
                try:
                    o = np.array([float(x) for x in order])
                except ValueError:
                    raise HistosynthError(f"{ref}: Coordinate Order is not a number", path) from None
                if np.any(np.diff(o) < 0):
                    perm = np.argsort(o, kind="stable")
            coords.add(ref, [a for c in cs for a in (c.get("X"), c.get("Y"))])
            names.append((el.get("PartOfGroup") or "").strip())
            perms.append(perm)
            splines.append(atype.casefold() == "spline")
            el.clear()
        elif tag == "ASAP_Annotations":
            seen_root = True
    if not seen_root:
        raise HistosynthError("not an ASAP XML file (no <ASAP_Annotations> root)", path)
    rings = coords.rings()
    for k, ring in enumerate(rings):
        if perms[k] is not None:
            ring = ring[perms[k]]
            out.report["reordered"] += 1
        if splines[k]:
            ring = catmull_rom_closed(ring, spline_samples)
            out.report["splines_sampled"] += 1
        rings[k] = ring
    for ref, name, lr in zip(coords.refs, names, linearrings(rings)):
        out.add(ref, name, lr)
    rings_to_polys_inplace(out)
    return out
