"""DICOM series (brainvq/dicom.py): one folder one volume, oriented by the DICOM geometry, refused when incomplete."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvq.dicom import MissingSliceError, MixedGeometryError, MultipleSeriesError, NoDicomSeriesError
from brainvq.io import VolumeError, discover_scans, discover_scans_with_exclusions, load_volume
from brainvq.preprocessing import reorient_to_ras
from brainvq.sources import get_source
from test_io import config
from volume_trees import asymmetric_head, nifti, oblique_affine, write_dicom_series

ORIENTATIONS = {
    "RAS": dict(),
    "PSL flipped": dict(axcodes_perm=(1, 2, 0), flips=(-1, 1, -1)),
    "oblique, left-handed": dict(axcodes_perm=(2, 0, 1), flips=(1, -1, 1), angle_deg=12.0),
}


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return asymmetric_head(shape=(30, 34, 26))


@pytest.mark.parametrize("geometry", ORIENTATIONS.values(), ids=ORIENTATIONS.keys())
def test_dicom_and_nifti_of_one_volume_give_the_same_ras_volume(tmp_path, volume, geometry):
    img = nifti(volume, oblique_affine(zooms=(3.0, 3.5, 4.0), **geometry))
    nib.save(img, tmp_path / "scan.nii.gz")
    write_dicom_series(img, tmp_path / "scan")
    from_dicom, from_nifti = load_volume(tmp_path / "scan"), load_volume(tmp_path / "scan.nii.gz")
    ras_dicom, ras_nifti = reorient_to_ras(from_dicom), reorient_to_ras(from_nifti)
    assert ras_dicom.shape == ras_nifti.shape
    np.testing.assert_allclose(ras_dicom.affine, ras_nifti.affine, atol=1e-3)
    assert np.array_equal(ras_dicom.get_fdata(), ras_nifti.get_fdata())
    # The world position of every voxel agrees, whichever way the series was stacked.
    assert from_dicom.get_data_dtype() == np.float32


def test_a_series_with_a_missing_slice_names_the_folder_and_the_gap(tmp_path, volume):
    write_dicom_series(nifti(volume, oblique_affine()), tmp_path / "gappy", drop=(11,))
    with pytest.raises(MissingSliceError, match=r"gappy.*about 1 slice\(s\) missing.*re-export") as error:
        load_volume(tmp_path / "gappy")
    assert isinstance(error.value, VolumeError)


def test_a_series_mixing_pixel_sizes_is_refused_naming_the_odd_file(tmp_path, volume):
    write_dicom_series(nifti(volume, oblique_affine()), tmp_path / "mixed")
    write_dicom_series(nifti(volume, oblique_affine(zooms=(3.0, 4.0, 4.0))), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "IM0007.dcm", tmp_path / "mixed" / "IM0007.dcm")
    with pytest.raises(MixedGeometryError, match=r"mixed mixes geometries: IM0007.dcm differs .* in pixel spacing.*folder of their own"):
        load_volume(tmp_path / "mixed")


def test_a_folder_holding_two_series_is_refused(tmp_path, volume):
    img = nifti(volume, oblique_affine())
    write_dicom_series(img, tmp_path / "two", series_uid="1.2.3.1")
    for path in write_dicom_series(img, tmp_path / "second", series_uid="1.2.3.2"):
        shutil.copy(path, tmp_path / "two" / f"B{path.name}")
    with pytest.raises(MultipleSeriesError, match="2 DICOM series"):
        load_volume(tmp_path / "two")


def test_an_empty_folder_is_not_a_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoDicomSeriesError, match="empty holds no readable DICOM series"):
        load_volume(tmp_path / "empty")


def test_local_source_takes_each_series_folder_as_one_scan_and_skips_a_broken_one(tmp_path, volume):
    img = nifti(volume, oblique_affine())
    nib.save(img, tmp_path / "sub01.nii.gz")
    write_dicom_series(img, tmp_path / "site" / "sub02")
    write_dicom_series(img, tmp_path / "site" / "sub03", drop=(5,))
    (tmp_path / "site" / "sub02" / "notes.txt").write_text("scanner export")
    with pytest.raises(MissingSliceError, match="sub03"):
        discover_scans(get_source("local"), tmp_path, config())
    scans, excluded = discover_scans_with_exclusions(get_source("local"), tmp_path,
                                                     config(preprocess={"on_error": "skip"}))
    assert scans[["scan", "format"]].values.tolist() == [["sub01", "nifti"], ["sub02", "dicom"]]
    assert Path(scans.loc[1, "path"]) == tmp_path / "site" / "sub02" and scans.loc[1, "orientation"] == ""
    assert excluded["scan"].tolist() == ["sub03"] and "MissingSliceError" in excluded.loc[0, "reason"]
