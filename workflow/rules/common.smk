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
from histosynth.config import (
    load_schema,
    patch_group_files,
    slide_table,
    validate_config,
)
from histosynth.gan import options as gan_options
from histosynth.patches.split import split_from_config, split_inputs
from histosynth.errors import HistosynthError
from histosynth.segmentation.regimes import (
    REGIME_PATTERN,
    evidence_arms,
    parse_regime_path,
    plan_regimes,
)


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
# slides.source patches: each group of a patch dataset is imported as its patch set (rule import_patches),
# neither tiled nor rasterized; the stages that read image tiles read those patch sets instead
PATCH_SOURCE = config["slides"]["source"] == "patches"
PATCH_FILES = patch_group_files(config["slides"]["patches"]) if PATCH_SOURCE else {}
IMAGE_SETS = "patches" if PATCH_SOURCE else "tiles"


wildcard_constraints:
    slide="|".join(map(re.escape, SLIDE_NAMES)) if SLIDE_NAMES else "[^/]+",


def slide_row(slide):
    return SLIDES.loc[SLIDES["slide"] == slide].iloc[0]


def slide_image(wildcards):
    return slide_row(wildcards.slide)["image"]


def slide_annotations(slide):
    """The slide's annotation file as a one-item list, or [] when it has none (or is an imported group)."""
    if PATCH_SOURCE:
        return []
    path = slide_row(slide)["annotations"]
    return [] if path is None else [path]


def slide_regions(wildcards):
    """The slide's tissue-region file as a one-item list where rasterize.tissue_regions is set and the slide
    table names one (else the regions come from the annotations file, or there are none): [].
    """
    path = slide_row(wildcards.slide)["regions"]
    return [path] if path is not None and config["rasterize"]["tissue_regions"] else []


def regions_flag(wildcards):
    """--regions-file FILE where slide_regions names one, else nothing."""
    regions = slide_regions(wildcards)
    return f"--regions-file {shlex.quote(str(regions[0]))}" if regions else ""


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
    """The slides with typed patch sets: the annotated ones, or every group of a patch dataset."""
    if PATCH_SOURCE:
        return SLIDE_NAMES
    return [s for s in SLIDE_NAMES if slide_annotations(s)]


# The train/test split, by the one function `histosynth split` calls too (rule split passes it SPLIT_INPUTS).
SPLIT_INPUTS = split_inputs(config, SLIDES)
SPLIT_OF = split_from_config(config, SLIDES)
TRAIN_SLIDES = [s for s, v in SPLIT_OF.items() if v == "train"]
TEST_SLIDES = [s for s, v in SPLIT_OF.items() if v == "test"]


# -- the regimes: "" is the default run (every train slide, the config's seed); "evidence/k-K/seed-S/" one
# replicate of the learning curve (K drawn train slides, seed S), checked here, before anything runs
# (histosynth.segmentation.regimes). Every fitted rule's files lie under {RESULTS}/{fit}.
EVIDENCE = config["evidence"]
try:
    EVIDENCE_ARMS = evidence_arms(EVIDENCE["arms"])
    REGIMES = plan_regimes(EVIDENCE, TRAIN_SLIDES)
    EVIDENCE_ERROR = None
except (
    HistosynthError
) as err:  # raised when the evidence target is asked for, not on every run
    EVIDENCE_ARMS, REGIMES, EVIDENCE_ERROR = [], [], err
REGIME_SLIDES = {r.path: list(r.slides) for r in REGIMES}


wildcard_constraints:
    fit=REGIME_PATTERN,


def fit_slides(fit):
    """The train slides a regime fits on (every train slide for the default run)."""
    if not fit:
        return TRAIN_SLIDES
    if EVIDENCE_ERROR is not None:
        raise EVIDENCE_ERROR
    if fit not in REGIME_SLIDES:
        raise HistosynthError(
            f"{fit} is not a regime of this config's evidence.k and evidence.seeds"
        )
    return REGIME_SLIDES[fit]


def fit_seed(fit):
    """The seed of a regime's fitted stages: the config's for the default run, the regime's otherwise."""
    regime = parse_regime_path(fit)
    return config["seed"] if regime is None else regime[1]


def fit_flags(stage, *omit):
    """Like flags(), per regime: the config's settings with the regime's seed (params=lambda of wildcards)."""

    def render(wildcards):
        if not wildcards.fit:
            return flags(stage, *omit)
        return config_flags(
            stage, {**config, "seed": fit_seed(wildcards.fit)}, omit=omit
        )

    return render


def fitted(pattern, fit=""):
    """A {fit}-pattern of a fitted rule's output made concrete for one regime (the default run: "")."""
    return pattern.replace("{fit}", fit)


def fitted_all(outputs, fit=""):
    """fitted() of every output of a rule."""
    return [fitted(p, fit) for p in outputs]


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
    """The patch sets of the train slides of the regime of ``wildcards.fit`` (all of them without one)."""
    fit = getattr(wildcards, "fit", "") if wildcards is not None else ""
    return expand(f"{RESULTS}/patches/{{slide}}", slide=fit_slides(fit))


def test_patches(wildcards=None):
    return expand(f"{RESULTS}/patches/{{slide}}", slide=TEST_SLIDES)


def all_train_patches(wildcards=None):
    """Every train slide's patch sets, whatever the regime: the real-vs-real FID floor of evaluate_images
    (an evaluation only; nothing fitted reads them outside the regime's own slides)."""
    return expand(f"{RESULTS}/patches/{{slide}}", slide=TRAIN_SLIDES)


# -- settings and helpers of gan.smk (the option policy: histosynth.gan.options)
GAN = config["gan"]
TRANSLATE = config["translate"]
EVAL_IMAGES = config["evaluate_images"]
EVAL_MASKS = config["evaluate_masks"]
STAINS = dict(zip(SLIDES["slide"], SLIDES["stain"]))


def option_pairs(slides):
    """SLIDE=OPTION of each slide, quoted (train-gan --options, evaluate-images --real-options)."""
    options = gan_options.slide_options(slides, STAINS, GAN["option_by"])
    return quoted(gan_options.option_pairs(options))


def known_option(slide, fit=""):
    """The slide's option if the regime's GAN was trained on it, else the first one it knows."""
    trained = gan_options.trained_options(fit_slides(fit), STAINS, GAN["option_by"])
    return gan_options.known_option(slide, STAINS, GAN["option_by"], trained)


CLUSTERED = GAN["option_by"] == "cluster"


def styles_json(wildcards):
    """The regime's styles.json (stain_styles) where the styles are found by k-means; else no input.

    More styles than the regime has train slides is an error here, while the DAG is built.
    """
    if not CLUSTERED:
        return []
    slides = fit_slides(wildcards.fit)
    if len(slides) < GAN["clusters"]:
        raise HistosynthError(
            f"gan.option_by cluster asks for gan.clusters = {GAN['clusters']} stain styles, but "
            f"{wildcards.fit or 'the default run'} has {len(slides)} train slide(s): lower gan.clusters"
        )
    return [f"{RESULTS}/{wildcards.fit}stain/styles.json"]


def train_options_flags(wildcards):
    """train-gan's options: each train slide's style from styles.json, or SLIDE=OPTION pairs."""
    if CLUSTERED:
        return "--options-file " + quoted(styles_json(wildcards))
    return "--options " + option_pairs(fit_slides(wildcards.fit))


def paint_option_flags(wildcards):
    """translate's option for the masks of one slide: its style in styles.json, or its known option."""
    if CLUSTERED:
        return "--styles " + quoted(styles_json(wildcards))
    return "--option " + shlex.quote(known_option(wildcards.slide, wildcards.fit))


def real_options_flags(wildcards):
    """evaluate-images' domains of the test slides: from styles.json, or SLIDE=OPTION pairs."""
    if CLUSTERED:
        return "--real-options-file " + quoted(styles_json(wildcards))
    return "--real-options " + option_pairs(TEST_SLIDES)


def shard_seed(wildcards):
    """translate's --seed of a shard in a regime."""
    return gan_options.translate_seed(fit_seed(wildcards.fit), int(wildcards.shard))


# -- settings and helpers of segmentation.smk
SEG = config["segmenter"]
SCORE = config["score"]
ARMS = SEG["arms"]
SEEDS = SEG["seeds"]
SEG_DIR = f"{RESULTS}/{{fit}}segmentation/{{arm}}/seed-{{seed}}"


def arm_synthetic(wildcards):
    """The synthetic pairs an arm reads: none for real, the painted train slides for painted-real."""
    if wildcards.arm == "real":
        return []
    if wildcards.arm == "painted-real":
        return expand(
            f"{RESULTS}/{wildcards.fit}synthetic/painted-train/{{slide}}",
            slide=fit_slides(wildcards.fit),
        )
    return expand(
        f"{RESULTS}/{wildcards.fit}synthetic/{PAIRS}/shard-{{shard}}", shard=SHARDS
    )


# the quality gate: the synthetic arms read the kept pairs (gate_pairs), judged by the real arm's first seed
GATE = config["gate"]
PAIRS = "gated" if GATE["enabled"] else "pairs"


def gate_model(wildcards):
    """model.pt of the real arm that gates a regime's pairs: the regime's seed, or the first of segmenter.seeds."""
    regime = parse_regime_path(wildcards.fit)
    seed = SEEDS[0] if regime is None else regime[1]
    return f"{RESULTS}/{wildcards.fit}segmentation/real/seed-{seed}/model.pt"


def evidence_runs():
    """K=RUN_DIR of every arm of every regime (evidence-report's arguments)."""
    if EVIDENCE_ERROR is not None:
        raise EVIDENCE_ERROR
    return [
        (r.k, f"{RESULTS}/{r.path}segmentation/{arm}/seed-{r.seed}")
        for r in REGIMES
        for arm in EVIDENCE_ARMS
    ]


def generator_logs():
    """K:SEED=LOG of the generator trainings (β-VAE, GAN) of every regime that has a synthetic arm."""
    if EVIDENCE_ARMS == ["real"]:
        return []
    return [
        (r.k, r.seed, f"{RESULTS}/{r.path}models/{model}/log.csv")
        for r in REGIMES
        for model in ("dvae", "gan")
    ]


def generator_evaluations():
    """(K, SEED, KIND, PATH) of the mask and image evaluations of every regime that has a synthetic arm."""
    if EVIDENCE_ARMS == ["real"]:
        return []
    return [
        (
            r.k,
            r.seed,
            kind,
            f"{RESULTS}/{r.path}synthetic/{kind}-evaluation/evaluation.json",
        )
        for r in REGIMES
        for kind in ("masks", "images")
    ]


def report_figures():
    """(caption, path) of every per-stage figure the report page shows."""
    figs = [
        ("Nuclei per tile (train slides)", fitted(rules.fit_stats.output.counts)),
        (
            "Nucleus size and shape (train slides)",
            fitted(rules.fit_stats.output.morphology),
        ),
        ("Spacing of nuclei (train slides)", fitted(rules.fit_stats.output.spatial)),
        ("Nucleus shape library", fitted(rules.nuclei_library.output.montage)),
        ("β-VAE latent traversal", fitted(rules.train_dvae.output.traversal)),
        ("Synthetic masks", fitted(rules.evaluate_masks.output.montage)),
        (
            "Synthetic vs real mask statistics",
            fitted(rules.evaluate_masks.output.histograms),
        ),
        (
            "Synthetic vs real masks: 2-D embeddings of mask features, with the real-vs-real floor",
            fitted(rules.evaluate_masks.output.realism),
        ),
        (
            "GAN samples: conditioning | generated | real",
            fitted(rules.train_gan.output.samples),
        ),
        (
            "Stain realism of the painted images",
            fitted(rules.evaluate_images.output.figure),
        ),
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


# -- whole-slide segmentation (rule segment): every slide of segment.slides, by the chosen arm's segmenter
SEGMENT = config["segment"]
SEGMENT_SLIDES = {}
for _path in SEGMENT["slides"]:
    _name = os.path.splitext(os.path.basename(_path.rstrip("/")))[0]
    if _name.endswith(".ome"):  # name.ome.tif
        _name = _name[: -len(".ome")]
    if _name in SEGMENT_SLIDES:
        raise ValueError(
            f"segment.slides: {SEGMENT_SLIDES[_name]} and {_path} have the same name {_name!r}; "
            "rename one (the output folder is results/segment/NAME)"
        )
    SEGMENT_SLIDES[_name] = _path
if SEGMENT_SLIDES and SEGMENT["arm"] not in ARMS:
    raise ValueError(
        f"segment.arm {SEGMENT['arm']!r} is not one of segmenter.arms {ARMS}"
    )
SEGMENT_SEED = SEEDS[0] if SEGMENT["seed"] is None else SEGMENT["seed"]
if SEGMENT_SLIDES and SEGMENT_SEED not in SEEDS:
    raise ValueError(
        f"segment.seed {SEGMENT_SEED} is not one of segmenter.seeds {SEEDS}"
    )
