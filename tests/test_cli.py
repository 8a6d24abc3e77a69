"""The CLI: each stage by hand, one-line errors with exit status 2, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from histosynth.cli import main
from histosynth.io.patchset import read_patchset
from tests.helpers import tissue_image, write_pyramid


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.tif"
    return write_pyramid(path, tissue_image(800, 600, tissue=(0.2, 1.0)), mpp=0.25, levels=2)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_tile_by_hand(slide, tmp_path):
    out = tmp_path / "tiles"
    assert main(["tile", str(slide), str(out), "--size", "128", "--mpp", "0.5", "--name", "S1"]) == 0
    ps = read_patchset(out, require=("images",))
    assert len(ps) > 0 and set(ps.index["slide"]) == {"S1"}
    assert ps.report["stage"] == "tile" and ps.report["counts"]["kept"] == len(ps)


def test_tile_region_flag(slide, tmp_path):
    out = tmp_path / "tiles"
    assert main(["tile", str(slide), str(out), "--size", "64", "--mpp", "none", "--region", "400,100,128,128",
                 "--max-background", "1"]) == 0
    idx = read_patchset(out).index
    assert sorted(zip(idx["x"], idx["y"])) == [(400, 100), (400, 164), (464, 100), (464, 164)]


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d: d / "missing.svs", [], "no such file"),
        (lambda d: _write(d / "notes.svs", b"hello" * 100), [], "not a slide OpenSlide recognises"),
        (lambda d: _write(d / "notes.png", b"hello" * 100), ["--mpp-fallback", "0.5"], "not an image"),
        (lambda d: _truncated(d), [], "truncated|corrupt"),
        (lambda d: _no_mpp(d), [], "microns-per-pixel"),
        (lambda d: _no_mpp(d), ["--size", "4096", "--mpp-fallback", "0.25"], "more than the slide"),
    ],
    ids=["missing", "not-a-slide", "not-an-image", "truncated", "no-mpp", "tile-too-large"],
)
def test_bad_input_is_one_line_exit_2_no_output(tmp_path, capsys, make, args, message):
    import re

    path = make(tmp_path)
    out = tmp_path / "out" / "tiles"
    assert main(["tile", str(path), str(out), *args]) == 2
    line = _error_line(capsys)
    assert path.name in line and re.search(message, line), line
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _write(path, data):
    path.write_bytes(data)
    return path


def _truncated(d):
    good = write_pyramid(d / "full.tif", tissue_image(1024, 1024, tissue=(0, 1)), levels=2)
    return _write(d / "cut.tif", good.read_bytes()[: good.stat().st_size // 3])


def _no_mpp(d):
    import tifffile

    path = d / "plain.tif"
    tifffile.imwrite(path, tissue_image(300, 300, tissue=(0, 1)))
    return path


def test_bad_flags_are_usage_errors(slide, tmp_path):
    for args in (["--max-background", "2"], ["--mpp", "-1"], ["--region", "1,2,3"], ["--edge", "wrap"]):
        with pytest.raises(SystemExit) as exc:
            main(["tile", str(slide), str(tmp_path / "o"), *args])
        assert exc.value.code == 2


def test_slide_info(slide, capsys):
    assert main(["slide-info", str(slide)]) == 0
    out = capsys.readouterr().out
    assert '"mpp_source": "tiff-resolution"' in out and '"fast_levels"' in out


def test_console_script_and_module():
    res = subprocess.run([sys.executable, "-m", "histosynth", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "tile" in res.stdout and "demo-slides" in res.stdout


def test_decompression_bomb_is_one_line_exit_2_no_output(tmp_path, capsys):
    from tests.test_slides import _png_claiming

    path = _png_claiming(tmp_path / "bomb.png", 200_000, 200_000)
    out = tmp_path / "tiles"
    assert main(["tile", str(path), str(out), "--mpp-fallback", "0.5"]) == 2
    line = _error_line(capsys)
    assert "bomb.png" in line and "200000 x 200000" in line and "--max-pixels" in line, line
    assert not out.exists()


def test_internal_error_is_one_line_naming_the_bug_and_the_traceback(tmp_path, capsys, monkeypatch):
    from histosynth.cli import patches

    def broken(args):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(patches, "_run_split", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = main(["split", str(tmp_path / "split.csv"), "--slides", "a", "b"])
    err = capsys.readouterr().err
    assert code not in (0, 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("error: ") and "bug" in line and "RuntimeError: something inside broke" in line, line
    saved = line.rsplit(" ", 1)[-1]
    assert saved.startswith(str(tmp_path)) and "raise RuntimeError" in Path(saved).read_text()
    assert not (tmp_path / "split.csv").exists()
