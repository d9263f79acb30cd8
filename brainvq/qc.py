"""The quality-control gate: checks that a volume is a plausible adult T1 before anything is built from it.

Each failed check is its own :class:`brainvq.io.VolumeError` subclass whose message names the file, the
check, the measured value and the threshold (the ``qc`` section of config/schema.yaml) and the fix, so
``preprocess.on_error: skip`` skips the scan and ``qc/excluded.csv`` says why. The defaults pass every
real adult T1 (IXI, OASIS, the demo cohort) and stop the junk that used to reach the shards: a few
saturated voxels in an empty volume, constant volumes, volumes a few millimetres across, broken affines.

All measures are cheap (no mask filling), so discovery can run them on every volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.filters import threshold_otsu

from brainvq.io import VolumeError, brain_mask_path

MM3_PER_CM3 = 1000.0
# Distributions (distinct values, percentiles, Otsu's threshold) are measured on at most this many evenly
# strided voxels: a full-size volume has ten million, and the measures barely move while the gate gets ~10x faster.
SAMPLE_VOXELS = 1_000_000


class AffineError(VolumeError):
    """The voxel-to-world affine is singular or not finite."""


class VoxelSizeError(VolumeError):
    """A voxel size is implausible for an MRI volume."""


class FieldOfViewError(VolumeError):
    """The volume is too small in millimetres along some axis to hold a head."""


class IntensityLevelsError(VolumeError):
    """Too few distinct intensity values: a mask, a label map or a broken export rather than a T1."""


class ConstantVolumeError(VolumeError):
    """The intensities are constant or nearly so."""


class SaturationError(VolumeError):
    """A large share of voxels sits at the maximum of the stored data type (clipped export)."""


class ForegroundVolumeError(VolumeError):
    """The head (or, after skull stripping, brain) foreground is far below an adult size, or a brain mask far
    above it (a head taken for a brain)."""


@dataclass(frozen=True)
class Thresholds:
    """The limits of the QC gate (the ``qc`` config section; see config/schema.yaml for each meaning)."""

    min_voxel_mm: float = 0.2
    max_voxel_mm: float = 8.0
    min_field_of_view_mm: float = 60.0
    min_distinct_values: int = 32
    min_relative_range: float = 0.01
    max_saturated_fraction: float = 0.01
    min_head_cm3: float = 500.0
    min_brain_cm3: float = 400.0
    max_brain_cm3: float = 3000.0

    @classmethod
    def from_config(cls, section: dict) -> Thresholds:
        """Return the thresholds of a validated ``qc`` config section."""
        return cls(**{name: section[name] for name in cls.__dataclass_fields__})


def _fix(what: str) -> str:
    return (f"If the file is a valid T1 volume, adjust qc.{what} in your config; otherwise remove or re-export "
            "it (or set preprocess.on_error: skip to leave it out and list it in qc/excluded.csv)")


def voxel_sample(values: np.ndarray) -> np.ndarray:
    """Return about SAMPLE_VOXELS evenly strided voxels of ``values`` (all of a small volume) and its extremes.

    The extremes keep a few outliers (50 saturated voxels in an empty volume) in view of Otsu's threshold,
    as in the full volume.
    """
    values = np.asarray(values).ravel(order="K")  # memory order: no copy of a Fortran-ordered volume
    step = values.size // SAMPLE_VOXELS
    return values if step <= 1 else np.concatenate([values[::step], [values.min(), values.max()]])


def voxel_sizes_mm(affine: np.ndarray) -> np.ndarray:
    """Return the voxel size along each voxel axis (column norms of the affine's 3x3 part)."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def check_affine(affine: np.ndarray, path: Path) -> None:
    """Raise AffineError unless ``affine`` is finite and invertible."""
    affine = np.asarray(affine, float)
    if not np.isfinite(affine).all():
        raise AffineError(f"{path}: QC check 'affine' failed: the voxel-to-world affine has non-finite entries; "
                          "fix the header's sform/qform (e.g. re-export the volume)")
    determinant = float(np.linalg.det(affine[:3, :3]))
    if abs(determinant) < 1e-6:
        raise AffineError(f"{path}: QC check 'affine' failed: the voxel-to-world affine is singular (determinant "
                          f"{determinant:.3g}); the header's sform/qform is broken (all zero?). Re-export the volume "
                          "or fix its header")


def check_geometry(affine: np.ndarray, shape, path: Path, limits: Thresholds) -> None:
    """Raise VoxelSizeError or FieldOfViewError for implausible voxel sizes or a field of view below the limit."""
    zooms = voxel_sizes_mm(affine)
    if zooms.min() < limits.min_voxel_mm or zooms.max() > limits.max_voxel_mm:
        raise VoxelSizeError(
            f"{path}: QC check 'voxel size' failed: voxel sizes {tuple(round(float(z), 3) for z in zooms)} mm lie "
            f"outside [{limits.min_voxel_mm}, {limits.max_voxel_mm}] mm. " + _fix("min_voxel_mm / qc.max_voxel_mm"))
    extent = zooms * np.asarray(shape[:3], float)
    if extent.min() < limits.min_field_of_view_mm:
        raise FieldOfViewError(
            f"{path}: QC check 'field of view' failed: the volume spans {tuple(round(float(e), 1) for e in extent)} "
            f"mm, below {limits.min_field_of_view_mm} mm along an axis: too small to hold a head. "
            + _fix("min_field_of_view_mm"))


def check_intensities(data: np.ndarray, path: Path, limits: Thresholds, dtype_max: float | None = None) -> None:
    """Raise IntensityLevelsError, ConstantVolumeError or SaturationError for a volume that is not a usable T1.

    Args:
        data: the voxels (any shape), as read (before scaling to float is fine).
        path: the file, for the message.
        limits: the thresholds.
        dtype_max: the maximum of the file's stored integer type (None for float types: no saturation check).
    """
    values = np.asarray(data).ravel(order="K")
    sample = voxel_sample(values)
    distinct = np.unique(sample).size
    if distinct < limits.min_distinct_values:
        raise IntensityLevelsError(
            f"{path}: QC check 'distinct intensities' failed: {distinct} distinct values, below "
            f"{limits.min_distinct_values}; a T1 volume has thousands. " + _fix("min_distinct_values"))
    low, high = np.percentile(sample, [0.5, 99.5])
    scale = max(abs(float(high)), abs(float(low)), np.finfo(np.float32).tiny)
    if (high - low) / scale < limits.min_relative_range:
        raise ConstantVolumeError(
            f"{path}: QC check 'constant volume' failed: 99% of voxels lie within {float(high - low):.4g} of each "
            f"other ({(high - low) / scale:.2%} of the intensity scale, below {limits.min_relative_range:.2%}). "
            + _fix("min_relative_range"))
    if dtype_max is not None:
        saturated = float(np.mean(values >= dtype_max))
        if saturated > limits.max_saturated_fraction:
            raise SaturationError(
                f"{path}: QC check 'saturation' failed: {saturated:.2%} of voxels sit at the data type's maximum "
                f"{dtype_max:g}, above {limits.max_saturated_fraction:.2%}: the export clipped the intensities. "
                + _fix("max_saturated_fraction"))


def foreground_cm3(data: np.ndarray, affine: np.ndarray) -> float:
    """Return the volume (cm³) of voxels above the Otsu threshold: a cheap lower bound of the head's size."""
    data = np.asarray(data, np.float32)
    if float(data.max()) <= float(data.min()):
        return 0.0
    voxel_mm3 = float(np.prod(voxel_sizes_mm(affine)))
    return float((data > threshold_otsu(voxel_sample(data))).sum()) * voxel_mm3 / MM3_PER_CM3


def mask_cm3(mask: np.ndarray, affine: np.ndarray) -> float:
    """Return the volume (cm³) of a boolean mask on a grid with ``affine``."""
    return float(np.count_nonzero(mask)) * float(np.prod(voxel_sizes_mm(affine))) / MM3_PER_CM3


def check_head_size(data: np.ndarray, affine: np.ndarray, path: Path, limits: Thresholds) -> float:
    """Raise ForegroundVolumeError when the foreground is below ``min_head_cm3``; return its volume in cm³."""
    size = foreground_cm3(data, affine)
    if size < limits.min_head_cm3:
        raise ForegroundVolumeError(
            f"{path}: QC check 'head size' failed: the foreground (voxels above the Otsu threshold) is "
            f"{size:.0f} cm³, below {limits.min_head_cm3:g} cm³; an adult head gives well over 1,000 cm³. "
            + _fix("min_head_cm3"))
    return size


def check_brain_mask(mask: np.ndarray, affine: np.ndarray, path: Path, limits: Thresholds, what: str) -> float:
    """Raise ForegroundVolumeError when a skull-stripping mask is below its adult size, or a brain mask far above
    an adult brain (a head: a volume taken as skull-stripped that is not); return its cm³.

    Args:
        what: ``"brain"`` (bet, precomputed masks: limits ``min_brain_cm3`` and ``max_brain_cm3``) or ``"head"``
            (skull_strip none: limit ``min_head_cm3``).
    """
    size = mask_cm3(mask, affine)
    limit, key = (limits.min_brain_cm3, "min_brain_cm3") if what == "brain" else (limits.min_head_cm3, "min_head_cm3")
    if size < limit:
        raise ForegroundVolumeError(
            f"{path}: QC check '{what} mask size' failed: the {what} mask after skull stripping is {size:.0f} cm³, "
            f"below {limit:g} cm³ (an adult brain is about 1,000-1,600 cm³). Check the skull stripping "
            f"(preprocess.skull_strip, preprocess.bet_fractional_threshold) or adjust qc.{key}")
    if what == "brain" and size > limits.max_brain_cm3:
        # A DICOM series (a folder) cannot have a mask file beside it; a file names the one it would need.
        beside = f"no {brain_mask_path(path).name} beside it" if Path(path).suffix else "no mask file (a folder)"
        raise ForegroundVolumeError(
            f"{path}: QC check 'brain mask size' failed: the brain mask after skull stripping is {size:.0f} cm³, "
            f"above {limits.max_brain_cm3:g} cm³ (an adult brain is about 1,000-1,600 cm³): a head, not a brain. "
            f"With skull_strip precomputed and {beside}, every voxel above 0 counts as brain, so the volume must "
            "already be skull-stripped: put its brain mask beside it, or skull-strip it first. With bet, check "
            "preprocess.bet_fractional_threshold. Or adjust qc.max_brain_cm3")
    return size


# The mask each preprocess.skull_strip method leaves, hence the size limit it must pass.
MASK_KIND = {"none": "head", "bet": "brain", "precomputed": "brain"}


def skull_strip_problem(mask: np.ndarray, affine: np.ndarray, path: str | Path, limits: Thresholds, method: str,
                        on_error: str) -> str:
    """Run the gate's check after skull stripping; return '' when the mask passes, else why the scan is left out.

    Args:
        mask: the skull-stripping mask (boolean, 3D); an empty one is not checked (skull_strip has already
            marked that scan under ``on_error: skip``).
        affine: the mask's voxel-to-world affine.
        path: the scan's raw file, named in the message.
        limits: the thresholds.
        method: ``preprocess.skull_strip`` (see MASK_KIND).
        on_error: ``preprocess.on_error``.

    Raises:
        ForegroundVolumeError: with on_error 'fail', when the mask is far below an adult size (or a brain mask
            far above it).
    """
    if not np.any(mask):
        return ""
    try:
        check_brain_mask(mask, affine, Path(path), limits, MASK_KIND[method])
    except ForegroundVolumeError as error:
        if on_error != "skip":
            raise
        return f"{type(error).__name__}: {error}"
    return ""


def stored_type_maximum(img) -> float | None:
    """Return the largest value of the file's stored integer type (None for float types)."""
    dtype = np.dtype(img.get_data_dtype())
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else None


def unscaled_voxels(img, data: np.ndarray | None = None) -> np.ndarray:
    """Return the voxels as stored (before scl_slope/inter), for the saturation check.

    Args:
        data: the scaled voxels already read, returned as they are when the scaling is the identity
            (most files) rather than reading the file again.
    """
    proxy = img.dataobj
    identity = float(getattr(proxy, "slope", 1.0)) == 1.0 and float(getattr(proxy, "inter", 0.0)) == 0.0
    if data is not None and identity:
        return data
    return np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)


def check_volume(img, data: np.ndarray, affine: np.ndarray, path: str | Path, limits: Thresholds) -> dict:
    """Run every volume check of the gate; return the measures (for logs and reports).

    Args:
        img: the image as loaded from the file (for its stored type).
        data: the voxels (float, 3D) that will be used.
        affine: the voxel-to-world affine that will be used.
        path: the file.
        limits: the thresholds.

    Raises:
        VolumeError: one subclass per failed check (see the module docstring).
    """
    path = Path(path)
    check_affine(affine, path)
    check_geometry(affine, data.shape, path, limits)
    dtype_max = stored_type_maximum(img)
    check_intensities(unscaled_voxels(img, data) if dtype_max is not None else data, path, limits, dtype_max)
    head = check_head_size(data, affine, path, limits)
    return {"voxel_mm": [float(z) for z in voxel_sizes_mm(affine)], "head_cm3": round(head, 1),
            "field_of_view_mm": [float(z) for z in voxel_sizes_mm(affine) * np.asarray(data.shape[:3])]}


def gated_brain(brain_path: str | Path, mask_path: str | Path, raw_path: str | Path, qc: dict,
                preprocess: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Return a skull-stripped scan's (brain volume float32, mask bool, reason) where ``reason`` is why the QC gate
    after skull stripping leaves the scan out ('' when it passes): a mask far from an adult size stops the run
    (``preprocess.on_error: fail``) or leaves the scan out (the rules slice_volume, cut_volume and apply_scan).

    Raises:
        ForegroundVolumeError: with on_error 'fail', when the mask is far from an adult size.
    """
    import nibabel as nib

    volume = nib.load(brain_path).get_fdata(dtype=np.float32)
    mask_img = nib.load(mask_path)
    mask = np.asarray(mask_img.dataobj) > 0
    reason = skull_strip_problem(mask, mask_img.affine, raw_path, Thresholds.from_config(qc),
                                 preprocess["skull_strip"], preprocess["on_error"])
    return volume, mask, reason
