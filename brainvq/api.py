"""The Python API: ``brainvq.load_model(path)`` with a run folder or a model bundle, on volumes given as paths or images.

::

    import brainvq
    model = brainvq.load_model("results/demo")             # or results/demo/model, a copied bundle
    codes = model.encode("sub-01_T1w.nii.gz")               # (n_slices, h, w) int16
    slices = model.decode(codes)                            # (n_slices, H, W) float32 in [0, 1]
    recon = model.reconstruct("sub-01_T1w.nii.gz")          # nibabel image on the input's own voxel grid
    scores = model.anomaly_map(nibabel.load("patient.nii.gz"))
    samples = model.sample(16, positions=[0.3, 0.5, 0.7])   # (16, H, W) slices drawn from the prior

A volume is a path (NIfTI, Analyze with ``orientation``, or a DICOM series folder), a nibabel image or a
``PreparedScan``; it goes through the preprocessing the models were trained with (see brainvq/inference.py).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from brainvq.inference import PreparedScan, ScanOutputs, SliceModel, load_slice_model, prepared_scan
from brainvq.io import brain_mask_path, checked_voxels, load_volume, read_voxels
from brainvq.preprocessing import (
    float32_image,
    mask_on_grid,
    n4_bias_correct,
    reorient_to_ras,
    resample_isotropic,
    skull_strip,
)
from brainvq.qc import MASK_KIND, Thresholds, check_brain_mask


def as_image(volume, orientation: str | None = None) -> nib.Nifti1Image:
    """Return ``volume`` (a path or a nibabel image) as a validated float32 image (see ``brainvq.io.load_volume``)."""
    if isinstance(volume, (str, Path)):
        return load_volume(volume, orientation)
    name = Path(volume.get_filename() or "<nibabel image>")
    return float32_image(checked_voxels(read_voxels(volume, name), name), volume.affine)


def precomputed_mask(volume, ras: nib.Nifti1Image, orientation: str | None) -> np.ndarray | None:
    """Return the brain mask file found beside a volume given as a file path (``<stem>_brainmask<extension>``,
    as discovery finds it) on the RAS grid of ``ras``, or None (an image, a DICOM folder, or no such file)."""
    if not isinstance(volume, (str, Path)) or Path(volume).is_dir():
        return None
    path = brain_mask_path(volume)
    return mask_on_grid(load_volume(path, orientation), ras) if path.exists() else None


def prepare_volume(volume, settings: dict, orientation: str | None = None) -> PreparedScan:
    """Return ``volume`` through the whole preprocessing of ``settings`` (a ``preprocess`` section), through the
    QC gate after skull stripping (with skull_strip 'precomputed', the mask file beside a path is used).

    Raises:
        brainvq.io.VolumeError: an unreadable or invalid volume, or a brain mask far from an adult size (such as a
            head given to a model trained on skull-stripped brains); brainvq.preprocessing.EmptyMaskError: no brain.
    """
    native = as_image(volume, orientation)
    ras = resample_isotropic(reorient_to_ras(native), settings["spacing_mm"])
    method = settings["skull_strip"]
    brain, mask = skull_strip(ras, method, bet_fractional_threshold=settings["bet_fractional_threshold"],
                              bet_iterations=settings["bet_iterations"],
                              precomputed_mask=precomputed_mask(volume, ras, orientation) if method == "precomputed"
                              else None)
    inside = np.asarray(mask.dataobj) > 0
    name = Path(volume) if isinstance(volume, (str, Path)) else Path(volume.get_filename() or "<nibabel image>")
    check_brain_mask(inside, mask.affine, name, Thresholds(), MASK_KIND[method])
    if settings["n4"]:
        brain = n4_bias_correct(brain, mask)
    return prepared_scan(brain.get_fdata(dtype=np.float32), inside, ras.affine, native, settings)


class BrainModel(SliceModel):
    """A trained VQ-VAE and prior that take whole volumes (paths, nibabel images). Use :func:`load_model`."""

    def prepare(self, volume, orientation: str | None = None) -> PreparedScan:
        """Return ``volume`` (path, nibabel image or PreparedScan) after the bundle's preprocessing."""
        if isinstance(volume, PreparedScan):
            return volume
        return prepare_volume(volume, self.settings, orientation)

    def encode(self, volume, orientation: str | None = None) -> np.ndarray:
        """Return the codes ``(n_slices, h, w)`` int16 of a volume's slices, lowest slice first."""
        return self.encode_slices(self.prepare(volume, orientation))

    def run(self, volume, orientation: str | None = None) -> tuple[PreparedScan, ScanOutputs]:
        """Return the prepared volume and its codes, reconstructions, anomaly scores and per-slice metrics."""
        prepared = self.prepare(volume, orientation)
        return prepared, self.outputs(prepared)

    def reconstruct(self, volume, orientation: str | None = None) -> nib.Nifti1Image:
        """Return the reconstruction of ``volume`` on its own voxel grid, in its intensity units."""
        return self.native_images(*self.run(volume, orientation))[0]

    def anomaly_map(self, volume, orientation: str | None = None) -> nib.Nifti1Image:
        """Return the anomaly map of ``volume`` on its own voxel grid: smoothed |slice - reconstruction| in the brain."""
        return self.native_images(*self.run(volume, orientation))[1]


def load_model(path: str | Path, device: str = "cpu", strict_versions: bool = False,
               batch_size: int = 64) -> BrainModel:
    """Return the trained models of a run folder (``results/<run>``) or a model bundle, ready for volumes.

    See :func:`brainvq.inference.load_slice_model` for the arguments and errors.
    """
    return load_slice_model(path, device, strict_versions, batch_size, BrainModel)
