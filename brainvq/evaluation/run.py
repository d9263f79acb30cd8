"""The ``evaluate`` rule's run: each section in turn, then the outputs written atomically."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from brainvq.evaluation.anomaly import anomaly_section
from brainvq.evaluation.generation import generation_section, ms_ssim_window, prior_section
from brainvq.evaluation.inputs import EvaluationInputs, EvaluationResult, PriorScorer, evaluation_run
from brainvq.evaluation.probe import probe_section
from brainvq.evaluation.reconstruction import codebook_section, reconstruction_section
from brainvq.files import atomic_path, write_table_atomic, write_text_atomic
from brainvq.workflow import package_versions

log = logging.getLogger(__name__)

EVALUATION_PACKAGES = ("numpy", "scipy", "pandas", "scikit-image", "scikit-learn", "h5py", "torch")
# metrics.json key -> the section that measures it, in the order they appear in the file.
SECTIONS = {
    "codebook": codebook_section,
    "prior": prior_section,
    "generation": generation_section,
    "probe": probe_section,
    "anomaly": anomaly_section,
}


def evaluate_run(inputs: EvaluationInputs, model, prior: PriorScorer, codebook_size: int, settings: dict,
                 source_defaults: dict, device) -> EvaluationResult:
    """Evaluate a trained run on its test subjects.

    Args:
        inputs: the run's files.
        model: the loaded VQ-VAE (``model(x) -> (reconstruction, aux)``, ``model.encode_features(x)``).
        prior: the loaded prior's scoring functions.
        codebook_size: K of the VQ-VAE.
        settings: the validated ``evaluate`` config section.
        source_defaults: the data source's ``defaults`` (what probe target 'auto' means).
        device: torch device the models live on.
    """
    run = evaluation_run(inputs, model, prior, codebook_size, settings, source_defaults, device)
    log.info("reconstructing %d test slices", len(run.test_slices))
    metrics, figures, per_slice, per_scan = reconstruction_section(run)
    metrics["ms_ssim_window_px"] = ms_ssim_window(run)
    for key, section in SECTIONS.items():
        log.info("evaluating %s", key)
        metrics[key], section_figures = section(run)
        figures.update(section_figures)
    return EvaluationResult(metrics, per_slice, per_scan, figures)


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
                     per_slice_csv: str | Path | None, figures_npz: str | Path) -> None:
    """Write the four evaluation outputs atomically (brainvq/files.py), ``metrics.json`` last; a run of whole
    volumes has no ``per_slice_csv`` (None)."""
    if per_slice_csv is not None:
        write_table_atomic(result.per_slice, per_slice_csv)
    write_table_atomic(result.per_scan, per_scan_csv)
    with atomic_path(figures_npz, ".npz") as tmp:
        np.savez_compressed(tmp, **result.figures)
    write_text_atomic(metrics_json, json.dumps(json_ready(result.metrics), indent=2, allow_nan=False) + "\n")
