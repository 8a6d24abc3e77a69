"""The option layer's policy (histosynth.gan.options): what the rules of gan.smk pass per slide and shard."""

from __future__ import annotations

import pytest

from histosynth.errors import HistosynthError
from histosynth.gan.options import (
    DEFAULT_OPTION,
    known_option,
    option_pairs,
    slide_option,
    slide_options,
    trained_options,
    translate_seed,
)

STAINS = {"a": "pale", "b": "dark", "c": "pale", "d": None, "e": "blue"}


def test_slide_option_by_stain_slide_and_none():
    assert slide_option("a", "pale", "stain") == "pale"
    assert slide_option("d", None, "stain") == DEFAULT_OPTION == "default"
    assert slide_option("a", "pale", "slide") == "a"
    assert slide_option("a", "pale", "none") == "default"
    with pytest.raises(HistosynthError, match="option_by"):
        slide_option("a", "pale", "colour")


def test_trained_options_are_sorted_and_unique():
    assert trained_options(["a", "b", "c"], STAINS, "stain") == ["dark", "pale"]
    assert trained_options(["c", "a"], STAINS, "slide") == ["a", "c"]
    assert trained_options(["a", "b"], STAINS, "none") == ["default"]
    assert trained_options([], STAINS, "stain") == []


def test_known_option_falls_back_to_the_first_trained_one():
    trained = trained_options(["a", "b"], STAINS, "stain")
    assert known_option("c", STAINS, "stain", trained) == "pale"
    assert known_option("e", STAINS, "stain", trained) == "dark"  # a style the GAN never saw
    assert known_option("d", STAINS, "stain", trained) == "dark"
    assert known_option("e", STAINS, "stain", []) == "blue"
    assert known_option("c", STAINS, "slide", ["a", "b"]) == "a"


def test_option_pairs_as_the_cli_takes_them():
    options = slide_options(["b", "a", "d"], STAINS, "stain")
    assert option_pairs(options) == ["b=dark", "a=pale", "d=default"]


def test_translate_seed_is_one_stream_per_shard():
    assert translate_seed(0, 0) == 0 and translate_seed(0, 3) == 3 and translate_seed(2, 1) == 2001
    seeds = {translate_seed(s, k) for s in range(3) for k in range(5)}
    assert len(seeds) == 15
    with pytest.raises(HistosynthError):
        translate_seed(-1, 0)


def test_the_rules_call_the_policy_not_their_own():
    """gan.smk / common.smk hold no option policy or seed arithmetic of their own."""
    from pathlib import Path

    rules = Path(__file__).resolve().parents[1] / "workflow" / "rules"
    text = "".join(p.read_text() for p in rules.glob("*.smk"))
    assert "* 1000" not in text and '"default"' not in text
    assert "gan_options.translate_seed" in text and "gan_options.known_option" in text
