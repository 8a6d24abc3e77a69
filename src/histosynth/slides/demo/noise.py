"""Hashing and noise of the demo slides: every texture is a pure function of global level-0 pixel coordinates.

Value noise from an integer hash of lattice points (several octaves), evaluated
either on a pixel grid (separable matrix products) or at scattered points
(nuclei placement), plus hashed per-pixel white noise and blurred grain, so
bands and tiles of a slide join without seams.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

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

