"""Labels: the one class-map format, and the one majority type of an instance.

**The class map** on disk (``report.json`` of a patch set, ``stats.json``,
``nuclei.npz``) and in every checkpoint is ``{"1": "Epithelial", ...}``: type
id (a string in JSON) → class name; 0 is background. :func:`read_class_map`
reads it as ``{1: "Epithelial"}``, and reads the older forms too, so old patch
sets still open:

- ``{"n_epithelial": 1}`` — index column → type id (what ``rasterize`` and
  ``sample-masks`` wrote before); the name is the column without ``n_``, or
  its spelling in ``spellings`` (e.g. the report's ``class_counts``);
- ``{"Epithelial": 1}`` — class name → type id (``config.yaml``, ``--classes``);
  several names may share an id (classes merged), the id is then named by
  the first of them in sorted order (as :func:`class_columns` does).

Anything else — not a mapping, ids that are not integers in 0..255, empty
names, a mixture of forms, one id given twice — is a
:class:`~histosynth.errors.HistosynthError` that names the file, never an
empty map. :func:`class_map_to_json` writes the canonical form;
:func:`classes_of_patch_sets` reads the maps of patch sets' ``report.json``.

**The type of an instance** (:func:`instance_types`) is the majority of the
nonzero type-map values of its pixels; ties go to the smaller type, and an
instance without a typed pixel is type 0.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError

#: largest type id (types.npy is uint8)
MAX_TYPE = 255
#: the name of type 1 when no class map was given (every nucleus is one class)
DEFAULT_CLASS = "nucleus"


# -- names ----------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


def class_key(name: str) -> str:
    """A class name compared loosely: lower case, ``n_`` prefix dropped, non-alphanumerics as ``_``."""
    name = str(name)
    return _slug(name[2:] if name.startswith("n_") else name)


def column_name(name: str) -> str:
    """The ``index.csv`` column counting a class's nuclei: ``n_<class>`` (lower case, non-alphanumerics as _)."""
    return "n_" + _slug(name)


def class_columns(class_map: Mapping[str, int] | None) -> dict[int, str]:
    """Type id → index column name ``n_<class>`` of a NAME → ID map (None: ``{1: "n_nucleus"}``)."""
    return {tid: column_name(name) for tid, name in _names_of_ids(class_map or {DEFAULT_CLASS: 1}).items()}


def _names_of_ids(name_to_id: Mapping[str, int]) -> dict[int, str]:
    """ID → the first of its names in sorted order, ids ascending."""
    names: dict[int, str] = {}
    for name, tid in sorted(name_to_id.items(), key=lambda kv: (kv[1], kv[0])):
        names.setdefault(int(tid), name)
    return names


# -- reading and writing ----------------------------------------------------------------------------
_ID_TEXT = re.compile(r"-?[0-9]{1,18}")


def _as_id(value: Any) -> int | None:
    """An integer type id from an int or a string of digits, else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    # ASCII digits only: str.isdigit() also accepts "³", which int() refuses; 18 digits fit int64
    if isinstance(value, str) and _ID_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _parse(obj: Any, spellings: Iterable[str] | None, source: str | os.PathLike | None
           ) -> tuple[dict[int, str], bool]:
    """(id → name, whether the names are as written) of a class map in any form."""
    def bad(reason: str) -> HistosynthError:
        return HistosynthError(f"unreadable class map {_short(obj)}: {reason}", source)

    if not isinstance(obj, Mapping):
        raise bad("not a mapping of type id to class name")
    if not obj:
        return {}, True
    keys, values = list(obj.keys()), list(obj.values())
    key_ids = [_as_id(k) for k in keys]
    if all(isinstance(v, str) for v in values) and all(k is not None for k in key_ids):
        pairs, exact = [(tid, str(v)) for tid, v in zip(key_ids, values)], True  # canonical: id → name
    else:
        value_ids = [_as_id(v) for v in values]
        if any(v is None for v in value_ids) or any(not isinstance(k, str) for k in keys):
            raise bad("neither {type id: name} nor {name: type id} (mixed or non-integer ids)")
        if all(k.startswith("n_") for k in keys):  # legacy: index column → id
            spelled = {column_name(s): str(s) for s in (spellings or ())}
            pairs = [(tid, spelled.get(k, k[2:])) for k, tid in zip(keys, value_ids)]
            exact = all(k in spelled for k in keys)
        else:  # name → id; several names of one id (classes merged): the first in sorted order
            pairs, exact = list(_names_of_ids(dict(zip(keys, value_ids))).items()), True
    out: dict[int, str] = {}
    for tid, name in pairs:
        if not 0 <= tid <= MAX_TYPE:
            raise bad(f"type id {tid} is outside 0..{MAX_TYPE}")
        if not name.strip():
            raise bad(f"type id {tid} has an empty name")
        if tid in out:
            raise bad(f"type id {tid} is given twice ({out[tid]!r} and {name!r})")
        out[tid] = name
    return dict(sorted(out.items())), exact


def read_class_map(obj: Any, source: str | os.PathLike | None = None,
                   spellings: Iterable[str] | None = None) -> dict[int, str]:
    """``{type id: name}`` (ids ascending) of a class map in the canonical or a legacy form (module docstring).

    ``source`` is named in the error; ``spellings`` are class names as written
    (a rasterize report's ``class_counts``) that restore the case of legacy
    ``n_<class>`` columns.
    """
    return _parse(obj, spellings, source)[0]


def class_map_to_json(classes: Mapping[Any, Any]) -> dict[str, str]:
    """The canonical on-disk form ``{"1": "Epithelial", ...}`` (ids ascending) of a class map in any form."""
    return {str(tid): name for tid, name in read_class_map(classes).items()}


def parse_class_map(pairs: Sequence[str] | None) -> dict[str, int] | None:
    """The CLI's ``--classes`` ``["Epithelial=1", "Lymphocyte=2"]`` as ``{"Epithelial": 1, ...}``; None/[]: None."""
    if not pairs:
        return None
    out: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.rpartition("=")
        if not sep or not name:
            raise HistosynthError(f"a class is NAME=ID, got {pair!r}")
        try:
            tid = int(value)
        except ValueError as err:
            raise HistosynthError(f"class id must be an integer 1..{MAX_TYPE}, got {pair!r}") from err
        if not 1 <= tid <= MAX_TYPE:
            raise HistosynthError(f"class id must be 1..{MAX_TYPE} (0 is background), got {pair!r}")
        if name in out:
            raise HistosynthError(f"class {name!r} given twice")
        out[name] = tid
    return out


def same_classes(a: Mapping[Any, str], b: Mapping[Any, str]) -> bool:
    """Whether two ``{type id: name}`` maps name the same classes, names compared loosely (:func:`class_key`)."""
    return {int(k): class_key(v) for k, v in a.items()} == {int(k): class_key(v) for k, v in b.items()}


def report_class_map(report: Mapping[str, Any], source: str | os.PathLike | None = None) -> dict[int, str]:
    """The class map of a patch set's report.json (``classes``; {} when it records none).

    Legacy ``n_<class>`` names are spelled as in the report's ``class_counts``
    (rasterize) or ``class_names`` (sample-masks) where those name the class.
    """
    return _report_classes(report, source)[0]


def _report_classes(report: Mapping[str, Any], source: str | os.PathLike | None) -> tuple[dict[int, str], bool]:
    classes = report.get("classes")
    if classes is None:
        return {}, True
    # names as written, for legacy n_<class> columns: rasterize's class_counts, sample-masks' class_names
    counts, names = report.get("class_counts"), report.get("class_names")
    spellings = [*(counts if isinstance(counts, Mapping) else ()),
                 *(names.values() if isinstance(names, Mapping) else ())]
    return _parse(classes, [str(s) for s in spellings], source)


def classes_of_patch_sets(paths: Sequence[str | os.PathLike]) -> dict[int, str]:
    """The class map recorded in the patch sets' ``report.json`` ({} when none records one).

    The maps of several sets are merged; an id named differently (compared
    with :func:`class_key`) in two sets is a HistosynthError naming both. A
    name written in a canonical map wins over one derived from a legacy
    ``n_<class>`` column.
    """
    found: dict[int, tuple[str, bool, str]] = {}
    for p in paths:
        path = Path(p) / "report.json"
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise HistosynthError(f"unreadable report.json: {err}", path) from err
        if not isinstance(report, dict):
            raise HistosynthError("report.json is not a JSON object", path)
        classes, exact = _report_classes(report, path)
        for tid, name in classes.items():
            if tid not in found:
                found[tid] = (name, exact, str(path))
                continue
            old, old_exact, where = found[tid]
            if class_key(old) != class_key(name):
                raise HistosynthError(f"type {tid} is {name!r} here but {old!r} in {where}: contradictory class maps",
                                      path)
            if exact and not old_exact:
                found[tid] = (name, exact, str(path))
    return {tid: found[tid][0] for tid in sorted(found)}


def _short(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- types of instances ---------------------------------------------------------------------------------
def instance_types(inst: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, type)`` of every instance of ``inst`` (ascending nonzero ids; int64 arrays).

    An instance's type is the majority of the nonzero ``types`` of its pixels;
    ties go to the smaller type; an instance without a typed pixel is type 0.
    """
    inst, types = np.asarray(inst), np.asarray(types)
    if inst.shape != types.shape:
        raise HistosynthError(f"instance map {inst.shape} and type map {types.shape} differ in shape")
    if inst.size and (inst.min() < 0 or types.min() < 0):
        raise HistosynthError("instance and type maps must hold non-negative labels")
    ids, index, _ = relabel(inst)
    return ids.astype(np.int64), majority_types(index, len(ids), types)


def majority_types(index: np.ndarray, n: int, types: np.ndarray) -> np.ndarray:
    """Majority nonzero type of instances ``1..n`` of a relabelled map ``index`` (:func:`relabel`).

    Ties go to the smaller type; 0 when all of an instance's pixels are type 0.
    """
    tvals, tidx, _ = relabel(np.asarray(types))
    if n == 0 or len(tvals) == 0:
        return np.zeros(n, np.int64)
    k = len(tvals) + 1
    table = np.bincount(index * k + tidx, minlength=(n + 1) * k).reshape(n + 1, k)[1:, 1:]
    best = table.argmax(axis=1)  # ties -> smaller type
    return np.where(table[np.arange(n), best] > 0, tvals[best], 0).astype(np.int64)


def relabel(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel a map of non-negative ints to ``0..n`` (0 stays 0, order of ids kept).

    Returns ``(ids, index, counts)``: the sorted nonzero values ``ids`` (n,),
    the flat relabelled map ``index`` (0 = background, ``k`` = ``ids[k - 1]``)
    and the pixel count of every id (n,).
    """
    flat = a.ravel()
    hi = int(flat.max()) if flat.size else 0
    if hi <= 4 * flat.size + 65536:  # small id range: O(N) by bincount
        flat = flat.astype(np.intp, copy=False)
        counts = np.bincount(flat, minlength=1)
        ids = np.flatnonzero(counts[1:]) + 1
        if len(ids) == hi:  # ids are already 1..n
            return ids, flat, counts[1:]
        lut = np.zeros(hi + 1, np.intp)
        lut[ids] = np.arange(1, len(ids) + 1)
        return ids, lut[flat], counts[ids]
    vals, inv, counts = np.unique(flat, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1).astype(np.intp, copy=False)
    if vals[0] == 0:
        return vals[1:], inv, counts[1:]
    return vals, inv + 1, counts
