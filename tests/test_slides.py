"""The slide reader: real slides from ../shared/data and small generated ones."""

from __future__ import annotations

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from histosynth.errors import HistosynthError
from histosynth.io.slides import open_slide
from tests.conftest import shared_file
from tests.helpers import tissue_image, write_pyramid


def _openslide_rgb(path, x, y, level, w, h):
    with openslide.OpenSlide(str(path)) as osr:
        return np.asarray(osr.read_region((x, y), level, (w, h)).convert("RGB"))


# -- real slides ------------------------------------------------------------------
def test_single_level_svs_fast_path_matches_openslide():
    path = shared_file("wsi", "CMU-1-Small-Region.svs")
    with open_slide(path) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == pytest.approx(0.499)
        # every level decodes directly: opened without OpenSlide, MPP from the Aperio description
        assert slide.backend == "tifffile" and slide.vendor == "aperio"
        assert slide.mpp_source == "aperio-description"
        assert slide.fast_path(0)
        for x, y in [(0, 0), (100, 333), (1017, 1451), (1900, 2600)]:
            ours = slide.read_region(x, y, 0, 256, 256)
            ref = _openslide_rgb(path, x, y, 0, 256, 256)
            assert np.abs(ours.astype(int) - ref).mean() <= 2.0


def test_jpeg2000_svs_without_mpp_needs_fallback():
    path = shared_file("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(HistosynthError, match="microns-per-pixel") as err:
        open_slide(path)
    assert str(path) in str(err.value)
    with open_slide(path, mpp_fallback=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "fallback"
        assert slide.level_count == 2
        assert slide.level_downsamples[1] == pytest.approx(2.0005, abs=1e-3)
        assert not slide.fast_path(0)  # JPEG 2000 goes through OpenSlide
        assert slide.backend == "openslide"
        region = slide.read_region(1000, 1000, 1, 64, 64)
        assert region.shape == (64, 64, 3) and region.dtype == np.uint8
        assert np.array_equal(region, _openslide_rgb(path, 1000, 1000, 1, 64, 64))


def test_ndpi_seven_levels():
    path = shared_file("wsi", "test3-DAPI-2-(387).ndpi")
    with open_slide(path) as slide:
        assert slide.level_count == 7
        assert slide.dimensions == (3968, 4864)
        assert slide.mpp == pytest.approx(0.228, abs=1e-3)
        assert slide.best_level_for_downsample(8.0) == 3
        assert slide.best_level_for_downsample(7.9) == 2
        region = slide.read_region(0, 0, 3, 100, 100)
        assert region.shape == (100, 100, 3)


def test_plain_tiff_monuseg():
    path = shared_file("monuseg-train", "images", "TCGA-21-5784-01Z-00-DX1.tif")
    with pytest.raises(HistosynthError, match="microns-per-pixel"):
        open_slide(path)
    with open_slide(path, mpp_fallback=0.25) as slide:
        assert slide.backend == "plain"
        assert slide.dimensions == (1000, 1000)
        assert slide.level_count == 1
        ref = tifffile.imread(path)[..., :3]
        assert np.array_equal(slide.read_region(10, 20, 0, 30, 40), ref[20:60, 10:40])
        edge = slide.read_region(990, 990, 0, 20, 20)
        assert np.array_equal(edge[:10, :10], ref[990:, 990:])
        assert (edge[10:] == 255).all() and (edge[:, 10:] == 255).all()


# -- generated slides ---------------------------------------------------------------
def test_generated_pyramid_levels_mpp_and_fast_path(tmp_path):
    img = tissue_image(1000, 700)
    path = write_pyramid(tmp_path / "s.tif", img, mpp=0.25, levels=3)
    with open_slide(path) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.level_dimensions == [(1000, 700), (500, 350), (250, 175)]
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.25)
        assert all(slide.fast_path(i) for i in range(3))
        for level, (x, y) in [(0, (0, 0)), (0, (300, 200)), (1, (130, 64)), (2, (0, 0))]:
            ours = slide.read_region(x, y, level, 96, 96)
            ref = _openslide_rgb(path, x, y, level, 96, 96)
            assert np.abs(ours.astype(int) - ref).mean() <= 2.0
        # past the edge: white, not black or transparent
        out = slide.read_region(950, 650, 0, 100, 100)
        assert (out[50:] == 255).all() and (out[:, 50:] == 255).all()


def _direct_and_openslide_agree(path):
    with open_slide(path) as slide, openslide.OpenSlide(str(path)) as osr:
        assert slide.backend == "tifffile"
        assert slide.level_dimensions == list(osr.level_dimensions)
        assert slide.level_downsamples == list(osr.level_downsamples)
        assert slide.mpp_x == pytest.approx(float(osr.properties[openslide.PROPERTY_NAME_MPP_X]))
        assert slide.mpp_y == pytest.approx(float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]))


def test_direct_open_lists_the_levels_openslide_lists(tmp_path):
    # odd sizes: OpenSlide's downsample is the mean of the two axes' ratios
    _direct_and_openslide_agree(write_pyramid(tmp_path / "odd.tif", tissue_image(1001, 703), levels=4, tile=128))
    _direct_and_openslide_agree(write_pyramid(tmp_path / "one.tif", tissue_image(300, 200), levels=1, tile=128))
    # a tiled page without the reduced-resolution bit is not a level (OpenSlide skips it)
    img = tissue_image(512, 384)
    with tifffile.TiffWriter(tmp_path / "extra.tif") as tw:
        kw = dict(tile=(128, 128), compression="jpeg", photometric="rgb", metadata=None,
                  resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
        tw.write(img, subfiletype=0, **kw)
        tw.write(img[:128, :128], subfiletype=0, **kw)
        tw.write(cv2.resize(img, (256, 192), interpolation=cv2.INTER_AREA), subfiletype=1, **kw)
    _direct_and_openslide_agree(tmp_path / "extra.tif")
    with open_slide(tmp_path / "extra.tif") as slide:
        assert slide.level_dimensions == [(512, 384), (256, 192)]


def test_direct_open_leaves_doubtful_files_to_openslide(tmp_path):
    # no MPP in the file: OpenSlide (and then the fallback) decides
    path = write_pyramid(tmp_path / "nompp.tif", tissue_image(512, 512), mpp=None, levels=2, tile=128)
    with open_slide(path, mpp_fallback=0.3) as slide:
        assert slide.backend == "openslide" and slide.mpp_source == "fallback"
        assert all(slide.fast_path(i) for i in range(2))  # still decoded directly
    # LZW levels decode directly too
    path = write_pyramid(tmp_path / "lzw.tif", tissue_image(512, 512), levels=2, tile=128, compression="lzw")
    _direct_and_openslide_agree(path)


def test_jpeg_overview_is_the_blank_tiles_at_one_eighth(tmp_path):
    path = write_pyramid(tmp_path / "s.tif", tissue_image(1024, 768, tissue=(0.5, 1.0)), levels=1, tile=128)
    with open_slide(path) as slide:
        grey, ds = slide.jpeg_overview(0)
        assert ds == 8.0 and grey.shape == (96, 128)
        ref = cv2.resize(cv2.cvtColor(slide.read_level(0), cv2.COLOR_RGB2GRAY), (128, 96), interpolation=cv2.INTER_AREA)
    # blank tiles (left half) are probed and read as their 8x8 block means ...
    assert np.abs(grey[:, :64].astype(int) - ref[:, :64]).max() <= 2
    # ... tissue tiles compress to more than 0.1 byte per pixel: not probed, 0 (possibly tissue)
    assert (grey[:, 64:] == 0).all()


def test_jpeg_overview_on_threads_is_the_same(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    image = tissue_image(4096, 1024, tissue=(0.5, 1.0))
    # the blank tiles in distinct flat shades, so that a probe placed in the wrong tile shows
    shades = np.random.default_rng(0).integers(180, 256, (8, 16, 1, 1, 1), dtype=np.uint8)
    image[:, :2048] = np.broadcast_to(shades, (8, 16, 128, 128, 3)).transpose(0, 2, 1, 3, 4).reshape(1024, 2048, 3)
    path = write_pyramid(tmp_path / "s.tif", image, levels=1, tile=128)
    with open_slide(path) as slide, ThreadPoolExecutor(2) as pool:
        grey, ds = slide.jpeg_overview(0)
        threaded, ds2 = slide.jpeg_overview(0, pool=pool)
    assert ds == ds2 and (grey > 0).sum() >= 100 * 16 * 16  # 100+ blank tiles: several runs of probes
    assert len(np.unique(grey[:, :256])) > 50
    np.testing.assert_array_equal(grey, threaded)


def test_jpeg_overview_of_a_large_level_averages_to_stay_small(tmp_path):
    path = write_pyramid(tmp_path / "s.tif", tissue_image(2048, 1024, tissue=(0.75, 1.0)), levels=1, tile=256)
    with open_slide(path) as slide:
        fine, ds = slide.jpeg_overview(0)
        assert ds == 8.0 and fine.shape == (128, 256)
        coarse, ds = slide.jpeg_overview(0, max_pixels=1000)  # 1/8 would be 32,768 px
        assert ds == 64.0 and coarse.shape == (16, 32) and coarse.size <= 1000
        assert np.abs(coarse.astype(int) - fine.reshape(16, 8, 32, 8).mean(axis=(1, 3))).max() <= 1
        # 256-px tiles give 32 blocks a side: no power of 2 up to 32 gets 1/8 under 10 px
        assert slide.jpeg_overview(0, max_pixels=10) is None


def test_jpeg_overview_refuses_a_probe_that_disagrees(tmp_path, monkeypatch, caplog):
    from histosynth.io import slides

    path = write_pyramid(tmp_path / "s.tif", tissue_image(512, 512, tissue=(0.5, 1.0)), levels=1, tile=128)
    real = cv2.imdecode
    monkeypatch.setattr(slides.cv2, "imdecode", lambda buf, flags: 255 - real(buf, flags))
    with open_slide(path) as slide:
        assert slide.jpeg_overview(0) is None
    assert "does not match the full decode" in caplog.text
    lzw = write_pyramid(tmp_path / "lzw.tif", tissue_image(512, 512), levels=1, tile=128, compression="lzw")
    with open_slide(lzw) as slide:
        assert slide.jpeg_overview(0) is None  # not JPEG


def test_cmu_jpeg_overview_reads_rgb_jpeg_right():
    """Aperio stores JPEG tiles as RGB without a colour transform; the probe must say so to libjpeg."""
    path = shared_file("wsi", "CMU-1-Small-Region.svs")
    with open_slide(path) as slide:
        grey, ds = slide.jpeg_overview(0)
        full = cv2.cvtColor(slide.read_level(0), cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    pad = np.pad(full, ((0, h * 8 - full.shape[0]), (0, w * 8 - full.shape[1])), mode="edge")
    ref = cv2.resize(pad, (w, h), interpolation=cv2.INTER_AREA)
    probed = grey > 0
    assert probed.mean() > 0.3
    inner = probed.copy()
    inner[-1, :] = inner[:, -1] = False  # the last row and column mix in the TIFF tiles' padding
    assert np.abs(grey[inner].astype(int) - ref[inner]).mean() <= 1.0


def test_copy_false_shares_whole_cached_tiles(tmp_path):
    path = write_pyramid(tmp_path / "s.tif", tissue_image(512, 512, tissue=(0, 1)), levels=1, tile=128)
    with open_slide(path) as slide:
        shared = slide.read_region(128, 256, 0, 128, 128, copy=False)
        own = slide.read_region(128, 256, 0, 128, 128)
        assert not shared.flags.writeable and own.flags.writeable
        assert np.array_equal(shared, own)
        # not one whole tile: a fresh array either way
        assert slide.read_region(100, 256, 0, 128, 128, copy=False).flags.writeable


def test_tiff_resolution_tags_only_when_plausible(tmp_path):
    img = tissue_image(300, 200)
    # 72 dpi is a default, not a microscope resolution
    tifffile.imwrite(tmp_path / "dpi.tif", img, resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(HistosynthError, match="microns-per-pixel"):
        open_slide(tmp_path / "dpi.tif")
    tifffile.imwrite(tmp_path / "cm.tif", img, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "cm.tif") as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "tiff-resolution"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_png_and_jpeg(tmp_path, suffix):
    img = tissue_image(120, 80)
    path = tmp_path / f"img{suffix}"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    with open_slide(path, mpp_fallback=0.5) as slide:
        assert slide.dimensions == (120, 80)
        region = slide.read_region(0, 0, 0, 120, 80)
        tol = 0 if suffix == ".png" else 8
        assert np.abs(region.astype(int) - img).mean() <= tol


def test_grey_and_rgba_are_made_rgb(tmp_path):
    grey = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 256
    cv2.imwrite(str(tmp_path / "g.png"), grey.astype(np.uint8))
    with open_slide(tmp_path / "g.png", mpp_fallback=1) as slide:
        region = slide.read_region(0, 0, 0, 64, 64)
        assert region.shape == (64, 64, 3) and (region[..., 0] == grey).all()
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:5, :, 3] = 255  # top half opaque red, bottom transparent
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    with open_slide(tmp_path / "a.png", mpp_fallback=1) as slide:
        region = slide.read_region(0, 0, 0, 10, 10)
        assert (region[:5] == [200, 0, 0]).all() and (region[5:] == 255).all()


# -- bad input ------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(HistosynthError, match="no such file"):
        open_slide(tmp_path / "nope.svs")


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(HistosynthError, match="not a file"):
        open_slide(tmp_path)
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(HistosynthError, match="empty file"):
        open_slide(tmp_path / "empty.tif")


@pytest.mark.parametrize("name", ["notes.svs", "notes.png", "notes.tif"])
def test_not_an_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n" * 50)
    with pytest.raises(HistosynthError) as err:
        open_slide(path, mpp_fallback=0.5)
    assert name in str(err.value)


def test_truncated_slide(tmp_path):
    img = tissue_image(1024, 1024, tissue=(0, 1))
    good = write_pyramid(tmp_path / "good.tif", img, levels=2)
    data = good.read_bytes()
    bad = tmp_path / "bad.tif"
    # tifffile writes each level's IFD before its tiles: cut inside level 0's tiles
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(HistosynthError, match=r"bad\.tif.*(truncated|corrupt)"):
        with open_slide(bad) as slide:
            for y in range(0, 1024, 256):
                slide.read_region(0, y, 0, 1024, 256)


def test_bad_level_and_size(tmp_path):
    path = write_pyramid(tmp_path / "s.tif", tissue_image(256, 256), levels=1)
    with open_slide(path) as slide:
        with pytest.raises(HistosynthError, match="level 3"):
            slide.read_region(0, 0, 3, 10, 10)
        with pytest.raises(ValueError):
            slide.read_region(0, 0, 0, 0, 10)


# -- decompression bombs: the header's size is checked before anything is decoded ----------------------
def _png_claiming(path, width, height):
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with one tiny compressed row of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _tiff_claiming(path, width, height):
    """A stripped (not tiled) 8 x 8 TIFF whose ImageWidth / ImageLength tags are patched to claim more."""
    import struct

    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8))
    with tifffile.TiffFile(path) as tf:
        tags = tf.pages[0].tags
        offsets = tags["ImageWidth"].valueoffset, tags["ImageLength"].valueoffset
    data = bytearray(path.read_bytes())
    for offset, value in zip(offsets, (width, height)):
        data[offset : offset + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make", [_png_claiming, _tiff_claiming], ids=["png", "tiff"])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, make):
    path = make(tmp_path / f"bomb.{'png' if make is _png_claiming else 'tif'}", 200_000, 200_000)
    with pytest.raises(HistosynthError) as err:
        open_slide(path, mpp_fallback=0.5)
    message = str(err.value)
    assert path.name in message and "200000 x 200000" in message, message
    assert "max_pixels" in message and "--max-pixels" in message, message


def test_image_within_a_raised_limit_still_fails_cleanly_in_the_decoder(tmp_path):
    # the header passes a raised limit; OpenCV's own decoder then refuses it: one error naming the file
    path = _png_claiming(tmp_path / "big.png", 200_000, 200_000)
    with pytest.raises(HistosynthError, match=r"big\.png.*(OpenCV|decode)"):
        open_slide(path, mpp_fallback=0.5, max_pixels=10**12)


def test_max_pixels_is_checked_exactly(tmp_path):
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), np.full((30, 40, 3), 200, np.uint8))
    with open_slide(path, mpp_fallback=0.5, max_pixels=1200) as slide:
        assert slide.dimensions == (40, 30)
    with pytest.raises(HistosynthError, match=r"small\.png.*40 x 30 pixels .*limit of 1,199"):
        open_slide(path, mpp_fallback=0.5, max_pixels=1199)


def test_max_pixels_default_is_the_schemas():
    from histosynth.config import schema_node
    from histosynth.io.slides import MAX_PIXELS

    assert MAX_PIXELS == schema_node("tile.max_pixels")["default"] == 2**31
