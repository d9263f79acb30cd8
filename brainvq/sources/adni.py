"""ADNI (https://adni.loni.usc.edu): a LONI IDA download (``dataset.source: adni``), used under the ADNI Data Use
Agreement (``datasets.adni.accept_terms``). ``dataset.local_dir`` is the folder holding ``ADNI/`` (or ``ADNI/``).

The download layout is ``ADNI/<site>_S_<rid>/<description>/<date>_<time>/<image folder>/`` holding one NIfTI
file (``ADNI_<site>_S_<rid>_MR_<description>_..._I<image id>.nii``) or a DICOM series. The subject is
``<site>_S_<rid>``; each visit (scan date) is a session, so the split keeps a subject's visits together.

Which image a visit uses (the documented rule): the images whose description folder matches
``datasets.adni.description`` (a regular expression; null = any) are ordered by acquisition time, then image
id; ``images_per_visit: first`` (the default) keeps the earliest, the scheduled scan (a repeat such as
``MPRAGE_Repeat`` is acquired after it); ``all`` keeps each as its own scan (key ``<subject>_<date>_<image id>``).

Demographics (optional, ``datasets.adni.demographics``): ADNIMERGE.csv (one row per clinical visit, matched to
the nearest exam date within ``visit_window_days``; age at the scan from the baseline age) or the collection CSV
that IDA exports with a download (one row per image, matched by subject and acquisition date).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from brainvq.acquire import TermsNotAcceptedError
from brainvq.demographics import (
    COLUMNS,
    DemographicsError,
    extra_columns,
    read_sheet,
    scan_sessions,
    sex_from_letters,
    sheet_participants,
    with_scanned_subjects,
)
from brainvq.io import scan_row
from brainvq.sources import FolderSource

ADNI_SUBJECT = re.compile(r"\d{3}_S_\d{4}")
ADNI_ACQUISITION = re.compile(r"(?P<date>\d{4}-\d{2}-\d{2})_\d{2}_\d{2}_\d{2}(?:\.\d+)?")
ADNI_IMAGE_ID = re.compile(r"_(I\d+)\.(?:nii|nii\.gz|dcm)$", re.IGNORECASE)
ADNIMERGE_COLUMNS = ["PTID", "EXAMDATE", "AGE", "PTGENDER", "VISCODE"]
COLLECTION_COLUMNS = ["Image Data ID", "Subject", "Sex", "Age", "Acq Date"]

ADNI_ACKNOWLEDGEMENT = (
    "Data used in preparation of this article were obtained from the Alzheimer's Disease Neuroimaging Initiative\n"
    "(ADNI) database (adni.loni.usc.edu). As such, the investigators within the ADNI contributed to the design and\n"
    "implementation of ADNI and/or provided data but did not participate in analysis or writing of this report.\n"
    "A complete listing of ADNI investigators can be found at:\n"
    "http://adni.loni.usc.edu/wp-content/uploads/how_to_apply/ADNI_Acknowledgement_List.pdf"
)


def adni_folder(raw_root: Path) -> Path:
    """Return the ``ADNI`` folder of a download: ``raw_root/ADNI``, or ``raw_root`` itself."""
    return raw_root / "ADNI" if (raw_root / "ADNI").is_dir() else raw_root


def image_volume(image_dir: Path) -> tuple[Path, str]:
    """Return (the volume, its image id) of one image folder: its NIfTI file, else the folder (a DICOM series).

    The image id ``I<number>`` ends LONI's file names; without one, the folder's name stands in. A folder
    holding neither NIfTI nor DICOM is returned as a series, so validation names it (no readable DICOM series).
    """
    files = sorted(path for path in image_dir.iterdir() if path.is_file() and not path.name.startswith("."))
    niftis = [path for path in files if path.name.lower().endswith((".nii", ".nii.gz"))]
    named = [ADNI_IMAGE_ID.search(path.name) for path in niftis or files]
    image_id = next((match.group(1) for match in named if match), image_dir.name)
    return (niftis[0] if niftis else image_dir), image_id


def adni_images(raw_root: Path, description: str | None) -> list[dict]:
    """Return every image of the download: subject, visit date, acquisition folder, image id and volume path."""
    pattern = re.compile(description) if description else None
    images = []
    root = adni_folder(Path(raw_root))
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and ADNI_SUBJECT.fullmatch(p.name)):
        for description_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
            if pattern and not pattern.search(description_dir.name):
                continue
            for when_dir in sorted(p for p in description_dir.iterdir() if p.is_dir()):
                acquired = ADNI_ACQUISITION.fullmatch(when_dir.name)
                if not acquired:
                    continue
                for image_dir in sorted(p for p in when_dir.iterdir() if p.is_dir()):
                    path, image_id = image_volume(image_dir)
                    images.append({"subject": subject_dir.name, "session": acquired["date"], "time": when_dir.name,
                                   "image_id": image_id, "path": path})
    return images


def adni_rows(raw_root: Path, description: str | None, images_per_visit: str) -> list[dict]:
    """Return one row per scan: per visit the earliest image (``first``) or every image (``all``)."""
    visits: dict[tuple[str, str], list[dict]] = {}
    for image in adni_images(raw_root, description):
        visits.setdefault((image["subject"], image["session"]), []).append(image)
    rows = []
    for (subject, session), images in sorted(visits.items()):
        ordered = sorted(images, key=lambda image: (image["time"], image["image_id"]))
        for image in ordered[:1] if images_per_visit == "first" else ordered:
            scan = f"{subject}_{session}" + (f"_{image['image_id']}" if images_per_visit == "all" else "")
            rows.append(scan_row(scan, subject, session, image["path"], None))
    return rows


def iso_dates(values: pd.Series) -> pd.Series:
    """Return dates as 'YYYY-MM-DD' strings from ISO or US (M/D/YYYY) text; unreadable ones missing."""
    text = values.astype("string").str.strip()
    us = pd.to_datetime(text, format="%m/%d/%Y", errors="coerce")
    iso = pd.to_datetime(text, format="%Y-%m-%d", errors="coerce")
    return us.fillna(iso).dt.strftime("%Y-%m-%d")


def normalise_collection(table: pd.DataFrame) -> pd.DataFrame:
    """Return an IDA collection CSV (one row per image) as one row per (subject, acquisition date)."""
    out = pd.DataFrame({
        "subject": table["Subject"].astype(str).str.strip(),
        "session": iso_dates(table["Acq Date"]),
        "age": pd.to_numeric(table["Age"], errors="coerce"),
        "sex": sex_from_letters(table["Sex"]),
        "site": table["Subject"].astype(str).str[:3],
    })
    out = pd.concat([out, extra_columns(table, COLLECTION_COLUMNS + ["Modality", "Format", "Downloaded"])], axis=1)
    return out.drop_duplicates(["subject", "session"]).reset_index(drop=True)


def adnimerge_visits(table: pd.DataFrame, wanted: pd.DataFrame, window_days: float) -> pd.DataFrame:
    """Return, for each scanned (subject, session date), the ADNIMERGE visit with the nearest EXAMDATE within
    ``window_days``; ``age`` is the baseline AGE plus the years from the baseline exam to the scan."""
    table = table.assign(subject=table["PTID"].astype(str).str.strip(),
                         exam=pd.to_datetime(iso_dates(table["EXAMDATE"]), errors="coerce"))
    extras = extra_columns(table.drop(columns=["subject", "exam"]), ["PTID", "EXAMDATE", "AGE", "PTGENDER"])
    rows = []
    for subject, session in wanted[["subject", "session"]].itertuples(index=False):
        visits = table[table["subject"] == subject]
        scanned = pd.to_datetime(session, errors="coerce")
        if visits.empty or pd.isna(scanned):
            continue
        gaps = (visits["exam"] - scanned).abs().dt.days
        if gaps.isna().all() or gaps.min() > window_days:
            continue
        nearest = gaps.idxmin()
        baseline = visits.loc[visits["exam"].idxmin()]
        age = float(pd.to_numeric(pd.Series([baseline["AGE"]]), errors="coerce")[0])
        rows.append({"subject": subject, "session": session,
                     "age": age + (scanned - baseline["exam"]).days / 365.25 if np.isfinite(age) else np.nan,
                     "sex": sex_from_letters(pd.Series([visits.loc[nearest, "PTGENDER"]]))[0],
                     "site": visits.loc[nearest, "SITE"] if "SITE" in visits.columns else pd.NA,
                     **extras.loc[nearest].drop(labels=["site"], errors="ignore").to_dict()})
    return pd.DataFrame(rows, columns=["subject", "session", "age", "sex", "site"] + [
        c for c in extras.columns if c != "site"])


def adni_participants(raw_root: Path, settings: dict, scans: pd.DataFrame) -> pd.DataFrame:
    """Return one row per scanned visit, from ``datasets.adni.demographics`` (ADNIMERGE or a collection CSV).

    Raises:
        DemographicsError: the sheet is missing, or has neither layout's columns.
    """
    if not settings.get("demographics"):
        return with_scanned_subjects(pd.DataFrame(columns=COLUMNS), scans)
    path = Path(settings["demographics"])
    path = path if path.is_absolute() else Path(raw_root) / path
    table = read_sheet(path)
    wanted = scan_sessions(scans)
    if set(ADNIMERGE_COLUMNS) <= set(table.columns):
        sheet = adnimerge_visits(table, wanted, settings["visit_window_days"])
    elif set(COLLECTION_COLUMNS) <= set(table.columns):
        sheet = normalise_collection(table)
    else:
        raise DemographicsError(
            f"{path} is neither ADNIMERGE (columns {ADNIMERGE_COLUMNS}) nor an IDA collection CSV (columns "
            f"{COLLECTION_COLUMNS}); it has {list(table.columns)[:12]}. Fix datasets.adni.demographics"
        )
    return sheet_participants(wanted, sheet, ["subject", "session"], path, "adni")


class Adni(FolderSource):
    name = "adni"
    layout = "ADNI/<site>_S_<rid>/<description>/<date>_<time>/<image id>/ folders holding a NIfTI file or DICOM series"
    local_dir_means = "the folder holding the ADNI/ folder of the download"
    defaults = {"stratify": None, "probe_target": "sex", "skull_strip": "none"}
    terms = (
        "ADNI (Alzheimer's Disease Neuroimaging Initiative), https://adni.loni.usc.edu, data from the LONI IDA.\n"
        "Use requires an approved application and agreeing to the ADNI Data Use Agreement: use for scientific\n"
        "investigation only, no attempt to identify participants, no redistribution of the data (share derived\n"
        "data only as the agreement allows), manuscripts sent to the ADNI Data and Publications Committee, and\n"
        "this acknowledgement and the ADNI funding statement in every publication:\n" + ADNI_ACKNOWLEDGEMENT
    )
    attribution_html = """\
<p>This run uses data from the <a href="https://adni.loni.usc.edu">Alzheimer's Disease Neuroimaging Initiative
(ADNI)</a>, under the ADNI Data Use Agreement. "Data used in preparation of this article were obtained from the
Alzheimer's Disease Neuroimaging Initiative (ADNI) database (adni.loni.usc.edu). As such, the investigators within the
ADNI contributed to the design and implementation of ADNI and/or provided data but did not participate in analysis or
writing of this report. A complete listing of ADNI investigators can be found at:
<a href="http://adni.loni.usc.edu/wp-content/uploads/how_to_apply/ADNI_Acknowledgement_List.pdf"
>ADNI_Acknowledgement_List.pdf</a>."
Publications must also carry the ADNI funding statement; the data may not be redistributed.</p>
"""

    def discovery_settings(self, config: dict) -> dict:
        section = config["datasets"]["adni"]
        return {"local_dir": config["dataset"]["local_dir"],
                **{key: section[key] for key in ("description", "images_per_visit", "demographics",
                                                  "visit_window_days")}}

    def find_rows(self, raw_root: Path, settings: dict) -> list[dict]:
        return adni_rows(raw_root, settings["description"], settings["images_per_visit"])

    def participants(self, raw_root: Path, settings: dict, scans: pd.DataFrame) -> pd.DataFrame:
        return adni_participants(raw_root, settings, scans)

    def require_terms(self, config: dict) -> None:
        """Raise TermsNotAcceptedError unless ``datasets.adni.accept_terms`` is true."""
        if config.get("datasets", {}).get("adni", {}).get("accept_terms", False) is True:
            return
        raise TermsNotAcceptedError(
            "adni may only be used under the ADNI Data Use Agreement.\n\n"
            f"{self.terms}\n\n"
            "If you have agreed to it, add these lines to your config file:\n"
            "datasets:\n  adni:\n    accept_terms: true\n"
        )


SOURCE = Adni()
