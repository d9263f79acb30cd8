"""Anomaly section: synthetic lesions in central test slices, found by the VQ-VAE, by the prior, and without a model.

Methods (every score map smoothed alike, ``brainvq.measures.anomaly``):

- ``vqvae_residual``: |x - VQ-VAE reconstruction of x|.
- ``healed``: |x - decoded healed codes|: the codes of x that the prior finds unlikely replaced by likely ones
  (Pinaya et al. 2022).
- ``healed_masked``: ``healed`` kept only where codes were replaced (the replaced-code map upsampled and
  smoothed), as Pinaya et al. filter the residual by the resampling mask.
- ``mean_slice``: |x - mean training slice at x's slice position| (no model).
- ``zscore``: |x - mean| / std of the training slices at x's position, per pixel (no model).
"""

from __future__ import annotations

import numpy as np
import torch

from brainvq.evaluation.inputs import EvaluationRun
from brainvq.evaluation.reconstruction import model_outputs
from brainvq.measures.anomaly import (
    detection_scores,
    insert_lesions,
    lesion_types,
    mean_slice_scores,
    most_likely_fill,
    position_atlas,
    smoothed,
    unlikely_codes,
    upsampled_mask,
    zscore_scores,
)
from brainvq.prior import label_indices
from brainvq.sampling import decode_codes
from brainvq.shards import shard_chunks

MODEL_FREE = ("mean_slice", "zscore")


def lesion_rows(run: EvaluationRun) -> np.ndarray:
    """Return the test-slice rows (positions 0.25-0.75, else any) that get a lesion, drawn with ``evaluate.seed``."""
    positions = run.test_slices["slice_position"].to_numpy()
    central = np.flatnonzero(np.abs(positions - 0.5) <= 0.25)
    central = central if central.size else np.arange(len(positions))
    n = min(run.settings["anomaly_n_slices"], central.size)
    return np.sort(np.random.default_rng(run.settings["seed"]).choice(central, n, replace=False))


@torch.no_grad()
def prior_probabilities(prior, codes: np.ndarray, positions: np.ndarray, labels, device,
                        batch_size: int) -> np.ndarray:
    """Return the prior's probabilities ``(N, K, h, w)`` of every code value at every position given the codes
    before it (one teacher-forced forward pass per batch)."""
    label_idx = label_indices(prior, labels, len(codes))
    chunks = []
    for start in range(0, len(codes), batch_size):
        part = slice(start, start + batch_size)
        logits = prior(torch.as_tensor(codes[part], dtype=torch.long, device=device),
                       torch.as_tensor(positions[part], dtype=torch.float32, device=device),
                       None if label_idx is None else label_idx[part].to(device))
        chunks.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(chunks)


@torch.no_grad()
def healed_codes(vqvae, prior, images: np.ndarray, positions: np.ndarray, labels, device, settings: dict
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (codes of ``images``, healed codes, replaced positions), all ``(N, h, w)``.

    The replaced positions are fixed by the first pass (the codes below ``anomaly_heal_threshold``); every pass
    refills them with the prior's most likely code given the current map.
    """
    batch = settings["batch_size"]
    codes = np.concatenate([vqvae.encode_indices(torch.as_tensor(images[s:s + batch], device=device)[:, None])
                            .cpu().numpy() for s in range(0, len(images), batch)]).astype(np.int64)
    probabilities = prior_probabilities(prior, codes, positions, labels, device, batch)
    replaced = unlikely_codes(codes, probabilities, settings["anomaly_heal_threshold"])
    healed = most_likely_fill(codes, probabilities, replaced)
    for _ in range(settings["anomaly_heal_passes"] - 1):
        healed = most_likely_fill(healed, prior_probabilities(prior, healed, positions, labels, device, batch),
                                  replaced)
    return codes, healed, replaced


def method_scores(maps: np.ndarray, lesions: np.ndarray, masks: np.ndarray, kinds: np.ndarray,
                  type_names: list[str]) -> dict:
    """Return a method's ``auroc``, ``auprc`` and ``dice`` over all lesioned slices, and per lesion type under
    ``by_lesion``."""
    scores = detection_scores(maps, lesions, masks)
    scores["by_lesion"] = {name: detection_scores(maps[kinds == k], lesions[kinds == k], masks[kinds == k])
                           for k, name in enumerate(type_names)}
    return scores


def anomaly_maps(run: EvaluationRun, lesioned: np.ndarray, positions: np.ndarray,
                 rows: np.ndarray) -> tuple[dict, dict, dict]:
    """Return (unsmoothed score map per method, healing facts, figure arrays) of the lesioned slices."""
    settings, batch = run.settings, run.settings["batch_size"]
    atlas = position_atlas(((c["images"], c["slice_position"]) for c in shard_chunks(run.train_paths, False)),
                           settings["anomaly_position_bins"])
    recon = model_outputs(run.model, lesioned, run.device, batch, "reconstruction")
    maps = {"vqvae_residual": np.abs(lesioned - recon)}
    facts, figures = {"position_bins_filled": int((atlas.count > 0).sum())}, {"anomaly_reconstruction": recon}
    if run.prior.model is not None and hasattr(run.model, "encode_indices"):
        labels = run.prior.labels(run.test_slices.iloc[rows])
        codes, healed, replaced = healed_codes(run.model, run.prior.model, lesioned, positions, labels, run.device,
                                               settings)
        healed_images = decode_codes(run.model, torch.as_tensor(healed), batch, torch.device(run.device))
        maps["healed"] = np.abs(lesioned - healed_images)
        sigma = settings["anomaly_smoothing_fraction"] * min(lesioned.shape[1:])
        maps["healed_masked"] = maps["healed"] * upsampled_mask(replaced, lesioned.shape[1:], sigma)
        facts.update(replaced_code_share=float(replaced.mean()), threshold=settings["anomaly_heal_threshold"],
                     passes=settings["anomaly_heal_passes"])
        figures["anomaly_healed"] = healed_images
    maps["mean_slice"] = mean_slice_scores(lesioned, positions, atlas)
    maps["zscore"] = zscore_scores(lesioned, positions, atlas, settings["anomaly_min_std"])
    return maps, facts, figures


def anomaly_section(run: EvaluationRun) -> tuple[dict, dict]:
    """Return (anomaly metrics, figure arrays): ``<method>: {auroc, auprc, dice, by_lesion}`` per method, and the
    lesions and healing that were used."""
    settings = run.settings
    rows = lesion_rows(run)
    images, masks = run.test_images(rows), run.test_masks(rows)
    positions = run.test_slices["slice_position"].to_numpy(np.float32)[rows]
    types = lesion_types(settings["anomaly_lesion_sizes"])
    lesioned, lesions, kinds, contrast = insert_lesions(images, masks, types, settings["anomaly_contrast"],
                                                        settings["seed"])
    maps, healing, figures = anomaly_maps(run, lesioned, positions, rows)
    sigma_px = settings["anomaly_smoothing_fraction"] * min(images.shape[1:])
    names = [t.name for t in types]
    smoothed_maps = {method: smoothed(m, sigma_px) for method, m in maps.items()}
    metrics = {method: method_scores(m, lesions, masks, kinds, names) for method, m in smoothed_maps.items()}
    metrics["healing"] = healing if "healed" in maps else {"reason": "no prior model or VQ-VAE code interface"}
    metrics["lesions"] = {"types": names, "n_slices": int(len(images)), "contrast": settings["anomaly_contrast"],
                          "contrast_got": {n: float(contrast[kinds == k].mean()) if (kinds == k).any() else None
                                           for k, n in enumerate(names)},
                          "smoothing_sigma_px": float(sigma_px), "model_free": list(MODEL_FREE)}
    n = min(settings["anomaly_examples"], len(images))
    figures = {key: value[:n] for key, value in figures.items()}
    figures.update(anomaly_image=images[:n], anomaly_lesioned=lesioned[:n], anomaly_lesion=lesions[:n],
                   anomaly_mask=masks[:n], anomaly_methods=np.array(list(smoothed_maps)),
                   anomaly_method_scores=np.stack([m[:n] for m in smoothed_maps.values()]))
    return metrics, figures
