"""brainvq.load_model (brainvq/inference.py): a run's models on new volumes, outputs on each input's own voxel grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainvq import load_model
from brainvq.config import section_defaults
from brainvq.inference import ScanOutputs
from model_files import write_untrained_bundle
from volume_trees import asymmetric_head, nifti, oblique_affine, write_dicom_series


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Untrained models with 64 px slices (a 240 mm window of 60 voxels at 4 mm: slices lose no detail), on the
    whole head (skull_strip none): these tests follow the geometry, not a brain mask."""
    return load_model(write_untrained_bundle(tmp_path_factory.mktemp("run") / "run",
                                             preprocess={"size": 64, "skull_strip": "none"}))


@pytest.fixture(scope="module")
def oblique_head(tmp_path_factory):
    """A head stored with permuted, flipped and rotated voxel axes (not RAS), as a NIfTI file and a DICOM series."""
    folder = tmp_path_factory.mktemp("volumes")
    img = nifti(asymmetric_head(), oblique_affine(zooms=(3.5, 4.0, 4.5), axcodes_perm=(1, 2, 0), flips=(-1, 1, -1),
                                                  angle_deg=10.0))
    nib.save(img, folder / "head.nii.gz")
    write_dicom_series(img, folder / "head-dicom")
    return folder


def correlation_in(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.corrcoef(a[where], b[where])[0, 1])


def test_slices_put_back_through_the_slice_geometry_reproduce_the_input_on_its_own_grid(model, oblique_head):
    source = nib.load(oblique_head / "head.nii.gz")
    prepared = model.prepare(oblique_head / "head.nii.gz")
    # The slices themselves in place of reconstructions: what comes back must be the input itself.
    identity = ScanOutputs(np.zeros(0), prepared.images, prepared.images, None)
    back, _ = model.native_images(prepared, identity)
    assert back.shape == source.shape and np.allclose(back.affine, source.affine)
    original, returned = source.get_fdata(), back.get_fdata()
    # Away from the brain's edge, which two trilinear resamplings (to RAS and back) blur.
    inside = ndimage.binary_erosion(returned > 0, iterations=2)
    assert inside.mean() > 0.1
    assert correlation_in(original, returned, inside) > 0.97
    low, high = prepared.intensity_range
    assert np.median(np.abs(np.clip(original, low, high) - returned)[inside]) < 0.05 * (high - low)
    # A wrong turn anywhere in the chain would not match: the head's intensity ramps along every axis.
    for axis in range(3):
        assert correlation_in(np.flip(original, axis), returned, inside) < 0.9


def test_codes_reconstructions_and_anomaly_maps_from_a_path_an_image_or_a_dicom_series(model, oblique_head):
    path = oblique_head / "head.nii.gz"
    codes = model.encode(path)
    n = len(model.prepare(path).slice_index)
    assert codes.shape == (n, 16, 16) and codes.dtype == np.int16 and n > 10
    assert codes.min() >= 0 and codes.max() < model.manifest["codebook_size"]
    slices = model.decode(codes)
    assert slices.shape == (n, 64, 64) and slices.min() >= 0 and slices.max() <= 1
    source = nib.load(path)
    for volume in (path, nib.load(path)):
        for image in (model.reconstruct(volume), model.anomaly_map(volume)):
            assert image.shape == source.shape and np.allclose(image.affine, source.affine)
    assert np.array_equal(model.encode(nib.load(path)), codes)
    # The same head as a DICOM series: the same slices and codes, outputs on the series' own grid.
    from_dicom = model.prepare(oblique_head / "head-dicom")
    np.testing.assert_allclose(from_dicom.images, model.prepare(path).images, atol=1e-3)
    assert (model.encode(from_dicom) == codes).mean() > 0.99
    anomaly = model.anomaly_map(oblique_head / "head-dicom")
    assert anomaly.shape == from_dicom.native_shape and np.allclose(anomaly.affine, from_dicom.native_affine)
    assert anomaly.get_fdata().min() >= 0 and anomaly.get_fdata().max() > 0


def test_sample_draws_slices_at_the_given_positions_reproducibly(model):
    samples = model.sample(5, positions=[0.2, 0.8], seed=3)
    assert samples.shape == (5, 64, 64) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1
    assert np.array_equal(samples, model.sample(5, positions=[0.2, 0.8], seed=3))


def test_sample_draws_at_the_sample_rules_temperature_unless_told(model):
    default = section_defaults("sample")["temperature"]
    drawn = model.sample(5, positions=[0.5], seed=1)
    assert np.array_equal(drawn, model.sample(5, positions=[0.5], seed=1, temperature=default))
    assert not np.array_equal(drawn, model.sample(5, positions=[0.5], seed=1, temperature=default * 2))
