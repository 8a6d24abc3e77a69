"""XML shared by ImageScope and ASAP: defusedxml/expat parsing that refuses DTDs and
entities, and coordinate strings converted to float64 in chunks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError

import numpy as np
import orjson

from histosynth.errors import HistosynthError
from histosynth.io.annotations._geometry import first_nonfinite, nonfinite_error


def _unsafe_xml(exc: Exception, path: Any) -> HistosynthError:
    """The one error for XML that declares a DTD, entities or external references."""
    return HistosynthError(
        f"refusing unsafe XML ({type(exc).__name__}: DTD/entity declarations are not allowed "
        "in annotation files)",
        path,
    )


def _bad_encoding(exc: Exception, path: Any) -> HistosynthError:
    """The one error for XML whose declared encoding is unknown or does not fit its bytes."""
    return HistosynthError(f"unreadable XML: its encoding ({type(exc).__name__}: {exc})", path)


def xml_events(path: Path):
    """defusedxml iterparse ("end" events) that refuses DTDs, entities, external refs."""
    import defusedxml
    from defusedxml.ElementTree import iterparse

    f = open(path, "rb")
    try:
        for ev in iterparse(f, forbid_dtd=True, forbid_entities=True, forbid_external=True):
            yield ev
    except ParseError as exc:
        line, col = getattr(exc, "position", (None, None))
        raise HistosynthError(f"malformed XML at line {line}, column {col}: {exc}", path) from None
    except defusedxml.DefusedXmlException as exc:
        raise _unsafe_xml(exc, path) from None
    except (LookupError, UnicodeError) as exc:  # an encoding the declaration names but Python lacks, or breaks
        raise _bad_encoding(exc, path) from None
    finally:
        f.close()


def to_floats(strings: list[str], path: Path, refs: list[str], lens: list[int], base: int = 0) -> np.ndarray:
    """Convert coordinate strings in one call; on failure name the offending item.

    orjson parses a JSON array of the numbers ~4x faster than ``float()`` per
    string; anything that is not a JSON number ("nan", "1,5", a missing
    attribute) falls back to a per-string pass that names the item. ``base`` is
    the index of ``strings[0]`` among all coordinate strings of the file.
    """
    try:
        vals = np.array(orjson.loads("[" + ",".join(strings) + "]"), dtype=np.float64)
        if vals.shape == (len(strings),):  # "1,5" (decimal comma) reads as two numbers
            return vals
    except (TypeError, ValueError, orjson.JSONDecodeError):
        pass
    vals = np.empty(len(strings))

    def item(j: int) -> str:
        return refs[int(np.searchsorted(np.cumsum(lens), (base + j) // 2, side="right"))]

    for j, s in enumerate(strings):
        if s is None:
            raise HistosynthError(f"{item(j)}: a vertex lacks its X or Y attribute", path)
        try:
            vals[j] = float(s)
        except (TypeError, ValueError):
            try:  # ASAP written under a decimal-comma locale
                vals[j] = float(str(s).replace(",", "."))
            except ValueError:
                raise HistosynthError(f"{item(j)}: coordinate {s!r} is not a number", path) from None
    return vals


class Coords:
    """Vertex coordinate strings, converted to float64 in chunks so memory stays bounded."""

    CHUNK = 1 << 17

    def __init__(self, path: Path):
        self.path = path
        self.refs: list[str] = []
        self.lens: list[int] = []
        self.buf: list[str] = []
        self.chunks: list[np.ndarray] = []
        self.base = 0

    def add(self, ref: str, strs: list[str]) -> None:
        self.refs.append(ref)
        self.lens.append(len(strs) // 2)
        self.buf.extend(strs)
        if len(self.buf) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.buf:
            self.chunks.append(to_floats(self.buf, self.path, self.refs, self.lens, self.base))
            self.base += len(self.buf)
            self.buf = []

    def rings(self) -> list[np.ndarray]:
        self._flush()
        vals = np.concatenate(self.chunks) if self.chunks else np.zeros(0)
        self.chunks = []
        rings = _rings_from_flat(vals, self.lens)
        bad = first_nonfinite(rings)
        if bad is not None:
            raise nonfinite_error(self.path, self.refs[bad])
        return rings


def _rings_from_flat(vals: np.ndarray, lens: list[int]) -> list[np.ndarray]:
    xy = vals.reshape(-1, 2)
    bounds = np.cumsum([0, *lens])
    return [xy[bounds[i] : bounds[i + 1]] for i in range(len(lens))]


def expat_parser(path: Path):
    """An expat parser that refuses DTDs, entity declarations and external references.

    The same guards as defusedxml's ``iterparse(..., forbid_dtd=True,
    forbid_entities=True, forbid_external=True)`` (its exception classes too),
    without ElementTree's per-element Python layer: the caller installs its own
    start/end handlers.
    """
    from xml.parsers import expat

    from defusedxml.common import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden

    def doctype(name, sysid, pubid, has_internal_subset):
        raise DTDForbidden(name, sysid, pubid)

    def entity_decl(name, is_parameter_entity, value, base, sysid, pubid, notation_name):
        raise EntitiesForbidden(name, value, base, sysid, pubid, notation_name)

    def unparsed_entity_decl(name, base, sysid, pubid, notation_name):
        raise EntitiesForbidden(name, None, base, sysid, pubid, notation_name)

    def external_entity_ref(context, base, sysid, pubid):
        raise ExternalReferenceForbidden(context, base, sysid, pubid)

    p = expat.ParserCreate(None, "}")  # namespace processing as in ElementTree
    p.StartDoctypeDeclHandler = doctype
    p.EntityDeclHandler = entity_decl
    p.UnparsedEntityDeclHandler = unparsed_entity_decl
    p.ExternalEntityRefHandler = external_entity_ref
    return p


def expat_run(p, path: Path, block: int = 1 << 20) -> None:
    """Feed ``path`` to ``p``; errors as :func:`xml_events` reports them."""
    from xml.parsers import expat

    import defusedxml

    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(block)
                if not data:
                    break
                p.Parse(data, False)
            p.Parse(b"", True)
    except expat.ExpatError as exc:
        raise HistosynthError(
            f"malformed XML at line {exc.lineno}, column {exc.offset}: {exc}", path
        ) from None
    except defusedxml.DefusedXmlException as exc:
        raise _unsafe_xml(exc, path) from None
    except (LookupError, UnicodeError) as exc:
        raise _bad_encoding(exc, path) from None


_XML_TAG = re.compile(rb"<([A-Za-z_][\w.:-]*)")


def xml_root_tag(head: bytes) -> str | None:
    """Name of the first element in an XML head (skips <?xml?>, comments, DOCTYPE)."""
    text = re.sub(rb"<!--.*?-->", b"", head, flags=re.S)
    m = _XML_TAG.search(text)
    return m.group(1).decode("ascii", "replace") if m else None
