"""Applying a trained model to new scans (``apply.model`` set; rules/apply.smk): per scan, then per folder.

Per scan (rule apply_scan), from the scan's preprocessed brain volume and mask and its input file:
``codes/<scan>.npy`` (int16 ``(n_slices, h, w)``), ``recon/<scan>.nii.gz`` and ``anomaly/<scan>.nii.gz`` on the input
file's voxel grid (same shape and affine), ``scans/<scan>.json`` (slices, per-slice reconstruction metrics, code
use, anomaly statistics) and ``figures/<scan>.npz`` (the middle slice for the report).

Per folder (rule apply_metrics): ``metrics.json`` (per-scan reconstruction metrics and code usage, their summaries
next to the trained run's own test metrics, the two data sources, an optional probe on the codes),
``per_scan.csv`` and ``codes/index.csv`` (one row per slice: where each code map comes from).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from brainvq.files import atomic_path, write_table_atomic, write_text_atomic

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["subject", "session", "scan", "slice_index", "slice_position", "file", "row"]
SUMMARY_METRICS = ("ssim_brain", "psnr_brain_db", "mse_brain", "ssim", "psnr_db", "ms_ssim_brain")


class ApplyInputError(ValueError):
    """``apply.input`` names no folder of scans, or the applied outputs are incomplete."""


def require_apply_input(raw_root: str | Path, source: str) -> None:
    """Raise ApplyInputError unless the folder of scans to apply the model to exists."""
    if not Path(raw_root).is_dir():
        raise ApplyInputError(
            f"apply.input (source {source}) points at {raw_root}, which does not exist; set apply.input.local_dir "
            "to the folder of scans to apply the model to (for source demo or a download, run that source's "
            "workflow first so its raw folder exists)"
        )


# ------------------------------------------------------------------------------------------------ per scan


def middle_slice(positions: np.ndarray) -> int:
    """Return the row of the slice whose position is nearest 0.5."""
    return int(np.argmin(np.abs(np.asarray(positions) - 0.5)))


def scan_summary(scan: str, subject: str, session: str, path: str, prepared, outputs, codebook_size: int) -> dict:
    """Return the scans/<scan>.json record of one applied scan (plain values only)."""
    from brainvq.measures.codebook import code_counts, codebook_usage

    usage = codebook_usage(code_counts([outputs.codes], codebook_size))
    inside = outputs.anomaly[prepared.masks] if len(prepared.masks) else np.zeros(0)
    return {
        "scan": scan, "subject": subject, "session": session, "path": path,
        "n_slices": int(len(prepared.slice_index)), "excluded_reason": prepared.excluded_reason,
        "slice_index": prepared.slice_index.astype(int).tolist(),
        "slice_position": prepared.slice_position.astype(float).tolist(),
        "metrics": {column: outputs.metrics[column].astype(float).tolist() for column in outputs.metrics.columns},
        "codes_used": usage["codes_used"], "perplexity": usage["perplexity"],
        "anomaly_mean_brain": float(inside.mean()) if inside.size else None,
        "anomaly_p99_brain": float(np.percentile(inside, 99)) if inside.size else None,
        "native_shape": list(prepared.native_shape), "native_affine": np.asarray(prepared.native_affine).tolist(),
        "intensity_range": list(prepared.intensity_range),
    }


def figure_arrays(prepared, outputs) -> dict:
    """Return the middle slice's original, reconstruction, anomaly map and mask (empty arrays when excluded)."""
    if not len(prepared.images):
        empty = np.zeros((0, 0), np.float32)
        return {"original": empty, "reconstruction": empty, "anomaly": empty, "mask": empty.astype(bool),
                "position": np.float32(np.nan)}
    k = middle_slice(prepared.slice_position)
    return {"original": prepared.images[k], "reconstruction": outputs.reconstructions[k], "anomaly": outputs.anomaly[k],
            "mask": prepared.masks[k], "position": np.float32(prepared.slice_position[k])}


def write_applied_scan(model, prepared, scan: str, subject: str, session: str, path: str, out: dict) -> dict:
    """Run ``model`` on one prepared scan and write its outputs; return its summary.

    Args:
        model: a ``brainvq.inference.SliceModel``.
        prepared: the scan's ``brainvq.inference.PreparedScan``.
        scan, subject, session, path: the scan's key, subject, session and input file (for the records).
        out: the output paths ``codes``, ``recon``, ``anomaly``, ``summary``, ``figure``.
    """
    from brainvq.io import save_volume_atomic

    outputs = model.outputs(prepared)
    recon, anomaly = model.native_images(prepared, outputs)
    summary = scan_summary(scan, subject, session, path, prepared, outputs, model.manifest["codebook_size"])
    with atomic_path(out["codes"], ".npy") as tmp:
        np.save(tmp, outputs.codes)
    with atomic_path(out["figure"], ".npz") as tmp:
        np.savez_compressed(tmp, **figure_arrays(prepared, outputs))
    save_volume_atomic(recon, out["recon"])
    save_volume_atomic(anomaly, out["anomaly"])
    write_text_atomic(out["summary"], json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------- per folder


def read_summaries(paths) -> list[dict]:
    """Return the scans/<scan>.json records, in scan order.

    Raises:
        ApplyInputError: a record cannot be read (naming it and the fix).
    """
    records = []
    for path in sorted(map(Path, paths)):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise ApplyInputError(f"{path} cannot be read ({error}); delete it and re-run the workflow so "
                                  "apply_scan writes it again") from error
    return records


def applied_tables(summaries: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Return (per-slice metrics, per-scan table, codes index) of the applied scans that kept slices."""
    from brainvq.measures.similarity import RECONSTRUCTION_METRICS
    from brainvq.measures.statistics import per_scan_means

    slices, index = [], []
    for record in summaries:
        if not record["n_slices"]:
            continue
        table = pd.DataFrame(record["metrics"])
        table.insert(0, "scan", record["scan"])
        table.insert(1, "subject", record["subject"])
        table.insert(2, "slice_index", record["slice_index"])
        table.insert(3, "slice_position", record["slice_position"])
        slices.append(table)
        index.append(pd.DataFrame({"subject": record["subject"], "session": record["session"], "scan": record["scan"],
                                   "slice_index": record["slice_index"], "slice_position": record["slice_position"],
                                   "file": f"{record['scan']}.npy", "row": np.arange(record["n_slices"])}))
    if not slices:
        raise ApplyInputError("no applied scan kept a slice (every scan was excluded); see scans/*.json for why")
    per_slice = pd.concat(slices, ignore_index=True)
    per_scan = per_scan_means(per_slice, RECONSTRUCTION_METRICS)
    extras = pd.DataFrame([{key: record[key] for key in ("scan", "session", "codes_used", "perplexity",
                                                         "anomaly_mean_brain", "anomaly_p99_brain")}
                           for record in summaries if record["n_slices"]])
    per_scan = per_scan.merge(extras, on="scan", how="left")
    return per_slice, per_scan, pd.concat(index, ignore_index=True)[INDEX_COLUMNS]


def comparison_rows(trained: dict, applied: dict) -> list[dict]:
    """Return, per summary metric, the mean over test scans of the trained run and over applied scans."""
    rows = []
    for metric in SUMMARY_METRICS:
        before = (trained.get(metric) or {}).get("over_scans", {}).get("mean")
        after = (applied.get(metric) or {}).get("over_scans", {}).get("mean")
        rows.append({"metric": metric, "trained_run_test_scans": before, "applied_scans": after,
                     "difference": None if before is None or after is None else after - before})
    return rows


def applied_probe(per_scan: pd.DataFrame, participants: pd.DataFrame, codes: dict[str, np.ndarray],
                  codebook_size: int, spec: str, settings: dict) -> dict:
    """Return a probe on the applied scans' code histograms: ``spec`` (a rule such as ``sex`` or ``age>median``)
    predicted with grouped (by subject) cross-validation, scored by out-of-fold AUROC
    (:func:`brainvq.measures.probe.probe_result`)."""
    from brainvq.data import merge_participants
    from brainvq.measures.codebook import code_histogram
    from brainvq.measures.probe import binary_probe_labels, parse_probe_target, probe_result

    target = parse_probe_target(spec)
    table = merge_participants(per_scan[["scan", "subject", "session"]].fillna(""), participants)
    labels, meaning = binary_probe_labels(table, target, np.ones(len(table), bool))
    table = table.assign(label=labels.to_numpy()).dropna(subset=["label"])
    features = np.stack([code_histogram(codes[scan], codebook_size) for scan in table["scan"]]) if len(table) \
        else np.zeros((0, codebook_size))
    # The same probe as evaluate's: grouped cross-validation, permutation p-value, subject-bootstrap interval.
    result = probe_result(features, table["label"].to_numpy(int), table["subject"].to_numpy(), None, settings)
    return {"target": target.describe(), "meaning": meaning, "n_scans_without_label": int(labels.isna().sum()),
            "codes": result}


def applied_metrics(summaries: list[dict], codes: dict[str, np.ndarray], manifest: dict, participants: pd.DataFrame,
                    about: dict, probe_target: str | None, evaluate_settings: dict
                    ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Return (metrics.json content, per-scan table, codes index) of an applied folder.

    Args:
        summaries: the scans/<scan>.json records; codes: scan -> its code maps.
        manifest: the bundle's bundle.json (the trained run: source, settings, its own test metrics).
        participants: the applied scans' participants table (for the probe).
        about: ``name``, ``model`` (apply.model), ``input_source``, ``input_folder``.
        probe_target: a probe rule on the applied codes, or None for no probe.
        evaluate_settings: the ``evaluate`` section (probe folds, C values, seed).
    """
    from brainvq.evaluation.reconstruction import reconstruction_summary
    from brainvq.measures.codebook import code_counts, codebook_usage

    per_slice, per_scan, index = applied_tables(summaries)
    reconstruction = reconstruction_summary(per_slice, per_scan)
    trained = manifest.get("evaluation", {}) or {}
    kept = [record["scan"] for record in summaries if record["n_slices"]]
    excluded = [{"scan": r["scan"], "reason": r["excluded_reason"]} for r in summaries if not r["n_slices"]]
    metrics = {
        "name": about["name"],
        "trained_on": {"source": manifest.get("source"), "run": manifest.get("run"), "model": about["model"],
                       **(manifest.get("training_data") or {})},
        "applied_to": {"source": about["input_source"], "folder": about["input_folder"],
                       "n_scans": len(kept), "n_subjects": int(per_scan["subject"].nunique()),
                       "n_slices": int(len(per_slice)), "excluded": excluded},
        "cross_dataset": manifest.get("source") != about["input_source"],
        "preprocess": manifest.get("preprocess"),
        "reconstruction": reconstruction,
        "trained_run_reconstruction": trained.get("reconstruction"),
        "comparison": comparison_rows(trained.get("reconstruction") or {}, reconstruction),
        "codebook": codebook_usage(code_counts([codes[scan] for scan in kept], manifest["codebook_size"])),
        "trained_run_codebook": trained.get("codebook"),
        "per_scan": per_scan.to_dict("records"),
        "probe": (applied_probe(per_scan, participants, codes, manifest["codebook_size"], probe_target,
                                evaluate_settings) if probe_target else None),
    }
    return metrics, per_scan, index


def write_applied_metrics(metrics: dict, per_scan: pd.DataFrame, index: pd.DataFrame, metrics_json: str | Path,
                          per_scan_csv: str | Path, index_csv: str | Path) -> None:
    """Write metrics.json (non-finite numbers as null), per_scan.csv and codes/index.csv atomically."""
    from brainvq.evaluation.run import json_ready

    write_table_atomic(per_scan, per_scan_csv)
    write_table_atomic(index, index_csv)
    write_text_atomic(metrics_json, json.dumps(json_ready(metrics), indent=2))
