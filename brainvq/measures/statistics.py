"""Summary statistics of per-slice values, and their means per scan and per subject.

A *scan* is one volume and a *subject* one person (who may have several scans, e.g. OASIS-2 visits). A scan's
value is the mean over its slices; a subject's value is the mean over its scans, so every subject counts once
however many scans or slices it has.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def summary_statistics(values) -> dict:
    """Return ``{"mean", "median", "p5", "n"}`` of ``values``, ignoring NaN (all None when nothing is left)."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": None, "median": None, "p5": None, "n": 0}
    with np.errstate(invalid="ignore"):  # inf - inf inside percentile interpolation
        return {"mean": float(np.mean(values)), "median": float(np.median(values)),
                "p5": float(np.percentile(values, 5)), "n": int(values.size)}


def per_scan_means(per_slice: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Return one row per scan: ``scan, subject, n_slices`` and the mean over its slices of each of ``columns``
    present in ``per_slice`` (which has one row per slice with ``scan`` and ``subject``), sorted by scan."""
    present = [c for c in columns if c in per_slice.columns]
    grouped = per_slice.groupby(["scan", "subject"], sort=True)
    table = grouped[present].mean().reset_index()
    table.insert(2, "n_slices", grouped.size().to_numpy())
    return table


def per_subject_means(per_scan: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Return one row per subject: ``subject, n_scans, n_slices`` and the mean over its scans of each of
    ``columns`` present in ``per_scan`` (``per_scan_means`` output), sorted by subject."""
    present = [c for c in columns if c in per_scan.columns]
    grouped = per_scan.groupby("subject", sort=True)
    table = grouped[present].mean().reset_index()
    table.insert(1, "n_scans", grouped.size().to_numpy())
    table.insert(2, "n_slices", grouped["n_slices"].sum().to_numpy())
    return table


def summaries_by_unit(columns: Sequence[str], **tables: pd.DataFrame) -> dict:
    """Return ``{column: {unit: summary_statistics}}`` for each of ``columns`` over each named table.

    Example: ``summaries_by_unit(["ssim"], over_slices=per_slice, over_scans=per_scan)``.
    """
    return {column: {unit: summary_statistics(table[column]) for unit, table in tables.items()}
            for column in columns}
