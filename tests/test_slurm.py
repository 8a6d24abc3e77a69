"""SLURM: the smoke DAG through workflow/profiles/slurm on a one-node local cluster.

The integration test is opt-in (`pytest -m slurm`): it needs root, the Debian packages slurmctld,
slurmd, slurm-client and munge, and snakemake-executor-plugin-slurm. It starts the cluster with
tests/slurm/start-local-slurm.sh (a "cpu" partition and a "gpu" partition whose node has a fake GPU),
runs the DAG through the profile, reads from `scontrol show job` (no accounting database here, so no
sacct) where each job went, and stops exactly the daemons it started. Without `-m slurm` (the
README's plain `pytest`) it is skipped, so CI runs it once, in its own step. It is skipped with the
reason when the cluster cannot be started here; HISTOSYNTH_SLURM_REQUIRED=1 turns that into a failure.

The profile itself (its keys and environment overrides) is checked without a cluster, in the default run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
START = REPO / "tests" / "slurm" / "start-local-slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop-local-slurm.sh"

# The rules that declare `resources: gpu=...` (DESIGN.md's [gpu] stages). The test also reads the rule
# files, so a GPU rule added later is checked without editing this list.
KNOWN_GPU_RULES = {"train_dvae", "dvae_sweep", "train_gan", "translate", "translate_test_masks", "translate_train_masks",
                   "train_segmenter", "train_daff_g1", "segment_slide", "train_migan_g1", "train_migan_g2",
                   "sample_stacks"}

# tests/test_workflow.py's TINY, plus: device auto (device: cpu would make the GPU rules ask for no GPU;
# the fake GPU has no CUDA behind it, so the code runs on the CPU anyway), one-latent sweep, and a
# HoVer-Net small enough for a CPU. One thread per job: the test node has 2 CPUs.
SMOKE = {
    "results": "results",
    "device": "auto",
    "slides": {"source": "demo", "demo": {"n_slides": 3, "size": [1024, 1024], "mpp": 0.25, "seed": 3}},
    "tile": {"size": 128, "target_mpp": 0.5},
    "classes": {"Epithelial": 1, "Lymphocyte": 2, "Spindle": 3},
    "stats": {"calibrate": 1, "calibrate_masks": 8},
    "dvae": {"epochs": 2, "min_steps": 0, "threads": 1, "batch_size": 64, "sweep_latent_dims": [2],
             "sweep_epochs": 1, "mem_mb": 1100},
    "sample_masks": {"n": 8, "shards": 2, "size": 128},
    "gan": {"crop": 64, "depth": 4, "width": 8, "steps": 3, "decay_steps": 2, "batch_size": 2,
            "sample_every": 5, "checkpoint_every": 5, "threads": 1, "mem_mb": 1300},
    "segmenter": {"arms": ["real+synthetic", "painted-real"], "seeds": [0], "width": 8, "units": [1, 1, 1, 1],
                  "input_size": 128, "steps": 2, "batch_size": 2, "checkpoint_every": 2, "threads": 1,
                  "mem_mb": 1400, "runtime": 30},
    "score": {"batch": 2, "overlays": 1, "threads": 1, "mem_mb": 2000},
    "translate": {"mem_mb": 1500},
    "evaluate_images": {"fid": False, "threads": 1},  # a GPU rule that is not a training rule: its memory stays the config's
    # the GPU rules outside the default target: the daff method's G1 and whole-slide segmentation
    "daff": {"crop": 32, "width": 4, "n_down": 2, "n_blocks": 1, "num_d": 1, "steps": 2, "decay_steps": 0,
             "batch_size": 1, "checkpoint_every": 2, "log_every": 1, "threads": 1, "mem_mb": 1200},
    "segment": {"slides": ["results/demo/demo-000.tif"], "arm": "real+synthetic", "tile": 128, "margin": 8,
                "mpp": 1.0, "threads": 1, "mem_mb": 1500, "runtime": 30},
    # the multifocus branch's GPU rules (MI-GAN G1, G2 and sampling) on tiny demo z-stacks
    "multifocus": {"demo": {"n_slides": 2, "size": [320, 320], "planes": 5, "n_cells": 10, "seed": 1},
                   "planes": 5, "evaluate_fid": False, "threads": 1},
    "migan": {"steps": 2, "batch_size": 4, "g2_batch_size": 2, "n_critic": 1, "width": 4, "critic_width": 4,
              "g2_width": 4, "code_channels": 4, "res_blocks": 1, "g2_critic_width": 4, "sample_n": 6,
              "checkpoint_every": 2, "sample_every": 2, "threads": 1, "mem_mb": 1200, "runtime": 30},
}
TARGETS = ("all", "dvae_sweep", "segment", "results/models/daff/g1/g1.pt", "results/multifocus/synthetic/migan")
# Scoring and the report are CPU rules downstream of every GPU rule (tests/test_workflow.py runs them);
# leaving them out keeps this run to the jobs that say something about the profile, and about 1 min shorter.
OMIT_FROM = ("score",)
# First-attempt memory of the training rules (the config's mem_mb x attempt 1): small enough for any CI
# machine's node, and distinct, so the test can see that the config reached sbatch.
TRAIN_MEM_MB = {"TRAIN_DVAE": 1100, "DVAE_SWEEP": 1100, "TRAIN_GAN": 1300, "TRAIN_SEGMENTER": 1400}


# ---------------------------------------------------------------------------------------------
# The profile, without a cluster (default run)


def _profile(env: dict[str, str] | None = None) -> dict:
    """The profile as Snakemake reads it (YTE rendered), with `env` as the only HISTOSYNTH_/SNAKEMAKE_ variables."""
    from snakemake.profiles import ProfileConfigFileParser

    saved = dict(os.environ)
    try:
        for key in list(os.environ):
            if key.startswith(("HISTOSYNTH_SLURM_", "SNAKEMAKE_SLURM_")):
                del os.environ[key]
        os.environ.update(env or {})
        with open(PROFILE / "config.yaml") as stream:
            return dict(ProfileConfigFileParser().parse(stream))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _pairs(entries: list[str]) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in entries)


def test_profile_routes_by_gpu_request_and_avoids_the_sacct_hang():
    prof = _profile()
    assert prof["executor"] == "slurm"
    assert prof["slurm-status-command"] == "squeue"  # sacct without an accounting DB hangs plugin 2.8
    defaults = _pairs(prof["default-resources"])
    # an explicit slurm_partition would win over the partition table and break the routing
    assert "slurm_partition" not in defaults and "slurm_account" not in defaults
    assert defaults["cpus_per_gpu"] == "threads"
    table = yaml.safe_load(Path(prof["slurm-partition-config"]).read_text())["partitions"]
    assert table["gpu"]["max_gpu"] >= 1 and table["cpu"]["max_gpu"] == 0
    assert int(prof["retries"]) >= 1


def test_profile_overrides_come_from_the_environment():
    prof = _profile({"HISTOSYNTH_SLURM_ACCOUNT": "lab", "SNAKEMAKE_SLURM_PARTITIONS": "/site/partitions.yaml"})
    assert _pairs(prof["default-resources"])["slurm_account"] == "'lab'"
    assert prof["slurm-partition-config"] == "/site/partitions.yaml"
    # memory is the workflow config's (one source of truth), grown per attempt by the training rules
    assert "set-resources" not in prof


def test_training_rules_ask_for_more_memory_per_attempt():
    import re

    for rule_file, rules in (("masks.smk", ("train_dvae", "dvae_sweep")), ("gan.smk", ("train_gan",)),
                             ("segmentation.smk", ("train_segmenter",))):
        text = (REPO / "workflow" / "rules" / rule_file).read_text()
        for rule in rules:
            body = text.split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
            assert re.search(r"mem_mb=lambda wc, attempt: \w+\[\"mem_mb\"\] \* attempt", body), rule


# ---------------------------------------------------------------------------------------------
# The local cluster (opt-in: pytest -m slurm)


def _opted_in(config: pytest.Config) -> bool:
    if os.environ.get("HISTOSYNTH_SLURM_TESTS") == "1":
        return True
    expr = config.getoption("markexpr", "") or ""
    return re.search(r"(?<!not )\bslurm\b", expr) is not None


def _unavailable() -> str | None:
    """Why the local cluster cannot run here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (munged, slurmctld and slurmd are started locally)"
    missing = [p for p in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "mknod")
               if shutil.which(p) is None]
    if missing:
        return f"SLURM not installed (no {', '.join(missing)}; apt-get install slurmctld slurmd slurm-client munge)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm not installed (pip install 'snakemake-executor-plugin-slurm>=2.8,<2.9')"
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and not conf.is_symlink():
        return "/etc/slurm/slurm.conf belongs to a real SLURM installation; not starting a test cluster beside it"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("HISTOSYNTH_SLURM_REQUIRED") == "1":
        pytest.fail(f"HISTOSYNTH_SLURM_REQUIRED=1 but: {reason}")
    pytest.skip(reason)


def _report(config: pytest.Config, line: str) -> None:
    """Print past pytest's capture: the wall times are part of what this test reports."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capman is None:
        print(line, file=sys.stderr)
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    """The local cluster's state dir; its daemons are stopped (by recorded PID) when the module ends."""
    if not _opted_in(request.config):
        pytest.skip("opt-in: run `pytest -m slurm` (needs root and a local SLURM; see docs/slurm.md)")
    reason = _unavailable()
    if reason:
        _skip_or_fail(reason)
    state = tmp_path_factory.mktemp("slurm")
    t0 = time.monotonic()

    def stop():  # registered before the start, so a half-started cluster is stopped too
        res = subprocess.run(["bash", str(STOP), str(state)], capture_output=True, text=True, timeout=120)
        _report(request.config, f"[slurm] stop: {(res.stdout + res.stderr).strip()!r} (rc={res.returncode})")
        _report(request.config, f"[slurm] module wall time (cluster start to stop): {time.monotonic() - t0:.0f} s")

    request.addfinalizer(stop)
    res = subprocess.run(["bash", str(START), str(state)], capture_output=True, text=True, timeout=180)
    if res.returncode != 0:
        logs = "".join(p.read_text()[-1500:] for p in sorted((state / "log").glob("*.log")) if p.exists())
        _skip_or_fail(f"local SLURM could not be started (exit {res.returncode}): "
                      f"{(res.stdout + res.stderr).strip()[-1500:]}\n{logs}")
    _report(request.config, f"[slurm] cluster up in {time.monotonic() - t0:.1f} s, state in {state}")
    return state


def _rule_text() -> str:
    return "\n".join(smk.read_text() for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")))


def _gpu_rules_in_workflow() -> set[str]:
    """Rules whose resources ask for a gpu, read from workflow/rules/*.smk."""
    return {name for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", _rule_text(), flags=re.S | re.M)
            if re.search(r"^\s+gpu\s*=", body, flags=re.M)}


def _jobs(state: Path) -> list[dict[str, str]]:
    """Every job slurmctld still remembers (MinJobAge), one dict per `scontrol show job -o` line."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SLURM_CONF": str(state / "slurm.conf")}).stdout
    jobs = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w[\w/:]*)=(\S*)", line))
        comment = fields.get("Comment", "")
        if comment.startswith("rule_"):
            fields["rule"] = comment[len("rule_"):].split("_wildcards_")[0]
            jobs.append(fields)
    return jobs


def _snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HISTOSYNTH_SLURM_", "SNAKEMAKE_SLURM_", "SNAKEMAKE_PROFILE"))}
    cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--workflow-profile", str(PROFILE),
           # test-only speed-ups; everything else comes from the profile
           "--slurm-init-seconds-before-status-checks", "5", "--latency-wait", "5",
           "--slurm-keep-successful-logs", "--verbose"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env)
    except subprocess.TimeoutExpired as err:  # subprocess.run has killed it (SIGKILL)
        pytest.fail(f"snakemake did not finish in {timeout} s (the plugin's silent hang?):\n"
                    f"{(err.stderr or b'')[-4000:].decode(errors='replace')}")


@pytest.fixture(scope="module")
def smoke(request, cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm-wf")
    (workdir / "config.yaml").write_text(yaml.safe_dump(SMOKE))
    omit = [rule for rule in OMIT_FROM if re.search(rf"^rule {rule}:", _rule_text(), flags=re.M)]
    t0 = time.monotonic()
    res = _snakemake(workdir, *TARGETS, *(["--omit-from", *omit] if omit else []))
    wall = time.monotonic() - t0
    (cluster / "snakemake.log").write_text(res.stdout + res.stderr)
    jobs = _jobs(cluster)
    (cluster / "jobs.txt").write_text("\n".join(repr(j) for j in jobs))
    _report(request.config, f"[slurm] smoke DAG ({' '.join(TARGETS)}) through the profile: {len(jobs)} SLURM jobs, "
                            f"wall time {wall:.0f} s (snakemake log: {cluster / 'snakemake.log'})")
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    return workdir, jobs


@pytest.mark.slurm
def test_gpu_rules_run_on_the_gpu_partition_with_one_gpu(smoke):
    _, jobs = smoke
    gpu_rules = _gpu_rules_in_workflow()
    assert {"train_dvae", "train_gan", "translate"} <= gpu_rules <= KNOWN_GPU_RULES | gpu_rules
    ran = {j["rule"] for j in jobs}
    # every GPU rule the workflow has is in the smoke DAG, and the DAG ran CPU rules too
    assert gpu_rules <= ran, f"GPU rules not run: {gpu_rules - ran}"
    assert ran - gpu_rules, "no CPU job ran"
    for job in jobs:
        where = f"{job['rule']} (job {job['JobId']}): Partition={job.get('Partition')} TresPerJob={job.get('TresPerJob')}"
        assert job["JobState"] == "COMPLETED", where + f" JobState={job['JobState']}"
        if job["rule"] in gpu_rules:
            assert job["Partition"] == "gpu", where
            assert job.get("TresPerJob") in ("gres:gpu:1", "gres/gpu:1", "gres/gpu=1"), where
            assert job.get("CpusPerTres", "").endswith("gpu:1"), where + " (cpus_per_gpu = the rule's 1 thread)"
        else:
            assert job["Partition"] == "cpu", where
            assert "gpu" not in job.get("TresPerJob", "") + job.get("TRES", ""), where


@pytest.mark.slurm
def test_training_memory_comes_from_the_config(smoke):
    _, jobs = smoke
    assert set(TRAIN_MEM_MB) <= {j["rule"].upper() for j in jobs}
    for job in jobs:
        key = job["rule"].upper()
        if key in TRAIN_MEM_MB:  # first attempt: base * 1
            assert job["MinMemoryNode"] == f"{TRAIN_MEM_MB[key]}M", job
    translate = [j for j in jobs if j["rule"] == "translate"]
    assert translate and all(j["MinMemoryNode"] == "1500M" for j in translate), translate


@pytest.mark.slurm
def test_smoke_outputs_exist(smoke):
    workdir, _ = smoke
    results = workdir / "results"
    for path in ("models/dvae/dvae.pt", "models/dvae-sweep/sweep.csv", "models/gan/gan.pt",
                 "synthetic/pairs/shard-0", "synthetic/pairs/shard-1",
                 "synthetic/images-evaluation/evaluation.json", "synthetic/masks-evaluation/evaluation.json"):
        assert (results / path).exists(), path
    if "train_segmenter" in _gpu_rules_in_workflow():
        assert (results / "segmentation" / "real+synthetic" / "seed-0" / "model.pt").exists()
    assert not list(results.rglob("*.tmp*"))


@pytest.mark.slurm
def test_device_cpu_keeps_gpu_rules_off_the_gpu_partition(smoke, cluster):
    """device: cpu makes gpu=0: the same rule now goes to the CPU partition, with no GPU (routing by request)."""
    workdir, before = smoke
    seen = {j["JobId"] for j in before}
    res = _snakemake(workdir, "results/models/dvae/dvae.pt", "--forcerun", "train_dvae", "--config", "device=cpu")
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    new = [j for j in _jobs(cluster) if j["JobId"] not in seen]
    assert [j["rule"] for j in new] == ["train_dvae"], new
    assert new[0]["Partition"] == "cpu" and "gpu" not in new[0].get("TresPerJob", ""), new[0]
