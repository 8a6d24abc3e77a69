"""histosynth.segmentation.metrics: hand-checked cases, edge cases, a slow loop reference, properties, mPQ."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from histosynth.segmentation import metrics as M
from histosynth.errors import HistosynthError
from histosynth.segmentation.metrics import (
    COUNT_KEYS,
    METRIC_KEYS,
    MetricAccumulator,
    instance_metrics,
    instance_overlap,
    instance_types,
    mean_over_images,
    type_metrics,
)

from .conftest import shared_file

# --------------------------------------------------------------------------- #
# hand-checked cases (the spec)
# --------------------------------------------------------------------------- #
PRED = np.array([[0, 1, 1, 1], [0, 0, 0, 0], [2, 0, 3, 3], [4, 2, 2, 0]])
TRUE = np.array([[1, 1, 2, 1], [0, 0, 0, 0], [1, 3, 0, 0], [4, 3, 3, 3]])
# GT:   g1 = {(0,0),(0,1),(0,3),(2,0)} |4|, g2 = {(0,2)} |1|, g3 = {(2,1),(3,1),(3,2),(3,3)} |4|, g4 = {(3,0)} |1|
# pred: p1 = {(0,1),(0,2),(0,3)} |3|, p2 = {(2,0),(3,1),(3,2)} |3|, p3 = {(2,2),(2,3)} |2|, p4 = {(3,0)} |1|
# overlaps: g1p1 I2 U5 (0.4), g1p2 I1 U6 (1/6), g2p1 I1 U3 (1/3), g3p2 I2 U5 (0.4), g4p4 I1 U1 (1.0)
# PQ : only g4p4 has IoU > 0.5 -> TP 1, FP 3, FN 3, DQ = 1/(1+1.5+1.5) = 0.25, SQ = 1, PQ = 0.25
# AJI: g1->p1 (2/5), g2->p1 (1/3), g3->p2 (2/5), g4->p4 (1/1); p3 never used (+2)
#      = (2+1+2+1) / (5+3+5+1+2) = 6/16 = 0.375
# AJI+: max summed IoU pairs g1p1 + g3p2 + g4p4 = 1.8 (vs g2p1 + g1p2 + g4p4 = 1.5); g2 (+1), p3 (+2) unpaired
#      = (2+2+1) / (5+5+1+1+2) = 5/14 = 0.3571
# Dice: |P| = 9, |G| = 10, |P & G| = 3 (row 0) + 1 ((2,0)) + 3 (row 3) = 7 -> 14/19 = 0.7368


def test_hand_case():
    m = instance_metrics(PRED, TRUE)
    assert m["pq"] == pytest.approx(0.25, abs=1e-12)
    assert m["dq"] == pytest.approx(0.25) and m["sq"] == pytest.approx(1.0)
    assert m["aji"] == pytest.approx(0.375, abs=1e-12)
    assert m["aji_plus"] == pytest.approx(5 / 14, abs=1e-12)
    assert m["dice"] == pytest.approx(14 / 19, abs=1e-12)
    assert round(m["aji_plus"], 4) == 0.3571 and round(m["dice"], 4) == 0.7368
    assert (m["n_true"], m["n_pred"], m["tp"], m["fp"], m["fn"]) == (4, 4, 1, 3, 3)


def test_split_square():
    """Pred = two halves of the GT square: IoU 0.5 each (not > 0.5), AJI = 8 / (16 + 8)."""
    true = np.ones((4, 4), np.int32)
    pred = np.ones((4, 4), np.int32)
    pred[:, 2:] = 2
    m = instance_metrics(pred, true)
    assert m["pq"] == 0 and m["dq"] == 0 and m["sq"] == 0
    assert m["aji"] == pytest.approx(1 / 3) and m["aji_plus"] == pytest.approx(1 / 3)
    assert m["dice"] == 1.0 and (m["tp"], m["fp"], m["fn"]) == (0, 2, 1)


def test_merged_halves():
    """Two GT halves merged into one prediction: AJI = 16/32, AJI+ = 8 / (16 + 8)."""
    true = np.ones((4, 4), np.int32)
    true[:, 2:] = 2
    pred = np.ones((4, 4), np.int32)
    m = instance_metrics(pred, true)
    assert m["pq"] == 0
    assert m["aji"] == pytest.approx(0.5)
    assert m["aji_plus"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- #
# edge cases and bad input
# --------------------------------------------------------------------------- #
def test_both_empty_is_perfect():
    z = np.zeros((5, 6), np.uint16)
    m = instance_metrics(z, z)
    assert all(m[k] == 1.0 for k in METRIC_KEYS)
    assert all(m[k] == 0 for k in COUNT_KEYS)
    assert instance_metrics(np.zeros((0, 3), int), np.zeros((0, 3), int))["pq"] == 1.0


@pytest.mark.parametrize("swap", [False, True])
def test_one_empty_is_zero(swap):
    z = np.zeros((6, 6), np.int32)
    a = z.copy()
    a[1:3, 1:3] = 7
    a[4:, 4:] = 9
    pred, true = (z, a) if not swap else (a, z)
    m = instance_metrics(pred, true)
    assert all(m[k] == 0.0 for k in METRIC_KEYS)
    assert (m["tp"], m["fp"], m["fn"]) == ((0, 0, 2) if not swap else (0, 2, 0))


def test_no_match_sq_zero():
    true = np.zeros((4, 4), int)
    true[0, :2] = 1
    pred = np.zeros((4, 4), int)
    pred[0, 1:4] = 1  # IoU 1/4
    m = instance_metrics(pred, true)
    assert m["sq"] == 0.0 and m["pq"] == 0.0 and m["aji"] == pytest.approx(1 / 4)


def test_identity_is_perfect():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 30, (40, 50))
    m = instance_metrics(a, a.copy())
    assert all(m[k] == 1.0 for k in METRIC_KEYS)
    assert m["tp"] == m["n_true"] == m["n_pred"] == 29 and m["fp"] == m["fn"] == 0


def test_non_contiguous_ids_equal_relabelled():
    lut = np.array([0, 5, 900, 2**20, 7])
    for dtype in (np.int64, np.uint32, np.uint64):
        m = instance_metrics(lut[PRED].astype(dtype), lut[TRUE].astype(dtype))
        assert m == instance_metrics(PRED, TRUE)
    huge = np.array([0, 3, 2**40, 2**33, 11], np.int64)  # beyond the bincount fast path
    assert instance_metrics(huge[PRED], huge[TRUE]) == instance_metrics(PRED, TRUE)
    # ids only in one map, different dtypes on the two sides
    assert instance_metrics(PRED.astype(np.uint8), lut[TRUE].astype(np.int32)) == instance_metrics(PRED, TRUE)


@pytest.mark.parametrize(
    "pred, true, match",
    [
        (np.zeros((3, 3)), np.zeros((3, 3), int), "integer"),
        (np.zeros((3, 3), bool), np.zeros((3, 3), int), "integer"),
        (np.zeros((3, 3), int), np.zeros((3, 4), int), "shape"),
        (np.zeros((3, 3, 1), int), np.zeros((3, 3, 1), int), "2-D"),
        (np.zeros(9, int), np.zeros(9, int), "2-D"),
        (np.full((3, 3), -1), np.zeros((3, 3), int), "negative"),
        (np.zeros((3, 3), int), np.full((3, 3), -2, np.int8), "negative"),
    ],
)
def test_bad_input(pred, true, match):
    with pytest.raises(HistosynthError, match=match):
        instance_metrics(pred, true)


def test_bad_type_input():
    t = np.zeros((4, 4), np.uint8)
    with pytest.raises(HistosynthError, match="both"):
        instance_overlap(PRED, TRUE, pred_types=t)
    with pytest.raises(HistosynthError, match="shape"):
        type_metrics(PRED, TRUE, np.zeros((4, 5), np.uint8), t)
    with pytest.raises(HistosynthError, match="integer"):
        type_metrics(PRED, TRUE, t.astype(float), t)
    with pytest.raises(HistosynthError, match="classes"):
        MetricAccumulator(classes=[0, 1])


# --------------------------------------------------------------------------- #
# a slow reference (loops over instances) and properties
# --------------------------------------------------------------------------- #
def _ref_tables(pred, true):
    t_ids = sorted(int(i) for i in np.unique(true) if i)
    p_ids = sorted(int(i) for i in np.unique(pred) if i)
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros((len(t_ids), len(p_ids)))
    for a, t in enumerate(t_ids):
        for b, p in enumerate(p_ids):
            inter[a, b] = np.sum((true == t) & (pred == p))
            union[a, b] = np.sum((true == t) | (pred == p))
    t_area = np.array([np.sum(true == t) for t in t_ids], float)
    p_area = np.array([np.sum(pred == p) for p in p_ids], float)
    return t_ids, p_ids, inter, union, t_area, p_area


def _ratio(pairs, inter, union, t_area, p_area):
    i = sum(inter[a, b] for a, b in pairs)
    u = sum(union[a, b] for a, b in pairs)
    u += sum(t_area[a] for a in range(len(t_area)) if a not in {x for x, _ in pairs})
    u += sum(p_area[b] for b in range(len(p_area)) if b not in {y for _, y in pairs})
    return i / u


def reference(pred, true, brute_force=True):
    """Straightforward loops; AJI+ as the SET of values of every max-summed-IoU one-to-one pairing.

    ``brute_force=False``: AJI+ from one dense ``linear_sum_assignment`` instead (larger maps).
    """
    t_ids, p_ids, inter, union, t_area, p_area = _ref_tables(pred, true)
    nt, npr = len(t_ids), len(p_ids)
    if nt == 0 and npr == 0:
        return {k: 1.0 for k in METRIC_KEYS} | {"aji_plus": {1.0}}
    iou = np.zeros_like(inter)
    for a in range(nt):
        for b in range(npr):
            iou[a, b] = inter[a, b] / union[a, b]
    matches = [(a, b) for a in range(nt) for b in range(npr) if iou[a, b] > 0.5]
    tp = len(matches)
    dq = tp / (tp + 0.5 * (npr - tp) + 0.5 * (nt - tp))
    sq = sum(iou[a, b] for a, b in matches) / tp if tp else 0.0
    # AJI: per GT the first prediction of maximal IoU (lowest id), among overlapping ones
    pairs = []
    for a in range(nt):
        best = None
        for b in range(npr):
            if iou[a, b] > 0 and (best is None or iou[a, b] > iou[a, best]):
                best = b
        if best is not None:
            pairs.append((a, best))
    aji = _ratio(pairs, inter, union, t_area, p_area)
    # AJI+: brute force over all one-to-one pairings
    s = max(nt, npr)
    best_sum, values = -1.0, set()
    if not brute_force:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(-iou)
        pr = [(a, b) for a, b in zip(rows, cols) if iou[a, b] > 0]
        values = {_ratio(pr, inter, union, t_area, p_area)}
    for perm in itertools.permutations(range(s)) if brute_force else ():
        pr = [(a, perm[a]) for a in range(nt) if perm[a] < npr and iou[a, perm[a]] > 0]
        total = sum(iou[a, b] for a, b in pr)
        value = _ratio(pr, inter, union, t_area, p_area)
        if total > best_sum + 1e-9:
            best_sum, values = total, {value}
        elif abs(total - best_sum) <= 1e-9:
            values.add(value)
    fg_p, fg_t = pred > 0, true > 0
    dice = 2 * np.sum(fg_p & fg_t) / (fg_p.sum() + fg_t.sum())
    return {"dice": dice, "aji": aji, "aji_plus": values, "dq": dq, "sq": sq, "pq": dq * sq}


def _in(value, values):
    return any(abs(value - v) <= 1e-12 for v in values)


small_maps = st.tuples(st.integers(1, 7), st.integers(1, 7)).flatmap(
    lambda shape: st.tuples(
        hnp.arrays(np.int64, shape, elements=st.integers(0, 5)),
        hnp.arrays(np.int64, shape, elements=st.integers(0, 5)),
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_maps)
def test_matches_slow_reference(maps):
    pred, true = maps
    m = instance_metrics(pred, true)
    ref = reference(pred, true)
    for k in ("dice", "aji", "dq", "sq", "pq"):
        assert m[k] == pytest.approx(ref[k], abs=1e-12), k
    assert _in(m["aji_plus"], ref["aji_plus"])


@settings(max_examples=150, deadline=None)
@given(small_maps, st.randoms(use_true_random=False))
def test_properties(maps, rnd):
    pred, true = maps
    m = instance_metrics(pred, true)
    assert all(math.isfinite(m[k]) and 0.0 <= m[k] <= 1.0 for k in METRIC_KEYS)
    assert m["pq"] == pytest.approx(m["dq"] * m["sq"], abs=1e-15)
    assert m["tp"] + m["fp"] == m["n_pred"] and m["tp"] + m["fn"] == m["n_true"]
    swapped = instance_metrics(true, pred)
    for k in ("dice", "pq", "dq", "sq"):
        assert swapped[k] == pytest.approx(m[k], abs=1e-15), k
    assert (swapped["fp"], swapped["fn"]) == (m["fn"], m["fp"])

    # monotone relabelling to sparse, huge ids: everything identical
    ids = sorted(rnd.sample(range(1, 2**31), 5))
    lut = np.array([0, *ids], np.int64)
    assert instance_metrics(lut[pred], true) == m
    assert instance_metrics(pred, lut[true]) == m

    # arbitrary permutation of the ids of either map
    perm_p = np.array([0, *rnd.sample(range(1, 6), 5)])
    perm_t = np.array([0, *rnd.sample(range(1, 6), 5)])
    for p, t in ((perm_p[pred], true), (pred, perm_t[true]), (perm_p[pred], perm_t[true])):
        r = instance_metrics(p, t)
        for k in ("dice", "dq", "sq", "pq", *COUNT_KEYS):
            assert r[k] == pytest.approx(m[k], abs=1e-15), k
        # AJI+ is always the value of SOME optimal pairing; AJI depends on ids only through ties
        assert _in(r["aji_plus"], reference(p, t)["aji_plus"])
        ov = instance_overlap(pred, true)
        iou = ov.iou
        best = np.zeros(ov.n_true)
        np.maximum.at(best, ov.ti, iou)
        n_best = np.bincount(ov.ti[iou == best[ov.ti]], minlength=ov.n_true)
        if np.all(n_best <= 1):
            assert r["aji"] == pytest.approx(m["aji"], abs=1e-15)


def test_assignment_by_components_equals_one_block(monkeypatch):
    """The per-connected-component Hungarian path (large blocks) and the sparse table reach the optimum too."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        true = rng.integers(0, 7, (10, 10)) * (rng.random((10, 10)) > 0.3)
        pred = np.roll(true, 1, axis=1) * (rng.random((10, 10)) > 0.2)
        one = instance_metrics(pred, true)
        monkeypatch.setattr(M, "_LSA_BLOCK_CELLS", 0)
        monkeypatch.setattr(M, "_DENSE_CELLS", 0)
        many = instance_metrics(pred, true)
        monkeypatch.undo()
        ref = reference(pred, true)
        for k in ("dice", "aji", "dq", "sq", "pq", *COUNT_KEYS):
            assert many[k] == pytest.approx(one[k], abs=1e-15), k
        assert _in(many["aji_plus"], ref["aji_plus"]) and _in(one["aji_plus"], ref["aji_plus"])


# --------------------------------------------------------------------------- #
# type-aware metrics
# --------------------------------------------------------------------------- #
def test_instance_types_majority():
    inst = np.array([[1, 1, 1, 0], [2, 2, 0, 3], [0, 0, 0, 3]])
    types = np.array([[2, 2, 1, 0], [0, 0, 0, 1], [5, 5, 0, 4]], np.uint8)
    ids, t = instance_types(inst, types)
    # 1: two 2s beat one 1; 2: only type 0 -> 0; 3: one 1 and one 4 tie -> the smaller
    assert ids.tolist() == [1, 2, 3] and t.tolist() == [2, 0, 1]


def _typed_images():
    """Two images, classes 1 and 2 (see test_type_aware_hand_case for the hand computation)."""
    # image A: GT g1 (class 1), g2 (class 2); pred equal shapes, both predicted as class 1
    ta = np.zeros((4, 6), np.int32)
    ta[0, :3] = 1
    ta[2, :3] = 2
    tta = np.where(ta == 1, 1, np.where(ta == 2, 2, 0)).astype(np.uint8)
    pa = ta * 10  # ids 10 and 20
    pta = (pa > 0).astype(np.uint8)
    # image B: GT g1 (class 1, 5 px); pred covers 3 of them (IoU 0.6) + an extra class-2 blob
    tb = np.zeros((4, 6), np.int32)
    tb[0, :5] = 4
    ttb = (tb > 0).astype(np.uint8)
    pb = np.zeros((4, 6), np.int32)
    pb[0, :3] = 1
    pb[3, 4:] = 2
    ptb = np.where(pb == 1, 1, np.where(pb == 2, 2, 0)).astype(np.uint8)
    return [(pa, ta, pta, tta), (pb, tb, ptb, ttb)]


def test_type_aware_hand_case():
    (pa, ta, pta, tta), (pb, tb, ptb, ttb) = _typed_images()
    a = type_metrics(pa, ta, pta, tta)
    # A, class 1: n_true 1, n_pred 2, TP 1 (IoU 1) -> DQ 1/1.5, PQ 2/3; class 2: n_true 1, n_pred 0 -> 0
    assert a[1]["pq"] == pytest.approx(2 / 3) and (a[1]["tp"], a[1]["fp"], a[1]["fn"]) == (1, 1, 0)
    assert a[2]["pq"] == 0 and (a[2]["n_true"], a[2]["n_pred"]) == (1, 0)
    b = type_metrics(pb, tb, ptb, ttb)
    # B, class 1: TP 1 with IoU 3/5 -> PQ 0.6; class 2 only predicted (absent from GT)
    assert b[1]["pq"] == pytest.approx(0.6) and b[2]["n_true"] == 0 and b[2]["fp"] == 1
    assert type_metrics(pb, tb, ptb, ttb, classes=[1]).keys() == {1}

    acc = MetricAccumulator()
    ra = acc.add(pa, ta, pta, tta)
    rb = acc.add(pb, tb, ptb, ttb)
    assert ra["pq_type1"] == pytest.approx(2 / 3) and ra["pq_type2"] == 0
    assert rb["pq_type1"] == pytest.approx(0.6) and "pq_type2" not in rb  # class 2 not in B's GT: skipped
    s = acc.summary()
    # PanNuke: class 1 mean(2/3, 0.6); class 2 only image A: 0 -> mPQ = (0.6333 + 0) / 2
    assert s["per_class"][1]["pq"] == pytest.approx((2 / 3 + 0.6) / 2)
    assert s["per_class"][2]["pq"] == 0 and s["per_class"][2]["n_images"] == 1
    assert s["mpq"] == pytest.approx((2 / 3 + 0.6) / 4)
    # CoNIC: class 1 totals n_true 2, n_pred 3, TP 2, IoU sum 1.6 -> DQ 2/2.5, SQ 0.8, PQ 0.64
    #        class 2 totals n_true 1, n_pred 1, TP 0 -> 0;  mPQ+ = 0.32
    c1 = s["per_class"][1]
    assert (c1["n_true"], c1["n_pred"], c1["tp"], c1["fp"], c1["fn"]) == (2, 3, 2, 1, 0)
    assert c1["pq_plus"] == pytest.approx(0.64) and c1["iou_sum"] == pytest.approx(1.6)
    assert s["per_class"][2]["pq_plus"] == 0 and s["mpq_plus"] == pytest.approx(0.32)
    # data-set means of the instance metrics equal the means of the rows
    assert s["n_images"] == 2 and s["pq"] == pytest.approx((ra["pq"] + rb["pq"]) / 2)
    assert s["tp"] == ra["tp"] + rb["tp"] and s["fp"] == ra["fp"] + rb["fp"]


def test_accumulator_classes_and_errors():
    imgs = _typed_images()
    acc = MetricAccumulator(classes=[1, 3])
    for p, t, pt, tt in imgs:
        acc.add(p, t, pt, tt)
    s = acc.summary()
    assert set(s["per_class"]) == {1, 3}
    assert s["per_class"][3]["pq"] is None and s["per_class"][3]["pq_plus"] is None  # never seen: left out
    assert s["mpq"] == pytest.approx((2 / 3 + 0.6) / 2) and s["mpq_plus"] == pytest.approx(0.64)

    with pytest.raises(HistosynthError, match="no images"):
        MetricAccumulator().summary()
    with pytest.raises(HistosynthError, match="no images"):
        mean_over_images([])
    acc = MetricAccumulator()
    acc.add(*imgs[0])
    with pytest.raises(HistosynthError, match="every image or none"):
        acc.add(imgs[1][0], imgs[1][1])
    untyped = MetricAccumulator()
    untyped.add(PRED, TRUE)
    s = untyped.summary()
    assert "mpq" not in s and s["aji"] == pytest.approx(0.375) and s["n_images"] == 1

    # no class anywhere: None, not NaN
    z = np.zeros(PRED.shape, np.uint8)
    acc = MetricAccumulator()
    acc.add(PRED, TRUE, z, z)
    s = acc.summary()
    assert s["mpq"] is None and s["mpq_plus"] is None and s["per_class"] == {}


def test_mean_over_images_skips_missing_keys():
    rows = [{"pq": 1.0, "pq_type1": 0.5}, {"pq": 0.0}, {"pq": 0.5, "pq_type1": 0.0}]
    assert mean_over_images(rows) == {"pq": 0.5, "pq_type1": 0.25}
    assert mean_over_images(rows, ["pq"]) == {"pq": 0.5}


@settings(max_examples=60, deadline=None)
@given(small_maps, st.integers(0, 2**32 - 1))
def test_type_counts_match_class_restricted_pq(maps, seed):
    """Per-class counts equal plain PQ between the class-restricted instance maps."""
    pred, true = maps
    rng = np.random.default_rng(seed)
    tt_of = rng.integers(0, 3, 6)  # type per instance id (0 = untyped)
    pt_of = rng.integers(0, 3, 6)
    rows = type_metrics(pred, true, pt_of[pred].astype(np.uint8), tt_of[true].astype(np.uint8), classes=[1, 2])
    for c in (1, 2):
        m = instance_metrics(np.where(pt_of[pred] == c, pred, 0), np.where(tt_of[true] == c, true, 0))
        for k in ("n_true", "n_pred", "tp", "fp", "fn", "dq", "sq", "pq"):
            assert rows[c][k] == pytest.approx(m[k], abs=1e-12), (c, k)


# --------------------------------------------------------------------------- #
# real typed data (CoNSeP patches, non-contiguous ids)
# --------------------------------------------------------------------------- #
def test_consep_patches():
    import cv2
    import scipy.io as sio

    acc = MetricAccumulator()
    ref_acc = MetricAccumulator()
    for name in ("test_10_005", "test_3_006"):
        inst = np.load(shared_file("consep-patches", "inst", "test", f"{name}.npy"))
        seg = cv2.imread(str(shared_file("consep-patches", "seg_mask", "test", f"{name}.png")), cv2.IMREAD_UNCHANGED)
        mat = sio.loadmat(shared_file("consep-patches", "type_mat", "test", f"{name}.mat"))
        ids, types = instance_types(inst, seg)
        assert types.tolist() == mat["inst_type"].ravel().tolist()
        same = acc.add(inst, inst, seg, seg)
        assert all(same[k] == 1.0 for k in METRIC_KEYS)
        pred = np.roll(inst, (1, 2), axis=(0, 1))
        r = ref_acc.add(pred, inst, np.roll(seg, (1, 2), axis=(0, 1)), seg)
        assert 0 < r["pq"] < 1 and r["tp"] > 0
        ref = reference(pred, inst, brute_force=False)
        for k in ("dice", "aji", "dq", "sq", "pq"):
            assert r[k] == pytest.approx(ref[k], abs=1e-12), k
        assert _in(r["aji_plus"], ref["aji_plus"])
    s = acc.summary()
    assert s["mpq"] == 1.0 and s["mpq_plus"] == 1.0 and s["pq"] == 1.0
    s = ref_acc.summary()
    assert 0 < s["mpq"] < 1 and 0 < s["mpq_plus"] < 1
