"""Similarity of whole volumes (``preprocess.dims: 3``): 3D SSIM with two windows, MSE and PSNR, and the per-scan
table of them.

Definitions (the report repeats them next to each number):

- **SSIM, Gaussian window** (``ssim_gaussian``): ``skimage.metrics.structural_similarity`` in 3D with the settings
  of Wang et al. 2004 that the 2D measures use (``gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1``): a Gaussian of sigma 1.5 voxels truncated at 3.5 sigma, an 11-voxel window per axis.
- **SSIM, uniform 7-voxel window** (``ssim_uniform7``): skimage's defaults in 3D (``win_size=7``, a uniform
  7 x 7 x 7 window, sample covariances, ``data_range=1``), the window of the OASIS-1 3D study's SSIM column.
- Both average the SSIM map over the voxels whose window lies inside the volume, as skimage does; they are
  written out in torch (float64, separable filters) and tests check them against skimage.
- **MSE / PSNR**: over the whole volume, and over the mask's voxels (``_brain``); PSNR in dB with a peak of 1,
  infinite (JSON ``null``) for identical volumes.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

# skimage's constants K1, K2 with a data range of 1.
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
GAUSSIAN_SIGMA = 1.5
# skimage's Gaussian window: 2 * int(truncate * sigma + 0.5) + 1 voxels with truncate = 3.5: 11 at sigma 1.5.
GAUSSIAN_WINDOW = 2 * int(3.5 * GAUSSIAN_SIGMA + 0.5) + 1
UNIFORM_WINDOW = 7
SSIM_WINDOWS = ("gaussian", "uniform7")
VOLUME_METRICS = ("ssim_gaussian", "ssim_uniform7", "psnr_db", "psnr_brain_db", "mse", "mse_brain")


class VolumeSizeError(ValueError):
    """Two volumes differ in shape, or a volume is smaller than the SSIM window."""


def _window_1d(window: str) -> torch.Tensor:
    """Return the normalised 1D filter of an SSIM window (separable along every axis), float64."""
    if window == "gaussian":
        x = torch.arange(GAUSSIAN_WINDOW, dtype=torch.float64) - (GAUSSIAN_WINDOW - 1) / 2
        taps = torch.exp(-0.5 * (x / GAUSSIAN_SIGMA) ** 2)
    elif window == "uniform7":
        taps = torch.ones(UNIFORM_WINDOW, dtype=torch.float64)
    else:
        raise ValueError(f"unknown SSIM window {window!r}; use one of {SSIM_WINDOWS}")
    return taps / taps.sum()


def _filtered(t: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Return ``t`` (B, 1, D, H, W) filtered by ``taps`` along each spatial axis, valid positions only."""
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = taps.numel()
        t = F.conv3d(t, taps.view(shape))
    return t


def ssim_3d(x: np.ndarray, y: np.ndarray, window: str = "gaussian") -> np.ndarray:
    """Return the SSIM of each volume pair ``x[i], y[i]`` (``(N, D, H, W)`` in [0, 1]) as an ``(N,)`` array.

    Args:
        window: ``"gaussian"`` (sigma 1.5, population covariances) or ``"uniform7"`` (7 voxels per axis,
            sample covariances): skimage's settings for each (module docstring).

    Raises:
        VolumeSizeError: the stacks differ in shape or a side is shorter than the window.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise VolumeSizeError(f"expected two (N, D, H, W) stacks of one shape, got {x.shape} and {y.shape}")
    taps = _window_1d(window)
    if min(x.shape[1:]) < taps.numel():
        raise VolumeSizeError(f"volumes of {x.shape[1:]} voxels are smaller than the {taps.numel()}-voxel SSIM window")
    n = taps.numel() ** 3
    cov_norm = n / (n - 1) if window == "uniform7" else 1.0
    values = []
    with torch.no_grad():
        for a, b in zip(x, y):  # one volume at a time: five float64 maps of a whole volume each
            a = torch.as_tensor(np.asarray(a, np.float64))[None, None]
            b = torch.as_tensor(np.asarray(b, np.float64))[None, None]
            mu_a, mu_b = _filtered(a, taps), _filtered(b, taps)
            var_a = cov_norm * (_filtered(a * a, taps) - mu_a**2)
            var_b = cov_norm * (_filtered(b * b, taps) - mu_b**2)
            cov = cov_norm * (_filtered(a * b, taps) - mu_a * mu_b)
            ssim_map = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / (
                (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2))
            values.append(float(ssim_map.mean()))
    return np.asarray(values, np.float64)


def mse_and_psnr_db(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Return (MSE, PSNR in dB with peak 1) of two volumes over all voxels, or over ``mask``'s (NaN if empty)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if mask is not None:
        if not mask.any():
            return math.nan, math.nan
        x, y = x[mask], y[mask]
    mse = float(np.mean((x - y) ** 2))
    return mse, (10 * math.log10(1.0 / mse) if mse > 0 else math.inf)


def volume_metric_table(originals: np.ndarray, reconstructions: np.ndarray, masks: np.ndarray) -> pd.DataFrame:
    """Return one row per volume with every metric of ``VOLUME_METRICS``.

    Args:
        originals, reconstructions: ``(N, D, H, W)`` in [0, 1].
        masks: ``(N, D, H, W)`` bool brain (or head) masks.
    """
    if not originals.shape == reconstructions.shape == masks.shape:
        raise VolumeSizeError(f"originals {originals.shape}, reconstructions {reconstructions.shape} and masks "
                              f"{masks.shape} must have one shape")
    table = pd.DataFrame({f"ssim_{window}": ssim_3d(originals, reconstructions, window) for window in SSIM_WINDOWS})
    whole = [mse_and_psnr_db(x, y) for x, y in zip(originals, reconstructions)]
    brain = [mse_and_psnr_db(x, y, m) for x, y, m in zip(originals, reconstructions, masks.astype(bool))]
    table["psnr_db"], table["mse"] = [p for _, p in whole], [m for m, _ in whole]
    table["psnr_brain_db"], table["mse_brain"] = [p for _, p in brain], [m for m, _ in brain]
    return table[list(VOLUME_METRICS)]
