"""Writing a demo slide: the pyramidal tiled JPEG TIFF (streamed band by band) and the nuclei GeoJSON.

Level 0 is rendered band by band and streamed into tifffile as tiles; each
band is also downsampled (2x2 area) into raw scratch files for the lower
levels, which are written afterwards.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import orjson
import tifffile

from histosynth.slides.demo.model import _Slide
from histosynth.slides.demo.nuclei import _CLASS_NAMES, CLASS_COLORS, _Nuclei


def _levels(width: int, height: int) -> list[tuple[int, int]]:
    levels = [(width, height)]
    while (max(levels[-1]) > 512 or len(levels) == 1) and min(levels[-1]) >= 128:
        w, h = levels[-1]
        levels.append((w // 2, h // 2))
    return levels


def _tiles_of(band: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    h, w = band.shape[:2]
    for r in range(0, h, tile):
        for c in range(0, w, tile):
            t = band[r : r + tile, c : c + tile]
            if t.shape[0] != tile or t.shape[1] != tile:
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
            yield np.ascontiguousarray(t)


def _write_tiff(
    slide: _Slide, path: Path, scratch: Path, tile: int, quality: int, description: str, bar: Any
) -> list[tuple[int, int]]:
    """Stream level 0 band by band into the TIFF, keeping 2x2-area downsampled
    copies of each band in raw scratch files, then write levels 1.. from those."""
    W, H = slide.W, slide.H
    levels = _levels(W, H)
    nl = len(levels)
    # bands: whole tile rows, divisible by every level's downsample, ~32 MB at most
    base = math.lcm(tile, 2 ** (nl - 1))
    bh = base * max(1, min(1024, 32_000_000 // (3 * W)) // base)
    cw = 1024
    raw = [scratch / f"{path.stem}.level{lv}.raw" for lv in range(nl)]
    common = dict(
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        resolution=(1e4 / slide.mpp, 1e4 / slide.mpp),
        resolutionunit="CENTIMETER",
        metadata=None,
        dtype=np.uint8,
        maxworkers=1,  # encode as tiles arrive: no 512 MB read-ahead buffer
    )
    bigtiff = W * H * 3 * 1.34 > 3.9e9

    def level0() -> Iterator[np.ndarray]:
        files = [open(p, "wb") for p in raw[1:]]
        try:
            for y in range(0, H, bh):
                h = min(bh, H - y)
                band = np.empty((h, W, 3), np.uint8)
                nb = slide.nuclei.bbox
                slide._band_idx = np.flatnonzero((nb[:, 1] < y + h + 4) & (nb[:, 3] > y - 4)) if len(nb) else None
                for x in range(0, W, cw):
                    band[:, x : x + cw] = slide.render(y, x, h, min(cw, W - x))
                slide._band_idx = None
                cur = band
                for lv in range(1, nl):
                    wl = levels[lv][0]
                    hl = cur.shape[0] // 2
                    if hl == 0:
                        break
                    cur = cv2.resize(cur[: 2 * hl, : 2 * wl], (wl, hl), interpolation=cv2.INTER_AREA)
                    files[lv - 1].write(cur.tobytes())
                if y + h >= H:  # tifffile stops pulling after the last tile
                    for f in files:
                        f.close()
                if bar is not None:
                    bar.update(h)
                yield from _tiles_of(band, tile)
        finally:
            for f in files:
                f.close()

    def level_from_raw(lv: int) -> Iterator[np.ndarray]:
        wl, hl = levels[lv]
        rows = tile * 4
        with open(raw[lv], "rb") as f:
            for y in range(0, hl, rows):
                n = min(rows, hl - y)
                band = np.fromfile(f, np.uint8, n * wl * 3).reshape(n, wl, 3)
                yield from _tiles_of(band, tile)

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(level0(), shape=(H, W, 3), subfiletype=0, description=description, **common)
        for lv in range(1, nl):
            wl, hl = levels[lv]
            tif.write(level_from_raw(lv), shape=(hl, wl, 3), subfiletype=1, **common)
            raw[lv].unlink()
    return levels


def _write_geojson(path: Path, nuclei: _Nuclei, seed: int, index: int) -> None:
    """QuPath-style FeatureCollection, streamed feature by feature (bounded memory)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x1D5]))
    with open(path, "wb") as f:
        f.write(b'{"type":"FeatureCollection","features":[')
        buf: list[bytes] = []
        n = len(nuclei)
        for i in range(n):
            name = _CLASS_NAMES[int(nuclei.cls[i])]
            rings = [r.tolist() for r in nuclei.rings(i)]
            feat = {
                "type": "Feature",
                "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": list(CLASS_COLORS[name])},
                },
            }
            buf.append(orjson.dumps(feat))
            if len(buf) >= 4096:
                f.write((b"," if i >= len(buf) else b"") + b",".join(buf))
                buf = []
        if buf:
            f.write((b"," if n > len(buf) else b"") + b",".join(buf))
        f.write(b"]}")


#: the classes of the demo's tissue-region outlines (``NAME.regions.geojson``) and their colours
REGION_COLORS = {"epithelium": (200, 0, 200), "stroma": (150, 200, 150)}


def _write_regions(path: Path, regions: dict[str, list[Any]]) -> dict[str, int]:
    """QuPath-style FeatureCollection of the tissue regions (:meth:`_Slide.regions`); polygons per class."""
    import shapely.geometry

    feats = []
    for name, polys in regions.items():
        for p in polys:
            feats.append({
                "type": "Feature",
                "geometry": shapely.geometry.mapping(p),
                "properties": {"objectType": "annotation",
                               "classification": {"name": name, "color": list(REGION_COLORS[name])}},
            })
    path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": feats}))
    return {name: len(polys) for name, polys in regions.items()}
