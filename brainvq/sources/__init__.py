"""Data sources: one module per dataset, holding everything the workflow needs to know about it.

``dataset.source: NAME`` selects ``brainvq/sources/NAME.py``, which defines ``SOURCE``, an instance of a
:class:`Source` subclass: where the raw volumes live, which files are scans (discovery), the
participants table, what to download, the terms of use, the report's attribution and what ``auto``
means for the split and the probe. The rules and the rest of the package ask it and never branch on
its name, so a new dataset is one new module here (docs/architecture.md, "Adding a dataset").
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pandas as pd

from brainvq.demographics import COLUMNS, with_scanned_subjects

KINDS = ("generated", "download", "folder")


class SourceError(ValueError):
    """``dataset.source`` names no usable module in brainvq/sources/, or the source cannot run with this config."""


class Source:
    """One data source. A subclass sets the attributes and overrides what its kind needs.

    Attributes:
        name: the ``dataset.source`` value, equal to the module's name.
        kind: 'generated' (a rule builds the raw folder: the demo cohort), 'download' (the download and
            extract rules fetch ``download_plan`` into ``raw_root``), or 'folder' (volumes already on disk).
        layout: one line saying which files are scans, for error messages.
        defaults: what 'auto' means for this source: ``stratify`` (a participants column or None) for
            ``split.stratify``, ``probe_target`` (a probe rule) for ``evaluate.probe_target`` and ``skull_strip``
            (a method) for ``preprocess.skull_strip``.
        terms: licence or data use terms, printed when the workflow starts ('' when there are none).
        attribution_html: the report's data attribution (trusted HTML).
    """

    name: str = ""
    kind: str = "folder"
    layout: str = "volumes"
    defaults: dict = {"stratify": None, "probe_target": "sex", "skull_strip": "none"}
    terms: str = ""
    attribution_html: str = ""

    def raw_root(self, config: dict) -> str:
        """Return the folder holding the raw volumes; by default where the extract rule unpacks a download."""
        return f"{config['resources_dir']}/{self.name}/extracted"

    def resolved_preprocess(self, preprocess: dict) -> dict:
        """Return the ``preprocess`` config section with ``skull_strip: auto`` replaced by this source's default."""
        method = preprocess["skull_strip"]
        # A source that names no default (a new module may not) leaves the head unstripped.
        return {**preprocess, "skull_strip": self.defaults.get("skull_strip", "none") if method == "auto" else method}

    def discovery_settings(self, config: dict) -> dict:
        """Return the config values discovery reads; they are the discovery rule's params, so it reruns
        when one of them changes and only then. ``find_rows`` and ``participants`` see nothing else."""
        return {}

    def required_paths(self, config: dict) -> dict[str, str]:
        """Return the configured files and folders that must exist before the run starts, by config key
        (checked at start-up by ``brainvq.config.check_startup``); by default none."""
        return {}

    def find_rows(self, raw_root: Path, settings: dict) -> list[dict]:
        """Return one ``brainvq.io.scan_row`` per candidate scan under ``raw_root`` (files not yet read)."""
        raise NotImplementedError(f"source {self.name!r} does not say how to find its scans (find_rows)")

    def participants(self, raw_root: Path, settings: dict, scans: pd.DataFrame) -> pd.DataFrame:
        """Return the participants table of the discovered ``scans`` (``brainvq.demographics.COLUMNS`` first);
        by default one row per subject with empty values."""
        return with_scanned_subjects(pd.DataFrame(columns=COLUMNS), scans)

    def download_plan(self, config: dict) -> list:
        """Return the ``brainvq.acquire.RemoteFile`` list to fetch (archives, then the demographics sheet)."""
        return []

    def require_terms(self, config: dict) -> None:
        """Raise ``brainvq.acquire.TermsNotAcceptedError`` when the config has not accepted required terms."""


class FolderSource(Source):
    """A source whose volumes are already on disk in ``dataset.local_dir`` (local, bids, adni)."""

    kind = "folder"
    local_dir_means = "the folder that holds the volumes"

    def raw_root(self, config: dict) -> str:
        """Return ``dataset.local_dir``; raises SourceError naming the key when it is not set."""
        if not config["dataset"]["local_dir"]:
            raise SourceError(
                f"dataset.source is {self.name!r} but dataset.local_dir is not set: add "
                f"'dataset: {{local_dir: /path/to/data}}' ({self.local_dir_means}) to your config file"
            )
        return config["dataset"]["local_dir"]


def available_sources() -> list[str]:
    """Return the names of the source modules in brainvq/sources/."""
    return sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_"))


def get_source(name: str) -> Source:
    """Return ``SOURCE`` of ``brainvq.sources.<name>``.

    Raises:
        SourceError: no such module (listing the available ones), or one without a matching SOURCE.
    """
    available = available_sources()
    if name not in available:
        raise SourceError(
            f"dataset.source {name!r} is not a data source; use one of {', '.join(available)} "
            f"(or add brainvq/sources/{name}.py, see docs/architecture.md)"
        )
    source = getattr(importlib.import_module(f"{__name__}.{name}"), "SOURCE", None)
    if not isinstance(source, Source) or source.name != name or source.kind not in KINDS:
        raise SourceError(
            f"brainvq/sources/{name}.py must define SOURCE, a brainvq.sources.Source with name {name!r} "
            f"and kind one of {', '.join(KINDS)}"
        )
    return source
