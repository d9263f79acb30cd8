"""The QC gate: each check stops its known-bad control with the measured value and limit, and passes a head."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvq.config import validated_config
from brainvq.qc import (
    AffineError,
    ConstantVolumeError,
    FieldOfViewError,
    ForegroundVolumeError,
    IntensityLevelsError,
    SaturationError,
    Thresholds,
    VoxelSizeError,
    check_brain_mask,
    check_volume,
)

LIMITS = Thresholds.from_config(validated_config({})["qc"])
PATH = Path("/data/scan.nii.gz")


def head(shape=(90, 100, 80), zooms=(2.0, 2.0, 2.0), dtype=np.int16, seed=0) -> nib.Nifti1Image:
    """A noisy ellipsoid head (radii 70, 85, 65 mm: about 1,600 cm3) on a background of low noise."""
    grid = (np.indices(shape) - (np.asarray(shape)[:, None, None, None] - 1) / 2) * np.reshape(zooms, (3, 1, 1, 1))
    inside = ((grid / np.reshape([70, 85, 65], (3, 1, 1, 1))) ** 2).sum(0) < 1
    rng = np.random.default_rng(seed)
    data = np.where(inside, 600 + 200 * rng.standard_normal(shape), 20 + 5 * rng.standard_normal(shape))
    return nib.Nifti1Image(np.clip(data, 0, None).astype(dtype), np.diag([*zooms, 1.0]))


def checked(img) -> dict:
    return check_volume(img, np.asarray(img.dataobj, np.float32), img.affine, PATH, LIMITS)


def test_a_plausible_head_passes_every_check():
    measures = checked(head())
    assert 1000 < measures["head_cm3"] < 2500


def test_a_few_saturated_voxels_in_an_empty_volume_are_stopped():
    data = np.zeros((90, 100, 80), np.int16)
    data.flat[np.random.default_rng(0).choice(data.size, 50, replace=False)] = 32767
    with pytest.raises(IntensityLevelsError, match=r"scan.nii.gz.*'distinct intensities'.*2 distinct values, below 32"):
        checked(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])))


def test_a_constant_volume_is_stopped():
    data = np.full((90, 100, 80), 500.0, np.float32) + np.random.default_rng(0).normal(0, 0.01, (90, 100, 80))
    with pytest.raises(ConstantVolumeError, match="'constant volume'"):
        checked(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])))


def test_a_tiny_volume_is_stopped_by_its_field_of_view():
    img = nib.Nifti1Image(np.random.default_rng(0).integers(0, 1000, (8, 8, 8)).astype(np.int16), np.eye(4))
    with pytest.raises(FieldOfViewError, match=r"spans \(8.0, 8.0, 8.0\) mm, below 60"):
        checked(img)


def test_implausible_voxel_sizes_are_stopped():
    with pytest.raises(VoxelSizeError, match="voxel sizes"):
        checked(head(shape=(90, 100, 80), zooms=(2.0, 2.0, 20.0)))


@pytest.mark.parametrize("affine", [np.zeros((4, 4)), np.diag([2.0, 2.0, np.nan, 1.0])])
def test_a_singular_or_non_finite_affine_is_stopped(affine):
    img = head()
    with pytest.raises(AffineError, match="affine"):
        check_volume(img, np.asarray(img.dataobj, np.float32), affine, PATH, LIMITS)


def test_a_clipped_export_is_stopped_by_saturation():
    img = head()
    data = np.asarray(img.dataobj).copy()
    data[data > 700] = 32767  # about 30 % of the head at the int16 maximum
    with pytest.raises(SaturationError, match=r"at the data type's maximum 32767"):
        checked(nib.Nifti1Image(data, img.affine))


def test_a_small_object_is_stopped_by_head_size():
    img = head()
    data = np.asarray(img.dataobj).copy()
    grid = np.indices(data.shape) - np.reshape([45, 50, 40], (3, 1, 1, 1))
    data[(grid**2).sum(0) > 8**2] = np.random.default_rng(1).integers(0, 40, data.shape)[(grid**2).sum(0) > 8**2]
    with pytest.raises(ForegroundVolumeError, match=r"'head size'.*below 500 cm³"):
        checked(nib.Nifti1Image(data, img.affine))


def test_a_skull_stripping_mask_far_below_a_brain_is_stopped_and_a_brain_passes():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    small = np.zeros((100, 100, 100), bool)
    small[40:60, 40:60, 40:60] = True  # 8 cm3
    with pytest.raises(ForegroundVolumeError, match=r"brain mask after skull stripping is 8 cm³"):
        check_brain_mask(small, affine, PATH, LIMITS, "brain")
    brain = np.zeros((140, 170, 130), bool)
    brain[10:130, 10:160, 10:120] = True
    assert check_brain_mask(brain, affine, PATH, LIMITS, "brain") > 1000
