"""Copies: is a sample a (near-)copy of a training code map?

Samples are decoded code maps, so comparing a sample's pixels with raw training slices cannot catch a copy: an
exact copy of a training map scores only the VQ-VAE's reconstruction SSIM against its slice. Here a sample is
compared with training *code maps* at a similar slice position:

- **Hamming distance**: the share of code positions where the sample's map and a training map differ; the nearest
  training map is the one with the fewest differences (a copy with 5 % of its codes changed is at 0.05).
- **Decoded SSIM**: the SSIM of the sample's image against the *decoded* training maps nearest in Hamming distance
  (the same decoder made both, so an exact copy scores 1).

A sample is flagged as a copy when its Hamming distance is at most, or its decoded SSIM at least, a threshold
calibrated on known copies: training maps with a share of their codes replaced at random
(:func:`perturbed_copies`), scored the same way.
"""

from __future__ import annotations

import numpy as np

from brainvq.measures.similarity import ssim
from brainvq.measures.statistics import summary_statistics


def perturbed_copies(codes: np.ndarray, fraction: float, codebook_size: int, seed: int) -> np.ndarray:
    """Return copies of code maps ``(N, h, w)`` with ``round(fraction * h * w)`` positions per map (chosen at
    random) set to another code, drawn uniformly among the other ``K - 1``."""
    codes = np.asarray(codes).astype(np.int64)
    rng = np.random.default_rng(seed)
    n, h, w = codes.shape
    changed = int(round(fraction * h * w))
    out = codes.reshape(n, h * w).copy()
    for row in out:
        where = rng.choice(h * w, changed, replace=False)
        row[where] = (row[where] + rng.integers(1, codebook_size, changed)) % codebook_size
    return out.reshape(n, h, w)


def nearest_code_maps(query_codes: np.ndarray, query_positions: np.ndarray, reference_codes: np.ndarray,
                      reference_positions: np.ndarray, window: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (Hamming distances ``(N, top_k)`` as shares of differing codes, reference indices ``(N, top_k)``):
    per query map the ``top_k`` reference maps nearest in Hamming distance among those within ``window`` of its
    slice position (widened to the nearest reference position when none is that close), nearest first.

    Fewer candidates than ``top_k`` leave distance ``inf`` and index -1 in the remaining columns.
    """
    query = np.asarray(query_codes).reshape(len(query_codes), -1)
    reference = np.asarray(reference_codes).reshape(len(reference_codes), -1)
    reference_positions = np.asarray(reference_positions, np.float64)
    if len(reference) == 0:
        raise ValueError("no reference code maps to compare with")
    distances = np.full((len(query), top_k), np.inf)
    indices = np.full((len(query), top_k), -1, np.int64)
    for q, (codes, position) in enumerate(zip(query, np.asarray(query_positions, np.float64))):
        gap = np.abs(reference_positions - position)
        candidates = np.flatnonzero(gap <= max(window, gap.min()))
        hamming = (reference[candidates] != codes[None]).mean(axis=1)
        order = np.argsort(hamming, kind="stable")[:top_k]
        distances[q, : len(order)] = hamming[order]
        indices[q, : len(order)] = candidates[order]
    return distances, indices


def highest_decoded_ssim(images: np.ndarray, candidate_images: np.ndarray) -> np.ndarray:
    """Return, per image ``(N, H, W)``, its highest SSIM to its candidates ``(N, k, H, W)`` (decoded training maps;
    NaN-filled candidates are skipped)."""
    best = np.full(len(images), np.nan)
    for i, (image, candidates) in enumerate(zip(images, candidate_images)):
        scores = [ssim(image, c) for c in candidates if not np.isnan(c).any()]
        best[i] = max(scores) if scores else np.nan
    return best


def calibrated_thresholds(copy_hamming: np.ndarray, copy_ssim: np.ndarray) -> dict:
    """Return the flagging thresholds from known copies: the largest Hamming distance and the lowest decoded SSIM
    any of them reached, so every known copy is flagged by both."""
    return {"hamming": float(np.max(copy_hamming)), "ssim": float(np.nanmin(copy_ssim))}


def copy_flags(hamming: np.ndarray, decoded_ssim: np.ndarray, thresholds: dict) -> np.ndarray:
    """Return True where a map is within the Hamming threshold or reaches the decoded-SSIM threshold."""
    hamming, decoded_ssim = np.asarray(hamming, np.float64), np.asarray(decoded_ssim, np.float64)
    with np.errstate(invalid="ignore"):
        return (hamming <= thresholds["hamming"]) | (decoded_ssim >= thresholds["ssim"])


def copies_summary(flags: np.ndarray, hamming: np.ndarray, decoded_ssim: np.ndarray) -> dict:
    """Return the share and number of flagged maps and the distribution of their nearest distances."""
    flags = np.asarray(flags, bool)
    return {"share_flagged": float(flags.mean()) if flags.size else None, "n_flagged": int(flags.sum()),
            "n": int(flags.size), "nearest_hamming": summary_statistics(hamming),
            "highest_decoded_ssim": summary_statistics(decoded_ssim)}
