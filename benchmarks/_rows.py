"""What the benchmarks with named rows share (gan.py, migan.py): picking rows by name or group, and a
steady per-step time. Imported as ``_rows`` by scripts run as ``python benchmarks/NAME.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def select_rows(configs: Sequence[Mapping[str, Any]], groups: Mapping[str, Sequence[str]],
                defaults: Mapping[str, Any], names: Sequence[str] | None, default: str) -> list[dict[str, Any]]:
    """The rows ``names`` picks (row names or group names), in the order given, each completed with
    ``defaults``; no names: the group ``default``. An unknown name stops the script with the choices."""
    by_name = {c["name"]: c for c in configs}
    picked: list[str] = []
    for name in names or [default]:
        for n in groups.get(name, [name]):
            if n not in by_name:
                raise SystemExit(f"unknown config {n!r}; choose from {', '.join([*by_name, *groups])}")
            if n not in picked:
                picked.append(n)
    return [{**defaults, **by_name[n]} for n in picked]


def steady(seconds: Sequence[float], drop_last: bool) -> float:
    """Median per-step seconds without the first step (and the last, when ``drop_last``), as long as a step
    is left."""
    s = list(seconds)
    if len(s) > 1:
        s = s[1:]
    if drop_last and len(s) > 1:
        s = s[:-1]
    return float(np.median(s))


def sync(dev) -> None:
    """Wait for the device (CUDA) before reading the clock; nothing on the CPU."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_result(times: Sequence[float], G, D) -> dict[str, Any]:
    """A bare loop's row: steady s/iter and the parameter counts of its generator and discriminator."""
    return {"s_per_iter": steady(times, drop_last=False),
            "params_G": sum(p.numel() for p in G.parameters()), "params_D": sum(p.numel() for p in D.parameters())}
