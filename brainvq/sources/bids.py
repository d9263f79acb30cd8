"""Any BIDS dataset (``dataset.source: bids``, https://bids.neuroimaging.io): ``dataset.local_dir`` is its root.

Files are indexed by pybids; subject and session come from the BIDS entities, and only images with the
suffix ``datasets.bids.suffix`` (``T1w``) are scans: T2w, FLAIR, bold and every other suffix never are.
Scan keys are ``sub-<label>`` or ``sub-<label>_ses-<label>``; the subject is ``sub-<label>`` (as in
participants.tsv), the session ``ses-<label>``.

Which image a session uses (the documented rule): the images of the suffix that match
``datasets.bids.filters`` (BIDS entities such as ``{acquisition: mprage}``) are ordered by run number, then
acquisition, reconstruction and file name; ``datasets.bids.runs: last`` (the default) keeps the last, since a
run is repeated when the earlier one failed; ``first`` keeps the first; ``all`` keeps every one as its own scan
(keys ``..._acq-<label>_run-<n>``). DICOM series in ``sourcedata/`` count where the session has no NIfTI:
a folder named like the image it would become (``sourcedata/sub-01/anat/sub-01_T1w/``) holding the series.

Demographics: ``participants.tsv`` (``participant_id``, ``age``, ``sex``, ...), and per-session values
(``age`` at the visit, ...) from ``sub-<label>/sub-<label>_sessions.tsv`` when present.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from brainvq.demographics import (
    COLUMNS,
    DemographicsError,
    extra_columns,
    scan_sessions,
    sex_from_letters,
    sheet_participants,
    with_scanned_subjects,
)
from brainvq.dicom import dicom_series_folders
from brainvq.io import DiscoveryError, scan_row, visible_files
from brainvq.sources import FolderSource

VOLUME_EXTENSIONS = [".nii", ".nii.gz"]
# The order within a session: the last of these is the 'last' image.
ORDER_ENTITIES = ("run", "acquisition", "reconstruction")


class BidsLayoutError(DiscoveryError):
    """``dataset.local_dir`` is not the root of a BIDS dataset (no dataset_description.json)."""


class MissingScanError(DiscoveryError):
    """A BIDS subject has no image with the configured suffix."""


def bids_label(value: str, prefix: str) -> str:
    """Return a BIDS label without its entity prefix: 'sub-01' and '01' both give '01'."""
    text = str(value).strip()
    return text[len(prefix) + 1:] if text.startswith(f"{prefix}-") else text


def require_bids_root(root: Path) -> None:
    """Raise BidsLayoutError unless ``root`` holds dataset_description.json."""
    if not (root / "dataset_description.json").is_file():
        raise BidsLayoutError(
            f"{root / 'dataset_description.json'} does not exist, so {root} is not the root of a BIDS dataset. "
            "Point dataset.local_dir at the folder holding dataset_description.json and the sub-* folders, "
            'add the file (e.g. {"Name": "my study", "BIDSVersion": "1.9.0"}), '
            "or use dataset.source: local for a plain folder of volumes"
        )


def nifti_images(root: Path, suffix: str, filters: dict) -> list[dict]:
    """Return the entities and path of every NIfTI image with ``suffix`` matching ``filters``, via pybids."""
    from bids import BIDSLayout  # slow to import: only discovery of a BIDS source pays for it

    layout = BIDSLayout(str(root), validate=False)
    images = layout.get(suffix=suffix, extension=VOLUME_EXTENSIONS, **filters)
    return [{**image.get_entities(), "path": Path(image.path)} for image in images]


def sourcedata_series(root: Path, suffix: str, filters: dict) -> list[dict]:
    """Return DICOM series under ``sourcedata/`` in folders named like a BIDS image with ``suffix``."""
    from bids.layout import parse_file_entities

    sourcedata = root / "sourcedata"
    if not sourcedata.is_dir():
        return []
    found = []
    for folder in dicom_series_folders(visible_files(sourcedata)):
        # The folder is named as the image it would become: parse that name.
        entities = parse_file_entities(str(folder) + ".nii.gz")
        if entities.get("suffix") == suffix and "subject" in entities and all(
            str(entities.get(key)) == str(value) for key, value in filters.items()
        ):
            found.append({**entities, "path": folder})
    return found


def image_order(image: dict) -> tuple:
    """Sort key of the images of one session: run, acquisition, reconstruction, file name."""
    run = image.get("run")
    return (int(run) if run is not None else 0, str(image.get("acquisition") or ""),
            str(image.get("reconstruction") or ""), image["path"].name)


def chosen_images(images: list[dict], runs: str) -> list[dict]:
    """Return the images a session uses: the last or first in ``image_order``, or all of them."""
    ordered = sorted(images, key=image_order)
    return {"last": ordered[-1:], "first": ordered[:1], "all": ordered}[runs]


def image_scan_key(image: dict, runs: str) -> tuple[str, str, str]:
    """Return (scan, subject, session) of an image; with runs 'all' the key also names acquisition and run."""
    subject = f"sub-{image['subject']}"
    session = f"ses-{image['session']}" if image.get("session") else ""
    parts = [subject] + ([session] if session else [])
    if runs == "all":
        parts += [f"{name}-{image[key]}" for key, name in (("acquisition", "acq"), ("run", "run")) if image.get(key)]
    return "_".join(parts), subject, session


def bids_rows(root: Path, settings: dict) -> list[dict]:
    """Return one row per scan of the BIDS dataset at ``root`` (see the module docstring for the rule).

    Raises:
        BidsLayoutError: no dataset_description.json.
        MissingScanError: a subject (not in ``exclude_subjects``) without an image of the suffix.
    """
    root = Path(root)
    require_bids_root(root)
    suffix, filters, runs = settings["suffix"], dict(settings["filters"]), settings["runs"]
    excluded = {bids_label(s, "sub") for s in settings["exclude_subjects"]}
    sessions: dict[tuple[str, str], list[dict]] = {}
    for image in nifti_images(root, suffix, filters):
        sessions.setdefault((image["subject"], image.get("session") or ""), []).append(image)
    for image in sourcedata_series(root, suffix, filters):
        key = (image["subject"], image.get("session") or "")
        if not any(not item["path"].is_dir() for item in sessions.get(key, [])):
            sessions.setdefault(key, []).append(image)
    rows = []
    for (subject, _), images in sorted(sessions.items()):
        if subject in excluded:
            continue
        for image in chosen_images(images, runs):
            scan, subject_key, session = image_scan_key(image, runs)
            rows.append(scan_row(scan, subject_key, session, image["path"], None))
    without = sorted(s for s in subject_folders(root) - {row["subject"][4:] for row in rows} if s not in excluded)
    if without:
        raise MissingScanError(
            f"{len(without)} subject(s) of the BIDS dataset {root} have no {suffix} image"
            + (f" matching datasets.bids.filters {filters}" if filters else "")
            + f": {', '.join(str(root / f'sub-{s}') for s in without[:5])}. Add the image, or leave the subject out "
            f"with datasets.bids.exclude_subjects: [{', '.join(f'sub-{s}' for s in without[:5])}]"
        )
    return rows


def subject_folders(root: Path) -> set[str]:
    """Return the labels of the ``sub-<label>`` folders at the dataset root."""
    return {path.name[4:] for path in root.glob("sub-*") if path.is_dir() and re.fullmatch(r"sub-[A-Za-z0-9]+",
                                                                                           path.name)}


def read_bids_participants(path: Path) -> pd.DataFrame:
    """Return participants.tsv normalised: ``participant_id`` as ``subject`` (``sub-<label>``), sex M/F, age."""
    table = pd.read_csv(path, sep="\t", dtype={"participant_id": str}, na_values=["n/a"])
    if "participant_id" not in table.columns:
        raise DemographicsError(f"{path} has no participant_id column; BIDS requires one (sub-<label> per row)")
    out = pd.DataFrame({
        "subject": ["sub-" + bids_label(value, "sub") for value in table["participant_id"]],
        "site": table["site"] if "site" in table.columns else pd.NA,
        "age": pd.to_numeric(table["age"], errors="coerce") if "age" in table.columns else pd.NA,
        "sex": sex_from_letters(table["sex"]) if "sex" in table.columns else pd.NA,
    })
    return pd.concat([out, extra_columns(table, ["participant_id", "site", "age", "sex"])], axis=1)


def read_sessions_tables(root: Path) -> pd.DataFrame:
    """Return every ``sub-<label>/sub-<label>_sessions.tsv`` as one table with ``subject`` and ``session``."""
    tables = []
    for path in sorted(root.glob("sub-*/sub-*_sessions.tsv")):
        table = pd.read_csv(path, sep="\t", dtype={"session_id": str}, na_values=["n/a"])
        if "session_id" not in table.columns:
            continue
        table.columns = [c if c == "session_id" else c.strip().lower() for c in table.columns]
        tables.append(table.assign(subject=path.parent.name,
                                   session=["ses-" + bids_label(v, "ses") for v in table["session_id"]]))
    return pd.concat(tables, ignore_index=True).drop(columns="session_id") if tables else pd.DataFrame()


def bids_participants(root: Path, scans: pd.DataFrame) -> pd.DataFrame:
    """Return the participants of the scans: participants.tsv per subject, sessions.tsv values per visit."""
    root = Path(root)
    path = root / "participants.tsv"
    if not path.exists():
        return with_scanned_subjects(pd.DataFrame(columns=COLUMNS), scans)
    table = sheet_participants(scan_sessions(scans), read_bids_participants(path), ["subject"], path, "bids")
    sessions = read_sessions_tables(root)
    if sessions.empty:
        return table
    keyed = table.assign(session=table["session"].fillna(""))
    merged = keyed.merge(sessions, on=["subject", "session"], how="left", suffixes=("", "_session"))
    if "age_session" in merged.columns:  # the age at the visit beats the age in participants.tsv
        visit_age = pd.to_numeric(merged.pop("age_session"), errors="coerce")
        merged["age"] = visit_age.fillna(pd.to_numeric(merged["age"], errors="coerce"))
    merged["session"] = merged["session"].replace("", pd.NA)
    return merged


class Bids(FolderSource):
    name = "bids"
    layout = "a BIDS dataset: dataset_description.json and sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]"
    local_dir_means = "the BIDS root, holding dataset_description.json"
    defaults = {"stratify": None, "probe_target": "sex", "skull_strip": "none"}
    attribution_html = """\
<p>This run uses a BIDS dataset supplied by the user (<code>dataset.local_dir</code>). Cite it as its
<code>dataset_description.json</code> asks (<code>Authors</code>, <code>HowToAcknowledge</code>,
<code>ReferencesAndLinks</code>, <code>DatasetDOI</code>) and respect its <code>License</code>.</p>
"""

    def discovery_settings(self, config: dict) -> dict:
        return {"local_dir": config["dataset"]["local_dir"], **config["datasets"]["bids"]}

    def find_rows(self, raw_root: Path, settings: dict) -> list[dict]:
        return bids_rows(raw_root, settings)

    def participants(self, raw_root: Path, settings: dict, scans: pd.DataFrame) -> pd.DataFrame:
        return bids_participants(raw_root, scans)


SOURCE = Bids()
