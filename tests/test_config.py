"""config.yaml validation (defaults from the schema) and the slide table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from histosynth.cli import main
from histosynth.config import SCHEMA_PATH, leaf_keys, load_config_file, load_schema, slide_table, validate_config
from histosynth.errors import HistosynthError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_filled():
    cfg = validate_config({})
    assert cfg["tile"]["size"] == 256 and cfg["tile"]["max_background"] == 0.85
    assert cfg["tile"]["background_threshold"] == 204
    assert cfg["slides"]["source"] == "demo" and cfg["slides"]["demo"]["n_slides"] >= 2
    assert cfg["mpp_fallback"] is None


def test_repo_config_is_valid():
    cfg = load_config_file(REPO / "config.yaml")
    assert cfg["slides"]["source"] == "demo"


def test_input_is_not_modified():
    raw = {"tile": {"size": 128}}
    validate_config(raw)
    assert raw == {"tile": {"size": 128}}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"tile": {"sise": 3}}, "unknown key 'tile.sise'"),
        ({"tiles": {}}, "unknown key 'tiles'"),
        ({"tile": {"size": "big"}}, "key 'tile.size': 'big' is not of type 'integer'"),
        ({"tile": {"max_background": 2}}, "key 'tile.max_background'"),
        ({"tile": {"edge": "wrap"}}, "key 'tile.edge'"),
        ({"slides": {"demo": {"size": [100]}}}, "key 'slides.demo.size'"),
        ({"slides": {"source": "table"}}, "key 'slides.table'"),
        ({"slides": {"source": "glob"}}, "key 'slides.images'"),
        ({"slides": {"source": "glob", "images": "*.tif", "annotations": "a.xml"}}, "needs '{slide}'"),
        ({"mpp_fallback": -1}, "key 'mpp_fallback'"),
    ],
)
def test_bad_config_names_the_key(config, message):
    with pytest.raises(HistosynthError) as err:
        validate_config(config)
    assert message in str(err.value)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(HistosynthError, match="mapping"):
        validate_config(["a"])
    bad = tmp_path / "c.yaml"
    bad.write_text("tile: [unclosed\n")
    with pytest.raises(HistosynthError, match="not valid YAML"):
        load_config_file(bad)


def test_demo_slide_table():
    cfg = validate_config({"results": "out", "slides": {"demo": {"n_slides": 3}}})
    table = slide_table(cfg)
    assert table["slide"].tolist() == ["demo-000", "demo-001", "demo-002"]
    assert table["image"][0] == "out/demo/demo-000.tif"
    assert table["annotations"][2] == "out/demo/demo-002.geojson"


def test_table_source(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "slides.tsv").write_text(
        "slide\timage\tannotations\tmpp\nA\timg/a.tif\tann/a.xml\t0.25\nB\t/abs/b.svs\t\t\n"
    )
    cfg = validate_config({"slides": {"source": "table", "table": "data/slides.tsv"}})
    table = slide_table(cfg, tmp_path)
    assert table["image"].tolist() == [str(tmp_path / "data/img/a.tif"), "/abs/b.svs"]
    assert table["annotations"][1] is None
    assert table["mpp"][0] == 0.25


def test_table_errors(tmp_path):
    cfg = validate_config({"slides": {"source": "table", "table": "t.csv"}})
    with pytest.raises(HistosynthError, match="not found"):
        slide_table(cfg, tmp_path)
    (tmp_path / "t.csv").write_text("name,image\nA,a.tif\n")
    with pytest.raises(HistosynthError, match=r"lacks columns \['slide'\]"):
        slide_table(cfg, tmp_path)
    (tmp_path / "t.csv").write_text("slide,image,colour\nA,a.tif,red\n")
    with pytest.raises(HistosynthError, match="unknown columns"):
        slide_table(cfg, tmp_path)
    (tmp_path / "t.csv").write_text("slide,image\nA,a.tif\nA,b.tif\n")
    with pytest.raises(HistosynthError, match="unique"):
        slide_table(cfg, tmp_path)
    (tmp_path / "t.csv").write_text("slide,image,mpp\nA,a.tif,zero\n")
    with pytest.raises(HistosynthError, match="mpp"):
        slide_table(cfg, tmp_path)


def test_glob_source(tmp_path):
    for name in ("b", "a"):
        (tmp_path / f"{name}.tif").write_bytes(b"x")
    cfg = validate_config(
        {"slides": {"source": "glob", "images": "*.tif", "annotations": "ann/{slide}.xml"}}
    )
    table = slide_table(cfg, tmp_path)
    assert table["slide"].tolist() == ["a", "b"]
    assert table["annotations"].tolist() == ["ann/a.xml", "ann/b.xml"]
    cfg["slides"]["images"] = "*.svs"
    with pytest.raises(HistosynthError, match="no slide matches"):
        slide_table(cfg, tmp_path)


def test_check_config_cli(tmp_path, capsys):
    assert main(["check-config", str(REPO / "config.yaml")]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({"tile": {"size": "x"}}))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tile.size" in err and str(bad) in err


def test_schema_is_package_data():
    """The schema ships inside the package (pyproject package-data) and is read through importlib.resources."""
    from importlib import resources

    text = resources.files("histosynth").joinpath("config.schema.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == load_schema() == load_schema(SCHEMA_PATH)
    assert SCHEMA_PATH.parent == Path(__import__("histosynth").__file__).parent
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "config.schema.yaml" in data["histosynth"]
    assert "gan.steps" in leaf_keys() and "tile.size" in leaf_keys()


def _installed_copy(site: Path) -> Path:
    """What a wheel installs: the package's modules and its package-data, nothing else of the repository."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["histosynth"]
    src = REPO / "src" / "histosynth"
    for path in src.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and (path.suffix == ".py" or path.name in data):
            (site / "histosynth" / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, site / "histosynth" / path.relative_to(src))
    return site


def test_check_config_from_the_package_alone(tmp_path):
    """`histosynth check-config` with only the installed package: no workflow/ folder, no repository."""
    site = _installed_copy(tmp_path / "site")
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump({"slides": {"demo": {"n_slides": 2}}, "gan": {"steps": 5}}))
    (work / "bad.yaml").write_text(yaml.safe_dump({"gan": {"stepz": 5}}))
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import histosynth.config as c; print(c.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    ok = subprocess.run([sys.executable, "-m", "histosynth", "check-config", "config.yaml"], cwd=work, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "valid; 2 slides" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "histosynth", "check-config", "bad.yaml"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "gan.stepz" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "histosynth", "train-gan", "--help"], cwd=work, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "(default 4000)" in helped.stdout  # the schema's default, from the package


PRESETS = Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_every_preset_is_a_valid_config(preset):
    """config/*.yaml pass the schema as shipped (their paths need not exist here)."""
    from histosynth.config import validate_config

    validate_config(yaml.safe_load((PRESETS / preset).read_text()))  # a HistosynthError names the key
