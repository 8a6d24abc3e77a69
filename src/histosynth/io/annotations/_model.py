"""The data model: :class:`Nucleus`, :class:`AnnotationSet`, and :class:`Parsed` (a parser's result).

Every format parser turns one file into a :class:`Parsed`: parallel lists of item
references (for error messages), raw class names and shapely polygons (``None``
for an item that has no area), plus the counts of items it dropped itself.
Validation that is common to all formats (repair, clipping, class mapping)
happens afterwards in ``histosynth.io.annotations._read._finish``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shapely.geometry import Polygon


@dataclass(frozen=True, slots=True)
class Nucleus:
    """One nucleus outline in level-0 pixel coordinates (see :mod:`histosynth.io.annotations`)."""

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
    extent: tuple[float, float, float, float] | None = None  # (xmin, ymin, xmax, ymax) of every outline read

    def __len__(self) -> int:
        return len(self.nuclei)


@dataclass
class Parsed:
    """What a format parser hands to the common pipeline."""

    refs: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    geoms: list[Any] = field(default_factory=list)  # Polygon (maybe invalid) | None
    report: Counter = field(default_factory=Counter)
    mpp: float | None = None
    size: tuple[int, int] | None = None  # (width, height) stated by the file itself
    size_is_exact: bool = False  # label images: slide_size must equal it

    def add(self, ref: str, name: str, geom: Any) -> None:
        self.refs.append(ref)
        self.names.append(name)
        self.geoms.append(geom)
