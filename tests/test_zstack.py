"""multifocus.zstack (OME-TIFF and NDPI-tagged z-stacks) and multifocus.demo (#20)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.multifocus.demo import render_zstack, write_ome_zstack
from histosynth.multifocus.stacks import focus_measure
from histosynth.multifocus.zstack import focal_planes, open_zstack


def _stack(z=5, h=96, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (z, h, w, 3), dtype=np.uint8)


def _ndpi(path, planes, offsets_nm, sizes=None, macro=True):
    """A TIFF carrying the NDPI tags (65420 FileFormat, Make, 65421 Magnification, 65424 ZOffset) per page:
    each plane a full-resolution page and a half-size one; tifffile cannot write a real .ndpi."""
    with tifffile.TiffWriter(path) as w:
        for i, (plane, off) in enumerate(zip(planes, offsets_nm)):
            if sizes is not None:
                plane = plane[: sizes[i][1], : sizes[i][0]]
            tags = [(271, "s", 0, "Hamamatsu", True), (65420, "I", 1, 1, True), (65421, "f", 1, 40.0, True),
                    (65424, "i", 1, off, True)]
            w.write(plane, photometric="rgb", tile=(32, 32), resolution=(40000, 40000), resolutionunit="CENTIMETER",
                    extratags=tags)
            w.write(np.ascontiguousarray(plane[::2, ::2]), photometric="rgb", tile=(32, 32), extratags=tags)
        if macro:
            w.write(planes[0][:20, :20], photometric="rgb", extratags=[(271, "s", 0, "Hamamatsu", True),
                                                                        (65420, "I", 1, 1, True),
                                                                        (65421, "f", 1, -1.0, True)])


def test_ome_round_trip_offsets_and_regions(tmp_path):
    data = _stack()
    path = tmp_path / "z.ome.tif"
    write_ome_zstack(path, data, mpp=0.25, spacing_um=1.5)
    with open_zstack(path) as zs:
        assert zs.format == "ome-tiff" and zs.planes == 5 and zs.name == "z"
        assert zs.plane_offsets_um == [-3.0, -1.5, 0.0, 1.5, 3.0]  # centred on the middle plane
        assert zs.dimensions == (80, 96) and zs.mpp == pytest.approx(0.25)
        assert np.array_equal(zs.read_region(10, 20, 50, 40), data[:, 20:60, 10:60])
        edge = zs.read_region(-5, 90, 20, 20)  # outside the slide: white
        assert np.array_equal(edge[:, :6, 5:], data[:, 90:, :15]) and edge[:, 6:].min() == 255
    assert focal_planes(path)["plane_offsets_um"] == [-3.0, -1.5, 0.0, 1.5, 3.0]


def test_ome_plane_positions_and_units(tmp_path):
    data = _stack(z=4)
    path = tmp_path / "p.ome.tif"
    tifffile.imwrite(path, data, photometric="rgb", ome=True,
                     metadata={"axes": "ZYXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 250,
                               "PhysicalSizeYUnit": "nm", "Plane": {"PositionZ": [10.0, 10.5, 11.5, 12.0]}})
    with open_zstack(path) as zs:
        assert zs.plane_offsets_um == [-1.0, -0.5, 0.5, 1.0] and zs.mpp == pytest.approx(0.25)
        assert np.array_equal(zs.read_region(0, 0, 80, 96), data)  # untiled planes: read whole


def test_ndpi_focal_planes_ordered_by_offset(tmp_path):
    data = _stack(z=3, h=128, w=96)
    path = tmp_path / "n.tif"
    _ndpi(path, [data[1], data[0], data[2]], [0, -2000, 2000])
    with open_zstack(path) as zs:
        assert zs.format == "ndpi" and zs.plane_offsets_um == [-2.0, 0.0, 2.0] and zs.mpp == pytest.approx(0.25)
        assert np.array_equal(zs.read_region(0, 0, 96, 128), data)


@pytest.mark.parametrize("case, message", [
    ("single", "1 focal plane; a z-stack needs at least 2"),
    ("sizes", "focal planes of different sizes"),
    ("duplicate", "duplicate focal planes"),
    ("duplicate-ome", "duplicate focal offsets"),
    ("decreasing", "not increasing"),
    ("zero-step", "PhysicalSizeZ must be positive"),
    ("garbage", "unreadable as a TIFF z-stack"),
    ("missing", "no such file"),
])
def test_bad_zstacks_are_named(tmp_path, case, message):
    path = tmp_path / f"{case}.ome.tif"
    data = _stack(z=3)
    if case == "single":
        write_ome_zstack(path, data[:1], mpp=0.25, spacing_um=1.0)
    elif case == "sizes":
        path = tmp_path / "sizes.tif"
        _ndpi(path, list(data), [-1000, 0, 1000], sizes=[(80, 96), (80, 96), (64, 96)])
    elif case == "duplicate":
        path = tmp_path / "dup.tif"
        _ndpi(path, list(data), [0, 0, 1000])
    elif case in ("decreasing", "duplicate-ome"):
        tifffile.imwrite(path, data, photometric="rgb", ome=True,
                         metadata={"axes": "ZYXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
                                   "Plane": {"PositionZ": [3.0, 2.0, 1.0] if case == "decreasing" else [1, 1, 2]}})
    elif case == "zero-step":
        write_ome_zstack(path, data, mpp=0.25, spacing_um=1.0)
        xml = tifffile.tiffcomment(path)
        tifffile.tiffcomment(path, xml.replace('PhysicalSizeZ="1.0"', 'PhysicalSizeZ="0.0"').encode())
    elif case == "garbage":
        path.write_bytes(b"II*\x00 not really a tiff" * 10)
    with pytest.raises(HistosynthError, match=message) as err:
        open_zstack(path).close()
    assert str(path) in str(err.value)


def test_slide_info_lists_focal_planes_only_for_stacks(tmp_path, capsys):
    stack = tmp_path / "z.ome.tif"
    write_ome_zstack(stack, _stack(), mpp=0.25, spacing_um=1.0)
    assert main(["slide-info", str(stack)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["focal_planes"] == {"format": "ome-tiff", "planes": 5,
                                    "plane_offsets_um": [-2.0, -1.0, 0.0, 1.0, 2.0]}
    single = tmp_path / "one.tif"
    tifffile.imwrite(single, _stack(z=1)[0], photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    assert main(["slide-info", str(single)]) == 0
    assert "focal_planes" not in json.loads(capsys.readouterr().out)


def test_demo_is_deterministic_and_sharpest_at_each_cells_depth():
    a, cells = render_zstack((256, 256), planes=7, spacing_um=1.0, mpp=0.25, n_cells=10, seed=3)
    b, _ = render_zstack((256, 256), planes=7, spacing_um=1.0, mpp=0.25, n_cells=10, seed=3)
    c, _ = render_zstack((256, 256), planes=7, spacing_um=1.0, mpp=0.25, n_cells=10, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (7, 256, 256, 3) and len(cells) >= 5
    hits = 0
    for cell in cells.itertuples():
        r = int(cell.radius_px * 0.5)
        window = a[:, max(cell.y - r, 0) : cell.y + r, max(cell.x - r, 0) : cell.x + r]
        hits += int(np.argmax(focus_measure(window))) == cell.best_plane
    assert hits >= 0.8 * len(cells)


def test_demo_zstack_cli(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo-zstack", str(out), "--size", "128", "128", "--planes", "3", "--n-cells", "3",
                 "--n-slides", "2", "--seed", "1"]) == 0
    cells = pd.read_csv(out / "cells.csv")
    assert set(cells.slide) == {"zstack-00", "zstack-01"} and (out / "preview.png").is_file()
    assert cells.best_plane.between(0, 2).all()
    with open_zstack(out / "zstack-01.ome.tif") as zs:
        assert zs.planes == 3 and zs.plane_offsets_um == [-1.0, 0.0, 1.0]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_real_single_plane_ndpi_is_read_and_refused_as_a_stack(shared_data):
    """A real Hamamatsu NDPI (one focal plane, JPEG tiles) goes through the NDPI path: one plane of its size,
    read as an image, and refused where a z-stack is asked for, naming the file."""
    from tests.conftest import shared_file

    ndpi = shared_file("wsi", "test3-DAPI-2-(387).ndpi")
    one = open_zstack(ndpi, min_planes=1, mpp_fallback=0.25)
    try:
        assert one.format == "ndpi" and one.planes == 1
        w, h = one.dimensions
        region = one.read_region(w // 2, h // 2, 32, 24)
        assert region.shape == (1, 24, 32, 3) and region.dtype == np.uint8
    finally:
        one.close()
    with pytest.raises(HistosynthError, match="1 focal plane; a z-stack needs at least 2") as err:
        open_zstack(ndpi, mpp_fallback=0.25)
    assert "test3-DAPI-2-(387).ndpi" in str(err.value)
