"""Demo cohort: deterministic synthetic heads written in IXI-like and OASIS-like layouts."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from brainvq import demo
from brainvq.io import brain_mask_path, is_brain_mask_path

REPO = Path(__file__).resolve().parents[1]
# 4 mm voxels (64x64x38 IXI-like grids, a 4 mm template): a few subjects build in seconds.
TINY = 4
IXI_NAME = re.compile(r"(IXI\d{3})-(Guys|HH|IOP)-\d{4}-T1\.nii\.gz")


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Return every file under ``root`` keyed by its relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A tiny 4-subject cohort (2 IXI-like, 2 OASIS-like)."""
    root = tmp_path_factory.mktemp("demo") / "cohort"
    demo.build_demo_cohort(root, n_subjects=4, seed=3, oasis_fraction=0.5, downsample=TINY)
    return root


def marker_volume() -> tuple[np.ndarray, np.ndarray]:
    """Return (data, affine): a 2 mm RAS volume, value 1000 in a box at the left-anterior-superior corner."""
    shape = (30, 36, 32)
    affine = demo.axcodes_affine(("R", "A", "S"), (2.0, 2.0, 2.0), shape, (10.0, -20.0, 5.0))
    data = np.zeros(shape, np.float32)
    data[4:10, 24:31, 20:27] = 1000.0  # low x = left, high y = anterior, high z = superior
    data[14:17, 10:14, 6:9] = 500.0  # a second, asymmetric blob so flips cannot go unnoticed
    return data, affine


def centroid_mm(data: np.ndarray, affine: np.ndarray, threshold: float) -> np.ndarray:
    """Return the world centroid of the voxels above ``threshold``."""
    index = np.argwhere(data > threshold).mean(axis=0)
    return (affine @ np.append(index, 1))[:3]


def test_same_seed_gives_identical_bytes_serial_or_parallel_and_another_seed_differs(tmp_path):
    first = tmp_path / "a"
    demo.build_demo_cohort(first, n_subjects=2, seed=7, oasis_fraction=0.5, downsample=TINY)
    again = tmp_path / "b"
    demo.build_demo_cohort(again, n_subjects=2, seed=7, oasis_fraction=0.5, downsample=TINY, workers=2)
    other = tmp_path / "c"
    demo.build_demo_cohort(other, n_subjects=2, seed=8, oasis_fraction=0.5, downsample=TINY)

    assert tree_bytes(first) == tree_bytes(again)
    first_volumes = volumes_in(first)
    other_volumes = volumes_in(other)
    assert len(first_volumes) == len(other_volumes) == 2
    for a, b in zip(first_volumes, other_volumes):
        assert a.read_bytes() != b.read_bytes()
    assert (first / "participants.tsv").read_text() != (other / "participants.tsv").read_text()


def volumes_in(root: Path) -> list[Path]:
    """The cohort's volume files (NIfTI, Analyze .img), not their brain masks."""
    return [p for p in sorted(root.rglob("*.nii.gz")) + sorted(root.rglob("*.img")) if not is_brain_mask_path(p)]


def test_subject_parameters_do_not_depend_on_cohort_size():
    small = demo.draw_subject_params(5, 1, "ixi", 12)
    assert small == demo.draw_subject_params(5, 1, "ixi", 12)
    assert small != demo.draw_subject_params(5, 2, "ixi", 12)


def test_participants_tsv_has_the_documented_columns_and_one_row_per_volume(cohort):
    table = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"session": str}, keep_default_na=False)
    assert list(table.columns) == ["subject", "session", "site", "age", "sex", "atrophy"]
    assert len(table) == 4 and table["subject"].is_unique
    assert table["age"].between(20, 90).all()
    assert table["atrophy"].between(0, 1).all()
    assert set(table["sex"]) <= {"F", "M"}
    ixi = table[table["subject"].str.startswith("IXI")]
    oasis = table[table["subject"].str.startswith("OAS1_")]
    assert len(ixi) == len(oasis) == 2  # oasis_fraction 0.5 of 4
    assert (ixi["session"] == "").all() and set(ixi["site"]) <= set(demo.IXI_SITES)
    assert (oasis["session"] == "MR1").all() and (oasis["site"] == "WashU").all()


def test_files_follow_the_ixi_and_oasis1_raw_layouts(cohort):
    table = pd.read_csv(cohort / "participants.tsv", sep="\t", keep_default_na=False)
    ixi_files = [p for p in sorted((cohort / "IXI").iterdir()) if not is_brain_mask_path(p)]
    matches = [IXI_NAME.fullmatch(p.name) for p in ixi_files]
    assert all(brain_mask_path(p).is_file() for p in ixi_files)
    assert all(matches) and len(matches) == 2
    sites = dict(zip(table["subject"], table["site"]))
    assert all(sites[m.group(1)] == m.group(2) for m in matches)  # site column agrees with the file name
    for subject in table.loc[table["site"] == "WashU", "subject"]:
        raw = cohort / f"{subject}_MR1" / "RAW"
        assert (raw / f"{subject}_MR1_mpr-1_anon.hdr").is_file()
        assert (raw / f"{subject}_MR1_mpr-1_anon.img").is_file()
        assert (raw / f"{subject}_MR1_mpr-1_anon_brainmask.hdr").is_file()
        assert (raw / f"{subject}_MR1_mpr-1_anon_brainmask.img").is_file()
    assert not list(cohort.parent.glob(".cohort.tmp-*"))  # staging folder renamed away


def test_ixi_like_cohort_files_are_psr_int16_with_scaled_ixi_zooms_and_correct_oblique_affine(cohort):
    for path in (cohort / "IXI").iterdir():
        img = nib.load(path)
        assert nib.aff2axcodes(img.affine) == ("P", "S", "R")
        assert img.get_data_dtype() == np.int16
        assert np.allclose(img.header.get_zooms(), np.multiply(demo.IXI_LAYOUT.zooms_mm, TINY))
        assert np.allclose(img.get_qform(), img.get_sform()) and int(img.header["sform_code"]) == 1
        cosines = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
        assert np.abs(cosines).max(axis=0).min() < np.cos(np.deg2rad(0.5))  # oblique, not axis-aligned


def test_oasis_like_cohort_files_are_big_endian_int16_analyze_with_a_trailing_singleton_axis(cohort):
    for path in cohort.glob("OAS1_*_MR1/RAW/*.hdr"):
        img = nib.load(path)
        assert isinstance(img, nib.AnalyzeImage) and not isinstance(img, nib.Nifti1Image)
        assert img.header.endianness == ">" and img.get_data_dtype() == np.dtype(">i2")
        assert img.shape[3] == 1 and img.shape[:3] == demo.OASIS_LAYOUT.downsampled(TINY).shape
        assert np.allclose(img.header.get_zooms()[:3], np.multiply(demo.OASIS_LAYOUT.zooms_mm, TINY))
        # The header's default orientation is wrong on purpose: the pipeline must impose ASL.
        assert nib.aff2axcodes(img.affine) != ("A", "S", "L")


def documented_orientation_image(path: Path) -> nib.Nifti1Image:
    """Return a cohort file with the orientation its layout documents: the NIfTI affine, or ASL imposed."""
    img = nib.load(path)
    if isinstance(img, nib.Nifti1Image):
        return img
    data = np.asanyarray(img.dataobj)[..., 0].astype(np.float32)
    zooms = img.header.get_zooms()[:3]
    # The demo centres its grids on HEAD_CENTRE_MM; the reorient stage centres on 0 (a 5 mm shift).
    return nib.Nifti1Image(data, demo.oasis_like_affine(data.shape, zooms, demo.HEAD_CENTRE_MM))


def test_cohort_volumes_in_their_documented_orientation_match_the_subject_and_not_its_mirror_image(cohort):
    affine, shape = ras_grid()
    params = {p.subject: p for p in demo.cohort_params(4, seed=3, oasis_fraction=0.5)}
    paths = [p for p in sorted((cohort / "IXI").iterdir()) + sorted(cohort.glob("OAS1_*/RAW/*.hdr"))
             if not is_brain_mask_path(p)]
    assert len(paths) == 4
    for path in paths:
        subject = next(s for s in params if path.name.startswith(s))
        ras = nibabel.processing.resample_from_to(documented_orientation_image(path), (shape, affine), order=1)
        # The truth without deformation or noise; the grid is centred on x = 0, so [::-1] mirrors left-right.
        truth = demo.subject_volume(
            replace(params[subject], deformation_mm=0.0, noise_fraction=0.0), affine, shape, TINY
        )
        match = np.corrcoef(ras.get_fdata().ravel(), truth.ravel())[0, 1]
        mirrored = np.corrcoef(ras.get_fdata().ravel(), truth[::-1].ravel())[0, 1]
        assert match > 0.9 and match > mirrored + 0.03, f"{path.name}: r = {match:.3f}, mirrored r = {mirrored:.3f}"
        if path.suffix == ".hdr":  # trusting the Analyze header's default orientation instead goes wrong
            naive = nibabel.processing.resample_from_to(nib.load(path).slicer[..., 0], (shape, affine), order=1)
            assert np.corrcoef(naive.get_fdata().ravel(), truth.ravel())[0, 1] < match - 0.1


def test_each_volume_has_its_true_brain_mask_beside_it_on_the_same_grid(cohort):
    params = {p.subject: p for p in demo.cohort_params(4, seed=3, oasis_fraction=0.5)}
    paths = [p for p in sorted((cohort / "IXI").iterdir()) + sorted(cohort.glob("OAS1_*/RAW/*.hdr"))
             if not is_brain_mask_path(p)]
    for path in paths:
        subject = next(s for s in params if path.name.startswith(s))
        volume, mask = documented_orientation_image(path), documented_orientation_image(brain_mask_path(path))
        assert mask.shape == volume.shape and np.allclose(mask.affine, volume.affine)
        values = np.asarray(mask.dataobj)
        assert set(np.unique(values)) == {0, 1}
        layout, affine = demo.subject_grid(params[subject], TINY)
        assert np.array_equal(values.reshape(layout.shape) == 1,
                              demo.subject_brain_mask(params[subject], affine, layout.shape, TINY))
        brain_cm3 = values.sum() * np.prod(volume.header.get_zooms()[:3]) / 1000
        assert 900 < brain_cm3 < 1900, f"{path.name}: {brain_cm3:.0f} cm3 is not an adult brain"
        head = np.asarray(volume.dataobj) > 0.1 * np.asarray(volume.dataobj).max()
        assert head.sum() > 1.3 * values.sum()  # the volume is the head; the mask is the brain inside it


def test_ixi_writer_gives_real_ixi_geometry_and_its_affine_maps_voxels_back_to_the_input(tmp_path):
    data, affine = marker_volume()
    path = demo.write_ixi_like(data, affine, tmp_path / "IXI999-HH-0001-T1.nii.gz")
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == ("P", "S", "R")
    assert np.allclose(img.header.get_zooms(), (0.9375, 0.9375, 1.2))
    assert img.get_data_dtype() == np.int16
    # Resample with nibabel (independent of brainvq) back onto the input grid.
    back = nibabel.processing.resample_from_to(img, (data.shape, affine), order=1).get_fdata()
    assert np.corrcoef(back.ravel(), data.ravel())[0, 1] > 0.9
    for level in (700, 300):
        assert np.allclose(centroid_mm(back, affine, level), centroid_mm(data, affine, level), atol=1.0)


def test_oasis_writer_stores_asl_and_imposing_asl_recovers_the_input(tmp_path):
    data, affine = marker_volume()
    path = demo.write_oasis_like(data, affine, tmp_path / "OAS1_0001_MR1_mpr-1_anon.hdr")
    img = nib.load(path)
    assert path.with_suffix(".img").is_file()
    assert img.header.endianness == ">" and img.shape[3] == 1
    stored = np.asanyarray(img.dataobj)[..., 0]
    zooms = img.header.get_zooms()[:3]
    assert np.allclose(zooms, (1.0, 1.0, 1.25))
    # Impose ASL (origin at the volume centre, as the reorient stage does); the writer centred its
    # grid on the input, so put the input's centre there too.
    input_centre = (affine @ np.append((np.asarray(data.shape) - 1) / 2, 1))[:3]
    true_affine = demo.oasis_like_affine(stored.shape, zooms, input_centre)
    assert nib.aff2axcodes(true_affine) == ("A", "S", "L")
    imposed = nib.Nifti1Image(stored.astype(np.float32), true_affine)
    back = nibabel.processing.resample_from_to(imposed, (data.shape, affine), order=1).get_fdata()
    assert np.corrcoef(back.ravel(), data.ravel())[0, 1] > 0.9
    for level in (700, 300):
        assert np.allclose(centroid_mm(back, affine, level), centroid_mm(data, affine, level), atol=1.0)


def test_writers_reject_file_names_of_the_wrong_format(tmp_path):
    data, affine = marker_volume()
    with pytest.raises(demo.LayoutPathError, match="nii.gz"):
        demo.write_ixi_like(data, affine, tmp_path / "x.nii")
    with pytest.raises(demo.LayoutPathError, match=".hdr"):
        demo.write_oasis_like(data, affine, tmp_path / "x.img")
    assert not list(tmp_path.iterdir())


def noise_free_subject(atrophy: float) -> demo.SubjectParams:
    """A subject without deformation, bias or noise, so that its brain mask is exact."""
    params = demo.draw_subject_params(0, 0, "ixi", 2)
    return replace(
        params, atrophy=atrophy, deformation_mm=0.0, bias_strength=0.0, noise_fraction=0.0, intensity_scale=1.0
    )


def ras_grid() -> tuple[np.ndarray, tuple[int, int, int]]:
    """A 4 mm RAS grid around the head."""
    shape = (50, 60, 55)
    return demo.axcodes_affine(("R", "A", "S"), (4.0, 4.0, 4.0), shape, demo.HEAD_CENTRE_MM), shape


def test_atrophy_enlarges_csf_inside_the_brain_most_of_all_in_the_ventricles():
    affine, shape = ras_grid()
    brain = demo.subject_brain_mask(noise_free_subject(0.0), affine, shape, TINY)
    deep = ndimage.binary_erosion(brain, iterations=3)  # > ~12 mm below the surface: ventricles
    young = demo.subject_volume(noise_free_subject(0.0), affine, shape, TINY)
    old = demo.subject_volume(noise_free_subject(1.0), affine, shape, TINY)
    csf_young, csf_old = (young < 0.45) & brain, (old < 0.45) & brain  # CSF is 0.25, grey matter ~0.75
    assert csf_old.sum() > 1.15 * csf_young.sum()
    assert (csf_old & deep).sum() > 1.5 * (csf_young & deep).sum()
    assert not (csf_young & ~csf_old).any()  # atrophy only turns tissue into CSF


def test_the_brain_mask_follows_the_deformation_the_volume_was_given(monkeypatch):
    affine, shape = ras_grid()
    params = replace(noise_free_subject(0.0), deformation_mm=6.0)
    # Render the template's brain itself through the volume's own path (pose, size, deformation).
    monkeypatch.setattr(demo, "head_intensities", lambda model, p: model.brain.astype(np.float32))
    warped_brain = demo.subject_volume(params, affine, shape, TINY) > 0.5
    mask = demo.subject_brain_mask(params, affine, shape, TINY)
    undeformed = demo.subject_brain_mask(replace(params, deformation_mm=0.0), affine, shape, TINY)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(mask, warped_brain) > 0.99
    assert dice(undeformed, warped_brain) < dice(mask, warped_brain) - 0.02


def test_older_demo_subjects_have_more_atrophy():
    params = demo.cohort_params(200, seed=0, oasis_fraction=0.5)
    ages = [p.age for p in params]
    atrophy = [p.atrophy for p in params]
    assert min(ages) >= 20 and max(ages) <= 90
    assert np.corrcoef(ages, atrophy)[0, 1] > 0.7


def test_head_shell_lies_outside_the_brain_dark_skull_then_bright_scalp_then_air_with_a_right_fiducial():
    # 2 mm: the skull (4-7 mm) must span a few voxels to be seen.
    shape = (100, 120, 110)
    affine = demo.axcodes_affine(("R", "A", "S"), (2.0, 2.0, 2.0), shape, demo.HEAD_CENTRE_MM)
    params = noise_free_subject(0.3)
    brain = demo.subject_brain_mask(params, affine, shape, downsample=2)
    head = demo.subject_volume(params, affine, shape, downsample=2)
    assert (head > 0.1).sum() > 1.3 * brain.sum()  # skull stripping has real work to do
    brightest = nib.affines.apply_affine(affine, np.unravel_index(np.argmax(head), shape))
    assert brightest[0] > 30 and brightest[2] > 30, f"the fiducial is not up on the right: {brightest}"
    centre = np.round(np.argwhere(brain).mean(axis=0)).astype(int)
    for axis, step in ((0, 1), (0, -1), (1, 1), (1, -1), (2, 1)):
        ray_index = [slice(c, c + 1) for c in centre]
        ray_index[axis] = slice(centre[axis], None, step)  # from the brain centre outwards
        ray = head[tuple(ray_index)].ravel()
        edge = np.flatnonzero(brain[tuple(ray_index)].ravel())[-1]  # last brain voxel along the ray
        beyond = ray[edge + 1 :]
        scalp = int(np.argmax(beyond[:12]))
        where = f"along axis {axis} {step:+d}: {np.round(beyond[:12], 2)}"
        assert beyond[scalp] > 1.0, f"no fat-bright scalp outside the brain {where}"
        assert beyond[:scalp].min() < 0.3, f"no dark CSF/skull band between brain and scalp {where}"
        assert (beyond[scalp:] < 0.05).any(), f"the head does not end in air {where}"


def test_build_refuses_a_non_empty_folder_and_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something.txt").write_text("x")
    with pytest.raises(demo.DemoCohortError, match="delete it"):
        demo.build_demo_cohort(taken, n_subjects=2, seed=0, oasis_fraction=0.5, downsample=TINY)

    calls = []
    write_subject = demo.write_subject

    def failing_second_subject(params, root, downsample=1):
        calls.append(params.subject)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-cohort
        return write_subject(params, root, downsample)

    monkeypatch.setattr(demo, "write_subject", failing_second_subject)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo_cohort(tmp_path / "fresh", n_subjects=2, seed=0, oasis_fraction=0.5, downsample=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no cohort, no staging folder


def test_snakemake_builds_the_demo_cohort_target(tmp_path):
    """The demo_cohort rule, run by real snakemake on a 2-subject, 4 mm cohort."""
    target = "resources/demo/n2-seed0-oasis0.5-ds4"  # raw_root(): downsample is part of the name
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("demo:\n  n_subjects: 2\n  downsample: 4\n")  # --config would pass the numbers as strings
    command = [
        str(Path(sys.executable).with_name("snakemake")),
        "--cores",
        "1",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(REPO / "config" / "config.yaml"),
        str(tiny),
        "--quiet",
        "--",
        target,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = pd.read_csv(tmp_path / target / "participants.tsv", sep="\t")
    assert len(table) == 2
    assert (tmp_path / "results" / "demo" / "logs" / "demo_cohort.log").is_file()
