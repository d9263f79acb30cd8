"""Memorisation: per sample, the highest SSIM to a reference (training) slice at a similar axial position.

The ``top_k`` references nearest by pixel L2 distance within the position window are scored with SSIM (an exact
copy is always the nearest); a sample counts as memorised when that highest SSIM exceeds a threshold.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from brainvq.measures.similarity import ssim
from brainvq.measures.statistics import summary_statistics


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
