"""One reader over whole-slide images and plain images.

:func:`open_slide` returns a :class:`Slide` whatever the file is:

- formats OpenSlide opens (Aperio ``.svs``, Hamamatsu ``.ndpi``, MIRAX
  ``.mrxs``, Leica ``.scn``, tiled pyramidal TIFF, ...) go through OpenSlide;
  when such a slide stores its levels as plain tiled TIFF pages (generic TIFF
  and Aperio with JPEG, LZW, Deflate, Zstd or no compression) regions are
  decoded straight from the TIFF tiles with tifffile/imagecodecs, which is
  several times faster than ``read_region`` and gives the same pixels (it is
  the same libjpeg-turbo decode); other levels and formats use OpenSlide.
  When every level of such a slide decodes directly and the file states its
  MPP, the slide is opened without OpenSlide at all (``backend`` "tifffile"),
  with the levels and downsamples OpenSlide would list: opening with OpenSlide
  hashes the smallest level, which for a single-level slide is the whole file;
- images OpenSlide cannot open (stripped TIFF such as MoNuSeg's, PNG, JPEG)
  are read whole with tifffile or OpenCV; they are single-level. Their size
  is read from the header first (TIFF tags; the PNG, JPEG or BMP header) and
  an image of more than ``max_pixels`` pixels is refused before anything is
  decoded, so a file whose header claims a huge size (a decompression bomb)
  costs nothing. The default, :data:`MAX_PIXELS` (2**31, the schema's
  ``tile.max_pixels``: a 46,000-pixel square, 6 GiB as RGB), is over 2,000
  times the plain images the project reads (MoNuSeg and CoNSeP: 1000 x 1000)
  and over 200 times a demo slide (3072 x 3072). OpenCV's own decoders stop
  at 2**30 pixels, so a larger PNG or JPEG fails there, with
  an error naming the file (convert them to TIFF).

Coordinates are level-0 pixels, as in OpenSlide. Pixels outside the slide are
returned as white background (255), never as transparent black.

MPP (micrometres per level-0 pixel) comes from, in order: OpenSlide's
``openslide.mpp-x``/``-y`` (read from the same place OpenSlide reads it, the
Aperio description's ``MPP``, when a slide is opened without OpenSlide); the
TIFF resolution tags (unit centimetre or inch,
only when the value is a plausible microscope resolution, 0.05–20 µm/px, so a
default 72 dpi tag is not taken for one); the ``mpp_fallback`` the caller
passes (a per-slide value from the slide table, or the configured default).
A slide with none of these is an error, never a silent 0.25.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile

from histosynth.errors import HistosynthError

log = logging.getLogger(__name__)

BACKGROUND = 255
PLAUSIBLE_MPP = (0.05, 20.0)
# TIFF compressions whose tiles tifffile decodes with the same result as
# OpenSlide (JPEG 2000 in Aperio files needs OpenSlide's colour handling).
_FAST_COMPRESSIONS = {1, 5, 7, 8, 32946, 50000}
_PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
#: default limit on the pixels of an image read whole (not through OpenSlide); the schema's tile.max_pixels
MAX_PIXELS = 2**31
# JPEG start-of-frame markers (baseline, progressive, lossless, ...; not DHT C4, JPG C8, DAC CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class LevelInfo:
    width: int
    height: int
    downsample: float


class _TiffLevel:
    """Decode regions of one tiled TIFF page directly, with a small tile cache."""

    def __init__(self, path: Path, page: tifffile.TiffPage, cache_bytes: int):
        self.path = path
        self.page = page
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tw = int(page.tilewidth)
        self.th = int(page.tilelength)
        self.cols = -(-self.width // self.tw)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.jpegtables = page.jpegtables
        self.jpegheader = getattr(page, "jpegheader", None)
        self._fd = os.open(path, os.O_RDONLY)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_items = max(4, cache_bytes // (self.tw * self.th * 3))
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}  # tiles being decoded in the background
        self.decoded = 0  # number of tile decodes, for benchmarks and tests

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def cache_tiles(self) -> int:
        """How many decoded tiles the cache holds."""
        return self._cache_items

    def submit(self, index: int, pool: Executor) -> None:
        """Start decoding tile ``index`` on ``pool`` unless it is cached or under way."""
        with self._lock:
            if index in self._cache or index in self._pending:
                return
            self._pending[index] = pool.submit(self._decode, index)

    def tile(self, index: int) -> np.ndarray:
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return cached
            pending = self._pending.get(index)
        if pending is not None:
            return pending.result()
        return self._decode(index)

    def _decode(self, index: int) -> np.ndarray:
        """Decode tile ``index`` into the cache (and return it)."""
        count = int(self.counts[index])
        if count == 0:  # a tile the scanner never wrote: background
            arr = np.full((self.th, self.tw, 3), BACKGROUND, np.uint8)
        else:
            data = os.pread(self._fd, count, int(self.offsets[index]))
            if len(data) != count:
                raise HistosynthError(
                    f"truncated slide: tile {index} of a {self.width}x{self.height} level "
                    f"ends past the end of the file",
                    self.path,
                )
            try:
                decoded = self.page.decode(data, index, jpegtables=self.jpegtables, jpegheader=self.jpegheader)[0]
            except Exception as err:  # codec errors come as many types
                raise HistosynthError(f"corrupt slide: tile {index} does not decode ({err})", self.path) from err
            arr = _to_rgb(np.asarray(decoded).reshape(decoded.shape[-3:]), self.path)
        arr.flags.writeable = False  # shared through the cache
        with self._lock:
            self.decoded += 1
            self._pending.pop(index, None)
            self._cache[index] = arr
            while len(self._cache) > self._cache_items:
                self._cache.popitem(last=False)
        return arr

    def jpeg_overview(
        self, max_bytes_per_pixel: float, max_pixels: int, pool: Executor | None = None
    ) -> tuple[np.ndarray, int] | None:
        """A grey image of this level at 1/8 scale or coarser, from DC-only decodes of its nearly blank JPEG tiles.

        A JPEG stores the mean of each 8x8 block as its DC coefficient, so
        libjpeg decodes a tile at 1/8 scale without most of the work of a full
        decode. Only tiles of at most ``max_bytes_per_pixel`` compressed bytes
        per pixel are probed: blank background compresses to a few hundredths
        of a byte per pixel and tissue to a few tenths, so the probe goes
        where it is cheap and likely to spare a full decode. The blocks of
        the other tiles are 0 (dark: possibly tissue). Returns the image and its
        scale (level pixels per image pixel: 8, or 16, 32, ... when averaging
        blocks is needed to stay within ``max_pixels``). None when the level
        is not JPEG, when no such averaging fits ``max_pixels``, or when the
        probe of the largest tile does not match its full decode (a colour
        space this reader does not expect). With ``pool``, tiles are probed on
        its threads (same result).
        """
        if int(self.page.compression) != 7 or self.tw % 8 or self.th % 8:
            return None
        photometric = int(self.page.photometric)
        if photometric not in (2, 6):  # RGB or YCbCr
            return None
        # TIFF JPEG tiles are abbreviated streams: put the shared tables in front and,
        # for RGB data (no colour transform, as Aperio writes it), an Adobe marker
        # saying so, which libjpeg honours
        head = self.jpegtables[:-2] if self.jpegtables else b"\xff\xd8"
        if photometric == 2:
            head += b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
        bw, bh = self.tw // 8, self.th // 8
        rows = -(-self.height // self.th)
        # average r x r blocks of the probes (r a power of 2 dividing them) to stay within max_pixels
        r = 1
        while rows * bh * self.cols * bw > max_pixels * r * r:
            r *= 2
            if bw % r or bh % r:
                return None
        out = np.zeros((rows * bh // r, self.cols * bw // r), np.uint8)

        def probe(index: int) -> np.ndarray | None:
            count = int(self.counts[index])
            if count == 0:
                return np.full((bh, bw), BACKGROUND, np.uint8)
            data = os.pread(self._fd, count, int(self.offsets[index]))
            grey = cv2.imdecode(np.frombuffer(head + data[2:], np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
            return grey if grey is not None and grey.shape == (bh, bw) else None

        check = int(np.argmax(self.counts))
        grey = probe(check)
        full = cv2.resize(cv2.cvtColor(self.tile(check), cv2.COLOR_RGB2GRAY), (bw, bh), interpolation=cv2.INTER_AREA)
        if grey is None or np.abs(grey.astype(np.int16) - full).mean() > 2.0:
            log.warning("%s: 1/8-scale JPEG decode does not match the full decode; not used", self.path)
            return None
        limit = max_bytes_per_pixel * self.tw * self.th
        indices = [int(i) for i in np.flatnonzero(self.counts <= limit)]
        if pool is None:
            probes: Iterable[np.ndarray | None] = map(probe, indices)
        else:
            # a probe takes tens of microseconds, as long as handing a task to a thread:
            # each task probes a run of tiles (results are placed as they arrive, in order)
            def probe_run(run: list[int]) -> list[np.ndarray | None]:
                return [probe(i) for i in run]

            n = max(4, min(32, -(-len(indices) // 8)))
            runs = [indices[i : i + n] for i in range(0, len(indices), n)]
            probes = (grey for run in pool.map(probe_run, runs) for grey in run)
        for index, grey in zip(indices, probes):
            if grey is None:
                return None
            if r > 1:
                grey = cv2.resize(grey, (bw // r, bh // r), interpolation=cv2.INTER_AREA)
            ty, tx = divmod(index, self.cols)
            out[ty * bh // r : (ty + 1) * bh // r, tx * bw // r : (tx + 1) * bw // r] = grey
        scale = 8 * r
        return out[: -(-self.height // scale), : -(-self.width // scale)], scale

    def tile_indices(self, lx: int, ly: int, w: int, h: int) -> list[int]:
        """Indices of the TIFF tiles a region of this level touches."""
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, self.width), min(ly + h, self.height)
        if x0 >= x1 or y0 >= y1:
            return []
        return [
            ty * self.cols + tx
            for ty in range(y0 // self.th, (y1 - 1) // self.th + 1)
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1)
        ]

    def read(self, lx: int, ly: int, w: int, h: int, copy: bool = True) -> np.ndarray:
        """Region of this level at level coordinates (may run past the edges).

        With ``copy=False`` a region that is exactly one whole TIFF tile is
        returned as the cached, read-only array.
        """
        if (
            not copy and w == self.tw and h == self.th and lx % self.tw == 0 and ly % self.th == 0
            and 0 <= lx and lx + w <= self.width and 0 <= ly and ly + h <= self.height
        ):
            return self.tile((ly // self.th) * self.cols + lx // self.tw)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, self.width), min(ly + h, self.height)
        inside = x0 == lx and y0 == ly and x1 == lx + w and y1 == ly + h
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), BACKGROUND, np.uint8)
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // self.th, (y1 - 1) // self.th + 1):
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1):
                tile = self.tile(ty * self.cols + tx)
                # intersection of the tile with the wanted region, in level coordinates
                ax0, ay0 = max(x0, tx * self.tw), max(y0, ty * self.th)
                ax1, ay1 = min(x1, (tx + 1) * self.tw), min(y1, (ty + 1) * self.th)
                out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx] = tile[
                    ay0 - ty * self.th : ay1 - ty * self.th, ax0 - tx * self.tw : ax1 - tx * self.tw
                ]
        return out


def _to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """uint8 RGB from grey, grey+alpha, RGB or RGBA (alpha composited on white)."""
    if arr.dtype != np.uint8:
        raise HistosynthError(f"expected 8-bit image data, found {arr.dtype}", path)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise HistosynthError(f"unsupported image shape {arr.shape}", path)
    channels = arr.shape[2]
    if channels == 3:
        return arr
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    colour = arr[:, :, :3] if channels == 4 else np.repeat(arr[:, :, :1], 3, axis=2)
    alpha = arr[:, :, -1:].astype(np.uint16)
    return ((colour * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)


def _mpp_from_tiff_tags(page: tifffile.TiffPage) -> tuple[float, float] | None:
    unit = page.tags.get("ResolutionUnit")
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if unit is None or xres is None or yres is None:
        return None
    try:  # a damaged file can give any count or type here: a malformed tag states no resolution
        microns = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        if microns is None:
            return None
        out = []
        for tag in (xres, yres):
            num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
            num, den = float(num), float(den)
            if not (num and den and math.isfinite(num) and math.isfinite(den)):
                return None
            out.append(microns * den / num)
    except (TypeError, ValueError):
        log.info("ignoring malformed TIFF resolution tags")
        return None
    if not all(PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in out):
        log.info("ignoring TIFF resolution %.4g x %.4g um/px: not a microscope resolution", *out)
        return None
    return out[0], out[1]


class Slide:
    """An open slide: dimensions, levels, MPP, and region reads in RGB uint8.

    Open with :func:`open_slide`; use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        backend: str,
        levels: list[LevelInfo],
        mpp: tuple[float, float],
        mpp_source: str,
        *,
        osr: openslide.OpenSlide | None = None,
        fast_levels: dict[int, _TiffLevel] | None = None,
        image: np.ndarray | None = None,
        vendor: str | None = None,
    ):
        self.path = path
        self.name = path.stem
        self.backend = backend
        self.levels = levels
        self.mpp_x, self.mpp_y = mpp
        self.mpp_source = mpp_source
        self.vendor = vendor
        self._osr = osr
        self._fast = fast_levels or {}
        self._image = image

    # -- description -------------------------------------------------------
    @property
    def mpp(self) -> float:
        """Micrometres per level-0 pixel (the mean of x and y when they differ)."""
        return (self.mpp_x + self.mpp_y) / 2

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(lv.width, lv.height) for lv in self.levels]

    @property
    def level_downsamples(self) -> list[float]:
        return [lv.downsample for lv in self.levels]

    def fast_path(self, level: int) -> bool:
        """Whether regions of ``level`` are decoded from the TIFF tiles directly."""
        return level in self._fast

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.01) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (within a tolerance)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + tolerance):
                best = i if lv.downsample >= self.levels[best].downsample else best
        return best

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": self.dimensions,
            "level_dimensions": self.level_dimensions,
            "level_downsamples": self.level_downsamples,
            "mpp": [self.mpp_x, self.mpp_y],
            "mpp_source": self.mpp_source,
            "fast_levels": sorted(self._fast),
        }

    # -- reading -----------------------------------------------------------
    def read_region(
        self, x: int, y: int, level: int, width: int, height: int, copy: bool = True
    ) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level``, top-left at level-0 (x, y).

        Parts outside the slide are white. ``copy=False`` allows a read-only
        array shared with the reader's cache (no copy when the region is one
        whole TIFF tile).
        """
        if not 0 <= level < len(self.levels):
            raise HistosynthError(f"level {level} out of range 0..{len(self.levels) - 1}", self.path)
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        ds = self.levels[level].downsample
        if level in self._fast:
            lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
            return self._fast[level].read(lx, ly, width, height, copy=copy)
        if self._osr is not None:
            try:
                rgba = np.asarray(self._osr.read_region((int(x), int(y)), level, (int(width), int(height))))
            except openslide.OpenSlideError as err:
                raise HistosynthError(f"corrupt or truncated slide: {err}", self.path) from err
            return _to_rgb(rgba, self.path)
        assert self._image is not None
        out = np.full((height, width, 3), BACKGROUND, np.uint8)
        h, w = self._image.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out

    def prefetch(self, regions: list[tuple[int, int, int, int, int]], pool: Executor) -> None:
        """Start decoding, on ``pool``, the TIFF tiles that these regions need; returns at once.

        ``regions`` are (x, y, level, width, height) as for :meth:`read_region`;
        levels without the direct TIFF path are skipped. Decoded tiles land in
        the reader's cache, and a :meth:`read_region` that needs a tile still
        being decoded waits for it. Keep what is prefetched and not yet read
        within :meth:`cached_regions`, or tiles are evicted before they are used.
        """
        for x, y, level, w, h in regions:
            fast = self._fast.get(level)
            if fast is None:
                continue
            ds = self.levels[level].downsample
            lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
            for index in fast.tile_indices(lx, ly, w, h):
                fast.submit(index, pool)

    def cached_regions(self, level: int, width: int, height: int) -> int:
        """How many regions of ``width`` x ``height`` at ``level`` fit the decoded-tile cache (0: no cache)."""
        fast = self._fast.get(level)
        if fast is None:
            return 0
        per_region = (-(-width // fast.tw) + 1) * (-(-height // fast.th) + 1)
        return fast.cache_tiles // per_region

    def jpeg_overview(
        self, level: int, max_bytes_per_pixel: float = 0.1, max_pixels: int = 4 << 20,
        pool: Executor | None = None,
    ) -> tuple[np.ndarray, float] | None:
        """A cheap grey overview of ``level`` and its downsample, for ruling out background.

        Built from 1/8-scale DC-only decodes of the level's nearly blank JPEG
        tiles (see :meth:`_TiffLevel.jpeg_overview`), averaged further on
        levels so large that 1/8 scale would exceed ``max_pixels``; pixels of
        tiles not probed are 0, i.e. possibly tissue. None for levels without
        the direct JPEG path. With ``pool``, the tiles are probed on its threads.
        """
        fast = self._fast.get(level)
        found = fast.jpeg_overview(max_bytes_per_pixel, max_pixels, pool) if fast is not None else None
        if found is None:
            return None
        grey, scale = found
        return grey, scale * self.levels[level].downsample

    def read_level(self, level: int, chunk: int = 4096) -> np.ndarray:
        """A whole level as one array (meant for low-resolution levels)."""
        w, h = self.level_dimensions[level]
        ds = self.levels[level].downsample
        out = np.empty((h, w, 3), np.uint8)
        for ly in range(0, h, chunk):
            for lx in range(0, w, chunk):
                cw, ch = min(chunk, w - lx), min(chunk, h - ly)
                out[ly : ly + ch, lx : lx + cw] = self.read_region(
                    int(round(lx * ds)), int(round(ly * ds)), level, cw, ch
                )
        return out

    def close(self) -> None:
        for lvl in self._fast.values():
            lvl.close()
        self._fast = {}
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.path.name!r}, {w}x{h}, levels={self.level_count}, mpp={self.mpp:.4g}, {self.backend})"


def _resolve_mpp(
    path: Path,
    found: tuple[float, float] | None,
    source: str,
    fallback: float | None,
) -> tuple[tuple[float, float], str]:
    if found is not None:
        return found, source
    if fallback is not None:
        if not fallback > 0:
            raise HistosynthError(f"mpp fallback must be positive, got {fallback}", path)
        return (float(fallback), float(fallback)), "fallback"
    raise HistosynthError(
        "no microns-per-pixel in the slide's metadata and no fallback: "
        "give the slide an 'mpp' in the slide table or set 'mpp_fallback' in config.yaml",
        path,
    )


def _open_openslide(path: Path, vendor: str, mpp_fallback: float | None, cache_bytes: int) -> Slide:
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as err:
        raise HistosynthError(f"corrupt or truncated slide ({vendor}): {err}", path) from err
    levels = [
        LevelInfo(int(w), int(h), float(ds)) for (w, h), ds in zip(osr.level_dimensions, osr.level_downsamples)
    ]
    props = osr.properties
    found = None
    source = "metadata"
    try:
        if openslide.PROPERTY_NAME_MPP_X in props and openslide.PROPERTY_NAME_MPP_Y in props:
            found = (float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y]))
            source = "openslide"
            if not all(v > 0 for v in found):
                found = None
    except ValueError:
        found = None
    fast: dict[int, _TiffLevel] = {}
    if vendor in ("generic-tiff", "aperio"):
        try:
            fast = _match_tiff_levels(path, levels, cache_bytes)
        except (tifffile.TiffFileError, OSError, ValueError) as err:
            osr.close()
            raise HistosynthError(f"corrupt or truncated slide: {err}", path) from err
        if found is None and fast:
            with tifffile.TiffFile(path) as tf:
                tags = _mpp_from_tiff_tags(tf.pages[0])
            if tags is not None:
                found, source = tags, "tiff-resolution"
    try:
        mpp, mpp_source = _resolve_mpp(path, found, source, mpp_fallback)
    except HistosynthError:
        osr.close()
        for lvl in fast.values():
            lvl.close()
        raise
    return Slide(path, "openslide", levels, mpp, mpp_source, osr=osr, fast_levels=fast, vendor=vendor)


def _match_tiff_levels(path: Path, levels: list[LevelInfo], cache_bytes: int) -> dict[int, _TiffLevel]:
    """Map OpenSlide levels to tiled TIFF pages of the same size that tifffile can decode."""
    fast: dict[int, _TiffLevel] = {}
    with tifffile.TiffFile(path) as tf:
        by_size = {(int(p.imagewidth), int(p.imagelength)): p for p in tf.pages if p.is_tiled}
        for i, lv in enumerate(levels):
            page = by_size.get((lv.width, lv.height))
            if page is not None and _decodes_directly(page):
                fast[i] = _TiffLevel(path, page, cache_bytes)
    return fast


def _check_tile_table(path: Path, page: tifffile.TiffPage) -> None:
    """Refuse a tiled page whose tile table is shorter than its size needs (a corrupt size or table).

    OpenSlide reads the missing tiles as blank, so such a file would open and
    tile into a slide of white (for a damaged width tag, one of millions of tiles).
    """
    try:
        tw, th = int(page.tilewidth), int(page.tilelength)
        w, h = int(page.imagewidth), int(page.imagelength)
        have = len(page.dataoffsets)
    except (TypeError, ValueError):  # tags of the wrong type or count: OpenSlide or tifffile reports the file
        return
    need = -(-w // tw) * -(-h // th) if tw > 0 and th > 0 else 0
    if have < need:
        raise HistosynthError(
            f"TIFF page {page.index}: a {w} x {h} image in {tw} x {th} tiles needs {need:,} tiles but the "
            f"tile table lists {have:,}: a corrupt or truncated slide",
            path,
        )


def _decodes_directly(page: tifffile.TiffPage) -> bool:
    """Whether tifffile decodes this tiled page's tiles with the same result as OpenSlide."""
    ok = (
        page.samplesperpixel in (3, 4)
        and page.bitspersample == 8
        and int(page.compression) in _FAST_COMPRESSIONS
        and page.planarconfig == 1
        and len(page.dataoffsets) == -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength)
    )
    if ok:
        # build tifffile's decoder while the file is open (it peeks at the first
        # tile once); later decodes only use the bytes we pass in
        page.decode  # noqa: B018
    return ok


class _CollectLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _aperio_mpp(description: str) -> tuple[float, float] | None:
    """``MPP`` from an Aperio ImageDescription (``header|key = value|...``), as OpenSlide reads it."""
    for field in description.split("|")[1:]:
        key, _, value = field.partition("=")
        if key.strip() == "MPP":
            try:
                mpp = float(value.strip())
            except ValueError:
                return None
            return (mpp, mpp) if math.isfinite(mpp) and mpp > 0 else None
    return None


def _open_tiff_direct(path: Path, vendor: str, mpp_fallback: float | None, cache_bytes: int) -> Slide | None:
    """Open an Aperio or generic tiled TIFF without OpenSlide, when every level decodes directly.

    The levels are the ones OpenSlide lists (Aperio: every tiled directory in
    file order; generic TIFF: the first directory and the tiled
    reduced-resolution ones, widest first), with OpenSlide's downsamples, and
    the MPP is the one the file states (Aperio: ``MPP`` in the description;
    generic TIFF: the resolution tags). Opening with OpenSlide costs a hash of
    the smallest level, which for a single-level slide means reading the whole
    file. None when anything falls outside this (a level tifffile cannot
    decode as OpenSlide does, tifffile warning about the file, tile data past
    the end of the file, no MPP in the file): the caller then uses OpenSlide,
    which decides.
    """
    collect = _CollectLog()
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(collect)
    try:
        with tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            if vendor == "aperio":
                level_pages = [p for p in pages if p.is_tiled]
                found = _aperio_mpp(pages[0].description)
                source = "aperio-description"
            else:
                level_pages = [p for i, p in enumerate(pages) if p.is_tiled and (i == 0 or p.subfiletype & 1)]
                level_pages.sort(key=lambda p: -int(p.imagewidth))
                found = _mpp_from_tiff_tags(pages[0])
                source = "tiff-resolution"
            for p in level_pages:
                _check_tile_table(path, p)
            if found is None or not level_pages or not all(_decodes_directly(p) for p in level_pages):
                return None
            size = path.stat().st_size
            if any(int(np.max(np.add(p.dataoffsets, p.databytecounts))) > size for p in level_pages):
                return None
            fast = {i: _TiffLevel(path, p, cache_bytes) for i, p in enumerate(level_pages)}
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, TypeError):
        return None
    finally:
        tiff_log.removeHandler(collect)
    if collect.messages:
        for lvl in fast.values():
            lvl.close()
        return None
    w0, h0 = int(level_pages[0].imagewidth), int(level_pages[0].imagelength)
    levels = []
    for p in level_pages:
        w, h = int(p.imagewidth), int(p.imagelength)
        # OpenSlide's downsample: the mean of the two axes' ratios
        levels.append(LevelInfo(w, h, (h0 / h + w0 / w) / 2))
    mpp, mpp_source = _resolve_mpp(path, found, source, mpp_fallback)
    return Slide(path, "tifffile", levels, mpp, mpp_source, fast_levels=fast, vendor=vendor)


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Refuse an image whose header claims more than ``max_pixels`` pixels, before it is decoded."""
    if width * height > max_pixels:
        raise HistosynthError(
            f"the image header claims {width} x {height} pixels ({width * height:,}), more than the limit of "
            f"{max_pixels:,} for an image read whole (not through OpenSlide): a corrupt or hostile file? "
            "If it is genuine, raise tile.max_pixels in config.yaml (--max-pixels)",
            path,
        )


def _header_size(buf: memoryview) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or BMP header, without decoding; None for other or unreadable content."""
    try:
        if bytes(buf[:8]) == b"\x89PNG\r\n\x1a\n" and bytes(buf[12:16]) == b"IHDR":
            return struct.unpack_from(">II", buf, 16)
        if bytes(buf[:2]) == b"BM":
            if struct.unpack_from("<I", buf, 14)[0] == 12:  # BITMAPCOREHEADER
                return struct.unpack_from("<HH", buf, 18)
            w, h = struct.unpack_from("<ii", buf, 18)
            return abs(w), abs(h)  # a negative height means top-down rows
        if bytes(buf[:2]) == b"\xff\xd8":
            i = 2
            while i + 9 <= len(buf) and buf[i] == 0xFF:
                marker = buf[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                elif marker in _JPEG_SOF:
                    h, w = struct.unpack_from(">HH", buf, i + 5)
                    return w, h
                elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                    i += 2
                else:
                    i += 2 + struct.unpack_from(">H", buf, i + 2)[0]
    except struct.error:  # a header cut short: the decoder reports the file
        return None
    return None


def _open_plain(path: Path, mpp_fallback: float | None, max_pixels: int) -> Slide:
    suffix = path.suffix.lower()
    found = None
    if suffix in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                _check_pixels(path, int(page.imagewidth), int(page.imagelength), max_pixels)
                found = _mpp_from_tiff_tags(page)
                image = page.asarray()
        except HistosynthError:
            raise
        except Exception as err:  # tifffile and its codecs raise many types for bad files
            raise HistosynthError(f"not a readable TIFF image (corrupt or truncated?): {err}", path) from err
    else:
        data = np.fromfile(path, dtype=np.uint8)
        size = _header_size(data.data)
        if size is not None:
            _check_pixels(path, size[0], size[1], max_pixels)
        try:
            image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
            if image is not None and image.ndim == 3:
                code = cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
                image = cv2.cvtColor(image, code)
        except cv2.error as err:  # OpenCV's decoders refuse what they cannot read with an assertion
            detail = " ".join(str(err).split())
            raise HistosynthError(f"OpenCV cannot decode the image (corrupt, or too large for it?): {detail}",
                                  path) from err
        if image is None:
            raise HistosynthError("not an image that OpenSlide, tifffile or OpenCV can read", path)
    image = np.ascontiguousarray(_to_rgb(image, path))
    mpp, source = _resolve_mpp(path, found, "tiff-resolution", mpp_fallback)
    h, w = image.shape[:2]
    return Slide(path, "plain", [LevelInfo(w, h, 1.0)], mpp, source, image=image)


def open_slide(
    path: str | os.PathLike,
    mpp_fallback: float | None = None,
    cache_bytes: int = 64 << 20,
    max_pixels: int = MAX_PIXELS,
) -> Slide:
    """Open a whole-slide image or plain image; errors name the file and the problem.

    ``mpp_fallback`` is used only when the file states no resolution.
    ``cache_bytes`` bounds the decoded-tile cache of the fast TIFF path, per level.
    ``max_pixels`` bounds the size of an image read whole (one OpenSlide cannot
    open), checked from its header before it is decoded.
    """
    path = Path(path)
    if not path.exists():
        raise HistosynthError("no such file", path)
    if not path.is_file():
        raise HistosynthError("not a file", path)
    if path.stat().st_size == 0:
        raise HistosynthError("empty file", path)
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        vendor = None
    if vendor in ("generic-tiff", "aperio"):
        slide = _open_tiff_direct(path, vendor, mpp_fallback, cache_bytes)
        if slide is not None:
            return slide
    if vendor is not None:
        return _open_openslide(path, vendor, mpp_fallback, cache_bytes)
    if path.suffix.lower() not in _PLAIN_SUFFIXES:
        raise HistosynthError(
            f"not a slide OpenSlide recognises, and '{path.suffix}' is not a plain image type "
            f"({', '.join(sorted(_PLAIN_SUFFIXES))})",
            path,
        )
    return _open_plain(path, mpp_fallback, max_pixels)


#: public names of the TIFF helpers that other readers (histosynth.multifocus.zstack: one page per focal plane) share
TiffLevel = _TiffLevel
mpp_from_tiff_tags = _mpp_from_tiff_tags
to_rgb = _to_rgb
