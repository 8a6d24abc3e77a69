"""config.yaml: validation against the schema (which holds the defaults) and the slide table.

The Snakefile calls :func:`validate_config` at start-up; ``histosynth
check-config`` does the same by hand. A wrong key or value stops the run with
one message naming the key.
"""

from __future__ import annotations

import copy
import functools
import glob
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from histosynth.errors import HistosynthError

if TYPE_CHECKING:  # pandas and jsonschema load on use: the CLI reads the schema's defaults at every start
    import jsonschema
    import pandas as pd

#: the schema: every key of config.yaml, its type and THE default (package data, so an installed wheel has it)
SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"
SCHEMA_RESOURCE = "config.schema.yaml"

#: regions: a slide's tissue-region annotation file (rasterize --regions-file, read with rasterize.tissue_regions;
#: None: the regions are read from its annotations file)
SLIDE_COLUMNS = ["slide", "image", "annotations", "mpp", "stain", "regions"]

#: source patches: the default group regex, everything before the last underscore (test_10_000 -> test_10)
DEFAULT_GROUP_REGEX = r"^(.*)_[^_]*$"
#: the placeholder of an image's stem in the inst / types patterns of source patches
STEM = "{stem}"

#: stain styles of the demo slides, slide i gets DEMO_STAINS[i % 2] (histosynth.slides.demo)
DEMO_STAINS = ("pale", "dark")


def load_schema(path: str | os.PathLike | None = None) -> dict:
    """The schema of config.yaml: ``path``, or the package's own (read through importlib.resources, so an
    installed wheel, even a zipped one, finds it without the repository)."""
    if path:
        with open(path) as fh:
            return yaml.safe_load(fh)
    return copy.deepcopy(_package_schema())


@functools.cache
def _package_schema() -> dict:
    return yaml.safe_load(resources.files("histosynth").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8"))


def schema_node(key: str, schema: dict | None = None) -> dict:
    """The schema of one key, dotted (``"gan.steps"``); KeyError naming the key when there is none."""
    node = schema if schema is not None else _package_schema()
    for part in key.split("."):
        try:
            node = node["properties"][part]
        except KeyError:
            raise KeyError(f"the schema has no key {key!r}") from None
    return node


def leaf_keys(schema: dict | None = None, prefix: str = "") -> list[str]:
    """Every setting of the schema, dotted, in schema order: the keys whose values are not objects of keys."""
    node = schema if schema is not None else _package_schema()
    keys: list[str] = []
    for name, sub in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        keys += leaf_keys(sub, f"{key}.") if "properties" in sub else [key]
    return keys


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value of a dotted key in a (validated) config."""
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def _fill_defaults(value: Any, schema: dict) -> Any:
    """Defaults of ``schema`` filled into ``value`` (a deep copy), recursively for objects."""
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _fill_defaults(value[key], sub)
    return value


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        prefix = f"{where}." if error.absolute_path else ""
        names = ", ".join(f"'{prefix}{k}'" for k in extra)
        return f"unknown key {names} (known keys here: {', '.join(known)})"
    return f"key '{where}': {error.message}"


def validate_config(config: dict | None, schema: dict | None = None, source: str = "config.yaml") -> dict:
    """A validated copy of ``config`` with every default filled in.

    Raises HistosynthError naming the offending key(s).
    """
    import jsonschema

    schema = schema or _package_schema()
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise HistosynthError(f"the configuration must be a mapping, got {type(config).__name__}", source)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise HistosynthError("; ".join(_describe(e) for e in errors), source)
    filled = _fill_defaults(copy.deepcopy(config), schema)
    _check_semantics(filled, source)
    return filled


def _check_semantics(config: dict, source: str) -> None:
    slides = config["slides"]
    if slides["source"] == "table" and not slides["table"]:
        raise HistosynthError("key 'slides.table': needed when slides.source is 'table'", source)
    if slides["source"] == "glob" and not slides["images"]:
        raise HistosynthError("key 'slides.images': needed when slides.source is 'glob'", source)
    if slides["source"] == "glob" and slides["annotations"] and "{slide}" not in slides["annotations"]:
        raise HistosynthError("key 'slides.annotations': the pattern needs '{slide}'", source)
    if slides["source"] == "patches":
        for key in ("images", "inst", "mpp"):
            if slides["patches"][key] is None:
                raise HistosynthError(f"key 'slides.patches.{key}': needed when slides.source is 'patches'", source)
    if (config.get("gan") or {}).get("tissue_channel") and not (config.get("tissue") or {}).get("enabled"):
        raise HistosynthError("key 'gan.tissue_channel': needs tissue.enabled: true (the GAN paints the synthetic "
                              "masks inside their tissue layouts, which only the tissue model gives them)", source)


def load_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HistosynthError("no such file", path)
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise HistosynthError(f"not valid YAML: {err}", path) from err
    return validate_config(data, source=str(path))


def demo_slide_names(n_slides: int) -> list[str]:
    """Names of the demo slides, as :func:`histosynth.slides.demo.make_demo_slides` writes them."""
    return [f"demo-{i:03d}" for i in range(n_slides)]


def slide_table(config: dict, workdir: str | os.PathLike = ".") -> pd.DataFrame:
    """The slides of a run: one row per slide with columns :data:`SLIDE_COLUMNS`.

    Paths are returned as given (relative to ``workdir`` when relative).
    """
    import pandas as pd

    slides = config["slides"]
    results = config["results"]
    if slides["source"] == "demo":
        names = demo_slide_names(slides["demo"]["n_slides"])
        df = pd.DataFrame(
            {
                "slide": names,
                "image": [f"{results}/demo/{n}.tif" for n in names],
                "annotations": [f"{results}/demo/{n}.geojson" for n in names],
                "mpp": [None] * len(names),
                "stain": [DEMO_STAINS[i % len(DEMO_STAINS)] for i in range(len(names))],
                # the demo's epithelium / stroma outlines (histosynth.slides.demo)
                "regions": [f"{results}/demo/{n}.regions.geojson" for n in names],
            }
        )
    elif slides["source"] == "table":
        df = _read_table(Path(workdir) / slides["table"])
    elif slides["source"] == "patches":
        df = _patch_groups_table(slides["patches"], workdir)
    else:
        pattern = slides["images"]
        files = sorted(glob.glob(str(Path(workdir) / pattern)))
        if not files:
            raise HistosynthError(f"no slide matches the glob '{pattern}'", "config.yaml")
        names = [Path(f).stem for f in files]
        rel = [os.path.relpath(f, workdir) for f in files]
        ann = [slides["annotations"].format(slide=n) if slides["annotations"] else None for n in names]
        df = pd.DataFrame({"slide": names, "image": rel, "annotations": ann, "mpp": None, "stain": None,
                           "regions": None})
    dupes = df["slide"][df["slide"].duplicated()].tolist()
    if dupes:
        raise HistosynthError(f"slide names must be unique; repeated: {sorted(set(dupes))}", "config.yaml")
    bad = [s for s in df["slide"] if not s or "/" in s or s.startswith(".")]
    if bad:
        raise HistosynthError(f"slide names must be plain file names; bad: {bad}", "config.yaml")
    return df.reset_index(drop=True)


def _patch_groups_table(patches: dict, workdir: str | os.PathLike) -> pd.DataFrame:
    """Source patches: one row per group of the dataset (:func:`find_patch_groups`).

    ``image`` is the images glob and ``annotations`` the instance-map pattern (every group is annotated, so
    the split takes them all); ``mpp`` the dataset's. The files of a group: :func:`patch_group_files`.
    """
    import pandas as pd

    groups = patch_group_files(patches, workdir)
    names = list(groups)
    return pd.DataFrame({"slide": names, "image": [patches["images"]] * len(names),
                         "annotations": [patches["inst"]] * len(names), "mpp": [patches["mpp"]] * len(names),
                         "stain": [None] * len(names)}, dtype=object)


def patch_group_files(patches: dict, workdir: str | os.PathLike = ".") -> dict[str, list[str]]:
    """group -> the paths of its images, inst maps and types files (those that exist; a missing one is the
    import job's error, which names it), for a validated config's ``slides.patches``."""
    try:
        groups = find_patch_groups(patches["images"], patches["group_regex"], root=workdir)
    except HistosynthError as err:
        raise HistosynthError(f"slides.patches: {err}", "config.yaml") from err
    out: dict[str, list[str]] = {}
    for name, files in groups.items():
        paths = [str(f) for f in files]
        for f in files:
            for what, pattern in (("instance map", patches["inst"]), ("types file", patches["types"])):
                if pattern:
                    c = companion(pattern, f, what)
                    if (Path(workdir) / c).is_file():
                        paths.append(str(c))
        out[name] = paths
    return out


def find_patch_groups(images: str, group_regex: str = DEFAULT_GROUP_REGEX,
                      root: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """group → its image files (sorted), for the image glob ``images`` (a relative glob: relative to ``root``,
    default the current folder; the paths are returned as the glob gives them).

    Raises a HistosynthError when nothing matches the glob, when the regex is invalid or has no group, or
    when a file name does not match it (one is named, with the count), or a group is not a plain name.
    """
    if not images:
        raise HistosynthError("no image glob given (slides.patches.images / --images)")
    base = Path(root) if root is not None else Path.cwd()
    files = sorted(Path(f) for f in glob.glob(images, root_dir=base) if (base / f).is_file())
    if not files:
        raise HistosynthError(f"no image matches the glob {images!r} (relative to {base})")
    try:
        pattern = re.compile(group_regex)
    except re.error as err:
        raise HistosynthError(f"the group regex {group_regex!r} is not a regular expression: {err}") from err
    if pattern.groups < 1:
        raise HistosynthError(f"the group regex {group_regex!r} has no (group): its first group names the group")
    groups: dict[str, list[Path]] = {}
    unmatched: list[Path] = []
    for f in files:
        m = pattern.search(f.stem)
        if m is None or not m.group(1):
            unmatched.append(f)
            continue
        groups.setdefault(m.group(1), []).append(f)
    if unmatched:
        raise HistosynthError(
            f"the group regex {group_regex!r} matches no group in the name {unmatched[0].stem!r} "
            f"({len(unmatched)} of {len(files)} images do not match); every image needs a group "
            "(slides.patches.group_regex / --group-regex)", unmatched[0])
    bad = [g for g in groups if "/" in g or g.startswith(".") or g != g.strip()]
    if bad:
        raise HistosynthError(f"group names must be plain file names; the group regex gives {bad[:3]}")
    return dict(sorted(groups.items()))


def companion(pattern: str, image: Path, what: str) -> Path:
    """The file of ``pattern`` (with ``{stem}``) for ``image``."""
    if STEM not in pattern:
        raise HistosynthError(f"the {what} pattern {pattern!r} needs {STEM} (the image's name without suffix)")
    return Path(pattern.replace(STEM, image.stem))


def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise HistosynthError("slide table not found", path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype={"slide": str, "image": str, "annotations": str, "stain": str,
                                                   "regions": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise HistosynthError(f"unreadable slide table: {err}", path) from err
    missing = {"slide", "image"} - set(df.columns)
    if missing:
        raise HistosynthError(f"slide table lacks columns {sorted(missing)}", path)
    unknown = set(df.columns) - set(SLIDE_COLUMNS)
    if unknown:
        raise HistosynthError(f"slide table has unknown columns {sorted(unknown)} (known: {SLIDE_COLUMNS})", path)
    for col in SLIDE_COLUMNS:
        if col not in df.columns:
            df[col] = None
    base = path.parent
    for col in ("image", "annotations", "regions"):
        df[col] = [
            None if pd.isna(v) else (v if os.path.isabs(v) else os.path.normpath(os.path.join(base, v)))
            for v in df[col]
        ]
    if df["mpp"].notna().any():
        mpp = pd.to_numeric(df["mpp"], errors="coerce")
        bad = df.loc[df["mpp"].notna() & ~(mpp > 0), "slide"].tolist()
        if bad:
            raise HistosynthError(f"column mpp must hold positive numbers; bad rows: {bad}", path)
        df["mpp"] = mpp
    df = df[SLIDE_COLUMNS].astype(object)
    return df.where(df.notna(), None)  # missing cells are None, not NaN
