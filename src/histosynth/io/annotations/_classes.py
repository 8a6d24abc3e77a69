"""Class names: normalisation, known prefixes, and the mapping onto ``class_map`` type ids."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError

CLASS_PREFIXES = ("nuclei_", "nucleus_", "cell_")


def normalise_class_name(name: Any) -> str:
    """White space trimmed and case-folded."""
    return " ".join(str(name).split()).casefold()


def strip_prefix(n: str) -> str:
    """``n`` without a known prefix (:data:`CLASS_PREFIXES`), when something is left."""
    for p in CLASS_PREFIXES:
        if n.startswith(p) and len(n) > len(p):
            return n[len(p) :]
    return n


class ClassMapper:
    def __init__(self, class_map: Mapping[str, int] | None, catch_all: str | int | None, path: Path):
        self.path = path
        self.map = None
        self.catch: tuple[str, int] | None = None
        if class_map is None:
            return
        lookup: dict[str, tuple[str, int]] = {}
        for key, tid in class_map.items():
            if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)) or int(tid) < 1:
                raise HistosynthError(
                    f"class_map[{key!r}] = {tid!r}: type ids must be integers >= 1 (0 is background)", path
                )
            k = normalise_class_name(key)
            if k in lookup and lookup[k][1] != int(tid):
                raise HistosynthError(
                    f"class_map has {lookup[k][0]!r} and {key!r} (same name) with different type ids", path
                )
            lookup.setdefault(k, (str(key), int(tid)))
        self.map = lookup
        if catch_all is not None:
            if isinstance(catch_all, str):
                hit = self._match(catch_all)
                if hit is None:
                    raise HistosynthError(f"catch_all {catch_all!r} is not a class in class_map", path)
                self.catch = hit
            elif (
                isinstance(catch_all, (int, np.integer))
                and not isinstance(catch_all, bool)
                and catch_all >= 1
            ):
                names = sorted({v[0] for v in lookup.values() if v[1] == int(catch_all)})
                self.catch = (names[0] if len(names) == 1 else str(int(catch_all)), int(catch_all))
            else:
                raise HistosynthError(f"catch_all {catch_all!r} must be a class name or a type id >= 1", path)

    def _match(self, raw: str) -> tuple[str, int] | None:
        assert self.map is not None
        n = normalise_class_name(raw)
        hit = self.map.get(n)
        if hit is None:
            s = strip_prefix(n)
            if s != n:
                hit = self.map.get(s)
        return hit

    def resolve(self, raw_names: list[str], report: Counter) -> tuple[list[str], list[int], list[str]]:
        """(class_name, type_id, source name) per item; raises on unknown names."""
        unknown: Counter = Counter()
        table: dict[str, tuple[str, int, str]] = {}
        for raw, count in Counter(raw_names).items():  # each distinct name once
            src = strip_prefix(normalise_class_name(raw))
            if self.map is None:
                table[raw] = (src, 1, src)
                continue
            hit = self._match(raw)
            if hit is not None:
                table[raw] = (hit[0], hit[1], src)
            elif self.catch is None:
                unknown[src] += count
            else:
                report["catch_all"] += count
                table[raw] = (self.catch[0], self.catch[1], src)
        if unknown:
            listing = ", ".join(
                f"{n!r} ({c})" + (" [no class name in the file]" if n == "" else "")
                for n, c in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
            )
            raise HistosynthError(
                f"unknown class names: {listing}; add them to classes in config.yaml or set catch_all",
                self.path,
            )
        rows = list(map(table.__getitem__, raw_names))
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
