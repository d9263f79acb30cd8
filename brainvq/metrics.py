"""Evaluation on test subjects: reconstruction, codebook, prior, generation, representation probe, anomaly maps.

Definitions (the report repeats them next to each number):

- **SSIM**: ``skimage.metrics.structural_similarity`` with ``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1`` (the settings of Wang et al. 2004), on the whole slice.
- **Brain-masked SSIM**: the same SSIM on both images cropped to the brain mask's bounding box. The box is
  grown symmetrically to at least the 11 px SSIM window per side (shifted to stay inside the image); pixels
  outside the box do not count, background pixels inside it do. It equals skimage's SSIM on that crop.
- **MSE / PSNR**: skimage's, on the whole slice; the brain-masked variants use the mask's pixels only.
  PSNR in dB with a peak of 1; infinite (JSON ``null``) for identical images.
- **MS-SSIM**: Wang et al. 2003 with its five scale weights, a Gaussian window of sigma 1.5 and the largest
  odd window (at most 11 px) the size allows: five scales need each side to be at least 16 windows
  (128 px -> 7 px window). Undefined (``null``) below 48 px. The brain-masked variant uses the bounding-box
  crop, grown to 16 windows per side. Equal to MONAI's ``compute_ms_ssim`` with these settings.
- A "subject" in the per-subject statistics is one scan (volume): OASIS-2 visits count separately.
- **Codebook**: codes used in the test code maps and their perplexity, exp(entropy of code usage).
- **Prior**: the PixelCNN's test NLL in bits per code, next to log2 K (uniform) and the add-one-smoothed
  training code frequencies (unigram).
- **Diversity**: mean pairwise MS-SSIM among samples, and among real test slices matched to the samples'
  slice positions. **Memorisation**: per sample, the highest SSIM to a training slice within
  ``memorisation_position_window`` of its position (the ``memorisation_top_k`` nearest by pixel L2 are
  scored), and the share above ``memorisation_threshold``. **FD**: Fréchet distance between Gaussians fitted
  to the VQ-VAE encoder's spatially pooled pre-quantisation features of samples and of matched test slices
  (with training-vs-test slices as the reference); not comparable to FID.
- **Probe**: logistic regression (standardised inputs, C by grouped stratified CV on AUROC) from each
  training scan's normalised code histogram to a binary attribute, scored by AUROC on test scans; the same
  on each scan's mean downsampled slice as the baseline. Undefined (``null`` with a reason) with one class.
- **Anomaly maps**: one synthetic disc lesion per test slice, score = Gaussian-smoothed |x - recon(x)|,
  pixel-level AUROC over brain pixels.

All randomness (lesions, pair subsets, matched real slices) comes from ``evaluate.seed``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import linalg, ndimage, stats
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize
from sklearn.metrics import roc_auc_score

from brainvq.data import load_shard_rows, shard_chunks, shard_index
from brainvq.files import atomic_path

log = logging.getLogger(__name__)

SSIM_SETTINGS = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}
# skimage's Gaussian window is 2 * int(truncate * sigma + 0.5) + 1 px with truncate = 3.5: 11 px at sigma 1.5.
SSIM_WINDOW_PX = 11
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MAX_WINDOW_PX = 11
FD_LABEL = "FD (VQ-VAE encoder features; not comparable to FID)"
RECONSTRUCTION_METRICS = ("ssim", "ssim_brain", "ms_ssim", "ms_ssim_brain", "psnr_db", "psnr_brain_db", "mse",
                          "mse_brain")


class EvaluationInputError(ValueError):
    """An input of the evaluation (split, shards, codes, samples) is missing, inconsistent or empty."""


class ImageSizeError(ValueError):
    """Two images differ in shape, or an image is too small for a metric."""


class ProbeTargetError(ValueError):
    """``evaluate.probe_target`` cannot be parsed or names a column that cannot give two classes."""


# ------------------------------------------------------------------------------------ image similarity


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape != y.shape or x.ndim != 2:
        raise ImageSizeError(f"expected two 2-D images of one shape, got {x.shape} and {y.shape}")


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Return skimage's SSIM of two [0, 1] images with the project settings (``SSIM_SETTINGS``)."""
    _check_pair(x, y)
    return float(structural_similarity(np.asarray(x, np.float64), np.asarray(y, np.float64), **SSIM_SETTINGS))


def brain_bounding_box(mask: np.ndarray, min_size_px: int) -> tuple[slice, slice]:
    """Return the (rows, cols) slices of ``mask``'s bounding box, grown to at least ``min_size_px`` per axis.

    Growth is symmetric about the box and the box is shifted to stay inside the image; an axis shorter
    than ``min_size_px`` is taken whole.
    """
    if not mask.any():
        raise ValueError("empty mask has no bounding box")
    box = []
    for axis in (0, 1):
        filled = np.flatnonzero(mask.any(axis=1 - axis))
        lo, hi, n = int(filled[0]), int(filled[-1]) + 1, mask.shape[axis]
        size = min(max(hi - lo, min_size_px), n)
        lo = min(max(lo - (size - (hi - lo)) // 2, 0), n - size)
        box.append(slice(lo, lo + size))
    return box[0], box[1]


def brain_masked_ssim(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    """Return the SSIM of ``x`` and ``y`` cropped to ``mask``'s bounding box (see the module docstring).

    NaN for an empty mask.
    """
    _check_pair(x, y)
    if not mask.any():
        return math.nan
    rows, cols = brain_bounding_box(mask, SSIM_WINDOW_PX)
    return ssim(x[rows, cols], y[rows, cols])


def mse_and_psnr_db(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Return (MSE, PSNR in dB with peak 1) over all pixels, or over ``mask``'s pixels (NaN if it is empty)."""
    _check_pair(x, y)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if mask is not None:
        if not mask.any():
            return math.nan, math.nan
        x, y = x[mask], y[mask]
    with np.errstate(divide="ignore"):  # identical images: PSNR is infinite, by definition
        return float(mean_squared_error(x, y)), float(peak_signal_noise_ratio(x, y, data_range=1.0))


def ms_ssim_window_px(height: int, width: int) -> int | None:
    """Return the MS-SSIM Gaussian window for an image size (largest odd <= 11 fitting 5 scales), or None."""
    window = min(MS_SSIM_MAX_WINDOW_PX, min(height, width) // 2 ** (len(MS_SSIM_WEIGHTS) - 1))
    window -= 1 - window % 2
    return window if window >= 3 else None


def _gaussian_window(window_px: int, sigma: float = 1.5):
    import torch

    x = torch.arange(window_px, dtype=torch.float64) - (window_px - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _ssim_and_contrast_structure(x, y, window):
    """Return per-image mean SSIM and mean contrast-structure term over the valid (unpadded) window positions."""
    import torch.nn.functional as F

    c1, c2 = 0.01 ** 2, 0.03 ** 2  # K1, K2 of Wang et al. with a data range of 1
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x ** 2
    var_y = F.conv2d(y * y, window) - mu_y ** 2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return (luminance * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim_batch(x: np.ndarray, y: np.ndarray, window_px: int) -> np.ndarray:
    """Return the MS-SSIM of each pair ``x[i], y[i]`` (``(N, H, W)`` in [0, 1]) as an ``(N,)`` array.

    Wang et al. 2003 with ``MS_SSIM_WEIGHTS``: contrast-structure at the four finer scales, full SSIM at the
    coarsest, 2x2 average pooling between scales, a Gaussian window of sigma 1.5; negative terms clipped to 0.
    Written out in torch (float64) so the workflow needs no extra package; tests check it against MONAI's
    ``compute_ms_ssim``.
    """
    import torch
    import torch.nn.functional as F

    if x.shape != y.shape or x.ndim != 3:
        raise ImageSizeError(f"expected two (N, H, W) stacks of one shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:]) < 2 ** (len(MS_SSIM_WEIGHTS) - 1) * window_px:
        raise ImageSizeError(f"images of {x.shape[1:]} px are too small for 5-scale MS-SSIM with a {window_px} px "
                             "window; use ms_ssim_window_px to choose the window")
    window = _gaussian_window(window_px)
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64)
    values = []
    with torch.no_grad():
        for start in range(0, len(x), 256):  # bounded memory for whole shards
            a = torch.as_tensor(np.asarray(x[start:start + 256], np.float64))[:, None]
            b = torch.as_tensor(np.asarray(y[start:start + 256], np.float64))[:, None]
            terms = []
            for scale in range(len(MS_SSIM_WEIGHTS)):
                full, cs = _ssim_and_contrast_structure(a, b, window)
                terms.append(torch.relu(full if scale == len(MS_SSIM_WEIGHTS) - 1 else cs))
                a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
            values.append(torch.prod(torch.stack(terms) ** weights[:, None], dim=0).numpy())
    return np.concatenate(values) if values else np.zeros(0)


def brain_masked_ms_ssim(x: np.ndarray, y: np.ndarray, mask: np.ndarray, window_px: int) -> float:
    """Return the MS-SSIM of ``x`` and ``y`` cropped to ``mask``'s bounding box grown to 16 windows per side."""
    if not mask.any():
        return math.nan
    rows, cols = brain_bounding_box(mask, 2 ** (len(MS_SSIM_WEIGHTS) - 1) * window_px)
    return float(ms_ssim_batch(x[None, rows, cols], y[None, rows, cols], window_px)[0])


def reconstruction_metric_table(originals: np.ndarray, reconstructions: np.ndarray, masks: np.ndarray) -> pd.DataFrame:
    """Return one row per slice with every metric of ``RECONSTRUCTION_METRICS`` (MS-SSIM NaN when too small).

    Args:
        originals, reconstructions: ``(N, H, W)`` in [0, 1].
        masks: ``(N, H, W)`` bool brain masks.
    """
    if not originals.shape == reconstructions.shape == masks.shape:
        raise ImageSizeError(f"originals {originals.shape}, reconstructions {reconstructions.shape} and masks "
                             f"{masks.shape} must have one shape")
    window = ms_ssim_window_px(*originals.shape[1:])
    ms_full = (ms_ssim_batch(originals, reconstructions, window) if window
               else np.full(len(originals), np.nan))
    rows = []
    for x, y, mask, ms in zip(originals, reconstructions, masks.astype(bool), ms_full):
        mse, psnr = mse_and_psnr_db(x, y)
        mse_brain, psnr_brain = mse_and_psnr_db(x, y, mask)
        rows.append({
            "ssim": ssim(x, y), "ssim_brain": brain_masked_ssim(x, y, mask),
            "ms_ssim": float(ms), "ms_ssim_brain": brain_masked_ms_ssim(x, y, mask, window) if window else math.nan,
            "psnr_db": psnr, "psnr_brain_db": psnr_brain, "mse": mse, "mse_brain": mse_brain,
        })
    return pd.DataFrame(rows, columns=list(RECONSTRUCTION_METRICS))


def summary_statistics(values) -> dict:
    """Return ``{"mean", "median", "p5", "n"}`` of ``values``, ignoring NaN (all None when nothing is left)."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": None, "median": None, "p5": None, "n": 0}
    with np.errstate(invalid="ignore"):  # inf - inf inside percentile interpolation
        return {"mean": float(np.mean(values)), "median": float(np.median(values)),
                "p5": float(np.percentile(values, 5)), "n": int(values.size)}


def per_subject_table(per_slice: pd.DataFrame) -> pd.DataFrame:
    """Return per-scan means of the slice metrics (``scan, subject, n_slices`` + metrics), sorted by scan."""
    metrics = [m for m in RECONSTRUCTION_METRICS if m in per_slice.columns]
    grouped = per_slice.groupby(["scan", "subject"], sort=True)
    table = grouped[metrics].mean().reset_index()
    table.insert(2, "n_slices", grouped.size().to_numpy())
    return table


def reconstruction_summary(per_slice: pd.DataFrame, per_subject: pd.DataFrame) -> dict:
    """Return, per metric, its summary statistics over slices and over subjects (scans)."""
    return {metric: {"over_slices": summary_statistics(per_slice[metric]),
                     "over_subjects": summary_statistics(per_subject[metric])}
            for metric in RECONSTRUCTION_METRICS}


# -------------------------------------------------------------------------------------------- codebook


def code_counts(code_maps: Iterable[np.ndarray], codebook_size: int) -> np.ndarray:
    """Return how often each of ``codebook_size`` codes occurs in ``code_maps`` (``(K,)`` int64)."""
    counts = np.zeros(codebook_size, np.int64)
    for codes in code_maps:
        codes = np.asarray(codes).ravel()
        if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
            raise EvaluationInputError(f"code maps hold values outside [0, {codebook_size}); the codes were not "
                                       "written by this VQ-VAE — re-run the quantize rule")
        counts += np.bincount(codes.astype(np.int64), minlength=codebook_size)
    return counts


def codebook_usage(counts: np.ndarray) -> dict:
    """Return ``codebook_size``, ``codes_used``, ``usage_fraction`` and ``perplexity`` (exp of the usage entropy)."""
    counts = np.asarray(counts, np.float64)
    used = int((counts > 0).sum())
    perplexity = float(np.exp(stats.entropy(counts))) if counts.sum() > 0 else None
    return {"codebook_size": int(counts.size), "codes_used": used, "usage_fraction": used / counts.size,
            "perplexity": perplexity}


# ------------------------------------------------------------------------------------------ generation


def mean_pairwise_ms_ssim(images: np.ndarray, max_pairs: int, seed: int, batch_size: int = 256) -> float | None:
    """Return the mean MS-SSIM over pairs of ``images`` (all pairs, or ``max_pairs`` drawn without replacement).

    Lower means more diverse. None with fewer than two images or images too small for MS-SSIM.
    """
    window = ms_ssim_window_px(*images.shape[1:])
    pairs = np.array(list(itertools.combinations(range(len(images)), 2)), dtype=np.int64).reshape(-1, 2)
    if window is None or len(pairs) == 0:
        return None
    if len(pairs) > max_pairs:
        pairs = pairs[np.sort(np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False))]
    values = [ms_ssim_batch(images[chunk[:, 0]], images[chunk[:, 1]], window)
              for chunk in np.array_split(pairs, math.ceil(len(pairs) / batch_size))]
    return float(np.mean(np.concatenate(values)))


def matched_real_indices(sample_positions: np.ndarray, real_positions: np.ndarray, window: float,
                         seed: int) -> np.ndarray:
    """Return, per sample, a real slice at a similar position (within ``window``, else the nearest).

    Draws at random among the candidates and avoids reusing a real slice while unused candidates remain.
    """
    real_positions = np.asarray(real_positions, np.float64)
    if real_positions.size == 0:
        raise EvaluationInputError("no real slices to match samples against")
    rng = np.random.default_rng(seed)
    used = np.zeros(real_positions.size, bool)
    chosen = []
    for position in np.asarray(sample_positions, np.float64):
        distance = np.abs(real_positions - position)
        candidates = np.flatnonzero(distance <= max(window, distance.min()))
        fresh = candidates[~used[candidates]]
        pick = int(rng.choice(fresh if fresh.size else candidates))
        used[pick] = True
        chosen.append(pick)
    return np.asarray(chosen, np.int64)


def highest_ssim_to_references(samples: np.ndarray, sample_positions: np.ndarray,
                               references: Iterable[tuple[np.ndarray, np.ndarray]], window: float | np.ndarray,
                               top_k: int) -> np.ndarray:
    """Return, per sample, the highest SSIM to any reference slice within ``window`` (scalar or per sample)
    of its position.

    References stream in chunks ``(images (M, H, W), positions (M,))``. The ``top_k`` nearest references
    by pixel L2 distance are kept per sample and scored with ``ssim``; an exact copy is always the nearest.
    NaN for a sample with no reference in its window.
    """
    samples = np.asarray(samples, np.float32)
    n, pixels = len(samples), samples[0].size if len(samples) else 0
    flat = samples.reshape(n, pixels).astype(np.float64)
    best_distance = np.full((n, top_k), np.inf)
    best_images = np.zeros((n, top_k) + samples.shape[1:], np.float32)
    for images, positions in references:
        images = np.asarray(images, np.float32)
        ref = images.reshape(len(images), pixels).astype(np.float64)
        distance = (flat ** 2).sum(1)[:, None] + (ref ** 2).sum(1)[None] - 2 * flat @ ref.T
        far = np.abs(np.asarray(sample_positions)[:, None] - np.asarray(positions)[None]) > np.reshape(window, (-1, 1))
        distance[far] = np.inf
        merged = np.concatenate([best_distance, distance], axis=1)
        keep = np.argsort(merged, axis=1, kind="stable")[:, :top_k]
        for i in range(n):
            old, new = keep[i][keep[i] < top_k], keep[i][keep[i] >= top_k] - top_k
            best_images[i] = np.concatenate([best_images[i, old], images[new]])
            best_distance[i] = np.concatenate([best_distance[i, old], distance[i, new]])
    highest = np.full(n, np.nan)
    for i in range(n):
        scores = [ssim(samples[i], best_images[i, k]) for k in range(top_k) if np.isfinite(best_distance[i, k])]
        if scores:
            highest[i] = max(scores)
    return highest


def memorisation_summary(highest_ssim: np.ndarray, threshold: float) -> dict:
    """Return the share of samples whose highest SSIM to a training slice exceeds ``threshold``, with context."""
    scored = highest_ssim[~np.isnan(highest_ssim)]
    return {
        "threshold": threshold,
        "share_above_threshold": float((scored > threshold).mean()) if scored.size else None,
        "n_above_threshold": int((scored > threshold).sum()),
        "highest_ssim": summary_statistics(scored),
        "n_samples": int(highest_ssim.size),
        "n_without_candidates": int(np.isnan(highest_ssim).sum()),
    }


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Return the Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets (scipy sqrtm)."""
    if min(len(features_a), len(features_b)) < 2:
        raise EvaluationInputError("the Fréchet distance needs at least two feature vectors per set")
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: the usual remedy is a tiny ridge on both covariances
        ridge = 1e-6 * np.eye(cov_a.shape[0])
        root = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


# ------------------------------------------------------------------------------------- representation probe


@dataclass(frozen=True)
class ProbeTarget:
    """A binary probe target: ``column`` itself (two values), or ``column > threshold`` (a number or "median")."""

    column: str
    threshold: float | str | None = None

    def describe(self) -> str:
        """Return the rule as written in the config, e.g. ``atrophy>median``."""
        return self.column if self.threshold is None else f"{self.column}>{self.threshold}"


_PROBE_RULE = re.compile(r"^\s*(?P<column>[A-Za-z_][A-Za-z0-9_]*)\s*(?:>\s*(?P<threshold>median|[-+]?\d+(?:\.\d*)?)\s*)?$")


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


def probe_target_spec(evaluate_config: dict, source: str) -> str:
    """Return the probe rule: ``evaluate.probe_target``, else the dataset default ``probe_target_by_source``."""
    return evaluate_config["probe_target"] or evaluate_config["probe_target_by_source"][source]


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


def code_histogram_features(code_maps: np.ndarray, codebook_size: int) -> np.ndarray:
    """Return the normalised code-usage histogram ``(K,)`` of one scan's code maps."""
    counts = code_counts([code_maps], codebook_size).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def downsampled_mean_slice(images: np.ndarray, size_px: int) -> np.ndarray:
    """Return the mean of a scan's slices after anti-aliased downsampling to ``size_px`` square, flattened."""
    small = resize(np.asarray(images, np.float32), (len(images), size_px, size_px), anti_aliasing=True,
                   preserve_range=True)
    return small.mean(0).ravel()


def probe_auroc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                groups_train: np.ndarray, cv_folds: int, n_cs: int, seed: int) -> dict:
    """Fit a standardised logistic regression (C chosen by grouped, stratified CV on AUROC) and score the test set.

    Returns:
        ``{"auroc", "reason", "C", "n_train", "n_test", "n_test_positive"}``; ``auroc`` is None, with the
        ``reason``, when either set has a single class or a class has too few training subjects.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    result = {"auroc": None, "reason": None, "C": None, "n_train": int(len(y_train)), "n_test": int(len(y_test)),
              "n_test_positive": int(np.sum(y_test == 1))}
    groups_per_class = [len(set(np.asarray(groups_train)[y_train == c])) for c in (0, 1)]
    folds = min(cv_folds, *groups_per_class)
    if folds < 2:
        result["reason"] = (f"training set has {groups_per_class[0]} negative and {groups_per_class[1]} positive "
                            "subjects; at least 2 of each are needed to choose C by cross-validation")
        return result
    if len(set(y_test.tolist())) < 2:
        result["reason"] = (f"all {len(y_test)} test scans have label {int(y_test[0]) if len(y_test) else 'none'}; "
                            "AUROC is undefined with one class")
        return result
    splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
        x_train, y_train, groups_train))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=n_cs, cv=splits, scoring="roc_auc", l1_ratios=(0.0,), max_iter=2000, use_legacy_attributes=False))
    try:
        model.fit(x_train, y_train)
    except ValueError as error:  # e.g. a fold left with one class: report it rather than lose every other metric
        log.warning("probe fit failed: %s", error)
        result["reason"] = f"the classifier could not be fitted: {error}"
        return result
    result["auroc"] = float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))
    result["C"] = float(model[-1].C_)
    return result


# --------------------------------------------------------------------------------------------- anomaly


def insert_synthetic_lesions(images: np.ndarray, masks: np.ndarray, seed: int, radius_fraction: tuple[float, float],
                             amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (lesioned images, lesion masks): one soft-edged disc per slice, inside the brain mask.

    Even-numbered slices get a bright lesion (+``amplitude``), odd ones a dark one; the disc radius is drawn
    from ``radius_fraction`` times the image side and its centre from brain pixels at least that far from
    the mask edge (the deepest brain pixel when none is). Values stay clipped to [0, 1].
    """
    rng = np.random.default_rng(seed)
    lesioned = np.array(images, np.float32, copy=True)
    lesions = np.zeros(images.shape, bool)
    yy, xx = np.mgrid[0:images.shape[1], 0:images.shape[2]]
    for i, mask in enumerate(np.asarray(masks, bool)):
        if not mask.any():
            continue
        radius = rng.uniform(*radius_fraction) * min(images.shape[1:])
        depth = ndimage.distance_transform_edt(mask)
        centres = np.argwhere(depth >= radius)
        cy, cx = centres[rng.integers(len(centres))] if len(centres) else np.unravel_index(depth.argmax(), mask.shape)
        distance = np.hypot(yy - cy, xx - cx)
        weight = np.clip(radius + 0.5 - distance, 0, 1) * mask
        sign = 1.0 if i % 2 == 0 else -1.0
        lesioned[i] = np.clip(lesioned[i] + sign * amplitude * weight, 0, 1)
        lesions[i] = (distance <= radius) & mask
    return lesioned, lesions


def anomaly_score_maps(images: np.ndarray, reconstructions: np.ndarray, sigma_px: float) -> np.ndarray:
    """Return |image - reconstruction| smoothed in-plane by a Gaussian of ``sigma_px``, per slice."""
    error = np.abs(np.asarray(images, np.float32) - np.asarray(reconstructions, np.float32))
    return ndimage.gaussian_filter(error, sigma=(0, sigma_px, sigma_px))


def pixel_auroc(scores: np.ndarray, lesions: np.ndarray, brain_masks: np.ndarray) -> float | None:
    """Return the AUROC of ``scores`` for lesion pixels among brain pixels (None without both classes)."""
    inside = np.asarray(brain_masks, bool)
    truth = np.asarray(lesions, bool)[inside]
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, np.asarray(scores)[inside]))


# ------------------------------------------------------------------------------------------ run inputs


@dataclass
class EvaluationInputs:
    """The files ``evaluate`` reads (see docs/architecture.md)."""

    split_csv: Path
    shards_dir: Path
    codes_dir: Path
    samples: Path


@dataclass
class PriorScorer:
    """The prior's scoring functions (``brainvq.prior``), bound to a loaded model by the caller.

    Attributes:
        bits_per_code: ``(codes (N,h,w), positions (N,), labels (N,)) -> float``, the test NLL in bits per code.
        uniform_bits: ``K -> float``.
        unigram_bits: ``(train_codes, test_codes, K) -> float``.
        labels: code-index rows (``codes/index.csv``) -> the prior's conditioning labels ``(N,)``.
    """

    bits_per_code: Callable[[np.ndarray, np.ndarray, np.ndarray], float]
    uniform_bits: Callable[[int], float]
    unigram_bits: Callable[[np.ndarray, np.ndarray, int], float]
    labels: Callable[[pd.DataFrame], np.ndarray]


@dataclass
class EvaluationResult:
    """What ``evaluate`` writes: the metrics dict, the per-slice and per-subject tables, figure arrays."""

    metrics: dict
    per_slice: pd.DataFrame
    per_subject: pd.DataFrame
    figures: dict = field(default_factory=dict)


def prior_scorer(prior_model, split_df: pd.DataFrame) -> PriorScorer:
    """Return the PriorScorer of a model from ``brainvq.prior.load_prior``; labels come from split.csv's
    column named by the prior's ``condition_label`` (none for an unconditioned prior)."""
    from brainvq import prior as prior_lib

    column = getattr(prior_model, "condition_label", None)
    by_scan = prior_lib.scan_labels(split_df, column) if column else {}
    return PriorScorer(
        bits_per_code=lambda codes, positions, labels: prior_lib.bits_per_code(prior_model, codes, positions, labels),
        uniform_bits=prior_lib.uniform_bits,
        unigram_bits=prior_lib.unigram_bits,
        labels=lambda rows: [by_scan[scan] for scan in rows["scan"]] if column else None,
    )


def read_samples(path: str | Path) -> dict:
    """Return samples.h5 as arrays: ``codes, images, slice_position, label``.

    Raises:
        EvaluationInputError: when the file or one of its datasets is missing, or it holds no samples.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("codes", "images", "slice_position", "label") if k not in f]
            if missing:
                raise EvaluationInputError(f"{path} lacks datasets {missing}; re-run the sample rule")
            samples = {k: f[k][()] for k in ("codes", "images", "slice_position", "label")}
    except OSError as error:
        raise EvaluationInputError(f"cannot read {path}: {error}; re-run the sample rule") from error
    if len(samples["images"]) == 0:
        raise EvaluationInputError(f"{path} holds no samples; raise sample.n and re-run the sample rule")
    samples["images"] = samples["images"].astype(np.float32)
    return samples


def code_maps_by_scan(codes_dir: str | Path, index: pd.DataFrame) -> dict[str, np.ndarray]:
    """Return each scan's code maps ``(n_slices, h, w)`` listed in ``index`` (codes/index.csv rows), in ``row`` order."""
    from brainvq.prior import load_code_rows

    index = index.sort_values(["scan", "row"], ignore_index=True)
    codes = load_code_rows(codes_dir, index)
    return {scan: codes[rows.to_numpy()] for scan, rows in index.groupby("scan", sort=True).groups.items()}


# ------------------------------------------------------------------------------------------ run pieces


def _torch_batches(array: np.ndarray, batch_size: int):
    for start in range(0, len(array), batch_size):
        yield start, array[start:start + batch_size]


def model_outputs(model, images: np.ndarray, device, batch_size: int, what: str) -> np.ndarray:
    """Return the VQ-VAE's reconstructions ``(N, H, W)`` clipped to [0, 1] (``what="reconstruction"``),
    or its spatially pooled pre-quantisation features ``(N, C)`` (``what="features"``)."""
    import torch

    chunks = []
    with torch.no_grad():
        for _, batch in _torch_batches(np.asarray(images, np.float32), batch_size):
            x = torch.as_tensor(batch, device=device)[:, None]
            if what == "reconstruction":
                reconstruction, _ = model(x)
                chunks.append(reconstruction.float().clamp(0, 1)[:, 0].cpu().numpy())
            else:
                features = model.encode_features(x).float()
                chunks.append((features.mean(dim=tuple(range(2, features.ndim))) if features.ndim > 2
                               else features).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0,) + np.shape(images)[1:], np.float32)


def reconstruction_pass(model, test_paths: list[Path], device, batch_size: int,
                        feature_rows: set[int]) -> tuple[pd.DataFrame, dict, dict]:
    """Reconstruct every test slice; return (per-slice table, mid-slice examples per scan, selected rows).

    ``feature_rows`` are global test-row numbers whose image and mask are kept (for matching and lesions).
    """
    tables, examples, kept = [], {}, {"row": [], "images": [], "masks": []}
    offset = 0
    for chunk in shard_chunks(test_paths):
        recon = model_outputs(model, chunk["images"], device, batch_size, "reconstruction")
        table = reconstruction_metric_table(chunk["images"], recon, chunk["masks"])
        table.insert(0, "scan", chunk["scan"])
        table.insert(1, "subject", chunk["subject"])
        table.insert(2, "slice_index", chunk["slice_index"])
        table.insert(3, "slice_position", chunk["slice_position"])
        tables.append(table)
        for scan in np.unique(chunk["scan"]):
            rows = np.flatnonzero(chunk["scan"] == scan)
            mid = rows[np.argmin(np.abs(chunk["slice_position"][rows] - 0.5))]
            gap = abs(float(chunk["slice_position"][mid]) - 0.5)
            if scan not in examples or gap < examples[scan]["gap"]:
                examples[scan] = {"gap": gap, "original": chunk["images"][mid], "reconstruction": recon[mid],
                                  "mask": chunk["masks"][mid], "position": float(chunk["slice_position"][mid])}
        for row in range(len(chunk["images"])):
            if offset + row in feature_rows:
                kept["row"].append(offset + row)
                kept["images"].append(chunk["images"][row])
                kept["masks"].append(chunk["masks"][row])
        offset += len(chunk["images"])
    kept = {k: np.asarray(v) for k, v in kept.items()}
    return pd.concat(tables, ignore_index=True), examples, kept


def example_triplets(per_subject: pd.DataFrame, examples: dict) -> dict:
    """Return figure arrays for the best, median and worst test scans by mean brain-masked SSIM."""
    ranked = per_subject.sort_values("ssim_brain", ascending=False, ignore_index=True)
    picks = {"best": 0, "median": (len(ranked) - 1) // 2, "worst": len(ranked) - 1}
    chosen = [(label, ranked.loc[i]) for label, i in picks.items()]
    original = np.stack([examples[row["scan"]]["original"] for _, row in chosen])
    recon = np.stack([examples[row["scan"]]["reconstruction"] for _, row in chosen])
    return {
        "examples_label": np.array([label for label, _ in chosen]),
        "examples_scan": np.array([row["scan"] for _, row in chosen]),
        "examples_ssim_brain": np.array([row["ssim_brain"] for _, row in chosen], np.float64),
        "examples_position": np.array([examples[row["scan"]]["position"] for _, row in chosen], np.float64),
        "examples_original": original, "examples_reconstruction": recon,
        "examples_error": np.abs(original - recon),
        "examples_mask": np.stack([examples[row["scan"]]["mask"] for _, row in chosen]),
    }


def prior_evaluation(prior: PriorScorer, test_index: pd.DataFrame, test_codes: np.ndarray, train_codes: np.ndarray,
                     codebook_size: int) -> dict:
    """Return the prior's test NLL in bits per code next to the uniform and unigram baselines."""
    bits = prior.bits_per_code(test_codes, test_index["slice_position"].to_numpy(np.float32), prior.labels(test_index))
    return {"bits_per_code": float(bits), "uniform_bits_per_code": float(prior.uniform_bits(codebook_size)),
            "unigram_bits_per_code": float(prior.unigram_bits(train_codes, test_codes, codebook_size)),
            "n_test_maps": int(len(test_codes))}


def generation_evaluation(samples: dict, train_paths: list[Path], real_images: np.ndarray,
                          real_features: np.ndarray, sample_features: np.ndarray,
                          train_reference_features: np.ndarray | None, settings: dict) -> tuple[dict, np.ndarray]:
    """Return generation metrics and each sample's highest SSIM to a training slice.

    Args:
        samples: ``read_samples`` output.
        train_paths: training shards (memorisation candidates).
        real_images, real_features: test slices matched in position to the samples, and their features.
        sample_features: the samples' pooled VQ-VAE encoder features.
        train_reference_features: features of training slices matched in position (the FD reference), or None.
        settings: the ``evaluate`` config section.
    """
    seed = settings["seed"]
    train_positions = shard_index(train_paths)["slice_position"].to_numpy(np.float64)
    # Sparse positions (few slices per scan): widen a sample's window to its nearest training slice.
    nearest = np.abs(samples["slice_position"][:, None] - train_positions[None]).min(axis=1)
    windows = np.maximum(settings["memorisation_position_window"], nearest + 1e-6)
    references = ((c["images"], c["slice_position"]) for c in shard_chunks(train_paths, with_masks=False))
    highest = highest_ssim_to_references(samples["images"], samples["slice_position"], references, windows,
                                         settings["memorisation_top_k"])
    metrics = {
        "n_samples": int(len(samples["images"])),
        "diversity": {
            "samples_mean_pairwise_ms_ssim": mean_pairwise_ms_ssim(samples["images"], settings["diversity_max_pairs"],
                                                                   seed),
            "real_mean_pairwise_ms_ssim": mean_pairwise_ms_ssim(real_images, settings["diversity_max_pairs"], seed),
        },
        "memorisation": memorisation_summary(highest, settings["memorisation_threshold"]),
        "frechet_distance": {"label": FD_LABEL, "samples_vs_test": None, "train_vs_test": None,
                             "n": int(len(sample_features))},
    }
    if len(sample_features) >= 2:
        metrics["frechet_distance"]["samples_vs_test"] = frechet_distance(sample_features, real_features)
        if train_reference_features is not None:
            metrics["frechet_distance"]["train_vs_test"] = frechet_distance(train_reference_features, real_features)
    return metrics, highest


def samples_next_to_real(samples: dict, real_images: np.ndarray, real_positions: np.ndarray,
                         positions: list[float] | None, per_position: int) -> dict:
    """Return figure arrays: at each requested position the nearest samples and their matched real slices.

    ``positions`` None takes the samples' distinct positions (at most 6, evenly chosen).
    """
    if positions is None:
        distinct = np.unique(samples["slice_position"])
        positions = distinct[np.unique(np.linspace(0, len(distinct) - 1, min(6, len(distinct))).round().astype(int))]
    per_position = min(per_position, len(samples["images"]))
    order = np.argsort(np.abs(samples["slice_position"][None] - np.asarray(positions)[:, None]), axis=1,
                       kind="stable")[:, :per_position]
    return {"samples_images": samples["images"][order], "samples_positions": samples["slice_position"][order],
            "real_images": real_images[order], "real_positions": real_positions[order],
            "requested_positions": np.asarray(positions, np.float64)}


def anomaly_evaluation(model, images: np.ndarray, masks: np.ndarray, device, settings: dict) -> tuple[dict, dict]:
    """Insert lesions into ``images``, reconstruct, and return (metrics, example arrays)."""
    size = min(images.shape[1:])
    lesioned, lesions = insert_synthetic_lesions(images, masks, settings["seed"],
                                                 tuple(settings["anomaly_radius_fraction"]),
                                                 settings["anomaly_amplitude"])
    recon = model_outputs(model, lesioned, device, settings["batch_size"], "reconstruction")
    sigma_px = settings["anomaly_smoothing_fraction"] * size
    scores = anomaly_score_maps(lesioned, recon, sigma_px)
    auroc = pixel_auroc(scores, lesions, masks)
    n = min(settings["anomaly_examples"], len(images))
    metrics = {"pixel_auroc": auroc, "reason": None if auroc is not None else "no lesion or no healthy brain pixels",
               "n_slices": int(len(images)), "smoothing_sigma_px": float(sigma_px),
               "amplitude": settings["anomaly_amplitude"],
               "lesion_pixel_share": float(lesions[masks].mean()) if masks.any() else None}
    figures = {"anomaly_image": images[:n], "anomaly_lesioned": lesioned[:n], "anomaly_reconstruction": recon[:n],
               "anomaly_score": scores[:n], "anomaly_lesion": lesions[:n], "anomaly_mask": masks[:n]}
    return metrics, figures


def probe_evaluation(split_df: pd.DataFrame, codes: Mapping[str, np.ndarray], image_features: Mapping[str, np.ndarray],
                     codebook_size: int, spec: str, settings: dict) -> dict:
    """Return the probe's target and AUROC from code histograms and from downsampled images."""
    target = parse_probe_target(spec)
    table = split_df[split_df["scan"].isin(set(codes) & set(image_features))].reset_index(drop=True)
    labels, meaning = binary_probe_labels(table, target, (table["split"] == "train").to_numpy())
    table = table.assign(label=labels.to_numpy()).dropna(subset=["label"])
    result = {"target": target.describe(), "meaning": meaning,
              "n_scans_without_label": int(labels.isna().sum())}
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    for name, features in (("codes", {s: code_histogram_features(codes[s], codebook_size) for s in table["scan"]}),
                           ("raw_images", image_features)):
        result[name] = probe_auroc(
            np.stack([features[s] for s in train["scan"]]) if len(train) else np.zeros((0, 1)),
            train["label"].to_numpy(int), np.stack([features[s] for s in test["scan"]]) if len(test) else np.zeros((0, 1)),
            test["label"].to_numpy(int), train["subject"].to_numpy(), settings["probe_cv_folds"],
            settings["probe_n_cs"], settings["seed"])
    return result


def scan_image_features(paths: list[Path], size_px: int) -> dict[str, np.ndarray]:
    """Return each scan's mean downsampled slice (the raw-image probe features), streaming the shards."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for chunk in shard_chunks(paths, with_masks=False):
        for scan in np.unique(chunk["scan"]):
            rows = chunk["scan"] == scan
            feature = downsampled_mean_slice(chunk["images"][rows], size_px) * rows.sum()
            sums[scan] = sums.get(scan, 0) + feature
            counts[scan] = counts.get(scan, 0) + int(rows.sum())
    return {scan: sums[scan] / counts[scan] for scan in sums}


def evaluate_run(inputs: EvaluationInputs, model, prior: PriorScorer, codebook_size: int, settings: dict,
                 source: str, device) -> EvaluationResult:
    """Evaluate a trained run on its test subjects.

    Args:
        inputs: the run's files.
        model: the loaded VQ-VAE (``model(x) -> (reconstruction, aux)``, ``model.encode_features(x)``).
        prior: the loaded prior's scoring functions.
        codebook_size: K of the VQ-VAE.
        settings: the validated ``evaluate`` config section.
        source: ``dataset.source`` (chooses the default probe target).
        device: torch device the models live on.
    """
    from brainvq.data import read_split, shard_paths

    split_df = read_split(inputs.split_csv)
    test_paths, train_paths = shard_paths(inputs.shards_dir, "test"), shard_paths(inputs.shards_dir, "train")
    model.eval()
    samples = read_samples(inputs.samples)
    rng_seed = settings["seed"]

    # Pick the test rows that pair with samples, and the rows that get lesions, from metadata alone.
    test_meta = shard_index(test_paths)
    matched = matched_real_indices(samples["slice_position"], test_meta["slice_position"].to_numpy(),
                                   settings["match_position_window"], rng_seed)
    central = np.flatnonzero(np.abs(test_meta["slice_position"].to_numpy() - 0.5) <= 0.25)
    central = central if central.size else np.arange(len(test_meta))
    lesion_rows = np.sort(np.random.default_rng(rng_seed).choice(
        central, min(settings["anomaly_n_slices"], central.size), replace=False))

    log.info("reconstructing %d test slices", len(test_meta))
    per_slice, examples, kept = reconstruction_pass(model, test_paths, device, settings["batch_size"],
                                                    set(matched.tolist()) | set(lesion_rows.tolist()))
    per_subject = per_subject_table(per_slice)
    where = {row: k for k, row in enumerate(kept["row"])}
    real_images = kept["images"][[where[r] for r in matched]]
    lesion_images = kept["images"][[where[r] for r in lesion_rows]]
    lesion_masks = kept["masks"][[where[r] for r in lesion_rows]]

    log.info("codebook and prior")
    from brainvq.prior import read_code_index

    index = read_code_index(inputs.codes_dir)
    codes = code_maps_by_scan(inputs.codes_dir, index)
    test_index = index[index["split"] == "test"].sort_values(["scan", "row"], ignore_index=True)
    train_index = index[index["split"] == "train"].sort_values(["scan", "row"], ignore_index=True)
    if test_index.empty:
        raise EvaluationInputError(f"{inputs.codes_dir}/index.csv lists no test codes; re-run the quantize rule")
    test_codes = np.concatenate([codes[s] for s in sorted(set(test_index["scan"]))])
    train_codes = np.concatenate([codes[s] for s in sorted(set(train_index["scan"]))])
    counts = code_counts([test_codes], codebook_size)
    prior_metrics = prior_evaluation(prior, test_index, test_codes, train_codes, codebook_size)

    log.info("generation metrics on %d samples", len(samples["images"]))
    sample_features = model_outputs(model, samples["images"], device, settings["batch_size"], "features")
    real_features = model_outputs(model, real_images, device, settings["batch_size"], "features")
    train_reference = _matched_training_images(train_paths, samples["slice_position"], settings)
    train_features = (model_outputs(model, train_reference, device, settings["batch_size"], "features")
                      if len(train_reference) >= 2 else None)
    generation, highest = generation_evaluation(samples, train_paths, real_images, real_features, sample_features,
                                                train_features, settings)

    log.info("representation probe and anomaly maps")
    image_features = scan_image_features(train_paths + test_paths, settings["probe_downsample_px"])
    probe = probe_evaluation(split_df, codes, image_features, codebook_size, probe_target_spec(settings, source),
                             settings)
    anomaly, anomaly_figures = anomaly_evaluation(model, lesion_images, lesion_masks, device, settings)

    metrics = {
        "n_test_scans": int(per_subject["scan"].nunique()), "n_test_subjects": int(per_subject["subject"].nunique()),
        "n_test_slices": int(len(per_slice)),
        "reconstruction": reconstruction_summary(per_slice, per_subject),
        "ms_ssim_window_px": ms_ssim_window_px(*samples["images"].shape[1:]),
        "codebook": codebook_usage(counts),
        "prior": prior_metrics,
        "generation": generation,
        "probe": probe,
        "anomaly": anomaly,
    }
    figures = {**example_triplets(per_subject, examples), "codebook_counts": counts,
               **samples_next_to_real(samples, real_images, test_meta["slice_position"].to_numpy()[matched],
                                      settings["figure_positions"], settings["samples_per_position"]),
               **anomaly_figures, "memorisation_highest_ssim": highest}
    return EvaluationResult(metrics, per_slice, per_subject, figures)


def _matched_training_images(train_paths: list[Path], sample_positions: np.ndarray, settings: dict) -> np.ndarray:
    """Return training slices matched in position to the samples (the real-vs-real FD reference)."""
    meta = shard_index(train_paths)
    picks = matched_real_indices(sample_positions, meta["slice_position"].to_numpy(), settings["match_position_window"],
                                 settings["seed"] + 1)
    return load_shard_rows(train_paths, meta.iloc[picks])


# ---------------------------------------------------------------------------------------------- output


EVALUATION_PACKAGES = ("numpy", "scipy", "pandas", "scikit-image", "scikit-learn", "h5py", "torch")


def software_versions(packages=EVALUATION_PACKAGES) -> dict:
    """Return the Python version, installed versions of ``packages`` and the CUDA device (None on the CPU)."""
    import torch

    from brainvq.workflow import package_versions

    versions = package_versions(packages)

    versions["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return versions


def json_ready(value):
    """Return ``value`` with numpy scalars/arrays made plain and NaN/inf replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_evaluation(result: EvaluationResult, metrics_json: str | Path, per_subject_csv: str | Path,
                     per_slice_csv: str | Path, figures_npz: str | Path) -> None:
    """Write the four evaluation outputs, each under a temporary name renamed into place when complete."""
    def atomic(path, write):
        with atomic_path(path, Path(path).suffix) as tmp:
            write(tmp)

    atomic(per_slice_csv, lambda p: result.per_slice.to_csv(p, index=False))
    atomic(per_subject_csv, lambda p: result.per_subject.to_csv(p, index=False))
    atomic(figures_npz, lambda p: np.savez_compressed(p, **result.figures))
    atomic(metrics_json, lambda p: Path(p).write_text(
        json.dumps(json_ready(result.metrics), indent=2, allow_nan=False) + "\n"))
