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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import orjson
import pandas as pd
import shapely
import tifffile

from histosynth import __version__
from histosynth.errors import HistosynthError

log = logging.getLogger(__name__)

__all__ = ["CLASS_COLORS", "SLIDE_COLUMNS", "STYLES", "make_demo_slides"]

#: Nucleus classes and their QuPath display colours.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Epithelial": (200, 0, 0),
    "Lymphocyte": (160, 90, 160),
    "Spindle": (150, 200, 150),
}
_CLASS_NAMES = tuple(CLASS_COLORS)
_EPI, _LYM, _SPI = 0, 1, 2

#: Columns of ``slides.csv`` (and of the table :func:`make_demo_slides` returns).
SLIDE_COLUMNS = ("slide", "image", "annotations", "stain", "mpp", "width", "height", "n_nuclei")
MIN_SIZE = 512
MAX_MPP = 2.0
_COORD_GRID = 0.01  # polygon vertices are rounded to this grid (pixels)


@dataclass(frozen=True)
class _Style:
    """A stain style: Beer-Lambert stain vectors (OD per RGB channel) and gains."""

    name: str
    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    h_gain: float
    e_gain: float
    od_bg: tuple[float, float, float]  # glass + illumination (background ~ 240-250)


#: The stain styles, alternated across slides (slide k gets ``STYLES[k % 2]``).
STYLES: tuple[_Style, ...] = (
    _Style("pale", (0.65, 0.70, 0.29), (0.14, 0.86, 0.49), 0.70, 0.50, (0.025, 0.035, 0.022)),
    _Style("dark", (0.55, 0.76, 0.36), (0.30, 0.82, 0.49), 1.20, 0.98, (0.030, 0.038, 0.024)),
)


# --------------------------------------------------------------------------- hashing & noise

_U32 = np.uint32
_C1, _C2 = _U32(0x8DA6B343), _U32(0xD8163841)
_INV24 = np.float32(1.0 / (1 << 24))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 finaliser on a uint32 array (in place, returned)."""
    h ^= h >> _U32(16)
    h *= _U32(0x85EBCA6B)
    h ^= h >> _U32(13)
    h *= _U32(0xC2B2AE35)
    h ^= h >> _U32(16)
    return h


def _u32(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).astype(np.uint32)


def _hash2(ix: Any, iy: Any, seed: int) -> np.ndarray:
    """Uniform [0, 1) float32 from integer coordinates (broadcasting) and a seed."""
    salt = _U32((seed * 0xCB1AB31F + 0x9E3779B9) & 0xFFFFFFFF)
    hy = _fmix32(_u32(iy) * _C2 + salt)
    h = _fmix32((_u32(ix) * _C1) ^ hy)
    return (h >> _U32(8)).astype(np.float32) * _INV24


def _seed_of(*parts: int) -> int:
    """A 32-bit seed derived from integers (stable across runs and platforms)."""
    h = np.array([0x243F6A88, 0], dtype=np.uint32)
    for p in parts:
        h = _fmix32(h ^ _fmix32(np.array([p & 0xFFFFFFFF, 0], dtype=np.uint32) * _C1 + _C2))
    return int(h[0])


def _smoothstep(f: np.ndarray) -> np.ndarray:
    return f * f * (3.0 - 2.0 * f)


class _Noise:
    """Fractal value noise in [0, 1]: a pure function of (x, y) in level-0 pixels.

    ``grid`` evaluates it at pixel centres of a window (via separable weight
    matrices); ``points`` at arbitrary points; both give the same values.
    """

    def __init__(self, seed: int, scale: float, octaves: int = 1, gain: float = 0.5):
        self.octaves = []
        amp, total = 1.0, 0.0
        for o in range(octaves):
            s = _seed_of(seed, o)
            off = _hash2(np.array([o, o]), np.array([1, 2]), s) * 64.0
            self.octaves.append((s, float(scale) / 2**o, amp, float(off[0]), float(off[1])))
            total += amp
            amp *= gain
        self.norm = 1.0 / total
        # grids are sampled every `step` px (power of two, <= 1/16 of the finest
        # octave) and interpolated linearly: smooth fields cost almost nothing
        finest = float(scale) / 2 ** (octaves - 1)
        self.step = int(2 ** max(0, min(6, math.floor(math.log2(max(finest / 16.0, 1.0))))))

    def sample(self, y0: int, x0: int, h: int, w: int, step: int) -> np.ndarray:
        """Like ``grid`` but evaluated on a coarser aligned grid and interpolated."""
        r = self.step // step
        if r <= 1:
            return self.grid(y0, x0, h, w, step)
        j0, i0 = y0 // r - 1, x0 // r - 1
        j1, i1 = -(-(y0 + h) // r) + 1, -(-(x0 + w) // r) + 1
        v = self.grid(j0, i0, j1 - j0, i1 - i0, step * r)
        v = cv2.resize(v, ((i1 - i0) * r, (j1 - j0) * r), interpolation=cv2.INTER_LINEAR)
        oy, ox = y0 - j0 * r, x0 - i0 * r
        return v[oy : oy + h, ox : ox + w]

    @staticmethod
    def _axis(start: int, n: int, scale: float, off: float) -> tuple[int, np.ndarray, np.ndarray, int]:
        """Lattice index (relative to the first) and smoothstep weight per cell."""
        u = (start + np.arange(n) + 0.5) / scale + off
        i = np.floor(u)
        s = _smoothstep(u - i).astype(np.float32)
        i = i.astype(np.int64)
        i0 = int(i[0])
        return i0, i - i0, s, int(i[-1]) - i0 + 2

    def grid(self, y0: int, x0: int, h: int, w: int, step: int = 1) -> np.ndarray:
        """Values at the centres of cells ``step`` pixels wide (cell (i, j) centred on
        ((x0 + j + 0.5) * step, (y0 + i + 0.5) * step)).

        Separable interpolation, x then y, with elementwise float32 arithmetic only
        (no BLAS), so the result does not depend on threads or kernels.
        """
        out = np.zeros((h, w), np.float32)
        for seed, scale, amp, ox, oy in self.octaves:
            iy0, ry, sy, ny = self._axis(y0, h, scale / step, oy)
            ix0, rx, sx, nx = self._axis(x0, w, scale / step, ox)
            lat = _hash2(np.arange(ix0, ix0 + nx)[None, :], np.arange(iy0, iy0 + ny)[:, None], seed)
            a = lat[:, rx]
            rows = a + (lat[:, rx + 1] - a) * sx  # (ny, w)
            top = rows[ry]
            val = top + (rows[ry + 1] - top) * sy[:, None]
            if amp != 1.0:
                val *= np.float32(amp)
            out += val
        out *= np.float32(self.norm)
        return out

    def points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        out = np.zeros(np.broadcast(x, y).shape, np.float64)
        for seed, scale, amp, ox, oy in self.octaves:
            out += amp * _value(x / scale + ox, y / scale + oy, seed)
        return out * self.norm


def _value(u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """Value noise in [0, 1] at lattice coordinates (u, v) (lattice spacing 1)."""
    iu = np.floor(u)
    iv = np.floor(v)
    su = _smoothstep(u - iu)
    sv = _smoothstep(v - iv)
    iu = iu.astype(np.int64)
    iv = iv.astype(np.int64)
    l00 = _hash2(iu, iv, seed)
    l10 = _hash2(iu + 1, iv, seed)
    top = l00 + (l10 - l00) * su
    iv += 1
    l01 = _hash2(iu, iv, seed)
    l11 = _hash2(iu + 1, iv, seed)
    bot = l01 + (l11 - l01) * su
    return top + (bot - top) * sv


def _white(y0: int, x0: int, h: int, w: int, seed: int) -> np.ndarray:
    """Per-pixel uniform [0, 1) noise of the window, a pure function of coordinates."""
    return _hash2(np.arange(x0, x0 + w)[None, :], np.arange(y0, y0 + h)[:, None], seed)


def _grain(y0: int, x0: int, h: int, w: int, seed: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise, about zero mean and unit variance, seamless."""
    m = int(math.ceil(3 * sigma)) + 1
    n = _white(y0 - m, x0 - m, h + 2 * m, w + 2 * m, seed)
    n = cv2.GaussianBlur(n, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)[m : m + h, m : m + w]
    std = 0.2887 / (2.0 * math.sqrt(math.pi) * max(sigma, 0.5))
    return (n - np.float32(0.5)) * np.float32(1.0 / std)


def _grain2(y0: int, x0: int, h: int, w: int, seed: int, s1: float, s2: float) -> tuple[np.ndarray, np.ndarray]:
    """Two blurs (sigmas s1, s2) of the same white noise, each ~ zero mean, unit variance."""
    m = int(math.ceil(3 * max(s1, s2))) + 1
    n = _white(y0 - m, x0 - m, h + 2 * m, w + 2 * m, seed) - np.float32(0.5)
    out = []
    for sg in (s1, s2):
        b = cv2.GaussianBlur(n, (0, 0), sg, borderType=cv2.BORDER_REFLECT)[m : m + h, m : m + w]
        out.append(b * np.float32(2.0 * math.sqrt(math.pi) * max(sg, 0.5) / 0.2887))
    return out[0], out[1]


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Smooth 0 -> 1 transition between lo and hi."""
    t = np.clip((x - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
    return _smoothstep(t)


# --------------------------------------------------------------------------- the slide model


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


class _Slide:
    """Everything about one demo slide; ``render`` draws any window of level 0."""

    def __init__(self, width: int, height: int, mpp: float, seed: int, index: int):
        self.W, self.H, self.mpp = int(width), int(height), float(mpp)
        self.index = index
        self.style = STYLES[index % len(STYLES)]
        rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x5EED]))
        self.rng = rng
        um = 1.0 / self.mpp  # pixels per micrometre
        self.um = um
        s32 = lambda: int(rng.integers(0, 2**32))  # noqa: E731

        # stain: style + per-slide jitter
        st = self.style
        hv = np.array(st.h_vec) + rng.normal(0, 0.025, 3)
        ev = np.array(st.e_vec) + rng.normal(0, 0.025, 3)
        self.h_vec = (np.abs(hv) / np.linalg.norm(hv) * st.h_gain * rng.uniform(0.9, 1.1)).astype(np.float32)
        self.e_vec = (np.abs(ev) / np.linalg.norm(ev) * st.e_gain * rng.uniform(0.9, 1.1)).astype(np.float32)
        self.od_bg = np.array(st.od_bg, np.float32) * np.float32(rng.uniform(0.85, 1.15))

        # tissue outline
        big = max(self.W, self.H)
        self.n_tissue = _Noise(s32(), big * rng.uniform(0.3, 0.45), octaves=4, gain=0.5)
        self.n_edge = _Noise(s32(), 40 * um, octaves=2)
        self.edge_w = float(rng.uniform(0.15, 0.5)) if rng.random() < 0.75 else 0.04
        self.edge_len = 0.14 * min(self.W, self.H)
        self.tissue_frac = float(rng.uniform(0.45, 0.68))
        # compartments
        self.n_epi = _Noise(s32(), rng.uniform(90, 150) * um, octaves=3, gain=0.45)
        self.n_lym = _Noise(s32(), rng.uniform(40, 70) * um, octaves=2, gain=0.4)
        self.n_loose = _Noise(s32(), rng.uniform(100, 200) * um, octaves=2)
        self.n_dens = _Noise(s32(), 60 * um, octaves=2)
        self.n_mid = _Noise(s32(), 12 * um, octaves=2)
        self.n_gap = _Noise(s32(), 50 * um, octaves=1)
        self.epi_frac = float(rng.uniform(0.2, 0.4))
        self.lumen_frac = float(rng.uniform(0.25, 0.5)) if rng.random() < 0.6 else 0.0
        self.agg_frac = float(rng.uniform(0.04, 0.1))
        # collagen fibres: K orientations steered by a smooth direction field
        self.n_dir = (_Noise(s32(), 220 * um, octaves=2), _Noise(s32(), 220 * um, octaves=2))
        base = rng.uniform(0, math.pi)
        self.fib_theta = [base + k * math.pi / 3 for k in range(3)]
        self.fib_lambda = [rng.uniform(2.2, 3.5) * um for _ in range(3)]
        self.fib_amp = float(rng.uniform(0.8, 1.6))
        self.n_warp = [_Noise(s32(), 90 * um, octaves=2) for _ in range(3)]
        self.n_warp2 = [_Noise(s32(), 9 * um, octaves=1) for _ in range(3)]
        self.fib_seed = [s32() for _ in range(3)]
        self.fib_along = rng.uniform(40, 80) * um
        self.fib_crimp = rng.uniform(12, 22) * um
        self.n_cyt = _Noise(s32(), 5 * um, octaves=2)
        self.bg_step = 2 if self.mpp < 0.4 else 1
        self.seed_fine = s32()
        self.seed_sensor = s32()
        self._band_idx: np.ndarray | None = None  # nuclei of the band being rendered

        self._calibrate()
        self.vessels = self._place_vessels()
        self.nuclei = self._place_nuclei()

    # ---------------------------------------------------------------- fields

    def _ev(self, kind: str, a: Any, b: Any = None, c: Any = None, d: Any = None, step: int = 1):
        """Return (evaluate(noise), X, Y) for a grid window (of cells ``step`` px
        wide; X, Y are the cell centres in level-0 pixels) or for points."""
        if kind == "grid":
            y0, x0, h, w = a, b, c, d
            X = ((np.arange(x0, x0 + w, dtype=np.float32) + 0.5) * step)[None, :]
            Y = ((np.arange(y0, y0 + h, dtype=np.float32) + 0.5) * step)[:, None]
            return (lambda n: n.sample(y0, x0, h, w, step)), X, Y
        x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return (lambda n: n.points(x, y)), x, y

    def _tissue_value(self, ev: Callable, X: Any, Y: Any) -> Any:
        t = ev(self.n_tissue) + 0.06 * (ev(self.n_edge) - 0.5)
        d = np.minimum(np.minimum(X, self.W - X), np.minimum(Y, self.H - Y))
        e = np.clip(1.0 - d / self.edge_len, 0.0, 1.0)
        return t - self.edge_w * e * e

    def _calibrate(self) -> None:
        """Thresholds that give the wanted tissue / epithelium / lumen fractions."""
        n = 160
        g = (np.arange(n) + 0.5) / n
        x = np.repeat(g[None, :] * self.W, n, 0).ravel()
        y = np.repeat(g[:, None] * self.H, n, 1).ravel()
        ev, X, Y = self._ev("points", x, y)
        t = self._tissue_value(ev, X, Y)
        self.t_thr = float(np.quantile(t, 1.0 - self.tissue_frac))
        self.t_width = self._edge_width(lambda ev, X, Y: self._tissue_value(ev, X, Y), x, y, t, self.t_thr)
        tissue = t > self.t_thr
        e = ev(self.n_epi)[tissue]
        lym = ev(self.n_lym)[tissue]
        if e.size < 10:  # degenerate; keep defaults
            e = ev(self.n_epi)
            lym = ev(self.n_lym)
        self.e_thr = float(np.quantile(e, 1.0 - self.epi_frac))
        self.e_lum = (
            float(np.quantile(e, 1.0 - self.epi_frac * self.lumen_frac)) if self.lumen_frac > 0 else 9.0
        )
        e_all = ev(self.n_epi)
        self.e_width = self._edge_width(lambda ev, X, Y: ev(self.n_epi), x, y, e_all, self.e_thr)
        self.l_thr = float(np.quantile(lym, 1.0 - self.agg_frac))

    def _edge_width(self, field: Callable, x: np.ndarray, y: np.ndarray, v: np.ndarray, thr: float) -> float:
        """Half-width (field units) of a ~1.5 px edge ramp where ``field`` crosses
        ``thr``: from the median gradient at sample points near the contour."""
        near = np.argsort(np.abs(v - thr))[:200]
        xs, ys = x[near], y[near]
        g = [field(*self._ev("points", xs + dx, ys + dy)) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        grad = np.median(np.hypot(g[0] - g[1], g[2] - g[3])) * 0.5
        return float(max(grad * 0.75, 1e-5))

    def _zones(self, ev: Callable, X: Any, Y: Any) -> dict[str, Any]:
        t = self._tissue_value(ev, X, Y)
        tissue = _ramp(t, self.t_thr - self.t_width, self.t_thr + self.t_width)
        e = ev(self.n_epi)
        epi = _ramp(e, self.e_thr - self.e_width, self.e_thr + self.e_width)
        lumen = _ramp(e, self.e_lum - self.e_width, self.e_lum + self.e_width)
        agg = _ramp(ev(self.n_lym), self.l_thr - 0.01, self.l_thr + 0.01) * (1 - epi)
        return {"t": t, "tissue": tissue, "e": e, "epi": epi, "lumen": lumen, "agg": agg}

    def _fibre_weights(self, ev: Callable) -> list[Any]:
        a = ev(self.n_dir[0]) - 0.5
        b = ev(self.n_dir[1]) - 0.5
        theta = 0.5 * np.arctan2(b, a)
        ws = [np.maximum(np.cos(2.0 * (theta - th)), 0.0) ** 6 for th in self.fib_theta]
        tot = ws[0] + ws[1] + ws[2] + 1e-6
        return [w / tot for w in ws]

    def _phase(self, k: int, ev: Callable, X: Any, Y: Any) -> Any:
        """Across-fibre coordinate of orientation k (in fibre spacings)."""
        th = self.fib_theta[k]
        lin = (X * math.cos(th) + Y * math.sin(th)) * (1.0 / self.fib_lambda[k])
        return lin + self.fib_amp * 14.0 * (ev(self.n_warp[k]) - 0.5) + 1.0 * (ev(self.n_warp2[k]) - 0.5)

    def fibre_direction(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Angle (radians) of the collagen fibres at points (for spindle nuclei)."""
        ev, X, Y = self._ev("points", x, y)
        ws = np.stack(self._fibre_weights(ev))
        k = np.argmax(ws, axis=0)
        out = np.zeros(len(x))
        for kk in range(3):
            sel = k == kk
            if not sel.any():
                continue
            xs, ys = x[sel], y[sel]
            h = 0.5
            g = []
            for dx, dy in ((h, 0), (-h, 0), (0, h), (0, -h)):
                e, X1, Y1 = self._ev("points", xs + dx, ys + dy)
                g.append(self._phase(kk, e, X1, Y1))
            out[sel] = np.arctan2(g[2] - g[3], g[0] - g[1]) + math.pi / 2
        return out

    def _fibres(self, ev: Callable, X: Any, Y: Any, shape: tuple[int, int]) -> np.ndarray:
        """Collagen texture in [0, 1]: value noise stretched along the fibres."""
        ws = self._fibre_weights(ev)
        fib = np.zeros(shape, np.float32)
        for k, wk in enumerate(ws):
            if float(wk.max()) < 1e-3:
                continue
            th = self.fib_theta[k]
            s_ = self._phase(k, ev, X, Y).astype(np.float32)
            t_ = ((Y * math.cos(th) - X * math.sin(th)) * (1.0 / self.fib_along)).astype(np.float32)
            crimp = t_ * np.float32(self.fib_along / self.fib_crimp) + s_ * np.float32(0.07)
            s_ = s_ + np.float32(0.22) * np.sin(np.float32(2 * math.pi) * crimp)
            f = 0.62 * _value(s_, t_, self.fib_seed[k]) + 0.38 * _value(
                s_ * np.float32(2.3) + np.float32(7.1), t_ * np.float32(2.1), self.fib_seed[k] ^ 0x5A5A
            )
            fib += wk * f
        return _smoothstep(np.clip((fib - 0.2) * 1.6, 0.0, 1.0))

    # ---------------------------------------------------------------- structures

    def _place_vessels(self) -> list[dict[str, Any]]:
        rng, um = self.rng, self.um
        area_mm2 = self.W * self.H * (self.mpp * 1e-3) ** 2
        n = int(rng.poisson(40 * area_mm2))
        x = rng.uniform(0, self.W, n)
        y = rng.uniform(0, self.H, n)
        ev, X, Y = self._ev("points", x, y)
        z = self._zones(ev, X, Y)
        ok = (z["t"] > self.t_thr + 0.02) & (z["e"] < self.e_thr - 0.03) & (z["agg"] < 0.5)
        vessels = []
        for i in np.flatnonzero(ok):
            r = rng.uniform(6, 22) * um
            asp = rng.uniform(1.0, 2.2)
            ra, rb = r * math.sqrt(asp), r / math.sqrt(asp)
            wall = rng.uniform(1.5, 4.0) * um
            m = ra + wall + 2
            if not (m < x[i] < self.W - m and m < y[i] < self.H - m):
                continue
            if any(math.hypot(x[i] - v["x"], y[i] - v["y"]) < m + v["m"] for v in vessels):
                continue
            ang = rng.uniform(0, math.pi)
            # red blood cells: discs inside the lumen
            nr = int(rng.integers(0, max(1, int(0.6 * ra * rb / (3.6 * um) ** 2))))
            rr = rng.uniform(0, 1, nr) ** 0.5 * 0.8
            ra_ = rng.uniform(0, 2 * math.pi, nr)
            lx, ly = rr * ra * np.cos(ra_), rr * rb * np.sin(ra_)
            ca, sa = math.cos(ang), math.sin(ang)
            rbc = np.stack([x[i] + lx * ca - ly * sa, y[i] + lx * sa + ly * ca, rng.uniform(3.0, 3.8, nr) * um], 1)
            vessels.append(
                {"x": float(x[i]), "y": float(y[i]), "ra": ra, "rb": rb, "ang": ang, "wall": wall, "m": m, "rbc": rbc}
            )
        return vessels

    def _place_nuclei(self) -> _Nuclei:
        rng, um, W, H = self.rng, self.um, self.W, self.H
        # class parameters (micrometres): semi-axis a range, aspect range, RSA factor
        a_rng = {_EPI: (3.9, 5.3), _LYM: (2.5, 3.4), _SPI: (5.0, 7.5)}
        asp_rng = {_EPI: (1.05, 1.5), _LYM: (1.0, 1.15), _SPI: (3.0, 5.0)}
        f_rsa = {_EPI: 0.8, _LYM: 0.95, _SPI: 0.9}
        epi_pack = rng.uniform(2.2, 3.2) * (1.5 if self.lumen_frac > 0 else 1.0)
        dens_c = {
            _EPI: epi_pack / (math.pi * (4.5 * um) ** 2),
            _LYM: 2.5 / (math.pi * (3.0 * um) ** 2),
            _SPI: 1.0 / (150 * um * um),
        }
        # candidates strip by strip (bounded memory), thinned by the local zones
        strip = max(64, (8_000_000 // W) // 64 * 64)
        kept = []
        for y0 in range(0, H, strip):
            sh = min(strip, H - y0)
            parts = []
            for c in (_EPI, _LYM, _SPI):
                n = int(rng.poisson(dens_c[c] * W * sh))
                parts.append((np.full(n, c), rng.uniform(0, W, n), rng.uniform(y0, y0 + sh, n)))
            cl = np.concatenate([p_[0] for p_ in parts])
            xs = np.concatenate([p_[1] for p_ in parts])
            ys = np.concatenate([p_[2] for p_ in parts])
            p = self._candidate_prob(cl, xs, ys)
            keep = rng.random(len(xs)) < p
            kept.append((cl[keep], xs[keep], ys[keep]))
        cl = np.concatenate([k_[0] for k_ in kept])
        xs = np.concatenate([k_[1] for k_ in kept])
        ys = np.concatenate([k_[2] for k_ in kept])
        # not inside vessels (with their walls)
        if self.vessels and len(xs):
            from scipy.spatial import cKDTree

            vx = np.array([[v["x"], v["y"]] for v in self.vessels])
            vm = np.array([v["m"] for v in self.vessels]) + 2 * um
            k = min(3, len(vx))
            d, q = cKDTree(vx).query(np.stack([xs, ys], 1), k=k)
            d, q = d.reshape(len(xs), k), q.reshape(len(xs), k)
            bad = (d < vm[q]).any(1)
            xs, ys, cl = xs[~bad], ys[~bad], cl[~bad]
        # endothelial (spindle) nuclei along vessel walls
        ex, ey, ea = [], [], []
        for v in self.vessels:
            for _ in range(int(rng.integers(1, 4))):
                t = rng.uniform(0, 2 * math.pi)
                rr = 1.0 + (v["wall"] * 0.5) / max(v["ra"], v["rb"])
                lx, ly_ = v["ra"] * rr * math.cos(t), v["rb"] * rr * math.sin(t)
                ca, sa = math.cos(v["ang"]), math.sin(v["ang"])
                ex.append(v["x"] + lx * ca - ly_ * sa)
                ey.append(v["y"] + lx * sa + ly_ * ca)
                tang = math.atan2(v["rb"] * math.cos(t), -v["ra"] * math.sin(t)) + v["ang"]
                ea.append(tang)
        order = rng.permutation(len(xs))
        xs, ys, cl = xs[order], ys[order], cl[order]
        n = len(xs)
        a = np.empty(n)
        asp = np.empty(n)
        for c in (_EPI, _LYM, _SPI):
            s = cl == c
            a[s] = rng.uniform(*a_rng[c], s.sum()) * um
            asp[s] = rng.uniform(*asp_rng[c], s.sum())
        ang = rng.uniform(0, math.pi, n)
        sp = np.flatnonzero(cl == _SPI)
        if len(sp):
            ang[sp] = self.fibre_direction(xs[sp], ys[sp]) + rng.normal(0, 0.15, len(sp))
        # endothelial nuclei go first (drawn under later nuclei), thin and flat
        ne = len(ex)
        if ne:
            xs = np.concatenate([np.array(ex), xs])
            ys = np.concatenate([np.array(ey), ys])
            cl = np.concatenate([np.full(ne, _SPI), cl])
            a = np.concatenate([rng.uniform(4.5, 6.5, ne) * um, a])
            asp = np.concatenate([rng.uniform(3.5, 5.0, ne), asp])
            ang = np.concatenate([np.array(ea), ang])
        b = a / asp
        r_rsa = np.where(cl == _SPI, 0.55 * a, np.sqrt(a * b))
        f = np.array([f_rsa[c] for c in range(3)])[cl]
        acc = self._rsa(xs, ys, r_rsa, f, a)
        xs, ys, cl, a, b, ang = xs[acc], ys[acc], cl[acc], a[acc], b[acc], ang[acc]
        return self._make_polygons(xs, ys, cl, a, b, ang)

    def _candidate_prob(self, cl: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Probability of keeping a candidate nucleus of class ``cl`` at (xs, ys)."""
        ev, X, Y = self._ev("points", xs, ys)
        z = self._zones(ev, X, Y)
        tis = z["t"] > self.t_thr + 0.003
        inepi = (z["e"] > self.e_thr + 0.002) & (z["e"] < self.e_lum - 0.004)
        stroma = (z["e"] < self.e_thr - 0.004) & (z["lumen"] < 0.5)
        agg = z["agg"] > 0.5
        dens = ev(self.n_dens)
        loose = _ramp(ev(self.n_loose), 0.45, 0.7)
        p = np.zeros(len(xs))
        # in glands, nuclei sit at the basal side (towards the stroma)
        if self.lumen_frac > 0:
            rel = (z["e"] - self.e_thr) / max(self.e_lum - self.e_thr, 1e-6)
            basal = 1.0 - _ramp(rel, 0.35, 0.75)
        else:
            basal = np.ones(len(xs))
        ep = cl == _EPI
        p[ep] = ((tis & inepi) * basal)[ep]
        ly = cl == _LYM
        p[ly] = (
            (tis & agg)[ly] * 1.0
            + (tis & stroma & ~agg)[ly] * (0.006 + 0.035 * dens[ly])
            + (tis & inepi)[ly] * 0.01
        )
        sp = cl == _SPI
        p[sp] = (tis & stroma & ~agg)[sp] * np.clip(0.25 + 1.1 * (dens[sp] - 0.3), 0.1, 1.0) * (1 - 0.6 * loose[sp])
        return p

    def _rsa(self, xs, ys, r, f, a) -> np.ndarray:
        """Random sequential adsorption: accept a nucleus if far enough from all
        accepted ones (distance >= mean factor * (r_i + r_j)) and inside the slide."""
        n = len(xs)
        cell = max(2.0 * float(r.max(initial=1.0)) * float(f.max(initial=1.0)), 4.0)
        grid: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}
        acc = []
        W, H = self.W, self.H
        xl, yl, rl, fl, al = xs.tolist(), ys.tolist(), r.tolist(), f.tolist(), a.tolist()
        for i in range(n):
            x, y, ri, fi, ai = xl[i], yl[i], rl[i], fl[i], al[i]
            m = ai + 2.0
            if x < m or y < m or x > W - m or y > H - m:
                continue
            cx, cy = int(x // cell), int(y // cell)
            ok = True
            for gx in (cx - 1, cx, cx + 1):
                for gy in (cy - 1, cy, cy + 1):
                    lst = grid.get((gx, gy))
                    if not lst:
                        continue
                    for x2, y2, r2, f2 in lst:
                        dmin = 0.5 * (fi + f2) * (ri + r2)
                        dx, dy = x - x2, y - y2
                        if dx * dx + dy * dy < dmin * dmin:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if ok:
                grid.setdefault((cx, cy), []).append((x, y, ri, fi))
                acc.append(i)
        return np.array(acc, dtype=np.int64)

    def _make_polygons(self, xs, ys, cl, a, b, ang) -> _Nuclei:
        """Nucleus outlines; each is cut by the union of the nuclei drawn after it."""
        rng, um = self.rng, self.um
        n = len(xs)
        nv = 28
        t = np.linspace(0, 2 * math.pi, nv, endpoint=False)[None, :]
        # ellipse radius with low-order harmonic irregularity
        rad = (a * b)[:, None] / np.sqrt((b[:, None] * np.cos(t)) ** 2 + (a[:, None] * np.sin(t)) ** 2)
        irr = np.where(cl == _EPI, 0.06, np.where(cl == _LYM, 0.03, 0.04))[:, None]
        pert = np.ones((n, nv))
        for m in (2, 3, 4, 5):
            amp = rng.normal(0, 1, (n, 1)) * irr / (m - 1) ** 0.7
            pert += amp * np.cos(m * t + rng.uniform(0, 2 * math.pi, (n, 1)))
        rad = rad * np.clip(pert, 0.75, 1.25)
        lx = rad * np.cos(t)
        ly = rad * np.sin(t)
        # spindle nuclei bend gently (a shear-like bijection keeps them simple)
        bend = np.where(cl == _SPI, np.clip(rng.normal(0, 0.12, n), -0.3, 0.3), 0.0)[:, None]
        ly = ly + bend * lx * lx / np.maximum(a, 1.0)[:, None]
        ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]
        poly_xy = np.round(np.stack([xs[:, None] + lx * ca - ly * sa, ys[:, None] + lx * sa + ly * ca], -1), 2)
        del rad, lx, ly, pert
        px, py = poly_xy[..., 0], poly_xy[..., 1]
        area = 0.5 * np.abs((px * np.roll(py, -1, 1) - np.roll(px, -1, 1) * py).sum(1))
        min_area = np.maximum(0.35 * area, max(6.0, 1.2 * um * um))
        reach = np.hypot(px - xs[:, None], py - ys[:, None]).max(1, initial=0.0) if n else np.zeros(0)
        # originals that cannot be trusted to be valid after rounding (rare)
        valid = np.ones(n, bool)
        for s0 in range(0, n, 20000):
            valid[s0 : s0 + 20000] = shapely.is_valid(shapely.polygons(poly_xy[s0 : s0 + 20000]))
        # later neighbours whose bounding circles overlap
        later: dict[int, list[int]] = {}
        if n > 1:
            from scipy.spatial import cKDTree

            cen = np.stack([xs, ys], 1)
            pairs = cKDTree(cen).query_pairs(2.0 * float(reach.max()), output_type="ndarray")
            i_, j_ = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
            close = np.hypot(xs[i_] - xs[j_], ys[i_] - ys[j_]) < reach[i_] + reach[j_]
            for i0, j0 in zip(i_[close].tolist(), j_[close].tolist()):
                later.setdefault(i0, []).append(j0)
        kept = np.zeros(n, bool)
        cut: dict[int, list[np.ndarray]] = {}  # i -> rings of its final outline
        for i in range(n - 1, -1, -1):
            js = [j for j in later.get(i, ()) if kept[j]]
            if not js and valid[i]:
                kept[i] = area[i] >= min_area[i]
                continue
            g = shapely.Polygon(poly_xy[i])
            if not valid[i]:
                g = _largest(shapely.make_valid(g))
            if js and g is not None:
                others = shapely.polygons(poly_xy[js])
                hit = shapely.intersects(g, others)
                if hit.any():
                    g = _largest(shapely.difference(g, shapely.union_all(others[hit])))
            if g is not None:
                g = _largest(shapely.set_precision(g, _COORD_GRID))
            if g is None or g.area < min_area[i]:
                continue
            kept[i] = True
            cut[i] = [np.asarray(g.exterior.coords)] + [np.asarray(r.coords) for r in g.interiors]
        idx = np.flatnonzero(kept)
        rings: list[np.ndarray] = []
        nring = np.zeros(len(idx), np.int64)
        for k, i in enumerate(idx.tolist()):
            rs = cut.get(i)
            if rs is None:
                rs = [np.concatenate([poly_xy[i], poly_xy[i, :1]], 0)]
            rings.extend(rs)
            nring[k] = len(rs)
        lens = np.array([len(r) for r in rings], np.int64)
        coords = np.concatenate(rings, 0) if rings else np.zeros((0, 2))
        ring_off = np.concatenate([[0], np.cumsum(lens)])
        poly_off = np.concatenate([[0], np.cumsum(nring)])
        ext0 = ring_off[poly_off[:-1]]
        ext1 = ring_off[poly_off[:-1] + 1]
        if len(idx):
            mins = np.stack([np.minimum.reduceat(coords, ext0)[:, d] for d in (0, 1)], 1)
            maxs = np.stack([np.maximum.reduceat(coords, ext0)[:, d] for d in (0, 1)], 1)
        else:
            mins = maxs = np.zeros((0, 2))
        del ext1
        bbox = np.concatenate([np.floor(mins), np.ceil(maxs)], 1).astype(np.int64)
        k = len(idx)
        cls = cl[idx]
        dens = np.select(
            [cls == _LYM, cls == _EPI], [rng.uniform(1.9, 2.5, k), rng.uniform(0.9, 1.3, k)], rng.uniform(1.3, 1.8, k)
        )
        seeds = rng.integers(0, 2**32, k, dtype=np.uint64).astype(np.uint32)
        return _Nuclei(
            coords, ring_off, poly_off, cls, bbox, xs[idx], ys[idx], a[idx], b[idx], dens, seeds, int(n - k)
        )

    # ---------------------------------------------------------------- rendering

    def render(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level-0 window; a pure function of the window."""
        m = 3  # margin for the optical blur
        Y0, X0, HH, WW = y0 - m, x0 - m, h + 2 * m, w + 2 * m
        c_h, c_e = self._background(Y0, X0, HH, WW)
        self._draw_vessels(c_h, c_e, Y0, X0)
        self._draw_nuclei(c_h, c_e, Y0, X0)
        c_h = cv2.GaussianBlur(c_h, (0, 0), 0.6)[m:-m, m:-m]
        c_e = cv2.GaussianBlur(c_e, (0, 0), 0.6)[m:-m, m:-m]
        od = c_h[..., None] * self.h_vec + c_e[..., None] * self.e_vec + self.od_bg
        rgb = np.exp(-od)
        rgb *= np.float32(255.0)
        rgb += (_white(y0, x0, h, w, self.seed_sensor)[..., None] - 0.5) * np.float32(3.0)
        np.clip(rgb, 0, 255, out=rgb)
        return (rgb + 0.5).astype(np.uint8)

    def _background(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Stain concentrations (c_H, c_E) of the tissue without nuclei."""
        st = self.bg_step
        if st == 1:
            c_h, c_e = self._bg_fields(y0, x0, h, w, 1)
        else:
            jy0, jx0 = y0 // st - 1, x0 // st - 1
            jy1, jx1 = -(-(y0 + h) // st) + 1, -(-(x0 + w) // st) + 1
            c_h, c_e = self._bg_fields(jy0, jx0, jy1 - jy0, jx1 - jx0, st)
            size = (st * (jx1 - jx0), st * (jy1 - jy0))
            sl = np.s_[y0 - st * jy0 : y0 - st * jy0 + h, x0 - st * jx0 : x0 - st * jx0 + w]
            c_h = cv2.resize(c_h, size, interpolation=cv2.INTER_LINEAR)[sl]
            c_e = cv2.resize(c_e, size, interpolation=cv2.INTER_LINEAR)[sl]
        g = _grain(y0, x0, h, w, self.seed_fine, 0.7)
        c_e = c_e * (1.0 + 0.07 * g)
        c_h = c_h * (1.0 + 0.12 * g)
        return np.ascontiguousarray(c_h, np.float32), np.ascontiguousarray(c_e, np.float32)

    def _bg_fields(self, y0: int, x0: int, h: int, w: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        ev, X, Y = self._ev("grid", y0, x0, h, w, step)
        z = self._zones(ev, X, Y)
        tissue = z["tissue"]
        if float(tissue.max()) <= 0.0:
            z0 = np.zeros((h, w), np.float32)
            return z0, z0.copy()
        g_mid = ev(self.n_mid) - 0.5
        loose = _ramp(ev(self.n_loose), 0.42, 0.72)
        fib = self._fibres(ev, X, Y, (h, w))
        # stroma: collagen bundles with pale clefts; looser areas lighter
        cleft = _ramp(0.36 - fib, 0.0, 0.12) * (0.35 + 0.65 * loose)
        e_str = (0.35 + 0.95 * fib) * (1.0 - 0.45 * loose) * (1.0 - 0.85 * cleft)
        e_str *= 1.0 + 0.35 * g_mid
        h_str = 0.06 + 0.05 * g_mid
        agg = z["agg"]
        e_str = e_str * (1.0 - 0.45 * agg)
        h_str = h_str + 0.08 * agg
        # epithelial cytoplasm: pink-purple, mottled at the scale of cells
        cyt = ev(self.n_cyt) - 0.5
        e_cyt = 0.45 * (1.0 + 0.25 * g_mid + 0.55 * cyt)
        h_cyt = 0.22 * (1.0 + 0.4 * g_mid + 0.5 * cyt)
        # gland lumens: mostly clear, some pale secretion
        e_lum = np.clip(0.02 + 0.25 * (ev(self.n_dens) - 0.5), 0.0, None)
        epi, lumen = z["epi"], z["lumen"]
        # retraction gap around nests
        e = z["e"]
        px = self.e_width / 0.75  # change of e per pixel near the nest border
        gap_c, gap_w = self.e_thr - 2.0 * self.um * px, 1.2 * self.um * px
        gap = np.clip(1.0 - np.abs(e - gap_c) / gap_w, 0.0, 1.0) * _ramp(ev(self.n_gap), 0.45, 0.6)
        c_e = (1 - epi) * e_str + epi * ((1 - lumen) * e_cyt + lumen * e_lum)
        c_h = (1 - epi) * h_str + epi * ((1 - lumen) * h_cyt + lumen * 0.01)
        keep = tissue * (1.0 - 0.85 * gap)
        c_e = np.maximum(c_e * keep, 0.0).astype(np.float32)
        c_h = np.maximum(c_h * keep, 0.0).astype(np.float32)
        return c_h, c_e

    def _draw_vessels(self, c_h: np.ndarray, c_e: np.ndarray, y0: int, x0: int) -> None:
        h, w = c_h.shape
        for v in self.vessels:
            m = v["m"]
            vx0, vy0 = int(math.floor(v["x"] - m)), int(math.floor(v["y"] - m))
            vx1, vy1 = int(math.ceil(v["x"] + m)), int(math.ceil(v["y"] + m))
            ax0, ay0, ax1, ay1 = max(vx0, x0), max(vy0, y0), min(vx1, x0 + w), min(vy1, y0 + h)
            if ax0 >= ax1 or ay0 >= ay1:
                continue
            X = np.arange(ax0, ax1, dtype=np.float32)[None, :] + 0.5 - v["x"]
            Y = np.arange(ay0, ay1, dtype=np.float32)[:, None] + 0.5 - v["y"]
            ca, sa = math.cos(v["ang"]), math.sin(v["ang"])
            u = (X * ca + Y * sa) / v["ra"]
            q = (-X * sa + Y * ca) / v["rb"]
            rr = np.sqrt(u * u + q * q)  # 1 at the lumen edge
            rwall = 1.0 + v["wall"] / math.sqrt(v["ra"] * v["rb"])
            lumen = _ramp(-rr, -1.0, -1.0 + 1.5 / min(v["ra"], v["rb"]))
            wall = np.clip(1.0 - np.abs(rr - 0.5 * (1 + rwall)) / (0.5 * (rwall - 1) + 1e-6), 0, 1)
            sl = np.s_[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]
            ce, ch = c_e[sl], c_h[sl]
            ce *= 1.0 + 0.5 * wall
            ce[:] = ce * (1 - lumen) + 0.04 * lumen
            ch[:] = ch * (1 - lumen) + 0.01 * lumen
            for rx, ry, rr_ in v["rbc"]:
                d = np.sqrt((X + v["x"] - rx) ** 2 + (Y + v["y"] - ry) ** 2) / rr_
                disc = np.clip((1.0 - d) * rr_, 0.0, 1.0)
                if not disc.any():
                    continue
                val = 1.25 * (0.8 + 0.2 * np.clip(d * 1.6, 0, 1))  # paler centre
                ce[:] = ce * (1 - disc) + val * disc
                ch[:] = ch * (1 - disc)

    def _nuclei_in(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        bb = self.nuclei.bbox
        if not len(bb):
            return np.zeros(0, np.int64)
        cand = self._band_idx if self._band_idx is not None else np.arange(len(bb))
        b = bb[cand]
        sel = (b[:, 0] < x0 + w) & (b[:, 2] > x0) & (b[:, 1] < y0 + h) & (b[:, 3] > y0)
        return cand[sel]

    def _draw_nuclei(self, c_h: np.ndarray, c_e: np.ndarray, y0: int, x0: int) -> None:
        h, w = c_h.shape
        for i in self._nuclei_in(y0, x0, h, w).tolist():
            bx0, by0, bx1, by1 = self.nuclei.bbox[i].tolist()
            alpha, nh, ne = self._nucleus(i)
            ax0, ay0, ax1, ay1 = max(bx0, x0), max(by0, y0), min(bx1, x0 + w), min(by1, y0 + h)
            src = np.s_[ay0 - by0 : ay1 - by0, ax0 - bx0 : ax1 - bx0]
            dst = np.s_[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]
            al = alpha[src]
            c_h[dst] += al * (nh[src] - c_h[dst])
            c_e[dst] += al * (ne[src] - c_e[dst])

    def _nucleus(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(alpha, c_H, c_E) over the nucleus bounding box; pure function of i."""
        nu = self.nuclei
        bx0, by0, bx1, by1 = nu.bbox[i].tolist()
        hh, ww = by1 - by0, bx1 - bx0
        mask = _raster(nu.rings(i), bx0, by0, ww, hh)
        um = self.um
        seed = int(nu.seed[i])
        pad = cv2.copyMakeBorder(mask.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        d = cv2.distanceTransform(pad, cv2.DIST_L2, 5)[1:-1, 1:-1]  # 1 on the boundary
        dmax = max(float(d.max()), 1.0)
        c = int(nu.cls[i])
        dens = float(nu.dens[i])
        alpha = mask.astype(np.float32)
        alpha[(d > 0) & (d < 1.5)] = 0.85
        rim = np.exp(-(d - 1.0) / max(0.45 * um, 0.8)) * mask
        if c == _EPI:
            clump, speck = _grain2(by0, bx0, hh, ww, seed, max(0.5, 0.35 * um), 0.6)
            rn = 1.0 - d / dmax
            ch = dens * (0.42 + 0.22 * rn + 0.2 * np.clip(clump, -1.5, 2.0) + 0.06 * speck) + 0.75 * dens * rim
            ce = np.full_like(ch, 0.32)
            # nucleoli: one or two small dots, magenta-dark
            u = _hash2(np.arange(8), np.array([0x4E55]), seed).tolist()
            for q in range(int(u[0] * 2.6)):
                r0 = (0.45 + 0.35 * u[1 + 3 * q]) * um
                ox, oy = (u[2 + 3 * q] - 0.5) * 0.7 * float(nu.b[i]), (u[3 + 3 * q] - 0.5) * 0.7 * float(nu.b[i])
                X = np.arange(bx0, bx1)[None, :] + 0.5 - (nu.cx[i] + ox)
                Y = np.arange(by0, by1)[:, None] + 0.5 - (nu.cy[i] + oy)
                dot = np.clip(r0 + 0.5 - np.sqrt(X * X + Y * Y), 0.0, 1.0) * mask
                ch += 0.7 * dot
                ce += 0.9 * dot
        elif c == _LYM:
            clump = _grain(by0, bx0, hh, ww, seed, max(0.5, 0.25 * um))
            ch = dens * (0.9 + 0.08 * np.clip(clump, -2, 2)) + 0.25 * dens * rim
            ce = np.full_like(ch, 0.2)
        else:
            clump = _grain(by0, bx0, hh, ww, seed, max(0.5, 0.2 * um))
            ch = dens * (0.8 + 0.12 * np.clip(clump, -2, 2)) + 0.3 * dens * rim
            ce = np.full_like(ch, 0.3)
        return alpha, ch.astype(np.float32), ce.astype(np.float32)


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


# --------------------------------------------------------------------------- writing


def _levels(width: int, height: int) -> list[tuple[int, int]]:
    levels = [(width, height)]
    while (max(levels[-1]) > 512 or len(levels) == 1) and min(levels[-1]) >= 128:
        w, h = levels[-1]
        levels.append((w // 2, h // 2))
    return levels


def _tiles_of(band: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    h, w = band.shape[:2]
    for r in range(0, h, tile):
        for c in range(0, w, tile):
            t = band[r : r + tile, c : c + tile]
            if t.shape[0] != tile or t.shape[1] != tile:
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
            yield np.ascontiguousarray(t)


def _write_tiff(
    slide: _Slide, path: Path, scratch: Path, tile: int, quality: int, description: str, bar: Any
) -> list[tuple[int, int]]:
    """Stream level 0 band by band into the TIFF, keeping 2x2-area downsampled
    copies of each band in raw scratch files, then write levels 1.. from those."""
    W, H = slide.W, slide.H
    levels = _levels(W, H)
    nl = len(levels)
    # bands: whole tile rows, divisible by every level's downsample, ~32 MB at most
    base = math.lcm(tile, 2 ** (nl - 1))
    bh = base * max(1, min(1024, 32_000_000 // (3 * W)) // base)
    cw = 1024
    raw = [scratch / f"{path.stem}.level{lv}.raw" for lv in range(nl)]
    common = dict(
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        resolution=(1e4 / slide.mpp, 1e4 / slide.mpp),
        resolutionunit="CENTIMETER",
        metadata=None,
        dtype=np.uint8,
        maxworkers=1,  # encode as tiles arrive: no 512 MB read-ahead buffer
    )
    bigtiff = W * H * 3 * 1.34 > 3.9e9

    def level0() -> Iterator[np.ndarray]:
        files = [open(p, "wb") for p in raw[1:]]
        try:
            for y in range(0, H, bh):
                h = min(bh, H - y)
                band = np.empty((h, W, 3), np.uint8)
                nb = slide.nuclei.bbox
                slide._band_idx = np.flatnonzero((nb[:, 1] < y + h + 4) & (nb[:, 3] > y - 4)) if len(nb) else None
                for x in range(0, W, cw):
                    band[:, x : x + cw] = slide.render(y, x, h, min(cw, W - x))
                slide._band_idx = None
                cur = band
                for lv in range(1, nl):
                    wl = levels[lv][0]
                    hl = cur.shape[0] // 2
                    if hl == 0:
                        break
                    cur = cv2.resize(cur[: 2 * hl, : 2 * wl], (wl, hl), interpolation=cv2.INTER_AREA)
                    files[lv - 1].write(cur.tobytes())
                if y + h >= H:  # tifffile stops pulling after the last tile
                    for f in files:
                        f.close()
                if bar is not None:
                    bar.update(h)
                yield from _tiles_of(band, tile)
        finally:
            for f in files:
                f.close()

    def level_from_raw(lv: int) -> Iterator[np.ndarray]:
        wl, hl = levels[lv]
        rows = tile * 4
        with open(raw[lv], "rb") as f:
            for y in range(0, hl, rows):
                n = min(rows, hl - y)
                band = np.fromfile(f, np.uint8, n * wl * 3).reshape(n, wl, 3)
                yield from _tiles_of(band, tile)

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(level0(), shape=(H, W, 3), subfiletype=0, description=description, **common)
        for lv in range(1, nl):
            wl, hl = levels[lv]
            tif.write(level_from_raw(lv), shape=(hl, wl, 3), subfiletype=1, **common)
            raw[lv].unlink()
    return levels


def _write_geojson(path: Path, nuclei: _Nuclei, seed: int, index: int) -> None:
    """QuPath-style FeatureCollection, streamed feature by feature (bounded memory)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x1D5]))
    with open(path, "wb") as f:
        f.write(b'{"type":"FeatureCollection","features":[')
        buf: list[bytes] = []
        n = len(nuclei)
        for i in range(n):
            name = _CLASS_NAMES[int(nuclei.cls[i])]
            rings = [r.tolist() for r in nuclei.rings(i)]
            feat = {
                "type": "Feature",
                "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": list(CLASS_COLORS[name])},
                },
            }
            buf.append(orjson.dumps(feat))
            if len(buf) >= 4096:
                f.write((b"," if i >= len(buf) else b"") + b",".join(buf))
                buf = []
        if buf:
            f.write((b"," if n > len(buf) else b"") + b",".join(buf))
        f.write(b"]}")


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
        names = [f for r in rows for f in (r["image"], r["annotations"])] + ["slides.csv", "demo.json"]
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
