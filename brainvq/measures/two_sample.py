"""Classifier two-sample test (Lopez-Paz & Oquab 2017): can a small CNN tell two sets of slices apart?

The two sets are cut into ``folds`` parts (matched pairs stay in the same part when the sets are matched item by
item, e.g. by slice position); for each part a fresh :class:`~brainvq.measures.slice_networks.SliceCNN` is
trained on the other parts of both sets and scores the held-out part. The mean over parts of the held-out AUROC is
0.5 when the sets cannot be told apart and 1 when they always can. Its 95 % interval is a percentile bootstrap over
the held-out items, resampled within each set and part.

When the items of the reference set carry groups (the subject of each real slice), whole groups are held out
together. Otherwise neighbouring slices of one subject sit on both sides of the split, and the classifier learns
who the few test subjects are rather than whether the sets differ: on the demo (64 samples), decoded *training*
maps (what a prior that had learned the training distribution would draw) scored 0.75 against the test subjects'
reconstructions with slices split at random, and 0.60 with subjects held out.

What it can detect: any difference a small CNN learns from this many slices (texture, shape, intensity, missing
anatomy). What it cannot: a difference too subtle for that network and sample size (small sets give wide
intervals), and which set is better. The interval resamples slices, not subjects: with a handful of test subjects
it leaves out how much the AUROC would move with other subjects.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.model_selection import GroupKFold

from brainvq.measures.slice_networks import fit_slice_network, network_outputs


def fold_assignment(n_a: int, n_b: int, folds: int, seed: int, groups_a=None) -> tuple[np.ndarray, np.ndarray]:
    """Return the fold of each item of set a and of set b; with ``n_a == n_b`` item i of both sets share a fold.

    With ``groups_a`` (one label per item of set a, at least ``folds`` distinct), each group lies in one fold,
    folds balanced in size (scikit-learn's ``GroupKFold``, groups shuffled by ``seed``).
    """
    rng = np.random.default_rng(seed)
    if groups_a is None:
        fold_a = rng.permutation(n_a) % folds
    else:
        fold_a = np.empty(n_a, np.int64)
        splitter = GroupKFold(folds, shuffle=True, random_state=int(rng.integers(2 ** 31)))
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(n_a), groups=np.asarray(groups_a))):
            fold_a[held_out] = fold
    fold_b = fold_a.copy() if n_a == n_b else rng.permutation(n_b) % folds
    return fold_a, fold_b


def auroc(negatives: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Return the AUROC of ``positives`` over ``negatives`` (ties count half) along the last axis: the
    Mann-Whitney U statistic over ``n_neg * n_pos``. Leading axes are batches (e.g. bootstrap replicates)."""
    negatives, positives = np.asarray(negatives, np.float64), np.asarray(positives, np.float64)
    n_neg, n_pos = negatives.shape[-1], positives.shape[-1]
    ranks = rankdata(np.concatenate([negatives, positives], axis=-1), axis=-1)[..., n_neg:]
    return (ranks.sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_neg * n_pos)


def mean_auroc(folds: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Return the mean over folds of the AUROC of held-out scores ``(scores of set a, scores of set b)``, set b
    the positives."""
    return float(np.mean([auroc(a, b) for a, b in folds]))


def bootstrap_interval(folds: list[tuple[np.ndarray, np.ndarray]], n_bootstrap: int, seed: int,
                       level: float = 0.95) -> list[float]:
    """Return the percentile bootstrap interval of :func:`mean_auroc`, resampling each set of each fold with
    replacement."""
    rng = np.random.default_rng(seed)
    values = np.mean([auroc(rng.choice(a, (n_bootstrap, len(a))), rng.choice(b, (n_bootstrap, len(b))))
                      for a, b in folds], axis=0)
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def classifier_two_sample_test(set_a: np.ndarray, set_b: np.ndarray, folds: int = 2, epochs: int = 30,
                               seed: int = 0, n_bootstrap: int = 1000, size: int = 64, groups_a=None) -> dict:
    """Return the held-out AUROC of a CNN telling slices ``set_b`` ``(M, H, W)`` from ``set_a`` ``(N, H, W)``:
    the mean over folds of each fold's AUROC on its held-out items, with a bootstrap 95 % interval.

    Args:
        groups_a: the group (subject) of each item of set a; each group is held out whole. Fewer distinct groups
            than ``folds`` fall back to folds of single items (``fold_unit`` says which was used).

    Returns:
        ``{"auroc", "ci95", "fold_auroc", "n_a", "n_b", "folds", "fold_unit"}``; ``auroc`` is None (with
        ``reason``) when a set has fewer items than folds.
    """
    n_a, n_b = len(set_a), len(set_b)
    grouped = groups_a is not None and len(np.unique(groups_a)) >= folds
    result = {"auroc": None, "ci95": None, "fold_auroc": [], "n_a": int(n_a), "n_b": int(n_b), "folds": folds,
              "fold_unit": "group" if grouped else "item"}
    if groups_a is not None and not grouped:
        result["fold_unit_reason"] = (f"fewer groups ({len(np.unique(groups_a))}) than folds ({folds}): items split "
                                      "at random")
    if min(n_a, n_b) < max(folds, 2):
        result["reason"] = f"{min(n_a, n_b)} slices in the smaller set; at least {max(folds, 2)} are needed"
        return result
    fold_a, fold_b = fold_assignment(n_a, n_b, folds, seed, groups_a if grouped else None)
    held_out = []
    for fold in range(folds):
        train_a, train_b = set_a[fold_a != fold], set_b[fold_b != fold]
        model = fit_slice_network(np.concatenate([train_a, train_b]), np.r_[np.zeros(len(train_a)),
                                  np.ones(len(train_b))], "logistic", epochs, seed + fold, size)
        held_out.append((network_outputs(model, set_a[fold_a == fold]), network_outputs(model, set_b[fold_b == fold])))
    result["fold_auroc"] = [mean_auroc([scores]) for scores in held_out]
    result["auroc"] = mean_auroc(held_out)
    result["ci95"] = bootstrap_interval(held_out, n_bootstrap, seed)
    return result
