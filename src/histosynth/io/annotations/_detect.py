"""Format detection: the file's content first, its extension second."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from histosynth.errors import HistosynthError
from histosynth.io.annotations._xml import xml_events, xml_root_tag
from histosynth.io.annotations.imagej import zip_has_roi
from histosynth.io.annotations.points import points_container

_EXT_FORMATS = {
    ".geojson": "geojson",
    ".json": "json",
    ".xml": "xml",
    ".mat": "mat",
    ".npy": "label",
    ".png": "label",
    ".tif": "label",
    ".tiff": "label",
    ".roi": "imagej",
    ".zip": "imagej",
}
_GEOJSON_TYPES = {"FeatureCollection", "Feature", "Polygon", "MultiPolygon"}

#: the largest annotation file read (2 GiB): JSON is parsed whole, to about ten times its size in memory
MAX_ANNOTATION_BYTES = 2**31
#: the deepest JSON nesting read; GeoJSON needs 8 levels (collection, feature, geometry, multipolygon, ring, point)
MAX_JSON_DEPTH = 64
#: the largest coordinate magnitude read (2**53, where float64 stops holding every integer): far beyond any
#: slide, and small enough that areas and intersections cannot overflow (1e308 breaks shapely's clipping)
MAX_COORDINATE = float(2**53)
#: the most vertices one outline may have (holes included); a nucleus needs tens to a few thousand
MAX_VERTICES = 1_000_000
# +1 for an opening bracket or brace, -1 for a closing one, 2 for a quote, 0 for any other byte
_JSON_BYTES = np.zeros(256, dtype=np.int8)
_JSON_BYTES[[ord("["), ord("{")]] = 1
_JSON_BYTES[[ord("]"), ord("}")]] = -1
_JSON_BYTES[ord('"')] = 2


def check_file(path: Path) -> None:
    if not path.exists():
        raise HistosynthError("annotation file not found", path)
    if not path.is_file():
        raise HistosynthError("not a regular file", path)
    size = path.stat().st_size
    if size == 0:
        raise HistosynthError("empty annotation file", path)
    if size > MAX_ANNOTATION_BYTES:
        raise HistosynthError(
            f"annotation file of {size:,} bytes is over the limit of {MAX_ANNOTATION_BYTES:,} bytes "
            "for an annotation file; split it (e.g. by region)",
            path,
        )


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, brackets inside strings not counted.

    Vectorised over the bytes (no parsing, no recursion; about a tenth of the
    time ``orjson.loads`` takes): a quote that is not escaped (preceded by an
    even number of backslashes) opens or closes a string, and a bracket lies
    inside a string when an odd number of such quotes precede it. Meaningful
    for well-formed JSON; for other text it is only a number, and the parser
    reports the text.
    """
    b = np.frombuffer(raw, dtype=np.uint8)
    code = _JSON_BYTES[b]
    at = np.flatnonzero(code)  # the brackets and quotes, in order
    kind = code[at]
    quote = kind == 2
    after = at[quote & (at > 0)]
    after = after[b[after - 1] == ord("\\")]
    if after.size:  # quotes after a backslash: escaped when the run of backslashes before them is odd
        slashes = np.flatnonzero(b == ord("\\"))
        new_run = np.ones(slashes.size, dtype=bool)
        new_run[1:] = np.diff(slashes) != 1
        run_start = slashes[new_run]
        start = run_start[np.searchsorted(run_start, after - 1, side="right") - 1]
        quote[np.searchsorted(at, after[(after - start) % 2 == 1])] = False
    inside = (np.cumsum(quote, dtype=np.int64) & 1).astype(bool)
    kind[quote | inside] = 0
    return int(np.cumsum(kind, dtype=np.int64).max(initial=0))


def load_json(path: Path) -> Any:
    raw = path.read_bytes()
    if not raw or raw.isspace():  # (raw.strip() would copy the whole file)
        raise HistosynthError("empty annotation file", path)
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise HistosynthError(
            f"JSON nested more than {MAX_JSON_DEPTH} levels deep (the limit; GeoJSON needs 8): "
            "not an annotation file (a corrupt or hostile one?)",
            path,
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # the standard library accepts NaN/Infinity literals: let the reader name the item
        import json

        try:
            return json.loads(raw.decode("utf-8-sig"))
        except (ValueError, UnicodeDecodeError):
            pass
        raise HistosynthError(f"malformed JSON: {exc}", path) from None


def classify_json(data: Any) -> str | None:
    if isinstance(data, dict):
        if isinstance(data.get("type"), str) and data["type"] in _GEOJSON_TYPES:
            return "geojson"
        if isinstance(data.get("annotations"), list) and ("categories" in data or "images" in data):
            return "coco"
    elif isinstance(data, list):
        if not data:
            return "geojson"  # an empty feature list: an empty set
        first = data[0]
        if isinstance(first, dict) and (first.get("type") == "Feature" or "geometry" in first):
            return "geojson"
    if points_container(data) is not None:
        return "points_json"
    return None


def detect(path: Path) -> tuple[str, Any]:
    """(format, parsed JSON or None)."""
    check_file(path)
    head = read_bytes_limited(path, 65536)
    if head.startswith(b"PK\x03\x04"):
        if zip_has_roi(path):
            return "imagej", None
        raise HistosynthError("zip archive without .roi entries (or corrupt): not an ImageJ RoiSet", path)
    if head.startswith(b"Iout"):
        return "imagej", None
    if head.startswith((b"\x89PNG", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x93NUMPY")):
        return "label", None
    if head.startswith(b"MATLAB") or head[512:520] == b"\x89HDF\r\n\x1a\n":
        return "mat", None
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        raise HistosynthError("empty annotation file", path)
    ext = _EXT_FORMATS.get(path.suffix.lower())
    is_xml, is_json = text[:1] == b"<", text[:1] in (b"{", b"[")
    if is_xml or (ext == "xml" and not is_json):
        root = xml_root_tag(text)
        if root == "ASAP_Annotations":
            return "asap", None
        if root == "Annotations":
            return "imagescope", None
        # not one of ours: let defusedxml refuse DTDs/entities or report malformed XML first
        for _ in xml_events(path):
            pass
        raise HistosynthError(f"unknown XML annotation format (root element <{root}>)", path)
    if is_json or ext in ("json", "geojson"):
        data = load_json(path)
        kind = classify_json(data)
        if kind is None:
            raise HistosynthError(
                "unknown JSON annotation format (not GeoJSON, COCO or a list of boundary points)", path
            )
        return kind, data
    if ext in ("label", "mat", "imagej"):
        return ext, None
    raise HistosynthError("unknown annotation format (content and extension not recognised)", path)


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS`, from the file's content first and its extension second."""
    return detect(Path(path))[0]


def read_bytes_limited(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)
