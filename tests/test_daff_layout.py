"""sample_masks.method daff: the centroid library, the layout operations, G1 and its instances, the patch set,
the CLI and the Snakemake rules used only with that method."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.masks.daff_g1 import mask_target, train_daff_g1
from histosynth.masks.daff_layout import (
    LayoutSampler,
    affine,
    build_centroid_library,
    centroids,
    flip,
    instances_from_g1,
    keep_apart,
    load_centroid_library,
    point_image,
    rotate,
)
from histosynth.masks.sampling import sample_masks
from histosynth.models.daff_g1 import load_g1
from tests.test_stats import write_toy

torch.set_num_threads(1)

G1_SETTINGS = {"crop": 64, "width": 8, "n_down": 2, "n_blocks": 1, "num_d": 2, "batch_size": 2, "device": "cpu",
               "threads": 1, "checkpoint_every": 100, "log_every": 5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("daff")
    ps = write_toy(d / "real", n_patches=10, size=64, seed=5)
    build_centroid_library([ps], d / "lib.npz")
    train_daff_g1([ps], d / "g1", steps=30, decay_steps=10, seed=1, progress=False, **G1_SETTINGS)
    return d, ps


def _parser():
    from histosynth.cli.masks import register as add_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--progress", action="store_true")
    add_cli(parser.add_subparsers(dest="command"))
    return parser


# --------------------------------------------------------------------------- the library
def test_centroids_are_the_instances_mean_pixel_and_majority_type():
    inst = np.zeros((20, 20), np.int32)
    types = np.zeros((20, 20), np.uint8)
    inst[2:5, 3:8] = 4  # centre (3, 5)
    types[2:5, 3:8] = 2
    types[2, 3] = 1  # a minority pixel
    inst[10:16, 10:12] = 7  # centre (12.5, 10.5) -> rint
    types[10:16, 10:12] = 1
    got = centroids(inst, types)
    cy, cx = ndimage.center_of_mass(inst == 7)
    assert got.tolist() == [[3, 5, 2], [int(np.rint(cy)), int(np.rint(cx)), 1]]
    assert centroids(np.zeros((5, 5), np.int32), np.zeros((5, 5), np.uint8)).shape == (0, 3)


def test_library_holds_every_patch_centroid_with_its_class_map(trained):
    d, ps = trained
    lib = load_centroid_library(d / "lib.npz")
    real = read_patchset(ps)
    assert lib.classes == {1: "epithelial", 2: "lymphocyte"}
    assert len(lib) == len(real)  # every toy patch has nuclei
    for t in range(len(lib)):
        assert np.array_equal(lib.entry(t), centroids(real.inst[t], real.types[t]))
        assert len(lib.entry(t)) == real.index["n_nuclei"][t]
    assert tuple(lib.shapes[0]) == (64, 64) and np.all(lib.mpp == 0.5)
    assert lib.min_distance >= 1
    assert not [p for p in d.iterdir() if ".tmp" in p.name]


def test_an_empty_library_is_one_error_naming_the_file(tmp_path):
    ps = tmp_path / "empty"
    with PatchSetWriter(ps, ("inst", "types"), (32, 32)) as w:
        w.add({"slide": "s", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5, "width": 32, "height": 32,
               "tissue_fraction": 1.0, "n_nuclei": 0, "source": "t"},
              inst=np.zeros((32, 32), np.int32), types=np.zeros((32, 32), np.uint8))
    out = tmp_path / "lib.npz"
    with pytest.raises(HistosynthError, match="no points") as err:
        build_centroid_library([ps], out, classes={1: "a"})
    assert str(out) in str(err.value) and not out.exists()
    # a library file whose 'points' is empty (written by hand) is named at load, with the key
    np.savez(out, points=np.zeros((0, 3), np.int32), offsets=np.zeros(1, np.int64), shapes=np.zeros((0, 2), np.int32),
             mpp=np.zeros(0), sources=np.zeros(0, np.str_), classes=np.asarray(json.dumps({"1": "a"})),
             min_distance=np.asarray(1.0))
    with pytest.raises(HistosynthError, match="no points.*'points'") as err:
        load_centroid_library(out)
    assert str(out) in str(err.value)
    with pytest.raises(HistosynthError, match="not found"):
        load_centroid_library(tmp_path / "nope.npz")


def _points_geojson(path, points):
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]},
              "properties": {"classification": {"name": name}}} for x, y, name in points]
    feats.append({"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
                  "properties": {}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_point_annotation_files_feed_the_library(tmp_path):
    f = _points_geojson(tmp_path / "p.geojson", [(1000, 500, "Tumour"), (1010, 520, "Immune"), (1300, 500, "Tumour")])
    out = tmp_path / "lib.npz"
    rep = build_centroid_library([], out, point_files=[f], tile=128, classes={"Tumour": 1, "Immune": 2})
    lib = load_centroid_library(out)
    assert rep["points"] == 3 and rep["point_files"] == 1
    # windows on a 128-px grid from the points' bounding box (x0 1000, y0 500): (0, 0) and (0, 2)
    assert len(lib) == 2
    assert lib.entry(0).tolist() == [[0, 0, 1], [20, 10, 2]] and lib.entry(1).tolist() == [[0, 44, 1]]
    assert lib.classes == {1: "Tumour", 2: "Immune"} and np.isnan(lib.mpp).all()
    bad = _points_geojson(tmp_path / "bad.geojson", [(5, 5, "Stroma")])
    with pytest.raises(HistosynthError, match="feature 0: class 'Stroma' is not in the class map") as err:
        build_centroid_library([], tmp_path / "x.npz", point_files=[bad], classes={"Tumour": 1})
    assert "bad.geojson" in str(err.value)
    with pytest.raises(HistosynthError, match="need a class map"):
        build_centroid_library([], tmp_path / "x.npz", point_files=[f])


# --------------------------------------------------------------------------- layout operations
def _lib_of(points_per_entry, size=64):
    from histosynth.masks.daff_layout import CentroidLibrary

    pts = [np.asarray(p, np.int32).reshape(-1, 3) for p in points_per_entry]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pts])]).astype(np.int64)
    return CentroidLibrary(np.concatenate(pts), offsets, np.full((len(pts), 2), size, np.int32),
                           np.full(len(pts), 0.5), np.asarray(["t"] * len(pts)), {1: "a", 2: "b"}, 6.0)


def test_flip_rotate_affine_act_about_the_canvas():
    rng = np.random.default_rng(0)
    p = np.array([[10.0, 20.0, 1], [40.0, 5.0, 2], [31.5, 31.5, 1]])
    seen = set()
    for _ in range(20):
        f = flip(p, 64, rng)
        assert np.array_equal(f[:, 2], p[:, 2])
        assert set(np.abs(f[:, 0] - 31.5)) == set(np.abs(p[:, 0] - 31.5))
        seen.add(tuple(f[0, :2]))
    assert len(seen) == 4  # none, lr, ud, both
    r = rotate(p, 64, rng)
    dist = lambda q: np.linalg.norm(q[:, None, :2] - q[None, :, :2], axis=-1)
    assert np.allclose(dist(r), dist(p)) and np.allclose(r[2, :2], [31.5, 31.5])  # rigid about the centre
    a = affine(p, 64, rng)
    ratio = dist(a)[0, 1] / dist(p)[0, 1]
    assert 0.8 < ratio < 1.25 and np.allclose(a[2, :2], [31.5, 31.5])


def test_keep_apart_drops_points_too_close_to_kept_ones():
    first = np.array([[10.0, 10.0, 1]])
    second = np.array([[12.0, 10.0, 2], [30.0, 30.0, 2]])
    assert keep_apart(first, second, 5.0).tolist() == [[10, 10, 1], [30, 30, 2]]


def test_layouts_are_deterministic_distinct_and_inside_the_canvas():
    rng_pts = np.random.default_rng(3)
    entries = [np.c_[rng_pts.integers(0, 64, (12, 2)), rng_pts.integers(1, 3, 12)] for _ in range(5)]
    sampler = LayoutSampler(_lib_of(entries), 48)
    a = [sampler.layout(np.random.default_rng(7)) for _ in range(3)]
    b = [sampler.layout(np.random.default_rng(7)) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    rng = np.random.default_rng(8)
    layouts = [sampler.layout(rng) for _ in range(40)]
    assert len({x.tobytes() for x in layouts}) == 40
    for lay in layouts:
        assert lay.dtype == np.int32 and np.all((lay[:, :2] >= 0) & (lay[:, :2] < 48))
        assert len(np.unique(lay[:, 0] * 48 + lay[:, 1])) == len(lay)  # one point per pixel
        assert set(lay[:, 2]) <= {1, 2}
    # with no operations a layout is a plain window of one library entry
    plain = LayoutSampler(_lib_of(entries), 64, ops=())
    lay = plain.layout(np.random.default_rng(1))
    assert any(np.array_equal(np.sort(lay, axis=0), np.sort(e.astype(np.int32), axis=0)) for e in entries)
    with pytest.raises(HistosynthError, match="unknown layout operation"):
        LayoutSampler(_lib_of(entries), 64, ops=("warp",))


# --------------------------------------------------------------------------- G1 and its instances
def test_point_image_and_target_channels():
    img = point_image(np.array([[5, 6, 2], [0, 0, 1], [9, 9, 3]]), 12, 2, 1)
    assert img.shape == (2, 12, 12) and set(np.unique(img)) == {-1.0, 1.0}
    assert img[1, 5, 6] == 1 and img[1, 4, 6] == 1 and img[1, 4, 5] == -1 and img[0, 5, 6] == -1
    assert img[0, 0, 0] == 1 and (img[:, 9, 9] == -1).all()  # type 3 has no channel
    inst = np.zeros((4, 4), np.int32)
    inst[1:3, 1:3] = 1
    t = mask_target(inst, (inst > 0).astype(np.uint8) * 2, 2)
    assert (t[0] == np.where(inst > 0, 1, -1)).all() and (t[2] == t[0]).all() and (t[1] == -1).all()


def test_watershed_grows_one_instance_per_seeded_point():
    h = w = 40
    yy, xx = np.mgrid[:h, :w]
    fg = ((yy - 20) ** 2 + (xx - 12) ** 2 <= 36) | ((yy - 20) ** 2 + (xx - 22) ** 2 <= 36)  # two touching disks
    fg |= (yy < 3) & (xx < 3)  # foreground no point reaches
    out = np.full((3, h, w), -1.0, np.float32)
    out[0][fg] = 1.0
    out[1][fg] = 1.0  # G1 says type 1 everywhere
    pts = np.array([[20, 12, 1], [20, 22, 2], [35, 35, 1]])  # the last lies on background
    inst, types, counts = instances_from_g1(out, pts)
    assert inst.max() == 2 and counts == {"points": 3, "instances": 2, "unseeded": 1, "orphan_px": 9,
                                          "type_agree": 1}
    assert inst[20, 12] == 1 and inst[20, 22] == 2 and inst[20, 8] == 1 and inst[20, 26] == 2
    assert types[20, 12] == 1 and types[20, 22] == 2 and (types[inst == 0] == 0).all()
    for k in (1, 2):
        assert ndimage.label(inst == k)[1] == 1
    assert ((inst > 0) == (fg & ~((yy < 3) & (xx < 3)))).all()


def test_g1_trains_resumes_and_loads(trained, tmp_path):
    d, ps = trained
    G, meta = load_g1(d / "g1" / "g1.pt")
    assert meta["n_types"] == 2 and meta["step"] == 40 and not G.training
    assert G.config["kind"] == "daff" and G.config["in_ch"] == 2 and G.config["out_ch"] == 3
    log = (d / "g1" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,G_gan,G_l1,G_fm,D_real,D_fake,fg_dice") and len(log) == 1 + 8
    assert (d / "g1" / "samples.png").stat().st_size > 0
    # killed after 3 steps, then resumed to 6: the weights of an uninterrupted 6-step run
    kw = {**G1_SETTINGS, "seed": 2, "decay_steps": 0, "progress": False}
    train_daff_g1([ps], tmp_path / "whole", steps=6, **kw)
    train_daff_g1([ps], tmp_path / "resumed", steps=3, **kw)
    train_daff_g1([ps], tmp_path / "resumed", steps=6, **kw)
    a = torch.load(tmp_path / "whole" / "g1.pt", weights_only=True)["generator"]
    b = torch.load(tmp_path / "resumed" / "g1.pt", weights_only=True)["generator"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(HistosynthError, match="not a DAFF G1 checkpoint"):
        torch.save({"format": "other"}, tmp_path / "x.pt")
        load_g1(tmp_path / "x.pt")


# --------------------------------------------------------------------------- the sample-masks method
def test_daff_method_writes_the_mask_patch_set_contract(trained, tmp_path):
    d, _ = trained
    daff = {"library": d / "lib.npz", "g1": d / "g1" / "g1.pt", "batch": 3}
    out = tmp_path / "masks" / "shard-1"
    sample_masks(None, None, 10, 64, 7, out_dir=out, shard=1, n_shards=2, method="daff", daff=daff)
    ps = read_patchset(out, require=("inst", "types"))
    assert ps.images is None and not (out / "images.npy").exists()
    assert ps.inst.shape == (5, 64, 64) and ps.inst.dtype == np.int32 and ps.types.dtype == np.uint8
    idx = ps.index
    assert set(idx["slide"]) == {"synthetic"} and set(idx["x"]) == {0} and set(idx["width"]) == {64}
    assert set(idx["mpp"]) == {0.5} and set(idx["source"]) == {"sample-masks seed 7 shard 1"}
    assert list(idx["n_nuclei"]) == [int(m.max()) for m in ps.inst]
    assert list(idx["n_epithelial"] + idx["n_lymphocyte"]) == list(idx["n_nuclei"])
    for inst, typ in zip(ps.inst, ps.types):
        assert sorted(set(np.unique(inst)) - {0}) == list(range(1, int(inst.max()) + 1))  # ids 1..n
        assert ((typ > 0) == (inst > 0)).all()
        for k in range(1, int(inst.max()) + 1):
            assert len(np.unique(typ[inst == k])) == 1  # one type per instance
    r = ps.report
    assert r["method"] == "daff" and r["classes"] == {"1": "epithelial", "2": "lymphocyte"} and r["masks"] == 5
    assert r["nuclei"] == int(idx["n_nuclei"].sum()) == r["points"] - r["unseeded"]  # one instance per seeded point
    assert r["nuclei"] > 0
    # deterministic by seed; another seed, another sample
    again = sample_masks(None, None, 10, 64, 7, shard=1, n_shards=2, method="daff", daff=daff)
    other = sample_masks(None, None, 10, 64, 8, shard=1, n_shards=2, method="daff", daff=daff)
    assert np.array_equal(again["inst"], ps.inst) and np.array_equal(again["types"], ps.types)
    assert not np.array_equal(other["inst"], ps.inst)
    with pytest.raises(HistosynthError, match="needs the centroid library and G1"):
        sample_masks(None, None, 2, 64, 0, method="daff")


def test_cli_builds_the_library_trains_g1_and_samples(trained, tmp_path):
    _, ps = trained
    parser = _parser()
    lib = tmp_path / "lib.npz"
    pts = _points_geojson(tmp_path / "p.geojson", [(10, 10, "epithelial"), (40, 20, "lymphocyte")])
    args = parser.parse_args(["daff-library", str(ps), str(lib), "--points", str(pts), "--tile", "64"])
    args.func(args)
    assert len(load_centroid_library(lib)) == 10 + 1
    args = parser.parse_args(["train-daff-g1", str(ps), str(tmp_path / "g1"), "--crop", "64", "--width", "4",
                              "--n-down", "2", "--n-blocks", "1", "--steps", "2", "--decay-steps", "0",
                              "--device", "cpu", "--batch-size", "2"])
    args.func(args)
    assert load_g1(tmp_path / "g1" / "g1.pt")[1]["step"] == 2
    out = tmp_path / "m"
    args = parser.parse_args(["sample-masks", str(lib), str(tmp_path / "g1" / "g1.pt"), str(out), "--method", "daff",
                              "--n", "2", "--size", "32", "--daff-ops", "flip", "combine"])
    args.func(args)
    assert read_patchset(out).report["ops"] == ["flip", "combine"]
    with pytest.raises(HistosynthError, match="not part of --method daff"):
        args = parser.parse_args(["sample-masks", str(lib), "g1.pt", str(tmp_path / "n"), "--method", "daff",
                                  "--density", "2"])
        args.func(args)


def test_daff_rules_run_only_with_the_daff_method(tmp_path):
    from histosynth.config import validate_config
    from tests.test_settings import REPO, _check_rules_pass_the_config, _rule_commands

    cfg = validate_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    cfg["sample_masks"]["method"] = "daff"
    cfg["daff"]["steps"] = 3
    commands = _rule_commands(tmp_path, cfg, "masks")
    seen = _check_rules_pass_the_config(commands, cfg)
    assert {"daff-library", "train-daff-g1", "sample-masks"} <= seen
    sample = [c for c in commands if c[0] == "sample-masks"]
    assert sample and all(c[1].endswith("models/daff/library.npz") and c[2].endswith("models/daff/g1/g1.pt")
                          for c in sample)
    assert all("--method" in c and c[c.index("--method") + 1] == "daff" for c in sample)


def test_untyped_nuclei_stay_out_and_a_library_g1_type_mismatch_is_named(trained, tmp_path):
    d, _ = trained
    ps = tmp_path / "ps"
    inst = np.zeros((32, 32), np.int32)
    types = np.zeros((32, 32), np.uint8)
    inst[2:6, 2:6], types[2:6, 2:6] = 1, 1
    inst[20:24, 20:24] = 2  # no typed pixel
    with PatchSetWriter(ps, ("inst", "types"), (32, 32)) as w:
        w.add({"slide": "s", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5, "width": 32, "height": 32,
               "tissue_fraction": 1.0, "n_nuclei": 2, "source": "t"}, inst=inst, types=types)
    build_centroid_library([ps], tmp_path / "lib.npz", classes={1: "a"})
    assert load_centroid_library(tmp_path / "lib.npz").points.tolist() == [[4, 4, 1]]
    f = _points_geojson(tmp_path / "p.geojson", [(5, 5, "c")])
    build_centroid_library([], tmp_path / "three.npz", point_files=[f], classes={"a": 1, "b": 2, "c": 3})
    with pytest.raises(HistosynthError, match=r"type\(s\) \[3\] that G1 \(2 types\)") as err:
        sample_masks(None, None, 1, 64, 0, method="daff", daff={"library": tmp_path / "three.npz",
                                                                 "g1": d / "g1" / "g1.pt"})
    assert "g1.pt" in str(err.value)


@pytest.mark.parametrize("op", ["cover", "combine"])
def test_cover_and_combine_mix_two_point_images_keeping_them_apart(op):
    grid = np.stack(np.meshgrid(np.arange(4, 64, 10), np.arange(4, 64, 10), indexing="ij"), -1).reshape(-1, 2)
    lib = _lib_of([np.c_[grid, np.full(len(grid), 1)], np.c_[grid + 3, np.full(len(grid), 2)]])
    sampler = LayoutSampler(lib, 64, ops=(op,))
    rng = np.random.default_rng(0)
    layouts = [sampler.layout(rng) for _ in range(40)]
    mixed = [lay for lay in layouts if len(set(lay[:, 2])) == 2]
    assert len(mixed) >= 5  # applied with probability 1/2, and the second image is the other entry half the time
    for lay in mixed:
        d = np.linalg.norm(lay[:, None, :2] - lay[None, :, :2], axis=-1) + np.eye(len(lay)) * 99
        assert d.min() >= lib.min_distance - 1  # seams keep the library's minimum distance (rounding: 1 px)
    assert all(len(set(lay[:, 2])) == 1 for lay in (LayoutSampler(lib, 64, ops=()).layout(rng) for _ in range(10)))


def test_geojson_points_reader_takes_point_and_multipoint(tmp_path):
    from histosynth.io.annotations import read_geojson_points

    f = tmp_path / "p.geojson"
    f.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3.5, 4]]},
         "properties": {"classification": {"name": "T"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
         "properties": {}}]}))
    assert read_geojson_points(f) == ([(1.0, 2.0, "T", 0), (3.5, 4.0, "T", 0)], 1)
    f.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": ["a", 1]}}))
    with pytest.raises(HistosynthError, match="feature 0: a point is not two finite numbers") as err:
        read_geojson_points(f)
    assert "p.geojson" in str(err.value)
