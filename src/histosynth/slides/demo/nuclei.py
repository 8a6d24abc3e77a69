"""Nuclei of a demo slide: the classes, the compact polygon store (:class:`_Nuclei`) and polygon helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

#: Nucleus classes and their QuPath display colours.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Epithelial": (200, 0, 0),
    "Lymphocyte": (160, 90, 160),
    "Spindle": (150, 200, 150),
}
_CLASS_NAMES = tuple(CLASS_COLORS)
_EPI, _LYM, _SPI = 0, 1, 2

_COORD_GRID = 0.01  # polygon vertices are rounded to this grid (pixels)


@dataclass
class _Nuclei:
    """Final nuclei of a slide, in drawing order (all per-nucleus arrays length n).

    Polygons are stored compactly (like ``shapely.to_ragged_array``): ring r of
    the slide is ``coords[ring_off[r]:ring_off[r + 1]]`` (closed), and nucleus i
    has rings ``poly_off[i]:poly_off[i + 1]`` (exterior first, then holes).
    """

    coords: np.ndarray  # (m, 2) float64, level-0 pixels
    ring_off: np.ndarray
    poly_off: np.ndarray
    cls: np.ndarray  # int class index
    bbox: np.ndarray  # (n, 4) int: x0, y0, x1, y1 (exclusive), pixel bounds
    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray  # semi-axes (pixels) before cutting
    b: np.ndarray
    dens: np.ndarray  # hematoxylin density factor
    seed: np.ndarray  # uint32 texture seed
    dropped: int

    def __len__(self) -> int:
        return len(self.cls)

    def rings(self, i: int) -> list[np.ndarray]:
        r0, r1 = int(self.poly_off[i]), int(self.poly_off[i + 1])
        return [self.coords[self.ring_off[r] : self.ring_off[r + 1]] for r in range(r0, r1)]

    def polygon(self, i: int) -> Any:
        rings = self.rings(i)
        return shapely.Polygon(rings[0], rings[1:])


def _largest(g: Any) -> Any:
    """The largest polygon of a (multi)polygon / collection, or None if empty."""
    if g is None or g.is_empty:
        return None
    if g.geom_type == "Polygon":
        return g
    parts = [p for p in shapely.get_parts(g) if p.geom_type == "Polygon" and not p.is_empty]
    if not parts:
        return None
    return max(parts, key=lambda p: p.area)


def _raster(rings: list[np.ndarray], x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of pixels whose centre lies inside the polygon given by
    its closed rings (even-odd rule, so holes work); pixel (r, c) is centred on
    (x0 + c + 0.5, y0 + r + 0.5)."""
    seg = np.concatenate([np.concatenate([r[:-1], r[1:]], 1) for r in rings], 0)
    ex0, ey0, ex1, ey1 = seg[:, 0], seg[:, 1], seg[:, 2], seg[:, 3]
    yc = (np.arange(y0, y0 + h) + 0.5)[:, None]
    cross = (ey0[None, :] <= yc) != (ey1[None, :] <= yc)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = ex0 + (yc - ey0) * ((ex1 - ex0) / (ey1 - ey0))
    # a crossing at xi toggles every pixel centre to its right: x0 + c + 0.5 > xi
    r, e = np.nonzero(cross)
    c = np.clip(np.floor(xi[r, e] - x0 - 0.5).astype(np.int64) + 1, 0, w)
    toggles = np.bincount(r * (w + 1) + c, minlength=h * (w + 1)).reshape(h, w + 1)
    return (np.cumsum(toggles[:, :w], axis=1) & 1).astype(bool)

