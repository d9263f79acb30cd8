"""Codebook use: how often each code occurs, the share of codes used and the perplexity.

**Perplexity** is exp(entropy of code usage): the effective number of equally used codes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import stats


class CodeRangeError(ValueError):
    """Code maps hold values outside the codebook."""


def code_counts(code_maps: Iterable[np.ndarray], codebook_size: int) -> np.ndarray:
    """Return how often each of ``codebook_size`` codes occurs in ``code_maps`` (``(K,)`` int64).

    Raises:
        CodeRangeError: when a code lies outside ``[0, codebook_size)``.
    """
    counts = np.zeros(codebook_size, np.int64)
    for codes in code_maps:
        codes = np.asarray(codes).ravel()
        if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
            raise CodeRangeError(f"code maps hold values outside [0, {codebook_size}); the codes were not "
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


def code_histogram(code_maps: np.ndarray, codebook_size: int) -> np.ndarray:
    """Return the normalised code-usage histogram ``(K,)`` of one scan's code maps (sums to 1, or all 0)."""
    counts = code_counts([code_maps], codebook_size).astype(np.float64)
    return counts / max(counts.sum(), 1.0)
