"""Prior and generation sections: the prior's likelihood against context-free baselines, and its samples judged
against real test slices and their reconstructions (``brainvq.evaluation.judge``), each next to its controls."""

from __future__ import annotations

import numpy as np
import torch

from brainvq.evaluation.inputs import EvaluationRun
from brainvq.evaluation.judge import (
    C2ST_PAIRS,
    FEATURES_LABEL,
    GenerationJudge,
    control_code_maps,
    fit_judge,
    judge_samples,
    real_references,
)
from brainvq.evaluation.reconstruction import model_outputs
from brainvq.measures.baselines import (
    code_grid_mask,
    masked_mean_bits,
    per_location_position_bin_bits_map,
    per_location_unigram_bits_map,
    uniform_bits_map,
    unigram_bits_map,
)
from brainvq.measures.distributions import frechet_distance, matched_real_indices, mean_pairwise_ms_ssim
from brainvq.measures.similarity import ms_ssim_window_px
from brainvq.sampling import decode_codes
from brainvq.shards import load_shard_rows, shard_chunks, shard_index

FD_LABEL = "FD (VQ-VAE encoder features; not comparable to FID)"
MASK_LABEL = "the shards' masks (the brain mask, or the head mask with preprocess.skull_strip none)"


# ------------------------------------------------------------------------------------------------ prior


def test_code_masks(run: EvaluationRun, index) -> np.ndarray:
    """Return the shard mask of each test code map's slice ``(N, H, W)``, for codes/index.csv rows ``index``."""
    rows = run.test_slices.reset_index().set_index(["scan", "slice_index"])["index"]
    return run.test_masks(rows.loc[list(zip(index["scan"], index["slice_index"]))].to_numpy())


def prior_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return the prior's test NLL in bits per code over whole maps and inside the mask, next to the uniform,
    global unigram, per-location unigram and per-location-and-position-bin unigram baselines."""
    test_index, test_codes = run.index_of("test"), run.split_codes("test")
    train_index, train_codes = run.index_of("train"), run.split_codes("train")
    test_positions = test_index["slice_position"].to_numpy(np.float32)
    prior, k, bins = run.prior, run.codebook_size, run.settings["prior_position_bins"]
    labels = prior.labels(test_index)
    inside = code_grid_mask(test_code_masks(run, test_index), test_codes.shape[1:])
    baselines = {
        "uniform": uniform_bits_map(test_codes, k),
        "unigram": unigram_bits_map(train_codes, test_codes, k),
        "per_location_unigram": per_location_unigram_bits_map(train_codes, test_codes, k),
        "per_location_position_bin_unigram": per_location_position_bin_bits_map(
            train_codes, train_index["slice_position"].to_numpy(), test_codes, test_positions, k, bins),
    }
    bits = float(prior.bits_per_code(test_codes, test_positions, labels))
    bits_map = prior.bits_map(test_codes, test_positions, labels) if prior.bits_map is not None else None
    metrics = {
        "bits_per_code": bits,
        "bits_per_code_brain": masked_mean_bits(bits_map, inside) if bits_map is not None else None,
        "uniform_bits_per_code": float(prior.uniform_bits(k)),
        "unigram_bits_per_code": float(prior.unigram_bits(train_codes, test_codes, k)),
        **{f"{name}_bits_per_code": masked_mean_bits(values) for name, values in baselines.items()
           if name.startswith("per_location")},
        "brain": {f"{name}_bits_per_code": masked_mean_bits(values, inside) for name, values in baselines.items()},
        "bits_over_per_location_unigram": None,
        "position_bins": bins, "mask": MASK_LABEL, "brain_code_share": float(inside.mean()),
        "n_test_maps": int(len(test_codes)),
    }
    metrics["bits_over_per_location_unigram"] = bits / metrics["per_location_unigram_bits_per_code"]
    return metrics, {}


# ------------------------------------------------------------------------------------------- generation


def matched_training_images(train_paths, sample_positions: np.ndarray, settings: dict) -> np.ndarray:
    """Return training slices matched in position to the samples (the real-vs-real references)."""
    meta = shard_index(train_paths)
    picks = matched_real_indices(sample_positions, meta["slice_position"].to_numpy(), settings["match_position_window"],
                                 settings["seed"] + 1)
    return load_shard_rows(train_paths, meta.iloc[picks])


def position_training_slices(run: EvaluationRun) -> tuple[np.ndarray, np.ndarray]:
    """Return at most ``position_train_slices`` training slices, evenly spread over the training shards, and
    their positions: what the position regressor learns from."""
    meta = shard_index(run.train_paths)
    n = min(run.settings["position_train_slices"], len(meta))
    picks = meta.iloc[np.unique(np.linspace(0, len(meta) - 1, n).round().astype(int))]
    return load_shard_rows(run.train_paths, picks), picks["slice_position"].to_numpy(np.float32)


def test_code_of_each_slice(run: EvaluationRun) -> np.ndarray:
    """Return the code map of each test slice ``(N, h, w)``, in ``run.test_slices`` order."""
    index = run.code_index[run.code_index["split"] == "test"].set_index(["scan", "slice_index"])["row"]
    rows = index.loc[list(zip(run.test_slices["scan"], run.test_slices["slice_index"]))].to_numpy()
    return np.stack([run.codes[scan][row] for scan, row in zip(run.test_slices["scan"], rows)])


def run_judge(run: EvaluationRun) -> GenerationJudge:
    """Return the run's :class:`GenerationJudge` (decoder: the run's VQ-VAE)."""
    settings = run.settings
    device = torch.device(run.device) if isinstance(run.device, str) else run.device

    def decode(codes: np.ndarray) -> np.ndarray:
        return decode_codes(run.model, torch.as_tensor(np.asarray(codes), dtype=torch.long), settings["batch_size"],
                            device)

    train_index = run.index_of("train")
    return fit_judge(
        settings, run.codebook_size, decode, run.split_codes("train"), train_index["slice_position"].to_numpy(),
        test_code_of_each_slice(run), run.test_slices["slice_position"].to_numpy(),
        run.test_slices["subject"].to_numpy(), run.test_images,
        lambda positions: matched_training_images(run.train_paths, positions, settings), position_training_slices(run))


def vqvae_feature_distance(run: EvaluationRun, samples: np.ndarray, real: np.ndarray, train: np.ndarray) -> dict:
    """Return the (labelled) Fréchet distance in the judged VQ-VAE's own encoder features, and its train-vs-test
    floor: kept for comparison with earlier runs; it cannot see what the VQ-VAE cannot."""
    batch = run.settings["batch_size"]
    features = {name: model_outputs(run.model, images, run.device, batch, "features")
                for name, images in (("samples", samples), ("real", real), ("train", train))}
    enough = min(len(f) for f in features.values()) >= 2
    return {"label": FD_LABEL, "n": int(len(samples)),
            "samples_vs_test": frechet_distance(features["samples"], features["real"]) if enough else None,
            "train_vs_test": frechet_distance(features["train"], features["real"]) if enough else None}


def judged_controls(judge: GenerationJudge, samples: dict, names) -> dict:
    """Return the measures of each control set (known-good and known-bad stand-ins for samples)."""
    out = {}
    for name, codes in control_code_maps(judge, samples["codes"], samples["slice_position"], names).items():
        out[name], _ = judge_samples(judge, judge.decode(codes), codes, samples["slice_position"],
                                     pairs=("samples_vs_reconstructions",))
    return out


def generation_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return (generation metrics, figure arrays): the samples judged against real test slices matched in position
    and their reconstructions, next to real-vs-real references and control sets."""
    settings, samples = run.settings, run.samples
    positions = samples["slice_position"]
    judge = run_judge(run)
    metrics, per_sample = judge_samples(judge, samples["images"], samples["codes"].astype(np.int64), positions,
                                        C2ST_PAIRS)
    chunks = ((c["images"], c["slice_position"]) for c in shard_chunks(run.test_paths, with_masks=False))
    references, real_scores = real_references(judge, positions, chunks)
    metrics["position_error"].update(references["position_error"])
    metrics["features"].update({"label": FEATURES_LABEL, "train_vs_test": references["features"]})
    metrics["copies"].update({"calibration": judge.copy_calibration, "real_test": references["copies"]})

    real_images = run.test_images(per_sample["matched_test_rows"])
    train_images = judge.train_images(positions)
    metrics["diversity"] = {
        "samples_mean_pairwise_ms_ssim": mean_pairwise_ms_ssim(samples["images"], settings["diversity_max_pairs"],
                                                               settings["seed"]),
        "real_mean_pairwise_ms_ssim": mean_pairwise_ms_ssim(real_images, settings["diversity_max_pairs"],
                                                            settings["seed"]),
    }
    metrics["frechet_distance_vqvae"] = vqvae_feature_distance(run, samples["images"], real_images, train_images)
    metrics["controls"] = judged_controls(judge, samples, settings["generation_controls"])

    neighbours = judge.decode(judge.train_codes[per_sample["nearest"]])
    figures = {
        **samples_next_to_real(samples, real_images, judge.test_positions[per_sample["matched_test_rows"]],
                               settings["figure_positions"], settings["samples_per_position"]),
        "generation_samples": samples["images"], "generation_positions": positions.astype(np.float64),
        "generation_neighbours": neighbours, "generation_neighbour_positions": judge.train_positions[
            per_sample["nearest"]].astype(np.float64),
        "generation_hamming": per_sample["hamming"], "generation_ssim": per_sample["ssim"],
        "generation_flagged": per_sample["flagged"],
        "copies_real_hamming": real_scores["hamming"], "copies_real_ssim": real_scores["ssim"],
    }
    return metrics, figures


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


def ms_ssim_window(run: EvaluationRun) -> int | None:
    """Return the MS-SSIM window the run's image size allows (reported beside the MS-SSIM numbers)."""
    return ms_ssim_window_px(*run.samples["images"].shape[1:])
