"""Configuration: defaults and validation come from config/schema.yaml alone."""

from __future__ import annotations

import copy
import hashlib
import json
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


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Return the validated config from ``path`` (default config/config.yaml) with ``overrides`` merged."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    return validated_config(deep_merge(raw, overrides or {}))


def config_hash(section: dict) -> str:
    """Return a short stable hash of a config section, for provenance attributes."""
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
