"""Exports (png, pannuke, hovernet) and overlays."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from histosynth.errors import HistosynthError
from histosynth.patches.export import export, outline_image, overlay
from histosynth.io.patchset import PatchSetWriter


@pytest.fixture()
def typed(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "ps"
    with PatchSetWriter(out, ("images", "inst", "types"), (16, 16)) as w:
        for i in range(3):
            inst = np.zeros((16, 16), np.int32)
            inst[2:6, 2:6], inst[8:14, 8:12] = 1, 2
            types = np.where(inst == 1, 1, np.where(inst == 2, 3, 0)).astype(np.uint8)
            w.add({"slide": f"s{i % 2}", "x": i * 16, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
                   "width": 16, "height": 16, "tissue_fraction": 1.0, "n_nuclei": 2, "source": "x"},
                  images=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), inst=inst, types=types)
    return out


def test_png(typed, tmp_path):
    assert export(typed, tmp_path / "png", "png") == 3
    names = sorted(p.name for p in (tmp_path / "png" / "inst").iterdir())
    assert names[0] == "000000_s0_0_0.png" and len(names) == 3
    inst = cv2.imread(str(tmp_path / "png" / "inst" / names[1]), cv2.IMREAD_UNCHANGED)
    assert inst.dtype == np.uint16 and (inst[8:14, 8:12] == 2).all()
    img = cv2.cvtColor(cv2.imread(str(tmp_path / "png" / "images" / names[1])), cv2.COLOR_BGR2RGB)
    from histosynth.io.patchset import read_patchset

    assert np.array_equal(img, read_patchset(typed).images[1])
    assert "name" in (tmp_path / "png" / "index.csv").read_text().splitlines()[0]


def test_pannuke(typed, tmp_path):
    export(typed, tmp_path / "pn", "pannuke", n_types=3)
    masks = np.load(tmp_path / "pn" / "masks.npy")
    images = np.load(tmp_path / "pn" / "images.npy")
    assert masks.shape == (3, 16, 16, 4) and masks.dtype == np.float64 and images.dtype == np.float64
    assert (masks[0, 2:6, 2:6, 0] == 1).all() and (masks[0, 8:14, 8:12, 2] == 2).all()
    assert masks[0, ..., 1].max() == 0
    assert (masks[0, ..., 3] == (masks[0, ..., :3].sum(-1) == 0)).all()
    assert list(np.load(tmp_path / "pn" / "types.npy")) == ["s0", "s1", "s0"]


def test_hovernet(typed, tmp_path):
    export(typed, tmp_path / "hv", "hovernet")
    files = sorted((tmp_path / "hv").glob("*.npy"))
    arr = np.load(files[0])
    assert len(files) == 3 and arr.shape == (16, 16, 5) and arr.dtype == np.int32
    assert (arr[2:6, 2:6, 3] == 1).all() and (arr[8:14, 8:12, 4] == 3).all()


def test_errors(typed, tmp_path):
    with pytest.raises(HistosynthError, match="unknown export format"):
        export(typed, tmp_path / "x", "tiff")
    (typed / "inst.npy").unlink()
    with pytest.raises(HistosynthError, match="inst.npy"):
        export(typed, tmp_path / "x", "hovernet")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp*"))


def test_overlay(typed, tmp_path):
    assert overlay(typed, tmp_path / "o.png", per_slide=2, class_names={1: "a", 3: "c"}) == 3
    pic = cv2.imread(str(tmp_path / "o.png"))
    assert pic is not None and pic.shape[1] >= 2 * 16
    img = np.zeros((8, 8, 3), np.uint8)
    inst = np.zeros((8, 8), np.int32)
    inst[2:6, 2:6] = 1
    drawn = outline_image(img, inst, np.where(inst > 0, 2, 0))
    assert (drawn[2, 2:6] == [230, 40, 40]).all() and (drawn[3:5, 3:5] == 0).all()
