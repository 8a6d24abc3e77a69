"""benchmarks/layouts.py's controllability helpers: which type is oversampled, and the per-type pairing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
layouts = pytest.importorskip("layouts")


def stats_with(n: dict[int, int]) -> dict:
    names = {1: "Other", 2: "Inflammatory", 3: "Epithelial", 4: "Spindle"}
    return {"classes": {str(t): names[t] for t in n}, "morphology": {str(t): {"n": c} for t, c in n.items()}}


def test_the_rarest_present_type_is_asked_at_the_factor_of_its_fitted_fraction():
    req = layouts.rarest_request(stats_with({1: 10, 2: 50, 3: 140, 4: 0}), 3)
    # type 4 never occurs: it cannot be drawn, so the rarest *present* type is 1 (10 of 200 nuclei)
    assert req["type"] == 1 and req["class"] == "Other"
    assert req["fitted_fraction"] == pytest.approx(0.05)
    assert req["requested_fraction"] == pytest.approx(0.15)
    assert req["type_mix"] == {"Other": pytest.approx(0.15)}


def test_the_request_is_capped_at_one_and_ties_go_to_the_lower_id():
    req = layouts.rarest_request(stats_with({2: 40, 3: 40, 4: 20}), 10)
    assert req["type"] == 4 and req["requested_fraction"] == 1.0
    assert layouts.rarest_request(stats_with({2: 5, 3: 5}), 2)["type"] == 2


@pytest.mark.parametrize("n,factor", [({2: 30}, 3), ({2: 30, 3: 0}, 3), ({2: 30, 3: 10}, 0), ({2: 30, 3: 10}, -1)])
def test_one_type_or_a_non_positive_factor_is_an_error(n, factor):
    with pytest.raises(SystemExit):
        layouts.rarest_request(stats_with(n), factor)


def scores(pq: list[float], per_type: dict[int, list[float | None]]) -> pd.DataFrame:
    df = pd.DataFrame({"slide": "s", "x": np.arange(len(pq)) * 128, "y": 0, "pq": pq})
    for c, v in per_type.items():
        df[f"pq_type{c}"] = pd.Series(v, dtype=float)
    return df


def test_per_type_pairs_only_the_images_holding_the_type():
    ref = scores([0.5, 0.5, 0.5, 0.5], {1: [0.2, None, 0.4, 0.3], 2: [0.5, 0.5, 0.5, 0.5]})
    arm = scores([0.6, 0.5, 0.4, 0.5], {1: [0.3, None, 0.6, 0.3], 2: [0.5, 0.6, 0.4, 0.5]})
    out = layouts.per_type(arm.iloc[::-1], ref)  # row order does not matter: paired by position
    assert out["1"]["n_images"] == 3
    assert out["1"]["diff"] == pytest.approx(0.1)
    assert out["1"]["pq"] == pytest.approx(0.4) and out["1"]["pq_reference"] == pytest.approx(0.3)
    assert out["1"]["ci_low"] < 0.1 < out["1"]["ci_high"]
    assert out["2"]["diff"] == pytest.approx(0.0) and out["2"]["n_images"] == 4


def test_per_type_refuses_arms_scored_on_other_patches():
    ref = scores([0.5, 0.5], {1: [0.2, 0.4]})
    with pytest.raises(SystemExit):
        layouts.per_type(ref.iloc[:1], ref)


def test_a_single_pair_has_no_interval():
    out = layouts.paired_difference([0.2])
    assert out["diff"] == pytest.approx(0.2) and out["ci_low"] is None and out["n_images"] == 1
    assert layouts.paired_difference([])["diff"] is None


def test_the_markdown_reports_the_request_next_to_what_was_drawn():
    per = {"1": {"pq": 0.4, "pq_reference": 0.3, "diff": 0.1, "ci_low": 0.0, "ci_high": 0.2, "n_images": 3,
                 "wilcoxon_p": 0.2}}
    row = {"method": "statistical, Other x3", "masks_per_second": 10.0, "ks_count": 0.1, "ks_area": 0.1,
           "ks_eccentricity": 0.1, "ks_nn_distance": 0.1, "w_count": 0.1, "w_area": 0.1, "ripley_inside": 0.5,
           "downstream": {"pq": 0.45, "diff": 0.01, "ci_low": -0.01, "ci_high": 0.03, "per_type": per},
           "vs_statistical": {"diff": 0.0, "ci_low": -0.01, "ci_high": 0.01, "per_type": per},
           "request": {"type": 1, "class": "Other", "fitted_fraction": 0.05, "factor": 3.0,
                       "requested_fraction": 0.15, "achieved_fraction": 0.149}}
    text = layouts.markdown({"regime": "evidence/k-1/seed-0", "date": "2026-12-06", "machine": "x", "cpus": 2,
                             "classes": {"1": "Other"}, "rows": [row]})
    assert "| Other (n img) |" in text
    assert "0.400 (+0.100 [+0.000, +0.200]; 3)" in text
    assert "asked at 0.150" in text and "drawn 0.149" in text
