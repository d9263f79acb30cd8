"""Probe section: does the representation (code histograms) predict a subject attribute better than raw images?"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from brainvq.evaluation.inputs import EvaluationRun
from brainvq.measures.codebook import code_histogram
from brainvq.measures.probe import binary_probe_labels, downsampled_mean_slice, parse_probe_target, probe_auroc
from brainvq.shards import shard_chunks


def probe_target_spec(evaluate_config: dict, source_defaults: dict) -> str:
    """Return the probe rule: ``evaluate.probe_target``, or for 'auto' the source's (``Source.defaults``)."""
    spec = evaluate_config["probe_target"]
    return source_defaults["probe_target"] if spec == "auto" else spec


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


def probe_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return (probe metrics, no figures) over the run's scans."""
    image_features = scan_image_features(run.train_paths + run.test_paths, run.settings["probe_downsample_px"])
    spec = probe_target_spec(run.settings, run.source_defaults)
    return probe_evaluation(run.split, run.codes, image_features, run.codebook_size, spec, run.settings), {}
