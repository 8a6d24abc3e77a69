"""The repository keeps its promises: README commands, CI, env files, rule files."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_the_two_commands():
    first, second = _readme_commands()
    assert "snakemake --cores 8 --resources gpu=1" in first
    assert "pytest" in second
    for cmd in (first, second):
        assert "-c constraints.txt" in cmd  # the torch pin that keeps installs on the CPU wheel
        assert cmd.startswith("python3.11 -m venv .venv")
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text()


def test_ci_runs_the_readme_test_command():
    _, second = _readme_commands()
    assert second in (REPO / ".ci" / "run").read_text()


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_conda_envs_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"])
    conda_names = {"torch": "pytorch"}
    for env in ("cpu.yaml", "cuda.yaml"):
        deps = yaml.safe_load((REPO / "envs" / env).read_text())["dependencies"]
        plain = [d for d in deps if isinstance(d, str)]
        pip = next((d["pip"] for d in deps if isinstance(d, dict)), [])
        have = _names(plain) | _names(pip)
        missing = {conda_names.get(n, n) for n in wanted} - have
        assert not missing, f"envs/{env} lacks {sorted(missing)}"


def test_rule_files_are_formatted():
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    res = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *map(str, files)],
                         capture_output=True, text=True)
    if "No module named snakefmt" in res.stderr:
        pytest.skip("snakefmt not installed")
    assert res.returncode == 0, res.stderr


def test_every_rule_has_a_log():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, flags=re.S | re.M)
        for name, body in rules:
            if "shell:" in body or "run:" in body:
                assert "log:" in body, f"{smk.name}: rule {name} has no log"
