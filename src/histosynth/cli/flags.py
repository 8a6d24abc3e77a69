"""The flags of a stage written from a validated config: one path, schema -> config -> rule -> CLI flag.

The rules of workflow/rules/*.smk pass ``config_flags("<stage>", config, omit=...)``: a flag for every
setting the stage's parser recorded (:func:`histosynth.cli._args.add_option`), its value from the config. A
rule names in ``omit`` the flags it passes itself (``--threads {threads}``, a per-job seed, a per-slide
value), nothing else. Parsing what this writes gives back the config's values (tests/test_settings.py).
"""

from __future__ import annotations

import argparse
import functools
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from histosynth.cli._args import NONE_WORD, AppendOverDefault, Setting, Switch, settings_of
from histosynth.config import config_value


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from histosynth.cli import build_parser

    return build_parser()


def stage_parsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand of the CLI (or of ``parser``) and its parser."""
    parser = parser or _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise ValueError("the parser has no subcommands")


def stage_settings(stage: str) -> dict[str, Setting]:
    """dest -> :class:`Setting` of one subcommand."""
    parsers = stage_parsers()
    if stage not in parsers:
        raise KeyError(f"no stage {stage!r} (known: {', '.join(sorted(parsers))})")
    return settings_of(parsers[stage])


def _render(action: argparse.Action, flag: str, value: Any) -> list[str]:
    if isinstance(action, Switch):
        return [flag if value else f"--no-{flag[2:]}"]
    if isinstance(value, Mapping):  # classes: NAME=ID pairs; empty is the same as none
        value = [f"{k}={v}" for k, v in value.items()] or None
    if value is None:
        # null: leave the flag out when null is its default too, else say so with the word the flag reads
        return [] if action.default is None else [flag, NONE_WORD]
    if isinstance(value, (list, tuple)):
        if isinstance(action, AppendOverDefault):
            return [part for v in value for part in (flag, str(v))]
        return [flag, *map(str, value)]
    return [flag, str(value)]


def config_flags(stage: str, config: Mapping[str, Any], omit: Iterable[str] = ()) -> str:
    """The flags of every setting of ``stage`` from the validated ``config``, shell-quoted, in one string.

    ``omit``: flags the caller passes itself; naming a flag the stage does not have is an error.
    """
    settings = stage_settings(stage)
    parser = stage_parsers()[stage]
    omit = set(omit)
    unknown = omit - {s.flag for s in settings.values()}
    if unknown:
        raise ValueError(f"{stage}: {sorted(unknown)} are not settings of this stage")
    actions = {a.dest: a for a in parser._actions}
    words: list[str] = []
    for dest, setting in settings.items():
        if setting.flag not in omit:
            words += _render(actions[dest], setting.flag, config_value(config, setting.key))
    return shlex.join(words)
