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

from histosynth.cli.flags import config_flags
from histosynth.config import load_schema, slide_table, validate_config
from histosynth.gan import options as gan_options
from histosynth.patches.split import split_from_config, split_inputs


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


def flags(stage, *omit):
    """The flags of every setting of a stage from the config (histosynth.cli.flags.config_flags);
    ``omit``: the flags the rule passes itself."""
    return config_flags(stage, config, omit=omit)


def quoted(items):
    return " ".join(shlex.quote(str(p)) for p in items)


def annotated_slides():
    return [s for s in SLIDE_NAMES if slide_annotations(s)]


# The train/test split, by the one function `histosynth split` calls too (rule split passes it SPLIT_INPUTS).
SPLIT_INPUTS = split_inputs(config, SLIDES)
SPLIT_OF = split_from_config(config, SLIDES)
TRAIN_SLIDES = [s for s, v in SPLIT_OF.items() if v == "train"]
TEST_SLIDES = [s for s, v in SPLIT_OF.items() if v == "test"]


# -- settings and helpers of demo.smk
DEMO_NAMES = SLIDE_NAMES if config["slides"]["source"] == "demo" else []


# -- settings and helpers of tile.smk
TILE = config["tile"]


# -- settings and helpers of patches.smk
ANNOTATED = annotated_slides()


def split_groups():
    """--groups SLIDE=GROUP ... of rule split (by stain style), or nothing."""
    groups = SPLIT_INPUTS["groups"]
    if not groups:
        return ""
    return "--groups " + quoted(f"{s}={g}" for s, g in groups.items())


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


# -- settings and helpers of gan.smk (the option policy: histosynth.gan.options)
GAN = config["gan"]
TRANSLATE = config["translate"]
EVAL_IMAGES = config["evaluate_images"]
STAINS = dict(zip(SLIDES["slide"], SLIDES["stain"]))
TRAIN_OPTIONS = gan_options.trained_options(TRAIN_SLIDES, STAINS, GAN["option_by"])


def option_pairs(slides):
    """SLIDE=OPTION of each slide, quoted (train-gan --options, evaluate-images --real-options)."""
    options = gan_options.slide_options(slides, STAINS, GAN["option_by"])
    return quoted(gan_options.option_pairs(options))


def known_option(slide):
    """The slide's option if the GAN was trained on it, else the first one it knows."""
    return gan_options.known_option(slide, STAINS, GAN["option_by"], TRAIN_OPTIONS)


# -- settings and helpers of segmentation.smk
SEG = config["segmenter"]
SCORE = config["score"]
ARMS = SEG["arms"]
SEEDS = SEG["seeds"]
SEG_DIR = f"{RESULTS}/segmentation/{{arm}}/seed-{{seed}}"


def arm_real(wildcards):
    """The real training patch sets an arm reads (none for the synthetic arm)."""
    return [] if wildcards.arm == "synthetic" else train_patches()


def arm_synthetic(wildcards):
    """The synthetic pairs an arm reads (none for the real arm)."""
    if wildcards.arm == "real":
        return []
    return expand(f"{RESULTS}/synthetic/pairs/shard-{{shard}}", shard=SHARDS)


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
