"""Reading raw T1 volumes (validated at the boundary), discovering a source's scans, atomic writers."""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.orientations import aff2axcodes, axcodes2ornt

from brainvq.files import atomic_path

log = logging.getLogger(__name__)

# Scan keys become file stems and the {scan} wildcard; "_mask" is refused because
# brain/{scan}_mask.nii.gz would otherwise also match brain/{scan}.nii.gz.
SCAN_KEY_PATTERN = r"(?:(?!_mask)[A-Za-z0-9_-])+"
SCANS_COLUMNS = ["scan", "subject", "session", "path", "format", "orientation", "mask"]
# A precomputed brain mask lives beside its volume, named like it with this before the extension
# (IXI002-Guys-0828-T1_brainmask.nii.gz, OAS1_0001_MR1_mpr-1_anon_brainmask.hdr); preprocess.skull_strip
# 'precomputed' uses it.
BRAIN_MASK_SUFFIX = "_brainmask"
EXCLUDED_COLUMNS = ["scan", "path", "stage", "reason"]
DISCOVERY_STAGE = "discover_subjects"


class VolumeError(ValueError):
    """Base class: a raw volume cannot be used. Subclasses name one failure kind each."""


class VolumeNotFoundError(VolumeError, FileNotFoundError):
    """The volume file does not exist."""


class UnknownFormatError(VolumeError):
    """The file is not NIfTI (.nii, .nii.gz), an Analyze/NIfTI pair (.hdr + .img) or a folder of one DICOM series."""


class MissingPairError(VolumeError):
    """An .hdr without its .img (or an .img without its .hdr)."""


class CorruptVolumeError(VolumeError):
    """The file cannot be read: truncated, not an image, or a header with invalid voxel sizes."""


class VolumeShapeError(VolumeError):
    """The image is not a single 3D volume (2D, a single slice, or 4D with several volumes)."""


class NonFiniteVolumeError(VolumeError):
    """The volume contains NaN or infinite voxels."""


class EmptyVolumeError(VolumeError):
    """Every voxel is zero."""


class MissingOrientationError(VolumeError):
    """The header carries no orientation (Analyze, or NIfTI with qform_code = sform_code = 0) and none was given."""


class InvalidOrientationError(VolumeError):
    """The given voxel orientation is not three distinct axis codes such as 'LAS'."""


class DiscoveryError(ValueError):
    """Base class: the raw folder does not hold a usable set of scans."""


class NoVolumesFoundError(DiscoveryError):
    """The raw folder is missing or holds no volume in the expected layout (or every volume was rejected)."""


class DuplicateScanError(DiscoveryError):
    """Two files map to the same scan key."""


class ScanKeyError(DiscoveryError):
    """dataset.subject_regex does not match a file name, or gives a key that cannot be a file stem."""


# ----------------------------------------------------------------------------------------------
# Reading one volume
# ----------------------------------------------------------------------------------------------


def volume_kind(path: Path) -> str:
    """Return 'nifti' for .nii/.nii.gz, 'pair' for .hdr/.img, 'dicom' for a folder (one DICOM series).

    Raises:
        UnknownFormatError: for any other file name.
    """
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".hdr", ".img")):
        return "pair"
    raise UnknownFormatError(
        f"{path}: unknown volume format; convert it to NIfTI (.nii/.nii.gz) or Analyze (.hdr + .img), "
        "put a DICOM series in a folder of its own, or move it out of the raw folder"
    )


def volume_stem_and_extension(path: Path) -> tuple[str, str]:
    """Return (name without extension, extension) of a volume file: ``.nii.gz`` counts as one extension."""
    name = path.name
    extension = name[-7:] if name.lower().endswith(".nii.gz") else path.suffix
    return name[: len(name) - len(extension)], extension


def brain_mask_path(path: str | Path) -> Path:
    """Return where a volume's precomputed brain mask lives: beside it, ``<stem>_brainmask<extension>``."""
    path = Path(path)
    stem, extension = volume_stem_and_extension(path)
    return path.with_name(f"{stem}{BRAIN_MASK_SUFFIX}{extension}")


def is_brain_mask_path(path: str | Path) -> bool:
    """Return whether a file is a precomputed brain mask (never a scan of its own)."""
    return volume_stem_and_extension(Path(path))[0].endswith(BRAIN_MASK_SUFFIX)


def pair_paths(path: Path) -> tuple[Path, Path]:
    """Return the (.hdr, .img) paths of an Analyze/NIfTI pair named by either of its files (same case)."""
    if path.suffix.isupper():
        return path.with_suffix(".HDR"), path.with_suffix(".IMG")
    return path.with_suffix(".hdr"), path.with_suffix(".img")


def validated_axcodes(orientation: str, path: Path) -> tuple[str, str, str]:
    """Return ``orientation`` (e.g. 'LAS') as three axis codes, one per world axis.

    Raises:
        InvalidOrientationError: naming the file and the allowed codes.
    """
    codes = tuple(str(orientation).upper())
    pairs = [{"L", "R"}, {"P", "A"}, {"I", "S"}]
    used = sorted(i for code in codes for i, pair in enumerate(pairs) if code in pair)
    if len(codes) != 3 or used != [0, 1, 2]:
        raise InvalidOrientationError(
            f"{path}: orientation {orientation!r} is not three axis codes, one of L/R, A/P and S/I each "
            "(e.g. 'LAS', 'ASL'); fix dataset.analyze_orientation or datasets.<dataset>.orientation"
        )
    return codes  # type: ignore[return-value]


def affine_from_axcodes(axcodes: tuple[str, str, str], zooms, shape) -> np.ndarray:
    """Return a voxel-to-RAS affine whose voxel axes point along ``axcodes``, centred on the volume.

    Args:
        axcodes: the world direction each voxel axis increases towards, e.g. ('A', 'S', 'L').
        zooms: voxel sizes in mm along the three voxel axes.
        shape: the three voxel dimensions.

    Returns:
        4x4 affine; the origin is the volume centre, since the header's origin is not trusted.
    """
    ornt = axcodes2ornt(axcodes)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for voxel_axis, (world_axis, direction) in enumerate(ornt):
        affine[int(world_axis), voxel_axis] = direction * float(zooms[voxel_axis])
    centre = (np.asarray(shape[:3], float) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    assert aff2axcodes(affine) == tuple(axcodes)
    return affine


def has_header_orientation(img) -> bool:
    """Return whether ``img`` is NIfTI with a usable sform or qform (code > 0)."""
    if not isinstance(img, nib.Nifti1Pair):
        return False
    return int(img.header["sform_code"]) > 0 or int(img.header["qform_code"]) > 0


def read_image(path: Path):
    """Return the nibabel image at ``path`` (header parsed, data not yet read).

    Raises:
        VolumeNotFoundError, UnknownFormatError, MissingPairError, CorruptVolumeError,
        brainvq.dicom.DicomSeriesError (a folder that is not one complete DICOM series).
    """
    kind = volume_kind(path)
    if kind == "dicom":
        from brainvq.dicom import read_dicom_series  # brainvq.dicom imports this module

        return read_dicom_series(path)
    if kind == "pair":
        hdr, img = pair_paths(path)
        for present, absent in ((hdr, img), (img, hdr)):
            if present.exists() and not absent.exists():
                raise MissingPairError(
                    f"{present} has no matching {absent.name}; Analyze/NIfTI pairs need both files side by side. "
                    "Copy the missing file next to it, or remove the incomplete pair"
                )
        path = hdr
    if not path.exists():
        raise VolumeNotFoundError(f"volume {path} does not exist; check the raw folder and the dataset settings")
    try:
        # mmap=False: read the file, so a truncated one fails here rather than at some later access.
        return nib.load(str(path), mmap=False)
    except Exception as error:
        raise CorruptVolumeError(
            f"{path} cannot be read as an image ({type(error).__name__}: {error}); "
            "re-download or re-extract it, or remove it from the raw folder"
        ) from error


def read_voxels(img, path: Path) -> np.ndarray:
    """Return the voxels of ``img`` as one 3D float32 array, forcing a full read.

    Raises:
        CorruptVolumeError: truncated or undecodable data.
        VolumeShapeError: 2D, a single slice, or several volumes.
    """
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as error:
        raise CorruptVolumeError(
            f"{path}: the voxel data cannot be read ({type(error).__name__}: {error}); the file is probably "
            "truncated. Re-download or re-extract it, or remove it from the raw folder"
        ) from error
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise VolumeShapeError(
            f"{path} has shape {data.shape}; expected one 3D volume. Extract a single 3D T1 volume "
            "(e.g. the first of a 4D series) into its own file"
        )
    if min(data.shape) < 2:
        raise VolumeShapeError(
            f"{path} has shape {data.shape}, a single slice rather than a volume; use the full 3D acquisition"
        )
    return data


def checked_voxels(data: np.ndarray, path: Path) -> np.ndarray:
    """Return ``data`` after checking it is finite and not all zero.

    Raises:
        NonFiniteVolumeError, EmptyVolumeError.
    """
    finite = np.isfinite(data)
    if not finite.all():
        raise NonFiniteVolumeError(
            f"{path} has {int((~finite).sum())} NaN/infinite voxels; fix or re-export the volume "
            "(or remove it from the raw folder)"
        )
    if not data.any():
        raise EmptyVolumeError(f"{path} is all zeros; re-export the volume or remove it from the raw folder")
    return data


def volume_affine(img, path: Path, orientation: str | None, shape) -> np.ndarray:
    """Return the voxel-to-world affine: the NIfTI sform/qform, else one built from ``orientation``.

    Raises:
        MissingOrientationError: no header orientation and no ``orientation``.
        CorruptVolumeError: voxel sizes that are not positive.
    """
    if has_header_orientation(img):
        return img.affine
    if not orientation:
        raise MissingOrientationError(
            f"{path} carries no usable orientation (Analyze header, or NIfTI with qform_code = sform_code = 0); "
            "pass its voxel axis codes, e.g. 'LAS' or 'ASL': set dataset.analyze_orientation "
            "(source: local) or datasets.<dataset>.orientation"
        )
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    if zooms.size != 3 or not (np.isfinite(zooms).all() and (zooms > 0).all()):
        raise CorruptVolumeError(
            f"{path}: header voxel sizes {tuple(zooms)} are not positive; fix pixdim in the header"
        )
    return affine_from_axcodes(validated_axcodes(orientation, path), zooms, shape)


def read_volume(path: Path, orientation: str | None = None) -> tuple[object, np.ndarray, np.ndarray]:
    """Return ``(img, data, affine)``: the image as read, its 3D float32 voxels and its checked affine.

    Raises:
        VolumeError: one subclass per failure kind, naming the file and the fix (``qc.AffineError`` for a
            singular or non-finite affine, which nibabel would otherwise refuse deep inside with no file name).
    """
    from brainvq.qc import check_affine  # qc builds on this module's VolumeError: import it where used

    img = read_image(path)
    data = checked_voxels(read_voxels(img, path), path)
    affine = volume_affine(img, path, orientation, data.shape)
    check_affine(affine, path)
    return img, data, affine


def load_volume(path: str | Path, orientation: str | None = None) -> nib.Nifti1Image:
    """Return a raw volume, fully read and validated, as a float32 NIfTI image.

    Args:
        path: a .nii, .nii.gz, or .hdr/.img (Analyze or NIfTI pair) file.
        orientation: voxel axis codes (e.g. 'ASL') to impose when the header has no usable
            orientation (Analyze; NIfTI with qform_code = sform_code = 0). NIfTI with an sform
            or qform uses its own, and ``orientation`` is then ignored.

    Returns:
        A Nifti1Image with 3D float32 data (a 4D file with one volume is squeezed) and the
        affine described above (sform and qform code 1).

    Raises:
        VolumeError: one subclass per failure kind, naming the file and the fix.
    """
    _, data, affine = read_volume(Path(path), orientation)
    out = nib.Nifti1Image(data, affine)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    out.header.set_xyzt_units("mm")
    return out


def header_describes_orientation(path: Path) -> bool:
    """Return whether the file at ``path`` is NIfTI with a usable sform/qform, or a DICOM series folder
    (whose geometry gives the orientation); False if unreadable."""
    if path.is_dir():
        return True
    try:
        return has_header_orientation(nib.load(str(path)))
    except Exception:
        return False


def header_format(path: Path) -> str:
    """Return 'nifti' for NIfTI files and pairs, 'dicom' for a series folder, 'analyze' for other .hdr/.img."""
    if volume_kind(path) in ("nifti", "dicom"):
        return volume_kind(path)
    try:
        return "nifti" if isinstance(nib.load(str(pair_paths(path)[0])), nib.Nifti1Pair) else "analyze"
    except Exception:
        return "analyze"


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------


def scan_row(scan: str, subject: str, session: str, path: Path, orientation: str | None) -> dict:
    """Return one subjects.tsv row; ``orientation`` is kept only where the header lacks one, and ``mask`` is the
    precomputed brain mask beside the volume (``brain_mask_path``), '' when there is none."""
    fmt = header_format(path) if path.exists() else ("nifti" if volume_kind(path) == "nifti" else "analyze")
    needs_orientation = not (path.exists() and header_describes_orientation(path))
    mask = brain_mask_path(path)
    return {
        "scan": scan,
        "subject": subject,
        "session": session,
        "path": str(path),
        "format": fmt,
        "orientation": (orientation or "") if needs_orientation else "",
        "mask": str(mask) if mask.exists() else "",
    }


def visible_files(root: Path):
    """Yield the files under ``root``, recursively, skipping hidden files and folders."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def session_folders(root: Path, pattern: re.Pattern) -> list[Path]:
    """Return the folders under ``root`` (at any depth, e.g. inside disc folders) whose name matches."""
    found = []
    for folder, dirs, _ in os.walk(root):
        for name in sorted(dirs):
            if pattern.fullmatch(name):
                found.append(Path(folder) / name)
        # A session folder never holds another session: no need to walk into it.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not pattern.fullmatch(d))
    return sorted(found, key=lambda p: p.name)


def find_scans(source, raw_root: str | Path, config: dict) -> pd.DataFrame:
    """Return the candidate scans of ``raw_root`` in ``source``'s layout, without reading voxel data.

    Args:
        source: the ``brainvq.sources.Source`` of ``dataset.source``; its ``find_rows`` lists the candidates.
        raw_root: the folder holding the raw volumes.
        config: the validated config (the source reads its ``discovery_settings`` from it).

    Returns:
        A DataFrame with SCANS_COLUMNS, sorted by scan.

    Raises:
        NoVolumesFoundError: the folder is missing or holds nothing in the layout.
        DuplicateScanError: two files map to one scan key (both are named).
        ScanKeyError, MissingOrientationError: from the source's ``find_rows`` (e.g. the local layout).
    """
    if raw_root is None:
        raise NoVolumesFoundError("no raw folder is set; with dataset.source: local set dataset.local_dir")
    raw_root = Path(raw_root)
    if not raw_root.is_dir():
        raise NoVolumesFoundError(f"raw folder {raw_root} does not exist; check dataset.source / dataset.local_dir")
    rows = source.find_rows(raw_root, source.discovery_settings(config))
    if not rows:
        raise NoVolumesFoundError(
            f"{raw_root} holds no volumes for dataset.source={source.name}: expected {source.layout}"
        )
    seen = {}
    for row in rows:
        if row["scan"] in seen:
            raise DuplicateScanError(
                f"scan key {row['scan']!r} comes from two files: {seen[row['scan']]} and {row['path']}; "
                "remove one, or (source: local) change dataset.subject_regex so their keys differ"
            )
        seen[row["scan"]] = row["path"]
    return pd.DataFrame(rows, columns=SCANS_COLUMNS).sort_values("scan", ignore_index=True)


def volume_problem(row: dict, limits) -> VolumeError | None:
    """Return the VolumeError that reading ``row``'s volume or its QC gate raises, or None when it passes.

    Args:
        row: a ``find_scans`` row (path, orientation).
        limits: the QC gate's ``brainvq.qc.Thresholds``.
    """
    from brainvq.qc import check_volume  # qc builds on this module's VolumeError: import it where used

    path = Path(row["path"])
    try:
        img, data, affine = read_volume(path, row["orientation"] or None)
        check_volume(img, data, affine, path, limits)
    except VolumeError as error:
        return error
    return None


class InvalidVolumesError(VolumeError):
    """Several raw volumes cannot be used; the message tables every file with its reason.

    Attributes:
        problems: (path, error) of each bad volume, in scan order.
    """

    def __init__(self, problems: list[tuple[str, VolumeError]]):
        self.problems = problems
        width = max(len(str(path)) for path, _ in problems)
        rows = "\n".join(f"  {str(path):<{width}}  {problem_reason(problem, path)}" for path, problem in problems)
        super().__init__(
            f"{len(problems)} volumes cannot be used:\n  {'file':<{width}}  problem\n{rows}\n"
            "Fix or remove each file as its line says, or set preprocess.on_error: skip to leave them out "
            "(they are then listed in qc/excluded.csv)"
        )


def problem_reason(problem: VolumeError, path: str | Path | None = None) -> str:
    """Return ``'<ErrorClass>: <message>'``, without a leading ``path`` the table already shows."""
    message = str(problem)
    if path is not None and message.startswith(str(path)):
        message = message[len(str(path)):].lstrip(": ")
    return f"{type(problem).__name__}: {message}"


def validate_scans(
    scans: pd.DataFrame, on_error: str, threads: int = 1, limits=None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (kept, excluded) after fully reading every scan's volume and running the QC gate on it.

    Every volume is checked (in a thread pool) before anything is decided, so one run reports them all.

    Args:
        scans: rows from ``find_scans``.
        on_error: 'fail' raises when any volume is bad; 'skip' leaves the bad scans out.
        threads: loader threads (gzip decompression releases the GIL).
        limits: the QC gate's ``brainvq.qc.Thresholds``; None = the schema defaults.

    Returns:
        kept scans (SCANS_COLUMNS) and excluded rows (EXCLUDED_COLUMNS; the reason starts with the error class).

    Raises:
        VolumeError: with on_error 'fail', the one bad volume's error, or ``InvalidVolumesError`` tabling
            every bad volume when there are several.
    """
    from brainvq.qc import Thresholds  # see volume_problem

    limits = limits or Thresholds()
    records = scans.to_dict("records")
    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        problems = list(pool.map(lambda row: volume_problem(row, limits), records))
    bad = [(row["path"], problem) for row, problem in zip(records, problems) if problem is not None]
    if bad and on_error == "fail":
        raise bad[0][1] if len(bad) == 1 else InvalidVolumesError(bad)
    excluded = []
    for row, problem in zip(records, problems):
        if problem is not None:
            log.warning("skipping %s: %s", row["scan"], problem)
            excluded.append({"scan": row["scan"], "path": row["path"], "stage": DISCOVERY_STAGE,
                             "reason": problem_reason(problem)})
    kept = scans[[p is None for p in problems]].reset_index(drop=True)
    return kept, pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS)


def discover_scans_with_exclusions(
    source, raw_root: str | Path, config: dict, threads: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (scans, excluded): the validated scans of ``raw_root`` and the rejected inputs.

    Args:
        source: the ``brainvq.sources.Source`` of ``dataset.source``.
        raw_root: the folder holding the raw volumes.
        config: the validated config; ``preprocess.on_error`` decides fail or skip, ``qc`` holds the
            QC gate's thresholds.
        threads: loader threads.

    Returns:
        scans with SCANS_COLUMNS (subjects.tsv) and excluded with EXCLUDED_COLUMNS.

    Raises:
        DiscoveryError: layout problems (see ``find_scans``), or every volume rejected.
        VolumeError: bad volumes, with on_error 'fail' (all of them in one error, see ``validate_scans``).
    """
    from brainvq.qc import Thresholds  # see volume_problem

    candidates = find_scans(source, raw_root, config)
    scans, excluded = validate_scans(candidates, config["preprocess"]["on_error"], threads,
                                     Thresholds.from_config(config["qc"]))
    if scans.empty:
        reasons = "; ".join(excluded["reason"].head(3))
        raise NoVolumesFoundError(f"all {len(candidates)} volumes under {raw_root} were rejected, e.g. {reasons}")
    return scans, excluded


def discover_scans(source, raw_root: str | Path, config: dict, threads: int = 1) -> pd.DataFrame:
    """Return the validated scans of ``raw_root`` (subjects.tsv columns); see ``discover_scans_with_exclusions``."""
    return discover_scans_with_exclusions(source, raw_root, config, threads)[0]


def read_scans_table(path: str | Path) -> pd.DataFrame:
    """Return a subjects.tsv as strings (empty session/orientation stay '')."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


# ----------------------------------------------------------------------------------------------
# Writers (atomic: see brainvq.files)
# ----------------------------------------------------------------------------------------------


def save_volume_atomic(img, path: str | Path) -> None:
    """Write a NIfTI image to ``path`` (.nii or .nii.gz) atomically."""
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix) as tmp:
        nib.save(img, str(tmp))
