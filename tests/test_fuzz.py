"""Fuzzing every input path: a damaged file is read or refused by name, never a traceback, hang or leftover.

Each *target* below is one reader (or one stage) and one family of damaged
inputs: a valid file of the format, made by the test, then mutated — bytes
truncated, flipped, deleted, duplicated or inserted (positions biased towards
the header, where binary formats keep their sizes), and for structured formats
elements deleted or duplicated and values replaced by wrong types, huge
numbers, NaN and infinities. The property is the same for all of them:

* the reader returns a valid result, or raises :class:`HistosynthError` whose
  ``path`` is one of the files it was given — no other exception;
* within :data:`TIME_LIMIT` seconds (an example that takes longer is a hang);
* the directory it worked in holds exactly what it held before (readers write
  nothing; a stage that fails leaves no output and no temporary directory).

``benchmarks/fuzz_long.py`` runs the same targets with many more examples.
"""

from __future__ import annotations

import atexit
import io
import json
import math
import re
import shutil
import signal
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.io
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histosynth.errors import HistosynthError
from histosynth.io.annotations import read
from histosynth.io.labels import classes_of_patch_sets, read_class_map
from histosynth.io.patchset import ARRAYS, INDEX_COLUMNS, read_patchset
from histosynth.io.slides import open_slide

from .helpers import tissue_image, write_pyramid
from .test_annotations import roi_bytes

#: seconds one example may take before it counts as a hang (normal examples take well under one)
TIME_LIMIT = 30
#: examples per property in the suite (benchmarks/fuzz_long.py runs thousands)
EXAMPLES = 30


# --------------------------------------------------------------------------- #
# The harness: time limit, working directory, the one property
# --------------------------------------------------------------------------- #


class Hang(BaseException):
    """An example ran past TIME_LIMIT (a BaseException, so no reader's ``except Exception`` hides it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`Hang` after ``seconds`` (SIGALRM; main thread, POSIX)."""

    def on_alarm(signum, frame):
        raise Hang(f"example ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@dataclass(frozen=True)
class Target:
    """One input path under fuzz: ``cases`` draws a damaged input, ``check`` writes it into a directory and reads it.

    ``check(case, workdir)`` returns normally when the result is valid or the
    input was refused with a HistosynthError naming a file in ``workdir``,
    and raises anything else.
    """

    cases: st.SearchStrategy
    check: Callable[[Any, Path], None]


def run_case(target: Target, case: Any) -> None:
    """The property: read or refuse by name, in time, leaving the working directory as it was."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        workdir = Path(tmp)
        with time_limit(TIME_LIMIT):
            target.check(case, workdir)


def refused_by_name(err: HistosynthError, workdir: Path) -> None:
    assert err.path is not None, f"the error names no file: {err}"
    assert Path(err.path).resolve().is_relative_to(workdir.resolve()), f"names another file: {err}"
    assert str(err).strip(), "empty message"


@contextmanager
def reads_nothing_else(workdir: Path) -> Iterator[None]:
    """The block may raise HistosynthError (checked to name a file); the directory must not change."""
    before = listing(workdir)
    try:
        yield
    except HistosynthError as err:
        refused_by_name(err, workdir)
    assert listing(workdir) == before, "a reader left files behind"


# --------------------------------------------------------------------------- #
# Mutations
# --------------------------------------------------------------------------- #

# a position in a file: a fraction of its length, or an absolute offset in the header
_POSITION = st.one_of(st.floats(0, 1), st.integers(0, 160))


def _byte_op() -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("truncate"), _POSITION),
        st.tuples(st.just("flip"), _POSITION, st.integers(0, 255)),
        st.tuples(st.just("delete"), _POSITION, st.integers(1, 64)),
        st.tuples(st.just("duplicate"), _POSITION, st.integers(1, 64)),
        st.tuples(st.just("insert"), _POSITION, st.binary(min_size=1, max_size=16)),
    )


def byte_mutations(min_size: int = 1) -> st.SearchStrategy:
    return st.lists(_byte_op(), min_size=min_size, max_size=3)


def _at(pos: float, n: int) -> int:
    i = int(pos * n) if isinstance(pos, float) else pos
    return max(0, min(i, n - 1))


def mutate_bytes(data: bytes, ops: list[tuple]) -> bytes:
    for op in ops:
        if not data:
            break
        kind, i = op[0], _at(op[1], len(data))
        if kind == "truncate":
            data = data[:i]
        elif kind == "flip":
            data = data[:i] + bytes([op[2]]) + data[i + 1 :]
        elif kind == "delete":
            data = data[:i] + data[i + op[2] :]
        elif kind == "duplicate":
            data = data[: i + op[2]] + data[i:]
        else:  # insert
            data = data[:i] + op[2] + data[i:]
    return data


#: values put where a file had something else: wrong types, huge numbers, NaN and infinities
WEIRD_VALUES = st.sampled_from([
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30, 1e308, -1e308, 1e-320,
    math.nan, math.inf, -math.inf, "", "12.5", "abc", "NaN", "1e999", [], {}, [[]], [0], [[0, 0]], {"x": 1},
    "x" * 300,
])


def _json_op() -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("replace"), st.floats(0, 1), WEIRD_VALUES),
        st.tuples(st.just("delete"), st.floats(0, 1)),
        st.tuples(st.just("duplicate"), st.floats(0, 1), st.integers(1, 3)),
    )


def _nodes(obj: Any, parent: Any = None, key: Any = None, out: list | None = None) -> list:
    """(parent, key) of every value in a JSON tree, depth first (the root has parent None)."""
    out = [] if out is None else out
    out.append((parent, key))
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            _nodes(v, obj, k, out)
    elif isinstance(obj, list):
        for k, v in enumerate(obj):
            _nodes(v, obj, k, out)
    return out


def mutate_json(obj: Any, ops: list[tuple]) -> Any:
    """Apply element mutations (on a deep copy) to a parsed JSON document."""
    obj = json.loads(json.dumps(obj))
    for op in ops:
        nodes = _nodes(obj)[1:]  # never the root itself
        if not nodes:
            break
        parent, key = nodes[_at(op[1], len(nodes))]
        if op[0] == "replace":
            parent[key] = json.loads(json.dumps(op[2]))
        elif op[0] == "delete":
            del parent[key]
        elif isinstance(parent, list):  # duplicate
            parent[key:key] = [json.loads(json.dumps(parent[key])) for _ in range(op[2])]
        else:
            parent[f"{key}_"] = parent[key]
    return obj


def json_cases(valid: Any) -> st.SearchStrategy:
    """Element mutations, then (sometimes) byte mutations of the text Python's json writes (NaN as NaN)."""
    return st.tuples(st.just(valid), st.lists(_json_op(), max_size=4), byte_mutations(min_size=0))


def json_bytes(case: tuple) -> bytes:
    valid, json_ops, byte_ops = case
    return mutate_bytes(json.dumps(mutate_json(valid, json_ops)).encode(), byte_ops)


_XML_WEIRD = st.sampled_from([
    "", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "1e308", "abc", "1,5", " 3 ", "0x10", "-0",
    "99999999999999999999999999", "1" * 400, "3.4028235e+38", "2147483648", "-2147483649", "Polygon", "Dot",
    "Spline", "PointSet", "Rectangle", "0", "1", "2", "3", "-1",
])


def _xml_op() -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("set"), st.floats(0, 1), st.floats(0, 1), _XML_WEIRD),
        st.tuples(st.just("drop_attr"), st.floats(0, 1), st.floats(0, 1)),
        st.tuples(st.just("delete"), st.floats(0, 1)),
        st.tuples(st.just("duplicate"), st.floats(0, 1), st.integers(1, 3)),
    )


def mutate_xml(text: str, ops: list[tuple]) -> bytes:
    root = ET.fromstring(text)
    for op in ops:
        pairs = [(parent, child) for parent in root.iter() for child in parent]
        if op[0] in ("set", "drop_attr"):
            elems = [e for e in root.iter() if e.attrib]
            if not elems:
                continue
            e = elems[_at(op[1], len(elems))]
            names = sorted(e.attrib)
            name = names[_at(op[2], len(names))]
            if op[0] == "set":
                e.set(name, op[3])
            else:
                del e.attrib[name]
        elif pairs:
            parent, child = pairs[_at(op[1], len(pairs))]
            if op[0] == "delete":
                parent.remove(child)
            else:
                at = list(parent).index(child)
                for _ in range(op[2]):
                    parent.insert(at, ET.fromstring(ET.tostring(child)))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def xml_cases(valid: str) -> st.SearchStrategy:
    return st.tuples(st.just(valid), st.lists(_xml_op(), max_size=4), byte_mutations(min_size=0))


def xml_bytes(case: tuple) -> bytes:
    valid, xml_ops, byte_ops = case
    return mutate_bytes(mutate_xml(valid, xml_ops), byte_ops)


# --------------------------------------------------------------------------- #
# Valid files of every format read
# --------------------------------------------------------------------------- #

SLIDE = (64, 64)  # (width, height) the annotation readers clip to


def _feature(coords, name, gtype="Polygon", **extra) -> dict:
    return {"type": "Feature", "geometry": {"type": gtype, "coordinates": coords},
            "properties": {"objectType": "annotation", "classification": {"name": name}}, **extra}


def _square(x, y, s=4) -> list:
    return [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]


GEOJSON = {"type": "FeatureCollection", "features": [
    _feature(_square(2, 3, 9), "a", id="n1"),
    _feature([[[[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]], [[[30, 30], [31, 30], [31, 31], [30, 30]]]], "b",
             gtype="MultiPolygon"),
    _feature([[[40, 40], [50, 40], [50, 50], [40, 50], [40, 40]], [[42, 42], [44, 42], [44, 44], [42, 42]]], "a"),
    _feature([1, 2], "c", gtype="Point"),
    {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(20, 40, 6)},
     "nucleusGeometry": {"type": "Polygon", "coordinates": _square(21, 41, 3)},
     "properties": {"objectType": "cell", "classification": {"name": "b"}}},
]}

COCO = {"images": [{"id": 1, "width": 64, "height": 64, "file_name": "t.png"}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]},
                        {"id": 2, "image_id": 1, "category_id": 2,
                         "segmentation": {"size": [4, 3], "counts": [2, 6, 4]}},
                        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1,
                         "segmentation": {"size": [4, 3], "counts": "1;2"}}]}

POINTS = {"nuclei": [{"class": "a", "points": [[1, 1], [6, 1], [6, 6], [1, 6]]},
                     {"x": [20, 30, 30], "y": [20, 20, 30]},
                     {"type": "b", "boundary": [{"x": 40, "y": 40}, {"x": 45, "y": 40}, {"x": 45, "y": 46}]}]}

IMAGESCOPE = """<Annotations MicronsPerPixel="0.250000">
<Annotation Id="1" Name="" LineColor="65280"><Attributes><Attribute Name="Epithelial" Id="0" Value=""/></Attributes>
<Regions>
<Region Id="1" Type="0" NegativeROA="0"><Attributes/><Vertices>
<Vertex X="2" Y="3" Z="0"/><Vertex X="11" Y="3" Z="0"/><Vertex X="11" Y="12" Z="0"/><Vertex X="2" Y="12" Z="0"/>
</Vertices></Region>
<Region Id="2" Type="1"><Vertices><Vertex X="20" Y="20"/><Vertex X="30" Y="20"/><Vertex X="30" Y="28"/>
<Vertex X="20" Y="28"/></Vertices></Region>
<Region Id="3" Type="2"><Vertices><Vertex X="40" Y="40"/><Vertex X="50" Y="46"/></Vertices></Region>
<Region Id="4" Type="0" NegativeROA="1"><Vertices><Vertex X="1" Y="1"/><Vertex X="3" Y="1"/><Vertex X="3" Y="3"/>
</Vertices></Region>
</Regions></Annotation>
<Annotation Id="2" Name="Lymphocyte"><Regions><Region Id="5" Type="0"><Vertices>
<Vertex X="50.5" Y="5.25"/><Vertex X="60" Y="5"/><Vertex X="55" Y="14.75"/></Vertices></Region></Regions></Annotation>
</Annotations>"""

ASAP = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="tumour" Color="#F4FA58"><Coordinates>
<Coordinate Order="0" X="2" Y="3"/><Coordinate Order="1" X="11" Y="3"/><Coordinate Order="2" X="11" Y="12"/>
<Coordinate Order="3" X="2" Y="12"/></Coordinates></Annotation>
<Annotation Name="Annotation 1" Type="Spline" PartOfGroup="lymph" Color="#F4FA58"><Coordinates>
<Coordinate Order="2" X="30" Y="30"/><Coordinate Order="0" X="20" Y="20"/><Coordinate Order="1" X="30" Y="20"/>
</Coordinates></Annotation>
<Annotation Name="Annotation 2" Type="Rectangle" PartOfGroup="tumour"><Coordinates>
<Coordinate Order="0" X="40" Y="40"/><Coordinate Order="1" X="50" Y="40"/><Coordinate Order="2" X="50" Y="50"/>
<Coordinate Order="3" X="40" Y="50"/></Coordinates></Annotation>
<Annotation Name="Annotation 3" Type="Dot" PartOfGroup="tumour"><Coordinates>
<Coordinate Order="0" X="5" Y="50"/></Coordinates></Annotation>
</Annotations><AnnotationGroups><Group Name="tumour" PartOfGroup="None" Color="#64FE2E"/></AnnotationGroups>
</ASAP_Annotations>"""


def _composite_roi() -> bytes:
    """A composite (shape) ROI: a square with a square hole, as a path of float segments."""
    path = [0, 10, 10, 1, 30, 10, 1, 30, 30, 1, 10, 30, 4, 0, 15, 15, 1, 20, 15, 1, 20, 20, 1, 15, 20, 4]
    hdr = bytearray(roi_bytes(1, rect=(10, 10, 30, 30)))
    struct.pack_into(">i", hdr, 36, len(path))
    return bytes(hdr) + np.asarray(path, ">f4").tobytes()


ROIS = {
    "poly.roi": roi_bytes(0, [(10, 10), (20, 10), (15, 18)]),
    "free.roi": roi_bytes(7, [(30, 30), (40, 30), (40, 40), (30, 40)]),
    "rect.roi": roi_bytes(1, rect=(50, 50, 54, 56)),
    "oval.roi": roi_bytes(2, rect=(5, 40, 15, 46)),
    "sub.roi": roi_bytes(7, [(40.25, 5.5), (45.75, 5.5), (45.75, 11.25)], subpixel=True, options=256),
    "spline.roi": roi_bytes(0, [(50, 20), (60, 22), (55, 30)], options=1),
    "line.roi": roi_bytes(3, rect=(0, 0, 5, 5)),
    "point.roi": roi_bytes(10, [(3, 3)]),
    "composite.roi": _composite_roi(),
}

# (offset, struct format) of every numeric field of the .roi header that the reader uses
_ROI_FIELDS = [(4, ">h"), (6, ">B"), (8, ">h"), (10, ">h"), (12, ">h"), (14, ">h"), (16, ">H"), (18, ">i"),
               (18, ">f"), (22, ">f"), (26, ">f"), (30, ">f"), (36, ">i"), (50, ">h"), (64, ">h"), (64, ">f")]
_FIELD_VALUES = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 7, 8, 10, 11, 127, 128, 255, 256, 222, 223, 227, -5001, 32767, -32768, 65535,
                     2**31 - 1, -(2**31), 1_000_000, 100_000_000]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)


def _roi_field_op() -> st.SearchStrategy:
    return st.tuples(st.sampled_from(range(len(_ROI_FIELDS))), _FIELD_VALUES)


def set_roi_field(data: bytes, op: tuple) -> bytes:
    offset, fmt = _ROI_FIELDS[op[0]]
    value = op[1]
    if fmt.endswith("f"):
        value = float(value)
    else:  # an integer field: wrap to its width (a float value gives its integer part, NaN gives 0)
        value = int(value) if math.isfinite(float(value)) else 0
        bits = 8 * struct.calcsize(fmt)
        value &= (1 << bits) - 1
        if fmt[-1].islower() and value >= 1 << (bits - 1):
            value -= 1 << bits
    buf = bytearray(data.ljust(offset + struct.calcsize(fmt), b"\0"))
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def roi_cases() -> st.SearchStrategy:
    return st.tuples(st.sampled_from(sorted(ROIS)), st.lists(_roi_field_op(), max_size=3), byte_mutations(0))


def roi_file(case: tuple) -> bytes:
    name, field_ops, byte_ops = case
    data = ROIS[name]
    for op in field_ops:
        data = set_roi_field(data, op)
    return mutate_bytes(data, byte_ops)


def roiset_cases() -> st.SearchStrategy:
    """One member of a RoiSet.zip damaged (the zip rewritten around it), then maybe the zip's bytes."""
    return st.tuples(roi_cases(), st.booleans(), byte_mutations(0))


def roiset_zip(case: tuple) -> bytes:
    member, stored, byte_ops = case
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as z:
        for name, data in ROIS.items():
            z.writestr(name, roi_file(member) if name == member[0] else data)
        z.writestr("readme.txt", b"not a roi")
    return mutate_bytes(buf.getvalue(), byte_ops)


def label_image() -> np.ndarray:
    lab = np.zeros((24, 32), np.uint16)
    lab[2:6, 3:9] = 7
    lab[10:15, 10:14] = 300
    lab[12, 12] = 0  # a hole
    lab[18, 20] = lab[19, 21] = 5  # diagonal pixels
    lab[20:23, 2:4] = 5  # and a second piece
    return lab


def type_map(lab: np.ndarray) -> np.ndarray:
    return (lab % 2 + 1).astype(np.uint8) * (lab > 0)


# array mutations of label images and .mat contents
_ARRAY_OPS = st.one_of(
    st.tuples(st.just("set"), st.floats(0, 1), st.sampled_from([0, 1, 2**15, 2**31 - 1, 2**40, -1, 0.5, math.nan,
                                                                 math.inf, -math.inf])),
    st.tuples(st.just("dtype"), st.sampled_from(["float64", "float32", "int8", "int64", "uint64", "bool", "complex64",
                                                 "U3", "object"])),
    st.tuples(st.just("shape"), st.sampled_from(["3d1", "3d2", "3d3", "3d5", "1d", "empty", "row", "4d", "scalar"])),
)


def mutate_array(a: np.ndarray, op: tuple) -> np.ndarray:
    """The array changed by one op; unchanged when the op does not apply (e.g. arithmetic on strings)."""
    try:
        return _mutate_array(np.array(a), op)
    except (TypeError, ValueError, OverflowError, IndexError):
        return a


def _mutate_array(a: np.ndarray, op: tuple) -> np.ndarray:
    if op[0] == "set":
        value = op[2]
        if not isinstance(value, int) or not np.can_cast(np.min_scalar_type(value), a.dtype):
            a = a.astype(np.float64 if not isinstance(value, int) else np.int64)
        if a.size:
            a.flat[_at(op[1], a.size)] = value
        return a
    if op[0] == "dtype":
        if op[1] == "object":
            return a.astype(str).astype(object)
        return a.astype(op[1])
    shape = op[1]
    if shape == "3d1":
        return a[..., None]
    if shape in ("3d2", "3d3", "3d5"):
        n = int(shape[-1])
        return np.stack([a + k for k in range(n)], axis=-1) if a.ndim == 2 else a
    if shape == "1d":
        return a.ravel()
    if shape == "empty":
        return a[:0]
    if shape == "row":
        return a[:1]
    if shape == "4d":
        return a[None, None]
    return np.asarray(a.flat[0]) if a.size else a.reshape(())


def label_cases() -> st.SearchStrategy:
    return st.tuples(st.sampled_from(["png", "tif", "npy"]), st.lists(_ARRAY_OPS, max_size=2), st.booleans(),
                     st.lists(_ARRAY_OPS, max_size=1), byte_mutations(0))


def _encode_array(kind: str, a: np.ndarray) -> bytes | None:
    """The array as a .png/.tif/.npy file; None when the format cannot hold it."""
    try:
        if kind == "npy":
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            return buf.getvalue()
        if kind == "tif":
            buf = io.BytesIO()
            tifffile.imwrite(buf, a)
            return buf.getvalue()
        ok, enc = cv2.imencode(".png", a)
        return enc.tobytes() if ok else None
    except Exception:  # noqa: BLE001 - the writers refuse some dtypes (object, complex, strings) each in its own way
        return None


def label_files(case: tuple) -> dict[str, bytes]:
    """The label image (and, when asked, a sibling type map) of one case, damaged."""
    kind, ops, with_types, type_ops, byte_ops = case
    lab = label_image()
    types = type_map(lab)
    for op in ops:
        lab = mutate_array(lab, op)
    for op in type_ops:
        types = mutate_array(types, op)
    files = {}
    encoded = _encode_array(kind, lab) or _encode_array(kind, label_image())
    files[f"l.{kind}"] = mutate_bytes(encoded, byte_ops)
    if with_types:
        t = _encode_array("npy", types)
        if t is not None:
            files["l_type.npy"] = t
    return files


def mat_cases() -> st.SearchStrategy:
    keys = st.sampled_from(["inst_map", "inst_type", "type_map", "inst_centroid"])
    ops = st.lists(st.tuples(keys, _ARRAY_OPS), max_size=3)
    drop = st.lists(keys, max_size=2)
    return st.tuples(ops, drop, st.booleans(), byte_mutations(0))


def mat_file(case: tuple) -> bytes:
    ops, drop, compress, byte_ops = case
    lab = label_image().astype(np.int32)
    ids = np.unique(lab)[1:]
    content = {"inst_map": lab, "type_map": type_map(lab).astype(np.int32),
               "inst_type": (ids % 3 + 1).astype(np.int32)[:, None],
               "inst_centroid": np.zeros((len(ids), 2))}
    for key, op in ops:
        content[key] = mutate_array(content[key], op)
    for key in drop:
        content.pop(key, None)
    buf = io.BytesIO()
    try:
        scipy.io.savemat(buf, content, do_compression=compress)
    except (ValueError, TypeError):  # arrays that MATLAB files cannot hold
        buf = io.BytesIO()
        scipy.io.savemat(buf, {"inst_map": lab, "inst_type": content.get("inst_type", ids[:, None])})
    return mutate_bytes(buf.getvalue(), byte_ops)


# --------------------------------------------------------------------------- #
# Annotation readers
# --------------------------------------------------------------------------- #


def read_annotations(path: Path, workdir: Path, **kwargs) -> None:
    """``read`` returns valid outlines inside the slide, every item accounted for, or refuses by name."""
    with reads_nothing_else(workdir):
        s = read(path, slide_size=SLIDE, **kwargs)
        r = s.report
        skipped = sum(v for k, v in r.items() if k.startswith("skipped_")) + r["outside_slide"]
        assert r["read"] == r["kept"] + skipped, r
        assert r["kept"] == len(s.nuclei) == sum(s.class_counts.values())
        assert [n.id for n in s.nuclei] == list(range(1, len(s.nuclei) + 1))
        for n in s.nuclei:
            assert n.polygon.is_valid and n.polygon.area > 0 and n.polygon.geom_type == "Polygon", n
            x0, y0, x1, y1 = n.polygon.bounds
            assert 0 <= x0 and 0 <= y0 and x1 <= SLIDE[0] and y1 <= SLIDE[1], n
            assert n.type_id >= 1


def _annotation_check(name: str, make: Callable[[Any], bytes]) -> Callable[[Any, Path], None]:
    def check(case: Any, workdir: Path) -> None:
        path = workdir / name
        path.write_bytes(make(case))
        read_annotations(path, workdir)

    return check


def _label_check(case: tuple, workdir: Path) -> None:
    files = label_files(case)
    for name, data in files.items():
        (workdir / name).write_bytes(data)
    read_annotations(workdir / next(iter(files)), workdir)


# --------------------------------------------------------------------------- #
# Slides, the tile stage, class maps, patch sets, the rasterize stage
# --------------------------------------------------------------------------- #


@cache
def _slide_files() -> dict[str, bytes]:
    img = tissue_image(96, 64, seed=1, tissue=(0.3, 1.0))
    out = {
        "png": cv2.imencode(".png", img[..., ::-1])[1].tobytes(),
        "jpg": cv2.imencode(".jpg", img[..., ::-1])[1].tobytes(),
    }
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    out["tif"] = buf.getvalue()  # stripped: read whole
    with tempfile.TemporaryDirectory() as tmp:
        p = write_pyramid(Path(tmp) / "s.tif", tissue_image(256, 192, seed=2), mpp=0.25, levels=2, tile=64)
        out["pyramid.tif"] = p.read_bytes()  # tiled JPEG levels: OpenSlide / tifffile direct
    return out


def _header_field_op() -> st.SearchStrategy:
    """A size field of the image header set to a (huge) value: PNG IHDR, JPEG SOF, TIFF ImageWidth/Length."""
    return st.tuples(st.sampled_from(["width", "height"]),
                     st.sampled_from([0, 1, 65535, 2**16, 2**24, 2**31 - 1, 2**32 - 1]))


def set_header_size(kind: str, data: bytes, op: tuple) -> bytes:
    which, value = op
    buf = bytearray(data)
    if kind == "png":
        struct.pack_into(">I", buf, 16 if which == "width" else 20, value)
    elif kind == "jpg":
        i = 2
        while i + 9 <= len(buf) and buf[i] == 0xFF:
            if 0xC0 <= buf[i + 1] <= 0xC2:
                struct.pack_into(">H", buf, i + 7 if which == "width" else i + 5, min(value, 65535))
                break
            i += 2 + struct.unpack_from(">H", buf, i + 2)[0]
    else:  # TIFF: rewrite the first ImageWidth (256) / ImageLength (257) tag in place
        tag = 256 if which == "width" else 257
        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            t = tf.pages[0].tags[tag]
            fmt = "<I" if t.dtype == 4 else "<H"
            struct.pack_into(fmt, buf, t.valueoffset, min(value, 2**32 - 1 if fmt == "<I" else 65535))
    return bytes(buf)


def slide_cases() -> st.SearchStrategy:
    return st.tuples(st.sampled_from(["png", "jpg", "tif", "pyramid.tif"]), st.lists(_header_field_op(), max_size=1),
                     byte_mutations(0))


def slide_file(case: tuple) -> tuple[str, bytes]:
    kind, header_ops, byte_ops = case
    data = _slide_files()[kind]
    for op in header_ops:
        data = set_header_size(kind.rsplit(".", 1)[-1], data, op)
    return f"s.{kind.rsplit('.', 1)[-1]}", mutate_bytes(data, byte_ops)


def _slide_check(case: tuple, workdir: Path) -> None:
    name, data = slide_file(case)
    path = workdir / name
    path.write_bytes(data)
    with reads_nothing_else(workdir), open_slide(path, mpp_fallback=0.5, max_pixels=2**24) as slide:
        assert slide.mpp_x > 0 and slide.mpp_y > 0
        for level, (w, h) in enumerate(slide.level_dimensions):
            assert w > 0 and h > 0
            if w * h <= 2**20:
                region = slide.read_level(level)
                assert region.shape == (h, w, 3) and region.dtype == np.uint8


def _tile_check(case: tuple, workdir: Path) -> None:
    """The tile stage on a damaged slide: a complete patch set, or an error and no output at all."""
    from histosynth.slides.tiling import TileParams, tile_slide

    name, data = slide_file(case)
    path = workdir / name
    path.write_bytes(data)
    out = workdir / "tiles"
    before = listing(workdir)
    try:
        tile_slide(path, out, TileParams(size=32, max_background=1.0), mpp_fallback=0.5, max_pixels=2**20)
    except HistosynthError as err:
        refused_by_name(err, workdir)
        assert listing(workdir) == before, "a failed tile stage left output behind"
        return
    ps = read_patchset(out, require=("images",))
    assert len(ps) > 0 and ps.images.shape[1:] == (32, 32, 3)


_CLASS_MAP_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
              st.sampled_from(["1", "0", "255", "256", "-1", " ", "Epithelial", "n_epithelial", "1.0", "٣"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
        st.one_of(st.text(max_size=6), st.sampled_from(["1", "2", "0", "256", "n_a", "n_b", "Epithelial"])),
        inner, max_size=4)),
    max_leaves=12,
)


def _class_map_object_check(obj: Any, workdir: Path) -> None:
    """Any JSON-like object: a {type id: name} map with ids 0..255 and non-empty names, or a named refusal."""
    try:
        out = read_class_map(obj, source=workdir / "report.json")
    except HistosynthError as err:
        refused_by_name(err, workdir)
        return
    assert isinstance(out, dict) and list(out) == sorted(out)
    for tid, name in out.items():
        assert isinstance(tid, int) and 0 <= tid <= 255 and isinstance(name, str) and name.strip()


REPORT = {"classes": {"1": "Epithelial", "2": "Lymphocyte"}, "class_counts": {"Epithelial": 3, "Lymphocyte": 1},
          "parse": {"kept": 4}}
LEGACY_REPORT = {"classes": {"n_epithelial": 1, "n_lymphocyte": 2},
                 "class_counts": {"Epithelial": 3, "Lymphocyte": 1}}


def report_cases() -> st.SearchStrategy:
    return st.one_of(json_cases(REPORT), json_cases(LEGACY_REPORT))


def _report_check(case: tuple, workdir: Path) -> None:
    """classes_of_patch_sets over a damaged report.json (and a sound one beside it)."""
    good = workdir / "good"
    good.mkdir()
    (good / "report.json").write_text(json.dumps(REPORT))
    bad = workdir / "bad"
    bad.mkdir()
    (bad / "report.json").write_bytes(json_bytes(case))
    with reads_nothing_else(workdir):
        out = classes_of_patch_sets([bad, good])
        assert all(isinstance(t, int) and 0 <= t <= 255 and n.strip() for t, n in out.items())


def _patchset_files() -> dict[str, bytes]:
    n, h, w = 3, 8, 8
    rng = np.random.default_rng(0)
    index = pd.DataFrame({
        "slide": ["s"] * n, "x": [0, 8, 16], "y": [0, 0, 0], "level": [0] * n, "downsample": [1.0] * n,
        "mpp": [0.25] * n, "width": [w] * n, "height": [h] * n, "tissue_fraction": [1.0, 0.5, 0.25],
        "n_nuclei": [1, 0, 2], "source": ["tile"] * n,
    })
    files = {"index.csv": index.to_csv(index=False).encode()}
    arrays = {"images": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
              "inst": rng.integers(0, 3, (n, h, w)).astype(np.int32),
              "types": rng.integers(0, 2, (n, h, w)).astype(np.uint8)}
    for name, arr in arrays.items():
        buf = io.BytesIO()
        np.save(buf, arr)
        files[f"{name}.npy"] = buf.getvalue()
    files["report.json"] = json.dumps(REPORT).encode()
    return files


_CSV_WEIRD = st.sampled_from(["", "nan", "inf", "-inf", "abc", "1e400", "99999999999999999999999", "-1", "1.5",
                              '"', "0x10", "1,2", "True"])


def _csv_op() -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("cell"), st.integers(0, 2), st.sampled_from(INDEX_COLUMNS), _CSV_WEIRD),
        st.tuples(st.just("drop_column"), st.sampled_from(INDEX_COLUMNS)),
        st.tuples(st.just("drop_row"), st.integers(0, 2)),
        st.tuples(st.just("duplicate_row"), st.integers(0, 2)),
    )


def patchset_cases() -> st.SearchStrategy:
    files = st.sampled_from(["index.csv", "images.npy", "inst.npy", "types.npy", "report.json"])
    return st.tuples(st.lists(_csv_op(), max_size=3), st.lists(st.tuples(files, byte_mutations()), max_size=2))


def patchset_files(case: tuple) -> dict[str, bytes]:
    csv_ops, byte_ops = case
    files = _patchset_files()
    rows = [line.split(",") for line in files["index.csv"].decode().splitlines()]
    header, body = rows[0], rows[1:]
    for op in csv_ops:
        if op[0] == "cell" and op[1] < len(body) and op[2] in header:
            body[op[1]][header.index(op[2])] = op[3]
        elif op[0] == "drop_column" and op[1] in header:
            j = header.index(op[1])
            header = header[:j] + header[j + 1 :]
            body = [r[:j] + r[j + 1 :] for r in body]
        elif op[0] == "drop_row" and op[1] < len(body):
            del body[op[1]]
        elif op[0] == "duplicate_row" and op[1] < len(body):
            body.insert(op[1], list(body[op[1]]))
    files["index.csv"] = "\n".join(",".join(r) for r in [header, *body]).encode() + b"\n"
    for name, ops in byte_ops:
        files[name] = mutate_bytes(files[name], ops)
    return files


#: index columns that every stage uses as numbers (level-0 position and size of a patch)
NUMERIC_COLUMNS = ("x", "y", "level", "downsample", "width", "height")


def _patchset_check(case: tuple, workdir: Path) -> None:
    d = workdir / "set"
    d.mkdir()
    for name, data in patchset_files(case).items():
        (d / name).write_bytes(data)
    with reads_nothing_else(workdir):
        ps = read_patchset(d, require=("images",))
        for name in ARRAYS:
            arr = getattr(ps, name)
            if arr is not None:
                assert arr.shape[0] == len(ps.index) and arr.dtype == ARRAYS[name][0]
                np.asarray(arr[:]).sum()  # every byte the header promises is there
        for col in NUMERIC_COLUMNS:
            values = ps.index[col]
            assert pd.api.types.is_numeric_dtype(values) and np.isfinite(values.to_numpy(float)).all(), col
        assert isinstance(ps.report, dict)


_TILES: list[tempfile.TemporaryDirectory] = []


@cache
def tiles_dir() -> Path:
    """A 400 x 200 slide tiled in 100-px tiles, built once per process (removed at exit)."""
    from histosynth.slides.tiling import TileParams, tile_slide

    tmp = tempfile.TemporaryDirectory(prefix="fuzz-tiles-")
    _TILES.append(tmp)
    atexit.register(tmp.cleanup)
    root = Path(tmp.name)
    slide = write_pyramid(root / "s.tif", tissue_image(400, 200, tissue=(0, 1)), mpp=0.25, levels=1, tile=128)
    tile_slide(slide, root / "tiles", TileParams(size=100, max_background=1.0))
    return root / "tiles"


RASTER_GEOJSON = {"type": "FeatureCollection", "features": [
    _feature(_square(10, 10, 20), "Tumour"),
    _feature(_square(90, 40, 20), "nuclei_lymph"),
    _feature(_square(350, 150, 10), "Tumour"),
    _feature([[[200, 50], [230, 80], [230, 50], [200, 80], [200, 50]]], "Tumour"),  # a bow-tie, repaired
    _feature(_square(395, 195, 20), "lymph"),  # clipped by the slide's edge
]}


def _rasterize_check(case: tuple, workdir: Path) -> None:
    """The rasterize stage on a damaged annotation file: a whole patch set, or an error and no output at all."""
    from histosynth.patches.annotate import rasterize_patchset

    ann = workdir / "a.geojson"
    ann.write_bytes(json_bytes(case))
    out = workdir / "out" / "patches"
    before = listing(workdir)
    try:
        report = rasterize_patchset(ann, tiles_dir(), out, {"tumour": 1, "lymph": 2})
    except HistosynthError as err:
        refused_by_name(err, workdir)
        assert listing(workdir) == before, "a failed rasterize left output behind"
        return
    ps = read_patchset(out, require=("images", "inst", "types"))
    assert len(ps) == len(read_patchset(tiles_dir())) and report["nuclei_read"] >= 0
    assert set(np.unique(ps.types[:])) <= {0, 1, 2}


# --------------------------------------------------------------------------- #
# Every target, and the suite's properties
# --------------------------------------------------------------------------- #

TARGETS: dict[str, Target] = {
    "geojson": Target(json_cases(GEOJSON), _annotation_check("a.geojson", json_bytes)),
    "coco": Target(json_cases(COCO), _annotation_check("c.json", json_bytes)),
    "points_json": Target(json_cases(POINTS), _annotation_check("p.json", json_bytes)),
    "imagescope": Target(xml_cases(IMAGESCOPE), _annotation_check("a.xml", xml_bytes)),
    "asap": Target(xml_cases(ASAP), _annotation_check("a.xml", xml_bytes)),
    "imagej_roi": Target(roi_cases(), _annotation_check("a.roi", roi_file)),
    "imagej_zip": Target(roiset_cases(), _annotation_check("RoiSet.zip", roiset_zip)),
    "mat": Target(mat_cases(), _annotation_check("a.mat", mat_file)),
    "label": Target(label_cases(), _label_check),
    "slide": Target(slide_cases(), _slide_check),
    "tile": Target(slide_cases(), _tile_check),
    "class_map": Target(_CLASS_MAP_VALUES, _class_map_object_check),
    "report_json": Target(report_cases(), _report_check),
    "patchset": Target(patchset_cases(), _patchset_check),
    "rasterize": Target(json_cases(RASTER_GEOJSON), _rasterize_check),
}


def _property(name: str, examples: int = EXAMPLES):
    target = TARGETS[name]

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=target.cases)
    def prop(case):
        run_case(target, case)

    return prop


@pytest.mark.parametrize("name", sorted(set(TARGETS) - {"tile", "rasterize"}))
def test_damaged_input_is_read_or_refused_by_name(name):
    _property(name)()


def test_damaged_slide_tiles_completely_or_not_at_all():
    _property("tile", examples=25)()


def test_damaged_annotations_rasterize_completely_or_not_at_all():
    _property("rasterize", examples=25)()


# --------------------------------------------------------------------------- #
# The harness itself catches what it must
# --------------------------------------------------------------------------- #


def test_harness_catches_other_exceptions_hangs_and_leftovers(tmp_path):
    def raises(case, workdir):
        with reads_nothing_else(workdir):
            raise ValueError("not a HistosynthError")

    with pytest.raises(ValueError):
        run_case(Target(st.none(), raises), None)

    def hangs(case, workdir):
        while True:
            pass

    old = globals()["TIME_LIMIT"]
    globals()["TIME_LIMIT"] = 0.2
    try:
        with pytest.raises(Hang):
            run_case(Target(st.none(), hangs), None)
    finally:
        globals()["TIME_LIMIT"] = old

    def leaves(case, workdir):
        with reads_nothing_else(workdir):
            (workdir / "left.tmp").write_bytes(b"x")

    with pytest.raises(AssertionError, match="left files behind"):
        run_case(Target(st.none(), leaves), None)

    def names_other_file(case, workdir):
        with reads_nothing_else(workdir):
            raise HistosynthError("bad", tmp_path / "elsewhere")

    with pytest.raises(AssertionError, match="names another file"):
        run_case(Target(st.none(), names_other_file), None)


def test_mutations_change_the_files():
    """The strategies damage what they claim to (a fuzzer that never mutates proves nothing)."""
    data = bytes(range(200))
    assert mutate_bytes(data, [("truncate", 0.5)]) == data[:100]
    assert mutate_bytes(data, [("flip", 3, 255)])[3] == 255
    assert mutate_bytes(data, [("delete", 10, 5)]) == data[:10] + data[15:]
    assert mutate_bytes(data, [("duplicate", 10, 5)]) == data[:15] + data[10:]
    assert mutate_bytes(data, [("insert", 0, b"ab")]) == b"ab" + data
    assert mutate_json({"a": [1, 2]}, [("replace", 0.9, math.nan)])["a"][1] != 2
    assert mutate_json({"a": [1, 2]}, [("delete", 0.6)]) == {"a": [2]}
    assert mutate_json({"a": [1, 2]}, [("duplicate", 0.6, 2)]) == {"a": [1, 1, 1, 2]}
    assert b'X="nan"' in mutate_xml('<A><B X="1"/></A>', [("set", 0.0, 0.0, "nan")])
    assert mutate_xml("<A><B/></A>", [("delete", 0.0)]).endswith(b"<A />")
    assert set_roi_field(ROIS["poly.roi"], (6, 60000))[16:18] == struct.pack(">H", 60000)
    png = set_header_size("png", _slide_files()["png"], ("width", 2**31 - 1))
    assert struct.unpack_from(">I", png, 16)[0] == 2**31 - 1
    tif = set_header_size("tif", _slide_files()["tif"], ("height", 2**24))
    with tifffile.TiffFile(io.BytesIO(tif)) as tf:
        assert tf.pages[0].imagelength == 2**24
    assert label_files(("npy", [("dtype", "float64"), ("set", 0.0, math.nan)], True, [], []))["l.npy"] != \
        label_files(("npy", [], True, [], []))["l.npy"]
    assert "inst_map" not in scipy.io.loadmat(io.BytesIO(mat_file(([], ["inst_map"], False, []))))
    files = patchset_files(([("cell", 0, "x", "abc")], []))
    assert pd.read_csv(io.BytesIO(files["index.csv"]))["x"][0] == "abc"


def test_valid_inputs_are_accepted(tmp_path):
    """Unmutated, every target's file reads: the properties test damage, not a broken seed file."""
    from histosynth.patches.annotate import rasterize_patchset

    cases = {
        "geojson": (GEOJSON, [], []), "coco": (COCO, [], []), "points_json": (POINTS, [], []),
        "imagescope": (IMAGESCOPE, [], []), "asap": (ASAP, [], []),
    }
    kept = {}
    for name, case in cases.items():
        path = tmp_path / name
        path.write_bytes(json_bytes(case) if name in ("geojson", "coco", "points_json") else xml_bytes(case))
        kept[name] = read(path, slide_size=SLIDE).report["kept"]
    assert kept == {"geojson": 4, "coco": 2, "points_json": 3, "imagescope": 4, "asap": 3}
    roi = tmp_path / "a.roi"
    for name in ROIS:
        roi.write_bytes(roi_file((name, [], [])))
        assert read(roi).report["read"] == 1
    (tmp_path / "RoiSet.zip").write_bytes(roiset_zip((("poly.roi", [], []), False, [])))
    assert read(tmp_path / "RoiSet.zip").report["kept"] == 7
    (tmp_path / "a.mat").write_bytes(mat_file(([], [], True, [])))
    assert read(tmp_path / "a.mat").report["kept"] == 3
    for kind in ("png", "tif", "npy"):
        for name, data in label_files((kind, [], True, [], [])).items():
            (tmp_path / name).write_bytes(data)
        s = read(tmp_path / f"l.{kind}")
        assert s.report["kept"] == 3 and set(s.class_counts) == {"1", "2"}
    for kind in ("png", "jpg", "tif", "pyramid.tif"):
        name, data = slide_file((kind, [], []))
        (tmp_path / name).write_bytes(data)
        with open_slide(tmp_path / name, mpp_fallback=0.5) as slide:
            assert slide.dimensions in ((96, 64), (256, 192))
    assert read_class_map({"1": "Epithelial"}) == {1: "Epithelial"}
    (tmp_path / "set").mkdir()
    for name, data in patchset_files(([], [])).items():
        (tmp_path / "set" / name).write_bytes(data)
    assert len(read_patchset(tmp_path / "set", require=("images", "inst", "types"))) == 3
    (tmp_path / "r.geojson").write_bytes(json_bytes((RASTER_GEOJSON, [], [])))
    report = rasterize_patchset(tmp_path / "r.geojson", tiles_dir(), tmp_path / "p", {"tumour": 1, "lymph": 2})
    assert report["parse"]["kept"] == 5 and report["parse"]["repaired_invalid"] == 1
    shutil.rmtree(tmp_path / "p")


# --------------------------------------------------------------------------- #
# Regressions: the first input of every fault the fuzzing found (benchmarks/fuzz_long.py), now refused by name
# --------------------------------------------------------------------------- #


def _write(workdir: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (workdir / name).write_bytes(data)
    return workdir / next(iter(files))


REGRESSIONS = {
    # COCO "images": true -> TypeError: 'bool' object is not iterable
    "coco-images-not-a-list": (
        lambda d: read(_write(d, {"c.json": json_bytes((COCO, [("replace", 0.0, True)], []))})),
        r"c\.json: COCO 'images' is a bool, not a list"),
    # a category id that is a list -> TypeError: unhashable type: 'list'
    "coco-id-is-a-list": (
        lambda d: read(_write(d, {"c.json": json_bytes((COCO, [("replace", 0.16156634101904224, [[0, 0]])], []))})),
        r"c\.json: categories\[0\]: id \[\[0, 0\]\] is not a number or a string"),
    # RLE counts that nest -> ValueError: inhomogeneous shape
    "coco-rle-counts-nested": (
        lambda d: read(_write(d, {"c.json": json_bytes((COCO, [("replace", 0.7598571034789234, [[0, 0]])], []))})),
        r"c\.json: annotation id 2: RLE counts are not a (flat )?list of integers"),
    # {"type": {"x": 1}} -> TypeError: unhashable type: 'dict' in format detection
    "geojson-type-is-an-object": (
        lambda d: read(_write(d, {"a.geojson": json_bytes((GEOJSON, [("replace", 0.0, {"x": 1})], []))})),
        r"a\.geojson: unknown JSON annotation format"),
    # a RoiSet.zip whose local header offset points past the end -> OSError: [Errno 22] Invalid argument
    "roiset-entry-past-the-end": (
        lambda d: read(_write(d, {"RoiSet.zip": roiset_zip((("line.roi", [(10, 222)], []), True, [("delete", 52, 4)]))})),
        r"RoiSet\.zip: (ROI '[a-z]+\.roi': corrupt zip entry|corrupt zip archive)"),
    # a TIFF label image whose header claims 0 x 1,229,520,928 pixels -> a 30 s hang tracing it
    "label-without-pixels": (
        lambda d: read(_write(d, label_files(("tif", [], False, [], [("duplicate", 0, 20), ("duplicate", 20, 54),
                                                                      ("duplicate", 0.779698872425419, 20)])))),
        r"l\.tif: label image of shape \(0, 1229520928\) has no pixels"),
    # a PNG label image whose header claims 2**31 - 1 x 24 pixels: refused before decoding
    "label-decompression-bomb": (
        lambda d: read(_write(d, {"l.png": set_header_size("png", label_files(("png", [], False, [], []))["l.png"],
                                                           ("width", 2**31 - 1))})),
        r"l\.png: label image of 2147483647 x 24 pixels .* over the limit of 1,073,741,824 pixels .*MAX_LABEL_PIXELS"),
    # .mat inst_type of dtype object -> ValueError: setting an array element with a sequence
    "mat-inst-type-object": (
        lambda d: read(_write(d, {"a.mat": mat_file(([("inst_type", ("dtype", "object"))], ["type_map"], True, []))})),
        r"a\.mat: inst_type has dtype object; expected integer types"),
    # a tiled TIFF whose width tag says 2**24: OpenSlide opens it and tiles millions of blank tiles (a hang)
    "slide-short-tile-table": (
        lambda d: open_slide(_write(d, dict([slide_file(("pyramid.tif", [("width", 2**24)], []))]))),
        (r"s\.tif: TIFF page 0: a 16777216 x 192 image in 64 x 64 tiles needs 786,432 tiles but the tile table "
         r"lists 12")),
    # ASAP vertex at 1e308 (finite): shapely's clipping overflowed and kept it, outside the slide
    "asap-coordinate-1e308": (
        lambda d: read(_write(d, {"a.xml": ASAP.replace('X="50" Y="50"', 'X="50" Y="1e308"').encode()}),
                       slide_size=SLIDE),
        r"a\.xml: Annotation 2 \(Annotation 2\): coordinate 1e\+308 is beyond ±9\.0072e\+15 pixels"),
    # an ImageScope ellipse (Type 2) whose box spans -1e308..1e308 -> OverflowError: cannot convert infinity
    "imagescope-ellipse-overflow": (
        lambda d: read(_write(d, {"a.xml": IMAGESCOPE.replace('<Vertex X="40" Y="40"/><Vertex X="50" Y="46"/>',
                                                              '<Vertex X="1e308" Y="40"/><Vertex X="-1e308" Y="46"/>')
                                  .encode()})),
        r"a\.xml: Annotation 1 Region 3: non-finite"),
    # a uint64 label image holding 2**64 - 1 (with a type map beside it) -> IndexError matching ids to types
    "label-uint64-max": (
        lambda d: read(_write(d, label_files(("npy", [("set", 0.5070049760220062, -1), ("dtype", "uint64")], True, [],
                                              [])))),
        r"l\.npy: label image holds labels above 2\*\*63 - 1 \(18446744073709551615\)"),
    # a .mat whose char array (inst_centroid as text) is cut short: scipy's C reader SEGFAULTED the interpreter
    "mat-char-array-cut-segfault": (
        lambda d: read(_write(d, {"a.mat": mat_file(([("inst_centroid", ("dtype", "U3"))], [], False,
                                                     [("delete", 0.5023409520758791, 6),
                                                      ("delete", 0.5023409520758791, 6)]))})),
        r"a\.mat: cannot read \.mat file: scipy's reader crashed on it \(exit code -11\); a corrupt file"),
    # an XML declaration naming an encoding Python lacks -> LookupError from expat
    "xml-unknown-encoding": (
        lambda d: read(_write(d, {"a.xml": ASAP.replace('version="1.0"', 'version="1.0" encoding="utf-8f-8"').encode()})),
        r"a\.xml: unreadable XML: its encoding \(LookupError: unknown encoding: utf-8f-8\)"),
    "imagescope-unknown-encoding": (
        lambda d: read(_write(d, {"a.xml": b'<?xml version="1.0" encoding="bogus"?>' + IMAGESCOPE.encode()})),
        r"a\.xml: unreadable XML: its encoding"),
    # COCO RLE of size 3 x 4 with no counts -> ValueError: cannot reshape array of size 0
    "coco-rle-no-counts": (
        lambda d: read(_write(d, {"c.json": json_bytes((COCO, [("replace", 0.73, [])], []))})),
        r"c\.json: annotation id 2: RLE counts do not add up to 4x3"),
    # a composite ROI whose path holds NaN (a float header field set over it) -> ValueError from int(nan)
    "roi-composite-nan": (
        lambda d: read(_write(d, {"a.roi": roi_file(("composite.roi", [(15, math.nan)], []))})),
        r"a\.roi: ROI 0 \(a\.roi\): non-finite"),
    # a class map keyed by "³" (str.isdigit() is True, int() refuses it) -> ValueError
    "class-map-superscript-digit": (
        lambda d: read_class_map({"³": "Epithelial"}, source=d / "report.json"),
        r"report\.json: .*neither \{type id: name\} nor \{name: type id\}"),
    # patch set: a truncated report.json -> JSONDecodeError from PatchSet.report
    "patchset-report-truncated": (
        lambda d: read_patchset(_patchset_dir(d, ([], [("report.json", [("truncate", 92)])]))).report,
        r"report\.json: unreadable report\.json"),
    # patch set: a cut-off .npy header -> EOFError / tokenize.TokenError from np.load
    "patchset-npy-header-cut": (
        lambda d: read_patchset(_patchset_dir(d, ([], [("types.npy", [("duplicate", 54, 4), ("truncate", 0)])]))),
        r"set: unreadable types\.npy"),
    # patch set: an empty x cell -> a NaN position that stages compute with (and "abc": a string position)
    "patchset-index-x-empty": (
        lambda d: read_patchset(_patchset_dir(d, ([("cell", 2, "x", "")], []))),
        r"set: index\.csv column 'x' holds an empty cell for patch 2; expected finite numbers"),
}


def _patchset_dir(workdir: Path, case: tuple) -> Path:
    d = workdir / "set"
    d.mkdir()
    for name, data in patchset_files(case).items():
        (d / name).write_bytes(data)
    return d


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fuzz_finding_is_refused_by_name(tmp_path, name):
    call, message = REGRESSIONS[name]
    with pytest.raises(HistosynthError, match=message) as err:
        call(tmp_path)
    refused_by_name(err.value, tmp_path)


def test_patchset_huge_integer_position_is_read_as_a_number(tmp_path):
    """An index cell too large for int64 (read as text by pandas) comes back as a number, not a string."""
    ps = read_patchset(_patchset_dir(tmp_path, ([("cell", 1, "y", "99999999999999999999999")], [])))
    assert pd.api.types.is_numeric_dtype(ps.index["y"]) and ps.index["y"][1] == 1e23


# --------------------------------------------------------------------------- #
# The table of docs/robustness.md: every row run, through the CLI for the stages
# --------------------------------------------------------------------------- #

_GOOD = [_feature(_square(10, 10, 20), "Tumour"), _feature(_square(150, 20, 20), "Tumour"),
         _feature(_square(250, 120, 20), "Tumour")]


def _fc(features: list) -> bytes:
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


_BOMB = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">]>'
         b'<Annotations><Annotation Name="&lol2;"/></Annotations>')

#: row -> annotation file (name, bytes) for the reader and rasterize columns of the table
ANNOTATION_ROWS: dict[str, tuple[str, bytes]] = {
    "truncated file": ("a.geojson", _fc(_GOOD)[:-40]),
    "byte flip (structural)": ("a.geojson", _fc(_GOOD).replace(b"[", b"{", 3)),
    "wrong JSON types": ("a.geojson", _fc([*_GOOD, {"type": "Feature", "properties": {},
                                                    "geometry": {"type": "Polygon", "coordinates": {"x": 1}}}])),
    "string coordinates": ("a.geojson", _fc([*_GOOD, _feature([[[0, 0], [4, "0"], [4, 4], [0, 0]]], "Tumour")])),
    "NaN coordinate": ("a.geojson", _fc(_GOOD)[:-2] + b', {"type": "Feature", "properties": {}, "geometry": '
                       b'{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 1], [2, 2], [0, 0]]]}}]}'),
    "infinite coordinate": ("a.geojson", _fc(_GOOD)[:-2] + b', {"type": "Feature", "properties": {}, "geometry": '
                            b'{"type": "Polygon", "coordinates": [[[0, 0], [1e999, 1], [2, 2], [0, 0]]]}}]}'),
    "huge coordinates (1e300), one of four": ("a.geojson", _fc([*_GOOD, _feature(
        [[[1e300, 1e300], [2e300, 1e300], [2e300, 2e300], [1e300, 1e300]]], "Tumour")])),
    "polygon partly outside the slide": ("a.geojson", _fc([*_GOOD, _feature(_square(390, 190, 20), "Tumour")])),
    "all polygons outside the slide": ("a.geojson", _fc([_feature(_square(1000 + 30 * k, 1000, 20), "Tumour")
                                                         for k in range(3)])),
    "only points": ("a.geojson", _fc([_feature([5 + k, 5], "Tumour", gtype="Point") for k in range(3)])),
    "no features": ("a.geojson", _fc([])),
    "empty file": ("a.geojson", b""),
    "unknown class": ("a.geojson", _fc([*_GOOD, _feature(_square(60, 60, 10), "Mitosis")])),
    "self-intersecting polygon": ("a.geojson", _fc([*_GOOD, _feature(
        [[[200, 50], [230, 80], [230, 50], [200, 80], [200, 50]]], "Tumour")])),
    "degenerate polygon": ("a.geojson", _fc([*_GOOD, _feature([[[0, 0], [1, 1], [2, 2], [0, 0]]], "Tumour")])),
    "too many vertices": ("a.geojson", _fc([*_GOOD, _feature([[[50 + 10 * math.cos(t), 50 + 10 * math.sin(t)]
                                                               for t in np.linspace(0, 2 * np.pi, 1_000_001)]],
                                                             "Tumour")])),
    "too-deep JSON": ("a.json", _deep(65)),
    "XML entity bomb": ("a.xml", _BOMB),
    "label image with a decompression-bomb header": ("l.png", set_header_size(
        "png", label_files(("png", [], False, [], []))["l.png"], ("width", 2**31 - 1))),
}

#: row -> (outcome, what the reader does, what rasterize does): "error:<regex>", "repaired:<report key>", "accepted"
ANNOTATION_OUTCOMES = {
    "truncated file": ("error:malformed JSON", "error:malformed JSON"),
    "byte flip (structural)": ("error:malformed JSON", "error:malformed JSON"),
    "wrong JSON types": ("error:feature 3: malformed Polygon coordinates",) * 2,
    "string coordinates": ("error:feature 3: .*not a number",) * 2,
    "NaN coordinate": ("error:feature 3: non-finite",) * 2,
    "infinite coordinate": ("error:feature 3: non-finite",) * 2,
    "huge coordinates (1e300), one of four": ("error:feature 3: coordinate 2e\\+300 is beyond",) * 2,
    "polygon partly outside the slide": ("repaired:clipped", "repaired:clipped"),
    "all polygons outside the slide": ("repaired:outside_slide",
                                       "error:all 3 items of the annotation file were dropped \\(3 [a-z ]*outside"),
    "only points": ("repaired:skipped_not_polygon", "error:all 3 items .* dropped \\(3 not polygons"),
    "no features": ("accepted", "error:holds no annotations"),
    "empty file": ("error:empty annotation file",) * 2,
    "unknown class": ("accepted", "error:(?i)unknown class.*mitosis"),
    "self-intersecting polygon": ("repaired:repaired_invalid",) * 2,
    "degenerate polygon": ("repaired:skipped_degenerate",) * 2,
    "too many vertices": ("error:feature 3: an outline of 1,000,001 vertices is over the limit of 1,000,000",) * 2,
    "too-deep JSON": ("error:JSON nested more than 64 levels deep",) * 2,
    "XML entity bomb": ("error:refusing unsafe XML",) * 2,
    "label image with a decompression-bomb header": ("error:over the limit of 1,073,741,824 pixels",) * 2,
}


def _expect(outcome: str, code: int, message: str, report: dict | None) -> None:
    kind, _, detail = outcome.partition(":")
    if kind == "error":
        assert code == 2 and re.search(detail, message), (code, message)
    else:
        assert code == 0, message
        if kind == "repaired":
            assert report is not None and report.get(detail, 0) > 0, report


@pytest.mark.parametrize("row", sorted(ANNOTATION_ROWS))
def test_robustness_table_annotations(tmp_path, capsys, row):
    """The reader and the rasterize stage (its CLI) on each input class; a refusal leaves no output."""
    from histosynth.cli import main

    name, data = ANNOTATION_ROWS[row]
    path = tmp_path / name
    path.write_bytes(data)
    reader, stage = ANNOTATION_OUTCOMES[row]
    try:
        s = read(path, slide_size=(400, 200))
        code, message, report = 0, "", s.report
    except HistosynthError as err:
        code, message, report = 2, str(err), None
    _expect(reader, code, message, report)
    out = tmp_path / "out" / "patches"
    code = main(["rasterize", str(path), str(tiles_dir()), str(out), "--classes", "Tumour=1"])
    message = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())["parse"] if code == 0 else None
    _expect(stage, code, message, report)
    if code:
        assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == [], "a refusal left output"


SLIDE_ROWS = {
    "truncated file": (("png", [], [("truncate", 0.5)]), "error:(OpenCV cannot decode|not an image)"),
    "byte flip in the header": (("png", [], [("flip", 12, 0)]), "error:not an image"),
    "decompression-bomb header": (("png", [("width", 2**31 - 1)], []), "error:header claims 2147483647 x 64 pixels"),
    "corrupt TIFF (tile table shorter than the image)": (("pyramid.tif", [("width", 2**24)], []),
                                                         "error:needs 786,432 tiles but the tile table lists 12"),
    "corrupt TIFF (cut in its tags)": (("tif", [], [("truncate", 60)]), "error:not a readable TIFF"),
}


@pytest.mark.parametrize("row", sorted(SLIDE_ROWS))
def test_robustness_table_tile(tmp_path, capsys, row):
    """The tile stage (its CLI) on damaged images: a named error and no output."""
    from histosynth.cli import main

    case, outcome = SLIDE_ROWS[row]
    name, data = slide_file(case)
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "out" / "tiles"
    code = main(["tile", str(tmp_path / name), str(out), "--size", "32", "--mpp-fallback", "0.5"])
    _expect(outcome, code, capsys.readouterr().err, None)
    assert not out.exists()


def test_robustness_table_corrupt_patch_set_index(tmp_path, capsys):
    """rasterize on a tile set whose index.csv is damaged: a named error and no output."""
    from histosynth.cli import main

    tiles = tmp_path / "tiles"
    shutil.copytree(tiles_dir(), tiles)
    text = (tiles / "index.csv").read_text().splitlines()
    text[2] = "s,abc" + text[2][text[2].index(",", 2):]  # the x of patch 1
    (tiles / "index.csv").write_text("\n".join(text) + "\n")
    ann = tmp_path / "a.geojson"
    ann.write_bytes(_fc(_GOOD))
    code = main(["rasterize", str(ann), str(tiles), str(tmp_path / "out"), "--classes", "Tumour=1"])
    assert code == 2 and "index.csv column 'x' holds 'abc' for patch 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tiles / "index.csv").write_bytes(b"slide,x,y\n\x00\x01")
    code = main(["rasterize", str(ann), str(tiles), str(tmp_path / "out"), "--classes", "Tumour=1"])
    assert code == 2 and "index.csv" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_robustness_table_too_large_file(tmp_path, capsys):
    """An annotation file over 2 GiB (a sparse file: no disk used) is refused from its size, by reader and stage."""
    from histosynth.cli import main

    path = tmp_path / "big.geojson"
    with open(path, "wb") as f:
        f.write(_fc(_GOOD))
        f.truncate(2**31 + 1)
    with pytest.raises(HistosynthError, match=r"big\.geojson: annotation file of 2,147,483,649 bytes is over the "
                                              r"limit of 2,147,483,648 bytes"):
        read(path)
    code = main(["rasterize", str(path), str(tiles_dir()), str(tmp_path / "out"), "--classes", "Tumour=1"])
    assert code == 2 and "over the limit" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_robustness_table_vertex_limit_through_the_stage(tmp_path, capsys):
    """rasterize --max-vertices (rasterize.max_vertices): an outline over it stops the stage by name, no output."""
    from histosynth.cli import main

    ann = tmp_path / "a.geojson"
    ann.write_bytes(_fc(_GOOD))
    out = tmp_path / "out"
    code = main(["rasterize", str(ann), str(tiles_dir()), str(out), "--classes", "Tumour=1", "--max-vertices", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "vertices is over the limit of 4" in err and "--max-vertices" in err and not out.exists()
    assert main(["rasterize", str(ann), str(tiles_dir()), str(out), "--classes", "Tumour=1",
                 "--max-vertices", "5"]) == 0


def test_coco_infinite_image_width_is_an_unknown_size(tmp_path):
    """Fuzz finding: a COCO image of width Infinity raised OverflowError; its size is now unknown (as for NaN)."""
    p = _write(tmp_path, {"c.json": json.dumps({**COCO, "images": [{**COCO["images"][0], "width": math.inf}]}).encode()})
    s = read(p)
    assert s.image_size is None and s.report["kept"] == 2


@pytest.mark.parametrize("target, case", [
    # a flipped tag type makes tifffile return a tuple for ImageWidth: TypeError in the tile-table check
    ("slide", ("pyramid.tif", [], [("flip", 38, 2)])),
    ("tile", ("pyramid.tif", [], [("flip", 38, 2)])),
    # a flip in the XResolution tag's count: a tuple of four values, "too many values to unpack" reading the MPP
    ("slide", ("pyramid.tif", [("width", 16777216)], [("flip", 98, 242)])),
])
def test_fuzz_finding_now_satisfies_the_property(target, case):
    run_case(TARGETS[target], case)
