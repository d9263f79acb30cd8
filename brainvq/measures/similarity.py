"""Similarity of image pairs: SSIM, brain-box SSIM, MS-SSIM, MSE and PSNR, and the per-slice table of them.

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
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

SSIM_SETTINGS = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}
# skimage's Gaussian window is 2 * int(truncate * sigma + 0.5) + 1 px with truncate = 3.5: 11 px at sigma 1.5.
SSIM_WINDOW_PX = 11
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MAX_WINDOW_PX = 11
RECONSTRUCTION_METRICS = ("ssim", "ssim_brain", "ms_ssim", "ms_ssim_brain", "psnr_db", "psnr_brain_db", "mse",
                          "mse_brain")


class ImageSizeError(ValueError):
    """Two images differ in shape, or an image is too small for a metric."""


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


def _gaussian_window(window_px: int, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(window_px, dtype=torch.float64) - (window_px - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _ssim_and_contrast_structure(x: torch.Tensor, y: torch.Tensor,
                                 window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-image mean SSIM and mean contrast-structure term over the valid (unpadded) window positions."""
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
