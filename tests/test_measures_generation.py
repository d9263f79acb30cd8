"""The generation measures score known-good controls well and known-bad controls badly (brainvq/measures/:
two_sample, position, copies, baselines, distributions.precision_recall)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brainvq.measures import baselines, copies, position, two_sample
from brainvq.measures.distributions import precision_recall
from tests.conftest import synthetic_brain_slices

torch.set_num_threads(1)


def slices_at_positions(positions: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Return slices whose anatomy follows the slice position: a head that widens towards the middle, a ventricle
    only between 0.3 and 0.8 and a bright 'cerebellum' below 0.3, with per-slice jitter and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    images = np.zeros((len(positions), size, size), np.float32)
    for k, p in enumerate(positions):
        radius = 0.35 + 0.5 * math.sin(math.pi * p) + rng.normal(0, 0.03)
        image = np.where(xx ** 2 + (yy / 1.15) ** 2 <= radius ** 2, 0.6, 0.0)
        if 0.3 < p < 0.8:
            image = np.where((xx / 0.12) ** 2 + (yy / (0.4 * (p - 0.2))) ** 2 <= 1, 0.15, image)
        if p < 0.3:
            image = np.where((xx ** 2 + (yy - 0.4) ** 2) <= (0.3 - p) ** 2 * 2, 0.95, image)
        images[k] = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    return images


# ------------------------------------------------------------------------------------- two-sample test


def test_two_sample_test_cannot_tell_two_halves_of_one_real_set_apart():
    images, _ = synthetic_brain_slices(80, 32, seed=0)
    result = two_sample.classifier_two_sample_test(images[:40], images[40:], epochs=10, seed=0, n_bootstrap=300,
                                                   size=16)
    low, high = result["ci95"]
    assert low <= 0.5 <= high, result
    assert result["n_a"] == result["n_b"] == 40 and len(result["fold_auroc"]) == 2


def test_two_sample_test_tells_real_slices_from_noise():
    images, _ = synthetic_brain_slices(40, 32, seed=1)
    noise = np.random.default_rng(0).uniform(0, 1, images.shape).astype(np.float32)
    result = two_sample.classifier_two_sample_test(images, noise, epochs=10, seed=0, n_bootstrap=300, size=16)
    assert result["auroc"] > 0.95 and result["ci95"][0] > 0.8, result


def slices_of_subjects(n_subjects: int, per_subject: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (slices, subject of each): every subject's slices carry that subject's own faint pattern, drawn from
    one distribution for all subjects (what makes a scan recognisable without making a set different)."""
    images, _ = synthetic_brain_slices(n_subjects * per_subject, 32, seed)
    marks = np.random.default_rng(seed).uniform(-0.25, 0.25, (n_subjects, 32, 32)).astype(np.float32)
    return np.clip(images + np.repeat(marks, per_subject, axis=0), 0, 1), np.repeat(np.arange(n_subjects), per_subject)


def test_fold_assignment_holds_out_whole_subjects_and_keeps_pairs_together():
    groups = np.repeat(["s1", "s2", "s3", "s4", "s5"], [9, 3, 5, 7, 6])
    fold_a, fold_b = two_sample.fold_assignment(len(groups), len(groups), 2, seed=0, groups_a=groups)
    assert all(len(set(fold_a[groups == g])) == 1 for g in set(groups))
    assert set(fold_a) == {0, 1} and np.array_equal(fold_a, fold_b)
    assert abs(np.sum(fold_a == 0) - np.sum(fold_a == 1)) <= 4  # balanced by size


def test_two_sample_test_holding_out_subjects_stops_it_scoring_who_the_few_reference_subjects_are():
    # Four reference subjects of twelve slices against 48 slices of other subjects from the same distribution:
    # with slices split at random the classifier recognises the four subjects' own patterns in the held-out half.
    item, grouped = [], []
    for seed in range(4):
        few, subjects = slices_of_subjects(4, 12, seed)
        many, _ = slices_of_subjects(48, 1, seed + 100)
        settings = {"epochs": 10, "seed": 0, "n_bootstrap": 100, "size": 16}
        item.append(two_sample.classifier_two_sample_test(few, many, **settings)["auroc"])
        result = two_sample.classifier_two_sample_test(few, many, groups_a=subjects, **settings)
        assert result["fold_unit"] == "group"
        grouped.append(result["auroc"])
    assert np.mean(item) > 0.75, item
    assert np.mean(grouped) < 0.7 and np.mean(item) - np.mean(grouped) > 0.15, (item, grouped)


def test_two_sample_test_with_subjects_held_out_still_tells_real_slices_from_noise():
    images, subjects = slices_of_subjects(4, 10, seed=1)
    noise = np.random.default_rng(0).uniform(0, 1, images.shape).astype(np.float32)
    result = two_sample.classifier_two_sample_test(images, noise, epochs=10, seed=0, n_bootstrap=300, size=16,
                                                   groups_a=subjects)
    assert result["fold_unit"] == "group" and result["auroc"] > 0.95 and result["ci95"][0] > 0.8, result


def test_two_sample_test_splits_single_slices_when_there_are_fewer_subjects_than_folds():
    images, _ = synthetic_brain_slices(12, 32, seed=3)
    result = two_sample.classifier_two_sample_test(images[:6], images[6:], epochs=2, n_bootstrap=50, size=16,
                                                   groups_a=np.zeros(6))
    assert result["fold_unit"] == "item" and "fewer groups (1) than folds (2)" in result["fold_unit_reason"]
    assert result["auroc"] is not None


def test_two_sample_test_reports_why_tiny_sets_get_no_auroc():
    images, _ = synthetic_brain_slices(3, 32, seed=2)
    result = two_sample.classifier_two_sample_test(images[:1], images[1:], folds=2)
    assert result["auroc"] is None and "at least 2" in result["reason"]


# ------------------------------------------------------------------------------------ position consistency


@pytest.fixture(scope="module")
def position_data():
    rng = np.random.default_rng(0)
    train_positions, test_positions = rng.uniform(0, 1, 300), rng.uniform(0, 1, 60)
    return (slices_at_positions(train_positions, 32, 0), train_positions,
            slices_at_positions(test_positions, 32, 1), test_positions)


def test_position_regressor_reads_the_level_of_real_slices_far_better_than_chance(position_data):
    train, train_positions, test, test_positions = position_data
    model = position.fit_position_regressor(train, train_positions, epochs=10, seed=0, size=16)
    chance = position.chance_mae(train_positions, test_positions)
    assert position.position_mae(model, test, test_positions) < 0.5 * chance


def test_position_regressor_trained_on_shuffled_slices_is_no_better_than_chance(position_data):
    train, train_positions, test, test_positions = position_data
    shuffled = np.random.default_rng(1).permutation(train_positions)
    model = position.fit_position_regressor(train, shuffled, epochs=10, seed=0, size=16)
    chance = position.chance_mae(train_positions, test_positions)
    assert position.position_mae(model, test, test_positions) > 0.85 * chance


def test_samples_with_the_wrong_anatomy_get_a_large_position_error(position_data):
    train, train_positions, test, test_positions = position_data
    model = position.fit_position_regressor(train, train_positions, epochs=10, seed=0, size=16)
    right = position.position_mae(model, test, test_positions)
    wrong = position.position_mae(model, test, 1 - test_positions)  # each slice claims the mirrored level
    assert wrong > 3 * right


# ---------------------------------------------------------------------------------------------- copies


def distinct_slices(n: int, seed: int) -> np.ndarray:
    """Return synthetic brains (64 px) shifted by up to 8 px and with pixel noise: no two are copies."""
    images = synthetic_brain_slices(n, 64, seed)[0]
    rng = np.random.default_rng(seed + 100)
    shifted = np.stack([np.roll(image, tuple(rng.integers(-8, 9, 2)), axis=(0, 1)) for image in images])
    return np.clip(shifted + rng.normal(0, 0.1, images.shape), 0, 1)


def code_maps_of(images: np.ndarray, levels: int = 16, block: int = 4) -> np.ndarray:
    """Return stand-in VQ-VAE codes: each block's mean intensity quantised to ``levels`` codes."""
    n, h, w = images.shape
    means = images.reshape(n, h // block, block, w // block, block).mean(axis=(2, 4))
    return np.minimum((means * levels).astype(np.int64), levels - 1)


def decoded(codes: np.ndarray, levels: int = 16, block: int = 4) -> np.ndarray:
    """Return the stand-in decoder's images: each code's level, blown up to its block."""
    return np.kron((codes + 0.5) / levels, np.ones((1, block, block))).astype(np.float32)


def copy_scores(maps, positions, train_maps, train_positions):
    hamming, nearest = copies.nearest_code_maps(maps, positions, train_maps, train_positions, window=0.1, top_k=3)
    candidates = decoded(train_maps[nearest.ravel()]).reshape(len(maps), 3, *decoded(maps[:1]).shape[1:])
    return hamming[:, 0], copies.highest_decoded_ssim(decoded(maps), candidates)


def test_copy_detector_flags_exact_and_five_percent_copies_and_no_real_test_map():
    train_positions, test_positions = np.linspace(0, 1, 120), np.linspace(0, 1, 30)
    train_maps, test_maps = code_maps_of(distinct_slices(120, seed=0)), code_maps_of(distinct_slices(30, seed=1))
    picks = np.arange(0, 120, 4)
    # Calibration as in evaluate: Hamming on copies with 10 % of codes changed, SSIM on copies with 0.5 % changed.
    calibration_hamming, _ = copy_scores(copies.perturbed_copies(train_maps[picks], 0.1, 16, 5),
                                         train_positions[picks], train_maps, train_positions)
    _, calibration_ssim = copy_scores(copies.perturbed_copies(train_maps[picks], 0.005, 16, 6),
                                      train_positions[picks], train_maps, train_positions)
    thresholds = copies.calibrated_thresholds(calibration_hamming, calibration_ssim)

    exact = copy_scores(train_maps[picks], train_positions[picks], train_maps, train_positions)
    five = copy_scores(copies.perturbed_copies(train_maps[picks], 0.05, 16, 7), train_positions[picks], train_maps,
                       train_positions)
    real = copy_scores(test_maps, test_positions, train_maps, train_positions)
    assert copies.copy_flags(*exact, thresholds).all()
    assert copies.copy_flags(*five, thresholds).all()
    assert not copies.copy_flags(*real, thresholds).any(), (real, thresholds)
    summary = copies.copies_summary(copies.copy_flags(*real, thresholds), *real)
    assert summary["share_flagged"] == 0 and summary["n"] == 30


def test_perturbed_copies_change_exactly_the_asked_share_of_codes():
    maps = np.random.default_rng(0).integers(0, 8, (5, 10, 10))
    changed = copies.perturbed_copies(maps, 0.05, 8, seed=0)
    assert ((changed != maps).sum(axis=(1, 2)) == 5).all()
    assert changed.min() >= 0 and changed.max() < 8


def test_nearest_code_maps_look_only_near_the_query_position():
    reference = np.stack([np.zeros((4, 4), int), np.ones((4, 4), int)])
    hamming, index = copies.nearest_code_maps(np.zeros((1, 4, 4), int), np.array([1.0]), reference,
                                              np.array([0.0, 1.0]), window=0.1, top_k=2)
    assert index[0].tolist() == [1, -1] and hamming[0, 0] == 1.0 and np.isinf(hamming[0, 1])


# ------------------------------------------------------------------------------------------ baselines


def test_per_location_unigram_equals_its_closed_form():
    rng = np.random.default_rng(0)
    k, n = 6, 50
    train = rng.integers(0, k, (n, 3, 4))
    train[:, 0, 0] = 2  # location (0, 0) always holds code 2 in training
    test = rng.integers(0, k, (7, 3, 4))
    test[:, 0, 0] = np.r_[np.full(6, 2), 5]
    bits = baselines.per_location_unigram_bits_map(train, test, k)
    assert np.allclose(bits[:6, 0, 0], -math.log2((n + 1) / (n + k)))
    assert math.isclose(bits[6, 0, 0], -math.log2(1 / (n + k)))
    for i, j in ((1, 2), (2, 3)):
        counts = np.bincount(train[:, i, j], minlength=k) + 1
        assert np.allclose(bits[:, i, j], -np.log2(counts[test[:, i, j]] / counts.sum()))


def test_per_location_baseline_beats_the_global_unigram_on_maps_with_a_fixed_layout():
    rng = np.random.default_rng(1)
    maps = np.where(np.arange(8)[None, None] < 4, 0, rng.integers(1, 9, (60, 8, 8)))  # left half background
    train, test = maps[:50], maps[50:]
    global_bits = baselines.unigram_bits_map(train, test, 9).mean()
    assert baselines.per_location_unigram_bits_map(train, test, 9).mean() < global_bits - 0.4
    assert math.isclose(baselines.uniform_bits_map(test, 9).mean(), math.log2(9))


def test_position_bin_baseline_uses_only_training_maps_of_the_same_bin():
    low, high = np.zeros((10, 2, 2), int), np.ones((10, 2, 2), int)
    train = np.concatenate([low, high])
    train_positions = np.r_[np.full(10, 0.1), np.full(10, 0.9)]
    bits = baselines.per_location_position_bin_bits_map(train, train_positions, np.ones((1, 2, 2), int),
                                                        np.array([0.95]), codebook_size=2, n_bins=2)
    assert np.allclose(bits, -math.log2(11 / 12))  # 10 of 10 training maps in the top bin, add-one smoothed
    pooled = baselines.per_location_unigram_bits_map(train, np.ones((1, 2, 2), int), 2)
    assert np.allclose(pooled, -math.log2(11 / 22))


def test_brain_mask_reaches_every_code_whose_block_it_touches():
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 3, 5] = True
    grid = baselines.code_grid_mask(mask, (2, 2))
    assert grid.tolist() == [[[False, True], [False, False]]]
    assert baselines.masked_mean_bits(np.arange(4.0).reshape(1, 2, 2), grid) == 1.0
    assert baselines.masked_mean_bits(np.ones((1, 2, 2)), np.zeros((1, 2, 2), bool)) is None


# ------------------------------------------------------------------------------------ precision / recall


def test_precision_and_recall_are_one_for_the_same_distribution_and_zero_for_a_distant_one():
    rng = np.random.default_rng(0)
    real, same = rng.normal(0, 1, (200, 4)), rng.normal(0, 1, (200, 4))
    good = precision_recall(real, same, k=3)
    assert good["precision"] > 0.9 and good["recall"] > 0.9
    far = precision_recall(real, rng.normal(10, 1, (200, 4)), k=3)
    assert far["precision"] == 0 and far["recall"] == 0


def test_collapsed_samples_are_precise_but_recall_little():
    rng = np.random.default_rng(1)
    real = rng.normal(0, 1, (200, 2))
    collapsed = rng.normal(0, 0.05, (200, 2))  # every sample near the mode
    result = precision_recall(real, collapsed, k=3)
    assert result["precision"] > 0.9 and result["recall"] < 0.2


def test_auroc_equals_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    negatives, positives = rng.integers(0, 5, 30).astype(float), rng.integers(1, 6, 20).astype(float)
    expected = roc_auc_score(np.r_[np.zeros(30), np.ones(20)], np.r_[negatives, positives])
    assert math.isclose(two_sample.auroc(negatives, positives), expected)
