"""Class names survive the chain rasterize → stats → GAN checkpoint → translated pairs → segmenter checkpoint.

One patch set is rasterized now (the canonical ``{"1": "Epithelial"}``) and
one is rewritten the way ``rasterize`` used to write it (``{"n_epithelial": 1}``
with the names in ``class_counts``); a GAN trained by hand on the legacy set
alone must still record the names, and a segmenter trained on what that GAN
paints must carry them on.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from histosynth.gan.train import train_gan
from histosynth.gan.translate import translate
from histosynth.io.labels import class_key, classes_of_patch_sets
from histosynth.io.patchset import read_patchset
from histosynth.masks.stats import fit_stats
from histosynth.models.pix2pix import load_gan
from histosynth.patches.annotate import rasterize_patchset
from histosynth.segmentation.segmenter import load_segmenter, train_segmenter
from histosynth.slides.tiling import TileParams, tile_slide
from tests.helpers import tissue_image, write_pyramid

torch.set_num_threads(1)

CLASSES = {"Epithelial": 1, "Lymphocyte": 2}
NAMES = {1: "Epithelial", 2: "Lymphocyte"}


def _disc(cx, cy, r, name):
    t = np.linspace(0, 2 * np.pi, 17)[:-1]
    ring = [[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in t]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


@pytest.fixture(scope="module")
def typed_sets(tmp_path_factory):
    """(canonical, legacy) typed patch sets of one 512 x 256 slide in 128-px tiles."""
    root = tmp_path_factory.mktemp("chain")
    slide = write_pyramid(root / "s.tif", tissue_image(512, 256, tissue=(0, 1)), mpp=0.25, levels=1, tile=128)
    tile_slide(slide, root / "tiles", TileParams(size=128, max_background=1.0))
    rng = np.random.default_rng(0)
    feats = [_disc(x, y, rng.uniform(5, 9), "Epithelial" if k % 3 else "Lymphocyte")
             for k, (x, y) in enumerate(zip(rng.uniform(12, 500, 40), rng.uniform(12, 244, 40)))]
    ann = root / "s.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    canonical = root / "canonical"
    rasterize_patchset(ann, root / "tiles", canonical, CLASSES)
    legacy = root / "legacy"
    rasterize_patchset(ann, root / "tiles", legacy, CLASSES)
    report = json.loads((legacy / "report.json").read_text())
    report["classes"] = {"n_epithelial": 1, "n_lymphocyte": 2}  # as rasterize wrote it before
    (legacy / "report.json").write_text(json.dumps(report, indent=2))
    return canonical, legacy


def test_rasterize_writes_the_canonical_map(typed_sets):
    canonical, legacy = typed_sets
    assert read_patchset(canonical).report["classes"] == {"1": "Epithelial", "2": "Lymphocyte"}
    assert read_patchset(legacy).report["class_counts"].keys() == {"Epithelial", "Lymphocyte"}
    assert classes_of_patch_sets([legacy]) == NAMES  # the legacy names spelled through class_counts
    assert classes_of_patch_sets([legacy, canonical]) == NAMES


def test_stats_keep_the_names(typed_sets, tmp_path):
    canonical, legacy = typed_sets
    stats = fit_stats([canonical], tmp_path / "new", calibrate=0, figures=False)
    assert stats["classes"] == {"1": "Epithelial", "2": "Lymphocyte"}
    old = fit_stats([legacy], tmp_path / "old", calibrate=0, figures=False)
    assert {k: class_key(v) for k, v in old["classes"].items()} == {"1": "epithelial", "2": "lymphocyte"}


def test_names_go_through_the_gan_into_the_segmenter(typed_sets, tmp_path):
    canonical, legacy = typed_sets
    train_gan([legacy], tmp_path / "gan", crop=32, depth=3, width=4, batch_size=2, steps=2, decay_steps=0,
              checkpoint_every=10, sample_every=100, device="cpu", threads=1, precision="float32")
    assert load_gan(tmp_path / "gan" / "gan.pt").classes == NAMES  # trained by hand: no --classes given
    translate(tmp_path / "gan" / "gan.pt", canonical, tmp_path / "pairs", device="cpu", threads=1, montage=False)
    pairs = read_patchset(tmp_path / "pairs")
    assert pairs.report["classes"] == pairs.report["mask_classes"] == {"1": "Epithelial", "2": "Lymphocyte"}
    # the synthetic arm still validates on real tiles (those of the train slide)
    train_segmenter([canonical], tmp_path / "seg", arm="synthetic", synthetic=[tmp_path / "pairs"], width=8,
                    units=(1, 1, 1, 1), input_size=104, batch_size=1, steps=1, device="cpu", threads=1,
                    precision="float32")
    ckpt = torch.load(tmp_path / "seg" / "model.pt", weights_only=True)
    assert ckpt["classes"] == {"1": "Epithelial", "2": "Lymphocyte"} and ckpt["n_types"] == 2
    assert load_segmenter(tmp_path / "seg" / "model.pt").classes == NAMES
