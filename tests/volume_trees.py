"""Real-layout raw data made in the tests: DICOM series written from NIfTI volumes, BIDS and ADNI folders.

Used by tests/test_dicom.py, test_sources.py, test_inference.py and test_apply.py.
"""

from __future__ import annotations

import contextlib
import json
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def asymmetric_head(shape=(40, 48, 36), zooms=(4.0, 4.0, 4.0), seed: int = 0) -> np.ndarray:
    """Return an int16 head-like volume: an ellipsoid whose intensity ramps up along each voxel axis at its own
    rate, with a darker core and noise, so a flipped or permuted read gives a clearly different array."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * z for n, z in zip(shape, zooms)], indexing="ij")
    radius = np.sqrt(sum((g / (0.42 * n * z)) ** 2 for g, n, z in zip(grids, shape, zooms)))
    ramps = sum(rate * g / (n * z) for rate, g, n, z in zip((150.0, 300.0, 450.0), grids, shape, zooms))
    data = np.where(radius < 1, 600.0 + ramps, 0.0) - np.where(radius < 0.45, 200.0, 0.0)
    data += rng.normal(0, 10, shape) * (radius < 1)
    return np.clip(data, 0, None).astype(np.int16)


def oblique_affine(zooms=(4.0, 4.0, 4.0), axcodes_perm=(0, 1, 2), flips=(1, 1, 1), angle_deg: float = 0.0):
    """Return an affine with permuted/flipped voxel axes, ``zooms``, a rotation of ``angle_deg`` about S and an offset."""
    rotation = np.eye(3)
    theta = np.deg2rad(angle_deg)
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    axes = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(zip(axcodes_perm, flips)):
        axes[world_axis, voxel_axis] = flip * zooms[voxel_axis]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ axes
    affine[:3, 3] = [-70.0, -90.0, -60.0]
    return affine


def nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def write_dicom_series(img, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1", drop=(),
                       description: str = "MPRAGE", name: str = "IM{number:04d}.dcm") -> list[Path]:
    """Write ``img`` (3D, integer data) as a DICOM series, one file per slice along its third voxel axis.

    Every file carries the geometry tags a scanner writes (ImageOrientationPatient, ImagePositionPatient,
    PixelSpacing, SliceThickness) in DICOM's LPS world. Slices whose index is in ``drop`` are left out; file
    names are ``name`` with the slice number. Returns the files written.
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(img.dataobj).astype(np.int16)
    lps = LPS_TO_RAS @ img.affine
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / zooms
    volume = sitk.GetImageFromArray(data.transpose(2, 1, 0).copy())
    volume.SetSpacing([float(z) for z in zooms])
    volume.SetOrigin([float(v) for v in lps[:3, 3]])
    volume.SetDirection([float(v) for v in direction.ravel()])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    cosines = "\\".join(f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1]))
    written = []
    for k in range(data.shape[2]):
        if k in drop:
            continue
        piece = volume[:, :, k]
        for tag, value in (
            ("0008|0060", "MR"), ("0008|103e", description), ("0010|0020", "anonymous"),
            ("0020|000d", series_uid + ".0"), ("0020|000e", series_uid), ("0020|0037", cosines),
            ("0020|0032", "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k)))),
            ("0020|0013", str(k + 1)), ("0018|0050", f"{zooms[2]:.6f}"), ("0008|0018", f"{series_uid}.{k + 1}"),
        ):
            piece.SetMetaData(tag, value)
        path = folder / name.format(number=k + 1)
        writer.SetFileName(str(path))
        with locale_kept():
            writer.Execute(piece)
        written.append(path)
    return written


@contextlib.contextmanager
def locale_kept():
    """Restore the process locale after the block: ITK's GDCM writer sets it to "C", which would turn Python's
    default text encoding to ASCII for every later test in the session (open(), read_text(), subprocess)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_bids_tree(root: Path, volume: nib.Nifti1Image, description: bool = True) -> Path:
    """Write a small BIDS dataset: sub-01 without sessions (T1w, T2w, FLAIR, a 4D bold), sub-02 with two sessions
    (ses-1 with two T1w runs, ses-2 with an acquisition label), sub-03 with one session, participants.tsv.

    Returns ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    if description:
        (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03"], "age": [31, 67, 45],
                  "sex": ["F", "M", "female"], "group": ["control", "patient", "control"]}).to_csv(
        root / "participants.tsv", sep="\t", index=False)
    files = {
        "sub-01/anat/sub-01_T1w.nii.gz": volume,
        "sub-01/anat/sub-01_T2w.nii.gz": volume,
        "sub-01/anat/sub-01_FLAIR.nii.gz": volume,
        "sub-02/ses-1/anat/sub-02_ses-1_run-1_T1w.nii.gz": volume,
        "sub-02/ses-1/anat/sub-02_ses-1_run-2_T1w.nii.gz": volume,
        "sub-02/ses-2/anat/sub-02_ses-2_acq-mprage_T1w.nii.gz": volume,
        "sub-02/ses-2/anat/sub-02_ses-2_T2w.nii.gz": volume,
        "sub-03/ses-1/anat/sub-03_ses-1_T1w.nii": volume,
    }
    for name, img in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(root / name))
    bold = nib.Nifti1Image(np.stack([np.asarray(volume.dataobj)] * 3, axis=-1), volume.affine)
    (root / "sub-01/func").mkdir(parents=True, exist_ok=True)
    nib.save(bold, str(root / "sub-01/func/sub-01_task-rest_bold.nii.gz"))
    (root / "sub-01/anat/sub-01_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3}))
    return root


ADNI_IMAGES = (
    # subject, description, acquisition time, image folder, image id, format
    ("002_S_0295", "MPRAGE", "2006-04-18_08_20_30.0", "S13408", "I13722", "nifti"),
    ("002_S_0295", "MPRAGE_Repeat", "2006-04-18_08_35_10.0", "S13409", "I13723", "nifti"),
    ("002_S_0295", "MPRAGE", "2007-05-02_09_01_00.0", "S30012", "I55001", "dicom"),
    ("011_S_0002", "MP-RAGE", "2005-09-08_10_11_12.0", "S9107", "I7025", "nifti"),
)


def write_adni_tree(root: Path, volume: nib.Nifti1Image, images=ADNI_IMAGES) -> Path:
    """Write the ADNI download layout ``ADNI/<site>_S_<rid>/<description>/<date>/<image folder>/...`` under ``root``:
    NIfTI files named as LONI names them, or a DICOM series. Returns the ``ADNI`` folder."""
    adni = root / "ADNI"
    for subject, description, when, folder, image_id, fmt in images:
        target = adni / subject / description / when / folder
        stamp = when[:10].replace("-", "") + "101010123"
        loni_name = f"ADNI_{subject}_MR_{description}_br_raw_{stamp}_{{number}}_{folder}_{image_id}"
        if fmt == "dicom":
            write_dicom_series(volume, target, series_uid=f"1.2.840.113619.{image_id[1:]}", description=description,
                               name=loni_name + ".dcm")
        else:
            target.mkdir(parents=True, exist_ok=True)
            nib.save(volume, str(target / (loni_name.format(number=1) + ".nii")))
    return adni


def write_adni_collection_csv(path: Path) -> Path:
    """Write an IDA collection CSV (one row per image) for ADNI_IMAGES; return its path."""
    pd.DataFrame({
        "Image Data ID": ["I13722", "I13723", "I55001", "I7025"],
        "Subject": ["002_S_0295", "002_S_0295", "002_S_0295", "011_S_0002"],
        "Group": ["CN", "CN", "CN", "AD"], "Sex": ["M", "M", "M", "F"], "Age": [84, 84, 85, 74],
        "Visit": ["sc", "sc", "m12", "bl"], "Modality": "MRI",
        "Description": ["MPRAGE", "MPRAGE_Repeat", "MPRAGE", "MP-RAGE"], "Type": "Original",
        "Acq Date": ["4/18/2006", "4/18/2006", "5/02/2007", "9/08/2005"], "Format": ["NiFTI", "NiFTI", "DCM", "NiFTI"],
        "Downloaded": "",
    }).to_csv(path, index=False)
    return path
