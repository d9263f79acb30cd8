"""Reading raw volumes (one error per failure kind) and discovering scans (each source's layout: test_sources.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import t1_head

from brainvq.config import deep_merge, validated_config
from brainvq.io import (
    CorruptVolumeError,
    DuplicateScanError,
    EmptyVolumeError,
    InvalidOrientationError,
    InvalidVolumesError,
    MissingOrientationError,
    MissingPairError,
    NoVolumesFoundError,
    NonFiniteVolumeError,
    UnknownFormatError,
    VolumeNotFoundError,
    VolumeShapeError,
    discover_scans,
    discover_scans_with_exclusions,
    load_volume,
    read_scans_table,
)
from brainvq.sources import get_source


def tiny_data(shape=(6, 7, 5), seed=0) -> np.ndarray:
    """Positive random int16 voxels."""
    return np.random.default_rng(seed).integers(1, 200, shape).astype(np.int16)


def write_nifti(path: Path, data=None, affine=None) -> Path:
    """Write a NIfTI volume (scanner sform/qform) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tiny_data() if data is None else data
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine)
    img.set_qform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def write_analyze(path: Path, data=None, zooms=(1.0, 1.0, 1.25)) -> Path:
    """Write a big-endian Analyze 7.5 .hdr/.img pair and return the .hdr path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tiny_data() if data is None else data
    header = nib.AnalyzeHeader(endianness=">")
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header.set_zooms(zooms[: data.ndim] + (1.0,) * max(0, data.ndim - 3))
    nib.save(nib.AnalyzeImage(data, None, header), str(path))
    return path


# Layout and format tests discover 6x7x5-voxel volumes, which the QC gate (tests/test_qc.py) rightly stops:
# they relax the gate's size and intensity limits explicitly; the gate's own tests use the defaults.
RELAXED_QC = {"min_field_of_view_mm": 0, "min_distinct_values": 1, "min_relative_range": 0,
              "max_saturated_fraction": 1, "min_head_cm3": 0, "min_brain_cm3": 0}


def config(**sections) -> dict:
    """A validated config with ``sections`` merged in and the QC gate relaxed for tiny volumes (RELAXED_QC)."""
    return validated_config(deep_merge({"qc": RELAXED_QC}, sections))


def gated_config(**sections) -> dict:
    """A validated config with ``sections`` merged in and the QC gate's default limits."""
    return validated_config(sections)


# ---------------------------------------------------------------------------------------------- load_volume


def test_load_volume_reads_nifti_as_float32_3d(tmp_path):
    path = write_nifti(tmp_path / "ok.nii.gz")
    img = load_volume(path)
    assert img.shape == (6, 7, 5)
    assert img.get_data_dtype() == np.float32
    assert np.array_equal(img.get_fdata(), tiny_data())


def test_truncated_nii_gz_raises_corrupt_volume_naming_file(tmp_path):
    path = write_nifti(tmp_path / "cut.nii.gz", tiny_data((30, 30, 30)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptVolumeError, match="cut.nii.gz") as info:
        load_volume(path)
    assert "re-download" in str(info.value).lower()


def test_truncated_uncompressed_nii_raises_corrupt_volume(tmp_path):
    path = write_nifti(tmp_path / "cut.nii", tiny_data((20, 20, 20)))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptVolumeError, match="cut.nii"):
        load_volume(path)


def test_non_image_file_with_nifti_name_raises_corrupt_volume(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"not an image at all" * 50))
    with pytest.raises(CorruptVolumeError, match="junk.nii.gz"):
        load_volume(path)


def test_hdr_without_img_raises_missing_pair_naming_both(tmp_path):
    hdr = write_analyze(tmp_path / "scan.hdr")
    hdr.with_suffix(".img").unlink()
    with pytest.raises(MissingPairError, match=r"scan\.hdr has no matching scan\.img"):
        load_volume(hdr, "LAS")


def test_2d_image_raises_shape_error(tmp_path):
    path = write_nifti(tmp_path / "flat.nii.gz", tiny_data((8, 8)))
    with pytest.raises(VolumeShapeError, match="flat.nii.gz"):
        load_volume(path)


def test_single_slice_3d_image_raises_shape_error(tmp_path):
    path = write_nifti(tmp_path / "slice.nii.gz", tiny_data((8, 8, 1)))
    with pytest.raises(VolumeShapeError, match="single slice"):
        load_volume(path)


def test_4d_with_several_volumes_raises_shape_error(tmp_path):
    path = write_nifti(tmp_path / "series.nii.gz", tiny_data((6, 6, 6, 2)))
    with pytest.raises(VolumeShapeError, match="series.nii.gz"):
        load_volume(path)


def test_4d_with_one_volume_is_squeezed(tmp_path):
    path = write_nifti(tmp_path / "one.nii.gz", tiny_data((6, 7, 5, 1)))
    assert load_volume(path).shape == (6, 7, 5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_raise_naming_file(tmp_path, bad):
    data = tiny_data().astype(np.float32)
    data[1, 2, 3] = bad
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(NonFiniteVolumeError, match=r"nan.nii.gz has 1 NaN/infinite"):
        load_volume(path)


def test_all_zero_volume_raises_empty(tmp_path):
    path = write_nifti(tmp_path / "zero.nii.gz", np.zeros((5, 5, 5), np.int16))
    with pytest.raises(EmptyVolumeError, match="zero.nii.gz is all zeros"):
        load_volume(path)


def test_unknown_extension_raises_unknown_format(tmp_path):
    path = tmp_path / "scan.mgz"
    path.write_bytes(b"x")
    with pytest.raises(UnknownFormatError, match="scan.mgz"):
        load_volume(path)


def test_missing_file_raises_not_found(tmp_path):
    with pytest.raises(VolumeNotFoundError, match="absent.nii.gz"):
        load_volume(tmp_path / "absent.nii.gz")


def test_analyze_without_orientation_points_to_config_key(tmp_path):
    hdr = write_analyze(tmp_path / "a.hdr")
    with pytest.raises(MissingOrientationError, match="dataset.analyze_orientation") as info:
        load_volume(hdr)
    assert "a.hdr" in str(info.value)


def test_nifti_without_qform_or_sform_needs_an_orientation(tmp_path):
    path = tmp_path / "nocodes.nii.gz"
    img = nib.Nifti1Image(tiny_data(), np.eye(4))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, str(path))
    with pytest.raises(MissingOrientationError, match="nocodes.nii.gz"):
        load_volume(path)
    assert nib.aff2axcodes(load_volume(path, "PSR").affine) == ("P", "S", "R")


def test_invalid_orientation_codes_raise(tmp_path):
    hdr = write_analyze(tmp_path / "a.hdr")
    with pytest.raises(InvalidOrientationError, match="'AAS'"):
        load_volume(hdr, "AAS")


def test_analyze_affine_comes_from_axis_codes_and_zooms(tmp_path):
    hdr = write_analyze(tmp_path / "a.hdr", zooms=(1.0, 2.0, 3.0))
    img = load_volume(hdr, "ASL")
    assert nib.aff2axcodes(img.affine) == ("A", "S", "L")
    assert np.allclose(img.header.get_zooms(), (1.0, 2.0, 3.0))
    # Centred: the middle voxel sits at the world origin.
    centre = (np.array(img.shape) - 1) / 2
    assert np.allclose(img.affine[:3, :3] @ centre + img.affine[:3, 3], 0)


# ---------------------------------------------------------------------------------------------- discovery


def test_ixi_duplicate_subject_raises_naming_both_files(tmp_path):
    first = write_nifti(tmp_path / "x" / "IXI002-Guys-0828-T1.nii.gz")
    second = write_nifti(tmp_path / "y" / "IXI002-Guys-0828-T1.nii.gz")
    with pytest.raises(DuplicateScanError) as info:
        discover_scans(get_source("ixi"), tmp_path, config())
    assert str(first) in str(info.value) and str(second) in str(info.value)


def test_local_duplicate_scan_keys_raise_naming_both(tmp_path):
    write_nifti(tmp_path / "a" / "sub01_T1w.nii.gz")
    write_nifti(tmp_path / "b" / "sub01_T2w.nii.gz")
    with pytest.raises(DuplicateScanError, match="sub01") as info:
        discover_scans(get_source("local"), tmp_path, config())
    assert "sub01_T1w.nii.gz" in str(info.value) and "sub01_T2w.nii.gz" in str(info.value)


def test_local_empty_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(NoVolumesFoundError, match="holds no volumes"):
        discover_scans(get_source("local"), tmp_path / "empty", config())


def test_missing_raw_folder_raises(tmp_path):
    with pytest.raises(NoVolumesFoundError, match="does not exist"):
        discover_scans(get_source("ixi"), tmp_path / "nowhere", config())


def test_on_error_fail_reports_every_bad_volume_at_once_in_one_table(tmp_path):
    nib.save(t1_head(), tmp_path / "sub01.nii.gz")
    bad = [write_nifti(tmp_path / f"sub{i:02d}.nii.gz", np.zeros((4, 4, 4), np.int16)) for i in range(2, 11)]
    with pytest.raises(InvalidVolumesError) as info:
        discover_scans(get_source("local"), tmp_path, gated_config(), threads=2)
    message = str(info.value)
    assert message.startswith("9 volumes cannot be used")
    assert [path for path, _ in info.value.problems] == [str(path) for path in bad]
    for path in bad:
        assert f"{path}  EmptyVolumeError: is all zeros; re-export" in message  # one path length: no padding
    assert "sub01.nii.gz" not in message and "preprocess.on_error: skip" in message


def test_on_error_fail_raises_a_single_bad_volume_as_its_own_error(tmp_path):
    nib.save(t1_head(), tmp_path / "sub01.nii.gz")
    write_nifti(tmp_path / "sub02.nii.gz", np.zeros((4, 4, 4), np.int16))
    with pytest.raises(EmptyVolumeError, match="sub02.nii.gz is all zeros"):
        discover_scans(get_source("local"), tmp_path, gated_config())


def test_on_error_skip_leaves_bad_scans_out_with_reason_rows(tmp_path):
    nib.save(t1_head(), tmp_path / "sub01.nii.gz")
    write_nifti(tmp_path / "sub02.nii.gz", np.zeros((4, 4, 4), np.int16))
    truncated = write_nifti(tmp_path / "sub03.nii.gz", tiny_data((30, 30, 30)))
    truncated.write_bytes(truncated.read_bytes()[:500])
    cfg = gated_config(preprocess={"on_error": "skip"})
    scans, excluded = discover_scans_with_exclusions(get_source("local"), tmp_path, cfg, threads=2)
    assert scans["scan"].tolist() == ["sub01"]
    assert excluded.columns.tolist() == ["scan", "path", "stage", "reason"]
    assert excluded["scan"].tolist() == ["sub02", "sub03"]
    assert set(excluded["stage"]) == {"discover_subjects"}
    assert excluded.loc[0, "reason"].startswith("EmptyVolumeError: ")
    assert excluded.loc[1, "reason"].startswith("CorruptVolumeError: ")


def test_all_volumes_rejected_raises(tmp_path):
    write_nifti(tmp_path / "sub01.nii.gz", np.zeros((4, 4, 4), np.int16))
    with pytest.raises(NoVolumesFoundError, match="all 1 volumes"):
        discover_scans(get_source("local"), tmp_path, config(preprocess={"on_error": "skip"}))


def test_subjects_table_round_trips_empty_strings(tmp_path):
    write_nifti(tmp_path / "IXI002-Guys-0828-T1.nii.gz")
    scans = discover_scans(get_source("ixi"), tmp_path, config())
    scans.to_csv(tmp_path / "subjects.tsv", sep="\t", index=False)
    table = read_scans_table(tmp_path / "subjects.tsv")
    assert table.loc[0, "session"] == "" and table.loc[0, "orientation"] == ""
