"""Stain styles found without a stain column: ``gan.option_by: cluster`` (the ``stain-styles`` stage).

The option layer of the GAN paints a mask in one of a few styles. With a
slide table that names each slide's stain (``option_by: stain``) the styles
are given; with slides found by a glob there is no such column, and every
slide used to fall into one ``default`` style. Here the styles are found:

1. **Features.** Per slide, from its tiles' tissue pixels (not near-white:
   mean RGB below ``BACKGROUND``), the optical density separated into
   haematoxylin and eosin by colour deconvolution
   (:func:`skimage.color.rgb2hed`, Ruifrok & Johnston): the mean and the
   standard deviation of H and of E (4 numbers). At most ``max_pixels``
   pixels per slide are read, spread evenly over its tiles.
2. **Clusters.** The TRAIN slides' features are standardised (z-scores over
   those slides) and grouped by k-means (:func:`scipy.cluster.vq.kmeans2`,
   k-means++ starts, seeded) into ``k`` styles, named ``style-1`` …
   ``style-k`` in order of rising mean H density (a name means the same
   thing for the same data and seed).
3. **Assignment.** Any other slide (a test slide whose masks are painted for
   the evaluation) gets the style of the nearest centroid in the same
   standardised space: it is predicted from the fit, and nothing fitted sees it.

``styles.json`` holds the centroids, the standardisation, every slide's
features and style (``slides``), and which slides were fitted (``fitted``).
``train-gan --options-file``, ``translate --styles`` and
``evaluate-images --real-options-file`` read it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_write
from histosynth.io.patchset import read_patchset

log = logging.getLogger(__name__)

#: a pixel whose mean RGB is at least this is background (glass), not tissue
BACKGROUND = 220
FEATURES = ("mean_h", "mean_e", "sd_h", "sd_e")
FORMAT = "histosynth-stain-styles"


def slide_features(patch_sets: Sequence[str | os.PathLike], max_pixels: int = 200_000) -> dict[str, np.ndarray]:
    """slide -> (mean H, mean E, sd H, sd E) of its tissue pixels' optical density, over its patch sets' images."""
    from skimage.color import rgb2hed

    pixels: dict[str, list[np.ndarray]] = {}
    for path in patch_sets:
        ps = read_patchset(path, require=("images",))
        slides = ps.index["slide"].astype(str).to_numpy()
        per_tile = max(64, max_pixels // max(1, len(ps)))
        for i in range(len(ps)):
            image = np.asarray(ps.images[i]).reshape(-1, 3)
            step = max(1, len(image) // per_tile)
            sample = image[::step]
            tissue = sample[sample.mean(axis=1) < BACKGROUND]
            if len(tissue):
                pixels.setdefault(slides[i], []).append(tissue)
    out: dict[str, np.ndarray] = {}
    for slide, parts in pixels.items():
        hed = rgb2hed(np.concatenate(parts)[None].astype(np.uint8))[0]
        out[slide] = np.array([hed[:, 0].mean(), hed[:, 1].mean(), hed[:, 0].std(), hed[:, 1].std()])
    empty = sorted({str(s) for p in patch_sets for s in read_patchset(p).index["slide"]} - set(out))
    if empty:
        raise HistosynthError(f"slides {empty} have no tissue pixel (every pixel's mean RGB >= {BACKGROUND}): "
                              "no stain style can be measured", patch_sets[0])
    return out


def fit_styles(features: Mapping[str, np.ndarray], k: int, seed: int = 0) -> dict[str, Any]:
    """k styles from the slides' ``features`` (k-means on z-scores); returns the fit (centroids, scaling)."""
    from scipy.cluster.vq import kmeans2

    slides = sorted(features)
    if k < 1:
        raise HistosynthError(f"gan.clusters must be at least 1, got {k}")
    if len(slides) < k:
        raise HistosynthError(f"gan.option_by cluster asks for {k} stain styles from {len(slides)} train "
                              f"slide(s) ({', '.join(slides)}): use gan.clusters <= {len(slides)}")
    x = np.stack([np.asarray(features[s], float) for s in slides])
    mean, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (x - mean) / sd
    if k == 1:
        centroids = z.mean(axis=0, keepdims=True)
    else:
        centroids, _ = kmeans2(z, k, minit="++", seed=np.random.default_rng(seed), missing="raise")
    order = np.argsort(centroids[:, 0] * sd[0] + mean[0], kind="stable")  # style-1: the palest haematoxylin
    return {"centroids": centroids[order], "mean": mean, "sd": sd}


def assign_styles(features: Mapping[str, np.ndarray], fit: Mapping[str, Any]) -> dict[str, str]:
    """slide -> ``style-<n>`` of the nearest centroid (standardised features)."""
    out = {}
    for slide in sorted(features):
        z = (np.asarray(features[slide], float) - fit["mean"]) / fit["sd"]
        out[slide] = f"style-{int(np.argmin(((fit['centroids'] - z) ** 2).sum(axis=1))) + 1}"
    return out


def stain_styles(train: Sequence[str | os.PathLike], out_json: str | os.PathLike, *, k: int, seed: int = 0,
                 assign: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Fit ``k`` styles on the ``train`` patch sets, assign the ``assign`` ones too; write ``out_json``."""
    if not train:
        raise HistosynthError("stain-styles needs at least one train patch set")
    fitted = slide_features(train)
    fit = fit_styles(fitted, int(k), int(seed))
    others = {s: f for s, f in (slide_features(assign) if assign else {}).items() if s not in fitted}
    styles = assign_styles({**fitted, **others}, fit)
    used = sorted(set(styles[s] for s in fitted))
    if len(used) < int(k):
        log.warning("%d of the %d styles hold no train slide (k-means left a cluster empty)", int(k) - len(used),
                    int(k))
    result = {
        "format": FORMAT, "k": int(k), "seed": int(seed), "features": list(FEATURES),
        "mean": fit["mean"].tolist(), "sd": fit["sd"].tolist(), "centroids": fit["centroids"].tolist(),
        "fitted": sorted(fitted), "slides": styles,
        "slide_features": {s: np.round(f, 6).tolist() for s, f in sorted({**fitted, **others}.items())},
    }
    atomic_write(Path(out_json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    log.info("stain styles of %d train slides (k = %d): %s; assigned: %s", len(fitted), int(k),
             {s: styles[s] for s in sorted(fitted)}, {s: styles[s] for s in sorted(others)} or "none")
    return result


def read_styles(path: str | os.PathLike) -> dict[str, str]:
    """slide -> style of a ``styles.json``, with one clear error for a missing or foreign file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HistosynthError("no such stain-styles file", path) from None
    except (OSError, ValueError) as err:
        raise HistosynthError(f"unreadable stain-styles file: {err}", path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("slides"), dict):
        raise HistosynthError("not a stain-styles file (from histosynth stain-styles)", path)
    return {str(s): str(v) for s, v in data["slides"].items()}


def style_of(styles: Mapping[str, str], slides: Sequence[str], path: str | os.PathLike) -> str:
    """The one style of ``slides`` (the slides of a patch set), or an error naming what is missing."""
    found = {styles.get(str(s)) for s in slides}
    if None in found:
        missing = sorted(str(s) for s in slides if str(s) not in styles)
        raise HistosynthError(f"slides {missing} have no stain style in {path}", path)
    if len(found) != 1:
        raise HistosynthError(f"the masks come from slides of several stain styles {sorted(found)}: paint them "
                              "apart", path)
    return found.pop()
