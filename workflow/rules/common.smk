# Start-up: validate the config (defaults come from the schema), build the slide table.
import os
import re
import shlex
import sys

# The package's source: importable here even when histosynth is not installed,
# and by every job (`python -m histosynth <stage>`), also inside a --use-conda
# environment, which holds the dependencies but not histosynth itself.
SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (SRC, os.environ.get("PYTHONPATH")) if p
)
# Jobs without --use-conda run the Python of Snakemake, even when its virtual
# environment is not activated.
os.environ["PATH"] = os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
)

from histosynth.config import load_schema, slide_table, validate_config
from histosynth.patches.split import split_slides


# Read (and extended) at start-up; declared so that a job on a cluster gets them too.
envvars:
    "PATH",
    "PYTHONPATH",


config = validate_config(config, load_schema())
RESULTS = config["results"]
# conda environments for --use-conda: the CUDA build of torch for the GPU rules
# (unless the config pins the CPU), the CPU build for the rest
CPU_ENV = "../../envs/cpu.yaml"
GPU_ENV = CPU_ENV if config["device"] == "cpu" else "../../envs/cuda.yaml"
SLIDES = slide_table(config)
SLIDE_NAMES = list(SLIDES["slide"])


wildcard_constraints:
    slide="|".join(map(re.escape, SLIDE_NAMES)) if SLIDE_NAMES else "[^/]+",


def slide_row(slide):
    return SLIDES.loc[SLIDES["slide"] == slide].iloc[0]


def slide_image(wildcards):
    return slide_row(wildcards.slide)["image"]


def slide_annotations(slide):
    """The slide's annotation file as a one-item list, or [] when it has none."""
    path = slide_row(slide)["annotations"]
    return [] if path is None else [path]


def mpp_flag(wildcards):
    """--mpp-fallback from the slide table's mpp, else the config's, else nothing."""
    mpp = slide_row(wildcards.slide)["mpp"]
    if mpp is None:
        mpp = config["mpp_fallback"]
    return "" if mpp is None else f"--mpp-fallback {float(mpp)}"


def opt(flag, value):
    """'--flag value', or '' when value is None (the CLI's own default then applies)."""
    return "" if value is None else f"{flag} {value}"


def annotated_slides():
    return [s for s in SLIDE_NAMES if slide_annotations(s)]


def compute_split():
    """The train/test split, computed at parse time exactly as `histosynth split` writes it."""
    names = annotated_slides()
    if len(names) < 2:
        return {s: "train" for s in names}
    cfg = config["split"]
    explicit = cfg["train"] is not None or cfg["test"] is not None
    groups = None
    if cfg["by_stain"]:
        groups = {
            s: g for s, g in zip(SLIDES["slide"], SLIDES["stain"]) if g is not None
        }
    table = split_slides(
        names,
        cfg["test_fraction"],
        cfg["seed"],
        train=cfg["train"] if explicit else None,
        test=cfg["test"] if explicit else None,
        groups=groups or None,
    )
    return dict(zip(table["slide"], table["split"]))


SPLIT_OF = compute_split()
TRAIN_SLIDES = [s for s, v in SPLIT_OF.items() if v == "train"]
TEST_SLIDES = [s for s, v in SPLIT_OF.items() if v == "test"]


# -- settings and helpers of demo.smk
DEMO = config["slides"]["demo"]
DEMO_NAMES = SLIDE_NAMES if config["slides"]["source"] == "demo" else []


# -- settings and helpers of tile.smk
TILE = config["tile"]


# -- settings and helpers of patches.smk
ANNOTATED = annotated_slides()
SPLIT = config["split"]


def class_flags():
    classes = config["classes"]
    flags = ""
    if classes:
        pairs = " ".join(shlex.quote(f"{k}={v}") for k, v in classes.items())
        flags += f"--classes {pairs}"
    if config["catch_all"] is not None:
        flags += f" --catch-all {shlex.quote(str(config['catch_all']))}"
    return flags


def split_flags():
    flags = f"--test-fraction {SPLIT['test_fraction']} --seed {SPLIT['seed']}"
    if SPLIT["train"] is not None or SPLIT["test"] is not None:
        flags += " --train " + " ".join(map(shlex.quote, SPLIT["train"] or []))
        flags += " --test " + " ".join(map(shlex.quote, SPLIT["test"] or []))
    groups = [
        f"{s}={g}" for s, g in zip(SLIDES["slide"], SLIDES["stain"]) if g is not None
    ]
    if SPLIT["by_stain"] and groups:
        flags += " --groups " + " ".join(map(shlex.quote, groups))
    return flags


# -- settings and helpers of masks.smk
STATS = config["stats"]
LIBRARY = config["library"]
DVAE = config["dvae"]
SAMPLE = config["sample_masks"]
SHARDS = list(range(SAMPLE["shards"]))
GPU = 0 if config["device"] == "cpu" else 1


def train_patches(wildcards=None):
    return expand(f"{RESULTS}/patches/{{slide}}", slide=TRAIN_SLIDES)


def test_patches(wildcards=None):
    return expand(f"{RESULTS}/patches/{{slide}}", slide=TEST_SLIDES)


def dvae_flags(epochs):
    flags = (
        f"--beta {DVAE['beta']} --epochs {epochs} --batch-size {DVAE['batch_size']}"
        f" --lr {DVAE['lr']} --seed {config['seed']} --device {config['device']}"
    )
    return flags + (" --conditional" if DVAE["conditional"] else "")


# -- settings and helpers of gan.smk
GAN = config["gan"]
TRANSLATE = config["translate"]
EVAL_IMAGES = config["evaluate_images"]


def slide_option(slide):
    """The option-layer value of a slide: its stain style, its name, or one shared value."""
    if GAN["option_by"] == "slide":
        return slide
    if GAN["option_by"] == "stain":
        stain = slide_row(slide)["stain"]
        return stain if stain is not None else "default"
    return "default"


TRAIN_OPTIONS = sorted({slide_option(s) for s in TRAIN_SLIDES})


def known_option(slide):
    """The slide's option if the GAN was trained on it, else the first one it knows (a style it never saw)."""
    option = slide_option(slide)
    return option if option in TRAIN_OPTIONS or not TRAIN_OPTIONS else TRAIN_OPTIONS[0]


def option_flags(slides):
    return " ".join(shlex.quote(f"{s}={slide_option(s)}") for s in slides)


def gan_flags():
    return (
        f"--crop {GAN['crop']} --depth {GAN['depth']} --width {GAN['width']}"
        f" --disc {GAN['disc']} --num-d {GAN['num_d']} --gan-mode {GAN['gan_mode']}"
        f" --lambda-l1 {GAN['lambda_l1']} --steps {GAN['steps']} --decay-steps {GAN['decay_steps']}"
        f" --batch-size {GAN['batch_size']} --lr {GAN['lr']} --seed {config['seed']}"
        f" --device {config['device']} --sample-every {GAN['sample_every']}"
        f" --checkpoint-every {GAN['checkpoint_every']} --precision {GAN['precision']}"
        + (" --noise" if GAN["noise"] else "")
    )


# -- settings and helpers of segmentation.smk
SEG = config["segmenter"]
SCORE = config["score"]
ARMS = SEG["arms"]
SEEDS = SEG["seeds"]
SEG_DIR = f"{RESULTS}/segmentation/{{arm}}/seed-{{seed}}"


def quoted(paths):
    return " ".join(shlex.quote(str(p)) for p in paths)


def arm_real(wildcards):
    """The real training patch sets an arm reads (none for the synthetic arm)."""
    return [] if wildcards.arm == "synthetic" else train_patches()


def arm_synthetic(wildcards):
    """The synthetic pairs an arm reads (none for the real arm)."""
    if wildcards.arm == "real":
        return []
    return expand(f"{RESULTS}/synthetic/pairs/shard-{{shard}}", shard=SHARDS)


def segmenter_flags():
    flags = (
        f"--mix {SEG['mix']} --mode {SEG['mode']} --width {SEG['width']}"
        f" --units {' '.join(map(str, SEG['units']))} --steps {SEG['steps']}"
        f" --batch-size {SEG['batch_size']} --lr {SEG['lr']} --lr-drop {SEG['lr_drop']}"
        f" --checkpoint-every {SEG['checkpoint_every']} --precision {SEG['precision']}"
        f" --device {config['device']}"
    )
    return f"{flags} {opt('--input-size', SEG['input_size'])}"


def report_figures():
    """(caption, path) of every per-stage figure the report page shows."""
    figs = [
        ("Nuclei per tile (train slides)", rules.fit_stats.output.counts),
        ("Nucleus size and shape (train slides)", rules.fit_stats.output.morphology),
        ("Spacing of nuclei (train slides)", rules.fit_stats.output.spatial),
        ("Nucleus shape library", rules.nuclei_library.output.montage),
        ("β-VAE latent traversal", rules.train_dvae.output.traversal),
        ("Synthetic masks", rules.evaluate_masks.output.montage),
        ("Synthetic vs real mask statistics", rules.evaluate_masks.output.histograms),
        (
            "GAN samples: conditioning | generated | real",
            rules.train_gan.output.samples,
        ),
        ("Stain realism of the painted images", rules.evaluate_images.output.figure),
    ]
    figs += [
        (
            f"Synthetic pairs, shard {s}",
            f"{RESULTS}/synthetic/pairs/shard-{s}.montage.png",
        )
        for s in SHARDS
    ]
    figs += [
        (
            f"Predictions on test images: {a}, seed {s}",
            f"{RESULTS}/segmentation/{a}/seed-{s}/overlay.png",
        )
        for a in ARMS
        for s in SEEDS
    ]
    return figs
