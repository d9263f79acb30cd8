"""Position consistency: does a slice look like the axial level it was drawn for?

A :class:`~brainvq.measures.slice_networks.SliceCNN` regressor is trained on real *training* slices to predict
their slice position (0 = lowest brain slice, 1 = highest) with an L1 loss. Its mean absolute error on real test
slices says how well position can be read from a real slice; its error on samples drawn at known positions says
whether the prior puts the right anatomy at each level. **Chance** is the error of always answering the median
training position: a regressor that learned nothing (e.g. trained on shuffled positions) does no better.

What it can detect: samples whose anatomy belongs to another level, or to no level (blobs are read as a middling
position). What it cannot: errors that keep the level recognisable (wrong texture, copies).
"""

from __future__ import annotations

import numpy as np

from brainvq.measures.slice_networks import SliceCNN, fit_slice_network, network_outputs


def fit_position_regressor(images: np.ndarray, positions: np.ndarray, epochs: int, seed: int,
                           size: int = 64) -> SliceCNN:
    """Return a regressor from slices ``(N, H, W)`` to their slice positions ``(N,)`` in [0, 1]."""
    return fit_slice_network(images, positions, "l1", epochs, seed, size)


def predicted_positions(model: SliceCNN, images: np.ndarray) -> np.ndarray:
    """Return the regressor's positions for ``images``, clipped to [0, 1]."""
    return np.clip(network_outputs(model, images), 0.0, 1.0)


def position_mae(model: SliceCNN, images: np.ndarray, positions: np.ndarray) -> float | None:
    """Return the mean absolute error of the predicted positions of ``images`` against ``positions`` (None if empty)."""
    if len(images) == 0:
        return None
    return float(np.mean(np.abs(predicted_positions(model, images) - np.asarray(positions, np.float64))))


def chance_mae(train_positions: np.ndarray, positions: np.ndarray) -> float:
    """Return the mean absolute error of always answering the median training position."""
    return float(np.mean(np.abs(np.asarray(positions, np.float64) - np.median(train_positions))))
