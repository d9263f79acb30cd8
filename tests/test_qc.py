"""The QC gate: each check stops its known-bad control with the measured value and limit, and passes a head."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import t1_head as head  # a plausible adult T1

from brainvq.config import validated_config
from brainvq.io import MissingPairError, brain_mask_path, discover_scans, discover_scans_with_exclusions, load_volume
from brainvq.preprocessing import scan_slices, skull_strip
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
    skull_strip_problem,
)
from brainvq.sources import get_source

LIMITS = Thresholds.from_config(validated_config({})["qc"])
PATH = Path("/data/scan.nii.gz")


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


def test_a_brain_mask_the_size_of_a_head_is_stopped_naming_the_mask_file_it_lacks_and_a_head_mask_passes():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    whole = np.ones((120, 120, 90), bool)  # every voxel above 0 of an unstripped head: 10,368 cm3
    with pytest.raises(ForegroundVolumeError, match=r"10368 cm³, above 3000 cm³.*a head, not a brain") as error:
        check_brain_mask(whole, affine, PATH, LIMITS, "brain")
    assert f"no {brain_mask_path(PATH).name} beside it" in str(error.value)
    assert "qc.max_brain_cm3" in str(error.value)
    assert check_brain_mask(whole, affine, PATH, LIMITS, "head") > 10000  # skull_strip none: a head is expected
    reason = skull_strip_problem(whole, affine, PATH, LIMITS, "precomputed", "skip")
    assert reason.startswith("ForegroundVolumeError: ") and "skull-strip it first" in reason


# ---------------------------------------------------------------------------------------------- the gate in discovery
# Each case the issue found reaching the shards, built small in the test and discovered from a local folder:
# with on_error: fail it stops discovery naming the file, the check and the fix; with skip, the scan is left
# out and its qc/excluded.csv row (discovery's rows, which split copies into qc/excluded.csv) says why.


def saturated_in_empty(path: Path) -> Path:
    data = np.zeros((90, 100, 80), np.int16)
    data.flat[np.random.default_rng(0).choice(data.size, 50, replace=False)] = 32767
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def saturated_in_noise(path: Path) -> Path:
    data = np.random.default_rng(1).integers(0, 60, (90, 100, 80)).astype(np.int16)
    data.flat[np.random.default_rng(0).choice(data.size, 50, replace=False)] = 32767
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def constant(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.full((90, 100, 80), 700, np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def near_constant(path: Path) -> Path:
    data = 500 + np.random.default_rng(0).normal(0, 0.01, (90, 100, 80))
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def eight_cubed(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 1000, (8, 8, 8)).astype(np.int16), np.eye(4)), path)
    return path


def zero_sform(path: Path) -> Path:
    img = head()
    img.set_sform(np.zeros((4, 4)), code=1)  # the header says "scanner coordinates" but holds no transform
    nib.save(img, path)
    return path


def lone_header(path: Path) -> Path:
    hdr = path.with_suffix("").with_suffix(".hdr")
    img = head()
    header = nib.AnalyzeHeader()
    header.set_data_dtype(np.int16)
    header.set_data_shape(img.shape)
    header.set_zooms(img.header.get_zooms())
    nib.save(nib.AnalyzeImage(np.asarray(img.dataobj), None, header), hdr)
    hdr.with_suffix(".img").unlink()
    return hdr


WHY_CASES = {
    "saturated_in_empty": (saturated_in_empty, IntensityLevelsError, "'distinct intensities'", "qc.min_distinct_values"),
    "saturated_in_noise": (saturated_in_noise, ForegroundVolumeError, "'head size'", "qc.min_head_cm3"),
    "constant": (constant, IntensityLevelsError, "1 distinct values", "qc.min_distinct_values"),
    "near_constant": (near_constant, ConstantVolumeError, "'constant volume'", "qc.min_relative_range"),
    "eight_cubed": (eight_cubed, FieldOfViewError, "spans (8.0, 8.0, 8.0) mm", "qc.min_field_of_view_mm"),
    "zero_sform": (zero_sform, AffineError, "affine is singular", "fix its header"),
    "lone_header": (lone_header, MissingPairError, "has no matching sub01.img", "Copy the missing file"),
}


def folder_with(write, root: Path) -> Path:
    """``root``/raw holding the bad input ``write`` makes (sub01) and a good head (sub02); return the bad file."""
    (root / "raw").mkdir()
    nib.save(head(seed=1), root / "raw" / "sub02.nii.gz")
    return write(root / "raw" / "sub01.nii.gz")


@pytest.mark.parametrize("case", sorted(WHY_CASES))
def test_each_bad_input_stops_discovery_naming_file_check_and_fix(tmp_path, case):
    write, error_class, check, fix = WHY_CASES[case]
    path = folder_with(write, tmp_path)
    with pytest.raises(error_class) as info:
        discover_scans(get_source("local"), tmp_path / "raw", validated_config({}))
    message = str(info.value)
    assert str(path) in message and check in message and fix in message
    assert "analyze_orientation" not in message


@pytest.mark.parametrize("case", sorted(WHY_CASES))
def test_on_error_skip_leaves_each_bad_input_out_with_its_reason(tmp_path, case):
    write, error_class, check, fix = WHY_CASES[case]
    path = folder_with(write, tmp_path)
    config = validated_config({"preprocess": {"on_error": "skip"}})
    scans, excluded = discover_scans_with_exclusions(get_source("local"), tmp_path / "raw", config)
    assert scans["scan"].tolist() == ["sub02"]
    row = excluded.iloc[0].to_dict()
    assert (row["scan"], row["path"], row["stage"]) == ("sub01", str(path), "discover_subjects")
    assert row["reason"].startswith(f"{error_class.__name__}: ") and check in row["reason"] and fix in row["reason"]


def test_a_zero_affine_is_a_volume_error_when_the_volume_is_read(tmp_path):
    path = zero_sform(tmp_path / "sub01.nii.gz")
    with pytest.raises(AffineError, match=f"{path}: QC check 'affine'"):
        load_volume(path)


# ---------------------------------------------------------------------------------------------- after skull stripping


def debris(seed=0) -> nib.Nifti1Image:
    """720 separate 12 mm cubes: plenty of bright voxels for discovery, but no head for skull stripping."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 40, (90, 100, 80)).astype(np.int16)
    for i in range(2, 90, 10):
        for j in range(2, 100, 10):
            for k in range(2, 80, 10):
                data[i:i + 6, j:j + 6, k:k + 6] = rng.integers(500, 900, (6, 6, 6))
    return nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_a_head_mask_far_below_adult_size_stops_the_run_or_excludes_the_scan_at_skull_strip():
    img = debris()
    checked(img)  # discovery lets it through: over 1,000 cm3 of bright voxels
    _, mask_img = skull_strip(img, "none")
    mask = np.asarray(mask_img.dataobj) > 0
    with pytest.raises(ForegroundVolumeError, match=r"scan.nii.gz: QC check 'head mask size' failed: .* 2 cm³"):
        skull_strip_problem(mask, img.affine, PATH, LIMITS, "none", "fail")
    reason = skull_strip_problem(mask, img.affine, PATH, LIMITS, "none", "skip")
    assert reason.startswith("ForegroundVolumeError: /data/scan.nii.gz: QC check 'head mask size'")
    settings = validated_config({})["preprocess"]
    result = scan_slices(img.get_fdata(), mask, settings, reason)
    assert (result["excluded_stage"], result["excluded_reason"]) == ("skull_strip", reason)
    assert result["images"].shape[0] == 0


def test_a_whole_head_passes_the_gate_after_skull_stripping_and_an_empty_mask_is_left_to_skull_strip():
    img = head()
    _, mask_img = skull_strip(img, "none")
    mask = np.asarray(mask_img.dataobj) > 0
    assert skull_strip_problem(mask, img.affine, PATH, LIMITS, "none", "fail") == ""
    assert skull_strip_problem(np.zeros_like(mask), img.affine, PATH, LIMITS, "bet", "fail") == ""


def test_a_large_volume_is_measured_on_a_sample_that_keeps_its_outliers():
    # 12 million voxels of low noise with 5 at the int16 maximum, all between the voxels the strided sample
    # takes: the gate still sees them, and finds no head.
    data = np.random.default_rng(1).integers(0, 60, (250, 240, 200)).astype(np.int16)
    data.flat[1::2_400_000] = 32767
    with pytest.raises(ForegroundVolumeError, match=r"'head size'.* 0 cm³"):
        checked(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])))
    assert 1000 < checked(head(shape=(250, 240, 200), zooms=(0.8, 0.8, 0.8)))["head_cm3"] < 2500


def test_saturation_is_measured_on_the_stored_values_of_a_scaled_file(tmp_path):
    img = head()
    data = np.asarray(img.dataobj).copy()
    data[data > 700] = 32767
    scaled = nib.Nifti1Image(data, img.affine)
    scaled.header.set_slope_inter(0.5, 10.0)  # the reader sees 16393.5 where the file stores the type's maximum
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    reread = nib.load(tmp_path / "scaled.nii.gz")
    with pytest.raises(SaturationError, match=r"at the data type's maximum 32767"):
        check_volume(reread, reread.get_fdata(dtype=np.float32), reread.affine, PATH, LIMITS)
