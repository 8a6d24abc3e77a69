"""Whole-slide segmentation (histosynth segment): seams, outputs, resuming, bad input.

Most tests replace the network's prediction by an exact one read off the image (dark pixels are
nuclei, HV maps from their connected components, computed on each tile's own pixels as a network
would), so that what is tested is the tiling, the seam rule and the outputs, not a model's skill.
One test runs a real (untrained) HoVer-Net through the CLI.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.models import hovernet as hn
from histosynth.models.hovernet import postprocess, sizes_at
from histosynth.models.hovernet.targets import hv_map
from histosynth.segmentation import segmenter as sg
from histosynth.segmentation import wsi
from tests.helpers import write_pyramid

torch.set_num_threads(1)

CLASSES = {1: "Epithelial", 2: "Lymphocyte"}
PINK, NUCLEUS = (225, 160, 200), (60, 30, 110)


def _checkpoint(path, mpp=0.5, classes=CLASSES, width=8, input_size=168):
    """A real (untrained) tiny HoVer-Net saved as train-segmenter saves it."""
    arch = {"n_types": len(classes), "mode": "fast", "width": width, "units": [1, 1, 1, 1], "padding": "valid"}
    torch.manual_seed(0)
    model = hn.HoVerNet(**arch)
    torch.save({"format": sg.CHECKPOINT_FORMAT, "version": sg.CHECKPOINT_VERSION, "model": model.state_dict(),
                "arch": arch, "classes": {str(k): v for k, v in classes.items()}, "n_types": len(classes),
                "arm": "real", "seed": 0, "step": 7, "input_size": input_size,
                "output_size": int(model.output_size(input_size)), "mpp": mpp}, path)
    return path


def _slide_image(width=700, height=600, seed=0, n=140, background_cols=0):
    """Pink tissue with non-touching dark discs (radius 4-7 px), many across the 128-px tile borders."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, np.uint8)
    img[:, background_cols:] = PINK
    centres = []
    taken = np.zeros((height, width), bool)
    # half of them on the tile seams (x or y a multiple of 128), to make straddling nuclei common
    while len(centres) < n:
        r = int(rng.integers(4, 8))
        cx, cy = int(rng.integers(background_cols + 10, width - 10)), int(rng.integers(10, height - 10))
        if len(centres) % 2 == 0:
            if rng.random() < 0.5:
                cx = int(np.clip(round(cx / 128) * 128 + rng.integers(-3, 4), background_cols + 10, width - 10))
            else:
                cy = int(np.clip(round(cy / 128) * 128 + rng.integers(-3, 4), 10, height - 10))
        disc = np.zeros_like(taken, np.uint8)
        cv2.circle(disc, (cx, cy), r + 2, 1, -1)  # 2 px of clearance
        if (taken & disc.astype(bool)).any():
            continue
        taken |= disc.astype(bool)
        cv2.circle(img, (cx, cy), r, NUCLEUS, -1)
        centres.append((cx, cy))
    return img, np.array(centres, float)


def _exact_predict(seg, image, *, batch=4, amp_dtype=None, context=0, overlap=0):
    """What a perfect network would say about ``image`` without its ``context`` border."""
    if context:
        image = image[context:-context, context:-context]
    dark = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY) < 120
    n, inst = cv2.connectedComponents(dark.astype(np.uint8), connectivity=4)
    tp = np.zeros((3, *dark.shape), np.float32)
    tp[0] = ~dark
    tp[1] = dark
    return {"np": dark.astype(np.float32), "hv": hv_map(inst.astype(np.int32)), "tp": tp}


@pytest.fixture()
def exact(monkeypatch):
    monkeypatch.setattr(sg, "predict", _exact_predict)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    img, centres = _slide_image()
    path = write_pyramid(tmp_path_factory.mktemp("slide") / "seams.tif", img, mpp=0.5, levels=2,
                         compression="zlib")
    return path, img, centres


PARAMS = dict(tile=128, margin=16, batch=2)


def _run(model, slide_path, out, **kw):
    params = wsi.SegmentParams(**{**PARAMS, **kw.pop("params", {})})
    return wsi.segment_slide(model, slide_path, out, params, device="cpu", threads=1, precision="float32", **kw)


def test_seams_every_nucleus_once_and_whole(model, slide, tmp_path, exact):
    path, img, centres = slide
    report = _run(model, path, tmp_path / "out", params={"label_tiff": True})
    nuclei = pd.read_csv(tmp_path / "out" / "nuclei.csv")
    # the same post-processing over one window of the whole slide
    whole = _exact_predict(None, img)
    inst, _ = postprocess(whole["np"], whole["hv"], whole["tp"], **sizes_at(0.5))
    n_big = int(inst.max())
    assert abs(len(nuclei) - n_big) <= 0.01 * n_big
    assert len(nuclei) == len(centres) == report["counts"]["nuclei"]
    assert nuclei["id"].is_unique and report["counts"]["cut"] == 0
    # every true nucleus found exactly once, whole (area of a disc of radius 4-7: 49-150 px)
    dist = np.hypot(nuclei["centroid_x"].to_numpy()[:, None] - centres[None, :, 0] - 0.5,
                    nuclei["centroid_y"].to_numpy()[:, None] - centres[None, :, 1] - 0.5)
    assert ((dist < 1.5).sum(axis=0) == 1).all() and ((dist < 1.5).sum(axis=1) == 1).all()
    assert nuclei["area_px"].between(45, 160).all()
    # the label image: one id per nucleus, at the slide's own resolution here
    labels = tifffile.imread(tmp_path / "out" / "labels.tif")
    assert labels.shape == img.shape[:2] and labels.dtype == np.uint32
    assert set(np.unique(labels)) - {0} == set(nuclei["id"])
    cx, cy = centres[:, 0].astype(int), centres[:, 1].astype(int)
    assert (labels[cy, cx] > 0).all()
    # round trip: the GeoJSON through histosynth's own reader and rasterizer gives the label image back
    from histosynth.io.annotations import read
    from histosynth.patches.rasterize import rasterize_tile

    got = read(tmp_path / "out" / "nuclei.geojson", {"Epithelial": 1, "Lymphocyte": 2})
    assert len(got.nuclei) == len(nuclei) and {n.type_id for n in got.nuclei} == {1}
    back, _, _ = rasterize_tile([n.polygon for n in got.nuclei], [n.type_id for n in got.nuclei], 0, 0, 1,
                                labels.shape[1], labels.shape[0])
    assert np.array_equal(back > 0, labels > 0)
    pairs = {(int(a), int(b)) for a, b in zip(back[labels > 0], labels[labels > 0])}
    assert len(pairs) == len(nuclei)  # one-to-one: each outline is exactly one labelled nucleus


def test_geojson_is_a_qupath_feature_collection(model, slide, tmp_path, exact):
    path, _, centres = slide
    _run(model, path, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "nuclei.geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(centres)
    ids = [f["id"] for f in data["features"]]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids)
    for f in data["features"]:
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Epithelial" and len(props["classification"]["color"]) == 3
        assert 0.99 <= props["measurements"]["type_probability"] <= 1.0
    # outlines in level-0 slide pixels, around the true centres
    from shapely.geometry import shape

    cents = np.array([shape(f["geometry"]).centroid.coords[0] for f in data["features"]])
    nearest = np.hypot(cents[:, None, 0] - centres[None, :, 0] - 0.5, cents[:, None, 1] - centres[None, :, 1] - 0.5)
    assert (nearest.min(axis=1) < 1.5).all()


def test_the_slide_is_resampled_to_the_models_resolution(tmp_path, slide, exact, caplog):
    path, img, centres = slide
    model = _checkpoint(tmp_path / "model.pt", mpp=1.0)
    with caplog.at_level("WARNING"):
        report = _run(model, path, tmp_path / "out", params={"tile": 64, "margin": 8})
    assert "0.5 um/px" in caplog.text and "1 um/px" in caplog.text
    assert report["mpp"] == 1.0 and report["downsample"] == pytest.approx(2.0)
    nuclei = pd.read_csv(tmp_path / "out" / "nuclei.csv")
    # the discs (radius 4-7 at 0.5 um/px) are 2-3.5 px at 1 um/px: as many found as in one window over the
    # whole slide at half size, placed in level-0 coordinates
    half = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    whole = _exact_predict(None, half)
    n_big = int(postprocess(whole["np"], whole["hv"], whole["tp"], **sizes_at(1.0))[0].max())
    assert abs(len(nuclei) - n_big) <= max(2, 0.02 * n_big)
    dist = np.hypot(nuclei["centroid_x"].to_numpy()[:, None] - centres[None, :, 0],
                    nuclei["centroid_y"].to_numpy()[:, None] - centres[None, :, 1]).min(axis=1)
    assert np.median(dist) < 2.0


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_by_tile(model, slide, tmp_path, monkeypatch):
    path, _, _ = slide
    reference = tmp_path / "reference"
    monkeypatch.setattr(sg, "predict", _exact_predict)
    _run(model, path, reference)
    calls = {"n": 0}

    def dies_after_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise _Killed
        return _exact_predict(*args, **kwargs)

    monkeypatch.setattr(sg, "predict", dies_after_five)
    out = tmp_path / "out"
    with pytest.raises(_Killed):
        _run(model, path, out)
    partial = tmp_path / ".out.partial"
    assert not out.exists() and len(list((partial / "tiles").iterdir())) == 5
    monkeypatch.setattr(sg, "predict", _exact_predict)
    report = _run(model, path, out)
    assert report["counts"]["resumed_tiles"] == 5 and not partial.exists()
    assert (out / "nuclei.csv").read_text() == (reference / "nuclei.csv").read_text()
    # a work folder of other settings is not reused
    monkeypatch.setattr(sg, "predict", dies_after_five)
    calls["n"] = 0
    with pytest.raises(_Killed):
        _run(model, path, tmp_path / "again")
    monkeypatch.setattr(sg, "predict", _exact_predict)
    report = _run(model, path, tmp_path / "again", params={"margin": 20})
    assert report["counts"]["resumed_tiles"] == 0


def test_bad_inputs_are_named(model, slide, tmp_path, exact):
    path, _, _ = slide
    blank = write_pyramid(tmp_path / "blank.tif", np.full((300, 300, 3), 250, np.uint8), mpp=0.5, levels=1,
                          compression="zlib")
    with pytest.raises(HistosynthError, match="no tissue"):
        _run(model, blank, tmp_path / "blank")
    assert not (tmp_path / "blank").exists()
    with pytest.raises(HistosynthError, match="differ from the requested"):
        _run(model, path, tmp_path / "x", classes={1: "Epithelial", 2: "Stroma"})
    # an output folder that holds another slide's result, or something else
    other_img, _ = _slide_image(width=300, height=300, seed=1, n=10)
    other = write_pyramid(tmp_path / "other.tif", other_img, mpp=0.5, levels=1, compression="zlib")
    _run(model, other, tmp_path / "taken")
    with pytest.raises(HistosynthError, match="another slide"):
        _run(model, path, tmp_path / "taken")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(HistosynthError, match="not a segment result"):
        _run(model, path, tmp_path / "junk")
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"
    # the same slide again: replaced
    _run(model, other, tmp_path / "taken")
    with pytest.raises(HistosynthError, match="margin"):
        wsi.SegmentParams(tile=128, margin=100).check()


def test_cli_runs_a_real_network(model, tmp_path, capsys):
    img, _ = _slide_image(width=200, height=180, seed=2, n=12)
    path = write_pyramid(tmp_path / "small.tif", img, mpp=0.5, levels=1, compression="zlib")
    out = tmp_path / "out"
    assert main(["segment", str(model), str(path), str(out), "--tile", "96", "--margin", "8", "--device", "cpu",
                 "--threads", "1", "--precision", "float32", "--classes", "Epithelial=1", "Lymphocyte=2",
                 "--label-tiff"]) == 0
    report = json.loads((out / "segment.json").read_text())
    assert report["counts"]["tissue_tiles"] == report["counts"]["grid_tiles"] > 0 and report["model"]["step"] == 7
    assert {p.name for p in out.iterdir()} == {"nuclei.geojson", "nuclei.csv", "segment.json", "labels.tif"}
    assert tifffile.imread(out / "labels.tif").shape == (180, 200)
    assert main(["segment", str(model), str(path), str(tmp_path / "o2"), "--classes", "Stroma=1"]) != 0
    assert "differ" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_predict_with_context_predicts_the_inside_only(model):
    seg = sg.load_segmenter(model)
    image = np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8)
    ctx = sg.network_margin(seg)
    maps = sg.predict(seg, image, context=10)
    assert maps["np"].shape == (180, 220) and maps["tp"].shape == (3, 180, 220)
    big = sg.predict(seg, image, context=ctx + 5)
    assert big["np"].shape == (200 - 2 * (ctx + 5), 240 - 2 * (ctx + 5))
    with pytest.raises(HistosynthError, match="context"):
        sg.predict(seg, image, context=100)


def test_a_model_without_types_writes_untyped_nuclei(model, slide, tmp_path, monkeypatch):
    """No type branch: no type probability (QuPath measurements are numbers), no classification."""
    def untyped(*args, **kwargs):
        maps = _exact_predict(*args, **kwargs)
        del maps["tp"]
        return maps

    monkeypatch.setattr(sg, "predict", untyped)
    path, _, centres = slide
    _run(model, path, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "nuclei.geojson").read_text())
    assert len(data["features"]) == len(centres)
    assert all("classification" not in f["properties"] and "type_probability" not in f["properties"]["measurements"]
               for f in data["features"])
    nuclei = pd.read_csv(tmp_path / "out" / "nuclei.csv")
    assert nuclei["type_probability"].isna().all() and (nuclei["type"] == 0).all()


def test_a_nucleus_found_by_two_neighbouring_tiles_is_kept_once(tmp_path):
    """Two tiles whose post-processing saw one seam nucleus in two shapes (centroids either side of the seam)."""
    from histosynth.slides.tiling import GridTile

    class Plan:
        grid = [GridTile(0, 0, False), GridTile(64, 0, False), GridTile(0, 64, False)]

    work = wsi.WorkFolder(tmp_path / "out", {"params": {"margin": 8}, "tile_px": 64})
    area = 64 + 2 * 8
    a, b = np.zeros((area, area), np.int32), np.zeros((area, area), np.int32)
    a[30:40, 64:78] = 1  # tile 0's area starts at x = -8: slide columns 56..69, centroid x 63 (its core)
    a[10:14, 10:14] = 2  # not on the seam
    b[30:40, 8:16] = 1  # tile 1's area starts at x = 56: columns 64..71, centroid 68 (its core), smaller
    b[50:55, 50:55] = 2
    rows = lambda labels: [{"local_id": i, "area_px": int((labels == i).sum())} for i in (1, 2)]  # noqa: E731
    work.save(0, wsi.TileResult(origin=(-8, -8), labels=a, rows=rows(a)))
    work.save(1, wsi.TileResult(origin=(56, -8), labels=b, rows=rows(b)))
    work.save(2, wsi.TileResult(origin=(-8, 56), labels=np.zeros_like(a), rows=[]))
    drops = wsi.find_duplicates(work, Plan, 64, 1.0)
    assert drops == {1: {1}}
    kept = wsi.without(work.load(1), drops[1])
    assert [r["local_id"] for r in kept.rows] == [1] and set(np.unique(kept.labels)) == {0, 1}
    assert (kept.labels[50:55, 50:55] == 1).all()
