"""3D similarity of whole volumes (brainvq.measures.volumes) and the SOM grid measures (brainvq.measures.grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from brainvq.measures.grid import (
    code_region_counts,
    neighbour_correlation,
    region_agreement,
    region_map,
    tissue_labels,
)
from brainvq.measures.volumes import VolumeSizeError, ssim_3d, volume_metric_table
from brainvq.models import grid_neighbours
from brainvq.training import ssim_per_image


def smooth_volumes(n: int, shape=(20, 22, 18), seed: int = 0) -> np.ndarray:
    """``n`` smooth random volumes in [0, 1] with structure at a few voxels' scale."""
    rng = np.random.default_rng(seed)
    volumes = ndimage.gaussian_filter(rng.random((n, *shape)), sigma=(0, 2, 2, 2))
    low, high = volumes.min(axis=(1, 2, 3), keepdims=True), volumes.max(axis=(1, 2, 3), keepdims=True)
    return (volumes - low) / (high - low)


def noisy(volumes: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    return np.clip(volumes + np.random.default_rng(seed).normal(0, sigma, volumes.shape), 0, 1)


def test_3d_ssim_with_the_gaussian_window_equals_skimage_on_a_volume():
    x = smooth_volumes(2)
    y = noisy(x, 0.1)
    reference = [structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False) for a, b in zip(x, y)]
    np.testing.assert_allclose(ssim_3d(x, y, "gaussian"), reference, atol=1e-10)


def test_3d_ssim_with_the_uniform_7_voxel_window_equals_skimage_defaults_on_a_volume():
    x = smooth_volumes(2, seed=3)
    y = noisy(x, 0.1, seed=4)
    reference = [structural_similarity(a, b, data_range=1.0, win_size=7) for a, b in zip(x, y)]
    np.testing.assert_allclose(ssim_3d(x, y, "uniform7"), reference, atol=1e-10)


def test_training_ssim_of_volumes_equals_skimage_uniform_window():
    x = smooth_volumes(2, seed=5).astype(np.float32)
    y = noisy(x, 0.05, seed=6).astype(np.float32)
    ours = ssim_per_image(torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None]).numpy()
    reference = [structural_similarity(a, b, data_range=1.0, win_size=7) for a, b in zip(x, y)]
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("window", ["gaussian", "uniform7"])
def test_3d_ssim_scores_a_volume_itself_1_and_unrelated_noise_near_0(window):
    x = smooth_volumes(1)
    unrelated = np.random.default_rng(9).random(x.shape)
    assert ssim_3d(x, x, window)[0] == pytest.approx(1.0)
    assert ssim_3d(x, unrelated, window)[0] < 0.2
    assert ssim_3d(x, noisy(x, 0.02), window)[0] > ssim_3d(x, noisy(x, 0.2), window)[0]


def test_3d_ssim_refuses_volumes_smaller_than_its_window_or_of_two_shapes():
    with pytest.raises(VolumeSizeError, match="smaller than the 11-voxel"):
        ssim_3d(np.zeros((1, 8, 20, 20)), np.zeros((1, 8, 20, 20)), "gaussian")
    with pytest.raises(VolumeSizeError, match="one shape"):
        ssim_3d(np.zeros((1, 12, 12, 12)), np.zeros((1, 12, 12, 13)))


def test_volume_table_gives_psnr_of_the_whole_volume_and_of_the_mask():
    x = smooth_volumes(2)
    y = x.copy()
    mask = np.zeros(x.shape, bool)
    mask[:, 5:15, 5:15, 5:15] = True
    y[~mask] += 0.1  # all the error lies outside the mask
    table = volume_metric_table(x, y, mask)
    assert table["mse"].to_numpy() == pytest.approx(0.01 * (~mask[0]).mean())
    assert table["psnr_db"].to_numpy() == pytest.approx(10 * np.log10(1 / (0.01 * (~mask[0]).mean())))
    assert np.isinf(table["psnr_brain_db"]).all() and (table["mse_brain"] == 0).all()
    assert (table["ssim_uniform7"] < 1).all() and (table["ssim_gaussian"] < 1).all()


# --------------------------------------------------------------------------------------------- SOM grid


def grid_codebook(rows: int, columns: int, ordered: bool, dim: int = 16, seed: int = 0) -> np.ndarray:
    """A codebook laid on a grid: ``ordered`` embeddings vary smoothly across it (a trained map); otherwise
    the same embeddings in a random node order (a map that learned no topology)."""
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    phases = rng.random(dim) * 2 * np.pi
    codebook = np.sin(r.ravel()[:, None] * 0.5 + phases) + np.cos(c.ravel()[:, None] * 0.5 + 2 * phases)
    return codebook if ordered else codebook[rng.permutation(len(codebook))]


def test_neighbour_correlation_is_high_for_a_smooth_map_and_no_higher_than_non_neighbours_for_a_shuffled_one():
    neighbours, exists = (t.numpy() for t in grid_neighbours(6, 6, "rectangular"))
    trained = neighbour_correlation(grid_codebook(6, 6, ordered=True), neighbours, exists)
    shuffled = neighbour_correlation(grid_codebook(6, 6, ordered=False), neighbours, exists)
    assert trained["neighbours"] > 0.8 and trained["neighbours"] > trained["non_neighbours"] + 0.3
    assert abs(shuffled["neighbours"] - shuffled["non_neighbours"]) < 0.15
    assert trained["n_neighbour_pairs"] == 2 * 6 * 5  # a 6 x 6 grid's horizontal and vertical edges


def test_toroidal_grid_counts_its_wrapped_neighbours():
    neighbours, exists = (t.numpy() for t in grid_neighbours(4, 5, "toroidal"))
    assert neighbour_correlation(np.random.default_rng(0).random((20, 8)), neighbours, exists)[
        "n_neighbour_pairs"] == 2 * 4 * 5


def test_tissue_labels_order_three_intensity_classes_inside_the_mask():
    volume = np.zeros((12, 12, 12))
    volume[:, :, 0:4], volume[:, :, 4:8], volume[:, :, 8:12] = 0.2, 0.5, 0.9
    mask = np.ones(volume.shape, bool)
    mask[0] = False
    labels = tissue_labels(volume + np.random.default_rng(0).normal(0, 0.01, volume.shape), mask)
    assert (labels[0] == 0).all()
    assert (labels[1:, :, 0:4] == 1).all() and (labels[1:, :, 4:8] == 2).all() and (labels[1:, :, 8:12] == 3).all()


def test_region_map_gives_each_code_the_region_of_most_of_its_voxels():
    labels = np.zeros((4, 4, 4), np.int64)
    labels[:, :, 2:] = 3
    labels[0, 0, 0] = 1  # one voxel of another region in code 0's block
    codes = np.array([[[0, 1], [0, 1]], [[0, 1], [0, 1]]])  # blocks of 2 voxels per axis
    counts = code_region_counts(codes, labels, codebook_size=3)
    region, purity = region_map(counts)
    assert region.tolist() == [0, 3, -1]
    assert purity[0] == pytest.approx(31 / 32) and purity[1] == 1.0 and np.isnan(purity[2])


def test_region_agreement_is_higher_for_a_map_with_regions_in_patches_than_for_scattered_ones():
    neighbours, exists = (t.numpy() for t in grid_neighbours(6, 6, "rectangular"))
    patches = (np.arange(36) % 6 >= 3).astype(int) + 2 * (np.arange(36) // 6 >= 3)  # four 3 x 3 quadrants
    scattered = np.random.default_rng(0).permutation(patches)
    good, bad = region_agreement(patches, neighbours, exists), region_agreement(scattered, neighbours, exists)
    assert good["neighbours"] > 0.6 and good["neighbours"] > good["non_neighbours"] + 0.3
    assert bad["neighbours"] < 0.5
