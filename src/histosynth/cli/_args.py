"""What the CLI modules share: the schema's defaults, argument types and the options of every training stage.

Every flag that stands for a setting of config.yaml is added with :func:`add_option`: its default (and its
choices, where the schema has an ``enum``) come from the schema, ``histosynth/config.schema.yaml``, and the
parser records which key the flag stands for. :func:`histosynth.cli.flags.config_flags` writes the flags of a
stage from a validated config with that record (what the rules pass), and the tests walk it to prove that
every key of the schema reaches a flag. A stage run by hand with only its required arguments therefore does
what the DAG does with the schema's defaults.

Nothing here imports torch or a stage: building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from histosynth.config import schema_node
from histosynth.errors import HistosynthError

#: the attribute of a (sub)parser that holds its settings: dest -> :class:`Setting`
SETTINGS_ATTR = "histosynth_settings"

#: the word that stands for a null value on the command line (for keys whose default is not null)
NONE_WORD = "none"


@dataclass(frozen=True)
class Setting:
    """One flag that stands for one key of the schema."""

    key: str  # dotted key of the schema, e.g. "gan.steps"
    flag: str  # the flag that sets it, e.g. "--steps"
    dest: str  # its attribute on the parsed namespace


def schema_default(key: str) -> Any:
    """The schema's default of a dotted key (a copy); KeyError when the key or its default is missing."""
    node = schema_node(key)
    if "default" not in node:
        raise KeyError(f"the schema key {key!r} has no default")
    return copy.deepcopy(node["default"])


def schema_choices(key: str) -> tuple | None:
    """The allowed values of a key: its ``enum``, or its items' ``enum`` for a list; None when free."""
    node = schema_node(key)
    enum = node.get("enum") or node.get("items", {}).get("enum")
    return tuple(enum) if enum else None


def _nullable(key: str) -> bool:
    types = schema_node(key).get("type")
    return isinstance(types, list) and "null" in types


def _show(value: Any) -> str:
    if value is None:
        return NONE_WORD
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that reads :data:`NONE_WORD` as None and anything else with ``convert``."""

    def parse(text: str) -> Any:
        return None if text.lower() == NONE_WORD else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


class Switch(argparse.Action):
    """``--name`` / ``--no-name``: a boolean setting either way (its default from the schema)."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None, help: str | None = None,
                 **kwargs: Any) -> None:
        flags = list(option_strings)
        for flag in option_strings:
            if flag.startswith("--") and not flag.startswith("--no-"):
                flags.append(f"--no-{flag[2:]}")
        super().__init__(flags, dest, nargs=0, default=default, help=help, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class AppendOverDefault(argparse.Action):
    """``action="append"`` whose default list is replaced, not extended, by the first use of the flag."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = getattr(namespace, self.dest, None)
        items = [] if items is None or items is self.default else list(items)
        setattr(namespace, self.dest, [*items, values])


def add_option(p: argparse.ArgumentParser, *flags: str, key: str, help: str, none: str | None = None,
               **kwargs: Any) -> argparse.Action:
    """Add a flag that stands for the schema key ``key``: default and choices from the schema.

    ``help`` gets " (default X)" appended. A boolean key becomes ``--flag``/``--no-flag``; a nullable key
    whose default is not null also reads the word ``none`` (what that means: ``none``, required then).
    ``action="append"`` replaces its default list.
    """
    if "default" in kwargs:
        raise ValueError(f"{flags[0]}: the default of a setting comes from the schema ({key})")
    default = schema_default(key)
    choices = schema_choices(key)
    if choices is not None and "choices" not in kwargs and not isinstance(default, list):
        kwargs["choices"] = choices
    if isinstance(default, bool):
        kwargs.setdefault("action", Switch)
    if kwargs.get("action") == "append":
        kwargs["action"] = AppendOverDefault
    if _nullable(key) and default is not None:
        if none is None or "type" not in kwargs:
            raise ValueError(f"{flags[0]}: {key} may be null; say what '{NONE_WORD}' means (none=...) and its type")
        kwargs["type"] = _or_none(kwargs["type"])
        help = f"{help}; '{NONE_WORD}': {none}"
    action = p.add_argument(*flags, default=default, help=f"{help} (default {_show(default)})", **kwargs)
    settings = getattr(p, SETTINGS_ATTR, None)
    if settings is None:
        settings = {}
        setattr(p, SETTINGS_ATTR, settings)
    settings[action.dest] = Setting(key, flags[0], action.dest)
    return action


def settings_of(p: argparse.ArgumentParser) -> dict[str, Setting]:
    """The settings a (sub)parser's flags stand for: dest -> :class:`Setting` (in the order they were added)."""
    return dict(getattr(p, SETTINGS_ATTR, None) or {})


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def region(text: str) -> tuple[int, int, int, int]:
    parts = text.replace(",", " ").split()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"a region is X,Y,W,H in level-0 pixels, got {text!r}")
    x, y, w, h = (int(float(p)) for p in parts)
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"region width and height must be positive, got {text!r}")
    return x, y, w, h


def slide_option(text: str) -> tuple[str, str]:
    """An argparse type: ``SLIDE=OPTION`` as a pair (the first ``=`` splits)."""
    slide, sep, name = text.partition("=")
    if not sep or not slide or not name:
        raise argparse.ArgumentTypeError(f"expected SLIDE=OPTION, got {text!r}")
    return slide, name


def parse_pairs(pairs: list[str] | None, what: str, form: str = "SLIDE=NAME") -> dict[str, str]:
    """``KEY=VALUE`` items as a dict (the last ``=`` splits); a malformed one is an error naming ``what`` and
    the ``form`` it should have."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = str(pair).rpartition("=")
        key = key.strip()
        if not sep or not key or not value:
            raise HistosynthError(f"{what} is {form}, got {pair!r}")
        out[key] = value
    return out


def add_classes(p: argparse.ArgumentParser, help: str, nargs: str = "+") -> None:
    """``--classes NAME=ID ...``: the config's ``classes`` (null: the stage's own default, named in ``help``)."""
    add_option(p, "--classes", key="classes", nargs=nargs, metavar="NAME=ID", help=help)


def add_seed(p: argparse.ArgumentParser, help: str = "random seed", key: str = "seed") -> None:
    add_option(p, "--seed", key=key, type=int, help=help)


def add_device(p: argparse.ArgumentParser, help: str = "where it runs (auto = CUDA when visible)") -> None:
    add_option(p, "--device", key="device", help=help)


def add_threads(p: argparse.ArgumentParser, section: str, help: str = "CPU threads") -> None:
    add_option(p, "--threads", key=f"{section}.threads", type=int, help=help)


def add_training_args(p: argparse.ArgumentParser, section: str) -> None:
    """The options every training stage shares, from the schema section ``section`` (``gan``, ``segmenter``):
    seed, device, threads, checkpoints, logging, precision, classes."""
    add_seed(p)
    add_device(p)
    add_threads(p, section)
    add_option(p, "--checkpoint-every", key=f"{section}.checkpoint_every", type=int,
               help="steps between checkpoints")
    add_option(p, "--log-every", key=f"{section}.log_every", type=int, help="steps per log.csv row")
    add_option(p, "--precision", key=f"{section}.precision", help="autocast (auto = bf16 where it pays)")
    add_classes(p, "type names (none: from the patch sets' report.json)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint.pt")
