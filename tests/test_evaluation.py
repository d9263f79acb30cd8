"""Rule evaluate's orchestration (brainvq/evaluation/): a whole evaluation on tiny files made in each test."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from brainvq import evaluation, reporting
from brainvq.evaluation import anomaly as healing
from brainvq.config import load_config
from brainvq.measures.similarity import RECONSTRUCTION_METRICS
from brainvq.measures.statistics import per_scan_means
from brainvq.models.pixelcnn import GatedPixelCNN
from brainvq.shards import read_slice_metadata
from brainvq.sources import get_source
from conftest import synthetic_brain_slices


def noisy(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    return np.clip(image + np.random.default_rng(seed).normal(0, sigma, image.shape), 0, 1).astype(np.float32)


def test_probe_target_defaults_to_the_source_rule():
    config = {"probe_target": "auto"}
    assert evaluation.probe_target_spec(config, get_source("ixi").defaults) == "sex"
    assert evaluation.probe_target_spec({**config, "probe_target": "age>60"}, get_source("ixi").defaults) == "age>60"


def test_reconstruction_statistics_are_over_slices_scans_and_subjects():
    # One subject with two scans (a good one, a bad one), one subject with one scan.
    per_slice = pd.DataFrame({"scan": ["X1", "X1", "X2", "Y1"], "subject": ["X", "X", "X", "Y"],
                              **{m: [0.9, 0.9, 0.3, 0.5] for m in RECONSTRUCTION_METRICS}})
    summary = evaluation.reconstruction_summary(per_slice, per_scan_means(per_slice, RECONSTRUCTION_METRICS))
    assert set(summary) == set(RECONSTRUCTION_METRICS)
    ssim = summary["ssim"]
    assert [ssim[unit]["n"] for unit in ("over_slices", "over_scans", "over_subjects")] == [4, 3, 2]
    assert ssim["over_scans"]["mean"] == pytest.approx((0.9 + 0.3 + 0.5) / 3)
    assert ssim["over_subjects"]["mean"] == pytest.approx((0.6 + 0.5) / 2)


def test_a_model_without_codebook_is_refused_with_the_fix():
    class Continuous:
        codebook_size = None

    with pytest.raises(evaluation.EvaluationInputError, match="vqvae.bottleneck vq or fsq"):
        evaluation.vqvae_codebook_size(Continuous(), "vqvae/model.pt", "none")


def test_healing_replaces_exactly_the_codes_the_prior_finds_unlikely():
    images, _ = synthetic_brain_slices(6, 32, seed=3)
    positions = np.linspace(0.3, 0.7, 6).astype(np.float32)
    vqvae, prior = BlurryAutoencoder(), tiny_prior()
    settings = {"batch_size": 4, "anomaly_heal_threshold": 0.07, "anomaly_heal_passes": 2}
    codes, healed, replaced = healing.healed_codes(vqvae, prior, images, positions, None, "cpu", settings)
    with torch.no_grad():
        logits = prior(torch.as_tensor(codes), torch.as_tensor(positions))
    own = torch.softmax(logits, 1).gather(1, torch.as_tensor(codes)[:, None])[:, 0].numpy()
    assert (replaced == (own < 0.07)).all() and 0 < replaced.mean() < 1
    assert (healed[~replaced] == codes[~replaced]).all() and (healed[replaced] != codes[replaced]).any()


# ----------------------------------------------------------------------------------------------- output


def test_metrics_json_is_strict_and_written_completely(tmp_path):
    result = evaluation.EvaluationResult(
        metrics={"psnr": math.inf, "x": np.float32(0.5), "n": np.int64(3), "arr": np.arange(2), "none": math.nan},
        per_slice=pd.DataFrame({"scan": ["A"], "ssim": [1.0]}), per_scan=pd.DataFrame({"scan": ["A"]}),
        figures={"codebook_counts": np.arange(4), "examples_label": np.array(["best"])})
    paths = [tmp_path / "eval" / name for name in ("metrics.json", "per_scan.csv", "per_slice.csv", "figures.npz")]
    evaluation.write_evaluation(result, *paths)
    assert json.loads(paths[0].read_text()) == {"psnr": None, "x": 0.5, "n": 3, "arr": [0, 1], "none": None}
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(p.name for p in paths)
    with np.load(paths[3]) as npz:  # no pickle needed to read it back
        assert npz["examples_label"].tolist() == ["best"]


# ------------------------------------------------------------------------------------ whole evaluation


class BlurryAutoencoder:
    """A stand-in VQ-VAE: reconstructs by 2x2 average pooling, features are 4x4-pooled intensities, and its codes
    are the 4x4-pooled intensity in 16 levels."""

    codebook_size = 16

    def eval(self):
        return self

    def __call__(self, x):
        return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2), {}

    def encode_features(self, x):
        pooled = F.avg_pool2d(x, 4)
        return torch.cat([pooled, pooled ** 2], dim=1)

    def encode_indices(self, x):
        return (F.avg_pool2d(x, 4)[:, 0] * 15).round().long().clamp(0, 15)

    def decode_indices(self, indices):
        return F.interpolate(indices.float()[:, None] / 15, scale_factor=4)


def tiny_prior() -> GatedPixelCNN:
    """A real (untrained, seeded) PixelCNN over the stand-in's 8x8 code maps."""
    torch.manual_seed(0)
    return GatedPixelCNN(codebook_size=16, channels=8, layers=2, cond_channels=4, map_size=(8, 8),
                         head_channels=8).eval()


def tiny_run(tmp_path, shards_dir):
    """Write split.csv, codes/ and samples.h5 that agree with the tiny_shards fixture."""
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
        sample_codes = rng.integers(0, 16, (8, 8, 8))
        sample_codes[:2] = np.load(tmp_path / "codes" / "train" / "S00.npy")[:2]  # ... and their code maps
        f["codes"] = sample_codes.astype(np.int16)
        f["images"] = images
        # The first two sit at their training originals' positions (0 and 1/7 in tiny_shards).
        f["slice_position"] = np.array([0, 1 / 7, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0], np.float32)
        f.create_dataset("label", data=np.array([""] * 8, dtype=object), dtype=h5py.string_dtype())
    return evaluation.EvaluationInputs(split_csv=tmp_path / "split.csv", shards_dir=shards_dir,
                                       codes_dir=tmp_path / "codes", samples=tmp_path / "samples.h5")


def test_evaluate_run_scores_only_test_subjects_and_writes_every_output(tmp_path, tiny_shards):
    inputs = tiny_run(tmp_path, tiny_shards)
    settings = load_config(overrides={"evaluate": {
        "anomaly_n_slices": 8, "anomaly_heal_threshold": 0.07,
        "anomaly_lesion_sizes": {"small": [0.1, 0.12], "large": [0.15, 0.2]}, "judge_image_px": 16, "c2st_epochs": 5,
        "c2st_bootstrap": 50, "position_epochs": 3, "copies_calibration_maps": 8}})
    scorer = evaluation.PriorScorer(bits_per_code=lambda codes, positions, labels: 2.0, uniform_bits=math.log2,
                                    unigram_bits=lambda train, test, k: 2.5, labels=lambda rows: None,
                                    bits_map=lambda codes, positions, labels: np.full(codes.shape, 2.0),
                                    model=tiny_prior())
    result = evaluation.evaluate_run(inputs, BlurryAutoencoder(), scorer, codebook_size=16,
                                     settings=settings["evaluate"], source_defaults=get_source("demo").defaults,
                                     device="cpu")

    assert set(result.per_slice["scan"]) == {"T00", "T01"} and len(result.per_slice) == 16
    assert result.per_scan["scan"].tolist() == ["T00", "T01"]
    assert result.per_scan["subject"].tolist() == ["T00", "T01"]
    m = result.metrics
    assert 0 < m["reconstruction"]["ssim_brain"]["over_slices"]["mean"] < 1
    assert m["reconstruction"]["ssim_brain"]["over_subjects"]["n"] == 2
    assert m["reconstruction"]["ssim_brain"]["over_scans"]["n"] == 2
    assert m["codebook"]["codes_used"] == 8 and m["codebook"]["codebook_size"] == 16
    prior = m["prior"]
    assert (prior["bits_per_code"], prior["bits_per_code_brain"], prior["uniform_bits_per_code"],
            prior["unigram_bits_per_code"], prior["n_test_maps"]) == (2.0, 2.0, 4.0, 2.5, 16)
    # Codes 0-3 or 4-7, drawn uniformly per scan: the per-location tables cost about log2(8) = 3 bits.
    assert 2.5 < prior["per_location_unigram_bits_per_code"] < 4.0
    assert prior["brain"]["uniform_bits_per_code"] == 4.0 and 0 < prior["brain_code_share"] < 1
    generation = m["generation"]
    assert set(generation["c2st"]) == {"samples_vs_reconstructions", "samples_vs_real", "reconstructions_vs_real"}
    assert all(0 <= pair["auroc"] <= 1 for pair in generation["c2st"].values())
    assert generation["position_error"]["samples"] >= 0 and generation["position_error"]["real"] >= 0
    assert generation["copies"]["n_flagged"] >= 2  # the two copied training maps
    assert generation["copies"]["real_test"]["n"] == 8
    assert generation["controls"]["training_maps"]["copies"]["share_flagged"] == 1.0
    assert generation["features"]["label"].startswith("position-regressor features")
    assert generation["frechet_distance_vqvae"]["label"].startswith("FD (VQ-VAE encoder features")
    assert generation["frechet_distance_vqvae"]["samples_vs_test"] >= 0
    assert 0 < m["reconstruction"]["ssim"]["over_subjects"]["mean_ci95"][0] <= m["reconstruction"]["ssim"][
        "over_subjects"]["mean"] <= m["reconstruction"]["ssim"]["over_subjects"]["mean_ci95"][1] < 1
    probe = m["probe"]  # every subject of the run, train and test: 4 of each class
    assert probe["target"] == "atrophy>median" and probe["n_subjects"] == 8
    assert probe["n_per_class"] == {"negative": {"subjects": 4, "scans": 4}, "positive": {"subjects": 4, "scans": 4}}
    assert probe["auroc"] == 1.0 and probe["p_value"] < 0.1 and probe["auroc_ci"][1] == 1.0  # two code dialects
    assert probe["raw_images"]["auroc"] is not None and probe["site_only"] is None  # no site column here
    anomaly = m["anomaly"]
    assert anomaly["lesions"]["n_slices"] == 8
    assert set(anomaly) >= {"vqvae_residual", "healed", "healed_masked", "mean_slice", "zscore"}
    for method in ("vqvae_residual", "healed", "healed_masked", "mean_slice", "zscore"):
        assert all(anomaly[method][key] is not None for key in ("auroc", "auprc", "dice"))
        assert set(anomaly[method]["by_lesion"]) == {"bright_small", "bright_large", "dark_small", "dark_large"}
    assert 0 < anomaly["healing"]["replaced_code_share"] < 1
    assert m["preprocess"] == {"pixel_mm": None, "mask_kind": None, "skull_strip": None, "size": 32}
    assert list(result.figures["examples_label"]) == ["best", "median", "worst"]
    assert set(reporting.FIGURE_ARRAYS) <= set(result.figures)  # everything the report draws
    assert result.figures["samples_images"].shape[:2] == (6, 3)  # 6 of the 8 distinct sample positions
    assert result.figures["anomaly_method_scores"].shape == (5, 4, 32, 32)

    outputs = [tmp_path / "eval" / n for n in ("metrics.json", "per_scan.csv", "per_slice.csv", "figures.npz")]
    evaluation.write_evaluation(result, *outputs)
    written = json.loads(outputs[0].read_text())
    assert written["codebook"]["codes_used"] == 8
    assert pd.read_csv(outputs[1])["subject"].tolist() == ["T00", "T01"]
