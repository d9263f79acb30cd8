"""Sampling from the prior (brainvq.sampling): reproducible draws steered by position and label, the samples file
and grid."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from brainvq.prior import LabelConfigError, bits_per_code
from brainvq.sampling import sample_codes, sample_labels, sample_plan, save_sample_grid, write_samples

torch.set_num_threads(1)


def test_sampling_with_a_fixed_seed_is_reproducible_and_another_seed_differs(labelled_prior):
    positions, labels = [0.3] * 5, ["F"] * 5
    first = sample_codes(labelled_prior, positions, labels, seed=3, batch_size=2)
    again = sample_codes(labelled_prior, positions, labels, seed=3, batch_size=2)
    other = sample_codes(labelled_prior, positions, labels, seed=4, batch_size=2)
    assert first.shape == (5, 6, 6) and first.dtype == torch.long
    assert 0 <= first.min() and first.max() < 8
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_tiny_nucleus_draws_the_most_likely_code_whatever_the_seed(labelled_prior):
    positions, labels = [0.3] * 3, ["M"] * 3
    greedy = sample_codes(labelled_prior, positions, labels, seed=1, top_p=1e-6)
    assert torch.equal(greedy, sample_codes(labelled_prior, positions, labels, seed=2, top_p=1e-6))
    assert not torch.equal(sample_codes(labelled_prior, positions, labels, seed=1),
                           sample_codes(labelled_prior, positions, labels, seed=2))


def test_slice_position_and_label_steer_the_samples_as_in_training(labelled_prior):
    def share_in(maps: torch.Tensor, low: int) -> float:
        return ((maps >= low) & (maps < low + 2)).float().mean().item()

    assert share_in(sample_codes(labelled_prior, [0.1] * 4, ["F"] * 4, seed=0), 0) > 0.9
    assert share_in(sample_codes(labelled_prior, [0.9] * 4, ["F"] * 4, seed=0), 2) > 0.9
    assert share_in(sample_codes(labelled_prior, [0.1] * 4, ["M"] * 4, seed=0), 4) > 0.9


def test_label_conditioned_prior_refuses_missing_or_unknown_labels(labelled_prior):
    with pytest.raises(LabelConfigError, match="sex"):
        sample_codes(labelled_prior, [0.5])
    with pytest.raises(LabelConfigError, match="'X'"):
        bits_per_code(labelled_prior, np.zeros((1, 6, 6), np.int64), [0.5], ["X"])


def test_sample_plan_spreads_maps_evenly_over_positions_and_labels():
    positions, labels = sample_plan(7, [0.2, 0.8], ["F", "M"])
    assert positions.tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.8, 0.8, 0.8])
    assert labels == ["F", "F", "M", "M", "F", "F", "M"]
    assert sample_plan(3, [0.5])[1] is None


def test_samples_file_and_grid_follow_the_contract(tmp_path):
    positions, labels = sample_plan(4, [0.2, 0.8])
    images = np.linspace(-0.5, 1.5, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    write_samples(tmp_path / "samples.h5", np.zeros((4, 2, 2)), images, positions, labels)
    save_sample_grid(tmp_path / "grid.png", np.clip(images, 0, 1), positions, labels, columns=3)
    with h5py.File(tmp_path / "samples.h5") as f:
        assert f["codes"].shape == (4, 2, 2) and f["codes"].dtype == np.int16
        assert f["images"].dtype == np.float32 and 0 <= f["images"][()].min() and f["images"][()].max() <= 1
        assert f["slice_position"][()].tolist() == pytest.approx([0.2, 0.2, 0.8, 0.8])
        assert f["label"].asstr()[()].tolist() == [""] * 4
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "samples.h5"]



def test_sample_labels_default_to_every_class_and_refuse_unknown_ones(labelled_prior):
    assert sample_labels(labelled_prior, None) == ["F", "M"]
    assert sample_labels(labelled_prior, ["M"]) == ["M"]
    with pytest.raises(LabelConfigError, match="sample.labels"):
        sample_labels(labelled_prior, ["X"])
