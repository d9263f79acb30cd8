"""Pure measures (brainvq/measures/) on tiny images and tables made in each test."""

from __future__ import annotations

import ast
import math

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import structural_similarity

from brainvq.measures import anomaly, codebook, distributions, memorisation, probe, similarity, statistics
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


def test_memorisation_flags_an_exact_copy_of_a_training_slice():
    train, _ = synthetic_brain_slices(12, 32, seed=4)
    positions = np.linspace(0, 1, 12)
    novel = noisy(np.full((32, 32), 0.5, np.float32), 0.2)
    samples = np.stack([train[5], novel])
    highest = memorisation.highest_ssim_to_references(samples, np.array([positions[5], positions[5]]),
                                                      [(train[:6], positions[:6]), (train[6:], positions[6:])],
                                                      window=0.2, top_k=2)
    assert highest[0] == pytest.approx(1.0)
    assert highest[1] < 0.5
    summary = memorisation.memorisation_summary(highest, threshold=0.95)
    assert summary["share_above_threshold"] == 0.5 and summary["n_above_threshold"] == 1


def test_memorisation_only_searches_training_slices_near_the_sample_position():
    train, _ = synthetic_brain_slices(4, 32, seed=5)
    positions = np.array([0.0, 0.1, 0.9, 1.0])
    highest = memorisation.highest_ssim_to_references(train[[3]], np.array([0.05]), [(train, positions)],
                                                      window=0.1, top_k=4)
    assert highest[0] < 0.99  # its copy sits at position 1.0, outside the window
    lonely = memorisation.highest_ssim_to_references(train[[3]], np.array([0.5]), [(train, positions)],
                                                     window=0.1, top_k=4)
    assert np.isnan(lonely[0])


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


def probe_data(n: int, separable: bool, seed: int):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 8)) + (3.0 * y[:, None] if separable else 0)
    return x, y


def test_probe_is_near_chance_on_shuffled_labels():
    x, y = probe_data(400, separable=True, seed=0)
    y = np.random.default_rng(1).permutation(y)
    result = probe.probe_auroc(x[:200], y[:200], x[200:], y[200:], np.arange(200), cv_folds=3, n_cs=4, seed=0)
    assert abs(result["auroc"] - 0.5) < 0.12


def test_probe_is_near_perfect_on_a_separable_toy():
    x, y = probe_data(80, separable=True, seed=2)
    result = probe.probe_auroc(x[:40], y[:40], x[40:], y[40:], np.arange(40), cv_folds=3, n_cs=4, seed=0)
    assert result["auroc"] > 0.95 and result["reason"] is None and result["C"] > 0


def test_probe_reports_undefined_auroc_with_a_reason_for_a_single_class_test_set():
    x, y = probe_data(40, separable=True, seed=3)
    result = probe.probe_auroc(x[:30], y[:30], x[30:], np.ones(10, int), np.arange(30), cv_folds=3, n_cs=4, seed=0)
    assert result["auroc"] is None and "one class" in result["reason"]
    result = probe.probe_auroc(x[:30], np.ones(30, int), x[30:], y[30:], np.arange(30), cv_folds=3, n_cs=4, seed=0)
    assert result["auroc"] is None and "0 negative" in result["reason"]


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


# --------------------------------------------------------------------------------------------- anomaly


def test_anomaly_auroc_is_high_for_an_obvious_lesion_with_a_perfect_reconstructor():
    images, masks = synthetic_brain_slices(4, 48, seed=7)
    lesioned, lesions = anomaly.insert_synthetic_lesions(images, masks, seed=0, radius_fraction=(0.08, 0.12),
                                                         amplitude=0.5)
    assert lesions.any(axis=(1, 2)).all() and not (lesions & ~masks).any()
    assert (np.abs(lesioned - images)[~masks] == 0).all()
    perfect = anomaly.anomaly_score_maps(lesioned, images, sigma_px=1.0)
    assert anomaly.pixel_auroc(perfect, lesions, masks) > 0.95
    copycat = anomaly.anomaly_score_maps(lesioned, lesioned, sigma_px=1.0)  # reproduces the lesion: no signal
    assert anomaly.pixel_auroc(copycat, lesions, masks) == pytest.approx(0.5)


def test_pixel_auroc_is_undefined_without_lesion_pixels():
    _, masks = synthetic_brain_slices(1, 32, seed=0)
    assert anomaly.pixel_auroc(np.ones(masks.shape), np.zeros(masks.shape, bool), masks) is None


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
