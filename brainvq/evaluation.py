"""Rule ``evaluate``: the trained run measured on its test subjects, written to ``eval/``.

Reads the run's split, shards, codes and samples, runs the VQ-VAE and the prior, and assembles the pure measures
of ``brainvq.measures`` (whose module docstrings define each number) into ``metrics.json``, the per-slice and
per-scan tables and the figure arrays the report draws. What is measured on what:

- **Reconstruction**: every test slice and its reconstruction (``measures.similarity``). Statistics over slices,
  over scans (a scan's value = mean of its slices) and over subjects (a subject's value = mean of its scans);
  ``eval/per_scan.csv`` has one row per scan with its ``subject``.
- **Codebook**: codes used in the test code maps and their perplexity (``measures.codebook``).
- **Prior**: the PixelCNN's test NLL in bits per code, next to log2 K (uniform) and the add-one-smoothed
  training code frequencies (unigram).
- **Diversity**: mean pairwise MS-SSIM among samples, and among real test slices matched to the samples'
  slice positions. **Memorisation**: per sample, the highest SSIM to a training slice within
  ``memorisation_position_window`` of its position (widened to the nearest training slice when none is that
  close; the ``memorisation_top_k`` nearest by pixel L2 are scored), and the share above
  ``memorisation_threshold``. **FD**: Fréchet distance between Gaussians fitted to the VQ-VAE encoder's spatially
  pooled pre-quantisation features of samples and of matched test slices (with training-vs-test slices as the
  reference); not comparable to FID.
- **Probe**: from each training scan's normalised code histogram to a binary attribute (``evaluate.probe_target``,
  else the source's default), scored on test scans; the same on each scan's mean downsampled slice as the baseline.
- **Anomaly maps**: one synthetic lesion on each of ``anomaly_n_slices`` central test slices, scored by the
  smoothed |x - recon(x)| over brain pixels.

All randomness (lesions, pair subsets, matched real slices) comes from ``evaluate.seed``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from brainvq.data import load_shard_rows, read_split, shard_chunks, shard_index, shard_paths
from brainvq.files import atomic_path, write_table_atomic, write_text_atomic
from brainvq.measures.anomaly import anomaly_score_maps, insert_synthetic_lesions, pixel_auroc
from brainvq.measures.codebook import code_counts, code_histogram, codebook_usage
from brainvq.measures.distributions import frechet_distance, matched_real_indices, mean_pairwise_ms_ssim
from brainvq.measures.memorisation import highest_ssim_to_references, memorisation_summary
from brainvq.measures.probe import binary_probe_labels, downsampled_mean_slice, parse_probe_target, probe_auroc
from brainvq.measures.similarity import RECONSTRUCTION_METRICS, ms_ssim_window_px, reconstruction_metric_table
from brainvq.measures.statistics import per_scan_means, per_subject_means, summaries_by_unit
from brainvq.prior import bits_per_code, load_code_rows, read_code_index, scan_labels, uniform_bits, unigram_bits
from brainvq.workflow import package_versions

log = logging.getLogger(__name__)

FD_LABEL = "FD (VQ-VAE encoder features; not comparable to FID)"
EVALUATION_PACKAGES = ("numpy", "scipy", "pandas", "scikit-image", "scikit-learn", "h5py", "torch")


class EvaluationInputError(ValueError):
    """An input of the evaluation (model, split, shards, codes, samples) is missing, inconsistent or empty."""


@dataclass
class EvaluationInputs:
    """The files ``evaluate`` reads (see docs/architecture.md)."""

    split_csv: Path
    shards_dir: Path
    codes_dir: Path
    samples: Path


@dataclass
class PriorScorer:
    """The prior's scoring functions (``brainvq.prior``), bound to a loaded model by the caller.

    Attributes:
        bits_per_code: ``(codes (N,h,w), positions (N,), labels (N,)) -> float``, the test NLL in bits per code.
        uniform_bits: ``K -> float``.
        unigram_bits: ``(train_codes, test_codes, K) -> float``.
        labels: code-index rows (``codes/index.csv``) -> the prior's conditioning labels ``(N,)``.
    """

    bits_per_code: Callable[[np.ndarray, np.ndarray, np.ndarray], float]
    uniform_bits: Callable[[int], float]
    unigram_bits: Callable[[np.ndarray, np.ndarray, int], float]
    labels: Callable[[pd.DataFrame], np.ndarray]


@dataclass
class EvaluationResult:
    """What ``evaluate`` writes: the metrics dict, the per-slice and per-scan tables, figure arrays."""

    metrics: dict
    per_slice: pd.DataFrame
    per_scan: pd.DataFrame
    figures: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ run inputs


def probe_target_spec(evaluate_config: dict, source: str) -> str:
    """Return the probe rule: ``evaluate.probe_target``, else the dataset default ``probe_target_by_source``."""
    return evaluate_config["probe_target"] or evaluate_config["probe_target_by_source"][source]


def vqvae_codebook_size(model, vqvae_path: str | Path, bottleneck: str) -> int:
    """Return the loaded VQ-VAE's codebook size K.

    Raises:
        EvaluationInputError: when the model has no codebook (a bottleneck other than vq or fsq).
    """
    size = getattr(model, "codebook_size", None)
    if not size:
        raise EvaluationInputError(f"{vqvae_path} has no codebook (vqvae.bottleneck={bottleneck}); "
                                   "evaluate needs vqvae.bottleneck vq or fsq")
    return int(size)


def prior_scorer(prior_model, split_df: pd.DataFrame) -> PriorScorer:
    """Return the PriorScorer of a model from ``brainvq.prior.load_prior``; labels come from split.csv's
    column named by the prior's ``condition_label`` (none for an unconditioned prior)."""
    column = getattr(prior_model, "condition_label", None)
    by_scan = scan_labels(split_df, column) if column else {}
    return PriorScorer(
        bits_per_code=lambda codes, positions, labels: bits_per_code(prior_model, codes, positions, labels),
        uniform_bits=uniform_bits,
        unigram_bits=unigram_bits,
        labels=lambda rows: [by_scan[scan] for scan in rows["scan"]] if column else None,
    )


def read_samples(path: str | Path) -> dict:
    """Return samples.h5 as arrays: ``codes, images, slice_position, label``.

    Raises:
        EvaluationInputError: when the file or one of its datasets is missing, or it holds no samples.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("codes", "images", "slice_position", "label") if k not in f]
            if missing:
                raise EvaluationInputError(f"{path} lacks datasets {missing}; re-run the sample rule")
            samples = {k: f[k][()] for k in ("codes", "images", "slice_position", "label")}
    except OSError as error:
        raise EvaluationInputError(f"cannot read {path}: {error}; re-run the sample rule") from error
    if len(samples["images"]) == 0:
        raise EvaluationInputError(f"{path} holds no samples; raise sample.n and re-run the sample rule")
    samples["images"] = samples["images"].astype(np.float32)
    return samples


def code_maps_by_scan(codes_dir: str | Path, index: pd.DataFrame) -> dict[str, np.ndarray]:
    """Return each scan's code maps ``(n_slices, h, w)`` listed in ``index`` (codes/index.csv rows), in ``row``
    order."""
    index = index.sort_values(["scan", "row"], ignore_index=True)
    codes = load_code_rows(codes_dir, index)
    return {scan: codes[rows.to_numpy()] for scan, rows in index.groupby("scan", sort=True).groups.items()}


def scan_image_features(paths: list[Path], size_px: int) -> dict[str, np.ndarray]:
    """Return each scan's mean downsampled slice (the raw-image probe features), streaming the shards."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for chunk in shard_chunks(paths, with_masks=False):
        for scan in np.unique(chunk["scan"]):
            rows = chunk["scan"] == scan
            feature = downsampled_mean_slice(chunk["images"][rows], size_px) * rows.sum()
            sums[scan] = sums.get(scan, 0) + feature
            counts[scan] = counts.get(scan, 0) + int(rows.sum())
    return {scan: sums[scan] / counts[scan] for scan in sums}


def matched_training_images(train_paths: list[Path], sample_positions: np.ndarray, settings: dict) -> np.ndarray:
    """Return training slices matched in position to the samples (the real-vs-real FD reference)."""
    meta = shard_index(train_paths)
    picks = matched_real_indices(sample_positions, meta["slice_position"].to_numpy(), settings["match_position_window"],
                                 settings["seed"] + 1)
    return load_shard_rows(train_paths, meta.iloc[picks])


# ------------------------------------------------------------------------------------------ model passes


def model_outputs(model, images: np.ndarray, device, batch_size: int, what: str) -> np.ndarray:
    """Return the VQ-VAE's reconstructions ``(N, H, W)`` clipped to [0, 1] (``what="reconstruction"``),
    or its spatially pooled pre-quantisation features ``(N, C)`` (``what="features"``)."""
    images = np.asarray(images, np.float32)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.as_tensor(images[start:start + batch_size], device=device)[:, None]
            if what == "reconstruction":
                reconstruction, _ = model(x)
                chunks.append(reconstruction.float().clamp(0, 1)[:, 0].cpu().numpy())
            else:
                features = model.encode_features(x).float()
                chunks.append((features.mean(dim=tuple(range(2, features.ndim))) if features.ndim > 2
                               else features).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0,) + np.shape(images)[1:], np.float32)


def reconstruction_pass(model, test_paths: list[Path], device, batch_size: int,
                        feature_rows: set[int]) -> tuple[pd.DataFrame, dict, dict]:
    """Reconstruct every test slice; return (per-slice table, mid-slice examples per scan, selected rows).

    ``feature_rows`` are global test-row numbers whose image and mask are kept (for matching and lesions).
    """
    tables, examples, kept = [], {}, {"row": [], "images": [], "masks": []}
    offset = 0
    for chunk in shard_chunks(test_paths):
        recon = model_outputs(model, chunk["images"], device, batch_size, "reconstruction")
        table = reconstruction_metric_table(chunk["images"], recon, chunk["masks"])
        table.insert(0, "scan", chunk["scan"])
        table.insert(1, "subject", chunk["subject"])
        table.insert(2, "slice_index", chunk["slice_index"])
        table.insert(3, "slice_position", chunk["slice_position"])
        tables.append(table)
        for scan in np.unique(chunk["scan"]):
            rows = np.flatnonzero(chunk["scan"] == scan)
            mid = rows[np.argmin(np.abs(chunk["slice_position"][rows] - 0.5))]
            gap = abs(float(chunk["slice_position"][mid]) - 0.5)
            if scan not in examples or gap < examples[scan]["gap"]:
                examples[scan] = {"gap": gap, "original": chunk["images"][mid], "reconstruction": recon[mid],
                                  "mask": chunk["masks"][mid], "position": float(chunk["slice_position"][mid])}
        for row in range(len(chunk["images"])):
            if offset + row in feature_rows:
                kept["row"].append(offset + row)
                kept["images"].append(chunk["images"][row])
                kept["masks"].append(chunk["masks"][row])
        offset += len(chunk["images"])
    kept = {k: np.asarray(v) for k, v in kept.items()}
    return pd.concat(tables, ignore_index=True), examples, kept


# ------------------------------------------------------------------------------------- metric sections


def reconstruction_summary(per_slice: pd.DataFrame, per_scan: pd.DataFrame) -> dict:
    """Return, per reconstruction metric, its summary statistics ``over_slices``, ``over_scans`` and
    ``over_subjects`` (a subject's value is the mean of its scans)."""
    per_subject = per_subject_means(per_scan, RECONSTRUCTION_METRICS)
    return summaries_by_unit(RECONSTRUCTION_METRICS, over_slices=per_slice, over_scans=per_scan,
                             over_subjects=per_subject)


def example_triplets(per_scan: pd.DataFrame, examples: dict) -> dict:
    """Return figure arrays for the best, median and worst test scans by mean brain-masked SSIM."""
    ranked = per_scan.sort_values("ssim_brain", ascending=False, ignore_index=True)
    picks = {"best": 0, "median": (len(ranked) - 1) // 2, "worst": len(ranked) - 1}
    chosen = [(label, ranked.loc[i]) for label, i in picks.items()]
    original = np.stack([examples[row["scan"]]["original"] for _, row in chosen])
    recon = np.stack([examples[row["scan"]]["reconstruction"] for _, row in chosen])
    return {
        "examples_label": np.array([label for label, _ in chosen]),
        "examples_scan": np.array([row["scan"] for _, row in chosen]),
        "examples_ssim_brain": np.array([row["ssim_brain"] for _, row in chosen], np.float64),
        "examples_position": np.array([examples[row["scan"]]["position"] for _, row in chosen], np.float64),
        "examples_original": original, "examples_reconstruction": recon,
        "examples_error": np.abs(original - recon),
        "examples_mask": np.stack([examples[row["scan"]]["mask"] for _, row in chosen]),
    }


def prior_evaluation(prior: PriorScorer, test_index: pd.DataFrame, test_codes: np.ndarray, train_codes: np.ndarray,
                     codebook_size: int) -> dict:
    """Return the prior's test NLL in bits per code next to the uniform and unigram baselines."""
    bits = prior.bits_per_code(test_codes, test_index["slice_position"].to_numpy(np.float32), prior.labels(test_index))
    return {"bits_per_code": float(bits), "uniform_bits_per_code": float(prior.uniform_bits(codebook_size)),
            "unigram_bits_per_code": float(prior.unigram_bits(train_codes, test_codes, codebook_size)),
            "n_test_maps": int(len(test_codes))}


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


def anomaly_evaluation(model, images: np.ndarray, masks: np.ndarray, device, settings: dict) -> tuple[dict, dict]:
    """Insert lesions into ``images``, reconstruct, and return (metrics, example arrays)."""
    size = min(images.shape[1:])
    lesioned, lesions = insert_synthetic_lesions(images, masks, settings["seed"],
                                                 tuple(settings["anomaly_radius_fraction"]),
                                                 settings["anomaly_amplitude"])
    recon = model_outputs(model, lesioned, device, settings["batch_size"], "reconstruction")
    sigma_px = settings["anomaly_smoothing_fraction"] * size
    scores = anomaly_score_maps(lesioned, recon, sigma_px)
    auroc = pixel_auroc(scores, lesions, masks)
    n = min(settings["anomaly_examples"], len(images))
    metrics = {"pixel_auroc": auroc, "reason": None if auroc is not None else "no lesion or no healthy brain pixels",
               "n_slices": int(len(images)), "smoothing_sigma_px": float(sigma_px),
               "amplitude": settings["anomaly_amplitude"],
               "lesion_pixel_share": float(lesions[masks].mean()) if masks.any() else None}
    figures = {"anomaly_image": images[:n], "anomaly_lesioned": lesioned[:n], "anomaly_reconstruction": recon[:n],
               "anomaly_score": scores[:n], "anomaly_lesion": lesions[:n], "anomaly_mask": masks[:n]}
    return metrics, figures


def stacked_features(features: Mapping[str, np.ndarray], scans) -> np.ndarray:
    """Return the feature vectors of ``scans`` stacked ``(n, D)``, or ``(0, 1)`` for no scan."""
    return np.stack([features[s] for s in scans]) if len(scans) else np.zeros((0, 1))


def probe_evaluation(split_df: pd.DataFrame, codes: Mapping[str, np.ndarray], image_features: Mapping[str, np.ndarray],
                     codebook_size: int, spec: str, settings: dict) -> dict:
    """Return the probe's target and AUROC from code histograms and from downsampled images."""
    target = parse_probe_target(spec)
    table = split_df[split_df["scan"].isin(set(codes) & set(image_features))].reset_index(drop=True)
    labels, meaning = binary_probe_labels(table, target, (table["split"] == "train").to_numpy())
    table = table.assign(label=labels.to_numpy()).dropna(subset=["label"])
    result = {"target": target.describe(), "meaning": meaning,
              "n_scans_without_label": int(labels.isna().sum())}
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    for name, features in (("codes", {s: code_histogram(codes[s], codebook_size) for s in table["scan"]}),
                           ("raw_images", image_features)):
        result[name] = probe_auroc(
            stacked_features(features, train["scan"]), train["label"].to_numpy(int),
            stacked_features(features, test["scan"]), test["label"].to_numpy(int), train["subject"].to_numpy(),
            settings["probe_cv_folds"], settings["probe_n_cs"], settings["seed"])
    return result


# ------------------------------------------------------------------------------------------ the run


def evaluate_run(inputs: EvaluationInputs, model, prior: PriorScorer, codebook_size: int, settings: dict,
                 source: str, device) -> EvaluationResult:
    """Evaluate a trained run on its test subjects.

    Args:
        inputs: the run's files.
        model: the loaded VQ-VAE (``model(x) -> (reconstruction, aux)``, ``model.encode_features(x)``).
        prior: the loaded prior's scoring functions.
        codebook_size: K of the VQ-VAE.
        settings: the validated ``evaluate`` config section.
        source: ``dataset.source`` (chooses the default probe target).
        device: torch device the models live on.
    """
    split_df = read_split(inputs.split_csv)
    test_paths, train_paths = shard_paths(inputs.shards_dir, "test"), shard_paths(inputs.shards_dir, "train")
    model.eval()
    samples = read_samples(inputs.samples)
    rng_seed = settings["seed"]

    # Pick the test rows that pair with samples, and the rows that get lesions, from metadata alone.
    test_meta = shard_index(test_paths)
    matched = matched_real_indices(samples["slice_position"], test_meta["slice_position"].to_numpy(),
                                   settings["match_position_window"], rng_seed)
    central = np.flatnonzero(np.abs(test_meta["slice_position"].to_numpy() - 0.5) <= 0.25)
    central = central if central.size else np.arange(len(test_meta))
    lesion_rows = np.sort(np.random.default_rng(rng_seed).choice(
        central, min(settings["anomaly_n_slices"], central.size), replace=False))

    log.info("reconstructing %d test slices", len(test_meta))
    per_slice, examples, kept = reconstruction_pass(model, test_paths, device, settings["batch_size"],
                                                    set(matched.tolist()) | set(lesion_rows.tolist()))
    per_scan = per_scan_means(per_slice, RECONSTRUCTION_METRICS)
    where = {row: k for k, row in enumerate(kept["row"])}
    real_images = kept["images"][[where[r] for r in matched]]
    lesion_images = kept["images"][[where[r] for r in lesion_rows]]
    lesion_masks = kept["masks"][[where[r] for r in lesion_rows]]

    log.info("codebook and prior")
    index = read_code_index(inputs.codes_dir)
    codes = code_maps_by_scan(inputs.codes_dir, index)
    test_index = index[index["split"] == "test"].sort_values(["scan", "row"], ignore_index=True)
    train_index = index[index["split"] == "train"].sort_values(["scan", "row"], ignore_index=True)
    if test_index.empty:
        raise EvaluationInputError(f"{inputs.codes_dir}/index.csv lists no test codes; re-run the quantize rule")
    test_codes = np.concatenate([codes[s] for s in sorted(set(test_index["scan"]))])
    train_codes = np.concatenate([codes[s] for s in sorted(set(train_index["scan"]))])
    counts = code_counts([test_codes], codebook_size)
    prior_metrics = prior_evaluation(prior, test_index, test_codes, train_codes, codebook_size)

    log.info("generation metrics on %d samples", len(samples["images"]))
    sample_features = model_outputs(model, samples["images"], device, settings["batch_size"], "features")
    real_features = model_outputs(model, real_images, device, settings["batch_size"], "features")
    train_reference = matched_training_images(train_paths, samples["slice_position"], settings)
    train_features = (model_outputs(model, train_reference, device, settings["batch_size"], "features")
                      if len(train_reference) >= 2 else None)
    generation, highest = generation_evaluation(samples, train_paths, real_images, real_features, sample_features,
                                                train_features, settings)

    log.info("representation probe and anomaly maps")
    image_features = scan_image_features(train_paths + test_paths, settings["probe_downsample_px"])
    probe = probe_evaluation(split_df, codes, image_features, codebook_size, probe_target_spec(settings, source),
                             settings)
    anomaly, anomaly_figures = anomaly_evaluation(model, lesion_images, lesion_masks, device, settings)

    metrics = {
        "n_test_scans": int(per_scan["scan"].nunique()), "n_test_subjects": int(per_scan["subject"].nunique()),
        "n_test_slices": int(len(per_slice)),
        "reconstruction": reconstruction_summary(per_slice, per_scan),
        "ms_ssim_window_px": ms_ssim_window_px(*samples["images"].shape[1:]),
        "codebook": codebook_usage(counts),
        "prior": prior_metrics,
        "generation": generation,
        "probe": probe,
        "anomaly": anomaly,
    }
    figures = {**example_triplets(per_scan, examples), "codebook_counts": counts,
               **samples_next_to_real(samples, real_images, test_meta["slice_position"].to_numpy()[matched],
                                      settings["figure_positions"], settings["samples_per_position"]),
               **anomaly_figures, "memorisation_highest_ssim": highest}
    return EvaluationResult(metrics, per_slice, per_scan, figures)


# ---------------------------------------------------------------------------------------------- output


def software_versions(packages=EVALUATION_PACKAGES) -> dict:
    """Return the Python version, installed versions of ``packages`` and the CUDA device (None on the CPU)."""
    versions = package_versions(packages)
    versions["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return versions


def json_ready(value):
    """Return ``value`` with numpy scalars/arrays made plain and NaN/inf replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_evaluation(result: EvaluationResult, metrics_json: str | Path, per_scan_csv: str | Path,
                     per_slice_csv: str | Path, figures_npz: str | Path) -> None:
    """Write the four evaluation outputs atomically (brainvq/files.py), ``metrics.json`` last."""
    write_table_atomic(result.per_slice, per_slice_csv)
    write_table_atomic(result.per_scan, per_scan_csv)
    with atomic_path(figures_npz, ".npz") as tmp:
        np.savez_compressed(tmp, **result.figures)
    write_text_atomic(metrics_json, json.dumps(json_ready(result.metrics), indent=2, allow_nan=False) + "\n")
