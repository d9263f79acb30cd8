"""Rule ``evaluate`` for whole volumes (``preprocess.dims: 3``): the trained 3D autoencoder on the test subjects.

What is measured on what (definitions in ``brainvq.measures.volumes`` and ``brainvq.measures.grid``):

- **Reconstruction**: every test volume and its reconstruction: SSIM with the Gaussian window (``ssim_gaussian``,
  the settings of every other SSIM in brainvq) and with the uniform 7-voxel window of the OASIS-1 3D study
  (``ssim_uniform7``), PSNR and MSE over the whole volume and over the mask. Statistics over scans and over
  subjects (a subject's value = mean of its scans); ``eval/per_scan.csv`` has one row per scan.
- **Codebook**: codes used and perplexity of the test code volumes (``codes/test/<scan>.npy``).
- **SOM grid** (``vqvae.bottleneck: som``): the correlation of neighbouring nodes' embeddings against
  non-neighbours, and each code's majority tissue region over the test volumes (a simple intensity segmentation
  inside the mask), with the neighbours' region agreement against non-neighbours.

The prior, sampling, generation, probe and anomaly sections are 2D (they read slices and 2D code maps); a 3D run
has none of them, and ``metrics.json`` says so under ``not_measured``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainvq.shards import load_shard_rows, shard_index, shard_paths
from brainvq.evaluation.inputs import EvaluationInputError, EvaluationResult
from brainvq.evaluation.reconstruction import model_outputs
from brainvq.measures.codebook import code_counts, codebook_usage
from brainvq.measures.grid import (
    REGIONS,
    code_region_counts,
    neighbour_correlation,
    region_agreement,
    region_map,
    tissue_labels,
)
from brainvq.measures.statistics import summaries_by_unit
from brainvq.measures.volumes import VOLUME_METRICS, volume_metric_table

SSIM_WINDOWS = {
    "ssim_gaussian": "skimage structural_similarity in 3D, Gaussian window sigma 1.5 (11 voxels), population "
                     "covariances, data range 1 (Wang et al. 2004; brainvq's SSIM everywhere)",
    "ssim_uniform7": "skimage structural_similarity in 3D, uniform 7x7x7 window, sample covariances, data range 1 "
                     "(skimage's defaults; the window of the OASIS-1 3D study's SSIM)",
}
NOT_MEASURED = ("the PixelCNN prior, sampling, generation, probe and anomaly sections work on 2D slices and code maps; "
                "a whole-volume run (preprocess.dims 3) has none of them")
PLANES = ("axial", "coronal", "sagittal")


def mid_planes(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Return the middle axial, coronal and sagittal planes of a volume ``(z, y, x)`` (axes of
    ``brainvq.volumes.volume_stack``), each drawn with superior (or anterior, for axial) at the top."""
    z, y, x = (n // 2 for n in volume.shape)
    return {"axial": volume[z], "coronal": volume[::-1, y, :], "sagittal": volume[::-1, :, x]}


def som_grid_section(model, region_counts: np.ndarray) -> tuple[dict, dict]:
    """Return (SOM metrics, figure arrays) of a model with a SOM bottleneck, given the test volumes' voxel counts
    per code and tissue region (``measures.grid.code_region_counts`` summed over scans)."""
    som = model.bottleneck
    neighbours = som.neighbours.cpu().numpy()
    exists = som.neighbour_exists.cpu().numpy() > 0
    region, purity = region_map(region_counts)
    metrics = {
        "grid": list(som.grid), "topology": som.topology,
        "embedding_correlation": neighbour_correlation(som.codebook.detach().cpu().numpy(), neighbours, exists),
        "region_agreement": region_agreement(region, neighbours, exists),
        "region_purity_mean": float(np.nanmean(purity)) if (region >= 0).any() else None,
        "codes_per_region": {name: int((region == r).sum()) for r, name in enumerate(REGIONS)},
        "regions": "background outside the mask; inside, three intensity classes by 1D k-means (dark: CSF, "
                   "mid: grey matter, bright: white matter) of each test volume",
    }
    figures = {"som_grid": np.asarray(som.grid), "som_region": region.astype(np.int64), "som_purity": purity,
               "som_region_names": np.asarray(REGIONS)}
    return metrics, figures


def example_planes(per_scan: pd.DataFrame, planes: dict) -> dict:
    """Return figure arrays for the best, median and worst test volumes by Gaussian-window SSIM: the middle
    planes of the original and the reconstruction."""
    ranked = per_scan.sort_values("ssim_gaussian", ascending=False, ignore_index=True)
    picks = {"best": 0, "median": (len(ranked) - 1) // 2, "worst": len(ranked) - 1}
    scans = [ranked.loc[i, "scan"] for i in picks.values()]
    arrays = {"examples_label": np.array(list(picks)), "examples_scan": np.array(scans),
              "examples_ssim_gaussian": np.array([ranked.loc[i, "ssim_gaussian"] for i in picks.values()]),
              "examples_ssim_uniform7": np.array([ranked.loc[i, "ssim_uniform7"] for i in picks.values()])}
    for kind in ("original", "reconstruction"):
        for plane in PLANES:
            arrays[f"examples_{plane}_{kind}"] = np.stack([planes[scan][kind][plane] for scan in scans])
    return arrays


def read_test_code_volumes(codes_dir: str | Path, scans) -> dict[str, np.ndarray]:
    """Return ``codes/test/<scan>.npy`` of each scan.

    Raises:
        EvaluationInputError: a scan has no code volume, or its codes are not 3D.
    """
    volumes = {}
    for scan in scans:
        path = Path(codes_dir) / "test" / f"{scan}.npy"
        if not path.exists():
            raise EvaluationInputError(f"{path} is missing; re-run the quantize rule")
        volumes[scan] = np.load(path)
        if volumes[scan].ndim != 3:
            raise EvaluationInputError(f"{path} holds codes of shape {volumes[scan].shape}, not a code volume; "
                                       "re-run quantize with the model trained on these volumes")
    return volumes


def evaluate_volumes(shards_dir: str | Path, codes_dir: str | Path, model, device) -> EvaluationResult:
    """Evaluate a trained whole-volume run on its test subjects (module docstring).

    Args:
        shards_dir: the shards folder (``test-NNN.h5`` of volumes).
        codes_dir: the quantize rule's codes folder.
        model: the loaded 3D VQ-VAE (``brainvq.training.load_vqvae``), with a codebook.
        device: torch device the model lives on.

    Raises:
        EvaluationInputError: the shards hold slices, not volumes, or the codes do not match them.
    """
    test_paths = shard_paths(shards_dir, "test")
    index = shard_index(test_paths)
    codes = read_test_code_volumes(codes_dir, index["scan"])
    is_som = hasattr(model.bottleneck, "neighbours")
    model.eval()
    rows, planes = [], {}
    region_counts = np.zeros((model.codebook_size, len(REGIONS)), np.int64)
    for i in range(len(index)):
        item = index.iloc[[i]]
        scan, subject = item["scan"].iloc[0], item["subject"].iloc[0]
        volume, mask = load_shard_rows(test_paths, item), load_shard_rows(test_paths, item, "masks")
        if volume.ndim != 4:
            raise EvaluationInputError(f"the test shards in {shards_dir} hold slices, not volumes; evaluate them "
                                       "with preprocess.dims 2")
        reconstruction = model_outputs(model, volume, device, 1, "reconstruction")
        rows.append(volume_metric_table(volume, reconstruction, mask).assign(scan=scan, subject=subject))
        planes[scan] = {"original": mid_planes(volume[0]), "reconstruction": mid_planes(reconstruction[0])}
        if is_som:
            region_counts += code_region_counts(codes[scan], tissue_labels(volume[0], mask[0]), model.codebook_size)
    per_scan = pd.concat(rows, ignore_index=True)[["scan", "subject", *VOLUME_METRICS]]
    per_subject = per_scan.groupby("subject", sort=True)[list(VOLUME_METRICS)].mean()
    counts = code_counts(codes.values(), model.codebook_size)
    metrics = {
        "dims": 3, "n_test_scans": int(len(per_scan)), "n_test_subjects": int(per_scan["subject"].nunique()),
        "volume_shape": list(volume.shape[1:]),
        "reconstruction": summaries_by_unit(VOLUME_METRICS, over_scans=per_scan, over_subjects=per_subject),
        "ssim_windows": SSIM_WINDOWS,
        "codebook": codebook_usage(counts),
        "not_measured": NOT_MEASURED,
    }
    figures = {"codebook_counts": counts, **example_planes(per_scan, planes)}
    if is_som:
        metrics["som"], som_figures = som_grid_section(model, region_counts)
        figures.update(som_figures)
    else:
        metrics["som"] = {"reason": f"the bottleneck is {type(model.bottleneck).__name__}, not a SOM grid"}
    return EvaluationResult(metrics, pd.DataFrame(), per_scan, figures)
