"""Per-scan preprocessing: RAS correctness, skull stripping, N4, slice selection and normalisation."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from nibabel.orientations import axcodes2ornt, ornt_transform
from snakemake_helpers import copy_workflow, run_snakemake

from brainvq.config import validated_config
from brainvq.io import load_volume
from brainvq.preprocessing import (
    EmptyMaskError,
    PreprocessingError,
    mask_on_grid,
    n4_bias_correct,
    normalised_slices,
    reorient_to_ras,
    resample_isotropic,
    scan_slices,
    select_axial_slices,
    skull_strip,
)

# ---------------------------------------------------------------------------------------------- RAS correctness

MARKER = (slice(14, 17), slice(16, 19), slice(10, 13))  # right, anterior, superior of the volume centre
ZOOMS = (2.0, 2.0, 2.5)


def centred_affine(shape, zooms) -> np.ndarray:
    """A RAS affine with the volume centre at the world origin."""
    affine = np.diag(list(zooms) + [1.0])
    affine[:3, 3] = -np.asarray(zooms) * (np.asarray(shape) - 1) / 2
    return affine


def marked_ras_image() -> nib.Nifti1Image:
    """A 20x24x16 RAS head (value 100) with a bright marker (1000) right-anterior-superior of centre."""
    shape = (20, 24, 16)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    data = np.where((grid**2).sum(0) < 0.9, 100, 0).astype(np.int16)
    data[MARKER] = 1000
    return nib.Nifti1Image(data, centred_affine(shape, ZOOMS))


def marker_world_centroid(img) -> np.ndarray:
    """World (mm) centroid of the voxels brighter than half the marker."""
    voxels = np.argwhere(img.get_fdata() > 550).mean(axis=0)
    return img.affine[:3, :3] @ voxels + img.affine[:3, 3]


def reoriented(img, axcodes: str) -> nib.Nifti1Image:
    """``img`` with its voxel axes permuted/flipped to ``axcodes``, world positions unchanged."""
    return img.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(axcodes))))


def rotation_x(degrees: float) -> np.ndarray:
    """A 4x4 world rotation about the x axis."""
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot


def write_as_nifti(img, path: Path) -> Path:
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    img.set_qform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def write_as_big_endian_analyze(img, path: Path) -> Path:
    """Analyze 7.5, big-endian, whose header keeps only zooms (no orientation)."""
    data = np.asarray(img.dataobj).astype(np.int16)
    header = nib.AnalyzeHeader(endianness=">")
    header.set_data_dtype(np.int16)
    header.set_data_shape(data.shape)
    header.set_zooms(nib.affines.voxel_sizes(img.affine))
    nib.save(nib.AnalyzeImage(data, None, header), str(path))
    assert nib.load(str(path)).header.endianness == ">"
    return path


def ras_pipeline(path, orientation=None):
    return resample_isotropic(reorient_to_ras(load_volume(path, orientation)), 2.0)


@pytest.mark.parametrize(
    "case",
    ["LPI_nifti", "PSR_oblique_nifti", "ASL_analyze", "LAS_analyze"],
)
def test_marker_lands_right_anterior_superior_after_reorient(tmp_path, case):
    original = marked_ras_image()
    expected = marker_world_centroid(original)
    if case == "LPI_nifti":
        path = write_as_nifti(reoriented(original, "LPI"), tmp_path / "lpi.nii.gz")
        out = ras_pipeline(path)
    elif case == "PSR_oblique_nifti":
        psr = reoriented(original, "PSR")
        oblique = nib.Nifti1Image(np.asarray(psr.dataobj), rotation_x(6) @ psr.affine)
        assert nib.aff2axcodes(oblique.affine) == ("P", "S", "R")
        expected = (rotation_x(6) @ np.append(expected, 1))[:3]
        out = ras_pipeline(write_as_nifti(oblique, tmp_path / "psr.nii.gz"))
    else:
        codes = case[:3]
        path = write_as_big_endian_analyze(reoriented(original, codes), tmp_path / f"{codes}.hdr")
        out = ras_pipeline(path, codes)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert np.allclose(out.header.get_zooms(), 2.0)
    assert out.get_data_dtype() == np.float32
    found = marker_world_centroid(out)
    assert np.all(found > 0), f"marker at {found}: not right/anterior/superior"
    assert np.allclose(found, expected, atol=1.5), (found, expected)
    # In voxels too: the marker sits in the upper half of every RAS axis.
    voxel = np.argwhere(out.get_fdata() > 550).mean(axis=0)
    assert np.all(voxel > np.asarray(out.shape) / 2)


def test_analyze_read_with_wrong_orientation_puts_marker_elsewhere(tmp_path):
    # Guards the test above: the imposed orientation really decides where the marker lands.
    original = marked_ras_image()
    path = write_as_big_endian_analyze(reoriented(original, "ASL"), tmp_path / "asl.hdr")
    found = marker_world_centroid(ras_pipeline(path, "ASR"))
    assert found[0] < 0


def test_resample_isotropic_gives_requested_spacing(tmp_path):
    img = nib.Nifti1Image(np.ones((10, 10, 8), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    out = resample_isotropic(img, 1.0)
    assert np.allclose(out.header.get_zooms(), 1.0)
    assert out.shape == (10, 10, 15)


# ---------------------------------------------------------------------------------------------- skull stripping


def synthetic_head(n=40, voxel_mm=4.0, seed=0) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A bright sphere 'brain' inside a dark skull gap and a bright scalp shell, with noise; returns (img, brain)."""
    grid = (np.mgrid[0:n, 0:n, 0:n] - (n - 1) / 2) * voxel_mm
    radius = np.sqrt((grid**2).sum(0))
    data = np.full(radius.shape, 5.0, np.float32)
    brain = radius < 0.35 * n * voxel_mm
    data[brain] = 100
    data[(radius >= 0.40 * n * voxel_mm) & (radius < 0.47 * n * voxel_mm)] = 60
    data += np.random.default_rng(seed).normal(0, 3, data.shape).astype(np.float32)
    return nib.Nifti1Image(np.clip(data, 0, None), np.diag([voxel_mm] * 3 + [1.0])), brain


def test_skull_strip_none_masks_whole_head_with_skull_gap_filled():
    img, brain = synthetic_head(n=24)
    head, mask = skull_strip(img, "none")
    mask = np.asarray(mask.dataobj)
    assert mask.dtype == np.uint8
    grid = np.mgrid[0:24, 0:24, 0:24] - 11.5
    radius = np.sqrt((grid**2).sum(0))
    assert mask[radius < 0.44 * 24].all(), "brain, skull gap and scalp belong to the head"
    assert not mask[radius > 0.5 * 24].any(), "background is not head"
    assert np.all(head.get_fdata()[mask == 0] == 0)


def test_skull_strip_precomputed_uses_nonzero_voxels():
    data = np.zeros((8, 8, 8), np.float32)
    data[2:6, 2:6, 2:6] = 7
    brain, mask = skull_strip(nib.Nifti1Image(data, np.eye(4)), "precomputed")
    assert np.array_equal(np.asarray(mask.dataobj) == 1, data > 0)
    assert np.array_equal(brain.get_fdata(), data)


def test_a_precomputed_mask_read_like_its_volume_lands_on_the_brain_of_the_ras_volume(tmp_path):
    img, brain = synthetic_head(n=24)
    data = np.asarray(img.dataobj).copy()
    data[:, :, :6] = data[:9] = 5.0  # no brain low or on one side: a flip of either axis would show
    brain[:, :, :6] = brain[:9] = False
    # Volume and mask stored alike, as the demo's OASIS-like pairs: Analyze, LAS voxel order, 4 mm, no orientation.
    las = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(("L", "A", "S")))
    paths = {}
    for name, values in (("scan", data), ("scan_brainmask", brain.astype(np.float32))):
        stored = nib.AnalyzeImage(nib.orientations.apply_orientation(values, las).astype(np.int16), None)
        stored.header.set_zooms((4.0, 4.0, 4.0))
        paths[name] = tmp_path / f"{name}.hdr"
        nib.save(stored, paths[name])
    ras = resample_isotropic(reorient_to_ras(load_volume(paths["scan"], "LAS")), 2.0)
    on_grid = mask_on_grid(load_volume(paths["scan_brainmask"], "LAS"), ras)
    truth = mask_on_grid(nib.Nifti1Image(brain.astype(np.float32), img.affine), resample_isotropic(img, 2.0))
    assert on_grid.shape == truth.shape and (on_grid == truth).mean() > 0.99 and on_grid.any()
    stripped, mask = skull_strip(ras, "precomputed", precomputed_mask=on_grid)
    assert np.array_equal(np.asarray(mask.dataobj) == 1, on_grid)
    brain_values = stripped.get_fdata()
    assert brain_values[~on_grid].max() == 0 and np.median(brain_values[on_grid]) > 90  # brain kept, scalp gone
    _, head = skull_strip(ras, "precomputed")  # no mask file: voxels > 0, the whole noisy field of view
    assert np.asarray(head.dataobj).sum() > 3 * on_grid.sum()


@pytest.mark.parametrize("method, data", [("precomputed", -np.ones((6, 6, 6))), ("none", np.full((6, 6, 6), 3.0))])
def test_skull_strip_with_no_foreground_raises_empty_mask(method, data):
    with pytest.raises(EmptyMaskError, match=method):
        skull_strip(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), method)


def test_skull_strip_unknown_method_raises():
    with pytest.raises(PreprocessingError, match="'fsl'"):
        skull_strip(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), "fsl")


def test_bet_mask_lies_mostly_inside_the_brain():
    img, brain = synthetic_head(n=40, voxel_mm=4.0)
    stripped, mask = skull_strip(img, "bet", bet_fractional_threshold=0.5, bet_iterations=300)
    mask = np.asarray(mask.dataobj).astype(bool)
    inside = (mask & brain).sum() / mask.sum()
    coverage = (mask & brain).sum() / brain.sum()
    assert inside > 0.85, f"only {inside:.0%} of the BET mask is brain"
    assert coverage > 0.7, f"BET mask covers only {coverage:.0%} of the brain"
    assert stripped.get_fdata()[~mask].max() == 0


def test_n4_reduces_a_multiplicative_bias():
    n = 48
    grid = np.mgrid[0:n, 0:n, 0:n] / (n - 1) - 0.5
    radius = np.sqrt((grid**2).sum(0))
    mask = radius < 0.45
    tissue = np.where(radius < 0.25, 100.0, 60.0) * mask
    bias = np.exp(0.6 * grid[0] + 0.3 * grid[2])
    img = nib.Nifti1Image((tissue * bias + 1).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    corrected = n4_bias_correct(img, mask).get_fdata()
    inner = radius < 0.2

    def spread(volume):
        return volume[inner].std() / volume[inner].mean()

    assert spread(corrected) < 0.5 * spread(img.get_fdata()), (spread(corrected), spread(img.get_fdata()))
    assert corrected.shape == img.shape


def test_n4_with_empty_mask_raises():
    with pytest.raises(EmptyMaskError):
        n4_bias_correct(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), np.zeros((8, 8, 8), bool))


# ---------------------------------------------------------------------------------------------- slices


def mask_with_axial_areas(areas, side=10) -> np.ndarray:
    """A (side, side, len(areas)) mask whose slice k holds exactly areas[k] voxels."""
    mask = np.zeros((side * side, len(areas)), bool)
    for k, area in enumerate(areas):
        mask[:area, k] = True
    return mask.reshape(side, side, len(areas))


def test_brain_fraction_keeps_slices_with_enough_mask_area():
    mask = mask_with_axial_areas([0, 10, 50, 100, 100, 30, 0, 0])
    assert select_axial_slices(mask, "brain_fraction", 0.25, [0, 1000]).tolist() == [2, 3, 4, 5]
    assert select_axial_slices(mask, "brain_fraction", 0.0, [0, 1000]).tolist() == list(range(8))


def test_range_selection_is_clipped_to_the_mask_extent():
    mask = mask_with_axial_areas([0, 10, 50, 100, 100, 30, 0, 0])
    assert select_axial_slices(mask, "range", 0.25, [0, 4]).tolist() == [1, 2, 3]
    assert select_axial_slices(mask, "range", 0.25, [3, 1000]).tolist() == [3, 4, 5]
    assert select_axial_slices(mask, "range", 0.25, [6, 8]).tolist() == []


def test_select_on_empty_mask_raises():
    with pytest.raises(EmptyMaskError):
        select_axial_slices(np.zeros((4, 4, 4), bool), "brain_fraction", 0.25, [0, 10])


def ellipsoid_volume(shape=(40, 30, 12), seed=0):
    """A non-square RAS volume: an ellipsoid 'brain' with values 50..150 and one huge outlier voxel."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    mask = (grid**2).sum(0) < 0.8
    rng = np.random.default_rng(seed)
    volume = np.where(mask, rng.uniform(50, 150, shape), 0).astype(np.float32)
    volume[tuple(n // 2 for n in shape)] = 1e6
    return volume, mask


def test_normalised_slices_shapes_types_and_range():
    volume, mask = ellipsoid_volume()
    indices = select_axial_slices(mask, "brain_fraction", 0.25, [0, 1000])
    images, masks, positions = normalised_slices(volume, mask, indices, (0.5, 99.5), 16)
    assert images.shape == masks.shape == (len(indices), 16, 16)
    assert images.dtype == np.float32 and masks.dtype == bool and positions.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    # The outlier is clipped away instead of squashing the brain into a few grey levels.
    assert np.median(images[masks]) > 0.3
    assert images[:, 0, 0].max() == 0, "background stays 0"


def test_slice_positions_span_the_mask_extent():
    volume, mask = ellipsoid_volume()
    k_occupied = np.flatnonzero(mask.any(axis=(0, 1)))
    indices = np.array([k_occupied[0], 6, k_occupied[-1]])
    _, _, positions = normalised_slices(volume, mask, indices, (0.5, 99.5), 16)
    expected = (indices - k_occupied[0]) / (k_occupied[-1] - k_occupied[0])
    assert np.allclose(positions, expected)
    assert positions[0] == 0 and positions[-1] == 1


def test_non_square_slices_are_padded_centred():
    volume, mask = ellipsoid_volume(shape=(40, 20, 6))
    _, masks, _ = normalised_slices(volume, mask, [3], (0, 100), 32)
    rows = np.flatnonzero(masks[0].any(axis=1))
    columns = np.flatnonzero(masks[0].any(axis=0))
    assert abs((rows[0] + rows[-1]) / 2 - 15.5) <= 1 and abs((columns[0] + columns[-1]) / 2 - 15.5) <= 1
    assert rows[-1] - rows[0] < 0.6 * (columns[-1] - columns[0]), "the short (A-P) side stays short: padded, not stretched"


def test_axial_images_show_anterior_up_and_right_on_the_right():
    volume = np.ones((16, 16, 3), np.float32)
    volume[12:, 12:, 1] = 10  # right (high x), anterior (high y)
    images, _, _ = normalised_slices(volume, np.ones_like(volume, bool), [1], (0, 100), 16)
    bright = np.argwhere(images[0] > 0.5).mean(axis=0)
    assert bright[0] < 8 and bright[1] > 8, bright


def test_downsampling_is_anti_aliased():
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    volume = np.repeat(checker[:, :, None], 3, axis=2)
    images, _, _ = normalised_slices(volume, np.ones_like(volume, bool), [1], (0, 100), 16)
    # Without anti-aliasing a 4x subsampled 1-pixel checkerboard aliases to pure 0s or 1s.
    assert abs(images.mean() - 0.5) < 0.05 and images.std() < 0.05


def test_scan_slices_excludes_an_empty_mask_with_reason():
    settings = validated_config({"preprocess": {"size": 16}})["preprocess"]
    result = scan_slices(np.ones((8, 8, 8), np.float32), np.zeros((8, 8, 8), bool), settings)
    assert result["images"].shape == (0, 16, 16)
    assert result["excluded_stage"] == "skull_strip" and "empty mask" in result["excluded_reason"]


def test_scan_slices_keeps_a_normal_scan_in_configured_dtype():
    settings = validated_config({"preprocess": {"size": 16}})["preprocess"]
    volume, mask = ellipsoid_volume()
    result = scan_slices(volume, mask, settings)
    assert result["excluded_reason"] == "" and len(result["slice_index"]) > 0
    assert result["images"].dtype == np.dtype(settings["dtype"])
    assert result["slice_index"].dtype == np.int32


def sphere_scan(shape, zooms, oblique_deg: float, radius_mm: float, offset_mm) -> nib.Nifti1Image:
    """A raw volume of ``shape``/``zooms`` holding a sphere of ``radius_mm`` at ``offset_mm`` from the grid centre,
    its voxel axes rotated by ``oblique_deg`` about the superior axis."""
    angle = np.deg2rad(oblique_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    world = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(shape)) + affine[:3, 3, None, None, None]
    inside = ((world - np.reshape(offset_mm, (3, 1, 1, 1))) ** 2).sum(0) < radius_mm**2
    return nib.Nifti1Image(np.where(inside, 100.0, 0.0).astype(np.float32), affine)


def test_every_scan_gets_one_pixel_size_whatever_its_field_of_view_and_obliquity():
    settings = validated_config({"preprocess": {"size": 32, "spacing_mm": 2.0, "field_of_view_mm": 160,
                                                "min_brain_fraction": 0.9}})["preprocess"]
    scans = [sphere_scan((60, 70, 50), (2.0, 2.0, 2.0), 0, 40, (0, 0, 0)),
             sphere_scan((100, 90, 40), (1.5, 1.5, 3.0), 12, 40, (25, -20, 5))]
    diameters, pixels = [], []
    for raw in scans:
        ras = resample_isotropic(reorient_to_ras(raw), settings["spacing_mm"])
        brain, mask = skull_strip(ras, "precomputed")
        result = scan_slices(brain.get_fdata(), np.asarray(mask.dataobj) > 0, settings)
        middle = result["masks"][len(result["masks"]) // 2]
        columns = np.flatnonzero(middle.any(axis=0))
        diameters.append(columns[-1] - columns[0] + 1)
        pixels.append(result["pixel_mm"])
        centre = np.argwhere(middle).mean(axis=0)
        assert np.allclose(centre, 15.5, atol=1), "the window is centred on the mask"
    assert pixels[0] == pixels[1] == 160 / 32
    # An 80 mm sphere spans 80 / 5 = 16 pixels in both scans: the same anatomy at the same scale.
    assert abs(diameters[0] - 16) <= 1 and abs(diameters[1] - 16) <= 1


def test_a_window_larger_than_the_volume_is_zero_padded_and_a_smaller_one_crops():
    volume, mask = ellipsoid_volume(shape=(20, 20, 6))
    padded, padded_masks, _ = normalised_slices(volume, mask, [3], (0, 100), 40, window_vox=40)
    cropped, _, _ = normalised_slices(volume, mask, [3], (0, 100), 10, window_vox=10)
    assert padded_masks[0, :10].sum() == 0 and padded_masks[0, 10:30, 10:30].any()
    assert cropped.shape == (1, 10, 10) and (cropped[0] > 0).all(), "the crop holds only the ellipsoid's middle"


# ---------------------------------------------------------------------------------------------- the rules, run for real


@pytest.mark.slow
def test_preprocess_rules_slice_a_local_folder_and_redo_only_new_scans(tmp_path):
    workflow = copy_workflow(tmp_path / "wf")
    raw = workflow / "raw"
    raw.mkdir()
    head, _ = synthetic_head(n=24, voxel_mm=6.0)  # 144 mm across, 1,000 cm3 of head: it passes the QC gate
    write_as_nifti(head, raw / "sub01.nii.gz")
    write_as_big_endian_analyze(reoriented(head, "LAS"), raw / "sub02_MR1.hdr")
    # All-negative: precomputed skull stripping finds no brain, which on_error: skip turns into an exclusion.
    write_as_nifti(nib.Nifti1Image(-np.asarray(head.dataobj) - 1, head.affine), raw / "sub03.nii.gz")
    (raw / "sub04.nii.gz").write_bytes(b"truncated")
    config = {
        "run": "t",
        "dataset": {"source": "local", "local_dir": "raw", "analyze_orientation": "LAS"},
        "preprocess": {"size": 16, "spacing_mm": 4.0, "skull_strip": "precomputed", "on_error": "skip"},
    }
    (workflow / "cfg.yaml").write_text(yaml.safe_dump(config))
    targets = [f"results/t/slices/{scan}.h5" for scan in ("sub01", "sub02_MR1", "sub03")]
    run_snakemake("--configfile", "cfg.yaml", "--cores", "2", *targets, cwd=workflow)

    results = workflow / "results" / "t"
    subjects = pd.read_csv(results / "subjects.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert subjects["scan"].tolist() == ["sub01", "sub02_MR1", "sub03"]
    excluded = pd.read_csv(results / "qc" / "excluded_inputs.csv")
    assert excluded["scan"].tolist() == ["sub04"] and excluded.loc[0, "reason"].startswith("CorruptVolumeError")
    assert nib.aff2axcodes(nib.load(results / "ras" / "sub02_MR1.nii.gz").affine) == ("R", "A", "S")
    with h5py.File(results / "slices" / "sub02_MR1.h5") as f:
        assert f["images"].shape[1:] == (16, 16) and f["images"].shape[0] > 0
        assert f.attrs["excluded_reason"] == ""
        assert set(f["subject"].asstr()[:]) == {"sub02"} and set(f["scan"].asstr()[:]) == {"sub02_MR1"}
    with h5py.File(results / "slices" / "sub03.h5") as f:
        assert f["images"].shape[0] == 0 and "empty mask" in f.attrs["excluded_reason"]

    # A new volume re-runs discovery; only the new scan's jobs follow.
    before = {p.name: p.stat().st_mtime_ns for d in ("ras", "brain", "slices") for p in (results / d).iterdir()}
    write_as_nifti(head, raw / "sub05.nii.gz")
    run_snakemake("--configfile", "cfg.yaml", "--cores", "2", *targets, "results/t/slices/sub05.h5", cwd=workflow)
    after = {p.name: p.stat().st_mtime_ns for d in ("ras", "brain", "slices") for p in (results / d).iterdir()}
    assert {name: after[name] for name in before} == before
    assert (results / "slices" / "sub05.h5").exists()
