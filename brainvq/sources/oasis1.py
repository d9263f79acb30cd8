"""OASIS-1 (https://sites.wustl.edu/oasisbrains/): cross-sectional, 416 subjects in 12 disc archives.

Session folders ``OAS1_####_MR#`` (MR2 = same-day rescans) hold big-endian Analyze images: the raw
MPRAGE, the atlas-registered ``SUBJ_111`` and the brain-masked ``T88_111``. Use requires the OASIS
Data Use Agreement (``datasets.oasis.accept_terms``). Settings: ``datasets.oasis1`` in config/schema.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from brainvq.acquire import TermsNotAcceptedError, section_files
from brainvq.demographics import (
    DemographicsError,
    extra_columns,
    read_sheet,
    require_columns,
    scan_sessions,
    sex_from_letters,
    sheet_participants,
)
from brainvq.io import scan_row, session_folders
from brainvq.sources import Source

OASIS1_SESSION = re.compile(r"(OAS1_\d{4})_(MR\d)")
# For each datasets.oasis1.image: (folder inside the session, glob of the file, conventional name suffix).
OASIS1_IMAGES = {
    "raw_mpr1": ("RAW", "*_mpr-1_anon.hdr", "_mpr-1_anon.hdr"),
    "subj111": ("PROCESSED/MPRAGE/SUBJ_111", "*_sbj_111.hdr", "_mpr_n4_anon_sbj_111.hdr"),
    "t88_masked": ("PROCESSED/MPRAGE/T88_111", "*_t88_masked_gfc.hdr", "_mpr_n4_anon_111_t88_masked_gfc.hdr"),
}
OASIS_ACKNOWLEDGEMENT = (
    "Principal Investigators: D. Marcus, R. Buckner,\n"
    "J. Csernansky, J. Morris; P50 AG05681, P01 AG03991, P01 AG026276, R01 AG021910, P20 MH071616,\n"
    "U24 RR021382."
)


def oasis_acknowledgement_html(study: str) -> str:
    """Return the report paragraph acknowledging an OASIS ``study`` (e.g. 'OASIS-2: Longitudinal') and its terms."""
    return f"""\
<p>Acknowledgement: "Data were provided by {study}: Principal Investigators: D. Marcus,
R. Buckner, J. Csernansky, J. Morris; P50 AG05681, P01 AG03991, P01 AG026276, R01 AG021910, P20 MH071616,
U24 RR021382." Use of OASIS data is subject to the
<a href="https://sites.wustl.edu/oasisbrains/">OASIS Data Use Agreement</a>: no attempt to identify participants,
no redistribution of the data, and citation of the papers above in any publication.</p>
"""


def oasis1_image_path(session_dir: Path, image: str) -> Path:
    """Return the selected image of an OASIS-1 session (its conventional name when none is there)."""
    folder, pattern, suffix = OASIS1_IMAGES[image]
    matches = sorted((session_dir / folder).glob(pattern))
    return matches[0] if matches else session_dir / folder / f"{session_dir.name}{suffix}"


def oasis1_rows(raw_root: Path, image: str, orientation: str, include_mr2: bool) -> list[dict]:
    """Return rows for OASIS-1 sessions; MR2 (same-day rescans) only with ``include_mr2``."""
    rows = []
    for session_dir in session_folders(raw_root, OASIS1_SESSION):
        subject, session = OASIS1_SESSION.fullmatch(session_dir.name).groups()
        if session != "MR1" and not include_mr2:
            continue
        path = oasis1_image_path(session_dir, image)
        rows.append(scan_row(session_dir.name, subject, session, path, orientation))
    return rows


def oasis_columns(parts: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The normalised columns of an OASIS sheet whose IDs were split into ``subject`` and ``session``."""
    return pd.DataFrame(
        {
            "subject": parts["subject"],
            "session": parts["session"],
            "site": pd.NA,
            "age": pd.to_numeric(table["Age"], errors="coerce"),
            "sex": sex_from_letters(table["M/F"]),
        }
    )


def normalise_oasis1(path: str | Path) -> pd.DataFrame:
    """Return the normalised OASIS-1 sheet (``oasis_cross-sectional`` .csv or .xlsx).

    ``ID`` ``OAS1_0001_MR1`` becomes subject ``OAS1_0001``, session ``MR1``; extras include
    ``hand, educ, ses, mmse, cdr, etiv, nwbv, asf, delay``.
    """
    path = Path(path)
    table = read_sheet(path)
    require_columns(table, path, ["ID", "M/F", "Age", "MMSE", "CDR"])
    parts = table["ID"].astype(str).str.strip().str.extract(r"^(?P<subject>OAS1_\d{4})_(?P<session>MR\d+)$")
    if parts["subject"].isna().any():
        bad = table.loc[parts["subject"].isna(), "ID"].tolist()[:5]
        raise DemographicsError(f"{path}: IDs {bad} are not of the form OAS1_####_MR#; is this the OASIS-1 sheet?")
    out = oasis_columns(parts, table)
    return pd.concat([out, extra_columns(table, ["ID", "M/F", "Age"])], axis=1).reset_index(drop=True)


class OasisSource(Source):
    """What the OASIS studies share: a download, the OASIS Data Use Agreement, one sheet row per visit."""

    kind = "download"
    defaults = {"stratify": None, "probe_target": "cdr>0", "skull_strip": "none"}

    def normalise_sheet(self, path: Path) -> pd.DataFrame:
        """Return the study's demographics sheet at ``path``, normalised (one row per visit)."""
        raise NotImplementedError

    def participants(self, raw_root: Path, settings: dict, scans: pd.DataFrame) -> pd.DataFrame:
        """One row per scanned visit, with the age at that visit."""
        path = Path(raw_root) / settings["demographics_file"]
        return sheet_participants(scan_sessions(scans), self.normalise_sheet(path), ["subject", "session"], path,
                                  self.name)

    def require_terms(self, config: dict) -> None:
        """Raise TermsNotAcceptedError unless ``datasets.oasis.accept_terms`` is true."""
        if config.get("datasets", {}).get("oasis", {}).get("accept_terms", False) is True:
            return
        raise TermsNotAcceptedError(
            f"{self.name} may only be used after agreeing to the OASIS Data Use Agreement.\n\n"
            f"{self.terms}\n\n"
            f"If you agree, add these lines to your config file (e.g. config/{self.name}.yaml):\n"
            "datasets:\n  oasis:\n    accept_terms: true\n"
        )


class Oasis1(OasisSource):
    name = "oasis1"
    layout = "OAS1_####_MR# session folders (possibly inside disc folders)"
    terms = (
        "OASIS-1 (Open Access Series of Imaging Studies, cross-sectional), https://sites.wustl.edu/oasisbrains/.\n"
        "Use requires agreeing to the OASIS Data Use Agreement: research/education use, no attempt to\n"
        "identify participants, no redistribution of the data, and acknowledgement in publications.\n"
        "Cite: Marcus DS, Wang TH, Parker J, Csernansky JG, Morris JC, Buckner RL (2007). Open Access Series\n"
        "of Imaging Studies (OASIS): cross-sectional MRI data in young, middle aged, nondemented, and\n"
        "demented older adults. J Cogn Neurosci 19(9):1498-1507. doi:10.1162/jocn.2007.19.9.1498\n"
        "Acknowledge: OASIS-1: Cross-Sectional: " + OASIS_ACKNOWLEDGEMENT
    )
    attribution_html = """\
<p>This run uses <a href="https://sites.wustl.edu/oasisbrains/">OASIS-1</a> (Cross-Sectional). Cite:
Marcus DS, Wang TH, Parker J, Csernansky JG, Morris JC, Buckner RL. Open Access Series of Imaging Studies (OASIS):
cross-sectional MRI data in young, middle aged, nondemented, and demented older adults.
<em>J Cogn Neurosci</em> 2007;19(9):1498–1507,
<a href="https://doi.org/10.1162/jocn.2007.19.9.1498">doi:10.1162/jocn.2007.19.9.1498</a>.</p>
""" + oasis_acknowledgement_html("OASIS-1: Cross-Sectional")

    def discovery_settings(self, config: dict) -> dict:
        # Only the selection keys: editing a mirror URL or checksum must not redo discovery.
        section = config["datasets"]["oasis1"]
        return {key: section[key] for key in ("image", "include_mr2", "orientation", "demographics_file")}

    def find_rows(self, raw_root: Path, settings: dict) -> list[dict]:
        image = settings["image"]
        return oasis1_rows(raw_root, image, settings["orientation"][image], settings["include_mr2"])

    def normalise_sheet(self, path: Path) -> pd.DataFrame:
        return normalise_oasis1(path)

    def download_plan(self, config: dict) -> list:
        section = config["datasets"]["oasis1"]
        urls = [section["archive_url"].format(disc=disc) for disc in section["discs"]]
        return section_files(section, urls, config["download"]["base_url"])


SOURCE = Oasis1()
