"""Anomaly detection: synthetic lesions, the score maps of each method, and pixel-level detection scores.

- **Lesions**: one soft-edged disc per slice, inside the brain mask, bright or dark, of a size class. Its contrast
  is relative to the surrounding tissue: with ``t`` the mean intensity of the brain pixels within two radii of
  the centre and ``c`` the contrast, a pixel of intensity ``x`` moves by ``± c * t * room(x) / room(t)``, where
  ``room`` is the distance to 1 (bright) or to 0 (dark). At the surrounding tissue's own intensity the change is
  exactly ``c * t``; a pixel never reaches 0 or 1 unless it already was there, so nothing is clipped and no
  lesion can be told apart by saturation. When ``c * t`` exceeds ``room(t)`` the contrast is lowered until the
  step is ``max_step`` of the room, and the lesion records the contrast it got.
- **Score maps** (every method's map is smoothed by the same in-plane Gaussian): ``|x - reconstruction|`` for a
  model; ``|x - mean|`` and ``|x - mean| / std`` against the training slices at the same slice position
  (:class:`PositionAtlas`), the model-free baselines.
- **Healing** (Pinaya et al. 2022): the prior's probability of each code given the codes before it; codes below a
  threshold are replaced by the prior's most likely code, the healed map is decoded and ``|x - healed|`` scored.
- **Detection scores** over brain pixels: AUROC, AUPRC (average precision) and the best achievable Dice (the
  highest Dice of ``score > threshold`` against the lesion over all thresholds, pooled over slices).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

POLARITIES = {"bright": 1.0, "dark": -1.0}


@dataclass(frozen=True)
class LesionType:
    """A kind of synthetic lesion: ``name`` (e.g. ``bright_small``), ``polarity`` (+1 bright, -1 dark) and the
    radius range as a fraction of the image side."""

    name: str
    polarity: float
    radius_fraction: tuple[float, float]


def lesion_types(size_classes: dict[str, list[float]]) -> list[LesionType]:
    """Return one bright and one dark lesion type per size class (``{"small": [0.02, 0.04], ...}``)."""
    return [LesionType(f"{polarity}_{size}", sign, (float(low), float(high)))
            for polarity, sign in POLARITIES.items() for size, (low, high) in size_classes.items()]


def lesion_step(image: np.ndarray, weight: np.ndarray, tissue: float, polarity: float, contrast: float,
                max_step: float) -> tuple[np.ndarray, float]:
    """Return (the lesioned image, the contrast it got) for a lesion of soft ``weight`` (0-1) on ``image``.

    A pixel ``x`` moves by ``polarity * weight * fraction * room(x)`` with ``room`` the distance to 1 (bright) or
    0 (dark) and ``fraction = contrast * tissue / room(tissue)``, at most ``max_step``.
    """
    room = (1.0 - image) if polarity > 0 else image
    tissue_room = (1.0 - tissue) if polarity > 0 else tissue
    fraction = min(contrast * tissue / max(tissue_room, 1e-6), max_step)
    achieved = fraction * tissue_room / max(tissue, 1e-6)
    return (image + polarity * weight * fraction * room).astype(np.float32), float(achieved)


def insert_lesions(images: np.ndarray, masks: np.ndarray, types: list[LesionType], contrast: float, seed: int,
                   max_step: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (lesioned images, lesion masks, type index per slice, contrast got per slice).

    Slice ``i`` gets lesion type ``types[i % len(types)]``; the radius is drawn from its range times the image
    side and the centre from brain pixels at least that far from the mask edge (the deepest brain pixel when none
    is). A slice without brain pixels is left as it is (contrast 0).
    """
    rng = np.random.default_rng(seed)
    lesioned = np.array(images, np.float32, copy=True)
    lesions = np.zeros(images.shape, bool)
    kinds = np.arange(len(images)) % len(types)
    achieved = np.zeros(len(images))
    yy, xx = np.mgrid[0:images.shape[1], 0:images.shape[2]]
    for i, mask in enumerate(np.asarray(masks, bool)):
        if not mask.any():
            continue
        kind = types[kinds[i]]
        radius = rng.uniform(*kind.radius_fraction) * min(images.shape[1:])
        depth = ndimage.distance_transform_edt(mask)
        centres = np.argwhere(depth >= radius)
        cy, cx = centres[rng.integers(len(centres))] if len(centres) else np.unravel_index(depth.argmax(), mask.shape)
        distance = np.hypot(yy - cy, xx - cx)
        weight = np.clip(radius + 0.5 - distance, 0, 1) * mask
        tissue = float(lesioned[i][mask & (distance <= 2 * radius)].mean())
        lesioned[i], achieved[i] = lesion_step(lesioned[i], weight, tissue, kind.polarity, contrast, max_step)
        lesions[i] = (distance <= radius) & mask
    return lesioned, lesions, kinds, achieved


# ------------------------------------------------------------------------------------------- score maps


def smoothed(maps: np.ndarray, sigma_px: float) -> np.ndarray:
    """Return per-slice score maps smoothed in-plane by a Gaussian of ``sigma_px`` (0 = unchanged)."""
    maps = np.asarray(maps, np.float32)
    return ndimage.gaussian_filter(maps, sigma=(0, sigma_px, sigma_px)) if sigma_px > 0 else maps


def anomaly_score_maps(images: np.ndarray, reconstructions: np.ndarray, sigma_px: float) -> np.ndarray:
    """Return |image - reconstruction| smoothed in-plane by a Gaussian of ``sigma_px``, per slice."""
    return smoothed(np.abs(np.asarray(images, np.float32) - np.asarray(reconstructions, np.float32)), sigma_px)


@dataclass
class PositionAtlas:
    """Per-pixel mean and standard deviation of training slices in ``n_bins`` equal slice-position bins.

    Attributes:
        mean, std: ``(n_bins, H, W)``; an empty bin holds the nearest filled bin's values.
        count: training slices per bin ``(n_bins,)`` (before filling).
    """

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray

    @property
    def n_bins(self) -> int:
        return len(self.count)


def position_bins(positions: np.ndarray, n_bins: int) -> np.ndarray:
    """Return the bin (0..n_bins-1) of each slice position in [0, 1]."""
    return np.clip((np.asarray(positions, np.float64) * n_bins).astype(int), 0, n_bins - 1)


def position_atlas(chunks: Iterable[tuple[np.ndarray, np.ndarray]], n_bins: int) -> PositionAtlas:
    """Return the :class:`PositionAtlas` of ``(images (N, H, W), positions (N,))`` chunks, streamed.

    Raises:
        ValueError: when the chunks hold no slice.
    """
    sums = squares = count = None
    for images, positions in chunks:
        images = np.asarray(images, np.float64)
        if sums is None:
            sums, squares = np.zeros((n_bins,) + images.shape[1:]), np.zeros((n_bins,) + images.shape[1:])
            count = np.zeros(n_bins, np.int64)
        bins = position_bins(positions, n_bins)
        np.add.at(sums, bins, images)
        np.add.at(squares, bins, images ** 2)
        count += np.bincount(bins, minlength=n_bins)
    if count is None or count.sum() == 0:
        raise ValueError("no training slices to build the position atlas from")
    filled = np.flatnonzero(count)
    nearest = filled[np.abs(np.arange(n_bins)[:, None] - filled[None]).argmin(axis=1)]
    mean = sums[nearest] / count[nearest, None, None]
    variance = np.maximum(squares[nearest] / count[nearest, None, None] - mean ** 2, 0)
    return PositionAtlas(mean.astype(np.float32), np.sqrt(variance).astype(np.float32), count)


def mean_slice_scores(images: np.ndarray, positions: np.ndarray, atlas: PositionAtlas) -> np.ndarray:
    """Return |x - mean training slice at x's position bin| per pixel (unsmoothed)."""
    return np.abs(np.asarray(images, np.float32) - atlas.mean[position_bins(positions, atlas.n_bins)])


def zscore_scores(images: np.ndarray, positions: np.ndarray, atlas: PositionAtlas, min_std: float) -> np.ndarray:
    """Return |x - mean| / max(std, ``min_std``) against the training slices at x's position bin (unsmoothed)."""
    bins = position_bins(positions, atlas.n_bins)
    return np.abs(np.asarray(images, np.float32) - atlas.mean[bins]) / np.maximum(atlas.std[bins], min_std)


# ---------------------------------------------------------------------------------------------- healing


def code_probabilities(codes: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Return the probability ``(N, h, w)`` each code of ``codes`` (N, h, w) has under ``probabilities``
    (N, K, h, w)."""
    return np.take_along_axis(np.asarray(probabilities), np.asarray(codes, np.int64)[:, None], axis=1)[:, 0]


def unlikely_codes(codes: np.ndarray, probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Return where the prior's probability of the code (given the codes before it) is below ``threshold``."""
    return code_probabilities(codes, probabilities) < threshold


def most_likely_fill(codes: np.ndarray, probabilities: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Return ``codes`` with the positions ``where`` set to the most probable code, the rest unchanged."""
    return np.where(where, np.asarray(probabilities).argmax(axis=1), codes)


def upsampled_mask(mask: np.ndarray, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Return a code-map mask ``(N, h, w)`` repeated to image ``shape`` and smoothed by ``sigma_px`` (0-1)."""
    mask = np.asarray(mask, np.float32)
    fy, fx = shape[0] // mask.shape[1], shape[1] // mask.shape[2]
    return smoothed(np.repeat(np.repeat(mask, fy, axis=1), fx, axis=2), sigma_px)


# ----------------------------------------------------------------------------------------------- scores


def detection_scores(scores: np.ndarray, lesions: np.ndarray, brain_masks: np.ndarray) -> dict:
    """Return pixel ``auroc``, ``auprc`` (average precision) and best-threshold ``dice`` of ``scores`` for lesion
    pixels among brain pixels, pooled over slices, with ``lesion_share`` (the AUPRC of chance).

    Every value is None without both lesion and healthy brain pixels.
    """
    inside = np.asarray(brain_masks, bool)
    truth = np.asarray(lesions, bool)[inside]
    values = np.asarray(scores, np.float64)[inside]
    result = {"auroc": None, "auprc": None, "dice": None, "lesion_share": float(truth.mean()) if truth.size else None}
    if truth.all() or not truth.any():
        return result
    precision, recall, _ = precision_recall_curve(truth, values)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.nan_to_num(2 * precision * recall / (precision + recall))
    result.update(auroc=float(roc_auc_score(truth, values)), auprc=float(average_precision_score(truth, values)),
                  dice=float(dice.max()))
    return result

