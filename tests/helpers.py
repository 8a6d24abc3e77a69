"""Small synthetic slides for tests: pyramidal tiled TIFFs with known content."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile


def tissue_image(width: int, height: int, seed: int = 0, tissue: tuple[float, float] = (0.5, 1.0)) -> np.ndarray:
    """White background with a textured pink block covering columns tissue[0]..tissue[1] (fractions)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, np.uint8)
    x0, x1 = int(tissue[0] * width), int(tissue[1] * width)
    noise = cv2.GaussianBlur(rng.normal(0, 25, (height, x1 - x0)).astype(np.float32), (0, 0), 2)
    block = np.stack([200 + noise, 120 + noise, 170 + noise], axis=-1)
    img[:, x0:x1] = np.clip(block, 0, 255).astype(np.uint8)
    return img


def write_pyramid(
    path: Path,
    image: np.ndarray,
    mpp: float | None = 0.25,
    levels: int = 3,
    tile: int = 128,
    compression: str = "jpeg",
) -> Path:
    """A generic tiled TIFF that OpenSlide opens, with levels downsampled by 2."""
    with tifffile.TiffWriter(path) as tw:
        data = image
        for lvl in range(levels):
            kwargs = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**lvl)
                kwargs = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(
                data,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=1 if lvl else 0,
                metadata=None,
                **kwargs,
            )
            data = cv2.resize(data, (data.shape[1] // 2, data.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return path
