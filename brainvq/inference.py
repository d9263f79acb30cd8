"""Trained models on prepared scans: codes, reconstructions and anomaly maps, put back on the input's voxel grid.

A :class:`PreparedScan` is one volume after the preprocessing the models were trained with (the bundle's
``preprocess`` section): RAS at ``spacing_mm``, skull stripping, optional N4, axial slices cut to
``field_of_view_mm`` and resized. :class:`SliceModel` encodes, decodes and scores its slices, and puts
reconstructions and anomaly maps back through the same geometry onto the input's voxel grid (its shape and
affine), so they overlay the input in any viewer: reconstructions in the input's intensity units (the clip
window of the preprocessing), anomaly maps in normalised intensity (|slice - reconstruction| on the [0, 1]
slices, smoothed as the evaluation smooths them). ``brainvq.load_model`` (brainvq/api.py) adds volumes given
as paths or images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from brainvq.bundle import MODEL_FILES, read_bundle, trained_preprocess
from brainvq.config import section_defaults
from brainvq.measures.anomaly import anomaly_score_maps
from brainvq.measures.similarity import reconstruction_metric_table
from brainvq.preprocessing import float32_image, intensity_window, resample_to_grid, scan_slices, slices_to_volume
from brainvq.prior import load_prior
from brainvq.runtime import select_device
from brainvq.sampling import sample_codes
from brainvq.training import load_vqvae


@dataclass
class PreparedScan:
    """One volume after the run's preprocessing, with what maps its slices back onto the input's voxel grid.

    Attributes:
        images, masks: ``(N, H, W)`` slices in [0, 1] (as the shards hold them) and their brain masks.
        slice_index, slice_position: ``(N,)`` axial index in the RAS volume and normalised position.
        window: ``(top, left, side)`` where the slices were cut from the RAS volume's axial images.
        brain_mask: the RAS volume's mask; ras_affine: its affine.
        intensity_range: the input intensities that slice values 0 and 1 stand for.
        native_shape, native_affine: the input's voxel grid.
        excluded_reason: why no slice was kept ('' when some were).
    """

    images: np.ndarray
    masks: np.ndarray
    slice_index: np.ndarray
    slice_position: np.ndarray
    window: tuple[int, int, int]
    brain_mask: np.ndarray
    ras_affine: np.ndarray
    intensity_range: tuple[float, float]
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    excluded_reason: str = ""


@dataclass
class ScanOutputs:
    """What the models make of one prepared scan: codes ``(N, h, w)`` int16, reconstructions and anomaly scores
    ``(N, H, W)`` float32 (0 outside the brain), and one row of reconstruction metrics per slice."""

    codes: np.ndarray
    reconstructions: np.ndarray
    anomaly: np.ndarray
    metrics: pd.DataFrame


def prepared_scan(brain: np.ndarray, mask: np.ndarray, ras_affine: np.ndarray, native: nib.Nifti1Image,
                  settings: dict) -> PreparedScan:
    """Return the PreparedScan of a preprocessed RAS ``brain`` volume and its ``mask`` (``native``: the input)."""
    mask = np.asarray(mask, bool)
    cut = scan_slices(brain, mask, settings)
    low, high = intensity_window(brain, mask, settings["clip_percentiles"]) if mask.any() else (0.0, 1.0)
    return PreparedScan(
        images=cut["images"].astype(np.float32), masks=cut["masks"], slice_index=cut["slice_index"],
        slice_position=cut["slice_position"], window=tuple(int(v) for v in cut["window"]), brain_mask=mask,
        ras_affine=np.asarray(ras_affine, float), intensity_range=(low, high), native_shape=tuple(native.shape[:3]),
        native_affine=np.asarray(native.affine, float), excluded_reason=cut["excluded_reason"])


class SliceModel:
    """A trained VQ-VAE and prior with the preprocessing they were trained with, working on prepared scans.

    The workflow's apply_scan rule uses it on scans its preprocess rules prepared; :class:`brainvq.api.BrainModel`
    (``brainvq.load_model``) adds the preprocessing of volumes given as paths or images.

    Attributes:
        folder: the bundle folder; manifest: its bundle.json; settings: the ``preprocess`` section.
        vqvae, prior: the models (eval mode, on ``device``); batch_size: slices per forward pass.
    """

    def __init__(self, folder: Path, manifest: dict, vqvae, prior, device: torch.device, batch_size: int = 64):
        self.folder, self.manifest, self.vqvae, self.prior, self.device = folder, manifest, vqvae, prior, device
        self.settings = trained_preprocess(manifest)
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.folder)!r}: run {self.manifest.get('run')!r} trained on "
                f"{self.manifest.get('source')!r}, {self.settings['size']} px slices)")

    @torch.no_grad()
    def _batches(self, function, array: np.ndarray, dtype) -> np.ndarray:
        outputs = [function(torch.as_tensor(array[start:start + self.batch_size], dtype=dtype, device=self.device))
                   .float().cpu().numpy() for start in range(0, len(array), self.batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def encode_slices(self, prepared: PreparedScan) -> np.ndarray:
        """Return the codes ``(n_slices, h, w)`` int16 of a prepared scan's slices, lowest slice first."""
        if not len(prepared.images):
            return np.zeros((0, *self.manifest["code_map_size"]), np.int16)
        return self._batches(self.vqvae.encode_indices, prepared.images[:, None], torch.float32).astype(np.int16)

    def decode(self, codes) -> np.ndarray:
        """Return the slices ``(N, H, W)`` float32 in [0, 1] decoded from code maps ``(N, h, w)``."""
        codes = np.asarray(codes, np.int64)
        if not len(codes):
            return np.zeros((0, *self.manifest["image_size"]), np.float32)
        return np.clip(self._batches(self.vqvae.decode_indices, codes, torch.long)[:, 0], 0, 1).astype(np.float32)

    def outputs(self, prepared: PreparedScan) -> ScanOutputs:
        """Return a prepared scan's codes, reconstructions, anomaly scores and per-slice metrics."""
        codes = self.encode_slices(prepared)
        reconstructions = self.decode(codes)
        sigma_px = self.manifest["anomaly_smoothing_fraction"] * self.settings["size"]
        anomaly = anomaly_score_maps(prepared.images, reconstructions, sigma_px) * prepared.masks
        metrics = reconstruction_metric_table(prepared.images, reconstructions, prepared.masks)
        return ScanOutputs(codes, reconstructions, anomaly.astype(np.float32), metrics)

    def native_images(self, prepared: PreparedScan, outputs: ScanOutputs) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        """Return (reconstruction, anomaly map) on the input's voxel grid; 0 outside the brain and the kept slices."""
        inside = np.zeros_like(prepared.brain_mask)
        inside[:, :, prepared.slice_index] = prepared.brain_mask[:, :, prepared.slice_index]
        low, high = prepared.intensity_range
        shape = prepared.brain_mask.shape
        recon = slices_to_volume(outputs.reconstructions, prepared.slice_index, prepared.window, shape)
        anomaly = slices_to_volume(outputs.anomaly, prepared.slice_index, prepared.window, shape)
        recon = np.where(inside, low + recon * (high - low), 0.0)
        anomaly = np.where(inside, anomaly, 0.0)
        return tuple(resample_to_grid(float32_image(data, prepared.ras_affine), prepared.native_shape,
                                      prepared.native_affine) for data in (recon, anomaly))

    def sample(self, n: int, positions, labels=None, temperature: float | None = None, seed: int = 0,
               top_p: float | None = None) -> np.ndarray:
        """Return ``n`` slices ``(n, H, W)`` drawn from the prior, spread evenly over slice ``positions`` (0 = the
        lowest brain slice, 1 = the highest), decoded by the VQ-VAE. ``labels``: one class per slice, for a prior
        trained with ``pixelcnn.condition_label``. ``temperature`` and ``top_p`` default to the ``sample`` rule's
        (config/schema.yaml)."""
        defaults = section_defaults("sample")
        plan = np.sort(np.asarray(positions, np.float32)[np.arange(n) % len(positions)])
        codes = sample_codes(self.prior, plan, labels,
                             temperature=defaults["temperature"] if temperature is None else temperature, seed=seed,
                             batch_size=self.batch_size, device=self.device,
                             top_p=defaults["top_p"] if top_p is None else top_p)
        return self.decode(codes.numpy())


def load_slice_model(path: str | Path, device: str = "cpu", strict_versions: bool = False, batch_size: int = 64,
                     model_class: type = SliceModel):
    """Return the trained models of a run folder (``results/<run>``) or a model bundle as ``model_class``.

    Args:
        path: a finished run's folder or its ``model/`` bundle (also a copy of it elsewhere).
        device: 'cpu', 'cuda' or 'auto'.
        strict_versions: refuse a bundle written with other package versions (default: warn).
        batch_size: slices per forward pass.
        model_class: SliceModel or a subclass (``brainvq.api.BrainModel``).

    Raises:
        brainvq.bundle.ModelNotReadyError: the run has not finished; BundleVersionError, BundleChecksumError.
    """
    folder, manifest = read_bundle(path, strict_versions)
    torch_device = select_device(device)
    vqvae = load_vqvae(folder / MODEL_FILES["vqvae"]).to(torch_device).eval()
    prior = load_prior(folder / MODEL_FILES["prior"], torch_device).eval()
    return model_class(folder, manifest, vqvae, prior, torch_device, batch_size)
