"""Anomaly maps: synthetic lesions, score maps from a reconstruction, and pixel-level AUROC.

One synthetic disc lesion per slice, inside the brain mask; score = Gaussian-smoothed |x - recon(x)|;
pixel AUROC of the score for lesion pixels among brain pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score


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
