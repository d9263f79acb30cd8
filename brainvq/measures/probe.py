"""The representation probe: a binary target from a table column, and a logistic-regression probe scored by AUROC.

- **Target**: a rule such as ``sex`` (a column with two values), ``cdr>0`` or ``atrophy>median`` (the median of
  the training rows only, so test values never shape the target).
- **Probe**: logistic regression (standardised inputs, C by grouped stratified CV on AUROC) trained on training
  rows and scored by AUROC on test rows. Undefined (``None`` with a reason) with one class.
- **Image baseline features**: a scan's mean slice after anti-aliased downsampling.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from skimage.transform import resize
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)


class ProbeTargetError(ValueError):
    """``evaluate.probe_target`` cannot be parsed or names a column that cannot give two classes."""


@dataclass(frozen=True)
class ProbeTarget:
    """A binary probe target: ``column`` itself (two values), or ``column > threshold`` (a number or "median")."""

    column: str
    threshold: float | str | None = None

    def describe(self) -> str:
        """Return the rule as written in the config, e.g. ``atrophy>median``."""
        return self.column if self.threshold is None else f"{self.column}>{self.threshold}"


_PROBE_RULE = re.compile(
    r"^\s*(?P<column>[A-Za-z_][A-Za-z0-9_]*)\s*(?:>\s*(?P<threshold>median|[-+]?\d+(?:\.\d*)?)\s*)?$")


def parse_probe_target(spec: str) -> ProbeTarget:
    """Return the ProbeTarget of a rule such as ``sex``, ``cdr>0`` or ``atrophy>median``.

    Raises:
        ProbeTargetError: for any other form.
    """
    match = _PROBE_RULE.match(spec or "")
    if not match:
        raise ProbeTargetError(f"evaluate.probe_target {spec!r} is not 'column', 'column>NUMBER' or 'column>median'; "
                               "fix it in the config")
    threshold = match["threshold"]
    if threshold is not None and threshold != "median":
        threshold = float(threshold)
    return ProbeTarget(match["column"], threshold)


def binary_probe_labels(table: pd.DataFrame, target: ProbeTarget, is_train: np.ndarray) -> tuple[pd.Series, str]:
    """Return 0/1 labels per row (NaN where the value is missing) and a sentence saying what 1 means.

    A ``median`` threshold is the median over training rows only, so test values never shape the target.

    Raises:
        ProbeTargetError: when the column is absent, not numeric for a threshold, or has more than two values.
    """
    if target.column not in table.columns:
        raise ProbeTargetError(f"probe target column {target.column!r} is not in split.csv (columns: "
                               f"{sorted(table.columns)}); set evaluate.probe_target to one of them")
    raw = table[target.column]
    if target.threshold is None:
        text = raw.astype("string").str.strip().replace("", pd.NA)
        values = sorted(text.dropna().unique())
        if len(values) > 2:
            raise ProbeTargetError(f"probe target column {target.column!r} has {len(values)} values {values[:6]}; "
                                   f"use a threshold rule such as '{target.column}>median' in evaluate.probe_target")
        positive = values[-1] if values else None
        labels = (text == positive).astype("float").where(text.notna())
        return labels.astype(float), f"1 = {target.column} is {positive!r}"
    numeric = pd.to_numeric(raw, errors="coerce")
    if numeric.notna().sum() == 0 and raw.notna().any():
        raise ProbeTargetError(f"probe target column {target.column!r} is not numeric; drop the threshold from "
                               "evaluate.probe_target")
    threshold = target.threshold
    if threshold == "median":
        threshold = float(numeric[np.asarray(is_train, bool)].median())
    labels = (numeric > threshold).astype(float).where(numeric.notna())
    return labels, f"1 = {target.column} > {threshold:g}"


def downsampled_mean_slice(images: np.ndarray, size_px: int) -> np.ndarray:
    """Return the mean of a scan's slices after anti-aliased downsampling to ``size_px`` square, flattened."""
    small = resize(np.asarray(images, np.float32), (len(images), size_px, size_px), anti_aliasing=True,
                   preserve_range=True)
    return small.mean(0).ravel()


def probe_training_problem(y_train: np.ndarray, groups_train: np.ndarray, cv_folds: int) -> str | None:
    """Return why no probe can be fitted on these training labels (a class with under 2 subjects), or None."""
    groups_per_class = [len(set(np.asarray(groups_train)[y_train == c])) for c in (0, 1)]
    if min(cv_folds, *groups_per_class) < 2:
        return (f"training set has {groups_per_class[0]} negative and {groups_per_class[1]} positive "
                "subjects; at least 2 of each are needed to choose C by cross-validation")
    return None


def fitted_probe(x_train: np.ndarray, y_train: np.ndarray, groups_train: np.ndarray, cv_folds: int, n_cs: int,
                 seed: int):
    """Return (a standardised logistic regression fitted with C chosen by grouped, stratified CV on AUROC, None),
    or (None, the reason it cannot be fitted: too few subjects of a class, or a failed fit)."""
    reason = probe_training_problem(y_train, groups_train, cv_folds)
    if reason:
        return None, reason
    folds = min(cv_folds, *[len(set(np.asarray(groups_train)[y_train == c])) for c in (0, 1)])
    splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
        x_train, y_train, groups_train))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=n_cs, cv=splits, scoring="roc_auc", l1_ratios=(0.0,), max_iter=2000, use_legacy_attributes=False))
    try:
        model.fit(x_train, y_train)
    except ValueError as error:  # e.g. a fold left with one class: report it rather than lose every other metric
        log.warning("probe fit failed: %s", error)
        return None, f"the classifier could not be fitted: {error}"
    return model, None


def probe_auroc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                groups_train: np.ndarray, cv_folds: int, n_cs: int, seed: int) -> dict:
    """Fit a standardised logistic regression (C chosen by grouped, stratified CV on AUROC) and score the test set.

    Returns:
        ``{"auroc", "reason", "C", "n_train", "n_test", "n_test_positive"}``; ``auroc`` is None, with the
        ``reason``, when either set has a single class or a class has too few training subjects.
    """
    result = {"auroc": None, "reason": None, "C": None, "n_train": int(len(y_train)), "n_test": int(len(y_test)),
              "n_test_positive": int(np.sum(y_test == 1))}
    result["reason"] = probe_training_problem(y_train, groups_train, cv_folds)
    if result["reason"] is None and len(set(y_test.tolist())) < 2:
        result["reason"] = (f"all {len(y_test)} test scans have label {int(y_test[0]) if len(y_test) else 'none'}; "
                            "AUROC is undefined with one class")
    if result["reason"]:
        return result
    model, result["reason"] = fitted_probe(x_train, y_train, groups_train, cv_folds, n_cs, seed)
    if model is None:
        return result
    result["auroc"] = float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))
    result["C"] = float(model[-1].C_)
    return result


def cross_validated_probe_auroc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, cv_folds: int, n_cs: int,
                                seed: int) -> dict:
    """Return the out-of-fold AUROC of the probe over scans without a train/test split (e.g. applied scans).

    Scans are split into at most ``cv_folds`` folds grouped by subject and stratified by label; each fold is
    predicted by a probe fitted (C by an inner grouped CV) on the other folds, and the AUROC is computed over
    all out-of-fold predictions. ``auroc`` is None, with the ``reason``, when a class has too few subjects.

    Returns:
        ``{"auroc", "reason", "n_scans", "n_positive", "folds"}``.
    """
    y = np.asarray(y, int)
    result = {"auroc": None, "reason": None, "n_scans": int(len(y)), "n_positive": int(np.sum(y == 1)), "folds": 0}
    groups_per_class = [len(set(np.asarray(groups)[y == c])) for c in (0, 1)]
    folds = min(cv_folds, *groups_per_class)
    # Each outer training part must keep 2 subjects of each class for the inner CV that chooses C.
    if folds < 2 or min(groups_per_class) - math.ceil(min(groups_per_class) / folds) < 2:
        result["reason"] = (f"{groups_per_class[0]} negative and {groups_per_class[1]} positive subjects; at least "
                            "3 of each are needed for a cross-validated probe")
        return result
    scores = np.full(len(y), np.nan)
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in outer.split(x, y, groups):
        model, reason = fitted_probe(x[train], y[train], np.asarray(groups)[train], cv_folds, n_cs, seed)
        if model is None:
            result["reason"] = reason
            return result
        scores[test] = model.predict_proba(x[test])[:, 1]
    result["auroc"], result["folds"] = float(roc_auc_score(y, scores)), int(folds)
    return result
