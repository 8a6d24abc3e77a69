"""The demo-slide model: tissue layout, nuclei placement and stain colour of one slide.

:class:`_Slide` holds everything about one slide and renders any window of
level 0; :data:`STYLES` are the stain styles. See :mod:`histosynth.slides.demo`
for how a slide is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
import shapely
import shapely.affinity

from histosynth.slides.demo.noise import _grain, _grain2, _hash2, _Noise, _ramp, _smoothstep, _value, _white
from histosynth.slides.demo.nuclei import _COORD_GRID, _EPI, _LYM, _SPI, _largest, _Nuclei, _raster

#: level-0 pixels per cell of the grid the demo's tissue regions are traced on (2 um at 0.25 um/px)
REGION_STEP = 8

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

    # ---------------------------------------------------------------- regions

    def regions(self, step: int = REGION_STEP) -> dict[str, list[Any]]:
        """Tissue-region outlines ``{"epithelium": [...], "stroma": [...]}`` (shapely Polygons, level-0 px).

        The layout's own zones on a grid of ``step`` px cells: a cell is tissue where the tissue ramp is
        above one half (the rendered tissue edge), epithelium where the epithelium ramp is too (nests and
        glands, lumens included), stroma where it is tissue and not epithelium. Each 8-connected piece is
        one polygon traced along the cell edges (holes kept), so the regions are exact on that grid and
        within ``step`` px of the rendered zones (air, vessels and lymphoid aggregates are not regions).
        """
        from scipy import ndimage

        from histosynth.io.annotations import instance_polygons

        h, w = -(-self.H // step), -(-self.W // step)
        ev, X, Y = self._ev("grid", 0, 0, h, w, step=step)
        z = self._zones(ev, X, Y)
        tissue = z["tissue"] > 0.5
        epi = tissue & (z["epi"] > 0.5)
        out: dict[str, list[Any]] = {}
        for name, cells in (("epithelium", epi), ("stroma", tissue & ~epi)):
            lab, _ = ndimage.label(cells, structure=np.ones((3, 3), bool))
            _, polys, _ = instance_polygons(lab)
            slide = shapely.box(0, 0, self.W, self.H)
            scaled = [shapely.affinity.scale(p, step, step, origin=(0, 0)) for p in polys]
            # the last row / column of cells may run past a slide whose size is not a multiple of step
            out[name] = [p if shapely.covered_by(p, slide) else shapely.intersection(p, slide) for p in scaled]
        return out

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

