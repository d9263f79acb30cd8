"""Using a trained model on new scans: ``brainvq.load_model(path)`` with a run folder or a model bundle.

::

    import brainvq
    model = brainvq.load_model("results/demo")             # or results/demo/model, a copied bundle
    codes = model.encode("sub-01_T1w.nii.gz")               # (n_slices, h, w) int16
    slices = model.decode(codes)                            # (n_slices, H, W) float32 in [0, 1]
    recon = model.reconstruct("sub-01_T1w.nii.gz")          # nibabel image on the input's own voxel grid
    scores = model.anomaly_map(nibabel.load("patient.nii.gz"))
    samples = model.sample(16, positions=[0.3, 0.5, 0.7])   # (16, H, W) slices drawn from the prior

A volume is a path (NIfTI, Analyze with ``orientation``, or a DICOM series folder) or a nibabel image. Every
volume goes through the preprocessing the models were trained with (the bundle's ``preprocess`` section):
RAS at ``spacing_mm``, skull stripping, optional N4, axial slices cut to ``field_of_view_mm`` and resized.
Reconstructions and anomaly maps are put back through the same geometry onto the input's voxel grid (its
shape and affine), so they overlay the input in any viewer; reconstructions are in the input's intensity units
(the clip window of the preprocessing), anomaly maps in normalised intensity (|slice - reconstruction| on the
[0, 1] slices, smoothed as the evaluation smooths them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from brainvq.bundle import MODEL_FILES, read_bundle, trained_preprocess
from brainvq.io import checked_voxels, load_volume, read_voxels
from brainvq.measures.anomaly import anomaly_score_maps
from brainvq.measures.similarity import reconstruction_metric_table
from brainvq.preprocessing import (
    float32_image,
    intensity_window,
    n4_bias_correct,
    reorient_to_ras,
    resample_isotropic,
    resample_to_grid,
    scan_slices,
    skull_strip,
    slices_to_volume,
)
from brainvq.prior import load_prior, sample_codes
from brainvq.runtime import select_device
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


def as_image(volume, orientation: str | None = None) -> nib.Nifti1Image:
    """Return ``volume`` (a path or a nibabel image) as a validated float32 image (see ``brainvq.io.load_volume``)."""
    if isinstance(volume, (str, Path)):
        return load_volume(volume, orientation)
    data = checked_voxels(read_voxels(volume, Path(volume.get_filename() or "<nibabel image>")),
                          Path(volume.get_filename() or "<nibabel image>"))
    return float32_image(data, volume.affine)


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


def prepare_volume(volume, settings: dict, orientation: str | None = None) -> PreparedScan:
    """Return ``volume`` through the whole preprocessing of ``settings`` (a ``preprocess`` section).

    Raises:
        brainvq.io.VolumeError: an unreadable or invalid volume; brainvq.preprocessing.EmptyMaskError: no brain.
    """
    native = as_image(volume, orientation)
    ras = resample_isotropic(reorient_to_ras(native), settings["spacing_mm"])
    brain, mask = skull_strip(ras, settings["skull_strip"], bet_fractional_threshold=settings["bet_fractional_threshold"],
                              bet_iterations=settings["bet_iterations"])
    if settings["n4"]:
        brain = n4_bias_correct(brain, mask)
    return prepared_scan(brain.get_fdata(dtype=np.float32), np.asarray(mask.dataobj) > 0, ras.affine, native, settings)


class BrainModel:
    """A trained VQ-VAE and prior with the preprocessing they were trained with. Use :func:`load_model`.

    Attributes:
        folder: the bundle folder; manifest: its bundle.json; settings: the ``preprocess`` section.
        vqvae, prior: the models (eval mode, on ``device``).
    """

    def __init__(self, folder: Path, manifest: dict, vqvae, prior, device: torch.device, batch_size: int = 64):
        self.folder, self.manifest, self.vqvae, self.prior, self.device = folder, manifest, vqvae, prior, device
        self.settings = trained_preprocess(manifest)
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return (f"BrainModel({str(self.folder)!r}: run {self.manifest.get('run')!r} trained on "
                f"{self.manifest.get('source')!r}, {self.settings['size']} px slices)")

    def prepare(self, volume, orientation: str | None = None) -> PreparedScan:
        """Return ``volume`` (path, nibabel image or PreparedScan) after the bundle's preprocessing."""
        if isinstance(volume, PreparedScan):
            return volume
        return prepare_volume(volume, self.settings, orientation)

    @torch.no_grad()
    def _batches(self, function, array: np.ndarray, dtype) -> np.ndarray:
        outputs = [function(torch.as_tensor(array[start:start + self.batch_size], dtype=dtype, device=self.device))
                   .float().cpu().numpy() for start in range(0, len(array), self.batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def encode(self, volume, orientation: str | None = None) -> np.ndarray:
        """Return the codes ``(n_slices, h, w)`` int16 of a volume's slices, lowest slice first."""
        prepared = self.prepare(volume, orientation)
        if not len(prepared.images):
            return np.zeros((0, *self.manifest["code_map_size"]), np.int16)
        return self._batches(self.vqvae.encode_indices, prepared.images[:, None], torch.float32).astype(np.int16)

    def decode(self, codes) -> np.ndarray:
        """Return the slices ``(N, H, W)`` float32 in [0, 1] decoded from code maps ``(N, h, w)``."""
        codes = np.asarray(codes, np.int64)
        if not len(codes):
            return np.zeros((0, *self.manifest["image_size"]), np.float32)
        return np.clip(self._batches(self.vqvae.decode_indices, codes, torch.long)[:, 0], 0, 1).astype(np.float32)

    def run(self, volume, orientation: str | None = None) -> tuple[PreparedScan, ScanOutputs]:
        """Return the prepared scan and its codes, reconstructions, anomaly scores and per-slice metrics."""
        prepared = self.prepare(volume, orientation)
        codes = self.encode(prepared)
        reconstructions = self.decode(codes)
        sigma_px = self.manifest["anomaly_smoothing_fraction"] * self.settings["size"]
        anomaly = anomaly_score_maps(prepared.images, reconstructions, sigma_px) * prepared.masks
        metrics = reconstruction_metric_table(prepared.images, reconstructions, prepared.masks)
        return prepared, ScanOutputs(codes, reconstructions, anomaly.astype(np.float32), metrics)

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

    def reconstruct(self, volume, orientation: str | None = None) -> nib.Nifti1Image:
        """Return the reconstruction of ``volume`` on its own voxel grid, in its intensity units."""
        return self.native_images(*self.run(volume, orientation))[0]

    def anomaly_map(self, volume, orientation: str | None = None) -> nib.Nifti1Image:
        """Return the anomaly map of ``volume`` on its own voxel grid: smoothed |slice - reconstruction| in the brain."""
        return self.native_images(*self.run(volume, orientation))[1]

    def sample(self, n: int, positions, labels=None, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
        """Return ``n`` slices ``(n, H, W)`` drawn from the prior, spread evenly over slice ``positions`` (0 = the
        lowest brain slice, 1 = the highest), decoded by the VQ-VAE. ``labels``: one class per slice, for a prior
        trained with ``pixelcnn.condition_label``."""
        plan = np.sort(np.asarray(positions, np.float32)[np.arange(n) % len(positions)])
        codes = sample_codes(self.prior, plan, labels, temperature=temperature, seed=seed,
                             batch_size=self.batch_size, device=self.device)
        return self.decode(codes.numpy())


def load_model(path: str | Path, device: str = "cpu", strict_versions: bool = False,
               batch_size: int = 64) -> BrainModel:
    """Return the trained models of a run folder (``results/<run>``) or a model bundle, ready to use.

    Args:
        path: a finished run's folder or its ``model/`` bundle (also a copy of it elsewhere).
        device: 'cpu', 'cuda' or 'auto'.
        strict_versions: refuse a bundle written with other package versions (default: warn).
        batch_size: slices per forward pass.

    Raises:
        brainvq.bundle.ModelNotReadyError: the run has not finished; BundleVersionError, BundleChecksumError.
    """
    folder, manifest = read_bundle(path, strict_versions)
    torch_device = select_device(device)
    vqvae = load_vqvae(folder / MODEL_FILES["vqvae"], torch_device)
    prior = load_prior(folder / MODEL_FILES["prior"], torch_device)
    return BrainModel(folder, manifest, vqvae, prior, torch_device, batch_size)
