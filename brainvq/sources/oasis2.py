"""OASIS-2 (https://sites.wustl.edu/oasisbrains/): longitudinal, 150 subjects and 373 visits in two archives.

Visit folders ``OAS2_####_MR#`` hold ``RAW/mpr-1.nifti.hdr`` (NIfTI pairs, some without a usable
orientation). Use requires the OASIS Data Use Agreement (``datasets.oasis.accept_terms``). Settings:
``datasets.oasis2`` in config/schema.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from brainvq.acquire import section_files
from brainvq.demographics import DemographicsError, extra_columns, read_sheet, require_columns
from brainvq.io import scan_row, session_folders
from brainvq.sources.oasis1 import OASIS_ACKNOWLEDGEMENT, OasisSource, oasis_acknowledgement_html, oasis_columns

OASIS2_SESSION = re.compile(r"(OAS2_\d{4})_(MR\d+)")
OASIS2_IMAGE = "RAW/mpr-1.nifti.hdr"


def oasis2_rows(raw_root: Path, sessions: str, orientation: str) -> list[dict]:
    """Return rows for OASIS-2 visits; ``sessions='baseline'`` keeps each subject's first visit."""
    visits = {}
    for session_dir in session_folders(raw_root, OASIS2_SESSION):
        subject, session = OASIS2_SESSION.fullmatch(session_dir.name).groups()
        visits.setdefault(subject, []).append((int(session[2:]), session, session_dir))
    rows = []
    for subject, found in sorted(visits.items()):
        found.sort()
        for _, session, session_dir in found[:1] if sessions == "baseline" else found:
            path = session_dir / OASIS2_IMAGE
            rows.append(scan_row(session_dir.name, subject, session, path, orientation))
    return rows


def normalise_oasis2(path: str | Path) -> pd.DataFrame:
    """Return the normalised OASIS-2 sheet (``oasis_longitudinal_demographics.xlsx``), one row per visit.

    ``MRI ID`` ``OAS2_0001_MR2`` gives subject ``OAS2_0001``, session ``MR2``; ``age`` is the age at
    that visit; extras include ``group, visit, mr_delay, cdr, mmse, educ, ses, etiv, nwbv, asf``.
    """
    path = Path(path)
    table = read_sheet(path)
    require_columns(table, path, ["Subject ID", "MRI ID", "Group", "Visit", "M/F", "Age", "MMSE", "CDR"])
    parts = table["MRI ID"].astype(str).str.strip().str.extract(r"^(?P<subject>OAS2_\d{4})_(?P<session>MR\d+)$")
    if parts["subject"].isna().any():
        bad = table.loc[parts["subject"].isna(), "MRI ID"].tolist()[:5]
        raise DemographicsError(f"{path}: MRI IDs {bad} are not of the form OAS2_####_MR#; is this the OASIS-2 sheet?")
    mismatch = parts["subject"] != table["Subject ID"].astype(str).str.strip()
    if mismatch.any():
        raise DemographicsError(
            f"{path}: 'Subject ID' and 'MRI ID' disagree in rows {list(table.index[mismatch][:5])}"
        )
    out = oasis_columns(parts, table)
    return pd.concat([out, extra_columns(table, ["Subject ID", "MRI ID", "M/F", "Age"])], axis=1).reset_index(drop=True)


class Oasis2(OasisSource):
    name = "oasis2"
    layout = "OAS2_####_MR#/RAW/mpr-1.nifti.hdr session folders"
    terms = (
        "OASIS-2 (Open Access Series of Imaging Studies, longitudinal), https://sites.wustl.edu/oasisbrains/.\n"
        "Use requires agreeing to the OASIS Data Use Agreement: research/education use, no attempt to\n"
        "identify participants, no redistribution of the data, and acknowledgement in publications.\n"
        "Cite: Marcus DS, Fotenos AF, Csernansky JG, Morris JC, Buckner RL (2010). Open Access Series of\n"
        "Imaging Studies: longitudinal MRI data in nondemented and demented older adults.\n"
        "J Cogn Neurosci 22(12):2677-2684. doi:10.1162/jocn.2009.21407\n"
        "Acknowledge: OASIS-2: Longitudinal: " + OASIS_ACKNOWLEDGEMENT
    )
    attribution_html = """\
<p>This run uses <a href="https://sites.wustl.edu/oasisbrains/">OASIS-2</a> (Longitudinal). Cite:
Marcus DS, Fotenos AF, Csernansky JG, Morris JC, Buckner RL. Open Access Series of Imaging Studies: longitudinal
MRI data in nondemented and demented older adults. <em>J Cogn Neurosci</em> 2010;22(12):2677–2684,
<a href="https://doi.org/10.1162/jocn.2009.21407">doi:10.1162/jocn.2009.21407</a>.</p>
""" + oasis_acknowledgement_html("OASIS-2: Longitudinal")

    def discovery_settings(self, config: dict) -> dict:
        # Only the selection keys: editing a mirror URL or checksum must not redo discovery.
        section = config["datasets"]["oasis2"]
        return {key: section[key] for key in ("sessions", "orientation", "demographics_file")}

    def find_rows(self, raw_root: Path, settings: dict) -> list[dict]:
        return oasis2_rows(raw_root, settings["sessions"], settings["orientation"])

    def normalise_sheet(self, path: Path) -> pd.DataFrame:
        return normalise_oasis2(path)

    def download_plan(self, config: dict) -> list:
        section = config["datasets"]["oasis2"]
        urls = [section["archive_url"].format(part=part) for part in section["parts"]]
        return section_files(section, urls, config["download"]["base_url"])


SOURCE = Oasis2()
