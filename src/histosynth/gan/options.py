"""The option layer's policy: which option (stain style / domain) each slide is trained or painted with.

The GAN (Optional pix2pix) takes an option next to the mask; ``gan.option_by``
says what it stands for: the slide table's stain style (``stain``; a slide
without one is ``default``), each slide (``slide``) or nothing (``none``: one
shared option, a plain pix2pix). The rules of gan.smk call these functions; the
policy lives here, with its tests, not in the .smk files.

Nothing here imports torch: the Snakefile calls it at parse time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from histosynth.errors import HistosynthError

#: the values of gan.option_by (cluster: the styles come from the stain-styles stage, histosynth.gan.styles)
OPTION_BY = ("stain", "slide", "cluster", "none")

#: the option of a slide without a stain style, and of every slide when option_by is none
DEFAULT_OPTION = "default"

#: translate seeds: shard k of a run with seed s paints with s * SHARD_SEED_STRIDE + k
SHARD_SEED_STRIDE = 1000


def slide_option(slide: str, stain: str | None, option_by: str) -> str:
    """The option of one slide: its stain style, its name, or the one shared option."""
    if option_by not in OPTION_BY:
        raise HistosynthError(f"gan.option_by must be one of {OPTION_BY}, got {option_by!r}")
    if option_by == "cluster":
        raise HistosynthError("with gan.option_by cluster a slide's option is read from its styles.json "
                              "(histosynth.gan.styles), not known before the stain-styles stage has run")
    if option_by == "slide":
        return slide
    if option_by == "stain" and stain is not None:
        return str(stain)
    return DEFAULT_OPTION


def slide_options(slides: Iterable[str], stains: Mapping[str, str | None], option_by: str) -> dict[str, str]:
    """slide -> option for ``slides`` (``stains``: the slide table's stain column, slide -> style or None)."""
    return {s: slide_option(s, stains.get(s), option_by) for s in slides}


def trained_options(train_slides: Iterable[str], stains: Mapping[str, str | None], option_by: str) -> list[str]:
    """The options the GAN learns from the train slides, sorted (the order gan.pt lists them in)."""
    return sorted(set(slide_options(train_slides, stains, option_by).values()))


def known_option(slide: str, stains: Mapping[str, str | None], option_by: str, trained: list[str]) -> str:
    """The slide's option if the GAN was trained on it, else the first one it knows (a style it never saw).

    ``trained``: :func:`trained_options`; when it is empty the slide's own option is returned.
    """
    option = slide_option(slide, stains.get(slide), option_by)
    return option if option in trained or not trained else trained[0]


def option_pairs(options: Mapping[str, str]) -> list[str]:
    """``SLIDE=OPTION`` items, as train-gan --options and evaluate-images --real-options take them."""
    return [f"{slide}={option}" for slide, option in options.items()]


def translate_seed(seed: int, shard: int) -> int:
    """The seed of translate shard ``shard``: each shard its own stream, so the generator's noise and dropout
    do not repeat across shards (``seed * 1000 + shard``)."""
    if seed < 0 or shard < 0:
        raise HistosynthError(f"seed and shard must not be negative, got seed {seed}, shard {shard}")
    return int(seed) * SHARD_SEED_STRIDE + int(shard)
