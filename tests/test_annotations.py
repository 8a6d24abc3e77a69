"""histosynth.io.annotations: every format, the coordinate convention, bad input."""

from __future__ import annotations

import logging
import math
import re
import struct
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
import shapely
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon, box
from skimage.draw import polygon2mask

from histosynth.errors import HistosynthError
from histosynth.io import annotations as A
from histosynth.io.annotations import Nucleus, detect_format, instance_polygons, read, write_geojson

from .conftest import shared_file

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def rasterize(poly: Polygon, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Pixel-centre rule: vertices shifted by -0.5 for skimage (centres on integers)."""
    ox, oy = origin

    def ring(r):
        c = np.asarray(r.coords)
        return np.column_stack([c[:, 1] - oy, c[:, 0] - ox]) - 0.5

    m = polygon2mask(shape, ring(poly.exterior))
    for h in poly.interiors:
        m &= ~polygon2mask(shape, ring(h))
    return m


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def _save(tmp_path: Path, name: str, arr: np.ndarray) -> Path:
    p = tmp_path / name
    np.save(p, arr)
    return p


def geojson(features: list) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def feature(coords, name=None, gtype="Polygon", **extra) -> dict:
    props = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [0, 0, 0]}
    return {
        "type": "Feature",
        "geometry": {"type": gtype, "coordinates": coords},
        "properties": props,
        **extra,
    }


def square(x, y, s=4):
    return [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]


def imagescope(regions, *, mpp='MicronsPerPixel="0.250000"', name="", attr="Description") -> str:
    out = [f"<Annotations {mpp}>", f'<Annotation Id="1" Name="{name}"><Attributes>']
    out.append(f'<Attribute Name="{attr}" Id="0" Value=""/></Attributes><Regions>')
    for rid, pts, *rtype in regions:
        t = rtype[0] if rtype else "0"
        out.append(f'<Region Id="{rid}" Type="{t}"><Attributes/><Vertices>')
        out.extend(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in pts)
        out.append("</Vertices></Region>")
    out.append("</Regions></Annotation></Annotations>")
    return "\n".join(out)


def asap(annotations) -> str:
    out = ['<?xml version="1.0"?>', "<ASAP_Annotations><Annotations>"]
    for i, (atype, group, pts, *order) in enumerate(annotations):
        out.append(f'<Annotation Name="Annotation {i}" Type="{atype}" PartOfGroup="{group}" Color="#F4FA58">')
        out.append("<Coordinates>")
        idx = order[0] if order else range(len(pts))
        out.extend(f'<Coordinate Order="{o}" X="{x}" Y="{y}"/>' for o, (x, y) in zip(idx, pts))
        out.append("</Coordinates></Annotation>")
    out.append("</Annotations><AnnotationGroups/></ASAP_Annotations>")
    return "\n".join(out)


def roi_bytes(rtype: int, coords=None, rect=None, subpixel=False, options=0, version=227) -> bytes:
    """A minimal ImageJ .roi (64-byte big-endian header + coordinates)."""
    hdr = bytearray(64)
    hdr[0:4] = b"Iout"
    struct.pack_into(">h", hdr, 4, version)
    hdr[6] = rtype
    body = b""
    if coords is not None:
        c = np.asarray(coords, dtype=np.float64)
        left, top = int(math.floor(c[:, 0].min())), int(math.floor(c[:, 1].min()))
        right, bottom = int(math.ceil(c[:, 0].max())), int(math.ceil(c[:, 1].max()))
        struct.pack_into(">H", hdr, 16, len(c))
        body = (np.floor(c[:, 0]) - left).astype(">i2").tobytes() + (np.floor(c[:, 1]) - top).astype(
            ">i2"
        ).tobytes()
        if subpixel:
            options |= 128
            body += c[:, 0].astype(">f4").tobytes() + c[:, 1].astype(">f4").tobytes()
    else:
        left, top, right, bottom = rect
    struct.pack_into(">hhhh", hdr, 8, top, left, bottom, right)
    struct.pack_into(">h", hdr, 50, options)
    return bytes(hdr) + body


def rle_string(counts) -> str:
    """pycocotools' compressed RLE encoding (rleToString)."""
    out = []
    for i, x in enumerate(counts):
        x = int(x)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.ravel().astype(np.int8)  # column-major
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    runs = np.diff(np.concatenate([[0], change]))
    return [int(v) for v in runs[runs >= 0]] if flat[0] == 0 else [0, *[int(v) for v in runs[1:]]]


def check_report(s: A.AnnotationSet) -> None:
    """Every item read is either kept or counted under one skip key."""
    r = s.report
    skipped = sum(v for k, v in r.items() if k.startswith("skipped_")) + r["outside_slide"]
    assert r["read"] == r["kept"] + skipped, r
    assert r["kept"] == len(s.nuclei)
    assert [n.id for n in s.nuclei] == list(range(1, len(s.nuclei) + 1))
    assert all(n.polygon.is_valid and n.polygon.area > 0 for n in s.nuclei)
    assert all(n.type_id >= 1 for n in s.nuclei)
    assert sum(s.class_counts.values()) == len(s.nuclei)


# --------------------------------------------------------------------------- #
# Real data: every file, counts against PROVENANCE.md
# --------------------------------------------------------------------------- #

PUMA = {
    "training_set_metastatic_roi_001_nuclei.geojson": (
        633,
        {"tumor": 502, "apoptosis": 120, "lymphocyte": 8, "endothelium": 3},
        5,
        3,
    ),
    "training_set_metastatic_roi_102_nuclei.geojson": (302, {"tumor": 192, "apoptosis": 110}, 0, 2),
    "training_set_primary_roi_006_nuclei.geojson": (
        284,
        {"tumor": 82, "lymphocyte": 74, "endothelium": 51, "histiocyte": 51, "stroma": 17, "melanophage": 9},
        0,
        0,
    ),
    "training_set_primary_roi_101_nuclei.geojson": (
        382,
        {
            "lymphocyte": 141,
            "epithelium": 98,
            "histiocyte": 56,
            "tumor": 41,
            "stroma": 31,
            "melanophage": 8,
            "endothelium": 5,
            "apoptosis": 2,
        },
        0,
        20,
    ),
}


@pytest.mark.parametrize("name", sorted(PUMA))
def test_qupath_geojson_puma(name):
    path = shared_file("annotation-formats", "qupath_geojson_puma", name)
    n, classes, n_multi, n_holes = PUMA[name]
    assert detect_format(path) == "geojson"
    s = read(path, slide_size=(1024, 1024))
    check_report(s)
    assert s.format == "geojson" and len(s.nuclei) == n
    assert s.class_counts == classes
    multi = sum(f["geometry"]["type"] == "MultiPolygon" for f in orjson.loads(path.read_bytes())["features"])
    assert multi == n_multi
    assert (s.report["multipolygon_parts_dropped"] > 0) == (n_multi > 0)
    assert sum(len(nu.polygon.interiors) > 0 for nu in s.nuclei) == n_holes
    assert s.report["repaired_invalid"] == 0 and s.report["outside_slide"] == 0
    # real class maps: prefix "nuclei_" stripped, case-insensitive
    cmap = {name.upper(): i + 1 for i, name in enumerate(sorted(classes))}
    t = read(path, cmap)
    assert Counter(nu.type_id for nu in t.nuclei) == Counter({cmap[k.upper()]: v for k, v in classes.items()})


def test_puma_unknown_classes_listed_with_counts():
    path = shared_file(
        "annotation-formats", "qupath_geojson_puma", "training_set_metastatic_roi_001_nuclei.geojson"
    )
    with pytest.raises(HistosynthError) as e:
        read(path, {"tumor": 1, "lymphocyte": 2})
    msg = str(e.value)
    assert str(path) in msg
    assert "unknown class names: 'apoptosis' (120), 'endothelium' (3)" in msg
    assert "catch_all" in msg
    s = read(path, {"tumor": 1, "lymphocyte": 2, "other": 3}, catch_all="other")
    assert s.report["catch_all"] == 123
    assert s.class_counts == {"tumor": 502, "lymphocyte": 8, "other": 123}
    assert s.source_class_counts["apoptosis"] == 120
    s = read(path, {"tumor": 1, "lymphocyte": 2}, catch_all=2)
    assert s.class_counts == {"tumor": 502, "lymphocyte": 131}


ASAP_FILES = {
    "camelyon16_tumor_085_metastasis_polygons.xml": (50, {"metastasis": 50}, 0),
    "camelyon16_tumor_036_metastasis_negative.xml": (105, {"metastasis": 103, "negative": 2}, 0),
    "camelyon16_tumor_009_splines.xml": (6, {"metastasis": 6}, 6),
    "tcga_P3-A6T6_tissue_negative_splines.xml": (44, {"tissue": 18, "negative": 26}, 44),
    "camelyon16_tumor_001_tissue_artifact_background_mixed.xml": (12, None, 2),
    "camelyon16_normal_004_tissue_trash.xml": (39, {"tissue": 38, "trash": 1}, 0),
}


@pytest.mark.parametrize("name", sorted(ASAP_FILES))
def test_asap_xml(name):
    path = shared_file("annotation-formats", "asap_xml", name)
    n, classes, n_splines = ASAP_FILES[name]
    assert detect_format(path) == "asap"
    s = read(path)
    check_report(s)
    assert s.report["read"] == n and len(s.nuclei) == n
    if classes:
        assert s.class_counts == classes
    else:
        assert set(s.class_counts) == {"tissue", "artifact", "background"}
    assert s.report.get("splines_sampled", 0) == n_splines
    assert s.mpp is None


def test_asap_spline_passes_through_control_points():
    path = shared_file(
        "annotation-formats", "asap_xml", "camelyon16_tumor_001_tissue_artifact_background_mixed.xml"
    )
    text = path.read_text()
    # the first Spline annotation's control points all lie on the sampled outline
    m = re.search(r'Type="Spline".*?<Coordinates>(.*?)</Coordinates>', text, re.S)
    pts = np.array([[float(x), float(y)] for x, y in re.findall(r'X="([^"]+)" Y="([^"]+)"', m.group(1))])
    s = read(path)
    spline = next(nu for nu in s.nuclei if len(nu.polygon.exterior.coords) >= 8 * len(pts) * 0.9)
    d = shapely.distance(spline.polygon.exterior, shapely.points(pts))
    assert d.max() < 1e-6


def test_imagescope_monusac_layers():
    path = shared_file("annotation-formats", "imagescope_xml_monusac", "TCGA-P4-AAVK-01Z-00-DX1_6.xml")
    assert detect_format(path) == "imagescope"
    s = read(path)
    check_report(s)
    assert len(s.nuclei) == 3 and s.class_counts == {"neutrophil": 3}
    assert s.mpp == pytest.approx(0.2526)
    t = read(path, {"Epithelial": 1, "Lymphocyte": 2, "Neutrophil": 3, "Macrophage": 4})
    assert [n.type_id for n in t.nuclei] == [3, 3, 3] and t.class_counts == {"Neutrophil": 3}


@pytest.fixture(scope="module")
def monuseg(shared_data):
    files = sorted((shared_data / "monuseg-train" / "annotations").glob("*.xml"))
    if not files:
        pytest.skip("MoNuSeg annotations not found")
    return {f: read(f, slide_size=(1000, 1000)) for f in files}


def test_monuseg_all_files(monuseg):
    assert len(monuseg) == 13
    total = 0
    no_mpp = []
    frame = box(0, 0, 1000, 1000)
    for f, s in monuseg.items():
        check_report(s)
        n_regions = len(re.findall(rb"<Region ", f.read_bytes()))
        assert s.report["read"] == n_regions
        total += n_regions
        assert s.class_counts == {"": len(s.nuclei)}
        assert all(frame.covers(n.polygon) for n in s.nuclei)
        assert s.report["outside_slide"] == 0
        if s.mpp is None:
            no_mpp.append(f.name)
        else:
            assert 0.24 < s.mpp < 0.26
    assert total == 4951
    assert no_mpp == ["TCGA-NH-A8F7-01A-01-TS1.xml"]
    reports = Counter()
    for s in monuseg.values():
        reports.update(s.report)
    # things PROVENANCE.md says a reader meets here
    assert reports["skipped_degenerate"] >= 1  # regions with < 3 vertices
    assert reports["clipped"] >= 1  # vertices from -3 to 1002
    assert reports["repaired_invalid"] > 0
    assert reports["kept"] > 4900


def test_monuseg_class_map_needs_catch_all(monuseg):
    path = min(monuseg, key=lambda f: f.stat().st_size)
    with pytest.raises(
        HistosynthError, match=r"unknown class names: '' \(\d+\) \[no class name in the file\]"
    ):
        read(path, {"nucleus": 1})
    s = read(path, {"nucleus": 1}, catch_all="nucleus")
    assert set(s.class_counts) == {"nucleus"} and s.report["catch_all"] == len(s.nuclei)


@pytest.fixture(scope="module")
def consep(shared_data):
    root = shared_data / "consep-patches"
    insts = sorted((root / "inst" / "test").glob("*.npy"))
    if not insts:
        pytest.skip("CoNSeP patches not found")
    return root, {p: read(p, types=root / "type_mat" / "test" / (p.stem + ".mat")) for p in insts}


def test_consep_instance_maps_with_types(consep):
    root, sets = consep
    assert len(sets) == 224
    types = Counter()
    for p, s in sets.items():
        check_report(s)
        assert s.format == "label"
        assert s.image_size == (256, 256)
        types.update(s.class_counts)
    assert sum(types.values()) == 10330
    assert types == {"1": 658, "2": 1879, "3": 3844, "4": 3949}
    assert sum(1 for s in sets.values() if not s.nuclei) == 2


def test_consep_roundtrip_dice(consep):
    """Polygons re-rasterised with the pixel-centre rule give back the instance maps."""
    root, sets = consep
    dices = []
    for p, s in sets.items():
        inst = np.load(p)
        ids, sizes = np.unique(inst, return_counts=True)
        size_of = dict(zip(ids.tolist(), sizes.tolist()))
        for nu in s.nuclei:
            iid = int(nu.source.split()[-1])
            x0, y0, x1, y1 = (int(v) for v in np.round(nu.polygon.bounds))
            m = rasterize(nu.polygon, (y1 - y0, x1 - x0), (x0, y0))
            o = inst[y0:y1, x0:x1] == iid
            dices.append(2 * (m & o).sum() / (m.sum() + size_of[iid]))
    d = np.asarray(dices)
    assert len(d) == 10330
    assert d.mean() >= 0.98  # measured 0.99986: exact except 11 multi-piece instances
    assert (d == 1.0).sum() >= 10300


def test_consep_type_mat_alone_and_slide_size(consep):
    root, _ = consep
    mat = root / "type_mat" / "test" / "test_10_000.mat"
    assert detect_format(mat) == "mat"
    with pytest.raises(HistosynthError, match="no 'inst_map'.*types="):
        read(mat)
    npy = root / "inst" / "test" / "test_10_000.npy"
    assert detect_format(npy) == "label"
    assert len(read(npy, slide_size=(256, 256), types=mat).nuclei) == 47
    with pytest.raises(HistosynthError, match="label image is 256 x 256.*slide is 512 x 256"):
        read(npy, slide_size=(512, 256))
    # without a type map the class names are empty
    s = read(npy)
    assert set(s.class_counts) == {""}


def test_consep_mat_with_inst_map(consep, tmp_path):
    """A HoVer-Net style .mat (inst_map + inst_type) read directly."""
    import scipy.io

    root, sets = consep
    npy = root / "inst" / "test" / "test_10_003.npy"
    mat = scipy.io.loadmat(root / "type_mat" / "test" / "test_10_003.mat")
    inst = np.load(npy)
    ids = np.unique(inst)[1:]
    dense = np.searchsorted(ids, inst) + 1
    dense[inst == 0] = 0
    out = tmp_path / "tile.mat"
    scipy.io.savemat(out, {"inst_map": dense.astype(np.int32), "inst_type": mat["inst_type"]})
    s = read(out)
    assert s.format == "mat"
    assert s.class_counts == sets[npy].class_counts
    assert [n.polygon.wkb for n in s.nuclei] == [n.polygon.wkb for n in sets[npy].nuclei]
    t = read(out, {"1": 1, "2": 2, "3": 3, "4": 4})
    assert {n.type_id for n in t.nuclei} <= {1, 2, 3, 4}


def test_coco_consep(shared_data):
    path = shared_file("consep-patches", "annotations", "test", "instances_test.json")
    assert detect_format(path) == "coco"
    sets = A.read_coco_all(path)
    assert len(sets) == 224
    assert sum(s.report["read"] for s in sets.values()) == 10307
    names = set()
    for s in sets.values():
        check_report(s)
        names |= set(s.class_counts)
    assert names == {"inflammatory", "healthy_epithelial", "epithelial", "spindle-shaped"}
    one = read(path, image="test_1_000.jpg")
    assert len(one.nuclei) == len(sets["test_1_000.jpg"].nuclei)
    assert read(path, image=1).report == one.report
    with pytest.raises(HistosynthError, match="holds 224 images; pass image="):
        read(path)
    with pytest.raises(HistosynthError, match="no image 'nope.jpg'"):
        read(path, image="nope.jpg")


@pytest.mark.parametrize("case,n", [("TCGA-DE-A4MA", 59), ("TCGA-S4-A8RO", 117)])
def test_imagej_roiset_cryonuseg(case, n):
    path = shared_file("cryonuseg-sample", case, "RoiSet.zip")
    assert detect_format(path) == "imagej"
    s = read(path, slide_size=(512, 512))
    check_report(s)
    assert s.report["read"] == n and len(s.nuclei) == n
    assert s.class_counts == {"": n}
    # outlines sit inside the 512 x 512 patch
    assert all(box(0, 0, 512, 512).covers(nu.polygon) for nu in s.nuclei)
    areas = np.array([nu.polygon.area for nu in s.nuclei])
    assert 20 < np.median(areas) < 2000


# --------------------------------------------------------------------------- #
# Hand-written cases per format
# --------------------------------------------------------------------------- #


def test_geojson_variants(tmp_path):
    sq = square(10, 10)
    # single Feature, classification as a plain string
    f = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": sq},
        "properties": {"classification": "Tumor"},
    }
    s = read(write(tmp_path, "one.geojson", orjson.dumps(f)))
    assert len(s.nuclei) == 1 and s.nuclei[0].class_name == "tumor"
    # bare list; properties.name fallback; classification.names (derived class)
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": sq},
            "properties": {"name": "Lympho"},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": square(20, 20)},
            "properties": {"classification": {"names": ["Tumor", "Positive"]}},
        },
        {"type": "Feature", "geometry": None, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}},
    ]
    s = read(write(tmp_path, "list.json", orjson.dumps(feats)))
    assert s.format == "geojson"
    assert [n.class_name for n in s.nuclei] == ["lympho", "tumor: positive"]
    assert s.report["skipped_no_geometry"] == 1 and s.report["skipped_not_polygon"] == 1
    check_report(s)
    # QuPath cell: the nucleus geometry wins over the cell outline
    cell = feature(
        square(0, 0, 20), "Tumor", nucleusGeometry={"type": "Polygon", "coordinates": square(5, 5, 4)}
    )
    s = read(write(tmp_path, "cell.geojson", geojson([cell])))
    assert s.nuclei[0].polygon.area == 16


def test_geojson_holes_and_multipolygon(tmp_path):
    shell = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    hole = [[3, 3], [6, 3], [6, 6], [3, 6], [3, 3]]
    multi = [[shell, hole], [[[20, 20], [21, 20], [21, 21], [20, 20]]]]
    s = read(write(tmp_path, "m.geojson", geojson([feature(multi, "a", "MultiPolygon")])))
    assert len(s.nuclei) == 1
    p = s.nuclei[0].polygon
    assert len(p.interiors) == 1 and p.area == 100 - 9
    assert s.report["multipolygon_parts_dropped"] == 1


def test_class_map_matching_rules(tmp_path):
    feats = [
        feature(square(0, 0), "nuclei_Tumor"),
        feature(square(10, 0), " TUMOR "),
        feature(square(20, 0), "cell_lymphocyte"),
        feature(square(30, 0), "nucleus_lymphocyte"),
    ]
    p = write(tmp_path, "c.geojson", geojson(feats))
    s = read(p, {"Tumor": 1, "Lymphocyte": 2})
    assert [(n.class_name, n.type_id) for n in s.nuclei] == [
        ("Tumor", 1),
        ("Tumor", 1),
        ("Lymphocyte", 2),
        ("Lymphocyte", 2),
    ]
    # the name as-is wins over the prefix-stripped one
    s = read(p, {"nuclei_tumor": 5, "tumor": 1, "lymphocyte": 2})
    assert [n.type_id for n in s.nuclei] == [5, 1, 2, 2]
    # class_map=None: every type id is 1, names normalised
    s = read(p)
    assert {n.type_id for n in s.nuclei} == {1} and s.class_counts == {"tumor": 2, "lymphocyte": 2}
    with pytest.raises(HistosynthError, match="type ids must be integers >= 1"):
        read(p, {"tumor": 0})
    with pytest.raises(HistosynthError, match="catch_all 'other' is not a class"):
        read(p, {"tumor": 1}, catch_all="other")


def test_imagescope_hand_written(tmp_path):
    regions = [
        (1, [(0, 0), (10, 0), (10, 10), (0, 10), (0, 0)]),  # closing vertex repeated
        (2, [(5, 5), (6, 6)]),  # < 3 points
        (3, [(0, 0), (5, 5), (10, 10)]),  # collinear: no area
        (4, [(20, 20), (30, 30), (30, 20), (20, 30)]),  # bow-tie
        (5, [(40, 40), (50, 46)], "2"),  # ellipse from its box corners
        (6, [(60, 60), (70, 60), (70, 64), (60, 64)], "1"),  # rectangle
        (7, [(0, 0), (1, 1)], "3"),  # arrow
    ]
    p = write(tmp_path, "s.xml", imagescope(regions, name="Tumor"))
    assert detect_format(p) == "imagescope"
    s = read(p)
    check_report(s)
    assert s.mpp == 0.25
    assert [n.source for n in s.nuclei] == [
        "Annotation 1 Region 1",
        "Annotation 1 Region 4",
        "Annotation 1 Region 5",
        "Annotation 1 Region 6",
    ]
    assert s.report["skipped_degenerate"] == 2 and s.report["repaired_invalid"] == 1
    assert s.report["skipped_not_polygon"] == 1
    assert s.nuclei[0].polygon.area == 100
    assert s.nuclei[1].polygon.area == pytest.approx(25)  # a bow-tie splits: the larger lobe is kept
    assert s.nuclei[2].polygon.area == pytest.approx(math.pi * 5 * 3, rel=0.01)
    assert s.nuclei[3].polygon.area == 40
    assert set(s.class_counts) == {"tumor"}
    # no MicronsPerPixel -> None; the "Description" attribute is not a class
    s = read(write(tmp_path, "n.xml", imagescope(regions[:1], mpp="")))
    assert s.mpp is None and s.class_counts == {"": 1}


def test_asap_hand_written(tmp_path):
    ctrl = [(0, 0), (10, 0), (10, 10), (0, 10)]
    p = write(
        tmp_path,
        "a.xml",
        asap(
            [
                ("Spline", "tumor", ctrl),
                ("Polygon", "Tumor", [(20, 20), (30, 30), (30, 20), (20, 30)], [0, 2, 1, 3]),
                ("Dot", "tumor", [(1, 1)]),
            ]
        ),
    )
    assert detect_format(p) == "asap"
    s = read(p, {"tumor": 1})
    check_report(s)
    spline, poly = s.nuclei
    assert len(spline.polygon.exterior.coords) == 4 * 8 + 1
    assert shapely.distance(spline.polygon.exterior, shapely.points(ctrl)).max() < 1e-9
    assert 100 < spline.polygon.area < 140  # bulges out of the control square
    # Order attributes are honoured: listed as a bow-tie, ordered a square
    assert poly.polygon.area == 100 and s.report["reordered"] == 1
    assert s.report["repaired_invalid"] == 0
    assert s.report["skipped_not_polygon"] == 1


def test_imagej_roi_types(tmp_path):
    tri = [(10, 10), (20, 10), (15, 18)]
    entries = {
        "poly.roi": roi_bytes(0, tri),
        "free.roi": roi_bytes(7, [(30, 30), (40, 30), (40, 40), (30, 40)]),
        "traced.roi": roi_bytes(8, [(50, 50), (52, 50), (52, 51), (50, 51)]),
        "rect.roi": roi_bytes(1, rect=(60, 60, 64, 66)),
        "oval.roi": roi_bytes(2, rect=(70, 70, 80, 76)),
        "sub.roi": roi_bytes(7, [(90.25, 90.5), (95.75, 90.5), (95.75, 96.25)], subpixel=True),
        "line.roi": roi_bytes(3, rect=(0, 0, 5, 5)),
    }
    zp = tmp_path / "RoiSet.zip"
    with zipfile.ZipFile(zp, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    assert detect_format(zp) == "imagej"
    s = read(zp)
    check_report(s)
    assert s.report["skipped_not_polygon"] == 1
    areas = [round(n.polygon.area, 3) for n in s.nuclei]
    assert areas[:4] == [40.0, 100.0, 2.0, 24.0]
    assert areas[4] == pytest.approx(math.pi * 5 * 3, rel=0.01)
    assert s.nuclei[5].polygon.area == pytest.approx(0.5 * 5.5 * 5.75)
    assert s.nuclei[1].polygon.bounds == (30, 30, 40, 40)
    single = write(tmp_path, "one.roi", entries["poly.roi"])
    assert detect_format(single) == "imagej" and len(read(single).nuclei) == 1
    with pytest.raises(HistosynthError, match="truncated"):
        read(write(tmp_path, "bad.roi", entries["poly.roi"][:-4]))


def test_imagej_traced_roi_roundtrip(tmp_path):
    """ImageJ's convention is ours: a traced outline rasterises to its pixels."""
    mask = np.zeros((12, 12), bool)
    mask[3:9, 2:7] = True
    mask[5, 7] = True
    (poly,) = instance_polygons(mask.astype(np.uint8))[1]
    coords = np.asarray(poly.exterior.coords)[:-1]
    p = write(tmp_path, "t.roi", roi_bytes(8, coords))
    got = read(p).nuclei[0].polygon
    assert np.array_equal(rasterize(got, mask.shape), mask)


def test_label_image_formats(tmp_path):
    import cv2
    import tifffile

    lab = np.zeros((20, 30), np.uint16)
    lab[2:6, 3:9] = 7
    lab[10:15, 10:14] = 300
    lab[12, 12] = 0  # a hole
    for name, save in [
        ("l.npy", lambda p: np.save(p, lab)),
        ("l.png", lambda p: cv2.imwrite(str(p), lab)),
        ("l.tif", lambda p: tifffile.imwrite(p, lab)),
    ]:
        path = tmp_path / name
        save(path)
        assert detect_format(path) == "label"
        s = read(path, slide_size=(30, 20))
        check_report(s)
        assert [n.source for n in s.nuclei] == ["instance 7", "instance 300"]
        assert s.nuclei[0].polygon.area == 24 and len(s.nuclei[1].polygon.interiors) == 1
        for n, iid in zip(s.nuclei, (7, 300)):
            assert np.array_equal(rasterize(n.polygon, lab.shape), lab == iid)
    # a sibling type map
    types = np.zeros_like(lab, dtype=np.uint8)
    types[lab == 7] = 2
    types[lab == 300] = 1
    types[10, 10] = 2  # minority vote
    np.save(tmp_path / "l_type.npy", types)
    s = read(tmp_path / "l.npy", {"1": 1, "2": 2})
    assert [n.type_id for n in s.nuclei] == [2, 1]
    with pytest.raises(HistosynthError, match="type map .* has shape"):
        read(tmp_path / "l.npy", types=_save(tmp_path, "bad.npy", np.zeros((3, 3), np.uint8)))
    # HoVer-Net (H, W, 2) [inst, type] patch
    np.save(tmp_path / "hv.npy", np.stack([lab.astype(np.int32), types.astype(np.int32)], axis=-1))
    s = read(tmp_path / "hv.npy")
    assert s.class_counts == {"2": 1, "1": 1}
    # not a label image
    with pytest.raises(HistosynthError, match="colour image"):
        rgb = np.zeros((4, 4, 3), np.uint8)
        rgb[0, 0] = (1, 2, 3)
        read(_save(tmp_path, "rgb.npy", rgb))
    with pytest.raises(HistosynthError, match="non-integer"):
        read(_save(tmp_path, "f.npy", np.full((4, 4), 0.5)))


def test_label_diagonal_pieces_and_multi_piece(tmp_path):
    lab = np.zeros((8, 8), np.int32)
    lab[1, 1] = lab[2, 2] = lab[3, 3] = 1  # 8-connected staircase: one piece
    lab[5:7, 5:7] = 2
    lab[0, 7] = 2  # a separate stray pixel of instance 2
    s = read(_save(tmp_path, "d.npy", lab))
    assert len(s.nuclei) == 2
    assert np.array_equal(rasterize(s.nuclei[0].polygon, lab.shape), lab == 1)
    assert s.nuclei[0].polygon.area == pytest.approx(3, abs=1e-3)
    m2 = lab == 2
    m2[0, 7] = False
    assert np.array_equal(rasterize(s.nuclei[1].polygon, lab.shape), m2)
    assert s.report["dropped_pieces"] == 1 and s.report["dropped_pixels"] == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), smooth=st.booleans())
def test_instance_polygons_exact_on_random_labels(seed, smooth):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 4, size=(int(rng.integers(1, 14)), int(rng.integers(1, 14))))
    if smooth:
        lab = ndimage.median_filter(lab, 3)
    ids, polys, _ = instance_polygons(lab)
    assert list(ids) == sorted(set(np.unique(lab).tolist()) - {0})
    for iid, poly in zip(ids, polys):
        assert poly.is_valid
        pieces, n = ndimage.label(lab == iid, structure=np.ones((3, 3)))
        sizes = np.bincount(pieces.ravel())[1:]
        assert np.array_equal(rasterize(poly, lab.shape), pieces == np.argmax(sizes) + 1)


def test_points_json_gaps_and_order(tmp_path):
    import cv2
    from skimage.draw import ellipse

    masks, nuclei = [], []
    rng = np.random.default_rng(0)
    for i in range(4):
        m = np.zeros((80, 80), np.uint8)
        rr, cc = ellipse(25 + 10 * i, 40, 6 + i, 10, shape=m.shape, rotation=0.3 * i)
        m[rr, cc] = 1
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        pts = contours[0][:, 0, :][::3]  # every third boundary pixel: gaps
        if i == 3:
            pts = pts[rng.permutation(len(pts))]  # unordered
        masks.append(m.astype(bool))
        nuclei.append({"class": "hepatocyte", "points": pts.tolist()} if i % 2 else pts.tolist())
    p = write(tmp_path, "crlm.json", orjson.dumps({"nuclei": nuclei}))
    assert detect_format(p) == "points_json"
    s = read(p)
    check_report(s)
    assert s.report["gaps_closed"] > 40 and s.report["reordered"] == 1
    assert s.class_counts == {"": 2, "hepatocyte": 2}
    for nu, m in zip(s.nuclei, masks):
        r = rasterize(nu.polygon, m.shape)
        assert 2 * (r & m).sum() / (r.sum() + m.sum()) > 0.95
    # x/y lists and a dict keyed by nucleus id
    q = write(
        tmp_path,
        "xy.json",
        orjson.dumps({"a": {"x": [0, 4, 4, 0], "y": [0, 0, 4, 4]}, "b": [[10, 10], [12, 10], [11, 12]]}),
    )
    s = read(q)
    assert [n.source for n in s.nuclei] == ["nucleus 'a'", "nucleus 'b'"]
    assert s.nuclei[0].polygon.bounds == (0, 0, 5, 5)  # boundary pixels 0..4 inclusive


def test_coco_hand_written_rle(tmp_path):
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:8] = True
    mask[4, 9] = True  # second piece
    anns = [
        {
            "id": 1,
            "image_id": 7,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": {"size": [10, 12], "counts": rle_counts(mask)},
        },
        {
            "id": 2,
            "image_id": 7,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": {"size": [10, 12], "counts": rle_string(rle_counts(mask))},
        },
        {"id": 3, "image_id": 7, "category_id": 2, "iscrowd": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {
            "id": 4,
            "image_id": 7,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4], [8, 8, 9, 8, 9, 9]],
        },
    ]
    data = {
        "images": [{"id": 7, "file_name": "x.png", "width": 12, "height": 10}],
        "categories": [{"id": 1, "name": "tumor"}, {"id": 2, "name": "stroma"}],
        "annotations": anns,
    }
    p = write(tmp_path, "coco.json", orjson.dumps(data))
    assert detect_format(p) == "coco"
    s = read(p)
    check_report(s)
    assert [n.class_name for n in s.nuclei] == ["tumor", "stroma", "stroma"]
    keep = mask.copy()
    keep[4, 9] = False
    for n in s.nuclei[:2]:
        assert np.array_equal(rasterize(n.polygon, mask.shape), keep)
    assert s.report["dropped_pieces"] == 2 and s.report["skipped_crowd"] == 1
    assert s.report["multipolygon_parts_dropped"] == 1 and s.nuclei[2].polygon.area == 16
    assert read(p, offset=(0.5, 0.5)).nuclei[2].polygon.bounds == (0.5, 0.5, 4.5, 4.5)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_missing_empty_unknown(tmp_path):
    with pytest.raises(HistosynthError, match="not found") as e:
        read(tmp_path / "nope.geojson")
    assert e.value.path == str(tmp_path / "nope.geojson")
    with pytest.raises(HistosynthError, match="empty annotation file"):
        read(write(tmp_path, "e.geojson", b""))
    with pytest.raises(HistosynthError, match="empty annotation file"):
        read(write(tmp_path, "w.json", b"  \n\t "))
    with pytest.raises(HistosynthError, match="unknown annotation format"):
        read(write(tmp_path, "x.bin", b"\x00\x01garbage"))
    with pytest.raises(HistosynthError, match="unknown JSON annotation format"):
        read(write(tmp_path, "x.json", b'{"hello": 1}'))
    with pytest.raises(HistosynthError, match="unknown XML annotation format"):
        read(write(tmp_path, "x.xml", b"<svg><g/></svg>"))
    with pytest.raises(HistosynthError, match="not a regular file"):
        read(tmp_path)
    with pytest.raises(HistosynthError, match="unknown format 'shp'"):
        read(write(tmp_path, "f.json", b"[]"), fmt="shp")


def test_malformed_json_and_xml(tmp_path):
    with pytest.raises(HistosynthError, match="malformed JSON") as e:
        read(write(tmp_path, "m.geojson", b'{"type": "FeatureCollection", "features": [}'))
    assert "m.geojson" in str(e.value)
    with pytest.raises(HistosynthError, match=r"malformed XML at line 3"):
        read(write(tmp_path, "m.xml", b"<Annotations>\n<Annotation>\n<Regions></Annotation>"))
    with pytest.raises(HistosynthError, match="malformed XML"):
        read(write(tmp_path, "t.xml", b'<ASAP_Annotations><Annotations><Annotation Type="Polygon">'))


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<ROOT><Annotation Name="&lol9;"/></ROOT>"""


@pytest.mark.parametrize("root", ["Annotations", "ASAP_Annotations", "lolz"])
def test_entity_bomb_and_dtd_refused(tmp_path, root):
    bomb = BILLION_LAUGHS.replace(b"ROOT", root.encode())
    p = write(tmp_path, "bomb.xml", bomb)
    with pytest.raises(HistosynthError, match="refusing unsafe XML") as e:
        read(p)
    assert "bomb.xml" in str(e.value)
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE Annotations [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<Annotations><Annotation Name="&x;"/></Annotations>'
    )
    with pytest.raises(HistosynthError, match="refusing unsafe XML"):
        read(write(tmp_path, "xxe.xml", xxe))


def test_nonfinite_coordinates_name_the_item(tmp_path):
    text = (
        b'{"type":"FeatureCollection","features":['
        + orjson.dumps(feature(square(0, 0), "a"))
        + (
            b',{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[0,0],[NaN,1],[2,2],[0,0]]]},'
            b'"properties":{}}]}'
        )
    )
    with pytest.raises(HistosynthError, match=r"feature 1: non-finite") as e:
        read(write(tmp_path, "nan.geojson", text))
    assert "nan.geojson" in str(e.value)
    xml = imagescope([(1, [(0, 0), (1, 0), (1, 1)]), (9, [(0, 0), ("inf", 0), (1, 1)])])
    with pytest.raises(HistosynthError, match="Region 9: non-finite"):
        read(write(tmp_path, "inf.xml", xml))
    xml = imagescope([(1, [(0, 0), (1, 0), (1, 1)]), (2, [(0, 0), ("abc", 0), (1, 1)])])
    with pytest.raises(HistosynthError, match="Region 2: coordinate 'abc' is not a number"):
        read(write(tmp_path, "abc.xml", xml))
    with pytest.raises(HistosynthError, match="nucleus 0: non-finite"):
        read(write(tmp_path, "p.json", b"[[[0, 0], [1, 0], [Infinity, 1]]]"))
    with pytest.raises(HistosynthError, match=r"feature 0 \(id x\): coordinates are not a list"):
        read(
            write(
                tmp_path,
                "s.geojson",
                orjson.dumps(
                    [
                        {
                            "type": "Feature",
                            "id": "x",
                            "geometry": {"type": "Polygon", "coordinates": [[["a", "b"]]]},
                        }
                    ]
                ),
            )
        )


def test_degenerate_repaired_and_clipped(tmp_path, caplog):
    feats = [
        feature(square(10, 10), "a"),  # kept
        feature([[[0, 0], [1, 1], [0, 0]]], "a"),  # < 3 distinct points
        feature([[[0, 0], [1, 1], [2, 2], [0, 0]]], "a"),  # zero area
        feature([[[20, 20], [30, 30], [30, 20], [20, 30], [20, 20]]], "a"),  # bow-tie
        feature([[[40, 40], [50, 40], [50, 50], [41, 50], [45, 38], [40, 40]]], "a"),  # self-crossing
        feature(square(98, 50, 4), "a"),  # partly outside (x 98..102)
        feature(square(200, 200), "a"),  # wholly outside
        feature(square(100, 60, 4), "a"),  # touches the edge only: outside
    ]
    p = write(tmp_path, "bad.geojson", geojson(feats))
    with caplog.at_level(logging.INFO, logger="histosynth.io.annotations"):
        s = read(p, slide_size=(100, 100))
    check_report(s)
    r = s.report
    assert r["read"] == 8 and r["kept"] == 4
    assert r["skipped_degenerate"] == 2 and r["repaired_invalid"] == 2
    assert r["outside_slide"] == 2 and r["clipped"] == 1
    assert r["skipped_nonfinite"] == 0
    bow = s.nuclei[1].polygon
    assert bow.is_valid and bow.area == pytest.approx(25)  # one lobe of the bow-tie
    clipped = s.nuclei[3].polygon
    assert clipped.bounds == (98, 50, 100, 54)
    assert [n.id for n in s.nuclei] == [1, 2, 3, 4]
    lines = [rec for rec in caplog.records if rec.name == "histosynth.io.annotations"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    for part in (
        "read 8",
        "kept 4",
        "skipped_degenerate 2",
        "repaired_invalid 2",
        "outside_slide 2",
        "clipped 1",
    ):
        assert part in msg
    # without slide_size nothing is clipped
    assert read(p).report["kept"] == 6


def test_bad_slide_size_and_catch_all(tmp_path):
    p = write(tmp_path, "a.geojson", geojson([feature(square(0, 0), "x")]))
    with pytest.raises(HistosynthError, match="slide_size"):
        read(p, slide_size=(0, 10))
    with pytest.raises(HistosynthError, match="catch_all"):
        read(p, {"y": 1}, catch_all=0)


# --------------------------------------------------------------------------- #
# Bulk reading: thousands of nuclei against a per-nucleus shapely reference
# --------------------------------------------------------------------------- #


def _star(rng: np.random.Generator, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """A simple star-shaped ring (sorted jittered angles), open (no closing vertex)."""
    ang = np.sort(2 * np.pi * (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / n)
    rr = r * (1 + 0.08 * rng.standard_normal(n))
    return np.column_stack([cx + rr * np.cos(ang), cy + rr * np.sin(ang)])


def _reference_ring(ring: np.ndarray) -> list[tuple[float, float]]:
    """What the reader keeps of a ring: consecutive repeats and the closing repeat dropped."""
    pts: list[tuple[float, float]] = []
    for x, y in ring.tolist():
        if not pts or pts[-1] != (x, y):
            pts.append((x, y))
    if len(pts) > 1 and pts[-1] == pts[0]:
        pts.pop()
    return pts


def test_bulk_geojson_and_imagescope_match_shapely_reference(tmp_path):
    rng = np.random.default_rng(7)
    n = 2000
    classes = ["Tumor", "Lymphocyte", "Stroma"]
    feats, regions, expect = [], {c: [] for c in classes}, []
    n_degenerate = n_multi = n_holes = 0
    for i in range(n):
        cls = classes[i % 3]
        cx, cy = (i % 50) * 40.0 + 20, (i // 50) * 40.0 + 20
        shell = _star(rng, cx, cy, rng.uniform(4, 12), int(rng.integers(12, 40)))
        if i % 131 == 0:  # a repeated vertex
            shell = np.insert(shell, 3, shell[3], axis=0)
        holes = []
        if i % 50 == 7:  # a hole, drawn clockwise
            holes = [_star(rng, cx, cy, 1.5, 8)[::-1]]
            n_holes += 1
        if i % 173 == 5:  # two distinct points: skipped
            shell = np.array([[cx, cy], [cx + 1, cy], [cx, cy]])
            holes = []
            n_degenerate += 1

        def closed(r, i=i):
            return np.vstack([r, r[:1]]).tolist() if i % 7 else r.tolist()  # some rings left open

        rings = [closed(shell)] + [closed(h) for h in holes]
        geometry = {"type": "Polygon", "coordinates": rings}
        if i % 97 == 3 and not holes:  # a MultiPolygon with a sliver: the large part is kept
            sliver = [[cx + 15, cy], [cx + 15.5, cy], [cx + 15, cy + 0.5], [cx + 15, cy]]
            geometry = {"type": "MultiPolygon", "coordinates": [[sliver], rings]}
            n_multi += 1
        feats.append(
            {
                "type": "Feature",
                "id": f"n{i}",
                "geometry": geometry,
                "properties": {"objectType": "detection", "classification": {"name": cls}},
            }
        )
        regions[cls].append((i + 1, shell))
        if i % 173 != 5:
            ref = Polygon(_reference_ring(shell), [_reference_ring(h) for h in holes])
            expect.append((i, cls, ref))
    gj = write(tmp_path, "bulk.geojson", geojson(feats))

    s = read(gj, {"tumor": 1, "lymphocyte": 2, "stroma": 3})
    check_report(s)
    assert s.report["read"] == n and s.report["kept"] == n - n_degenerate
    assert s.report["skipped_degenerate"] == n_degenerate
    assert s.report["multipolygon_parts_dropped"] == n_multi
    assert s.report["repaired_invalid"] == 0
    assert [nu.source for nu in s.nuclei] == [f"feature {i} (id n{i})" for i, _, _ in expect]
    assert [nu.class_name for nu in s.nuclei] == [c.lower() for _, c, _ in expect]
    assert [nu.type_id for nu in s.nuclei] == [classes.index(c) + 1 for _, c, _ in expect]
    got = np.array([nu.polygon for nu in s.nuclei], dtype=object)
    ref = np.array([p for _, _, p in expect], dtype=object)
    assert shapely.equals_exact(got, ref, tolerance=0).all()
    assert sum(len(nu.polygon.interiors) for nu in s.nuclei) == n_holes
    # the per-feature reader (used for files the bulk path leaves to it) agrees
    from histosynth.io.annotations.geojson import _parse_geojson_reference

    data = orjson.loads(gj.read_bytes())
    slow = _parse_geojson_reference(data["features"], gj)
    assert [g.wkb for g in slow.geoms if g is not None] == [p.wkb for p in got]

    # the same shells as ImageScope regions, one annotation per class, coordinates exact (repr)
    out = ['<?xml version="1.0" encoding="utf-8"?>', '<Annotations MicronsPerPixel="0.252">']
    for k, cls in enumerate(classes, start=1):
        out.append(f'<Annotation Id="{k}" Name="{cls}"><Attributes/><Regions><RegionAttributeHeaders/>')
        for rid, shell in regions[cls]:
            out.append(f'<Region Id="{rid}" Type="0" NegativeROA="0"><Attributes/><Vertices>')
            out.extend(f'<Vertex X="{x!r}" Y="{y!r}" Z="0"/>' for x, y in shell.tolist())
            out.append("</Vertices></Region>")
        out.append("</Regions><Plots/></Annotation>")
    out.append("</Annotations>")
    t = read(write(tmp_path, "bulk.xml", "\n".join(out)))
    check_report(t)
    assert t.mpp == 0.252
    assert t.report["read"] == n and t.report["skipped_degenerate"] == n_degenerate
    xml_expect = [
        (k, rid, cls, Polygon(_reference_ring(shell)))
        for k, cls in enumerate(classes, start=1)
        for rid, shell in regions[cls]
        if (rid - 1) % 173 != 5
    ]
    assert [nu.source for nu in t.nuclei] == [f"Annotation {k} Region {rid}" for k, rid, _, _ in xml_expect]
    assert [nu.class_name for nu in t.nuclei] == [c.lower() for _, _, c, _ in xml_expect]
    got = np.array([nu.polygon for nu in t.nuclei], dtype=object)
    ref = np.array([p for _, _, _, p in xml_expect], dtype=object)
    assert shapely.equals_exact(got, ref, tolerance=0).all()


# --------------------------------------------------------------------------- #
# Detection
# --------------------------------------------------------------------------- #


def test_detect_by_content_then_extension(tmp_path):
    gj = geojson([feature(square(0, 0), "a")])
    assert detect_format(write(tmp_path, "a.txt", gj)) == "geojson"  # content wins
    assert detect_format(write(tmp_path, "a.xml", gj)) == "geojson"
    xml = imagescope([(1, [(0, 0), (1, 0), (1, 1)])])
    assert detect_format(write(tmp_path, "b.json", xml)) == "imagescope"
    bom = b"\xef\xbb\xbf" + asap([("Polygon", "g", [(0, 0), (1, 0), (1, 1)])]).encode()
    assert detect_format(write(tmp_path, "c.dat", bom)) == "asap"
    assert detect_format(write(tmp_path, "d.json", b"[]")) == "geojson"
    coco = {"images": [], "categories": [], "annotations": []}
    assert detect_format(write(tmp_path, "e.json", orjson.dumps(coco))) == "coco"
    assert detect_format(write(tmp_path, "f.json", b"[[[0,0],[1,0],[1,1]]]")) == "points_json"
    with zipfile.ZipFile(tmp_path / "notroi.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(HistosynthError, match="without .roi"):
        detect_format(tmp_path / "notroi.zip")
    # fmt= forces the reader
    s = read(write(tmp_path, "g.txt", gj), fmt="geojson")
    assert s.format == "geojson"
    assert set(A.FORMATS) == {
        "geojson",
        "imagescope",
        "asap",
        "mat",
        "label",
        "imagej",
        "points_json",
        "coco",
    }


def test_detect_real_files(shared_data):
    expect = {
        "annotation-formats/asap_xml": "asap",
        "annotation-formats/imagescope_xml_monusac": "imagescope",
        "annotation-formats/qupath_geojson_puma": "geojson",
        "monuseg-train/annotations": "imagescope",
    }
    for folder, fmt in expect.items():
        files = list((shared_data / folder).glob("*"))
        assert files
        assert {detect_format(f) for f in files} == {fmt}


# --------------------------------------------------------------------------- #
# GeoJSON write -> read round trip (property)
# --------------------------------------------------------------------------- #

coord = st.floats(0, 1e5, allow_nan=False, allow_infinity=False)
size = st.floats(0.01, 1e3, allow_nan=False, allow_infinity=False)
names = st.sampled_from(["", "tumor", "lymphocyte", "stroma cell"])


@st.composite
def polygons(draw):
    if draw(st.booleans()):
        x, y, w, h = draw(coord), draw(coord), draw(size), draw(size)
        return box(x, y, x + w, y + h)
    n = draw(st.integers(3, 12))
    cx, cy = draw(coord), draw(coord)
    gaps = np.array(draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n)))
    ang = np.cumsum(gaps) / gaps.sum() * 2 * np.pi
    r = np.array(draw(st.lists(st.floats(0.5, 50), min_size=n, max_size=n)))
    return Polygon(np.column_stack([cx + r * np.cos(ang), cy + r * np.sin(ang)]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(polygons(), names), min_size=1, max_size=8))
def test_geojson_write_read_roundtrip(tmp_path, items):
    assume(all(p.is_valid and p.area > 0 for p, _ in items))
    nuclei = [Nucleus(i + 1, name, 1, p) for i, (p, name) in enumerate(items)]
    path = tmp_path / "rt.geojson"
    write_geojson(path, nuclei)
    s = read(path)
    assert len(s.nuclei) == len(nuclei)
    for a, b in zip(nuclei, s.nuclei):
        assert b.polygon.equals_exact(a.polygon, tolerance=0)
        assert b.class_name == a.class_name
        assert b.id == a.id


# --------------------------------------------------------------------------- #
# Hostile JSON: nesting, size, numbers as strings (issue #17)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "head, tail",
    [
        (b'{"type":"FeatureCollection","features":[{"type":"Feature","geometry":{"type":"Polygon","coordinates":',
         b"}}]}"),
        (b'{"images":[],"categories":[],"annotations":[{"id":1,"segmentation":', b"}]}"),
        (b"", b""),
    ],
    ids=["geojson", "coco", "bare"],
)
def test_deeply_nested_json_is_refused_naming_the_limit(tmp_path, head, tail):
    p = write(tmp_path, "deep.json", head + b"[" * 10_000 + b"]" * 10_000 + tail)
    with pytest.raises(HistosynthError, match=r"deep\.json.*nested more than 64 levels"):
        read(p)


def test_nesting_inside_strings_does_not_count(tmp_path):
    # brackets and escaped quotes and backslashes in a class name: 2 + 20 x 8 brackets deep if they counted
    name = "[[[[{{{{" * 20 + '"\\' + "]]]]}}}}" * 30 + '\\"'
    s = read(write(tmp_path, "s.geojson", geojson([feature(square(0, 0), name)])))
    assert len(s) == 1 and s.nuclei[0].class_name == name.casefold()


def test_annotation_file_size_limit(tmp_path, monkeypatch):
    from histosynth.io.annotations import _detect

    p = write(tmp_path, "big.geojson", geojson([feature(square(0, 0), "a")]))
    monkeypatch.setattr(_detect, "MAX_ANNOTATION_BYTES", 100)
    with pytest.raises(HistosynthError, match=r"big\.geojson.*over the limit of 100 bytes"):
        read(p)


@pytest.mark.parametrize(
    "content, item",
    [
        (geojson([feature(square(0, 0), "a"), feature([[[0, 0], [4, "0"], [4, 4], [0, 0]]], "a")]), "feature 1"),
        (geojson([feature([[[[0, 0], [4, 0], [4, "4.5"], [0, 0]]]], "a", gtype="MultiPolygon")]), "feature 0"),
        (geojson([feature([[[0, 0], [4, 0], [4, True], [0, 4]]], "a")]), "feature 0"),
        (orjson.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": [
            {"id": 5, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, "12.5", 0, 12, 12]]}]}),
         "annotation id 5"),
        (orjson.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": [
            {"id": 6, "image_id": 1, "category_id": 1, "segmentation": {"size": ["10", 12], "counts": [120]}}]}),
         "annotation id 6"),
        (orjson.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "segmentation": {"size": [10, 12], "counts": ["120"]}}]}),
         "annotation id 7"),
        (orjson.dumps({"images": [{"id": 1, "width": "100", "height": 100}], "categories": [{"id": 1, "name": "a"}],
                       "annotations": [{"id": 8, "image_id": 1, "category_id": 1,
                                        "segmentation": [[0, 0, 12, 0, 12, 12]]}]}),
         "image 1"),
        (orjson.dumps({"nuclei": [{"x": [0, 5, "5"], "y": [0, 0, 5]}]}), "nucleus 0"),
        (orjson.dumps([[[0, 0], [5, 0], [5, 5]], [[0, 0], [5, "0"], [5, 5]]]), "nucleus 1"),
        (orjson.dumps([{"points": [{"x": 0, "y": 0}, {"x": "5", "y": 0}, {"x": 5, "y": 5}]}]), "nucleus 0"),
    ],
    ids=["geojson", "geojson-multipolygon", "geojson-bool", "coco-polygon", "coco-rle-size", "coco-rle-counts",
         "coco-image-size", "points-xy", "points-pairs", "points-dicts"],
)
def test_numbers_as_strings_are_refused(tmp_path, content, item):
    p = write(tmp_path, "q.json", content)
    with pytest.raises(HistosynthError, match="not a number") as e:
        read(p)
    assert "q.json" in str(e.value) and item in str(e.value), str(e.value)


def _mutations():
    """Random truncations and byte flips of a file: (kind, position fraction, byte)."""
    return st.tuples(st.sampled_from(["truncate", "flip"]), st.floats(0, 1), st.integers(0, 255))


def _mutate(data: bytes, mutation) -> bytes:
    kind, where, byte = mutation
    i = min(int(where * len(data)), len(data) - 1)
    return data[:i] if kind == "truncate" else data[:i] + bytes([byte]) + data[i + 1 :]


def _read_or_refuse(path: Path) -> None:
    try:
        s = read(path, slide_size=(64, 64))
    except HistosynthError as err:
        assert str(path) in str(err)
        return
    assert all(n.polygon.is_valid and n.polygon.area > 0 for n in s.nuclei)


_VALID_FILES = {
    "geojson": geojson([feature(square(2, 3, 9), "a", id="n1"), feature(
        [[[[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]], [[[30, 30], [31, 30], [31, 31], [30, 30]]]], "b",
        gtype="MultiPolygon"), feature([1, 2], "c", gtype="Point")]),
    "coco": orjson.dumps({"images": [{"id": 1, "width": 64, "height": 64, "file_name": "t.png"}],
                          "categories": [{"id": 1, "name": "a"}],
                          "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                           "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]},
                                          {"id": 2, "image_id": 1, "category_id": 1,
                                           "segmentation": {"size": [4, 3], "counts": [2, 6, 4]}}]}),
    "points": orjson.dumps({"nuclei": [{"class": "a", "points": [[1, 1], [6, 1], [6, 6], [1, 6]]},
                                       {"x": [20, 30, 30], "y": [20, 20, 30]}]}),
}


@pytest.mark.parametrize("fmt", sorted(_VALID_FILES))
@settings(max_examples=50, deadline=10000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_damaged_json_reads_or_is_refused(tmp_path, fmt, mutation):
    """A truncated or byte-flipped file gives a valid result or one HistosynthError, never another exception."""
    path = tmp_path / f"damaged-{fmt}.json"
    path.write_bytes(_mutate(_VALID_FILES[fmt], mutation))
    _read_or_refuse(path)


# --------------------------------------------------------------------------- #
# The vertex limit per outline
# --------------------------------------------------------------------------- #


def _circle(n: int, r: float = 20.0, c: float = 30.0) -> list[list[float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.column_stack([c + r * np.cos(t), c + r * np.sin(t)]).tolist()
    return ring + ring[:1]


def test_vertex_limit_names_item_limit_and_how_to_raise_it(tmp_path):
    feats = [feature([_circle(50)], "a"), feature([_circle(50)], "a"), feature([_circle(300)], "a", id="big")]
    p = write(tmp_path, "v.geojson", geojson(feats))
    assert len(read(p).nuclei) == 3  # the default limit is far above 301 vertices
    with pytest.raises(HistosynthError, match=r"feature 2 \(id big\): an outline of 301 vertices is over the "
                                              r"limit of 200 vertices per outline") as e:
        read(p, max_vertices=200)
    assert "v.geojson" in str(e.value) and "max_vertices=N" in str(e.value) and "--max-vertices" in str(e.value)
    assert len(read(p, max_vertices=301).nuclei) == 3
    # holes count: 51 + 51 vertices
    holed = write(tmp_path, "h.geojson", geojson([feature([_circle(50), _circle(50, r=5)], "a")]))
    with pytest.raises(HistosynthError, match="102 vertices"):
        read(holed, max_vertices=101)
    xml = write(tmp_path, "v.xml", imagescope([(1, [(0, 0), (9, 0), (9, 9)]), (7, [tuple(v) for v in _circle(40)])]))
    with pytest.raises(HistosynthError, match="Region 7: an outline of 4[01] vertices"):
        read(xml, max_vertices=30)
    for bad in (3, 0, 2.5, True, "10"):
        with pytest.raises(HistosynthError, match="max_vertices"):
            read(p, max_vertices=bad)


def test_vertex_limit_default_is_the_module_constant(tmp_path, monkeypatch):
    from histosynth.io.annotations import _detect

    assert _detect.MAX_VERTICES == 1_000_000
    p = write(tmp_path, "v.json", orjson.dumps([_circle(120)[:-1]]))  # boundary points
    monkeypatch.setattr(_detect, "MAX_VERTICES", 60)
    with pytest.raises(HistosynthError, match=r"nucleus 0: an outline of \d+ vertices is over the limit of 60"):
        read(p)
    coco = write(tmp_path, "c.json", orjson.dumps({
        "images": [{"id": 1, "width": 64, "height": 64, "file_name": "t.png"}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 3, "image_id": 1, "category_id": 1,
                         "segmentation": [np.ravel(_circle(100)[:-1]).tolist()]}]}))
    with pytest.raises(HistosynthError, match=r"t.png: annotation id 3: an outline of"):
        A.read_coco_all(coco)


def test_vertex_limit_on_a_million_vertex_outline(tmp_path):
    """A 1,000,001-vertex GeoJSON ring is refused at the default limit, quickly and before repair."""
    ring = _circle(1_000_000, r=1000.0, c=2000.0)
    p = write(tmp_path, "huge.geojson", geojson([feature([ring], "a")]))
    with pytest.raises(HistosynthError, match=r"feature 0: an outline of 1,000,001 vertices is over the limit "
                                              r"of 1,000,000 vertices per outline"):
        read(p)
