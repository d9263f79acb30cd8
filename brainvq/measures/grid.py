"""A SOM codebook's map (``vqvae.bottleneck: som``): do grid neighbours hold similar embeddings, and which brain
region does each code cover?

- **Neighbour correlation**: the mean Pearson correlation between the embeddings (D-vectors) of grid neighbours
  (up, down, left, right; wrapped on a torus), next to the mean over every pair of nodes that are not neighbours,
  the control. A map that learned its topology has neighbours far more alike than non-neighbours; a codebook in
  random grid order has both about equal.
- **Tissue regions**: a simple segmentation of each volume: outside the mask is background; inside, three
  intensity classes by 1D k-means (dark: CSF, mid: grey matter, bright: white matter; with a head mask skull and
  scalp fall into these classes too).
- **Region map**: a code position covers a block of voxels (the downsampling factor per axis); each code's region
  is the region of most voxels over every block it sits on, its *purity* the share of those voxels. **Region
  agreement** is the share of neighbouring used codes whose regions agree, next to that share among pairs that are
  not neighbours (the control).
"""

from __future__ import annotations

import numpy as np

REGIONS = ("background", "dark (CSF)", "mid (grey matter)", "bright (white matter)")


class GridShapeError(ValueError):
    """Codes and labels (or a codebook and its grid) whose shapes do not fit together."""


def neighbour_pairs(neighbours: np.ndarray, exists: np.ndarray) -> np.ndarray:
    """Return the distinct grid-neighbour pairs ``(i, j)``, ``i < j``, from a SOM's ``(K, 4)`` neighbour table and
    its ``exists`` mask (``brainvq.models.grid_neighbours``) as an ``(P, 2)`` array."""
    neighbours, exists = np.asarray(neighbours), np.asarray(exists, bool)
    nodes = np.repeat(np.arange(len(neighbours)), neighbours.shape[1])
    pairs = np.stack([nodes, neighbours.ravel()], 1)[exists.ravel()]
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _pair_means(similarity: np.ndarray, pairs: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """Return the mean of ``similarity`` over ``pairs`` and over every other pair ``i < j`` (where ``valid``)."""
    k = len(similarity)
    upper = np.triu(np.ones((k, k), bool), 1)
    if valid is not None:
        upper &= valid
    is_pair = np.zeros((k, k), bool)
    is_pair[pairs[:, 0], pairs[:, 1]] = True
    return _nanmean_or_none(similarity[upper & is_pair]), _nanmean_or_none(similarity[upper & ~is_pair])


def _nanmean_or_none(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if values.size and not np.isnan(values).all() else None


def neighbour_correlation(codebook: np.ndarray, neighbours: np.ndarray, exists: np.ndarray) -> dict:
    """Return the mean Pearson correlation of the embeddings of grid neighbours (``neighbours``) and of every
    other pair of nodes (``non_neighbours``, the control), and ``n_neighbour_pairs``.

    Args:
        codebook: ``(K, D)`` embeddings, node ``r * columns + c`` at grid row ``r``, column ``c``.
        neighbours, exists: the map's ``(K, 4)`` neighbour table (``brainvq.models.grid_neighbours``).
    """
    codebook = np.asarray(codebook, np.float64)
    if codebook.ndim != 2 or len(codebook) != len(neighbours):
        raise GridShapeError(f"codebook {codebook.shape} does not match a neighbour table of {len(neighbours)} nodes")
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant embedding has no correlation (NaN)
        correlation = np.corrcoef(codebook)
    pairs = neighbour_pairs(neighbours, exists)
    near, far = _pair_means(correlation, pairs)
    return {"neighbours": near, "non_neighbours": far, "n_neighbour_pairs": int(len(pairs))}


def tissue_labels(volume: np.ndarray, mask: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Return each voxel's index into ``REGIONS``: 0 outside ``mask``, inside 1-3 by 1D k-means of the intensities
    (started at their quartiles; classes ordered dark to bright)."""
    mask = np.asarray(mask, bool)
    labels = np.zeros(mask.shape, np.int8)
    values = np.asarray(volume, np.float64)[mask]
    if values.size == 0:
        return labels
    centres = np.percentile(values, [25, 50, 75])
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        centres = np.array([values[nearest == c].mean() if (nearest == c).any() else centres[c] for c in range(3)])
    order = np.argsort(np.argsort(centres))  # a class's rank by brightness
    labels[mask] = 1 + order[np.argmin(np.abs(values[:, None] - centres[None]), axis=1)]
    return labels


def code_region_counts(codes: np.ndarray, labels: np.ndarray, codebook_size: int,
                       n_regions: int = len(REGIONS)) -> np.ndarray:
    """Return ``(K, n_regions)`` voxel counts: for each code, the voxels of each region under the blocks it sits on.

    Args:
        codes: one code volume ``(d, h, w)`` (or map ``(h, w)``).
        labels: the region of each voxel ``(d * f, h * f, w * f)``, ``f`` the downsampling factor.
    """
    codes, labels = np.asarray(codes, np.int64), np.asarray(labels, np.int64)
    factors = [n // m if m and n % m == 0 else 0 for n, m in zip(labels.shape, codes.shape)]
    if labels.ndim != codes.ndim or not all(factors):
        raise GridShapeError(f"labels {labels.shape} are not a whole number of blocks per code of {codes.shape}")
    # Split every axis into (code position, offset in its block), then count each region per block.
    blocked = labels.reshape([n for m, f in zip(codes.shape, factors) for n in (m, f)])
    offsets = tuple(range(1, 2 * codes.ndim, 2))
    block_counts = np.stack([(blocked == r).sum(axis=offsets) for r in range(n_regions)], axis=-1)
    counts = np.zeros((codebook_size, n_regions), np.int64)
    np.add.at(counts, codes.ravel(), block_counts.reshape(-1, n_regions))
    return counts


def region_map(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return each code's majority region (index into ``REGIONS``; -1 for an unused code) and its purity (the
    share of its voxels in that region; NaN when unused) from ``code_region_counts``."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(1)
    used = totals > 0
    region = np.where(used, counts.argmax(1), -1)
    purity = np.full(len(counts), np.nan)
    purity[used] = counts[used].max(1) / totals[used]
    return region, purity


def region_agreement(region: np.ndarray, neighbours: np.ndarray, exists: np.ndarray) -> dict:
    """Return the share of grid-neighbour pairs of used codes whose majority regions agree (``neighbours``), the
    same share over every other pair of used codes (``non_neighbours``, the control) and ``n_neighbour_pairs``."""
    region = np.asarray(region)
    used = region >= 0
    same = (region[:, None] == region[None]).astype(np.float64)
    pairs = neighbour_pairs(neighbours, exists)
    pairs = pairs[used[pairs[:, 0]] & used[pairs[:, 1]]]
    near, far = _pair_means(same, pairs, used[:, None] & used[None])
    return {"neighbours": near, "non_neighbours": far, "n_neighbour_pairs": int(len(pairs))}
