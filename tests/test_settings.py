"""Every key of the schema reaches a CLI flag whose default is the schema's, or is an exception with a reason;
the flags the rules pass (histosynth.cli.flags.config_flags) parse back to the config's values."""

from __future__ import annotations

import argparse
import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from histosynth.cli import build_parser
from histosynth.cli._args import Setting, settings_of
from histosynth.cli.flags import config_flags, stage_parsers
from histosynth.config import config_value, leaf_keys, schema_node, validate_config

REPO = Path(__file__).resolve().parents[1]

#: schema keys no CLI flag stands for (fnmatch patterns), and why
EXCEPTIONS = {
    "results": "the workflow's output folder: every path a rule passes lies under it",
    "slides.source": "where the slides come from: read by the workflow (histosynth.config.slide_table)",
    "slides.table": "where the slides come from: read by the workflow (histosynth.config.slide_table)",
    "slides.images": "where the slides come from: read by the workflow (histosynth.config.slide_table)",
    "slides.annotations": "where the slides come from: read by the workflow (histosynth.config.slide_table)",
    "multifocus.source": "where the z-stack slides come from: read by the workflow (workflow/rules/multifocus.smk)",
    "multifocus.images": "where the z-stack slides come from: read by the workflow (workflow/rules/multifocus.smk)",
    "multifocus.test_slides": "which z-stack slides are held out: the workflow's split (workflow/rules/multifocus.smk)",
    "split.by_stain": "rule split passes --groups SLIDE=STAIN from the slide table (patches.split.split_inputs)",
    "tile.restrict_to_annotations": "rule tile passes --regions-from with the slide's annotation file",
    "gan.option_by": "histosynth.gan.options turns it into train-gan --options, evaluate-images --real-options "
                     "and translate --option per slide",
    "gate.enabled": "whether the DAG has gate_pairs jobs, whose kept pairs the synthetic arms then read",
    "segmenter.arms": "the DAG's grid: one train-segmenter job per arm (--arm {wildcards.arm})",
    "segmenter.seeds": "the DAG's grid: one train-segmenter job per seed (--seed {wildcards.seed})",
    "evidence.k": "the learning curve's grid: one regime per k (histosynth.segmentation.regimes.plan_regimes)",
    "evidence.seeds": "the learning curve's grid: one regime per seed, which seeds every fitted stage in it",
    "evidence.arms": "the learning curve's grid: one train-segmenter job per arm (--arm {wildcards.arm})",
    "segment.slides": "the DAG's grid: one segment_slide job per slide (its path is the job's input)",
    "segment.arm": "which segmenter rule segment_slide reads (its model.pt is the job's input)",
    "segment.seed": "which segmenter rule segment_slide reads (its model.pt is the job's input)",
    "tissue.enabled": "whether the DAG has the train_tissue rule (workflow/rules/masks.smk)",
    "stats.threads": "a scheduler resource: fit-stats runs on one thread and takes no --threads",
    "*.mem_mb": "a scheduler resource (Snakemake's resources), not a setting of the stage",
    "*.runtime": "a scheduler resource (minutes, for a cluster), not a setting of the stage",
}

#: flags that stand for no setting yet have a default other than None / False / [] (a literal left in cli/*)
NOT_SETTINGS = {
    **{("serve", dest): "histosynth serve is run by hand on a finished run, not by the DAG: no config key"
       for dest in ("host", "port", "threads", "max_upload_mb")},
    ("sample-masks", "shard"): "the DAG's job index (--shard {wildcards.shard}), not a setting",
    ("train-dvae", "resume"): "--no-resume: how a stopped run restarts, not what it computes",
    ("dvae-sweep", "resume"): "--no-resume: how a stopped run restarts, not what it computes",
    ("train-gan", "resume"): "--no-resume: how a stopped run restarts, not what it computes",
    ("train-tissue", "resume"): "--no-resume: how a stopped run restarts, not what it computes",
    ("train-segmenter", "resume"): "--no-resume: how a stopped run restarts, not what it computes",
    ("train-daff-g1", "resume"): "--no-resume: how a stopped run restarts, not what it computes",
    ("train-migan-g1", "resume"): "--no-resume: how a stopped run restarts, not what it computes",
    ("train-migan-g2", "resume"): "--no-resume: how a stopped run restarts, not what it computes",
}

#: what each stage needs besides its settings to parse
REQUIRED = {
    "demo-slides": ["out"], "tile": ["s.tif", "out"], "slide-info": ["s.tif"], "rasterize": ["a.xml", "t", "o"],
    "split": ["out.csv", "--slides", "a", "b"], "export": ["ps", "out", "--format", "png"],
    "overlay": ["ps", "o.png"], "fit-stats": ["ps", "out"], "nuclei-library": ["ps", "o.npz"],
    "train-dvae": ["l.npz", "out"], "dvae-sweep": ["l.npz", "out"], "sample-masks": ["s.json", "d.pt", "out"],
    "evaluate-masks": ["syn", "out", "--real", "r"], "train-gan": ["ps", "out"], "translate": ["g.pt", "m", "o"],
    "evaluate-images": ["gen", "out", "--real", "r"], "stain-styles": ["t", "o.json"], "gate-pairs": ["m.pt", "p", "o"],
    "segment": ["m.pt", "s.tif", "o"], "train-segmenter": ["ps", "out", "--arm", "real"],
    "score": ["m.pt", "ps", "out"], "report": ["s.csv", "out"], "evidence-report": ["1=run", "out"],
    "check-config": ["c.yaml"], "import-patches": ["out"], "serve": ["results"], "train-tissue": ["t", "out"], "sample-tissue": ["m.pt", "o"],
    "daff-library": ["ps", "o.npz"], "train-daff-g1": ["ps", "out"],
    "demo-zstack": ["out"], "extract-stacks": ["z.ome.tif", "out"],
    "evaluate-stacks": ["r", "g", "out"], "stack-baselines": ["r", "out", "--kind", "copy"],
    "train-migan-g1": ["st", "out"], "train-migan-g2": ["st", "out"], "sample-stacks": ["g1.pt", "g2.pt", "o"],
}


def _exception(key: str) -> str | None:
    return next((why for pattern, why in EXCEPTIONS.items() if fnmatch.fnmatchcase(key, pattern)), None)


def _unmapped(keys: list[str], mapped: set[str]) -> list[str]:
    """The keys that reach no flag and are no exception: each one fails the test below."""
    return [k for k in keys if k not in mapped and _exception(k) is None]


def _settings() -> list[tuple[str, argparse.ArgumentParser, Setting]]:
    return [(stage, p, s) for stage, p in stage_parsers(build_parser()).items() for s in settings_of(p).values()]


def test_every_schema_key_reaches_a_flag_with_its_default_or_is_an_exception():
    mapped: dict[str, list[str]] = {}
    for stage, p, setting in _settings():
        node = schema_node(setting.key)
        assert p.get_default(setting.dest) == node["default"], f"{stage} {setting.flag} vs {setting.key}"
        if "enum" in node:
            action = next(a for a in p._actions if a.dest == setting.dest)
            assert tuple(action.choices) == tuple(node["enum"]), f"{stage} {setting.flag}"
        mapped.setdefault(setting.key, []).append(f"{stage} {setting.flag}")
    unmapped = _unmapped(leaf_keys(), set(mapped))
    assert not unmapped, f"schema keys with no CLI flag and no entry in EXCEPTIONS: {unmapped}"
    both = {k: mapped[k] for k in mapped if _exception(k) is not None}
    assert not both, f"keys both mapped to flags and listed as exceptions: {both}"
    stale = [p for p in EXCEPTIONS if not any(fnmatch.fnmatchcase(k, p) for k in leaf_keys())]
    assert not stale, f"EXCEPTIONS entries that match no schema key: {stale}"
    assert set(mapped) <= set(leaf_keys())


def test_a_new_key_without_a_flag_fails():
    schema = {"properties": {"gan": {"properties": {"steps": {"default": 1}, "brand_new": {"default": 2},
                                                    "mem_mb": {"default": 3}}}}}
    assert _unmapped(leaf_keys(schema), {"gan.steps"}) == ["gan.brand_new"]


def test_no_literal_default_outside_the_schema():
    """A flag that stands for no setting defaults to nothing (None, False, []), or is listed with a reason."""
    for stage, p in stage_parsers(build_parser()).items():
        settings = settings_of(p)
        for action in p._actions:
            if action.dest in settings or action.dest == "help" or action.default in (None, False, []):
                continue
            if action.dest == "func" or action.default == argparse.SUPPRESS:
                continue
            assert (stage, action.dest) in NOT_SETTINGS, f"{stage} {action.option_strings}: {action.default!r}"


def _different(key: str, default):
    """A valid value of ``key`` other than its default."""
    node = schema_node(key)
    special = {"classes": {"Tumour": 1, "Immune": 5}, "catch_all": "Immune", "split.train": ["a"],
               "split.test": ["b"], "translate.options": ["pale", "dark", "pale"],
               "sample_masks.type_mix": {"Lymphocyte": 0.5}, "gan.diffaugment": ["color", "translation", "cutout"],
               "gan.ema": 0.999, "daff.ops": ["flip", "cover"], "migan.lambda_l1": 1.0,
               "rasterize.tissue_regions": {"tumor": 1, "stroma": 2},
               "slides.patches.images": "d/images/*.png", "slides.patches.inst": "d/inst/{stem}.npy",
               "slides.patches.types": "d/types/{stem}.mat", "slides.patches.group_regex": "^(tile[0-9]+)_",
               "slides.patches.type_values": {"5": "Immune"}}
    if key in special:
        return special[key]
    if "enum" in node:
        return next(v for v in node["enum"] if v != default)
    if isinstance(default, bool):
        return not default
    types = node["type"] if isinstance(node["type"], list) else [node["type"]]
    if default is None:
        return node.get("minimum", 1) + 7 if "integer" in types else 0.3
    if isinstance(default, list):
        return [v + 1 for v in default]
    if isinstance(default, int):
        return default + 1 if default + 1 <= node.get("maximum", default + 1) else default - 1
    return round(default * 0.9, 6)


def _config_with(values: dict) -> dict:
    raw: dict = {}
    for key, value in values.items():
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return validate_config(raw)


def _parse(stage: str, flags: str) -> argparse.Namespace:
    return build_parser().parse_args([stage, *REQUIRED[stage], *shlex.split(flags)])


@pytest.mark.parametrize("which", ["defaults", "changed", "nulls"])
def test_config_flags_parse_back_to_the_config(which):
    keys = sorted({s.key for _, _, s in _settings()})
    if which == "defaults":
        cfg = validate_config({})
    elif which == "changed":
        # gan.tissue_channel (changed to true) needs the tissue layouts on (tissue.enabled is no flag)
        cfg = _config_with({**{k: _different(k, config_value(validate_config({}), k)) for k in keys},
                            "tissue.enabled": True})
        for k in keys:  # every value differs from the default: parsing it back proves the flag was written
            assert config_value(cfg, k) != schema_node(k)["default"], k
    else:
        nullable = [k for k in keys if "null" in (schema_node(k)["type"] if isinstance(schema_node(k)["type"], list)
                                                  else [])]
        assert "tile.target_mpp" in nullable
        cfg = _config_with({k: None for k in nullable})
    for stage, p in stage_parsers(build_parser()).items():
        args = vars(_parse(stage, config_flags(stage, cfg)))
        for setting in settings_of(p).values():
            got, want = args[setting.dest], config_value(cfg, setting.key)
            if isinstance(want, dict):
                want = [f"{k}={v}" for k, v in want.items()]
            if isinstance(got, tuple):
                got = list(got)
            assert got == want, f"{stage} {setting.flag}: {got!r} != {want!r} ({setting.key})"


def test_config_flags_omit_and_errors():
    cfg = validate_config({})
    assert "--threads" not in config_flags("tile", cfg, omit=["--threads"])
    assert "--threads 1" in config_flags("tile", cfg)
    assert "--mpp 0.5" in config_flags("tile", cfg)
    assert "--stride" not in config_flags("tile", cfg)  # null is the flag's default too: left out
    assert "--mpp none" in config_flags("tile", _config_with({"tile.target_mpp": None}))
    assert "--no-fid" in config_flags("evaluate-images", _config_with({"evaluate_images.fid": False}))
    assert config_flags("translate", _config_with({"translate.options": ["a b", "c"]})).startswith(
        "--option 'a b' --option c")
    with pytest.raises(ValueError, match="not settings"):
        config_flags("tile", cfg, omit=["--thread"])
    with pytest.raises(KeyError, match="no stage"):
        config_flags("tiles", cfg)


def test_by_hand_defaults_are_the_schema_defaults():
    """The defaults that used to differ between the CLI and the schema: the schema's now."""
    defaults = validate_config({})
    checks = {
        ("train-gan", "steps"): defaults["gan"]["steps"],
        ("train-gan", "decay_steps"): defaults["gan"]["decay_steps"],
        ("train-segmenter", "steps"): defaults["segmenter"]["steps"],
        ("train-segmenter", "batch_size"): defaults["segmenter"]["batch_size"],
        ("train-segmenter", "checkpoint_every"): defaults["segmenter"]["checkpoint_every"],
        ("demo-slides", "n_slides"): defaults["slides"]["demo"]["n_slides"],
        ("demo-slides", "size"): defaults["slides"]["demo"]["size"],
        ("split", "test_fraction"): defaults["split"]["test_fraction"],
        ("tile", "target_mpp"): defaults["tile"]["target_mpp"],
        ("train-dvae", "conditional"): defaults["dvae"]["conditional"],
        ("sample-masks", "n"): defaults["sample_masks"]["n"],
    }
    for (stage, dest), want in checks.items():
        args = vars(_parse(stage, ""))
        assert args[dest] == want, (stage, dest)


def test_append_option_replaces_its_default():
    parser = build_parser()
    assert parser.parse_args(["translate", "g", "m", "o"]).options == ["all"]
    assert parser.parse_args(["translate", "g", "m", "o", "--option", "pale", "--option", "dark"]).options == [
        "pale", "dark"]
    assert parser.parse_args(["translate", "g", "m", "o"]).options == ["all"]  # the default list is untouched


def test_switches_take_both_forms():
    parser = build_parser()
    base = ["train-dvae", "l.npz", "out"]
    assert parser.parse_args(base).conditional is True and parser.parse_args(base).augment is True
    assert parser.parse_args([*base, "--no-conditional", "--no-augment"]).conditional is False
    assert parser.parse_args([*base, "--no-augment"]).augment is False
    gan = ["train-gan", "ps", "out"]
    assert parser.parse_args([*gan, "--no-dropout-at-inference"]).dropout_at_inference is False
    assert parser.parse_args([*gan, "--noise"]).noise is True


# --------------------------------------------------------------------------- the rules pass the config's values
def _rule_commands(workdir: Path, config: dict, *targets: str) -> list[list[str]]:
    """The histosynth commands of a dry run of the real DAG (every job, as Snakemake would run it)."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # classes keep their order
    cmd = [sys.executable, "-m", "snakemake", *targets, "-n", "-p", "--forceall", "-s", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "64",
           "--resources", "gpu=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    commands = []
    for line in (res.stdout + res.stderr).splitlines():
        if "python -m histosynth " in line:
            words = shlex.split(line.split("python -m histosynth ", 1)[1])
            commands.append(words[: words.index(">")])
    return commands


def _check_rules_pass_the_config(commands: list[list[str]], cfg: dict) -> set[str]:
    from histosynth.gan.options import translate_seed

    parser = build_parser()
    parsers = stage_parsers(parser)
    seen = set()
    for words in commands:
        stage = words[0]
        args = vars(parser.parse_args(words))
        seen.add(stage)
        # a job of a learning-curve regime (evidence/k-K/seed-S/) takes the regime's seed for the config's
        regime = next((re.search(r"/evidence/k-\w+/seed-(\d+)/", w) for w in words if "/evidence/k-" in w), None)
        job_cfg = {**cfg, "seed": int(regime.group(1))} if regime else cfg
        for setting in settings_of(parsers[stage]).values():
            want = config_value(job_cfg, setting.key)
            got = args[setting.dest]
            if stage == "translate" and setting.flag == "--seed" and args["no_montage"] is False:
                shard = int(re.search(r"shard-(\d+)$", words[2]).group(1))
                want = translate_seed(job_cfg["seed"], shard)  # each shard its own stream
            elif stage == "translate" and setting.flag == "--option" and args["no_montage"]:
                continue  # the test slides' masks are painted with the slide's known option (test_gan_options)
            elif stage == "extract-stacks" and setting.flag == "--augment":
                want = want and words[-1].endswith("/stacks/train")  # held-out stacks are never augmented
            elif stage == "train-segmenter" and setting.flag == "--seed":
                seeds = [job_cfg["seed"]] if regime else cfg["segmenter"]["seeds"]
                want = got if got in seeds else seeds
            if want is None and parsers[stage].get_default(setting.dest) is None:
                assert setting.flag not in words
            else:
                assert setting.flag in words or f"--no-{setting.flag[2:]}" in words, f"{stage}: {setting.flag}"
            if isinstance(want, dict):
                want = [f"{k}={v}" for k, v in want.items()]
            got = list(got) if isinstance(got, tuple) else got
            assert got == want, f"{stage} {setting.flag}: {got!r}, config {setting.key}: {want!r}"
    return seen


def test_every_rule_passes_the_config_values(tmp_path):
    """The shell commands of the DAG for config.yaml: every setting of each stage is a flag with the config's value."""
    cfg = _segmenting_a_demo_slide(validate_config(yaml.safe_load((REPO / "config.yaml").read_text())))
    commands = _rule_commands(tmp_path, cfg, "all", "dvae_sweep", "evidence", "segment", "multifocus")
    seen = _check_rules_pass_the_config(commands, cfg)
    assert not any("--regions-file" in w for w in commands)  # no rasterize.tissue_regions, no regions files
    # daff-library and train-daff-g1 run only with sample_masks.method daff (tests/test_daff_layout.py)
    # import-patches runs only with slides.source patches (test_import_rule_passes_the_config_values)
    assert seen == set(stage_parsers()) - {"slide-info", "export", "overlay", "check-config", "stain-styles",
                                           "gate-pairs", "serve", "train-tissue", "sample-tissue",
                                           "daff-library", "train-daff-g1", "import-patches"}


def test_import_rule_passes_the_config_values(tmp_path):
    """slides.source patches: one import-patches job per group, with the config's values; no tile job."""
    from tests.test_import_patches import write_dataset

    write_dataset(tmp_path / "d", {"tile1": 2, "tile2": 1, "tile3": 1})
    patches = {"images": "d/images/*.png", "inst": "d/inst/{stem}.npy", "types": "d/types/{stem}.mat",
               "group_regex": "^(tile[0-9]+)_", "mpp": 0.25, "type_values": {1: "Tumour", 2: "Immune", 3: "Immune",
                                                                             4: "Tumour"}}
    cfg = _config_with({"slides.source": "patches", "slides.patches": patches, "classes": {"Tumour": 1, "Immune": 2},
                        "tile.size": 64, "tile.background_threshold": 190})
    commands = _rule_commands(tmp_path, cfg, "all")
    seen = _check_rules_pass_the_config(commands, cfg)
    assert "import-patches" in seen and not {"tile", "rasterize"} & seen
    groups = sorted(w[w.index("--group") + 1] for w in commands if w[0] == "import-patches")
    assert groups == ["tile1", "tile2", "tile3"]


def _segmenting_a_demo_slide(cfg: dict) -> dict:
    """``cfg`` with segment.slides naming its first demo slide (so that rule segment_slide runs)."""
    from histosynth.config import demo_slide_names

    cfg["segment"]["slides"] = [f"{cfg['results']}/demo/{demo_slide_names(cfg['slides']['demo']['n_slides'])[0]}.tif"]
    return cfg


def test_every_rule_passes_changed_values(tmp_path):
    """The same with every setting changed from its default: a value a rule forgot would show here."""
    keys = sorted({s.key for _, _, s in _settings()} - {"split.train", "split.test"})
    # with the option layer's styles found by k-means and the quality gate on (neither is a flag), so
    # stain-styles and gate-pairs run too; one style, as the learning curve's k = 1 regimes have one train
    # slide (more styles than slides is an error)
    cfg = _config_with({**{k: _different(k, config_value(validate_config({}), k)) for k in keys},
                        "gan.option_by": "cluster", "gan.clusters": 1, "gate.enabled": True, "tissue.enabled": True})
    cfg = _segmenting_a_demo_slide(cfg)
    cfg["segment"]["arm"] = cfg["segmenter"]["arms"][-1]
    commands = _rule_commands(tmp_path, cfg, "all", "dvae_sweep", "evidence", "segment")
    seen = _check_rules_pass_the_config(commands, cfg)
    assert {"stain-styles", "gate-pairs", "segment", "train-tissue", "sample-tissue"} <= seen
    # with tissue layouts on, every regime samples its nuclei inside the tissue of its own tissue model
    sampled = [w for w in commands if w[0] == "sample-masks"]
    assert sampled and all(w[w.index("--tissue") + 1] == w[1].replace("stats/stats.json", "models/tissue/tissue.pt")
                           for w in sampled)
    trained = {x for w in commands if w[0] == "train-tissue" for x in w if x.endswith("models/tissue")}
    # with rasterize.tissue_regions the demo slides' region files go to rasterize, and the tissue model learns
    # the region labels of the rasterized sets
    rasterized = [w for w in commands if w[0] == "rasterize"]
    assert rasterized and all(w[w.index("--regions-file") + 1] == w[1].replace(".geojson", ".regions.geojson")
                              for w in rasterized)
    assert all("/patches/" in w[1] and "/tiles/" not in " ".join(w) for w in commands if w[0] == "train-tissue")
    assert any("/evidence/k-" in t for t in trained) and any("/evidence/" not in t for t in trained)


# --------------------------------------------------------------------------- by hand = the rule with the defaults
def test_stage_by_hand_equals_the_rule_with_schema_defaults(tmp_path, monkeypatch):
    """tile and split run by hand with only their required arguments write what the rules write for a config
    that sets nothing but where the slides are."""
    from histosynth.cli import main
    from tests.helpers import tissue_image, write_pyramid

    names = ["S1", "S2", "S3"]
    for i, name in enumerate(names):
        write_pyramid(tmp_path / f"{name}.tif", tissue_image(800, 600, seed=i, tissue=(0.2, 1.0)), levels=2)
    (tmp_path / "slides.csv").write_text("slide,image,annotations\n" + "".join(
        f"{n},{n}.tif,{n}.geojson\n" for n in names))
    config = {"slides": {"source": "table", "table": "slides.csv"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "results/tiles/S1", "split", "-s", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rule = tmp_path / "results"

    monkeypatch.chdir(tmp_path)  # as the rule ran: index.csv records the slide's path
    assert main(["tile", "S1.tif", str(tmp_path / "hand" / "S1")]) == 0
    for name in ("index.csv", "images.npy"):
        assert (tmp_path / "hand" / "S1" / name).read_bytes() == (rule / "tiles" / "S1" / name).read_bytes(), name
    assert main(["split", str(tmp_path / "hand" / "split.csv"), "--slides", *names]) == 0
    assert (tmp_path / "hand" / "split.csv").read_bytes() == (rule / "split.csv").read_bytes()
