"""Nuclei instance-segmentation metrics: Dice, AJI, AJI+, DQ, SQ, PQ and type-aware mPQ.

Everything is computed from ONE contingency table per image: both instance maps
are relabelled to ``0..n`` (0 = background), ``np.bincount`` of
``true_idx * (n_pred + 1) + pred_idx`` gives every pairwise intersection at once
and the instance areas, and the metrics are array operations on the nonzero
entries (:class:`Overlap`). There is no per-instance Python loop.

Definitions (those of HoVer-Net's official ``compute_stats``, Graham et al. 2019):

* ``dice`` - "Dice 1", binary foreground Dice ``2|P ∩ G| / (|P| + |G|)`` of
  ``pred > 0`` and ``true > 0``.
* ``dq``, ``sq``, ``pq`` - panoptic quality (Kirillov et al.). A GT and a
  predicted instance match when their IoU is strictly greater than 0.5 (such a
  match is unique, no assignment needed). ``DQ = TP / (TP + FP/2 + FN/2)``,
  ``SQ`` = mean IoU of the matched pairs, ``PQ = DQ * SQ``.
* ``aji`` - Aggregated Jaccard Index (Kumar et al. 2017): every GT instance is
  paired with the prediction of maximal IoU among those overlapping it (ties
  go to the lowest prediction id, as ``np.argmax`` in the reference); AJI is the
  sum of the paired intersections over the sum of the paired unions, with the
  areas of GT instances overlapping nothing and of predictions never paired
  added to the union. A prediction may be paired with several GT instances.
* ``aji_plus`` - AJI+ (Graham et al. 2019): the same ratio over a one-to-one
  pairing that maximises the summed IoU (``scipy.optimize.linear_sum_assignment``;
  run only on the overlap graph's non-trivial part, pairs of IoU 0 dropped);
  unpaired GT and unpaired predicted areas are added to the union. When several
  pairings reach the same maximal summed IoU, the one the solver returns is used.
* counts ``n_true``, ``n_pred``, ``tp``, ``fp``, ``fn`` (``fp = n_pred - tp``,
  ``fn = n_true - tp``).

Edge cases (defined, documented, never NaN):

* GT and prediction both empty (no instance): every metric is 1.0 (perfect
  agreement), counts 0.
* only one of them empty: ``dice``, ``dq``, ``sq``, ``pq``, ``aji``,
  ``aji_plus`` are 0.0.
* ``sq`` when nothing matches (TP = 0): 0.0.

Inputs are 2-D maps of non-negative integer ids (any integer dtype, 0 =
background, ids arbitrary and non-contiguous). Maps of different shapes, of a
non-integer (or bool) dtype, with negative ids or with ``ndim != 2`` raise
:class:`~histosynth.errors.HistosynthError`.

Type-aware metrics (:func:`type_metrics`, :class:`MetricAccumulator`):

* Types come as per-PIXEL type maps (uint8 or any integer dtype, same shape as
  the instance map, 0 = no type), the layout of a patch set's ``types.npy``.
  The type of an instance is the majority of the nonzero types of its pixels
  (ties to the smaller type; an instance whose pixels are all type 0 has type
  0 and belongs to no class). Classes are the nonzero types (or the
  ``classes`` given).
* Per image and class ``c`` the PQ between the class-``c`` instances of both
  maps (a pair matches when IoU > 0.5 AND both are of class ``c``; IoU does
  not depend on the other instances, so this uses the same table).
* ``mpq`` - PanNuke-style multi-class PQ: per class the mean over the images
  whose GT holds that class (images without class ``c`` in their GT are
  skipped for ``c``), then the mean over classes that occur in some GT.
* ``mpq_plus`` - CoNIC-style multi-class PQ (mPQ+): TP, FP, FN and summed IoU
  per class accumulated over the whole data set, PQ per class from those
  totals, then the mean over the classes that occur (in GT or prediction)
  somewhere in the data set. CoNIC's code counts a class absent everywhere
  as PQ 0; here it is left out (and reported as ``None``).
* No class anywhere: ``mpq`` / ``mpq_plus`` are ``None``.

Summaries average the per-image metrics over images (HoVer-Net's convention)
and sum the counts; a summary of no images raises HistosynthError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from histosynth.errors import HistosynthError
from histosynth.io.labels import instance_types as _instance_types
from histosynth.io.labels import majority_types, relabel

__all__ = [
    "COUNT_KEYS",
    "METRIC_KEYS",
    "MetricAccumulator",
    "Overlap",
    "instance_metrics",
    "instance_overlap",
    "instance_types",
    "mean_over_images",
    "type_metrics",
]

#: Per-image metrics (averaged over images in a summary).
METRIC_KEYS: tuple[str, ...] = ("dice", "aji", "aji_plus", "dq", "sq", "pq")
#: Per-image counts (summed over images in a summary).
COUNT_KEYS: tuple[str, ...] = ("n_true", "n_pred", "tp", "fp", "fn")

#: PQ match threshold: IoU strictly greater than this.
MATCH_IOU = 0.5
# contingency tables with at most this many cells are counted densely
_DENSE_CELLS = 1 << 22
# the assignment problem is solved in one dense block up to this many cells,
# per connected component of the overlap graph beyond
_LSA_BLOCK_CELLS = 1 << 22


# --------------------------------------------------------------------------- #
# input checks and relabelling
# --------------------------------------------------------------------------- #
def _check_map(a: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``a`` as an array of non-negative integers of ``ndim == 2`` (and ``shape``), or HistosynthError."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise HistosynthError(f"{name} must be a 2-D map, got an array of shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise HistosynthError(f"{name} must hold integer ids, got dtype {a.dtype}")
    if shape is not None and a.shape != shape:
        raise HistosynthError(f"{name} has shape {a.shape} but the instance maps have shape {shape}")
    if a.size and np.issubdtype(a.dtype, np.signedinteger):
        lo = a.min()
        if lo < 0:
            raise HistosynthError(f"{name} holds negative values (min {lo}); 0 is background, ids are >= 1")
    return a


# --------------------------------------------------------------------------- #
# the contingency table
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Overlap:
    """The nonzero part of the contingency table of a GT and a predicted instance map.

    Instances are indexed ``0..n-1`` in the order of their sorted ids
    (``true_ids`` / ``pred_ids``); every pair of overlapping instances is one
    entry ``(ti[k], pj[k])`` with ``inter[k]`` pixels in common.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    ti: np.ndarray
    pj: np.ndarray
    inter: np.ndarray
    true_type: np.ndarray | None = None
    pred_type: np.ndarray | None = None

    @property
    def n_true(self) -> int:
        return len(self.true_ids)

    @property
    def n_pred(self) -> int:
        return len(self.pred_ids)

    @property
    def union(self) -> np.ndarray:
        """Union (pixels) of every overlapping pair."""
        return self.true_area[self.ti] + self.pred_area[self.pj] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """IoU of every overlapping pair (exact ties stay exact: division is correctly rounded)."""
        return self.inter / self.union


def instance_overlap(
    pred: Any,
    true: Any,
    pred_types: Any | None = None,
    true_types: Any | None = None,
) -> Overlap:
    """The pairwise overlap (contingency table) of two instance maps, checked; optionally instance types.

    ``pred_types`` / ``true_types``: per-pixel type maps of the same shape (see
    the module docstring); when given, :attr:`Overlap.pred_type` /
    :attr:`Overlap.true_type` hold the majority type of every instance.
    """
    true = _check_map(true, "true instance map")
    pred = _check_map(pred, "predicted instance map")
    if pred.shape != true.shape:
        raise HistosynthError(f"predicted instance map has shape {pred.shape} but the true one has {true.shape}")
    if (pred_types is None) != (true_types is None):
        raise HistosynthError("give both pred_types and true_types, or neither")
    t_ids, t_idx, t_area = relabel(true)
    p_ids, p_idx, p_area = relabel(pred)
    nt, npr = len(t_ids), len(p_ids)
    cols = npr + 1
    if (nt + 1) * cols <= _DENSE_CELLS:
        table = np.bincount(t_idx * cols + p_idx, minlength=(nt + 1) * cols).reshape(nt + 1, cols)[1:, 1:]
        ti, pj = np.nonzero(table)
        inter = table[ti, pj]
    else:  # many instances: count only the pixels where both are foreground
        both = (t_idx > 0) & (p_idx > 0)
        codes, inter = np.unique((t_idx[both] - 1) * npr + (p_idx[both] - 1), return_counts=True)
        ti, pj = np.divmod(codes, npr) if npr else (codes, codes)
    t_type = p_type = None
    if true_types is not None:
        t_type = majority_types(t_idx, nt, _check_map(true_types, "true type map", true.shape))
        p_type = majority_types(p_idx, npr, _check_map(pred_types, "predicted type map", true.shape))
    return Overlap(
        true_ids=t_ids,
        pred_ids=p_ids,
        true_area=np.asarray(t_area, np.int64),
        pred_area=np.asarray(p_area, np.int64),
        ti=ti.astype(np.intp, copy=False),
        pj=pj.astype(np.intp, copy=False),
        inter=np.asarray(inter, np.int64),
        true_type=t_type,
        pred_type=p_type,
    )


def instance_types(inst: Any, types: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, type)`` of every instance of ``inst``: the majority nonzero pixel type (0 if none)."""
    inst = _check_map(inst, "instance map")
    return _instance_types(inst, _check_map(types, "type map", inst.shape))


# --------------------------------------------------------------------------- #
# metrics from the table
# --------------------------------------------------------------------------- #
def _pq_parts(n_true: int, n_pred: int, tp: int, iou_sum: float) -> tuple[float, float, float]:
    """``(dq, sq, pq)`` from counts with the module's edge-case conventions."""
    if n_true == 0 and n_pred == 0:
        return 1.0, 1.0, 1.0
    dq = tp / (0.5 * (n_true + n_pred))  # = TP / (TP + FP/2 + FN/2)
    sq = iou_sum / tp if tp else 0.0
    return float(dq), float(sq), float(dq * sq)


def _aji_ratio(ov: Overlap, pairs: np.ndarray, union: np.ndarray) -> float:
    """Sum of paired intersections / (sum of paired unions + areas of unpaired GT and predictions)."""
    paired_t = np.zeros(ov.n_true, bool)
    paired_t[ov.ti[pairs]] = True
    paired_p = np.zeros(ov.n_pred, bool)
    paired_p[ov.pj[pairs]] = True
    inter = ov.inter[pairs].sum()
    total = union[pairs].sum() + ov.true_area[~paired_t].sum() + ov.pred_area[~paired_p].sum()
    return float(inter / total)


def _aji_pairs(ov: Overlap, iou: np.ndarray) -> np.ndarray:
    """For every overlapped GT instance, its pair of maximal IoU (ties: lowest prediction index)."""
    if len(iou) == 0:
        return np.zeros(0, np.intp)
    order = np.lexsort((ov.pj, -iou, ov.ti))
    t = ov.ti[order]
    first = np.ones(len(t), bool)
    first[1:] = t[1:] != t[:-1]
    return order[first]


def _lsa_pairs(ti: np.ndarray, pj: np.ndarray, iou: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Pairs (indices into ``sel``'s entries) of a max-IoU-sum assignment on the entries ``sel``."""
    rows, r = np.unique(ti[sel], return_inverse=True)
    cols, c = np.unique(pj[sel], return_inverse=True)
    m = np.zeros((len(rows), len(cols)))
    m[r, c] = iou[sel]
    where = np.full(m.shape, -1, np.intp)
    where[r, c] = sel
    a, b = linear_sum_assignment(m, maximize=True)
    keep = m[a, b] > 0
    return where[a[keep], b[keep]]


def _aji_plus_pairs(ov: Overlap, iou: np.ndarray) -> np.ndarray:
    """One-to-one pairs maximising the summed IoU (Hungarian on the non-trivial part of the overlap graph).

    A pair whose GT and prediction overlap nothing else is matched outright;
    the rest goes to ``linear_sum_assignment`` as one block, or per connected
    component of the overlap graph when that block would be large.
    """
    if len(iou) == 0:
        return np.zeros(0, np.intp)
    deg_t = np.bincount(ov.ti, minlength=ov.n_true)
    deg_p = np.bincount(ov.pj, minlength=ov.n_pred)
    simple = (deg_t[ov.ti] == 1) & (deg_p[ov.pj] == 1)
    rest = np.flatnonzero(~simple)
    out = [np.flatnonzero(simple)]
    if len(rest):
        n_rows = len(np.unique(ov.ti[rest]))
        n_cols = len(np.unique(ov.pj[rest]))
        if n_rows * n_cols <= _LSA_BLOCK_CELLS:
            out.append(_lsa_pairs(ov.ti, ov.pj, iou, rest))
        else:
            nt = ov.n_true
            graph = coo_matrix(
                (np.ones(len(rest)), (ov.ti[rest], nt + ov.pj[rest])), shape=(nt + ov.n_pred,) * 2
            )
            _, comp = connected_components(graph, directed=False)
            edge_comp = comp[ov.ti[rest]]
            order = np.argsort(edge_comp, kind="stable")
            bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
            out.extend(_lsa_pairs(ov.ti, ov.pj, iou, rest[g]) for g in np.split(order, bounds))
    return np.concatenate(out)


def _metrics_of(ov: Overlap) -> dict[str, float]:
    """All per-image instance metrics from an :class:`Overlap`."""
    nt, npr = ov.n_true, ov.n_pred
    union = ov.union
    iou = ov.inter / union
    match = iou > MATCH_IOU
    tp = int(np.count_nonzero(match))
    dq, sq, pq = _pq_parts(nt, npr, tp, float(iou[match].sum()))
    if nt == 0 and npr == 0:
        dice = aji = aji_plus = 1.0
    else:
        dice = float(2 * ov.inter.sum() / (ov.true_area.sum() + ov.pred_area.sum()))
        aji = _aji_ratio(ov, _aji_pairs(ov, iou), union)
        aji_plus = _aji_ratio(ov, _aji_plus_pairs(ov, iou), union)
    return {
        "dice": dice,
        "aji": aji,
        "aji_plus": aji_plus,
        "dq": dq,
        "sq": sq,
        "pq": pq,
        "n_true": nt,
        "n_pred": npr,
        "tp": tp,
        "fp": npr - tp,
        "fn": nt - tp,
    }


def instance_metrics(pred: Any, true: Any) -> dict[str, float]:
    """Dice, AJI, AJI+, DQ, SQ, PQ and the counts for one image (see the module docstring).

    ``pred`` and ``true`` are 2-D integer instance maps of the same shape (0 =
    background). Returns ``{"dice", "aji", "aji_plus", "dq", "sq", "pq",
    "n_true", "n_pred", "tp", "fp", "fn"}``; the counts are ints.
    """
    return _metrics_of(instance_overlap(pred, true))


def _class_counts(ov: Overlap, classes: np.ndarray) -> np.ndarray:
    """Per class (rows, in the order of ``classes``): ``[n_true, n_pred, tp, iou_sum]``."""
    assert ov.true_type is not None and ov.pred_type is not None
    k = len(classes)

    def slot(values: np.ndarray) -> np.ndarray:  # index into classes, k for "not a listed class"
        i = np.searchsorted(classes, values)
        ok = i < k
        ok[ok] = classes[i[ok]] == values[ok]
        return np.where(ok, i, k)

    t_slot = slot(ov.true_type)
    p_slot = slot(ov.pred_type)
    iou = ov.iou
    same = (iou > MATCH_IOU) & (t_slot[ov.ti] == p_slot[ov.pj])
    m_slot = t_slot[ov.ti[same]]
    out = np.zeros((k, 4))
    out[:, 0] = np.bincount(t_slot, minlength=k + 1)[:k]
    out[:, 1] = np.bincount(p_slot, minlength=k + 1)[:k]
    out[:, 2] = np.bincount(m_slot, minlength=k + 1)[:k]
    out[:, 3] = np.bincount(m_slot, weights=iou[same], minlength=k + 1)[:k]
    return out


def _check_classes(classes: Iterable[int] | None) -> np.ndarray | None:
    if classes is None:
        return None
    arr = np.asarray(sorted(set(int(c) for c in classes)), np.int64)
    if arr.size and arr[0] <= 0:
        raise HistosynthError(f"classes are nonzero types (>= 1), got {arr.tolist()}")
    return arr


def _classes_of(ov: Overlap) -> np.ndarray:
    assert ov.true_type is not None and ov.pred_type is not None
    seen = np.union1d(ov.true_type, ov.pred_type)
    return seen[seen > 0].astype(np.int64)


def _class_rows(classes: np.ndarray, counts: np.ndarray) -> dict[int, dict[str, float]]:
    out = {}
    for c, (nt, npr, tp, iou_sum) in zip(classes.tolist(), counts):
        nt, npr, tp = int(nt), int(npr), int(tp)
        dq, sq, pq = _pq_parts(nt, npr, tp, float(iou_sum))
        out[c] = {"n_true": nt, "n_pred": npr, "tp": tp, "fp": npr - tp, "fn": nt - tp,
                  "iou_sum": float(iou_sum), "dq": dq, "sq": sq, "pq": pq}
    return out


def type_metrics(
    pred: Any,
    true: Any,
    pred_types: Any,
    true_types: Any,
    classes: Iterable[int] | None = None,
) -> dict[int, dict[str, float]]:
    """Per-class PQ of one image: ``{class: {n_true, n_pred, tp, fp, fn, iou_sum, dq, sq, pq}}``.

    ``pred_types`` / ``true_types`` are per-pixel type maps (module docstring).
    ``classes``: the classes to report (default: every nonzero type of an
    instance of either map). ``dq``/``sq``/``pq`` follow the instance-metric
    edge conventions per class; PanNuke's mPQ uses a class of an image only
    when ``n_true > 0`` (see :class:`MetricAccumulator`).
    """
    ov = instance_overlap(pred, true, pred_types, true_types)
    cls = _check_classes(classes)
    cls = _classes_of(ov) if cls is None else cls
    return _class_rows(cls, _class_counts(ov, cls))


def mean_over_images(
    rows: Sequence[Mapping[str, float]], keys: Iterable[str] | None = None
) -> dict[str, float]:
    """Mean of every key over the rows (images) that hold it.

    ``keys`` default: every key of any row, in order of first appearance.
    A key held by no row is left out. No rows: HistosynthError.
    """
    if len(rows) == 0:
        raise HistosynthError("no images to average the metrics over")
    if keys is None:
        keys = list(dict.fromkeys(k for row in rows for k in row))
    out = {}
    for k in keys:
        vals = [float(row[k]) for row in rows if k in row and row[k] is not None]
        if vals:
            out[k] = float(np.mean(vals))
    return out


class MetricAccumulator:
    """Streams images through the metrics; :meth:`summary` gives the data-set figures.

    >>> acc = MetricAccumulator()
    >>> for pred, true in pairs:                       # doctest: +SKIP
    ...     row = acc.add(pred, true)                  # per-image dict
    >>> acc.summary()                                  # doctest: +SKIP

    With type maps (``add(pred, true, pred_types, true_types)``, for every image
    or for none) the per-image row also holds ``pq_type{c}`` for every class
    ``c`` in that image's GT, and the summary holds ``mpq`` (PanNuke),
    ``mpq_plus`` (CoNIC) and ``per_class``. ``classes`` restricts the classes
    (default: every nonzero type seen).
    """

    def __init__(self, classes: Iterable[int] | None = None):
        self.classes = _check_classes(classes)
        self.rows: list[dict[str, float]] = []
        self.typed: bool | None = None
        # per class: [n_true, n_pred, tp, iou_sum] over the data set, per-image PQs where in GT
        self._totals: dict[int, np.ndarray] = {}
        self._class_pq: dict[int, list[float]] = {}
        if self.classes is not None:
            for c in self.classes.tolist():
                self._totals[c] = np.zeros(4)
                self._class_pq[c] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        pred: Any,
        true: Any,
        pred_types: Any | None = None,
        true_types: Any | None = None,
    ) -> dict[str, float]:
        """Score one image; returns its row (instance metrics, counts, ``pq_type{c}`` when typed)."""
        typed = pred_types is not None or true_types is not None
        if self.typed is not None and typed != self.typed:
            raise HistosynthError(
                "type maps given for some images but not for others: give them for every image or none"
            )
        ov = instance_overlap(pred, true, pred_types, true_types)
        row = _metrics_of(ov)
        if typed:
            cls = self.classes if self.classes is not None else _classes_of(ov)
            for c, r in _class_rows(cls, _class_counts(ov, cls)).items():
                tot = self._totals.setdefault(c, np.zeros(4))
                tot += (r["n_true"], r["n_pred"], r["tp"], r["iou_sum"])
                pqs = self._class_pq.setdefault(c, [])
                if r["n_true"] > 0:
                    pqs.append(r["pq"])
                    row[f"pq_type{c}"] = r["pq"]
        self.typed = typed
        self.rows.append(row)
        return row

    def summary(self) -> dict[str, Any]:
        """Data-set figures: means over images of the metrics, summed counts; mPQ, mPQ+ when typed.

        Keys: ``n_images``, ``dice``, ``aji``, ``aji_plus``, ``dq``, ``sq``,
        ``pq`` (means over images), ``n_true`` ... ``fn`` (totals); typed:
        ``mpq``, ``mpq_plus`` (``None`` when no class occurs) and ``per_class``
        ``{c: {pq, n_images, n_true, n_pred, tp, fp, fn, iou_sum, dq_plus,
        sq_plus, pq_plus}}`` where ``pq`` is PanNuke's per-class mean over the
        ``n_images`` images holding ``c`` in their GT (``None`` if none) and
        ``*_plus`` are computed from the data-set totals (``None`` when the
        class never occurs).
        """
        if not self.rows:
            raise HistosynthError("no images were scored: nothing to summarise")
        out: dict[str, Any] = {"n_images": len(self.rows)}
        out.update(mean_over_images(self.rows, METRIC_KEYS))
        for k in COUNT_KEYS:
            out[k] = int(sum(int(row[k]) for row in self.rows))
        if not self.typed:
            return out
        per_class: dict[int, dict[str, Any]] = {}
        for c in sorted(self._totals):
            nt, npr, tp, iou_sum = self._totals[c]
            nt, npr, tp = int(nt), int(npr), int(tp)
            pqs = self._class_pq[c]
            seen = nt + npr > 0
            dq, sq, pq = _pq_parts(nt, npr, tp, float(iou_sum)) if seen else (None, None, None)
            per_class[c] = {
                "pq": float(np.mean(pqs)) if pqs else None,
                "n_images": len(pqs),
                "n_true": nt, "n_pred": npr, "tp": tp, "fp": npr - tp, "fn": nt - tp,
                "iou_sum": float(iou_sum), "dq_plus": dq, "sq_plus": sq, "pq_plus": pq,
            }
        pannuke = [v["pq"] for v in per_class.values() if v["pq"] is not None]
        conic = [v["pq_plus"] for v in per_class.values() if v["pq_plus"] is not None]
        out["mpq"] = float(np.mean(pannuke)) if pannuke else None
        out["mpq_plus"] = float(np.mean(conic)) if conic else None
        out["per_class"] = per_class
        return out
