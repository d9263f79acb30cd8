"""Subject-level split: which scans train, validate and test (rule split); the errors of the slice files.

Slices files and shards (writing, reading, montages) are in brainvq.shards. Contracts (paths, HDF5 layout) are in
docs/architecture.md. The unit of every split decision is the
**subject** (one person): all scans (sessions) of one subject land in the same set, and the shard
writer refuses to write anything if a subject would end up in both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from brainvq.demographics import read_participants_tsv

# scikit-learn is imported where used: importing it costs seconds per job.

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
SPLIT_COLUMNS = ["scan", "subject", "session", "split", "validation"]
EXCLUDED_COLUMNS = ["scan", "path", "stage", "reason"]


class SplitError(ValueError):
    """The split cannot be made: too few subjects, an unknown stratify column, missing slice files."""


class LeakageError(RuntimeError):
    """A subject would appear in both the training and the test set."""


class ShardError(RuntimeError):
    """A shard or per-scan slices file is missing, unreadable or lacks a contract dataset."""


class ShardSizeError(ShardError):
    """Shards (or slices files) disagree on the image size."""


class ShardFormatError(ShardError):
    """A shard or slices file was written in another shard format version (an older brainvq)."""


# --------------------------------------------------------------------------------------------- split


def read_subjects_tsv(path: str | Path) -> pd.DataFrame:
    """Return subjects.tsv as strings (empty session stays ``""``).

    Raises:
        SplitError: when the file lacks the ``scan``/``subject`` columns.
    """
    path = Path(path)
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = {"scan", "subject"} - set(table.columns)
    if missing:
        raise SplitError(f"{path} lacks columns {sorted(missing)}; re-run discover_subjects")
    if "session" not in table.columns:
        table["session"] = ""
    return table


def read_excluded_csv(path: str | Path) -> pd.DataFrame:
    """Return an exclusions table (``scan, path, stage, reason``); an empty or header-only file gives no rows."""
    path = Path(path)
    if path.stat().st_size == 0:
        return pd.DataFrame(columns=EXCLUDED_COLUMNS)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in EXCLUDED_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    return table[EXCLUDED_COLUMNS]


def slice_file_exclusion(path: str | Path) -> tuple[str, str]:
    """Return ``(stage, reason)`` of a slices/{scan}.h5 file; ``reason`` is ``""`` when the scan is kept.

    A file with no slices and no recorded reason counts as excluded ("no slices kept").
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            reason = text_attr(f.attrs.get("excluded_reason", ""))
            stage = text_attr(f.attrs.get("excluded_stage", "")) or "slice_volume"
            n = f["slice_index"].shape[0] if "slice_index" in f else 0
    except OSError as error:
        raise ShardError(f"cannot read slices file {path}: {error}; delete it and re-run slice_volume") from error
    if not reason and n == 0:
        reason = "no slices kept"
    return stage, reason


def excluded_scans(discovery_excluded: pd.DataFrame, subjects: pd.DataFrame,
                   slice_files: Mapping[str, str | Path]) -> pd.DataFrame:
    """Return every excluded scan: discovery-stage rows plus scans whose slices file records a reason.

    Args:
        discovery_excluded: qc/excluded_inputs.csv (``scan, path, stage, reason``).
        subjects: subjects.tsv (gives each scan's input path).
        slice_files: scan key -> slices/{scan}.h5.

    Returns:
        A table with columns ``scan, path, stage, reason``, sorted by scan.
    """
    paths = dict(zip(subjects["scan"], subjects.get("path", pd.Series([""] * len(subjects)))))
    rows = []
    for scan in sorted(slice_files):
        stage, reason = slice_file_exclusion(slice_files[scan])
        if reason:
            rows.append({"scan": scan, "path": paths.get(scan, ""), "stage": stage, "reason": reason})
    table = pd.concat([discovery_excluded[EXCLUDED_COLUMNS], pd.DataFrame(rows, columns=EXCLUDED_COLUMNS)],
                      ignore_index=True)
    return table.drop_duplicates("scan", keep="first").sort_values("scan", ignore_index=True)


def kept_scans(subjects: pd.DataFrame, excluded: pd.DataFrame, slice_files: Mapping[str, str | Path]) -> pd.DataFrame:
    """Return the rows of subjects.tsv that were not excluded.

    Raises:
        SplitError: when a kept scan has no slices file.
    """
    kept = subjects[~subjects["scan"].isin(set(excluded["scan"]))]
    missing = sorted(set(kept["scan"]) - set(slice_files))
    if missing:
        raise SplitError(
            f"no slices file for scans {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            "run slice_volume for them (results/<run>/slices/{scan}.h5)"
        )
    return kept.reset_index(drop=True)


def merge_participants(scans: pd.DataFrame, participants: pd.DataFrame) -> pd.DataFrame:
    """Return ``scans`` with participants columns merged by subject and session.

    A participants row with the scan's session wins; otherwise the subject's session-less row
    (or its first row) is used, so per-subject demographics reach every session.
    """
    scans = scans.assign(session=scans["session"].fillna("").astype(str))
    people = participants.copy()
    people["subject"] = people["subject"].astype(str)
    people["session"] = people["session"].fillna("").astype(str)
    extra = [c for c in people.columns if c not in ("subject", "session") and c not in scans.columns]
    people = people[["subject", "session"] + extra]
    exact = people.drop_duplicates(["subject", "session"])
    # Session-less rows first, so drop_duplicates keeps the subject-level demographics.
    by_subject = (people.sort_values("session", key=lambda s: s != "", kind="stable")
                  .drop_duplicates("subject").drop(columns="session"))
    exact_rows = scans.merge(exact, on=["subject", "session"], how="left", indicator=True)
    subject_rows = scans.merge(by_subject, on="subject", how="left")
    matched = (exact_rows["_merge"] == "both").to_numpy()
    # DataFrame.where keeps the session-specific value and falls back to the subject-level one.
    values = exact_rows[extra].where(np.repeat(matched[:, None], len(extra), axis=1), subject_rows[extra])
    merged = pd.concat([scans.reset_index(drop=True), values], axis=1)
    return merged


CONTINUOUS_MIN_VALUES = 6


def subject_strata(table: pd.DataFrame, column: str) -> pd.Series:
    """Return one stratum label per subject (index): its first non-empty value of ``column``.

    A numeric column with at least CONTINUOUS_MIN_VALUES distinct values (age, atrophy) is cut at its
    median over subjects, so subjects from both halves reach the test set.
    """
    values = pd.to_numeric(table[column], errors="coerce")
    if values.notna().all() and values.nunique() >= CONTINUOUS_MIN_VALUES:
        per_subject = values.groupby(table["subject"], sort=True).first()
        halves = np.where(per_subject > per_subject.median(), "above median", "at or below median")
        return pd.Series(halves, index=per_subject.index)
    labels = table[column].astype(str).where(table[column].notna() & (table[column].astype(str) != ""), "<missing>")
    return labels.groupby(table["subject"], sort=True).first()


def pooled_strata(labels: pd.Series) -> pd.Series:
    """Return ``labels`` with strata of fewer than two subjects pooled, since those cannot be on both sides.

    A lone leftover after pooling joins the largest stratum.
    """
    counts = labels.value_counts()
    rare = counts[counts < 2].index
    if len(rare):
        labels = labels.where(~labels.isin(rare), "<rare>")
        if (labels == "<rare>").sum() == 1 and (labels != "<rare>").any():
            labels = labels.replace("<rare>", labels[labels != "<rare>"].value_counts().idxmax())
    return labels


def held_out_subjects(subjects: Sequence[str], fraction: float, seed: int,
                      strata: pd.Series | None = None) -> set[str]:
    """Return a ``fraction`` share of ``subjects`` (at least one, never all) drawn with scikit-learn.

    Args:
        subjects: subject IDs, one each.
        fraction: share to hold out, in (0, 1).
        seed: random state of the splitter.
        strata: optional label per subject (indexed by subject); stratifies when every stratum can
            be represented on both sides, else falls back to a plain shuffle split with a warning.

    Raises:
        SplitError: with fewer than two subjects.
    """
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    subjects = np.asarray(sorted(subjects), dtype=object)
    n = len(subjects)
    if n < 2:
        raise SplitError(f"cannot hold out subjects from {n} subject(s); at least 2 are needed")
    n_out = min(max(1, math.ceil(fraction * n)), n - 1)
    splitter = ShuffleSplit(n_splits=1, test_size=n_out, random_state=seed)
    labels = None
    if strata is not None:
        labels = pooled_strata(strata.reindex(subjects)).to_numpy()
        n_classes = len(set(labels))
        if n_classes > 1 and min(n_out, n - n_out) >= n_classes:
            splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_out, random_state=seed)
        elif n_classes > 1:
            log.warning("cannot stratify %d subjects into %d held out over %d strata; split unstratified",
                        n, n_out, n_classes)
            labels = None
    _, out_index = next(splitter.split(subjects, labels))
    return set(subjects[out_index])


def stratify_column(split_config: dict, source_defaults: dict) -> str | None:
    """Return the participants column to stratify by: ``split.stratify``, or for 'auto' the source's
    (``source_defaults``: ``Source.defaults``)."""
    if split_config["stratify"] == "auto":
        return source_defaults["stratify"]
    return split_config["stratify"]


def subject_split(scans: pd.DataFrame, participants: pd.DataFrame, test_fraction: float, val_fraction: float,
                  seed: int, stratify: str | None = None) -> pd.DataFrame:
    """Return the split table: ``scan, subject, session, split, validation`` + participants columns.

    Args:
        scans: kept scans (subjects.tsv rows: ``scan, subject, session``).
        participants: participants.tsv (``subject, session`` + demographics).
        test_fraction: share of subjects in the test set (at least one subject).
        val_fraction: share of training subjects marked ``validation`` (0 for none).
        seed: makes the split reproducible.
        stratify: optional participants column to stratify both draws by (e.g. ``site``).

    Raises:
        SplitError: with fewer than two subjects, or an unknown ``stratify`` column.
    """
    table = merge_participants(scans[["scan", "subject", "session"]], participants)
    if stratify is not None and stratify not in table.columns:
        raise SplitError(
            f"split.stratify={stratify!r} is not a participants.tsv column "
            f"(have {sorted(set(participants.columns) - {'subject', 'session'})}); set split.stratify to one or null"
        )
    subjects = sorted(set(table["subject"]))
    if len(subjects) < 2:
        raise SplitError(f"only {len(subjects)} subject(s) left after exclusions; at least 2 are needed to split")
    strata = subject_strata(table, stratify) if stratify else None
    test = held_out_subjects(subjects, test_fraction, seed, strata)
    train = [s for s in subjects if s not in test]
    validation: set[str] = set()
    if val_fraction > 0 and len(train) >= 2:
        # A different stream than the test draw, so changing val_fraction never moves test subjects.
        validation = held_out_subjects(train, val_fraction, seed + 1, strata)
    elif val_fraction > 0:
        log.warning("only one training subject; no validation subjects held out")
    table.insert(3, "split", np.where(table["subject"].isin(test), "test", "train"))
    table.insert(4, "validation", table["subject"].isin(validation))
    assert_subjects_disjoint(table)
    return table.sort_values("scan", ignore_index=True)


def subjects_in_both_splits(split_df: pd.DataFrame, column: str = "subject") -> list[str]:
    """Return the values of ``column`` that occur with more than one split."""
    per_subject = split_df.groupby(column)["split"].nunique()
    return sorted(per_subject[per_subject > 1].index)


def assert_subjects_disjoint(split_df: pd.DataFrame) -> None:
    """Raise LeakageError if a subject (or scan) is in both splits, or a test subject is marked validation."""
    leaked = subjects_in_both_splits(split_df) + subjects_in_both_splits(split_df, "scan")
    if leaked:
        raise LeakageError(f"subjects/scans in both train and test: {sorted(set(leaked))}; "
                           "re-run the split rule (delete split.csv) rather than editing it by hand")
    test_validation = sorted(set(split_df.loc[(split_df["split"] == "test") & split_df["validation"], "subject"]))
    if test_validation:
        raise LeakageError(f"test subjects marked validation: {test_validation}; re-run the split rule")


def make_split(subjects_tsv: str | Path, participants_tsv: str | Path, excluded_inputs_csv: str | Path,
               slice_files: Mapping[str, str | Path], split_config: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(split table, excluded table)`` from the discovery outputs and the per-scan slices files.

    Args:
        subjects_tsv, participants_tsv, excluded_inputs_csv: outputs of discover_subjects.
        slice_files: scan key -> slices/{scan}.h5.
        split_config: the validated ``split`` config section.
    """
    subjects = read_subjects_tsv(subjects_tsv)
    excluded = excluded_scans(read_excluded_csv(excluded_inputs_csv), subjects, slice_files)
    kept = kept_scans(subjects, excluded, slice_files)
    table = subject_split(kept, read_participants_tsv(participants_tsv), split_config["test_fraction"],
                          split_config["val_fraction"], split_config["seed"], split_config["stratify"])
    return table, excluded


def read_split(path: str | Path) -> pd.DataFrame:
    """Return split.csv with ``scan/subject/session`` as strings and ``validation`` as bool.

    Raises:
        SplitError: when a required column is missing or ``split`` has a value other than train/test.
    """
    path = Path(path)
    table = pd.read_csv(path, dtype={"scan": str, "subject": str, "session": str})
    missing = [c for c in SPLIT_COLUMNS if c not in table.columns]
    if missing:
        raise SplitError(f"{path} lacks columns {missing}; re-run the split rule")
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise SplitError(f"{path} has split values {bad}; only train/test are allowed. Re-run the split rule")
    table["session"] = table["session"].fillna("")
    table["validation"] = table["validation"].astype(str).str.lower().isin(["true", "1"])
    return table


def validation_subjects(split_df: pd.DataFrame) -> set[str]:
    """Return the training subjects held out for validation.

    Raises:
        LeakageError: if a test subject is marked validation.
    """
    assert_subjects_disjoint(split_df)
    return set(split_df.loc[split_df["validation"] & (split_df["split"] == "train"), "subject"])


def text_attr(value) -> str:
    """Return an HDF5 string attribute as ``str`` (h5py gives ``bytes`` for some writers)."""
    return value.decode() if isinstance(value, bytes) else str(value)

