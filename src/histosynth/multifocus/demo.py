"""Demo z-stacks: small multi-focus OME-TIFFs of cytology-like cells in a thick section, with their truth.

Each slide is a field of round-to-oval cells (a dark, textured nucleus in a pale cytoplasm) on a light
background, scattered without overlap, each at its own depth ``z_cell`` drawn uniformly over the middle 90 %
of the stack's range. Plane ``k`` sits at the focal offset ``(k - (Z - 1) / 2) * spacing`` µm (centred on
the middle plane, as :mod:`.zstack` reads them back).

**Defocus model**: a Gaussian point-spread function whose width grows linearly with the distance from focus,

    sigma(z) = SIGMA_FOCUS_UM + SIGMA_SLOPE * |z - z_cell|     (µm; divided by the MPP for pixels)

(0.1 µm in focus, +0.5 µm per µm of defocus: a cell 4 µm out of focus is blurred by 2.1 µm, ~8 px at 0.25
µm/px). Each cell is drawn as an attenuation map ``1 - exp(-OD)`` (Beer-Lambert, per RGB channel), blurred
with its own sigma in each plane (incoherent light blurs intensity), and the cells' transmittances multiply
onto the background. A little Gaussian sensor noise (σ = 1 grey level) is added per plane. Everything is
drawn from ``numpy.random.default_rng([seed, slide])``: the same seed gives the same files.

Outputs (each written atomically): ``zstack-NN.ome.tif`` (Z x H x W x 3, tiled, OME ``PhysicalSizeX/Y/Z``),
``cells.csv`` (the truth: ``slide, x, y, z_um, best_plane, radius_px``; ``best_plane`` the plane nearest the
cell's depth) and ``preview.png`` (the first slide's lowest, middle and highest plane side by side).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile

from histosynth.io.atomic import atomic_csv, atomic_write

log = logging.getLogger(__name__)

SIGMA_FOCUS_UM = 0.1
SIGMA_SLOPE = 0.5
BACKGROUND_RGB = np.array([243.0, 240.0, 246.0])
NUCLEUS_OD = np.array([0.60, 0.85, 0.30])  # haematoxylin-like: a purple-blue nucleus
CYTOPLASM_OD = np.array([0.06, 0.22, 0.10])  # a faint pink cytoplasm
NOISE_GREY = 1.0


def plane_offsets(planes: int, spacing_um: float) -> list[float]:
    """Focal offsets (µm) of ``planes`` planes ``spacing_um`` apart, centred on the middle plane."""
    return [round((k - (planes - 1) / 2) * spacing_um, 6) for k in range(planes)]


def defocus_sigma_px(dz_um: float, mpp: float) -> float:
    """The Gaussian PSF's sigma (pixels) at ``dz_um`` µm from a cell's focus (see the module's docstring)."""
    return (SIGMA_FOCUS_UM + SIGMA_SLOPE * abs(dz_um)) / mpp


def _place_cells(rng: np.random.Generator, size: tuple[int, int], n_cells: int, mpp: float) -> list[dict]:
    """Non-overlapping cells (rejection sampling; fewer than asked when the field is full)."""
    w, h = size
    cells: list[dict] = []
    for _ in range(n_cells * 30):
        if len(cells) == n_cells:
            break
        r = rng.uniform(5.0, 7.5) / mpp  # cell radius, 5-7.5 µm
        x, y = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        if any((x - c["x"]) ** 2 + (y - c["y"]) ** 2 < (r + c["r"] + 2) ** 2 for c in cells):
            continue
        cells.append({"x": x, "y": y, "r": r})
    return cells


def _cell_od(rng: np.random.Generator, cell: dict, half: int) -> np.ndarray:
    """Optical density (2*half+1, 2*half+1, 3) of one cell centred in its window."""
    n = 2 * half + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    dx, dy = xx - (cell["x"] - round(cell["x"])), yy - (cell["y"] - round(cell["y"]))
    r = cell["r"]
    # cytoplasm: a slightly oval disc with a soft edge
    ca, cb, ct = r, r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi)
    u, v = dx * np.cos(ct) + dy * np.sin(ct), -dx * np.sin(ct) + dy * np.cos(ct)
    cyto = np.clip(1.0 - np.sqrt((u / ca) ** 2 + (v / cb) ** 2), 0, None)
    cyto = np.clip(cyto * 6, 0, 1)
    # nucleus: an off-centre ellipse, 35-50 % of the cell radius, with granular chromatin
    na = r * rng.uniform(0.35, 0.5)
    nb, nt = na * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
    ox, oy = rng.uniform(-0.15, 0.15, 2) * r
    u, v = (dx - ox) * np.cos(nt) + (dy - oy) * np.sin(nt), -(dx - ox) * np.sin(nt) + (dy - oy) * np.cos(nt)
    nuc = np.clip((1.0 - np.sqrt((u / na) ** 2 + (v / nb) ** 2)) * 8, 0, 1)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (n, n)), (0, 0), 1.0)
    grain = 0.75 + 0.9 * np.clip(grain / (grain.std() + 1e-9), -1.5, 1.5) / 3
    cyto_tex = 0.8 + 0.2 * cv2.GaussianBlur(rng.uniform(0, 1, (n, n)), (0, 0), 3.0)
    strength = rng.uniform(0.8, 1.2)
    od = (cyto * cyto_tex)[..., None] * CYTOPLASM_OD + (nuc * grain)[..., None] * NUCLEUS_OD * 1.6 * strength
    return od


def render_zstack(size: tuple[int, int], planes: int, spacing_um: float, mpp: float, n_cells: int,
                  seed: int, slide: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """One demo z-stack: uint8 (Z, H, W, 3) and its cells (``x, y, z_um, best_plane, radius_px``)."""
    rng = np.random.default_rng([seed, slide])
    w, h = size
    offsets = np.asarray(plane_offsets(planes, spacing_um))
    lo, hi = offsets[0], offsets[-1]
    span = hi - lo
    cells = _place_cells(rng, size, n_cells, mpp)
    transmit = np.ones((planes, h, w, 3), np.float32)
    rows = []
    for cell in cells:
        z_cell = rng.uniform(lo + 0.05 * span, hi - 0.05 * span) if planes > 1 else 0.0
        max_sigma = defocus_sigma_px(max(abs(z_cell - lo), abs(z_cell - hi)), mpp)
        half = int(np.ceil(cell["r"] + 3 * max_sigma + 2))
        atten = (1.0 - np.exp(-_cell_od(rng, cell, half))).astype(np.float32)
        cx, cy = int(round(cell["x"])), int(round(cell["y"]))
        # the window on the slide and the matching part of the cell's own window
        x0, y0, x1, y1 = max(cx - half, 0), max(cy - half, 0), min(cx + half + 1, w), min(cy + half + 1, h)
        sx, sy = x0 - (cx - half), y0 - (cy - half)
        for k, z in enumerate(offsets):
            blurred = cv2.GaussianBlur(atten, (0, 0), defocus_sigma_px(z - z_cell, mpp),
                                       borderType=cv2.BORDER_CONSTANT)
            transmit[k, y0:y1, x0:x1] *= 1.0 - blurred[sy : sy + (y1 - y0), sx : sx + (x1 - x0)]
        rows.append({"x": cx, "y": cy, "z_um": round(float(z_cell), 4),
                     "best_plane": int(np.argmin(np.abs(offsets - z_cell))), "radius_px": round(cell["r"], 2)})
    image = transmit * BACKGROUND_RGB + rng.normal(0, NOISE_GREY, transmit.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), pd.DataFrame(
        rows, columns=["x", "y", "z_um", "best_plane", "radius_px"])


def write_ome_zstack(path: str | os.PathLike, stack: np.ndarray, mpp: float, spacing_um: float | None) -> None:
    """Write (Z, H, W, 3) uint8 as a tiled OME-TIFF with ``PhysicalSizeX/Y`` (and ``Z``), atomically."""
    metadata: dict = {"axes": "ZYXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                      "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    if spacing_um is not None:
        metadata.update(PhysicalSizeZ=spacing_um, PhysicalSizeZUnit="µm")

    def write(tmp: Path) -> None:
        tifffile.imwrite(tmp, stack, photometric="rgb", tile=(256, 256), compression="zlib", ome=True,
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=metadata)

    atomic_write(path, write)


def make_demo_zstacks(out_dir: str | os.PathLike, *, n_slides: int = 2, size: tuple[int, int] = (1024, 1024),
                      planes: int = 11, spacing_um: float = 1.0, mpp: float = 0.25, n_cells: int = 60,
                      seed: int = 0) -> pd.DataFrame:
    """Write ``n_slides`` demo z-stacks and ``cells.csv`` to ``out_dir``; returns the cells table."""
    from histosynth.errors import HistosynthError

    if planes < 2:
        raise HistosynthError(f"a demo z-stack needs at least 2 planes, got {planes}")
    if spacing_um <= 0 or mpp <= 0 or n_slides < 1 or n_cells < 1 or min(size) < 64:
        raise HistosynthError("demo z-stacks need positive spacing, mpp, slides and cells and sides of 64+ px")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    preview = None
    for i in range(n_slides):
        name = f"zstack-{i:02d}"
        stack, cells = render_zstack(tuple(size), planes, spacing_um, mpp, n_cells, seed, slide=i)
        write_ome_zstack(out / f"{name}.ome.tif", stack, mpp, spacing_um)
        tables.append(cells.assign(slide=name))
        if preview is None:
            preview = np.concatenate([stack[0], stack[planes // 2], stack[-1]], axis=1)
        log.info("wrote %s: %d cells, %d planes %.3g um apart", name, len(cells), planes, spacing_um)
    table = pd.concat(tables, ignore_index=True)[["slide", "x", "y", "z_um", "best_plane", "radius_px"]]
    atomic_csv(table, out / "cells.csv")
    assert preview is not None
    scale = min(1.0, 1536 / preview.shape[1])
    small = cv2.resize(preview, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else preview
    atomic_write(out / "preview.png",
                 lambda tmp: cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))[1].tofile(str(tmp)))
    return table
