"""Context-free baselines of a prior over code maps: what a PixelCNN must beat to have learned any context.

Every baseline is fitted on training code maps and scored on test code maps as a cross-entropy in bits per code,
add-one (Laplace) smoothed over all ``K`` codes so an unseen code costs finite bits:

- **uniform**: ``log2 K``.
- **global unigram**: one code-frequency table for every location.
- **per-location unigram**: one table per map location ``(i, j)``. Code maps have a fixed layout (background at the
  border, brain in the middle), so this knows where background is without seeing any neighbour.
- **per-location and position-bin unigram**: one table per location and per bin of the slice position (``n_bins``
  equal bins of [0, 1]); it also knows which anatomy each axial level holds.

Each ``*_bits_map`` returns the bits of every test code ``(N, h, w)``, so a caller can average over all codes or over
the codes inside a brain mask only (:func:`masked_mean_bits`).
"""

from __future__ import annotations

import math

import numpy as np


def _checked(codes, codebook_size: int) -> np.ndarray:
    codes = np.asarray(codes).astype(np.int64)
    if codes.ndim != 3:
        raise ValueError(f"expected code maps (N, h, w), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes span [{codes.min()}, {codes.max()}], outside a codebook of {codebook_size}")
    return codes


def uniform_bits_map(test_codes, codebook_size: int) -> np.ndarray:
    """Return ``log2 K`` for every test code ``(N, h, w)``."""
    return np.full(np.shape(test_codes), math.log2(codebook_size))


def unigram_bits_map(train_codes, test_codes, codebook_size: int) -> np.ndarray:
    """Return the bits of each test code under the add-one-smoothed global code frequencies of ``train_codes``."""
    train, test = _checked(train_codes, codebook_size), _checked(test_codes, codebook_size)
    counts = np.bincount(train.ravel(), minlength=codebook_size) + 1.0
    return -np.log2(counts / counts.sum())[test]


def location_counts(train_codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Return how often each code occurs at each location: ``(h, w, K)`` int64."""
    n, h, w = train_codes.shape
    flat = (np.arange(h * w)[None] * codebook_size + train_codes.reshape(n, h * w)).ravel()
    return np.bincount(flat, minlength=h * w * codebook_size).reshape(h, w, codebook_size)


def per_location_unigram_bits_map(train_codes, test_codes, codebook_size: int) -> np.ndarray:
    """Return the bits of each test code under its location's add-one-smoothed code frequencies in training."""
    train, test = _checked(train_codes, codebook_size), _checked(test_codes, codebook_size)
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"training maps are {train.shape[1:]} but test maps {test.shape[1:]}")
    counts = location_counts(train, codebook_size) + 1.0
    log_p = np.log2(counts / counts.sum(axis=2, keepdims=True))
    h, w = test.shape[1:]
    return -log_p[np.arange(h)[None, :, None], np.arange(w)[None, None, :], test]


def position_bins(positions, n_bins: int) -> np.ndarray:
    """Return the bin ``0 .. n_bins - 1`` of each slice position in [0, 1] (equal-width bins, 1 in the last)."""
    return np.clip((np.asarray(positions, np.float64) * n_bins).astype(np.int64), 0, n_bins - 1)


def per_location_position_bin_bits_map(train_codes, train_positions, test_codes, test_positions, codebook_size: int,
                                       n_bins: int) -> np.ndarray:
    """Return the bits of each test code under the add-one-smoothed code frequencies of its location among the
    training maps in its slice-position bin (a bin without training maps gives the uniform ``log2 K``)."""
    train, test = _checked(train_codes, codebook_size), _checked(test_codes, codebook_size)
    train_bins, test_bins = position_bins(train_positions, n_bins), position_bins(test_positions, n_bins)
    bits = np.empty(test.shape, np.float64)
    for b in np.unique(test_bins):
        rows = test_bins == b
        bits[rows] = per_location_unigram_bits_map(train[train_bins == b].reshape(-1, *train.shape[1:]),
                                                   test[rows], codebook_size)
    return bits


def masked_mean_bits(bits_map: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Return the mean of ``bits_map`` over all codes, or over the codes where ``mask`` is True (None if none)."""
    bits_map = np.asarray(bits_map, np.float64)
    values = bits_map if mask is None else bits_map[np.asarray(mask, bool)]
    return float(values.mean()) if values.size else None


def code_grid_mask(pixel_masks: np.ndarray, map_size: tuple[int, int]) -> np.ndarray:
    """Return ``(N, h, w)`` bool: a code position is inside when any pixel of its block of ``pixel_masks``
    ``(N, H, W)`` is (the block a VQ-VAE code summarises; H and W are multiples of h and w)."""
    masks = np.asarray(pixel_masks, bool)
    n, height, width = masks.shape
    h, w = map_size
    if height % h or width % w:
        raise ValueError(f"masks of {height}x{width} px do not tile a {h}x{w} code map")
    return masks.reshape(n, h, height // h, w, width // w).any(axis=(2, 4))
