"""Reconstruction and codebook sections: every test slice through the VQ-VAE, and the codes it uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from brainvq.evaluation.inputs import EvaluationRun
from brainvq.measures.codebook import code_counts, codebook_usage
from brainvq.measures.similarity import RECONSTRUCTION_METRICS, reconstruction_metric_table
from brainvq.measures.statistics import per_scan_means, per_subject_means, summaries_by_unit
from brainvq.shards import shard_chunks


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


def reconstruction_pass(model, test_paths: list[Path], device, batch_size: int) -> tuple[pd.DataFrame, dict]:
    """Reconstruct every test slice; return (per-slice table, the mid slice of each scan for the figures)."""
    tables, examples = [], {}
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
    return pd.concat(tables, ignore_index=True), examples


def reconstruction_summary(per_slice: pd.DataFrame, per_scan: pd.DataFrame, n_resamples: int = 0,
                           seed: int = 0) -> dict:
    """Return, per reconstruction metric, its summary statistics ``over_slices``, ``over_scans`` and
    ``over_subjects`` (a subject's value is the mean of its scans); with ``n_resamples`` each also has
    ``mean_ci95``, the 95 % interval of its mean over resampled test subjects."""
    per_subject = per_subject_means(per_scan, RECONSTRUCTION_METRICS)
    return summaries_by_unit(RECONSTRUCTION_METRICS, n_resamples, seed, over_slices=per_slice, over_scans=per_scan,
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


def preprocessing_facts(shard_attrs: dict) -> dict:
    """Return what the numbers are measured on: ``pixel_mm`` (one pixel size for the run), ``mask_kind`` (``brain``
    or ``head``: what the "brain" metrics' mask covers), the ``skull_strip`` method, image ``size`` (None where
    the shards do not say)."""
    pixel = shard_attrs.get("pixel_mm")
    size = shard_attrs.get("size")
    return {"pixel_mm": float(pixel) if pixel is not None else None, "mask_kind": shard_attrs.get("mask_kind"),
            "skull_strip": shard_attrs.get("skull_strip"), "size": int(size) if size is not None else None}


def reconstruction_section(run: EvaluationRun) -> tuple[dict, dict, pd.DataFrame, pd.DataFrame]:
    """Return (metrics, figure arrays, per-slice table, per-scan table) of the test reconstructions."""
    per_slice, examples = reconstruction_pass(run.model, run.test_paths, run.device, run.settings["batch_size"])
    per_scan = per_scan_means(per_slice, RECONSTRUCTION_METRICS)
    metrics = {
        "preprocess": preprocessing_facts(run.shard_attrs),
        "n_test_scans": int(per_scan["scan"].nunique()), "n_test_subjects": int(per_scan["subject"].nunique()),
        "n_test_slices": int(len(per_slice)),
        "reconstruction": reconstruction_summary(per_slice, per_scan, run.settings["bootstrap_resamples"],
                                                 run.settings["seed"]),
    }
    return metrics, example_triplets(per_scan, examples), per_slice, per_scan


def codebook_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return (codebook usage of the test codes, figure arrays)."""
    counts = code_counts([run.split_codes("test")], run.codebook_size)
    return codebook_usage(counts), {"codebook_counts": counts}
