"""Calibration of the spatial field by simulation: the sampler's masks measured as fit-stats measures real ones.

fit-stats (:func:`histosynth.masks.stats.fit_stats`) estimates packing
fractions and contact rates directly from the real masks; the sampler's hard
core and finite territories change the realised values. :func:`calibrate_field`
adjusts them (and the field's length scale) over a few rounds of
:func:`simulate_spatial` until the sampled masks' NN distances, touching
fractions and g(r) match the real ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.masks.features import nucleus_features, touching
from histosynth.masks.sampling import MaskSampler
from histosynth.masks.shapes import ShapeSource, ellipse_source
from histosynth.masks.spatial import MAX_PACKING, PairCorrelation, nn_distances


def simulate_spatial(stats: Mapping[str, Any], n_masks: int, rng: np.random.Generator,
                     shape_source: ShapeSource | None = None) -> dict[str, Any]:
    """g_ab(r) and NN distances measured, exactly as fit-stats measures real masks, on sampled masks.

    Masks have the stats' patch size; shapes are fitted ellipses unless
    ``shape_source`` is given. Returns {"g": {...}, "nn": {"all": array, "1": array, ...}}.
    """
    ph, pw = stats["patch_size"]
    if ph != pw:
        raise HistosynthError(f"field calibration needs square patches, got {ph}x{pw}")
    sampler = MaskSampler(stats, shape_source or ellipse_source(stats), int(ph))
    types = [int(t) for t in stats["classes"]]
    pc = PairCorrelation(types, np.asarray(stats["spatial"]["r_edges"], float))
    nn: dict[str, list[np.ndarray]] = {"all": [], **{str(t): [] for t in types}}
    touch_t, all_t = [], []
    for inst, typ in sampler.sample(n_masks, rng):
        f = nucleus_features(inst, typ)
        touch_t.append(np.isin(f["label"], touching(inst)))
        all_t.append(f["type"])
        pts = np.column_stack([f["cy"], f["cx"]])
        pc.add(pts, f["type"], (ph, pw))
        nn["all"].append(nn_distances(pts))
        for t in types:
            sel = f["type"] == t
            if sel.sum() >= 2:
                nn[str(t)].append(nn_distances(pts[sel]))
    g, _ = pc.result()
    tch = np.concatenate(touch_t) if touch_t else np.zeros(0, bool)
    tps = np.concatenate(all_t) if all_t else np.zeros(0, np.int64)
    touch = {"all": float(tch.mean()) if tch.size else 0.0}
    for t in types:
        sel = tps == t
        touch[str(t)] = float(tch[sel].mean()) if sel.any() else 0.0
    return {"g": g, "nn": {k: np.concatenate(v) if v else np.zeros(0) for k, v in nn.items()}, "touching": touch}


def calibrate_field(stats: Mapping[str, Any], iterations: int = 4, n_masks: int = 64, seed: int = 0
                    ) -> dict[str, Any]:
    """Calibrate packing fractions and contact rates so that the SAMPLER reproduces the real spacing.

    fit-stats estimates each type's packing fraction directly (nucleus area /
    territory area) and its contact rate (fraction of nuclei touching
    another); the sampler's hard core and finite territories change the
    realised values. Each round simulates ``n_masks`` masks and measures them
    exactly as the real masks were measured, then sets
    packing_t <- packing_t (d_sim,t / d_real,t)^2 (d: median same-type NN
    distance; spacing ~ packing^-1/2, clipped to [0.02, 0.75]) and
    contact_t <- contact_t + (touching_real,t - touching_sim,t) (clipped to
    [0, 1]). The round with the smallest error (RMS over types and all nuclei
    of log(d_sim / d_real) and of the touching-fraction differences) is kept.
    The result carries the simulated g(r) (``g_sampler``, drawn in
    spatial.png) and a ``calibration`` record.
    """
    types = [str(t) for t in stats["field"].get("types", [])]
    real_nn = stats["spatial"]["nn"]

    def median_of(summ: Mapping[str, Any]) -> float | None:
        return float(np.median(summ["quantiles"])) if summ.get("n", 0) else None

    targets = {t: median_of(real_nn.get(t, {})) for t in types}
    target_all = median_of(real_nn["all"])
    real_touch = stats["spatial"].get("touching_fraction", {})
    sp = stats["spatial"]
    r = np.asarray(sp["r"], float)
    use = r >= float(stats["field"].get("r_fit", [0.0])[0])
    g_real = {k: np.array([np.nan if v is None else v for v in vals], float)[use] for k, vals in sp["g"].items()}
    w_real = {k: np.asarray(v, float)[use] for k, v in sp["pairs"].items()}
    pair_keys = [f"{a}-{b}" for i, a in enumerate(types) for b in types[i:]]
    same_keys = [f"{t}-{t}" for t in types]
    hard = float(stats["field"].get("hard_core_px", 1.0))
    ell_lo, ell_hi = max(2.0, 2.0 * hard), 2.0 * float(r[-1])

    def excess(g: Mapping[str, np.ndarray]) -> float:
        """Pair-weighted mean of g - 1 over the same-type curves in the fit range (clustering strength)."""
        num = den = 0.0
        for k in same_keys:
            gv, wv = g[k], w_real[k]
            ok = np.isfinite(gv) & np.isfinite(g_real[k]) & (wv > 0)
            num += float(np.sum(wv[ok] * (gv[ok] - 1.0)))
            den += float(np.sum(wv[ok]))
        return num / den if den > 0 else 0.0

    def g_error(g: Mapping[str, np.ndarray]) -> float:
        num = den = 0.0
        for k in pair_keys:
            gv, gr, wv = g[k], g_real[k], w_real[k]
            ok = np.isfinite(gv) & np.isfinite(gr) & (wv > 0)
            d = np.log(np.maximum(gv[ok], 0.05)) - np.log(np.maximum(gr[ok], 0.05))
            num += float(np.sum(wv[ok] * d * d))
            den += float(np.sum(wv[ok]))
        return math.sqrt(num / den) if den > 0 else 0.0

    e_real = excess(g_real)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0xCA11B,)))
    field_now = {**stats["field"], "packing": dict(stats["field"].get("packing", {})),
                 "contact": dict(stats["field"].get("contact", {}))}
    history = []
    best = None
    for it in range(int(iterations) + 1):
        sim = simulate_spatial({**stats, "field": field_now}, n_masks, rng)
        g_sim = {k: v[use] for k, v in sim["g"].items()}
        errs, meds = [], {}
        for t in types + ["all"]:
            want = target_all if t == "all" else targets[t]
            got = sim["nn"][t]
            if want and got.size >= 5:
                meds[t] = float(np.median(got))
                errs.append(math.log(meds[t] / want))
            if t in real_touch:
                errs.append(real_touch[t] - sim["touching"].get(t, 0.0))
        ge = g_error(g_sim)
        errs.append(ge)
        e = math.sqrt(float(np.mean(np.square(errs)))) if errs else 0.0
        e_sim = excess(g_sim)
        history.append({"packing": {k: round(v, 4) for k, v in field_now["packing"].items()},
                        "contact": {k: round(v, 4) for k, v in field_now["contact"].items()},
                        "length_px": [round(c["length_px"], 2) for c in field_now.get("components", [])],
                        "nn_median_sim": {k: round(v, 3) for k, v in meds.items()},
                        "touching_sim": {k: round(v, 4) for k, v in sim["touching"].items()},
                        "g_excess_sim": round(e_sim, 4), "log_g_rmse": round(ge, 4), "rmse": round(e, 5)})
        if best is None or e < best[0]:
            best = (e, field_now, sim["g"])
        if it == iterations or not errs:
            break
        new_pack = dict(field_now["packing"])
        new_contact = dict(field_now["contact"])
        for t in types:
            if t in meds and targets[t] and t in new_pack:
                new_pack[t] = float(np.clip(new_pack[t] * (meds[t] / targets[t]) ** 2, 0.02, MAX_PACKING))
            if t in real_touch and t in new_contact:
                new_contact[t] = float(np.clip(new_contact[t] + real_touch[t] - sim["touching"].get(t, 0.0), 0, 1))
        comps = [dict(c) for c in field_now.get("components", [])]
        if e_real > 0.02 and comps:
            factor = 1.5 if e_sim <= 0.01 else float(np.clip(e_real / e_sim, 0.5, 2.0)) ** 0.7
            for c in comps:
                c["length_px"] = float(np.clip(c["length_px"] * factor, ell_lo, ell_hi))
        field_now = {**field_now, "packing": new_pack, "contact": new_contact, "components": comps}
    e_best, fbest, g_best = best
    out = dict(fbest)
    out["g_sampler"] = {k: [None if not np.isfinite(x) else round(float(x), 5) for x in v] for k, v in g_best.items()}
    out["calibration"] = {"method": "packing fractions and contact rates matched to the median same-type NN "
                                    "distance and touching fraction by simulation",
                          "iterations": int(iterations), "masks_per_iteration": int(n_masks),
                          "nn_median_real": {**{t: targets[t] for t in types}, "all": target_all},
                          "g_excess_real": round(e_real, 4),
                          "touching_real": dict(real_touch), "history": history, "chosen_rmse": round(e_best, 5)}
    return out
