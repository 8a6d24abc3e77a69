"""End to end: the real Snakemake DAG on a tiny config (demo slides -> tiles -> typed patches + split
-> statistics, nuclei library, beta-VAE -> sampled synthetic masks -> GAN-painted pairs, and evaluations
-> HoVer-Net per arm -> scores on the test slides -> report)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histosynth.io.patchset import read_patchset

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "results": "results",
    "slides": {"source": "demo", "demo": {"n_slides": 3, "size": [1024, 1024], "mpp": 0.25, "seed": 3}},
    "tile": {"size": 128, "target_mpp": 0.5},
    "classes": {"Epithelial": 1, "Lymphocyte": 2, "Spindle": 3},
    "stats": {"calibrate": 1, "calibrate_masks": 8},
    "dvae": {"epochs": 2, "min_steps": 0, "threads": 1, "batch_size": 64},
    "sample_masks": {"n": 8, "shards": 2, "size": 128},
    "gan": {"crop": 64, "depth": 4, "width": 8, "steps": 3, "decay_steps": 2, "batch_size": 2,
            "sample_every": 5, "checkpoint_every": 5, "threads": 1},
    "segmenter": {"seeds": [0], "width": 8, "units": [1, 1, 1, 1], "input_size": 104, "steps": 2,
                  "batch_size": 1, "threads": 1},
    "score": {"overlays": 1, "threads": 1},
    "evaluate_images": {"fid": False, "threads": 1},
    "evaluate_masks": {"inception": False},
}


def snakemake(workdir: Path, *args: str, configfile: str = "config.yaml") -> subprocess.CompletedProcess:
    # options taking several values (--resources, --config) go last, after the targets. Two "GPUs": the tiny
    # jobs are mostly interpreter start-up, and the chain of GPU rules would otherwise run one at a time
    cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / configfile), "--cores", "2", "--resources", "gpu=2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("wf")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    res = snakemake(workdir)  # the default target
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


def test_dag_produces_tiles(run):
    results = run / "results"
    assert (results / "demo" / "slides.csv").exists()
    for slide in ("demo-000", "demo-001"):
        ps = read_patchset(results / "tiles" / slide, require=("images",))
        assert len(ps) > 0 and ps.images.shape[1:] == (128, 128, 3)
        assert set(ps.index["slide"]) == {slide}
        assert abs(ps.index["mpp"].iloc[0] - 0.5) < 1e-9
        assert (results / "logs" / "tile" / f"{slide}.log").exists()
    assert not list(results.glob("tiles/.*tmp*"))


def test_dag_produces_typed_patches_and_split(run):
    from histosynth.patches.split import read_split

    results = run / "results"
    split = read_split(results / "split.csv")
    assert sorted(split["slide"]) == ["demo-000", "demo-001", "demo-002"]
    assert set(split["split"]) == {"train", "test"}
    for slide in ("demo-000", "demo-001"):
        tiles = read_patchset(results / "tiles" / slide)
        ps = read_patchset(results / "patches" / slide, require=("images", "inst", "types"))
        assert len(ps) == len(tiles)
        assert (ps.images[:] == tiles.images[:]).all()
        assert ps.index["n_nuclei"].sum() > 0
        assert (ps.index["n_nuclei"] == ps.index[["n_epithelial", "n_lymphocyte", "n_spindle"]].sum(axis=1)).all()
        assert set(int(t) for t in ps.types[:].ravel()) <= {0, 1, 2, 3}
        assert ps.report["nuclei_read"] > 0 and ps.report["parse"]
        assert (results / "qc" / "overlays" / f"{slide}.png").stat().st_size > 1000


def test_dag_produces_synthetic_masks(run):
    import json

    results = run / "results"
    stats = json.loads((results / "stats" / "stats.json").read_text())
    assert stats["classes"] == {"1": "Epithelial", "2": "Lymphocyte", "3": "Spindle"}  # the config's classes
    assert (results / "models" / "dvae" / "dvae.pt").exists()
    assert (results / "models" / "dvae" / "traversal.png").stat().st_size > 1000
    total = 0
    for shard in (0, 1):
        ps = read_patchset(results / "synthetic" / "masks" / f"shard-{shard}", require=("inst", "types"))
        assert ps.images is None and ps.inst.shape[1:] == (128, 128)
        total += len(ps)
    assert total == 8
    evaluation = json.loads((results / "synthetic" / "masks-evaluation" / "evaluation.json").read_text())
    assert {"count", "area", "eccentricity", "nn_distance"} <= set(evaluation["features"])
    realism = evaluation["realism"]  # DEPAS's measures on area-averaged masks (the network is off here)
    assert realism["n"]["synthetic"] == 8 and realism["area"]["ks_2d"] is not None
    assert realism["inception"]["skipped"] == "disabled (--no-inception)"
    assert (results / "synthetic" / "masks-evaluation" / "realism.png").exists()
    # fitted on train slides only: the evaluation compares against the test slides
    split = pd.read_csv(results / "split.csv")
    test = {f"results/patches/{s}" for s in split.loc[split["split"] == "test", "slide"]}
    assert set(evaluation["real"]) == test


def test_dag_produces_synthetic_pairs(run):
    import json

    results = run / "results"
    assert (results / "models" / "gan" / "gan.pt").exists()
    assert (results / "models" / "gan" / "samples.png").stat().st_size > 1000
    options = set()
    for shard in (0, 1):
        ps = read_patchset(results / "synthetic" / "pairs" / f"shard-{shard}", require=("images", "inst", "types"))
        masks = read_patchset(results / "synthetic" / "masks" / f"shard-{shard}")
        assert ps.images.shape[1:] == (128, 128, 3) and (ps.inst[:] == masks.inst[:]).all()
        options |= set(ps.index["option"])
        assert (results / "synthetic" / "pairs" / f"shard-{shard}.montage.png").exists()
    # train slides: one pale, one dark (each stain split on its own): the option layer knows both styles
    assert options == {"pale", "dark"}
    # the GAN's figures are measured in docs/benchmarks.md, not asserted here; what the DAG fed it is
    evaluation = json.loads((results / "synthetic" / "images-evaluation" / "evaluation.json").read_text())
    split = pd.read_csv(results / "split.csv")
    test = sorted(split.loc[split["split"] == "test", "slide"])
    stains = dict(pd.read_csv(results / "demo" / "slides.csv")[["slide", "stain"]].values)
    assert evaluation["settings"]["real_options"] == {s: stains[s] for s in test}  # gan.option_by: stain
    assert evaluation["inputs"]["real"] == [f"results/patches/{s}" for s in test]
    assert evaluation["inputs"]["translated"] == [f"results/synthetic/translated-test/{s}" for s in test]
    assert evaluation["n_patches"]["generated"] == 8 and evaluation["fid"]["skipped"] == "disabled"
    assert evaluation["settings"]["max_samples"] == 200_000 and evaluation["settings"]["seed"] == 0


def test_dag_trains_scores_and_reports_every_arm(run):
    import json

    results = run / "results"
    split = pd.read_csv(results / "split.csv")
    test = set(split.loc[split["split"] == "test", "slide"])
    for arm in ("real", "real+synthetic", "synthetic"):
        seg = results / "segmentation" / arm / "seed-0"
        assert (seg / "model.pt").exists() and (seg / "log.csv").exists()
        scores = pd.read_csv(seg / "scores.csv")
        assert set(scores["slide"]) == test and set(scores["arm"]) == {arm}  # TEST slides only
        assert json.loads((seg / "summary.json").read_text())["n_images"] == len(scores)
    summary = pd.read_csv(results / "report" / "summary.csv")
    assert set(summary["arm"]) == {"real", "real+synthetic", "synthetic"}
    page = (results / "report" / "index.html").read_text()
    assert "β-VAE latent traversal" in page and len(list((results / "report" / "figures").iterdir())) >= 12


def test_snakemake_report_carries_the_figures(run):
    res = snakemake(run, "--report", str(run / "report.html"))
    assert res.returncode == 0, res.stderr[-3000:]
    html = (run / "report.html").read_text(errors="replace")
    for caption in ("latent traversal", "Stain realism", "true nuclei outlined in yellow"):
        assert caption in html, caption


def test_segment_target_segments_a_whole_slide(run):
    """snakemake segment: the trained real-arm segmenter over a whole demo slide, into QuPath GeoJSON + CSV."""
    import json

    # at 1 um/px (the model was trained at 0.5: resampled, with a warning) to keep the suite short
    cfg = {**TINY, "segment": {"slides": ["results/demo/demo-000.tif"], "tile": 256, "margin": 16, "mpp": 1.0,
                               "threads": 1}}
    (run / "segment.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(run, "segment", configfile="segment.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    out = run / "results" / "segment" / "demo-000"
    report = json.loads((out / "segment.json").read_text())
    assert report["arm"] == "real" and report["seed"] == 0 and report["model_mpp"] == pytest.approx(0.5)
    assert report["mpp"] == pytest.approx(1.0)
    assert report["counts"]["tissue_tiles"] > 0
    geojson = json.loads((out / "nuclei.geojson").read_text())
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == report["counts"]["nuclei"]
    assert len(pd.read_csv(out / "nuclei.csv")) == report["counts"]["nuclei"]
    assert not list((run / "results" / "segment").glob(".*"))  # no work folder or temporary left behind


def test_dvae_sweep_target(run):
    sweep = {**TINY, "dvae": {**TINY["dvae"], "sweep_latent_dims": [2, 4], "sweep_epochs": 1}}
    (run / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    res = snakemake(run, "dvae_sweep", configfile="sweep.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    table = pd.read_csv(run / "results" / "models" / "dvae-sweep" / "sweep.csv")
    assert sorted(table.iloc[:, 0]) == [2, 4]
    assert (run / "results" / "models" / "dvae-sweep" / "sweep.png").stat().st_size > 1000


def test_gpu_preset_script_runs_the_learning_curve_on_the_cpu_at_tiny_size(tmp_path):
    """scripts/evidence-gpu.sh with config/evidence-gpu.yaml, the tiny sizes laid over it (EXTRA_CONFIG):
    every regime fits on its own slides, every arm is scored on the same test slides, one report."""
    import json
    import os

    # two regimes; the arms real (the baseline) and painted-real (the DAG's own path: the GAN paints the regime's
    # real masks); the sampled-mask arms share their rules with the default run, tested above
    tiny = {**TINY, "device": "cpu", "sample_masks": {**TINY["sample_masks"], "shards": 1},
            "evidence": {"k": [1], "seeds": [0, 1], "arms": ["real", "painted-real"]}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    env = {**os.environ, "EXTRA_CONFIG": str(tmp_path / "tiny.yaml"), "CORES": "2", "GPU_JOBS": "2",
           "SNAKEMAKE": f"{sys.executable} -m snakemake"}
    res = subprocess.run(["bash", str(REPO / "scripts" / "evidence-gpu.sh"), "--directory", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    results = tmp_path / "results"
    tested, drawn = set(), {}
    for seed in (0, 1):
        regime = results / "evidence" / "k-1" / f"seed-{seed}"
        stats = json.loads((regime / "stats" / "stats.json").read_text())
        for arm in ("real", "painted-real"):
            run = regime / "segmentation" / arm / f"seed-{seed}"
            info = json.loads((run / "train.json").read_text())
            assert len(info["slides"]) == 1  # k = 1 train slide
            assert set(info["slides"]) == drawn.setdefault(seed, set(info["slides"]))  # the same for every arm
            scored = set(pd.read_csv(run / "scores.csv")["slide"])
            assert scored == (tested or scored) and not scored & set(info["slides"])  # the same test slides
            tested = scored
            assert (run / "validation.csv").is_file() and info["best_step"] >= 1
        (slide,) = drawn[seed]
        assert stats["n_patches"] == len(read_patchset(results / "patches" / slide))  # fitted on that slide alone
    report = results / "evidence" / "report"
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == 2 * 2 and set(runs["arm"]) == {"real", "painted-real"}
    differences = pd.read_csv(report / "differences.csv")
    assert set(differences["arm"]) == {"painted-real"}
    generators = pd.read_csv(report / "generators.csv")  # each regime's mask and image evaluations
    assert list(generators["seed"]) == [0, 1] and generators["stain_distance"].notna().all()
    assert (report / "learning_curve.png").stat().st_size > 1000 and "real" in (report / "evidence.md").read_text()


def test_nothing_to_do_on_rerun(run):
    res = snakemake(run, "-n")
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr


def test_changed_tile_params_rerun_tiles_only(run):
    (run / "changed.yaml").write_text(yaml.safe_dump({**TINY, "tile": {"size": 64, "target_mpp": 0.5}}))
    res = snakemake(run, "tiles", "-n", configfile="changed.yaml")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-2000:]
    assert "rule tile:" in out and "rule demo_slides:" not in out and "rule split:" not in out


def test_bad_config_stops_with_the_key(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"tile": {"sise": 64}}))
    res = snakemake(tmp_path, "-n")
    assert res.returncode != 0
    assert "unknown key 'tile.sise'" in res.stdout + res.stderr


@pytest.mark.parametrize("extra, message", [
    ({"evidence": {"k": [9]}}, r"evidence.k asks for 9 train slides but the split has 2"),
    ({"evidence": {"arms": ["real", "fake"]}}, r"key 'evidence.arms.1': 'fake' is not one of"),
    ({"segmenter": {"mix": 1.5}}, r"key 'segmenter.mix': 1.5 is greater than the maximum of 1"),
    ({"evidence": {"seeds": [0]}}, r"key 'evidence.seeds'"),
], ids=["k-too-large", "unknown-arm", "mix-out-of-range", "one-seed"])
def test_bad_learning_curve_settings_stop_before_any_job(tmp_path, extra, message):
    import re

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, **extra}))
    res = snakemake(tmp_path, "evidence", "-n")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and re.search(message, out), out[-2000:]
    assert not (tmp_path / "results").exists()  # nothing ran, nothing written


def test_monuseg_preset_runs_the_dag_so_far(tmp_path, shared_data):
    """config/monuseg.yaml (folder of images + ImageScope XML) through `patches`, on two of its slides."""
    preset = yaml.safe_load((REPO / "config" / "monuseg.yaml").read_text())
    images = tmp_path / "images"
    images.mkdir()
    names = ["TCGA-21-5784-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1"]
    for name in names:  # two slides keep the test short; the preset's settings are what is tested
        (images / f"{name}.tif").symlink_to(shared_data / "monuseg-train" / "images" / f"{name}.tif")
    preset["slides"]["images"] = str(images / "*.tif")
    preset["slides"]["annotations"] = str(shared_data / "monuseg-train" / "annotations" / "{slide}.xml")
    preset["results"] = "out"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(preset))
    res = snakemake(tmp_path, "patches")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in names:
        ps = read_patchset(tmp_path / "out" / "patches" / name, require=("images", "inst", "types"))
        assert len(ps) == 16 and not ps.index["padded"].any()  # 4 x 4 tiles of 128 px cover 500 px exactly
        assert ps.report["nuclei_on_no_kept_tile"] == 0 and ps.index["n_nuclei"].sum() > 300
        assert set(int(t) for t in ps.types[:].ravel()) == {0, 1}
    assert sorted(pd.read_csv(tmp_path / "out" / "split.csv")["slide"]) == names


def _outputs(results: Path) -> dict[str, float]:
    """Every file under results/ (logs and Snakemake's own state aside) → its mtime."""
    return {str(p.relative_to(results)): p.stat().st_mtime for p in results.rglob("*")
            if p.is_file() and "logs" not in p.parts}


def test_killed_run_restarts_without_redoing_finished_jobs(tmp_path):
    """kill -9 Snakemake and its jobs mid-run; unlock and rerun: finished jobs are kept, the rest completes."""
    import os
    import signal
    import time

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    # up to the synthetic pairs (target `synthetic`): the segmenters add time, not another kind of job to kill
    cmd = [sys.executable, "-m", "snakemake", "synthetic", "-s", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "--resources", "gpu=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = tmp_path / "results"
    started = results / "logs" / "train_dvae.log"  # the patches are done, the beta-VAE is training
    deadline = time.monotonic() + 300
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # what had finished when the kill came: everything upstream of the beta-VAE
    finished = ("demo/", "tiles/", "patches/", "qc/", "split.csv", "library/")
    before = {k: v for k, v in _outputs(results).items() if k.startswith(finished)}
    assert any(k.startswith("patches/") for k in before) and not (results / "models" / "dvae" / "dvae.pt").exists()

    assert snakemake(tmp_path, "--unlock").returncode == 0
    res = snakemake(tmp_path, "synthetic", "--rerun-incomplete")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    after = _outputs(results)
    kept = {k: v for k, v in before.items() if k in after and after[k] == v}
    assert kept == before, f"redone: {sorted(set(before) - set(kept))}"
    for rule in ("demo_slides", "tile", "rasterize", "split"):
        assert f"rule {rule}:" not in out, rule
    assert "rule train_dvae:" in out and (results / "synthetic" / "images-evaluation" / "evaluation.json").is_file()
    for shard in (0, 1):
        read_patchset(results / "synthetic" / "pairs" / f"shard-{shard}", require=("images", "inst", "types"))
    assert not [k for k in after if "tmp" in Path(k).name], "temporary files left behind"


MULTIFOCUS_TINY = {
    "results": "results",
    "multifocus": {"demo": {"n_slides": 2, "size": [320, 320], "planes": 5, "n_cells": 10, "seed": 1},
                   "planes": 5, "augment": True, "evaluate_fid": False, "threads": 1},
    "migan": {"steps": 2, "batch_size": 4, "g2_batch_size": 2, "n_critic": 1, "width": 4, "critic_width": 4,
              "g2_width": 4, "code_channels": 4, "res_blocks": 1, "g2_critic_width": 4, "sample_n": 6,
              "checkpoint_every": 2, "sample_every": 2, "threads": 1},
}


def test_multifocus_branch_trains_samples_and_scores_against_held_out_stacks(tmp_path):
    """snakemake multifocus on tiny demo z-stacks: stacks of the train slide (augmented) and the held-out one,
    G1, G2, synthetic stacks and both baselines, each scored against the held-out stacks."""
    import json

    from histosynth.multifocus.stackset import read_stackset

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(MULTIFOCUS_TINY))
    res = snakemake(tmp_path, "multifocus")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    mf = tmp_path / "results" / "multifocus"
    train, test = read_stackset(mf / "stacks" / "train"), read_stackset(mf / "stacks" / "test")
    assert set(train.index["slide"]) == {"zstack-00"} and set(test.index["slide"]) == {"zstack-01"}
    assert "augmented" in set(train.index["source"]) and set(test.index["source"]) == {"real"}
    for name in ("migan", "copy", "blur"):
        s = read_stackset(mf / "synthetic" / name)
        assert len(s) == 6 and s.planes == 5
    ev = json.loads((mf / "evaluation" / "evaluation.json").read_text())
    assert "migan" in json.dumps(ev) and "blur" in json.dumps(ev)
    assert (mf / "evaluation" / "montage.png").stat().st_size > 1000
    assert "| migan" in (mf / "evaluation" / "table.md").read_text()


def test_multifocus_branch_needs_a_held_out_slide(tmp_path):
    cfg = {**MULTIFOCUS_TINY, "multifocus": {**MULTIFOCUS_TINY["multifocus"],
                                             "demo": {**MULTIFOCUS_TINY["multifocus"]["demo"], "n_slides": 1}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, "multifocus", "-n")
    assert res.returncode != 0 and "multifocus.test_slides = 1" in res.stdout + res.stderr


def test_patch_dataset_source_imports_groups_splits_by_group_and_fits_stats(tmp_path):
    """slides.source patches: a 2-group patch dataset (40x, 96 px) -> one patch set per group at 0.5 um/px,
    split by group, statistics fitted on the train group; no tile or rasterize job."""
    from tests.test_import_patches import write_dataset

    write_dataset(tmp_path / "ds", {"tileA": 3, "tileB": 3}, size=96, n=6)
    config = {**TINY, "slides": {"source": "patches", "patches": {
        "images": "ds/images/*.png", "inst": "ds/inst/{stem}.npy", "types": "ds/types/{stem}.mat", "mpp": 0.25}},
        "classes": {"Other": 1, "Inflammatory": 2, "Epithelial": 3, "Spindle": 4}, "tile": {"size": 48}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    res = snakemake(tmp_path, "patches", "results/stats/stats.json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rule tile:" not in res.stdout + res.stderr and "rule rasterize:" not in res.stdout + res.stderr
    for group in ("tileA", "tileB"):
        ps = read_patchset(tmp_path / "results" / "patches" / group, require=("images", "inst", "types"))
        assert ps.images.shape == (3, 48, 48, 3) and set(ps.index["slide"]) == {group}
        assert ps.report["counts"]["instances_read"] == 18
        assert (tmp_path / "results" / "qc" / "overlays" / f"{group}.png").is_file()
    split = pd.read_csv(tmp_path / "results" / "split.csv")
    assert sorted(split["slide"]) == ["tileA", "tileB"] and sorted(split["split"]) == ["test", "train"]
    assert (tmp_path / "results" / "stats" / "stats.json").is_file()
