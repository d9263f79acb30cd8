"""Anomaly section: synthetic lesions in central test slices, scored by the VQ-VAE's reconstruction error."""

from __future__ import annotations

import numpy as np

from brainvq.evaluation.inputs import EvaluationRun
from brainvq.evaluation.reconstruction import model_outputs
from brainvq.measures.anomaly import anomaly_score_maps, insert_synthetic_lesions, pixel_auroc


def lesion_rows(run: EvaluationRun) -> np.ndarray:
    """Return the test-slice rows (positions 0.25-0.75, else any) that get a lesion, drawn with ``evaluate.seed``."""
    positions = run.test_slices["slice_position"].to_numpy()
    central = np.flatnonzero(np.abs(positions - 0.5) <= 0.25)
    central = central if central.size else np.arange(len(positions))
    n = min(run.settings["anomaly_n_slices"], central.size)
    return np.sort(np.random.default_rng(run.settings["seed"]).choice(central, n, replace=False))


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


def anomaly_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return (anomaly metrics, figure arrays) on the lesioned test slices."""
    rows = lesion_rows(run)
    return anomaly_evaluation(run.model, run.test_images(rows), run.test_masks(rows), run.device, run.settings)
