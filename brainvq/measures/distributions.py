"""Sets of images or features compared as wholes: Fréchet distance, pairwise diversity, matching by position.

- **Diversity**: mean MS-SSIM over pairs of images of one set (lower = more diverse).
- **Fréchet distance**: between Gaussians fitted to two ``(N, D)`` feature sets. Which features are used (and
  hence what the number can be compared with) is the caller's choice and must be named next to the value.
- **Precision and recall** (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around its
  feature vectors reaching their k-th nearest neighbour in the set; precision is the share of generated vectors
  inside the real manifold (are samples realistic?), recall the share of real vectors inside the generated one
  (is the real variety covered?).
- **Matching by position**: per sample, a real slice at a similar axial position, drawn at random.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import linalg

from brainvq.measures.similarity import ms_ssim_batch, ms_ssim_window_px


class SampleSizeError(ValueError):
    """A set has too few items for a measure."""


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

    Raises:
        SampleSizeError: when there is no real slice.
    """
    real_positions = np.asarray(real_positions, np.float64)
    if real_positions.size == 0:
        raise SampleSizeError("no real slices to match samples against")
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


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Return the Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets (scipy sqrtm).

    Raises:
        SampleSizeError: when a set has fewer than two vectors.
    """
    if min(len(features_a), len(features_b)) < 2:
        raise SampleSizeError("the Fréchet distance needs at least two feature vectors per set")
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: the usual remedy is a tiny ridge on both covariances
        ridge = 1e-6 * np.eye(cov_a.shape[0])
        root = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Return each vector's distance to its k-th nearest other vector of the same set."""
    distances = np.sqrt(np.maximum(((features[:, None] - features[None]) ** 2).sum(-1), 0))
    return np.sort(distances, axis=1)[:, k]  # column 0 is the vector itself


def share_inside_manifold(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Return the share of ``queries`` within the k-NN radius of at least one vector of ``manifold``."""
    distances = np.sqrt(np.maximum(((queries[:, None] - manifold[None]) ** 2).sum(-1), 0))
    return float((distances <= radii[None]).any(axis=1).mean())


def precision_recall(real_features: np.ndarray, generated_features: np.ndarray, k: int = 3) -> dict:
    """Return ``{"precision", "recall", "k"}`` of generated against real ``(N, D)`` features (Kynkäänniemi 2019).

    Raises:
        SampleSizeError: when a set has ``k`` vectors or fewer.
    """
    real, generated = np.asarray(real_features, np.float64), np.asarray(generated_features, np.float64)
    if min(len(real), len(generated)) <= k:
        raise SampleSizeError(f"precision and recall with k={k} need more than {k} vectors per set")
    return {"precision": share_inside_manifold(real, knn_radii(real, k), generated),
            "recall": share_inside_manifold(generated, knn_radii(generated, k), real), "k": k}
