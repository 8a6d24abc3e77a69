"""Multi-plane (z-stack) slides: open one and read a region from every focal plane at once.

:func:`open_zstack` reads two layouts with tifffile:

- **OME-TIFF with a Z axis** — the first image series whose axes contain ``Z`` (other axes besides ``Y``,
  ``X`` and the samples ``S`` must have length 1). Focal offsets come from the OME-XML (parsed with
  defusedxml): each plane's ``Plane/@PositionZ`` when every plane states one, else ``Pixels/@PhysicalSizeZ``
  times the plane index. Either way the offsets are **centred on the middle of the stack** (the mean of the
  first and last plane's position: for an odd count, the middle plane is 0), because an OME file's absolute
  stage Z says nothing about where the tissue is; units in ``PhysicalSizeZUnit`` / ``PositionZUnit``
  (µm by default; nm, mm, m understood). With neither, the offsets are unknown (``None``) and a warning is
  logged. MPP from ``PhysicalSizeX``/``Y``, else the TIFF resolution tags.
- **Hamamatsu NDPI with focal planes** — NDPI stores each focal plane as its own pyramid of TIFF pages; every
  page carries the private tag 65424 ``ZOffsetFromSlideCenter`` (nanometres from the scanner's focus centre)
  and tag 65421 ``Magnification`` (-1 macro, -2 map: not planes). The planes are the full-resolution page
  (the widest) of each distinct Z offset, **ordered by offset**; the offsets are the file's own (already
  relative to the focus centre), in µm. tifffile exposes NDPI pages as tiled (its McuStarts handling), so
  regions decode tile by tile. MPP from the TIFF resolution tags. Any TIFF whose pages carry the NDPI tags
  (65420 and Make) is read this way, whatever its suffix.

Region reads decode only the tiles they touch (tiled pages) or read a stripped plane whole once (refused
above ``max_pixels``); pixels outside the slide are white, as in :mod:`histosynth.io.slides`.

Bad input raises :class:`~histosynth.errors.HistosynthError` naming the file: an unreadable file, one focal
plane where a stack is asked for (``min_planes``), planes of different sizes, duplicate or non-increasing
focal offsets, a non-8-bit or non-RGB/grey plane.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from histosynth.errors import HistosynthError
from histosynth.io.slides import BACKGROUND, MAX_PIXELS, PLAUSIBLE_MPP, TiffLevel, mpp_from_tiff_tags, to_rgb

log = logging.getLogger(__name__)

#: NDPI private tags (tifffile's NDPI_TAGS registry)
NDPI_FILEFORMAT = 65420
NDPI_MAGNIFICATION = 65421
NDPI_ZOFFSET = 65424

_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}


class _Plane:
    """One focal plane: tiled pages decode per tile, other pages are read whole once."""

    def __init__(self, path: Path, page: tifffile.TiffPage, max_pixels: int, cache_bytes: int):
        self.path = path
        self.page = page
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self._tiled = TiffLevel(path, page, cache_bytes) if page.is_tiled else None
        self._image: np.ndarray | None = None
        self._max_pixels = max_pixels

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._tiled is not None:
            return self._tiled.read(x, y, w, h)
        if self._image is None:
            if self.width * self.height > self._max_pixels:
                raise HistosynthError(f"a {self.width} x {self.height} untiled focal plane is over the limit of "
                                      f"{self._max_pixels:,} pixels read whole (--max-pixels)", self.path)
            try:
                self._image = np.ascontiguousarray(to_rgb(np.squeeze(self.page.asarray()), self.path))
            except HistosynthError:
                raise
            except Exception as err:  # codec errors come as many types
                raise HistosynthError(f"corrupt focal plane: {type(err).__name__}: {err}", self.path) from err
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        if self._tiled is not None:
            self._tiled.close()


@dataclass
class ZStack:
    """An open z-stack slide. Use as a context manager or call :meth:`close`."""

    path: Path
    format: str  # "ome-tiff" | "ndpi"
    plane_offsets_um: list[float | None]
    dimensions: tuple[int, int]  # (w, h) in level-0 pixels
    mpp: float
    mpp_source: str
    _planes: list[_Plane] = field(repr=False, default_factory=list)
    _tf: tifffile.TiffFile | None = field(repr=False, default=None)

    @property
    def name(self) -> str:
        name = self.path.name
        for suffix in (".ome.tiff", ".ome.tif"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem

    @property
    def planes(self) -> int:
        return len(self.plane_offsets_um)

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (Z, h, w, 3): the level-0 region with top-left (x, y) in every plane (outside: white)."""
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        out = np.empty((self.planes, h, w, 3), np.uint8)
        for z, plane in enumerate(self._planes):
            out[z] = plane.read(int(x), int(y), int(w), int(h))
        return out

    def describe(self) -> dict:
        return {"format": self.format, "planes": self.planes, "plane_offsets_um": self.plane_offsets_um}

    def close(self) -> None:
        for plane in self._planes:
            plane.close()
        self._planes = []
        if self._tf is not None:
            self._tf.close()  # untiled planes read through it
            self._tf = None

    def __enter__(self) -> ZStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unit(path: Path, unit: str | None) -> float:
    if unit is None:
        return 1.0
    try:
        return _UNIT_UM[unit.strip()]
    except KeyError:
        raise HistosynthError(f"unknown length unit {unit!r} in the OME-XML", path) from None


def _float(path: Path, text: str | None, what: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise HistosynthError(f"OME-XML {what} is not a number: {text!r}", path) from None
    if not math.isfinite(value):
        raise HistosynthError(f"OME-XML {what} is not finite: {text!r}", path)
    return value


def _check_offsets(path: Path, offsets: list[float | None], what: str) -> None:
    known = [o for o in offsets if o is not None]
    if not known:
        return
    if len(known) != len(offsets):
        raise HistosynthError(f"{what}: some focal planes state an offset and others none", path)
    steps = np.diff(np.asarray(known, np.float64))
    if (steps == 0).any():
        dup = sorted({known[i] for i in np.flatnonzero(steps == 0)})
        raise HistosynthError(f"{what}: duplicate focal offsets {dup} µm (two planes at one depth)", path)
    if (steps < 0).any():
        raise HistosynthError(f"{what}: focal offsets are not increasing with the plane index: "
                              f"{[round(o, 4) for o in known]} µm", path)


def _ome_pixels(path: Path, xml: str, series_index: int):
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    try:
        root = ElementTree.fromstring(xml)
    except (ElementTree.ParseError, DefusedXmlException) as err:
        raise HistosynthError(f"malformed OME-XML: {err}", path) from err
    images = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Image"]
    if series_index >= len(images):
        return None
    return next((el for el in images[series_index] if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)


def _ome_offsets(path: Path, pixels, planes: int) -> tuple[list[float | None], tuple[float, float] | None]:
    """(centred focal offsets in µm, (mpp_x, mpp_y) or None) from an OME ``Pixels`` element."""
    if pixels is None:
        return [None] * planes, None
    mpp = None
    sx = _float(path, pixels.get("PhysicalSizeX"), "PhysicalSizeX")
    sy = _float(path, pixels.get("PhysicalSizeY"), "PhysicalSizeY")
    if sx is not None and sy is not None:
        mpp = (sx * _unit(path, pixels.get("PhysicalSizeXUnit")), sy * _unit(path, pixels.get("PhysicalSizeYUnit")))
        if not all(PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in mpp):
            log.info("%s: ignoring OME PhysicalSizeX/Y %.4g x %.4g um: not a microscope resolution", path, *mpp)
            mpp = None
    positions: dict[int, float] = {}
    for el in pixels:
        if el.tag.rsplit("}", 1)[-1] != "Plane":
            continue
        pz = _float(path, el.get("PositionZ"), "Plane PositionZ")
        if pz is None:
            continue
        the_z = int(el.get("TheZ", "0"))
        value = pz * _unit(path, el.get("PositionZUnit"))
        if positions.setdefault(the_z, value) != value:
            log.debug("%s: plane TheZ=%d has several PositionZ (channels/timepoints); the first is used", path, the_z)
    if sorted(positions) == list(range(planes)):
        absolute = [positions[z] for z in range(planes)]
        _check_offsets(path, absolute, "OME Plane PositionZ")
    else:
        step = _float(path, pixels.get("PhysicalSizeZ"), "PhysicalSizeZ")
        if step is None:
            log.warning("%s: no PhysicalSizeZ or Plane PositionZ in the OME-XML; focal offsets unknown", path)
            return [None] * planes, mpp
        step *= _unit(path, pixels.get("PhysicalSizeZUnit"))
        if not step > 0:
            raise HistosynthError(f"OME PhysicalSizeZ must be positive (increasing, distinct focal planes), "
                                  f"got {step:g} µm", path)
        absolute = [z * step for z in range(planes)]
    centre = (absolute[0] + absolute[-1]) / 2
    return [round(a - centre, 6) for a in absolute], mpp


def _open_ome(path: Path, tf: tifffile.TiffFile) -> tuple[list[tifffile.TiffPage], list[float | None],
                                                          tuple[float, float] | None] | None:
    """The planes of the first OME series with a Z axis; None when no series has one."""
    for index, series in enumerate(tf.series):
        axes = series.axes
        if "Z" not in axes:
            continue
        shape = dict(zip(axes, series.shape))
        extra = {a: n for a, n in shape.items() if a not in "ZYXS" and n != 1}
        if extra:
            raise HistosynthError(f"OME series {index} has axes {axes} with shape {series.shape}: only Z, Y, X and "
                                  f"samples may exceed 1 (channels or timepoints as planes are not supported)", path)
        planes = shape["Z"]
        pages = list(series.pages)
        if len(pages) != planes or any(p is None for p in pages):
            raise HistosynthError(f"OME series {index} declares {planes} focal planes but holds {len(pages)} pages",
                                  path)
        pages = [p.aspage() if hasattr(p, "aspage") else p for p in pages]
        offsets, mpp = _ome_offsets(path, _ome_pixels(path, tf.ome_metadata or "", index), planes)
        return pages, offsets, mpp
    return None


def _open_ndpi(path: Path, tf: tifffile.TiffFile) -> tuple[list[tifffile.TiffPage], list[float | None]] | None:
    """The full-resolution page of each NDPI focal plane, ordered by ZOffsetFromSlideCenter; None if not NDPI."""
    first = tf.pages.first
    if NDPI_FILEFORMAT not in first.tags or 271 not in first.tags:
        return None
    by_offset: dict[float, tifffile.TiffPage] = {}
    for page in tf.pages:
        page = page.aspage() if hasattr(page, "aspage") else page
        mag = page.tags.valueof(NDPI_MAGNIFICATION)
        if mag is not None and float(mag) < 0:  # -1 macro, -2 map
            continue
        z = page.tags.valueof(NDPI_ZOFFSET)
        z_um = 0.0 if z is None else float(z) / 1000.0
        best = by_offset.get(z_um)
        if best is not None and int(best.imagewidth) == int(page.imagewidth) \
                and int(best.imagelength) == int(page.imagelength):
            raise HistosynthError(f"NDPI: two full-resolution pages at one focal offset ({z_um:g} µm): duplicate "
                                  "focal planes", path)
        if best is None or int(page.imagewidth) > int(best.imagewidth):
            by_offset[z_um] = page
    offsets = sorted(by_offset)
    return [by_offset[z] for z in offsets], list(offsets)


def _find_planes(path: Path, tf: tifffile.TiffFile):
    """(pages, offsets, mpp or None, format, mpp source) of an open TIFF; one page for a single-plane file."""
    try:
        found_ome = _open_ome(path, tf) if tf.is_ome else None
        found_ndpi = None if found_ome is not None else _open_ndpi(path, tf)
    except HistosynthError:
        raise
    except Exception as err:  # noqa: BLE001 - tifffile raises many types on a damaged file
        raise HistosynthError(f"unreadable as a TIFF z-stack: {type(err).__name__}: {err}", path) from err
    if found_ome is not None:
        pages, offsets, mpp = found_ome
        return pages, offsets, mpp, "ome-tiff", "ome-physical-size"
    if found_ndpi is not None:
        pages, offsets = found_ndpi
        return pages, offsets, None, "ndpi", "tiff-resolution"
    return [tf.pages.first], [None], None, "tiff", "tiff-resolution"


def open_zstack(path: str | os.PathLike, *, min_planes: int = 2, mpp_fallback: float | None = None,
                max_pixels: int = MAX_PIXELS, cache_bytes: int = 64 << 20) -> ZStack:
    """Open an OME-TIFF with a Z axis or an NDPI with focal planes (see the module's docstring).

    ``min_planes``: fewer focal planes is an error (2, the default: a z-stack is asked for; 1 opens any).
    ``mpp_fallback``: µm/px when the file states none (else that is an error).
    """
    path = Path(path)
    if not path.is_file():
        raise HistosynthError("no such file" if not path.exists() else "not a file", path)
    try:
        tf = tifffile.TiffFile(path)
    except Exception as err:  # noqa: BLE001 - tifffile raises many types on a damaged or foreign file
        raise HistosynthError(f"unreadable as a TIFF z-stack: {type(err).__name__}: {err}", path) from err
    try:
        pages, offsets, mpp, fmt, mpp_source = _find_planes(path, tf)
        if mpp is None:
            mpp, mpp_source = mpp_from_tiff_tags(pages[0]), "tiff-resolution"
        if len(pages) < min_planes:
            raise HistosynthError(
                f"{len(pages)} focal plane; a z-stack needs at least {min_planes} (an OME-TIFF with a Z axis or "
                "an NDPI with focal planes)", path)
        sizes = [(int(p.imagewidth), int(p.imagelength)) for p in pages]
        if len(set(sizes)) > 1:
            listing = ", ".join(f"{o if o is not None else i}: {w}x{h}" for i, (o, (w, h))
                                in enumerate(zip(offsets, sizes)))
            raise HistosynthError(f"focal planes of different sizes ({listing})", path)
        _check_offsets(path, offsets, fmt)
        for p in pages:
            if np.dtype(p.dtype) != np.uint8:
                raise HistosynthError(f"expected 8-bit focal planes, found {p.dtype}", path)
        if mpp is None:
            if mpp_fallback is None:
                raise HistosynthError("no microns-per-pixel in the z-stack's metadata and no fallback "
                                      "(--mpp-fallback)", path)
            mpp, mpp_source = (float(mpp_fallback), float(mpp_fallback)), "fallback"
        planes = [_Plane(path, p, max_pixels, cache_bytes) for p in pages]
    except BaseException:
        tf.close()
        raise
    return ZStack(path=path, format=fmt, plane_offsets_um=offsets, dimensions=sizes[0],
                  mpp=(mpp[0] + mpp[1]) / 2, mpp_source=mpp_source, _planes=planes, _tf=tf)


def focal_planes(path: str | os.PathLike) -> dict | None:
    """``{"format", "planes", "plane_offsets_um"}`` of a slide with more than one focal plane, else None.

    For ``slide-info``: a file that is not a TIFF, or a TIFF without a Z axis or NDPI focal planes, gives None;
    a z-stack that is malformed (planes of different sizes, duplicate offsets) raises its error.
    """
    path = Path(path)
    try:
        tf = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - not a TIFF: no focal planes
        return None
    with tf:
        if not (tf.is_ome or NDPI_FILEFORMAT in tf.pages.first.tags):
            return None
        if len(_find_planes(path, tf)[0]) < 2:
            return None
    with open_zstack(path, mpp_fallback=1.0, max_pixels=0) as stack:  # planes are not read here
        return stack.describe()
