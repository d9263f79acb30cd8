"""The representation probe: a binary target from a table column, and a cross-validated linear probe scored by AUROC.

- **Target**: a rule such as ``sex`` (a column with two values), ``cdr>0`` or ``atrophy>median`` (the median of
  the training rows only, so test values never shape the target).
- **Probe**: ridge regression of the 0/1 label on standardised features (a least-squares linear classifier),
  cross-validated over *all* subjects in folds that never split a subject; the penalty is chosen inside each
  training part by an inner cross-validation over the remaining folds. AUROC is computed over every scan's
  out-of-fold score. Ridge is used rather than logistic regression because its solutions for every penalty and
  every label vector come from one eigendecomposition per fold, which makes the permutation test cheap.
- **Uncertainty**: a 95 % interval that resamples subjects (the out-of-fold scores are kept), and a permutation
  p-value: the whole cross-validation rerun on labels permuted among subjects (within strata such as site, so
  a probe that only recognises the site gets no credit); p = (1 + #permuted AUROC >= observed) / (1 + #perm).
- **Image baseline features**: a scan's mean slice after anti-aliased downsampling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from skimage.transform import resize

from brainvq.measures.statistics import percentile_interval, subject_resample_weights


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



# ------------------------------------------------------------------------------------------ the probe


def subject_folds(subjects, labels, n_folds: int, seed: int) -> np.ndarray:
    """Return a fold index (0..n_folds-1) per row: a subject's rows share a fold, and subjects are dealt to folds
    class by class (by their first row's label) in a seeded random order, so each fold gets both classes."""
    subjects = np.asarray(subjects)
    names, first = np.unique(subjects, return_index=True)
    subject_label = np.asarray(labels)[first]
    rng = np.random.default_rng(seed)
    fold_of = {}
    dealt = 0
    for label in np.unique(subject_label):
        members = rng.permutation(names[subject_label == label])
        for k, name in enumerate(members):
            fold_of[name] = (dealt + k) % n_folds
        dealt += len(members)
    return np.array([fold_of[s] for s in subjects])


def auroc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the AUROC of each column of ``scores`` (n, P) for the 0/1 labels in the same column of ``labels``
    (n, P), ties counted half; NaN where a column has one class."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    ranks = stats.rankdata(scores, axis=0)
    n1 = positive.sum(axis=0)
    n0 = len(scores) - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * positive).sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def standardised(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Return ``train`` and ``others`` centred and scaled by ``train``'s column mean and std (constant columns 0)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def ridge_predictions(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                      penalties: np.ndarray) -> np.ndarray:
    """Return ridge-regression predictions ``(n_alphas, n_test, P)`` on standardised features for each target
    column of ``y_train`` (n_train, P) and each penalty (times the number of features), from one
    eigendecomposition of the training Gram matrix (the dual form, cheap for few rows and many features)."""
    z_train, z_test = standardised(np.asarray(x_train, np.float64), np.asarray(x_test, np.float64))
    offset = y_train.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(z_train @ z_train.T)
    left = (z_test @ z_train.T) @ vectors
    right = vectors.T @ (y_train - offset)
    alphas = np.asarray(penalties) * z_train.shape[1]
    return np.stack([left @ (right / (np.maximum(eigenvalues, 0) + a)[:, None]) + offset for a in alphas])


def probe_scores(x: np.ndarray, labels: np.ndarray, folds: np.ndarray, penalties: np.ndarray) -> np.ndarray:
    """Return out-of-fold probe scores ``(n, P)`` of a ridge probe for each label column ``(n, P)``.

    For each outer fold, the penalty is chosen per column by the AUROC of the other folds' out-of-fold scores
    (the inner cross-validation, over the same subject folds, so no subject is split), the largest penalty winning
    ties; the probe is then refitted on all other folds with it.
    """
    x, labels = np.asarray(x, np.float64), np.asarray(labels, np.float64)
    penalties = np.sort(np.asarray(penalties, np.float64))[::-1]
    scores = np.zeros(labels.shape)
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        inner = np.zeros((len(penalties),) + labels[train].shape)
        train_folds = folds[train]
        for inner_fold in np.unique(train_folds):
            fit, held = train_folds != inner_fold, train_folds == inner_fold
            inner[:, held] = ridge_predictions(x[train][fit], labels[train][fit], x[train][held], penalties)
        inner_auroc = np.stack([auroc_columns(inner[a], labels[train]) for a in range(len(penalties))])
        best = np.nanargmax(np.nan_to_num(inner_auroc, nan=-1.0), axis=0)
        outer = ridge_predictions(x[train], labels[train], x[test], penalties)
        scores[test] = np.take_along_axis(outer, best[None, None, :], axis=0)[0]
    return scores


def permuted_labels(labels, subjects, strata, n_permutations: int, seed: int) -> tuple[np.ndarray, str]:
    """Return ``(n, 1 + n_permutations)`` labels (column 0 the observed) and the unit that was permuted.

    When every subject's rows share one label, subjects' labels are permuted among subjects of the same stratum
    (``strata``, e.g. site; None = one stratum), keeping each subject's rows together; otherwise rows' labels are
    permuted within strata.
    """
    labels, subjects = np.asarray(labels), np.asarray(subjects)
    strata = np.zeros(len(labels), int) if strata is None else np.asarray(strata)
    names, first, inverse = np.unique(subjects, return_index=True, return_inverse=True)
    by_subject = all(len(set(labels[subjects == name])) == 1 for name in names)
    unit_labels, unit_strata = (labels[first], strata[first]) if by_subject else (labels, strata)
    rng = np.random.default_rng(seed)
    columns = [unit_labels]
    for _ in range(n_permutations):
        shuffled = unit_labels.copy()
        for stratum in np.unique(unit_strata):
            members = np.flatnonzero(unit_strata == stratum)
            shuffled[members] = unit_labels[rng.permutation(members)]
        columns.append(shuffled)
    matrix = np.stack(columns, axis=1)
    return (matrix[inverse] if by_subject else matrix), ("subject" if by_subject else "scan")


def weighted_auroc(scores, labels, weights: np.ndarray) -> np.ndarray:
    """Return the AUROC of ``scores`` for 0/1 ``labels`` under each row of ``weights`` (B, n) (a row weight is how
    often the row is counted; ties count half); NaN where a weighting leaves one class."""
    levels, level_of = np.unique(np.asarray(scores, np.float64), return_inverse=True)
    positive = np.asarray(labels).astype(bool)
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    by_level = np.zeros((len(weights), len(levels), 2))
    for cls, rows in ((0, ~positive), (1, positive)):
        for b in range(len(weights)):
            by_level[b, :, cls] = np.bincount(level_of[rows], weights[b, rows], minlength=len(levels))
    negatives, positives = by_level[..., 0], by_level[..., 1]
    below = np.cumsum(negatives, axis=1) - negatives
    with np.errstate(invalid="ignore", divide="ignore"):
        return (positives * (below + 0.5 * negatives)).sum(axis=1) / (positives.sum(axis=1) * negatives.sum(axis=1))


def subject_bootstrap_auroc_interval(labels, scores, subjects, n_resamples: int, seed: int) -> list[float] | None:
    """Return the 95 % interval of the AUROC of ``scores`` for ``labels`` over resampled subjects (resamples
    left with one class are skipped)."""
    if n_resamples < 1:
        return None
    return percentile_interval(weighted_auroc(scores, labels, subject_resample_weights(subjects, n_resamples, seed)))


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """Return ``(1 + #{null >= observed}) / (1 + len(null))`` (never 0; NaN nulls count as not exceeding)."""
    null = np.asarray(null, np.float64)
    return float((1 + np.sum(np.nan_to_num(null, nan=-np.inf) >= observed - 1e-12)) / (1 + len(null)))


def probe_result(x: np.ndarray, labels: np.ndarray, subjects, strata, settings: dict) -> dict:
    """Return the grouped cross-validated probe of ``labels`` (0/1 per row) from features ``x``.

    Args:
        x: ``(n, D)`` features, one row per scan.
        labels, subjects: per row; a subject's rows always share a fold.
        strata: per row, the groups labels are permuted within (e.g. site), or None.
        settings: ``probe_cv_folds``, ``probe_n_penalties``, ``probe_permutations``, ``bootstrap_resamples``,
            ``seed`` (the ``evaluate`` config section).

    Returns:
        ``{"auroc", "auroc_ci", "p_value", "n_permutations", "permuted", "folds", "reason"}``; AUROC is over the
        rows' out-of-fold scores, its interval resamples subjects, its p-value comes from refitting on permuted
        labels. Values are None, with the ``reason``, when a class has fewer subjects than two folds need.
    """
    labels, subjects = np.asarray(labels, int), np.asarray(subjects)
    result = {"auroc": None, "auroc_ci": None, "p_value": None, "n_permutations": 0, "permuted": None,
              "folds": None, "reason": None}
    subjects_per_class = [len(set(subjects[labels == c])) for c in (0, 1)]
    folds = min(settings["probe_cv_folds"], *subjects_per_class)
    if folds < 3:
        result["reason"] = (f"{subjects_per_class[0]} negative and {subjects_per_class[1]} positive subjects; "
                            "grouped cross-validation with an inner fold needs at least 3 of each")
        return result
    fold_of = subject_folds(subjects, labels, folds, settings["seed"])
    matrix, unit = permuted_labels(labels, subjects, strata, settings["probe_permutations"], settings["seed"])
    penalties = np.logspace(-3, 3, settings["probe_n_penalties"])
    scores = probe_scores(x, matrix, fold_of, penalties)
    aurocs = auroc_columns(scores, matrix)
    result.update(auroc=float(aurocs[0]), folds=int(folds), permuted=unit, n_permutations=int(len(aurocs) - 1),
                  p_value=permutation_p_value(aurocs[0], aurocs[1:]) if len(aurocs) > 1 else None,
                  auroc_ci=subject_bootstrap_auroc_interval(labels, scores[:, 0], subjects,
                                                            settings["bootstrap_resamples"], settings["seed"]))
    return result
