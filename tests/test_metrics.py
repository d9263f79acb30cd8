"""Evaluation metrics (brainvq/metrics.py) on tiny images made in each test."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import structural_similarity

from brainvq import metrics, reporting
from conftest import synthetic_brain_slices


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
    assert metrics.brain_masked_ssim(x, y, mask) == pytest.approx(expected, abs=1e-12)
    assert metrics.ssim(x, y) == pytest.approx(whole, abs=1e-12)
    assert expected < whole  # the background no longer inflates the score


def test_small_brain_box_grows_to_the_ssim_window_and_stays_inside_the_image():
    mask = np.zeros((32, 32), bool)
    mask[0:3, 30:32] = True
    rows, cols = metrics.brain_bounding_box(mask, metrics.SSIM_WINDOW_PX)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (11, 11)
    assert rows.start == 0 and cols.stop == 32
    assert mask[rows, cols].sum() == mask.sum()


def test_identical_pair_gives_perfect_metrics():
    images, masks = synthetic_brain_slices(2, 64, seed=0)
    table = metrics.reconstruction_metric_table(images, images.copy(), masks)
    assert np.allclose(table[["ssim", "ssim_brain", "ms_ssim", "ms_ssim_brain"]], 1.0, atol=1e-6)
    assert (table[["mse", "mse_brain"]] == 0).all().all()
    assert np.isinf(table[["psnr_db", "psnr_brain_db"]]).all().all()


def test_every_metric_worsens_monotonically_as_noise_grows():
    images, masks = synthetic_brain_slices(1, 64, seed=1)
    sigmas = [0.01, 0.03, 0.1, 0.3]
    noisy_stack = np.stack([noisy(images[0], s) for s in sigmas])
    table = metrics.reconstruction_metric_table(np.repeat(images, len(sigmas), 0), noisy_stack,
                                                np.repeat(masks, len(sigmas), 0))
    for higher_is_better in ("ssim", "ssim_brain", "ms_ssim", "ms_ssim_brain", "psnr_db", "psnr_brain_db"):
        assert (np.diff(table[higher_is_better]) < 0).all(), higher_is_better
    for lower_is_better in ("mse", "mse_brain"):
        assert (np.diff(table[lower_is_better]) > 0).all(), lower_is_better


def test_ms_ssim_is_undefined_below_48_px_and_uses_a_smaller_window_below_176_px():
    assert metrics.ms_ssim_window_px(32, 32) is None
    assert metrics.ms_ssim_window_px(48, 48) == 3
    assert metrics.ms_ssim_window_px(128, 128) == 7
    assert metrics.ms_ssim_window_px(256, 256) == 11
    images, masks = synthetic_brain_slices(1, 32, seed=0)
    table = metrics.reconstruction_metric_table(images, images, masks)
    assert table[["ms_ssim", "ms_ssim_brain"]].isna().all().all()


def test_ms_ssim_equals_monai_compute_ms_ssim_with_the_same_settings():
    monai_regression = pytest.importorskip("monai.metrics.regression")
    import torch

    images, masks = synthetic_brain_slices(3, 64, seed=2)
    degraded = np.stack([noisy(images[0], 0.05), noisy(images[1], 0.2), np.roll(images[2], 3, axis=1)])
    ours = metrics.ms_ssim_batch(images, degraded, window_px=3)
    reference = monai_regression.compute_ms_ssim(
        torch.from_numpy(images)[:, None], torch.from_numpy(degraded)[:, None], spatial_dims=2, data_range=1.0,
        kernel_size=3, kernel_sigma=1.5, weights=metrics.MS_SSIM_WEIGHTS).reshape(-1).numpy()
    assert ours == pytest.approx(reference, abs=2e-5)
    with pytest.raises(metrics.ImageSizeError, match="too small"):
        metrics.ms_ssim_batch(images, degraded, window_px=5)


def test_summaries_cover_slices_and_subjects_with_the_5th_percentile():
    per_slice = pd.DataFrame({"scan": ["A"] * 4 + ["B"] * 2, "subject": ["A"] * 4 + ["B"] * 2,
                              **{m: [0.9, 0.8, 0.7, 0.6, 0.2, 0.4] for m in metrics.RECONSTRUCTION_METRICS}})
    per_subject = metrics.per_subject_table(per_slice)
    assert per_subject["n_slices"].tolist() == [4, 2]
    assert per_subject["ssim"].tolist() == pytest.approx([0.75, 0.3])
    summary = metrics.reconstruction_summary(per_slice, per_subject)["ssim"]
    assert summary["over_slices"]["median"] == pytest.approx(0.65)
    assert summary["over_slices"]["p5"] == pytest.approx(np.percentile([0.9, 0.8, 0.7, 0.6, 0.2, 0.4], 5))
    assert summary["over_subjects"] == {"mean": pytest.approx(0.525), "median": pytest.approx(0.525),
                                        "p5": pytest.approx(0.3225), "n": 2}


# ------------------------------------------------------------------------------------ codebook, FD


def test_perplexity_counts_equally_used_codes_and_ignores_unused_ones():
    counts = metrics.code_counts([np.array([[0, 1], [2, 3]]), np.array([[3, 2], [1, 0]])], codebook_size=8)
    usage = metrics.codebook_usage(counts)
    assert usage == {"codebook_size": 8, "codes_used": 4, "usage_fraction": 0.5, "perplexity": pytest.approx(4.0)}


def test_codes_outside_the_codebook_are_rejected():
    with pytest.raises(metrics.EvaluationInputError, match="quantize"):
        metrics.code_counts([np.array([0, 8])], codebook_size=8)


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_mean_shift():
    features = np.random.default_rng(0).normal(size=(200, 4))
    assert metrics.frechet_distance(features, features) == pytest.approx(0, abs=1e-6)
    shifts = [metrics.frechet_distance(features, features + d) for d in (0.5, 1.0, 2.0)]
    assert shifts == pytest.approx([4 * 0.25, 4 * 1.0, 4 * 4.0], rel=1e-6)


# ------------------------------------------------------------------------------------------ generation


def test_memorisation_flags_an_exact_copy_of_a_training_slice():
    train, _ = synthetic_brain_slices(12, 32, seed=4)
    positions = np.linspace(0, 1, 12)
    novel = noisy(np.full((32, 32), 0.5, np.float32), 0.2)
    samples = np.stack([train[5], novel])
    highest = metrics.highest_ssim_to_references(samples, np.array([positions[5], positions[5]]),
                                                 [(train[:6], positions[:6]), (train[6:], positions[6:])],
                                                 window=0.2, top_k=2)
    assert highest[0] == pytest.approx(1.0)
    assert highest[1] < 0.5
    summary = metrics.memorisation_summary(highest, threshold=0.95)
    assert summary["share_above_threshold"] == 0.5 and summary["n_above_threshold"] == 1


def test_memorisation_only_searches_training_slices_near_the_sample_position():
    train, _ = synthetic_brain_slices(4, 32, seed=5)
    positions = np.array([0.0, 0.1, 0.9, 1.0])
    highest = metrics.highest_ssim_to_references(train[[3]], np.array([0.05]), [(train, positions)], window=0.1,
                                                 top_k=4)
    assert highest[0] < 0.99  # its copy sits at position 1.0, outside the window
    lonely = metrics.highest_ssim_to_references(train[[3]], np.array([0.5]), [(train, positions)], window=0.1,
                                                top_k=4)
    assert np.isnan(lonely[0])


def test_identical_samples_have_no_diversity_and_varied_slices_some():
    images, _ = synthetic_brain_slices(4, 64, seed=6)
    assert metrics.mean_pairwise_ms_ssim(np.repeat(images[:1], 4, 0), max_pairs=10, seed=0) == pytest.approx(1.0)
    assert metrics.mean_pairwise_ms_ssim(images, max_pairs=10, seed=0) < 0.95
    assert metrics.mean_pairwise_ms_ssim(images[:1], max_pairs=10, seed=0) is None


def test_matched_real_slices_lie_within_the_window_and_are_not_reused_while_others_remain():
    real = np.array([0.1, 0.1, 0.5, 0.52, 0.9])
    picks = metrics.matched_real_indices(np.array([0.1, 0.1, 0.5, 0.5]), real, window=0.05, seed=0)
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
    result = metrics.probe_auroc(x[:200], y[:200], x[200:], y[200:], np.arange(200), cv_folds=3, n_cs=4, seed=0)
    assert abs(result["auroc"] - 0.5) < 0.12


def test_probe_is_near_perfect_on_a_separable_toy():
    x, y = probe_data(80, separable=True, seed=2)
    result = metrics.probe_auroc(x[:40], y[:40], x[40:], y[40:], np.arange(40), cv_folds=3, n_cs=4, seed=0)
    assert result["auroc"] > 0.95 and result["reason"] is None and result["C"] > 0


def test_probe_reports_undefined_auroc_with_a_reason_for_a_single_class_test_set():
    x, y = probe_data(40, separable=True, seed=3)
    result = metrics.probe_auroc(x[:30], y[:30], x[30:], np.ones(10, int), np.arange(30), cv_folds=3, n_cs=4, seed=0)
    assert result["auroc"] is None and "one class" in result["reason"]
    result = metrics.probe_auroc(x[:30], np.ones(30, int), x[30:], y[30:], np.arange(30), cv_folds=3, n_cs=4, seed=0)
    assert result["auroc"] is None and "0 negative" in result["reason"]


def test_probe_targets_parse_and_use_the_training_median():
    table = pd.DataFrame({"atrophy": [1.0, 2.0, 3.0, 10.0, None], "sex": ["F", "M", "M", "F", ""],
                          "site": ["a", "b", "c", "a", "b"]})
    is_train = np.array([True, True, True, False, False])
    labels, meaning = metrics.binary_probe_labels(table, metrics.parse_probe_target("atrophy>median"), is_train)
    assert labels.tolist()[:4] == [0.0, 0.0, 1.0, 1.0] and math.isnan(labels.iloc[4]) and "> 2" in meaning
    labels, meaning = metrics.binary_probe_labels(table, metrics.parse_probe_target("sex"), is_train)
    assert labels.tolist()[:4] == [0.0, 1.0, 1.0, 0.0] and math.isnan(labels.iloc[4]) and "'M'" in meaning
    assert metrics.parse_probe_target("cdr > 0.5") == metrics.ProbeTarget("cdr", 0.5)
    with pytest.raises(metrics.ProbeTargetError, match="threshold rule"):
        metrics.binary_probe_labels(table, metrics.parse_probe_target("site"), is_train)
    with pytest.raises(metrics.ProbeTargetError, match="set evaluate.probe_target"):
        metrics.binary_probe_labels(table, metrics.parse_probe_target("cdr>0"), is_train)
    with pytest.raises(metrics.ProbeTargetError, match="fix it in the config"):
        metrics.parse_probe_target("cdr >= 0")
    config = {"probe_target": None, "probe_target_by_source": {"ixi": "sex"}}
    assert metrics.probe_target_spec(config, "ixi") == "sex"


# --------------------------------------------------------------------------------------------- anomaly


def test_anomaly_auroc_is_high_for_an_obvious_lesion_with_a_perfect_reconstructor():
    images, masks = synthetic_brain_slices(4, 48, seed=7)
    lesioned, lesions = metrics.insert_synthetic_lesions(images, masks, seed=0, radius_fraction=(0.08, 0.12),
                                                         amplitude=0.5)
    assert lesions.any(axis=(1, 2)).all() and not (lesions & ~masks).any()
    assert (np.abs(lesioned - images)[~masks] == 0).all()
    perfect = metrics.anomaly_score_maps(lesioned, images, sigma_px=1.0)
    assert metrics.pixel_auroc(perfect, lesions, masks) > 0.95
    copycat = metrics.anomaly_score_maps(lesioned, lesioned, sigma_px=1.0)  # reproduces the lesion: no signal
    assert metrics.pixel_auroc(copycat, lesions, masks) == pytest.approx(0.5)


def test_pixel_auroc_is_undefined_without_lesion_pixels():
    _, masks = synthetic_brain_slices(1, 32, seed=0)
    assert metrics.pixel_auroc(np.ones(masks.shape), np.zeros(masks.shape, bool), masks) is None


# ----------------------------------------------------------------------------------------------- output


def test_metrics_json_is_strict_and_written_completely(tmp_path):
    result = metrics.EvaluationResult(
        metrics={"psnr": math.inf, "x": np.float32(0.5), "n": np.int64(3), "arr": np.arange(2), "none": math.nan},
        per_slice=pd.DataFrame({"scan": ["A"], "ssim": [1.0]}), per_subject=pd.DataFrame({"scan": ["A"]}),
        figures={"codebook_counts": np.arange(4), "examples_label": np.array(["best"])})
    paths = [tmp_path / "eval" / name for name in ("metrics.json", "per_subject.csv", "per_slice.csv", "figures.npz")]
    metrics.write_evaluation(result, *paths)
    assert json.loads(paths[0].read_text()) == {"psnr": None, "x": 0.5, "n": 3, "arr": [0, 1], "none": None}
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(p.name for p in paths)
    with np.load(paths[3]) as npz:  # no pickle needed to read it back
        assert npz["examples_label"].tolist() == ["best"]


# ------------------------------------------------------------------------------------ whole evaluation


class BlurryAutoencoder:
    """A stand-in VQ-VAE: reconstructs by 2x2 average pooling, features are 4x4-pooled intensities."""

    def __init__(self):
        import torch

        self.torch = torch

    def eval(self):
        return self

    def __call__(self, x):
        f = self.torch.nn.functional
        return f.interpolate(f.avg_pool2d(x, 2), scale_factor=2), {}

    def encode_features(self, x):
        pooled = self.torch.nn.functional.avg_pool2d(x, 4)
        return self.torch.cat([pooled, pooled ** 2], dim=1)


def tiny_run(tmp_path, shards_dir):
    """Write split.csv, codes/ and samples.h5 that agree with the tiny_shards fixture."""
    import h5py

    from brainvq.data import read_slice_metadata

    rows, index = [], []
    (tmp_path / "codes" / "train").mkdir(parents=True)
    (tmp_path / "codes" / "test").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        meta = read_slice_metadata(shards_dir / f"{split}-000.h5")
        for k, scan in enumerate(sorted(set(meta["scan"]))):
            n = int((meta["scan"] == scan).sum())
            # Two code "dialects" so the code-histogram probe has something to find.
            codes = rng.integers(0, 4, (n, 8, 8)) + 4 * (k % 2)
            np.save(tmp_path / "codes" / split / f"{scan}.npy", codes.astype(np.int16))
            positions = meta["slice_position"][meta["scan"] == scan]
            index += [{"subject": scan, "scan": scan, "split": split, "slice_index": i, "slice_position": positions[i],
                       "file": f"{split}/{scan}.npy", "row": i} for i in range(n)]
            rows.append({"scan": scan, "subject": scan, "session": "", "split": split,
                         "validation": split == "train" and k == 0, "atrophy": float(k % 2) + 0.1 * k})
    pd.DataFrame(index).to_csv(tmp_path / "codes" / "index.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "split.csv", index=False)
    train = h5py.File(shards_dir / "train-000.h5", "r")["images"][()].astype(np.float32)
    with h5py.File(tmp_path / "samples.h5", "w") as f:
        images = np.concatenate([train[:2], noisy(train[10:16], 0.1)])  # two memorised samples
        f["codes"] = np.zeros((8, 8, 8), np.int16)
        f["images"] = images
        # The first two sit at their training originals' positions (0 and 1/7 in tiny_shards).
        f["slice_position"] = np.array([0, 1 / 7, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0], np.float32)
        f.create_dataset("label", data=np.array([""] * 8, dtype=object), dtype=h5py.string_dtype())
    return metrics.EvaluationInputs(split_csv=tmp_path / "split.csv", shards_dir=shards_dir,
                                    codes_dir=tmp_path / "codes", samples=tmp_path / "samples.h5")


def test_evaluate_run_scores_only_test_subjects_and_writes_every_output(tmp_path, tiny_shards):
    from brainvq.config import load_config

    inputs = tiny_run(tmp_path, tiny_shards)
    settings = load_config(overrides={"evaluate": {"anomaly_n_slices": 4, "anomaly_radius_fraction": [0.1, 0.15]}})
    scorer = metrics.PriorScorer(bits_per_code=lambda codes, positions, labels: 2.0, uniform_bits=math.log2,
                                 unigram_bits=lambda train, test, k: 2.5, labels=lambda rows: None)
    result = metrics.evaluate_run(inputs, BlurryAutoencoder(), scorer, codebook_size=16,
                                  settings=settings["evaluate"], source="demo", device="cpu")

    assert set(result.per_slice["scan"]) == {"T00", "T01"} and len(result.per_slice) == 16
    assert result.per_subject["scan"].tolist() == ["T00", "T01"]
    m = result.metrics
    assert 0 < m["reconstruction"]["ssim_brain"]["over_slices"]["mean"] < 1
    assert m["reconstruction"]["ssim_brain"]["over_subjects"]["n"] == 2
    assert m["codebook"]["codes_used"] == 8 and m["codebook"]["codebook_size"] == 16
    assert m["prior"] == {"bits_per_code": 2.0, "uniform_bits_per_code": 4.0, "unigram_bits_per_code": 2.5,
                          "n_test_maps": 16}
    assert m["generation"]["memorisation"]["n_above_threshold"] >= 2
    assert m["generation"]["frechet_distance"]["label"].startswith("FD (VQ-VAE encoder features")
    assert m["generation"]["frechet_distance"]["samples_vs_test"] >= 0
    assert m["probe"]["target"] == "atrophy>median" and m["probe"]["codes"]["n_test"] == 2
    assert m["anomaly"]["pixel_auroc"] is not None and m["anomaly"]["n_slices"] == 4
    assert list(result.figures["examples_label"]) == ["best", "median", "worst"]
    assert set(reporting.FIGURE_ARRAYS) <= set(result.figures)  # everything the report draws
    assert result.figures["samples_images"].shape[:2] == (6, 3)  # 6 of the 8 distinct sample positions

    outputs = [tmp_path / "eval" / n for n in ("metrics.json", "per_subject.csv", "per_slice.csv", "figures.npz")]
    metrics.write_evaluation(result, *outputs)
    written = json.loads(outputs[0].read_text())
    assert written["codebook"]["codes_used"] == 8
