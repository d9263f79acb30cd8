"""Summary statistics of per-slice values, their means per scan and per subject, and subject bootstrap intervals.

A *scan* is one volume and a *subject* one person (who may have several scans, e.g. OASIS-2 visits). A scan's
value is the mean over its slices; a subject's value is the mean over its scans, so every subject counts once
however many scans or slices it has.

**Intervals** are percentile bootstrap 95 % intervals that resample *subjects* with replacement (a drawn subject
brings all its rows), since slices and scans of one subject are not independent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


INTERVAL_LEVEL = 0.95


def summary_statistics(values) -> dict:
    """Return ``{"mean", "median", "p5", "n"}`` of ``values``, ignoring NaN (all None when nothing is left)."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": None, "median": None, "p5": None, "n": 0}
    with np.errstate(invalid="ignore"):  # inf - inf inside percentile interpolation
        return {"mean": float(np.mean(values)), "median": float(np.median(values)),
                "p5": float(np.percentile(values, 5)), "n": int(values.size)}


def subject_resample_weights(subjects, n_resamples: int, seed: int) -> np.ndarray:
    """Return ``(n_resamples, n_rows)`` weights: how often each row's subject is drawn when the subjects are
    resampled with replacement (a subject's rows share its weight)."""
    _, inverse = np.unique(np.asarray(subjects), return_inverse=True)
    n_subjects = int(inverse.max()) + 1 if len(inverse) else 0
    draws = np.random.default_rng(seed).integers(0, max(n_subjects, 1), (n_resamples, n_subjects))
    counts = np.stack([np.bincount(row, minlength=n_subjects) for row in draws]) if n_subjects else draws
    return counts[:, inverse].astype(np.float64)


def percentile_interval(estimates, level: float = INTERVAL_LEVEL) -> list[float] | None:
    """Return the ``[low, high]`` percentile interval of bootstrap ``estimates`` (NaN ignored), or None."""
    estimates = np.asarray(estimates, np.float64)
    estimates = estimates[~np.isnan(estimates)]
    if estimates.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    with np.errstate(invalid="ignore"):
        return [float(np.percentile(estimates, tail)), float(np.percentile(estimates, 100 - tail))]


def bootstrap_mean_interval(values, subjects, n_resamples: int, seed: int) -> list[float] | None:
    """Return the subject-bootstrap 95 % interval of the mean of ``values`` (one per row, NaN ignored)."""
    values = np.asarray(values, np.float64)
    keep = ~np.isnan(values)
    if not keep.any() or n_resamples < 1:
        return None
    weights = subject_resample_weights(np.asarray(subjects)[keep], n_resamples, seed)
    values = values[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        sums = np.where(weights > 0, weights * values, 0.0).sum(axis=1)
        return percentile_interval(sums / weights.sum(axis=1))


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


def summaries_by_unit(columns: Sequence[str], n_resamples: int = 0, seed: int = 0, **tables: pd.DataFrame) -> dict:
    """Return ``{column: {unit: summary_statistics}}`` for each of ``columns`` over each named table; with
    ``n_resamples`` each summary also gets ``mean_ci95``, the subject-bootstrap interval of its mean (the tables
    then need a ``subject`` column).

    Example: ``summaries_by_unit(["ssim"], over_slices=per_slice, over_scans=per_scan)``.
    """
    summaries = {column: {unit: summary_statistics(table[column]) for unit, table in tables.items()}
                 for column in columns}
    if n_resamples:
        for column in columns:
            for unit, table in tables.items():
                summaries[column][unit]["mean_ci95"] = bootstrap_mean_interval(table[column], table["subject"],
                                                                               n_resamples, seed)
    return summaries
