# Start-up: validate the config (defaults come from the schema), build the slide table.
import os
import re
import shlex
import sys

from histosynth.config import load_schema, slide_table, validate_config
from histosynth.split import split_slides

# Rules call the `histosynth` command of the Python running Snakemake, even
# when its virtual environment is not activated.
os.environ["PATH"] = (
    os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
)

config = validate_config(
    config, load_schema(workflow.source_path("../schemas/config.schema.yaml"))
)
RESULTS = config["results"]
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
