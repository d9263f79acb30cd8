"""Participants tables: each source's demographics normalised to one set of columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

COLUMNS = ["subject", "session", "site", "age", "sex"]


class DemographicsError(ValueError):
    """A demographics file is missing, unreadable, or lacks a required column."""


def read_participants_tsv(path: str | Path) -> pd.DataFrame:
    """Return a participants.tsv with at least the normalised columns (missing ones filled empty)."""
    path = Path(path)
    if not path.exists():
        raise DemographicsError(f"participants file {path} does not exist; fix the path or remove the setting")
    table = pd.read_csv(path, sep="\t", dtype={"subject": str, "session": str})
    if "subject" not in table.columns:
        raise DemographicsError(f"{path} has no 'subject' column; add one (the subject IDs of the volumes)")
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = pd.NA
    return table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]


def participants_table(source: str, raw_root: str | Path, config: dict, scans: pd.DataFrame) -> pd.DataFrame:
    """Return the normalised participants table of a run.

    Args:
        source: ``dataset.source``.
        raw_root: the folder holding the raw volumes (and the demo's participants.tsv).
        config: the validated config.
        scans: the discovered scans (``subject`` and ``session`` columns); subjects without
            demographics still get a row, with empty values.
    """
    raw_root = Path(raw_root)
    if source == "demo":
        table = read_participants_tsv(raw_root / "participants.tsv")
    elif source == "local" and config["dataset"].get("participants"):
        table = read_participants_tsv(config["dataset"]["participants"])
    else:
        table = pd.DataFrame(columns=COLUMNS)
    known = set(table["subject"].astype(str))
    missing = sorted(set(scans["subject"].astype(str)) - known)
    if missing:
        table = pd.concat([table, pd.DataFrame({"subject": missing})], ignore_index=True)
    return table.reset_index(drop=True)
