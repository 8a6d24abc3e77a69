# Start-up: validate the config (defaults come from the schema), build the slide table.
import os
import re
import shlex
import sys

from histosynth.config import load_schema, slide_table, validate_config

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
