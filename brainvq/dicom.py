"""DICOM series: one folder of 2D DICOM files is one volume, read with SimpleITK's series reader.

A series is found by its files (``.dcm``/``.ima`` names, or the ``DICM`` marker of the DICOM file format).
Before reading, every file's header is checked: one series per folder, one orientation, one matrix and
pixel size, and evenly spaced slice positions (a gap is a missing slice). The volume's orientation comes
from the DICOM geometry (ImageOrientationPatient, ImagePositionPatient, PixelSpacing), converted from
DICOM's LPS world to the RAS world of NIfTI.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from brainvq.io import VolumeError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
# Relative tolerance of the checks on orientation cosines, pixel sizes and slice spacing.
GEOMETRY_TOLERANCE = 1e-3
SPACING_TOLERANCE = 0.1
# DICOM's patient coordinates are LPS; NIfTI's are RAS: flip the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomSeriesError(VolumeError):
    """Base class: a folder of DICOM files cannot be read as one volume."""


class NoDicomSeriesError(DicomSeriesError):
    """The folder holds no readable DICOM series."""


class MultipleSeriesError(DicomSeriesError):
    """The folder holds files of more than one series (one series is one volume)."""


class MixedGeometryError(DicomSeriesError):
    """The files of the series disagree on orientation, matrix size or pixel size."""


class MissingSliceError(DicomSeriesError):
    """The slice positions are not evenly spaced: slices are missing (or duplicated)."""


def is_dicom_file(path: Path) -> bool:
    """Return whether ``path`` is a DICOM file: a DICOM suffix, or the 'DICM' marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in (".nii", ".gz", ".hdr", ".img", ".json", ".tsv", ".csv", ".txt", ".xml"):
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_series_folders(files) -> list[Path]:
    """Return the folders that directly hold DICOM files, from an iterable of file paths (sorted, unique)."""
    return sorted({path.parent for path in files if is_dicom_file(path)})


def _series_files(folder: Path) -> list[str]:
    """Return the files of the one series in ``folder``, in SimpleITK's (slice position) order."""
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise NoDicomSeriesError(
            f"{folder} holds no readable DICOM series; check that its files are complete DICOM images, "
            "or move the folder out of the raw data"
        )
    if len(series) > 1:
        raise MultipleSeriesError(
            f"{folder} holds {len(series)} DICOM series ({', '.join(series[:4])}); one series is one volume: "
            "move each series into a folder of its own (dcm2niix or your PACS export can sort them)"
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _numbers(text: str) -> np.ndarray:
    return np.array([float(value) for value in str(text).replace(" ", "").split("\\") if value], float)


def slice_geometry(path: str) -> dict:
    """Return one file's geometry: ``orientation`` (6 cosines), ``position`` (3, mm), ``spacing`` (2), ``size`` (2)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()

    def tag(key: str) -> str | None:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None

    orientation, position = tag("0020|0037"), tag("0020|0032")
    if orientation is None or position is None:
        raise MixedGeometryError(
            f"{path} has no ImageOrientationPatient/ImagePositionPatient, so its place in the volume is unknown; "
            "re-export the series with its geometry (or convert it with dcm2niix)"
        )
    return {
        "orientation": _numbers(orientation),
        "position": _numbers(position),
        "spacing": np.asarray(reader.GetSpacing()[:2], float),
        "size": tuple(reader.GetSize()[:2]),
    }


def check_series_geometry(folder: Path, files: list[str]) -> None:
    """Raise unless the files share one orientation, matrix and pixel size and are evenly spaced slices.

    Raises:
        MixedGeometryError: naming the first file that differs from the first one.
        MissingSliceError: naming the gap between two neighbouring slices.
    """
    geometry = [slice_geometry(path) for path in files]
    first = geometry[0]
    for path, item in zip(files[1:], geometry[1:]):
        differs = [
            name for name, same in (
                ("orientation", np.allclose(item["orientation"], first["orientation"], atol=GEOMETRY_TOLERANCE)),
                ("matrix size", item["size"] == first["size"]),
                ("pixel spacing", np.allclose(item["spacing"], first["spacing"], rtol=GEOMETRY_TOLERANCE)),
            ) if not same
        ]
        if differs:
            raise MixedGeometryError(
                f"DICOM series {folder} mixes geometries: {Path(path).name} differs from {Path(files[0]).name} in "
                f"{', '.join(differs)}; a series must be one block of parallel slices. Move the odd files into a "
                "folder of their own (they are another acquisition or a localizer) or re-export the series"
            )
    if len(files) < 2:
        return
    row, column = first["orientation"][:3], first["orientation"][3:]
    normal = np.cross(row, column)
    depth = np.sort([float(np.dot(item["position"], normal)) for item in geometry])
    steps = np.diff(depth)
    step = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - step) > SPACING_TOLERANCE * max(abs(step), 1e-6))
    if step <= 0 or uneven.size:
        k = int(uneven[0]) if uneven.size else 0
        missing = max(int(round(steps[k] / step)) - 1, 0) if step > 0 else 0
        raise MissingSliceError(
            f"DICOM series {folder}: slice positions are not evenly spaced (step {steps[k]:.3g} mm between slices "
            f"{k} and {k + 1} of {len(files)}, where the series steps {step:.3g} mm"
            + (f": about {missing} slice(s) missing" if missing else ": duplicated slice positions")
            + "); re-export or re-download the complete series, or remove the folder from the raw data"
        )


def affine_from_sitk(image) -> np.ndarray:
    """Return the voxel-to-RAS affine of a SimpleITK image whose array is transposed to (x, y, z)."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), float)
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def read_dicom_series(folder: str | Path) -> nib.Nifti1Image:
    """Return the DICOM series in ``folder`` as a float32 NIfTI image in RAS world coordinates.

    Raises:
        DicomSeriesError: no series, several series, mixed geometry or missing slices (subclasses),
            or files SimpleITK cannot decode; each names the folder and the fix.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    files = _series_files(folder)
    check_series_geometry(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise DicomSeriesError(
            f"DICOM series {folder} cannot be decoded ({error}); re-export it uncompressed or convert it with "
            "dcm2niix"
        ) from error
    data = sitk.GetArrayFromImage(image).astype(np.float32)
    if data.ndim != 3:
        raise DicomSeriesError(f"DICOM series {folder} gives an array of shape {data.shape}, not one 3D volume; "
                               "export a single-channel 3D series")
    affine = affine_from_sitk(image)
    img = nib.Nifti1Image(data.transpose(2, 1, 0), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    log.info("%s: DICOM series of %d slices, %s", folder, len(files), "".join(nib.aff2axcodes(affine)))
    return img
