"""Probe section: does the representation (code histograms) predict a subject attribute better than raw images,
and better than the site alone? Cross-validated over every subject of the run (``brainvq.measures.probe``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from brainvq.evaluation.inputs import EvaluationRun
from brainvq.measures.codebook import code_histogram
from brainvq.measures.probe import binary_probe_labels, downsampled_mean_slice, parse_probe_target, probe_result
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


def class_counts(table: pd.DataFrame) -> dict:
    """Return subjects and scans per class of ``table`` (``label`` 0/1, ``subject``)."""
    return {name: {"subjects": int(table.loc[table["label"] == value, "subject"].nunique()),
                   "scans": int((table["label"] == value).sum())}
            for name, value in (("negative", 0), ("positive", 1))}


def site_strata(table: pd.DataFrame, column: str | None) -> np.ndarray | None:
    """Return ``column``'s values per row when it exists and holds at least two values, else None."""
    if not column or column not in table.columns:
        return None
    values = table[column].astype("string").fillna("unknown").to_numpy()
    return values if len(set(values)) >= 2 else None


def probe_evaluation(split_df: pd.DataFrame, codes: Mapping[str, np.ndarray], image_features: Mapping[str, np.ndarray],
                     codebook_size: int, spec: str, settings: dict) -> dict:
    """Return the probe of ``spec`` over every labelled scan of the run, from code histograms (``auroc``,
    ``auroc_ci``, ``p_value`` at the top and under ``codes``), from downsampled images (``raw_images``) and from
    the site alone (``site_only``), with the class sizes."""
    target = parse_probe_target(spec)
    table = split_df[split_df["scan"].isin(set(codes) & set(image_features))].reset_index(drop=True)
    labels, meaning = binary_probe_labels(table, target, (table["split"] == "train").to_numpy())
    table = table.assign(label=labels.to_numpy()).dropna(subset=["label"]).reset_index(drop=True)
    scans, y, subjects = table["scan"], table["label"].to_numpy(int), table["subject"].astype(str).to_numpy()
    strata = site_strata(table, settings["probe_site_column"])
    result = {"target": target.describe(), "meaning": meaning, "n_scans_without_label": int(labels.isna().sum()),
              "n_subjects": int(table["subject"].nunique()), "n_scans": int(len(table)),
              "n_per_class": class_counts(table),
              "site_column": settings["probe_site_column"] if strata is not None else None,
              "permuted_within": settings["probe_site_column"] if strata is not None else None}
    features = {"codes": stacked_features({s: code_histogram(codes[s], codebook_size) for s in scans}, scans),
                "raw_images": stacked_features(image_features, scans)}
    for name, x in features.items():
        result[name] = probe_result(x, y, subjects, strata, settings)
    result["site_only"] = (probe_result(pd.get_dummies(pd.Series(strata)).to_numpy(float), y, subjects, None, settings)
                           if strata is not None else None)
    result.update({key: result["codes"][key] for key in ("auroc", "auroc_ci", "p_value", "reason")})
    return result


def probe_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return (probe metrics, no figures) over the run's scans."""
    image_features = scan_image_features(run.train_paths + run.test_paths, run.settings["probe_downsample_px"])
    spec = probe_target_spec(run.settings, run.source_defaults)
    return probe_evaluation(run.split, run.codes, image_features, run.codebook_size, spec, run.settings), {}
