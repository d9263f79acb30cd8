"""Prior and generation sections: the prior's likelihood against baselines, and its samples against real slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainvq.evaluation.inputs import EvaluationRun
from brainvq.evaluation.reconstruction import model_outputs
from brainvq.measures.distributions import frechet_distance, matched_real_indices, mean_pairwise_ms_ssim
from brainvq.measures.memorisation import highest_ssim_to_references, memorisation_summary
from brainvq.measures.similarity import ms_ssim_window_px
from brainvq.shards import load_shard_rows, shard_chunks, shard_index

FD_LABEL = "FD (VQ-VAE encoder features; not comparable to FID)"


def prior_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return the prior's test NLL in bits per code next to the uniform and unigram baselines."""
    test_index, test_codes = run.index_of("test"), run.split_codes("test")
    prior, k = run.prior, run.codebook_size
    bits = prior.bits_per_code(test_codes, test_index["slice_position"].to_numpy(np.float32), prior.labels(test_index))
    return {"bits_per_code": float(bits), "uniform_bits_per_code": float(prior.uniform_bits(k)),
            "unigram_bits_per_code": float(prior.unigram_bits(run.split_codes("train"), test_codes, k)),
            "n_test_maps": int(len(test_codes))}, {}


def matched_training_images(train_paths: list[Path], sample_positions: np.ndarray, settings: dict) -> np.ndarray:
    """Return training slices matched in position to the samples (the real-vs-real FD reference)."""
    meta = shard_index(train_paths)
    picks = matched_real_indices(sample_positions, meta["slice_position"].to_numpy(), settings["match_position_window"],
                                 settings["seed"] + 1)
    return load_shard_rows(train_paths, meta.iloc[picks])


def generation_evaluation(samples: dict, train_paths: list[Path], real_images: np.ndarray,
                          real_features: np.ndarray, sample_features: np.ndarray,
                          train_reference_features: np.ndarray | None, settings: dict) -> tuple[dict, np.ndarray]:
    """Return generation metrics and each sample's highest SSIM to a training slice.

    Args:
        samples: ``read_samples`` output.
        train_paths: training shards (memorisation candidates).
        real_images, real_features: test slices matched in position to the samples, and their features.
        sample_features: the samples' pooled VQ-VAE encoder features.
        train_reference_features: features of training slices matched in position (the FD reference), or None.
        settings: the ``evaluate`` config section.
    """
    seed = settings["seed"]
    train_positions = shard_index(train_paths)["slice_position"].to_numpy(np.float64)
    # Sparse positions (few slices per scan): widen a sample's window to its nearest training slice.
    nearest = np.abs(samples["slice_position"][:, None] - train_positions[None]).min(axis=1)
    windows = np.maximum(settings["memorisation_position_window"], nearest + 1e-6)
    references = ((c["images"], c["slice_position"]) for c in shard_chunks(train_paths, with_masks=False))
    highest = highest_ssim_to_references(samples["images"], samples["slice_position"], references, windows,
                                         settings["memorisation_top_k"])
    metrics = {
        "n_samples": int(len(samples["images"])),
        "diversity": {
            "samples_mean_pairwise_ms_ssim": mean_pairwise_ms_ssim(samples["images"], settings["diversity_max_pairs"],
                                                                   seed),
            "real_mean_pairwise_ms_ssim": mean_pairwise_ms_ssim(real_images, settings["diversity_max_pairs"], seed),
        },
        "memorisation": memorisation_summary(highest, settings["memorisation_threshold"]),
        "frechet_distance": {"label": FD_LABEL, "samples_vs_test": None, "train_vs_test": None,
                             "n": int(len(sample_features))},
    }
    if len(sample_features) >= 2:
        metrics["frechet_distance"]["samples_vs_test"] = frechet_distance(sample_features, real_features)
        if train_reference_features is not None:
            metrics["frechet_distance"]["train_vs_test"] = frechet_distance(train_reference_features, real_features)
    return metrics, highest


def samples_next_to_real(samples: dict, real_images: np.ndarray, real_positions: np.ndarray,
                         positions: list[float] | None, per_position: int) -> dict:
    """Return figure arrays: at each requested position the nearest samples and their matched real slices.

    ``positions`` None takes the samples' distinct positions (at most 6, evenly chosen).
    """
    if positions is None:
        distinct = np.unique(samples["slice_position"])
        positions = distinct[np.unique(np.linspace(0, len(distinct) - 1, min(6, len(distinct))).round().astype(int))]
    per_position = min(per_position, len(samples["images"]))
    order = np.argsort(np.abs(samples["slice_position"][None] - np.asarray(positions)[:, None]), axis=1,
                       kind="stable")[:, :per_position]
    return {"samples_images": samples["images"][order], "samples_positions": samples["slice_position"][order],
            "real_images": real_images[order], "real_positions": real_positions[order],
            "requested_positions": np.asarray(positions, np.float64)}


def generation_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return (generation metrics, figure arrays): samples against test slices matched in position."""
    settings, samples = run.settings, run.samples
    batch = settings["batch_size"]
    real_positions = run.test_slices["slice_position"].to_numpy()
    matched = matched_real_indices(samples["slice_position"], real_positions, settings["match_position_window"],
                                   settings["seed"])
    real_images = run.test_images(matched)
    sample_features = model_outputs(run.model, samples["images"], run.device, batch, "features")
    real_features = model_outputs(run.model, real_images, run.device, batch, "features")
    train_reference = matched_training_images(run.train_paths, samples["slice_position"], settings)
    train_features = (model_outputs(run.model, train_reference, run.device, batch, "features")
                      if len(train_reference) >= 2 else None)
    metrics, highest = generation_evaluation(samples, run.train_paths, real_images, real_features, sample_features,
                                             train_features, settings)
    figures = {**samples_next_to_real(samples, real_images, real_positions[matched], settings["figure_positions"],
                                      settings["samples_per_position"]),
               "memorisation_highest_ssim": highest}
    return metrics, figures


def ms_ssim_window(run: EvaluationRun) -> int | None:
    """Return the MS-SSIM window the run's image size allows (reported beside the MS-SSIM numbers)."""
    return ms_ssim_window_px(*run.samples["images"].shape[1:])
