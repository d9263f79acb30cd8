"""Pure measures (brainvq/measures/) on tiny images and tables made in each test."""

from __future__ import annotations

import ast
import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from brainvq.measures import anomaly, codebook, distributions, probe, similarity, statistics
from conftest import REPO, synthetic_brain_slices


def noisy(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    return np.clip(image + np.random.default_rng(seed).normal(0, sigma, image.shape), 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------- reconstruction


def test_brain_masked_ssim_equals_skimage_on_the_mask_bounding_box_crop():
    images, masks = synthetic_brain_slices(1, 48, seed=3)
    x, mask = images[0], masks[0]
    y = np.where(mask, noisy(x, 0.05), x)  # errors inside the brain only, as in a reconstruction
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    expected = structural_similarity(x[crop].astype(np.float64), y[crop].astype(np.float64), gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False, data_range=1)
    whole = structural_similarity(x.astype(np.float64), y.astype(np.float64), gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1)
    assert similarity.brain_masked_ssim(x, y, mask) == pytest.approx(expected, abs=1e-12)
    assert similarity.ssim(x, y) == pytest.approx(whole, abs=1e-12)
    assert expected < whole  # the background no longer inflates the score


def test_small_brain_box_grows_to_the_ssim_window_and_stays_inside_the_image():
    mask = np.zeros((32, 32), bool)
    mask[0:3, 30:32] = True
    rows, cols = similarity.brain_bounding_box(mask, similarity.SSIM_WINDOW_PX)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (11, 11)
    assert rows.start == 0 and cols.stop == 32
    assert mask[rows, cols].sum() == mask.sum()


def test_identical_pair_gives_perfect_metrics():
    images, masks = synthetic_brain_slices(2, 64, seed=0)
    table = similarity.reconstruction_metric_table(images, images.copy(), masks)
    assert np.allclose(table[["ssim", "ssim_brain", "ms_ssim", "ms_ssim_brain"]], 1.0, atol=1e-6)
    assert (table[["mse", "mse_brain"]] == 0).all().all()
    assert np.isinf(table[["psnr_db", "psnr_brain_db"]]).all().all()


def test_every_metric_worsens_monotonically_as_noise_grows():
    images, masks = synthetic_brain_slices(1, 64, seed=1)
    sigmas = [0.01, 0.03, 0.1, 0.3]
    noisy_stack = np.stack([noisy(images[0], s) for s in sigmas])
    table = similarity.reconstruction_metric_table(np.repeat(images, len(sigmas), 0), noisy_stack,
                                                   np.repeat(masks, len(sigmas), 0))
    for higher_is_better in ("ssim", "ssim_brain", "ms_ssim", "ms_ssim_brain", "psnr_db", "psnr_brain_db"):
        assert (np.diff(table[higher_is_better]) < 0).all(), higher_is_better
    for lower_is_better in ("mse", "mse_brain"):
        assert (np.diff(table[lower_is_better]) > 0).all(), lower_is_better


def test_ms_ssim_is_undefined_below_48_px_and_uses_a_smaller_window_below_176_px():
    assert similarity.ms_ssim_window_px(32, 32) is None
    assert similarity.ms_ssim_window_px(48, 48) == 3
    assert similarity.ms_ssim_window_px(128, 128) == 7
    assert similarity.ms_ssim_window_px(256, 256) == 11
    images, masks = synthetic_brain_slices(1, 32, seed=0)
    table = similarity.reconstruction_metric_table(images, images, masks)
    assert table[["ms_ssim", "ms_ssim_brain"]].isna().all().all()


def test_ms_ssim_equals_monai_compute_ms_ssim_with_the_same_settings():
    monai_regression = pytest.importorskip("monai.metrics.regression")
    import torch

    images, masks = synthetic_brain_slices(3, 64, seed=2)
    degraded = np.stack([noisy(images[0], 0.05), noisy(images[1], 0.2), np.roll(images[2], 3, axis=1)])
    ours = similarity.ms_ssim_batch(images, degraded, window_px=3)
    reference = monai_regression.compute_ms_ssim(
        torch.from_numpy(images)[:, None], torch.from_numpy(degraded)[:, None], spatial_dims=2, data_range=1.0,
        kernel_size=3, kernel_sigma=1.5, weights=similarity.MS_SSIM_WEIGHTS).reshape(-1).numpy()
    assert ours == pytest.approx(reference, abs=2e-5)
    with pytest.raises(similarity.ImageSizeError, match="too small"):
        similarity.ms_ssim_batch(images, degraded, window_px=5)


# ------------------------------------------------------------------------------------------- statistics


def test_summaries_cover_slices_and_subjects_with_the_5th_percentile():
    metrics = similarity.RECONSTRUCTION_METRICS
    per_slice = pd.DataFrame({"scan": ["A"] * 4 + ["B"] * 2, "subject": ["A"] * 4 + ["B"] * 2,
                              **{m: [0.9, 0.8, 0.7, 0.6, 0.2, 0.4] for m in metrics}})
    per_scan = statistics.per_scan_means(per_slice, metrics)
    assert per_scan["n_slices"].tolist() == [4, 2]
    assert per_scan["ssim"].tolist() == pytest.approx([0.75, 0.3])
    per_subject = statistics.per_subject_means(per_scan, metrics)
    summary = statistics.summaries_by_unit(metrics, over_slices=per_slice, over_scans=per_scan,
                                           over_subjects=per_subject)["ssim"]
    assert summary["over_slices"]["median"] == pytest.approx(0.65)
    assert summary["over_slices"]["p5"] == pytest.approx(np.percentile([0.9, 0.8, 0.7, 0.6, 0.2, 0.4], 5))
    assert summary["over_subjects"] == {"mean": pytest.approx(0.525), "median": pytest.approx(0.525),
                                        "p5": pytest.approx(0.3225), "n": 2}
    assert summary["over_scans"] == summary["over_subjects"]  # one scan per subject


def test_a_subject_with_several_scans_counts_once_with_the_mean_of_its_scans():
    # Subject X has a good scan with many slices and a bad one with few; Y has one middling scan.
    per_slice = pd.DataFrame({"scan": ["X1"] * 6 + ["X2"] * 2 + ["Y1"] * 2,
                              "subject": ["X"] * 8 + ["Y"] * 2,
                              "ssim": [0.9] * 6 + [0.3] * 2 + [0.5] * 2})
    per_scan = statistics.per_scan_means(per_slice, ["ssim"])
    assert per_scan[["scan", "subject", "n_slices"]].values.tolist() == [["X1", "X", 6], ["X2", "X", 2],
                                                                         ["Y1", "Y", 2]]
    per_subject = statistics.per_subject_means(per_scan, ["ssim"])
    assert per_subject[["subject", "n_scans", "n_slices"]].values.tolist() == [["X", 2, 8], ["Y", 1, 2]]
    assert per_subject["ssim"].tolist() == pytest.approx([0.6, 0.5])
    summary = statistics.summaries_by_unit(["ssim"], over_slices=per_slice, over_scans=per_scan,
                                           over_subjects=per_subject)["ssim"]
    assert summary["over_slices"]["mean"] == pytest.approx((6 * 0.9 + 2 * 0.3 + 2 * 0.5) / 10)
    assert summary["over_scans"]["mean"] == pytest.approx((0.9 + 0.3 + 0.5) / 3)
    assert summary["over_scans"]["n"] == 3
    assert summary["over_subjects"]["mean"] == pytest.approx(0.55) and summary["over_subjects"]["n"] == 2


def test_summary_statistics_ignore_nan_and_are_empty_without_values():
    assert statistics.summary_statistics([math.nan, 1.0, 3.0])["mean"] == pytest.approx(2.0)
    assert statistics.summary_statistics([math.nan]) == {"mean": None, "median": None, "p5": None, "n": 0}


# ------------------------------------------------------------------------------------ codebook, FD


def test_perplexity_counts_equally_used_codes_and_ignores_unused_ones():
    counts = codebook.code_counts([np.array([[0, 1], [2, 3]]), np.array([[3, 2], [1, 0]])], codebook_size=8)
    usage = codebook.codebook_usage(counts)
    assert usage == {"codebook_size": 8, "codes_used": 4, "usage_fraction": 0.5, "perplexity": pytest.approx(4.0)}


def test_a_collapsed_codebook_has_perplexity_one():
    usage = codebook.codebook_usage(codebook.code_counts([np.full((4, 4), 3)], codebook_size=8))
    assert usage["codes_used"] == 1 and usage["perplexity"] == pytest.approx(1.0)


def test_codes_outside_the_codebook_are_rejected():
    with pytest.raises(codebook.CodeRangeError, match="quantize"):
        codebook.code_counts([np.array([0, 8])], codebook_size=8)


def test_code_histogram_is_the_share_of_each_code():
    assert codebook.code_histogram(np.array([[0, 0], [1, 3]]), 4).tolist() == [0.5, 0.25, 0.0, 0.25]


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_mean_shift():
    features = np.random.default_rng(0).normal(size=(200, 4))
    assert distributions.frechet_distance(features, features) == pytest.approx(0, abs=1e-6)
    shifts = [distributions.frechet_distance(features, features + d) for d in (0.5, 1.0, 2.0)]
    assert shifts == pytest.approx([4 * 0.25, 4 * 1.0, 4 * 4.0], rel=1e-6)
    with pytest.raises(distributions.SampleSizeError, match="at least two"):
        distributions.frechet_distance(features[:1], features)


# ------------------------------------------------------------------------------------------ generation


def test_identical_samples_have_no_diversity_and_varied_slices_some():
    images, _ = synthetic_brain_slices(4, 64, seed=6)
    assert distributions.mean_pairwise_ms_ssim(np.repeat(images[:1], 4, 0), max_pairs=10, seed=0) == pytest.approx(1.0)
    assert distributions.mean_pairwise_ms_ssim(images, max_pairs=10, seed=0) < 0.95
    assert distributions.mean_pairwise_ms_ssim(images[:1], max_pairs=10, seed=0) is None


def test_matched_real_slices_lie_within_the_window_and_are_not_reused_while_others_remain():
    real = np.array([0.1, 0.1, 0.5, 0.52, 0.9])
    picks = distributions.matched_real_indices(np.array([0.1, 0.1, 0.5, 0.5]), real, window=0.05, seed=0)
    assert sorted(picks[:2]) == [0, 1]
    assert set(picks[2:]) == {2, 3}


# ----------------------------------------------------------------------------------------------- probe

PROBE_SETTINGS = {"probe_cv_folds": 5, "probe_n_penalties": 6, "probe_permutations": 200,
                  "bootstrap_resamples": 300, "seed": 0}


def probe_data(n: int, shift: float, seed: int, d: int = 16):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    x = rng.normal(size=(n, d))
    x[:, 0] += shift * y
    return x, y


def test_probe_p_value_is_uniform_on_shuffled_labels():
    p_values = []
    for seed in range(20):
        x, y = probe_data(40, shift=0.0, seed=seed)
        p_values.append(probe.probe_result(x, y, np.arange(40), None, PROBE_SETTINGS)["p_value"])
    assert sum(p < 0.05 for p in p_values) <= 2
    assert 0.3 < np.median(p_values) < 0.7  # not piled up at either end


def test_probe_finds_a_real_signal_with_a_small_p_value_and_an_interval_around_it():
    x, y = probe_data(60, shift=3.0, seed=1)
    result = probe.probe_result(x, y, np.arange(60), None, PROBE_SETTINGS)
    assert result["auroc"] > 0.9 and result["p_value"] < 0.01 and result["folds"] == 5
    low, high = result["auroc_ci"]
    assert low < result["auroc"] <= high <= 1 and low > 0.75
    assert result["permuted"] == "subject" and result["n_permutations"] == 200


def test_probe_folds_keep_each_subject_whole_and_give_every_fold_both_classes():
    subjects = np.repeat([f"S{i:02d}" for i in range(20)], 3)  # three scans per subject
    labels = np.repeat(np.arange(20) % 2, 3)
    folds = probe.subject_folds(subjects, labels, 4, seed=0)
    for subject in set(subjects):
        assert len(set(folds[subjects == subject])) == 1
    for fold in range(4):
        assert set(labels[folds == fold]) == {0, 1}


def test_permuting_within_sites_gives_no_credit_to_a_probe_that_only_sees_the_site():
    rng = np.random.default_rng(0)
    site = np.repeat(["A", "B"], 20)
    y = (site == "B").astype(int)  # the target is the site
    x = np.column_stack([y + 0.1 * rng.normal(size=40), rng.normal(size=(40, 4))])
    free = probe.probe_result(x, y, np.arange(40), None, PROBE_SETTINGS)
    within = probe.probe_result(x, y, np.arange(40), site, PROBE_SETTINGS)
    assert free["auroc"] == within["auroc"] > 0.95
    assert free["p_value"] < 0.01 and within["p_value"] == 1.0


def test_permutations_move_whole_subjects_within_their_stratum():
    subjects = np.repeat(np.arange(12), 2)
    labels = np.repeat(np.arange(12) % 2, 2)
    strata = np.repeat(np.arange(12) // 6, 2)
    matrix, unit = probe.permuted_labels(labels, subjects, strata, 50, seed=0)
    assert unit == "subject" and matrix.shape == (24, 51) and (matrix[:, 0] == labels).all()
    assert (matrix[0::2] == matrix[1::2]).all()  # a subject's two scans keep one label
    for stratum in (0, 1):
        assert (matrix[strata == stratum].sum(axis=0) == labels[strata == stratum].sum()).all()


def test_probe_is_undefined_with_a_reason_when_a_class_has_too_few_subjects():
    x, _ = probe_data(20, shift=0.0, seed=3)
    y = np.zeros(20, int)
    y[:2] = 1
    result = probe.probe_result(x, y, np.arange(20), None, PROBE_SETTINGS)
    assert result["auroc"] is None and result["p_value"] is None and "2 positive" in result["reason"]


def test_weighted_and_column_aurocs_equal_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 6, 50).astype(float), rng.integers(0, 2, 50)  # ties on purpose
    weights = rng.integers(0, 3, (5, 50))
    expected = [roc_auc_score(labels, scores, sample_weight=w) for w in weights]
    assert np.allclose(probe.weighted_auroc(scores, labels, weights), expected)
    assert probe.auroc_columns(scores[:, None], labels[:, None])[0] == pytest.approx(roc_auc_score(labels, scores))
    assert probe.auroc_columns(-scores[:, None], labels[:, None])[0] == pytest.approx(1 - roc_auc_score(labels, scores))


def test_probe_targets_parse_and_use_the_training_median():
    table = pd.DataFrame({"atrophy": [1.0, 2.0, 3.0, 10.0, None], "sex": ["F", "M", "M", "F", ""],
                          "site": ["a", "b", "c", "a", "b"]})
    is_train = np.array([True, True, True, False, False])
    labels, meaning = probe.binary_probe_labels(table, probe.parse_probe_target("atrophy>median"), is_train)
    assert labels.tolist()[:4] == [0.0, 0.0, 1.0, 1.0] and math.isnan(labels.iloc[4]) and "> 2" in meaning
    labels, meaning = probe.binary_probe_labels(table, probe.parse_probe_target("sex"), is_train)
    assert labels.tolist()[:4] == [0.0, 1.0, 1.0, 0.0] and math.isnan(labels.iloc[4]) and "'M'" in meaning
    assert probe.parse_probe_target("cdr > 0.5") == probe.ProbeTarget("cdr", 0.5)
    with pytest.raises(probe.ProbeTargetError, match="threshold rule"):
        probe.binary_probe_labels(table, probe.parse_probe_target("site"), is_train)
    with pytest.raises(probe.ProbeTargetError, match="set evaluate.probe_target"):
        probe.binary_probe_labels(table, probe.parse_probe_target("cdr>0"), is_train)
    with pytest.raises(probe.ProbeTargetError, match="fix it in the config"):
        probe.parse_probe_target("cdr >= 0")


# ------------------------------------------------------------------------------------------ intervals


def test_intervals_resample_subjects_not_slices():
    # Two subjects of 100 slices each, all 0 or all 1: resampling slices would give a narrow interval around 0.5.
    values = np.repeat([0.0, 1.0], 100)
    subjects = np.repeat(["A", "B"], 100)
    low, high = statistics.bootstrap_mean_interval(values, subjects, n_resamples=200, seed=0)
    assert low == 0.0 and high == 1.0


def test_intervals_cover_the_mean_and_narrow_with_more_subjects():
    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 200):
        values = rng.normal(0.8, 0.05, n)
        low, high = statistics.bootstrap_mean_interval(values, np.arange(n), n_resamples=500, seed=0)
        assert low < values.mean() < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    assert statistics.bootstrap_mean_interval([np.nan, np.nan], ["A", "B"], 100, 0) is None


def test_summaries_carry_a_subject_interval_of_the_mean():
    per_slice = pd.DataFrame({"subject": np.repeat(["A", "B", "C"], 4), "ssim": np.repeat([0.5, 0.7, 0.9], 4)})
    summary = statistics.summaries_by_unit(["ssim"], 200, 0, over_slices=per_slice)
    low, high = summary["ssim"]["over_slices"]["mean_ci95"]
    assert 0.5 <= low < summary["ssim"]["over_slices"]["mean"] < high <= 0.9
    assert "mean_ci95" not in statistics.summaries_by_unit(["ssim"], over_slices=per_slice)["ssim"]["over_slices"]


# --------------------------------------------------------------------------------------------- anomaly

SIZES = {"small": [0.05, 0.06], "large": [0.12, 0.14]}


def uniform_tissue(n: int, size: int, tissue: float):
    """Slices whose brain (a centred disc) is one intensity: the lesion's local contrast can be read exactly."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.hypot(yy - size / 2, xx - size / 2) < size * 0.4
    return np.where(mask, tissue, 0.0)[None].repeat(n, 0).astype(np.float32), mask[None].repeat(n, 0)


def test_lesions_keep_their_local_contrast_in_both_directions_and_every_size():
    types = anomaly.lesion_types(SIZES)
    assert [t.name for t in types] == ["bright_small", "bright_large", "dark_small", "dark_large"]
    images, masks = uniform_tissue(8, 64, tissue=0.5)
    lesioned, lesions, kinds, contrast = anomaly.insert_lesions(images, masks, types, contrast=0.3, seed=0)
    assert kinds.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and np.allclose(contrast, 0.3)
    for i in range(8):
        core = lesions[i] & (ndimage.binary_erosion(lesions[i], iterations=1))
        expected = 0.5 * (1 + 0.3 * types[kinds[i]].polarity)
        assert np.allclose(lesioned[i][core], expected, atol=1e-6)
        away = ~ndimage.binary_dilation(lesions[i], iterations=2)
        assert (lesioned[i][away] == images[i][away]).all()
        radius = np.sqrt(lesions[i].sum() / np.pi) / 64
        low, high = types[kinds[i]].radius_fraction
        assert low - 0.01 < radius < high + 0.01
    assert lesions[kinds == 1].sum() > 3 * lesions[kinds == 0].sum()  # large lesions are larger


def test_lesions_never_clip_even_on_bright_textured_tissue():
    images, masks = synthetic_brain_slices(12, 64, seed=1)
    bright, _ = uniform_tissue(4, 64, tissue=0.9)
    images = np.concatenate([images, bright])
    masks = np.concatenate([masks, bright > 0])
    types = anomaly.lesion_types(SIZES)
    lesioned, lesions, kinds, contrast = anomaly.insert_lesions(images, masks, types, contrast=0.5, seed=2)
    assert lesioned.min() >= 0 and lesioned.max() <= 1
    new_at_bounds = ((lesioned == 1) | (lesioned == 0)) & (lesioned != images)
    assert not new_at_bounds.any()  # no lesion pixel is pushed onto 0 or 1
    bright_on_bright = [i for i in range(12, 16) if types[kinds[i]].polarity > 0]
    assert all(contrast[i] < 0.5 for i in bright_on_bright)  # too little room: less contrast, recorded
    assert all(lesioned[i][lesions[i]].max() < 1 for i in bright_on_bright)


def test_model_free_baselines_give_the_known_result_on_a_constructed_case():
    size = 8
    low, high = np.full((1, size, size), 0.2, np.float32), np.full((1, size, size), 0.6, np.float32)
    # Bin 0 (positions < 0.5) holds one slice of 0.2 and one of 0.6; bin 1 is empty and borrows bin 0.
    atlas = anomaly.position_atlas([(low, [0.1]), (high, [0.3])], n_bins=2)
    assert atlas.count.tolist() == [2, 0]
    assert np.allclose(atlas.mean, 0.4) and np.allclose(atlas.std, 0.2)
    x = np.full((2, size, size), 0.4, np.float32)
    x[:, 0, 0] = 1.0
    positions = np.array([0.2, 0.9])
    assert np.allclose(anomaly.mean_slice_scores(x, positions, atlas)[:, 0, 0], 0.6)
    assert np.allclose(anomaly.mean_slice_scores(x, positions, atlas)[:, 1:], 0.0)
    assert np.allclose(anomaly.zscore_scores(x, positions, atlas, min_std=0.01)[:, 0, 0], 3.0)
    assert np.allclose(anomaly.zscore_scores(x, positions, atlas, min_std=0.5)[:, 0, 0], 1.2)  # the floor


def test_healing_replaces_exactly_the_codes_below_the_threshold_with_the_most_likely_code():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.full(16, 0.3), size=(3, 5, 5)).transpose(0, 3, 1, 2)  # (N, K, h, w)
    codes = rng.integers(0, 16, (3, 5, 5))
    replaced = anomaly.unlikely_codes(codes, probabilities, threshold=0.05)
    own = np.take_along_axis(probabilities, codes[:, None], axis=1)[:, 0]
    assert (replaced == (own < 0.05)).all() and 0 < replaced.sum() < replaced.size
    healed = anomaly.most_likely_fill(codes, probabilities, replaced)
    assert (healed[~replaced] == codes[~replaced]).all()
    assert (healed[replaced] == probabilities.argmax(axis=1)[replaced]).all()
    assert (healed[replaced] != codes[replaced]).all()  # threshold < 1/K: a replaced code was never the likeliest


def test_replaced_code_mask_is_upsampled_to_the_image():
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 1, 2] = True
    image_mask = anomaly.upsampled_mask(mask, (16, 16), sigma_px=0)
    assert image_mask.shape == (1, 16, 16) and image_mask[0, 4:8, 8:12].all() and image_mask.sum() == 16


def test_detection_scores_are_perfect_for_the_truth_and_chance_for_noise():
    images, masks = synthetic_brain_slices(6, 48, seed=7)
    _, lesions, _, _ = anomaly.insert_lesions(images, masks, anomaly.lesion_types(SIZES), 0.3, seed=0)
    perfect = anomaly.detection_scores(lesions.astype(float), lesions, masks)
    assert perfect["auroc"] == perfect["auprc"] == perfect["dice"] == 1.0
    noise = anomaly.detection_scores(np.random.default_rng(0).random(masks.shape), lesions, masks)
    share = noise["lesion_share"]
    assert abs(noise["auroc"] - 0.5) < 0.05 and noise["auprc"] < 2 * share and noise["dice"] < 4 * share
    inverted = anomaly.detection_scores(-lesions.astype(float), lesions, masks)
    assert inverted["auroc"] == 0.0 and inverted["auprc"] < 2 * share


def test_a_perfect_reconstructor_finds_the_lesions_and_a_copycat_does_not():
    images, masks = synthetic_brain_slices(8, 48, seed=7)
    lesioned, lesions, _, _ = anomaly.insert_lesions(images, masks, anomaly.lesion_types(SIZES), 0.5, seed=0)
    assert lesions.any(axis=(1, 2)).all() and not (lesions & ~masks).any()
    assert (np.abs(lesioned - images)[~masks] == 0).all()
    perfect = anomaly.detection_scores(anomaly.anomaly_score_maps(lesioned, images, 1.0), lesions, masks)
    assert perfect["auroc"] > 0.95 and perfect["auprc"] > 0.6
    copycat = anomaly.detection_scores(anomaly.anomaly_score_maps(lesioned, lesioned, 1.0), lesions, masks)
    assert copycat["auroc"] == pytest.approx(0.5) and copycat["auprc"] == pytest.approx(copycat["lesion_share"])


def test_detection_scores_are_undefined_without_lesion_pixels():
    _, masks = synthetic_brain_slices(1, 32, seed=0)
    scores = anomaly.detection_scores(np.ones(masks.shape), np.zeros(masks.shape, bool), masks)
    assert scores["auroc"] is None and scores["auprc"] is None and scores["dice"] is None


# ---------------------------------------------------------------------------------------------- purity


def module_imports(path) -> tuple[set[str], list[str]]:
    """Return (every imported module name, imports found inside a function or class) of one source file."""
    tree = ast.parse(path.read_text())
    names, nested = set(), []
    top_level = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names.update(found)
            if id(node) not in top_level:
                nested.append(f"{path.name}:{node.lineno}")
    return names, nested


def test_measures_import_no_file_or_model_code_and_import_only_at_module_level():
    io_modules = {"h5py", "nibabel", "brainvq.data", "brainvq.shards", "brainvq.files", "brainvq.prior", "brainvq.training",
                  "brainvq.evaluation", "brainvq.io", "brainvq.config"}
    paths = sorted((REPO / "brainvq" / "measures").glob("*.py"))
    assert len(paths) >= 7
    for path in paths:
        names, nested = module_imports(path)
        assert not names & io_modules, f"{path.name} imports {sorted(names & io_modules)}"
        assert not nested, f"function-local imports in {nested}"
    for path in sorted((REPO / "brainvq" / "evaluation").glob("*.py")):
        assert not module_imports(path)[1], f"function-local imports in {path.name}"
