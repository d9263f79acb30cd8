"""Your own folder of volumes (``dataset.source: local``): NIfTI or Analyze files, or DICOM series (a folder of
one series' files), at any depth in ``dataset.local_dir``.

The scan key comes from each file name (a series' folder name) through ``dataset.subject_regex``; Analyze files need
``dataset.analyze_orientation``; ``dataset.participants`` names an optional participants.tsv.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from brainvq.demographics import COLUMNS, read_participants_tsv, with_scanned_subjects
from brainvq.dicom import dicom_series_folders
from brainvq.io import (
    SCAN_KEY_PATTERN,
    MissingOrientationError,
    ScanKeyError,
    is_brain_mask_path,
    pair_paths,
    scan_row,
    visible_files,
)
from brainvq.sources import FolderSource


def local_scan_key(path: Path, regex: re.Pattern) -> tuple[str, str, str]:
    """Return (scan, subject, session) of a local file from ``dataset.subject_regex``.

    Raises:
        ScanKeyError: the regex does not match, or gives a key that cannot be a file stem.
    """
    match = regex.match(path.name)
    if not match or not match.groupdict().get("subject"):
        raise ScanKeyError(
            f"dataset.subject_regex {regex.pattern!r} does not match the file name of {path} "
            "(it needs a named group 'subject'); adjust the regex or rename/remove the file"
        )
    subject, session = match.group("subject"), match.groupdict().get("session") or ""
    scan = f"{subject}_{session}" if session else subject
    if not re.fullmatch(SCAN_KEY_PATTERN, scan):
        raise ScanKeyError(
            f"{path}: scan key {scan!r} from dataset.subject_regex may use only letters, digits, '_' and '-' "
            "(and not contain '_mask'); adjust the regex or rename the file"
        )
    return scan, subject, session


def local_rows(raw_root: Path, subject_regex: str, analyze_orientation: str | None) -> list[dict]:
    """Return rows for every .nii/.nii.gz/.hdr (+.img) that is not a ``*_brainmask`` file, and every DICOM series
    folder, under ``raw_root``, keyed by ``subject_regex``.

    Raises:
        MissingOrientationError: Analyze files are present but ``analyze_orientation`` is not set.
    """
    regex = re.compile(subject_regex)
    rows = []
    files = list(visible_files(raw_root))
    for folder in dicom_series_folders(files):
        scan, subject, session = local_scan_key(folder, regex)
        rows.append(scan_row(scan, subject, session, folder, None))
    for path in files:
        name = path.name.lower()
        if not name.endswith((".nii", ".nii.gz", ".hdr", ".img")) or is_brain_mask_path(path):
            continue  # a precomputed brain mask belongs to the volume beside it (scan_row's 'mask')
        # A pair is found through its .hdr; a lone .img still becomes a row so its missing .hdr is reported.
        if name.endswith(".img") and pair_paths(path)[0].exists():
            continue
        scan, subject, session = local_scan_key(path, regex)
        row = scan_row(scan, subject, session, path, analyze_orientation)
        # A lone .hdr is not an orientation problem: validation names its missing .img (and skip mode skips it).
        complete_pair = pair_paths(path)[1].exists()
        if name.endswith(".hdr") and complete_pair and row["format"] == "analyze" and not analyze_orientation:
            raise MissingOrientationError(
                f"{path} is Analyze, whose header carries no orientation; set dataset.analyze_orientation "
                "to the voxel axis codes of your Analyze files (e.g. LAS), or convert them to NIfTI"
            )
        rows.append(row)
    return rows


class Local(FolderSource):
    name = "local"
    layout = ".nii, .nii.gz or .hdr/.img files, or folders of one DICOM series each (at any depth)"
    defaults = {"stratify": None, "probe_target": "sex", "skull_strip": "none"}
    attribution_html = """\
<p>This run uses local data supplied by the user (<code>dataset.local_dir</code>). Add its source, licence and
citation here before sharing results.</p>
"""

    def discovery_settings(self, config: dict) -> dict:
        dataset = config["dataset"]
        return {key: dataset[key] for key in ("local_dir", "subject_regex", "participants", "analyze_orientation")}

    def required_paths(self, config: dict) -> dict[str, str]:
        dataset = config["dataset"]
        return {f"dataset.{key}": dataset[key] for key in ("local_dir", "participants") if dataset[key]}

    def find_rows(self, raw_root: Path, settings: dict) -> list[dict]:
        return local_rows(raw_root, settings["subject_regex"], settings["analyze_orientation"])

    def participants(self, raw_root: Path, settings: dict, scans: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``dataset.participants`` (when set), plus an empty row for each other scanned subject."""
        path = settings.get("participants")
        table = read_participants_tsv(path) if path else pd.DataFrame(columns=COLUMNS)
        return with_scanned_subjects(table, scans)


SOURCE = Local()
