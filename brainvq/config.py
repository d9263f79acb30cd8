"""Configuration: defaults and validation come from config/schema.yaml alone."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"
DEFAULT_CONFIG_PATH = SCHEMA_PATH.parent / "config.yaml"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def deep_merge(base: dict, override: dict) -> dict:
    """Return a copy of ``base`` with ``override`` merged in, recursively for nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def section_defaults(section: str) -> dict:
    """Return the schema's default of each key of the top-level ``section`` that has one (what an unset key means,
    for callers outside a run's config such as the Python API)."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    return {key: spec["default"] for key, spec in schema["properties"][section]["properties"].items()
            if "default" in spec}


def validated_config(config: dict) -> dict:
    """Return ``config`` validated against the schema with every default filled in.

    Raises:
        ConfigError: naming the offending key and the allowed values.
    """
    # snakemake's validate is the one the workflow uses, so both paths fill the same defaults.
    from snakemake.utils import validate
    from jsonschema.exceptions import ValidationError

    filled = copy.deepcopy(config)
    try:
        validate(filled, str(SCHEMA_PATH), set_default=True)
    except Exception as error:  # snakemake wraps ValidationError in WorkflowError
        cause = error.__cause__ if isinstance(error.__cause__, ValidationError) else error
        raise ConfigError(f"invalid configuration: {cause}\nSee {SCHEMA_PATH} for allowed values.") from error
    return filled


def regex_problems(config: dict, prefix: str = "") -> list[str]:
    """Return a problem line for every ``*_regex`` key (at any depth) that does not compile, and for a
    ``subject_regex`` without the named group ``subject``."""
    problems = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            problems += regex_problems(value, f"{name}.")
        elif key.endswith("_regex") and isinstance(value, str):
            try:
                compiled = re.compile(value)
            except re.error as error:
                problems.append(f"{name}: {value!r} is not a valid regular expression ({error}); fix the pattern "
                                 "(Python re syntax)")
                continue
            if key == "subject_regex" and "subject" not in compiled.groupindex:
                problems.append(f"{name}: {value!r} has no named group 'subject'; add one, e.g. "
                                "'^(?P<subject>[A-Za-z0-9]+)'")
    return problems


def box_problems(preprocess: dict, downsample: int | None = None) -> list[str]:
    """Return a problem line for a whole-volume box (``preprocess.dims: 3``) that is not a whole number of
    ``spacing_mm`` voxels per axis or (with ``downsample``, the ``vqvae.downsample``) not a multiple of it."""
    if preprocess["dims"] != 3:
        return []
    spacing, box = preprocess["spacing_mm"], [float(side) for side in preprocess["box_mm"]]
    voxels = [round(side / spacing) for side in box]
    if any(not math.isclose(n * spacing, side, abs_tol=1e-6) for n, side in zip(voxels, box)):
        return [f"preprocess.box_mm: {preprocess['box_mm']} is not a whole number of {spacing:g} mm voxels per axis; "
                "give each side as a multiple of preprocess.spacing_mm"]
    if downsample and any(n % downsample for n in voxels):
        return [f"preprocess.box_mm: {preprocess['box_mm']} at spacing_mm={spacing:g} gives {voxels} voxels, not all "
                f"multiples of vqvae.downsample={downsample}; choose box_mm sides that are multiples of "
                f"{downsample * spacing:g} mm"]
    return []


def model_problems(config: dict) -> list[str]:
    """Return a problem line for every model setting that cannot work with the image size or another setting."""
    vqvae, size = config["vqvae"], config["preprocess"]["size"]
    factor = vqvae["downsample"]
    problems = box_problems(config["preprocess"], factor)
    if config["preprocess"]["dims"] == 2 and size % factor:
        problems.append(f"preprocess.size: {size} px is not divisible by vqvae.downsample={factor}; choose a "
                        f"multiple of {factor} (e.g. {size + factor - size % factor}) or a smaller vqvae.downsample")
    levels = int(math.log2(vqvae["downsample"]))
    if len(vqvae["channels"]) != levels:
        problems.append(f"vqvae.channels: {vqvae['channels']} has {len(vqvae['channels'])} levels but "
                        f"vqvae.downsample={vqvae['downsample']} needs {levels} (one per halving); give one channel "
                        "count per level, e.g. [32, 64] for 4 or [64, 128, 256] for 8")
    if vqvae["batch_size"] % vqvae["gpus"]:
        problems.append(f"vqvae.batch_size: {vqvae['batch_size']} is not divisible by vqvae.gpus={vqvae['gpus']}; "
                        "make it a multiple of gpus")
    grid = vqvae["som_grid"]
    if vqvae["bottleneck"] == "som" and grid and grid[0] * grid[1] != vqvae["codebook_size"]:
        problems.append(f"vqvae.som_grid: {grid} has {grid[0] * grid[1]} nodes but vqvae.codebook_size="
                        f"{vqvae['codebook_size']}; give rows * columns = codebook_size, or null")
    return problems


def range_problems(config: dict) -> list[str]:
    """Return a problem line for every [low, high] setting whose low is not below its high."""
    problems = []
    for key in ("clip_percentiles", "slice_range"):
        low, high = config["preprocess"][key]
        if low >= high:
            problems.append(f"preprocess.{key}: {[low, high]} must be [low, high] with low < high; swap or widen it")
    return problems


def path_problems(config: dict) -> list[str]:
    """Return a problem line for every configured file or folder that must exist before the run starts."""
    from brainvq.sources import SourceError, get_source  # sources read this module's configs: import where used

    try:
        required = get_source(config["dataset"]["source"]).required_paths(config)
    except SourceError as error:
        return [str(error)]
    if config["download"]["local_archive_dir"]:
        required["download.local_archive_dir"] = config["download"]["local_archive_dir"]
    return [f"{key}: {path} does not exist; fix the path (relative paths start at the working directory "
            f"{Path.cwd()})" for key, path in required.items() if not Path(path).exists()]


def check_startup(config: dict) -> None:
    """Check everything the config alone decides, before any job runs; report every problem at once.

    Args:
        config: a config with the schema's defaults filled in.

    Raises:
        ConfigError: one line per problem, each naming the key and the fix.
    """
    problems = regex_problems(config) + model_problems(config) + range_problems(config) + path_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {line}" for line in problems))


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Return the config from ``path`` (default config/config.yaml) with ``overrides`` merged, validated against
    the schema and by ``check_startup`` (as the workflow does before any job runs).

    Raises:
        ConfigError: naming each offending key and the fix.
    """
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    config = validated_config(deep_merge(raw, overrides or {}))
    check_startup(config)
    return config


def config_hash(section: dict) -> str:
    """Return a short stable hash of a config section, for provenance attributes."""
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
