"""IXI (https://brain-development.org/ixi-dataset/): 581 T1 NIfTI volumes from three London sites, CC BY-SA 3.0.

Files ``IXI###-<site>-####-T1.nii.gz`` (one scan per subject, scan = subject = ``IXI###``) in one tar,
demographics in ``IXI.xls``. Settings: ``datasets.ixi`` (URLs, checksums) in config/schema.yaml.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from brainvq.acquire import section_files
from brainvq.demographics import extra_columns, read_sheet, require_columns, scan_sessions, sheet_participants
from brainvq.io import scan_row, visible_files
from brainvq.sources import Source

log = logging.getLogger(__name__)

IXI_NAME = re.compile(r"(IXI\d{3})-(?:Guys|HH|IOP)-\d{4}-T1\.nii\.gz")
# IXI###-<site>-####-T1.nii.gz: the acquisition site is only in the file name, not in IXI.xls.
IXI_FILE_PATTERN = re.compile(r"IXI(?P<id>\d{3})-(?P<site>Guys|HH|IOP)-\d{4}")
IXI_SEX = {1: "M", 2: "F"}


def ixi_rows(raw_root: Path) -> list[dict]:
    """Return rows for IXI T1 files anywhere under ``raw_root``; scan = subject = 'IXI###'."""
    rows = []
    for path in visible_files(raw_root):
        match = IXI_NAME.fullmatch(path.name)
        if match:
            rows.append(scan_row(match.group(1), match.group(1), "", path, None))
    return rows


def _ixi_sex_column(table: pd.DataFrame) -> str | None:
    # The header is 'SEX_ID (1=m, 2=f)'; match its prefix so a reformatted header still works.
    return next((c for c in table.columns if c.upper().startswith("SEX_ID")), None)


def normalise_ixi(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Return (table, duplicated subjects) from IXI.xls.

    ``IXI_ID`` (an integer) becomes ``IXI###``; sex is ``SEX_ID`` 1=M, 2=F; ``site`` is left empty
    (it is in the image file names, see :func:`ixi_site`). Some IDs appear more than once, at times
    with different ages. Rule: keep the first row, in file order, that has an ``AGE``; if none has
    one, the first row. The duplicated subjects are returned and logged.
    """
    path = Path(path)
    table = read_sheet(path)
    sex_column = _ixi_sex_column(table)
    require_columns(table, path, ["IXI_ID", sex_column or "SEX_ID (1=m, 2=f)", "AGE"])
    ids = pd.to_numeric(table["IXI_ID"], errors="coerce")
    table = table.loc[ids.notna()].copy()
    ids = ids.loc[ids.notna()].astype(int)
    out = pd.DataFrame(
        {
            "subject": [f"IXI{i:03d}" for i in ids],
            "session": pd.NA,
            "site": pd.NA,
            "age": pd.to_numeric(table["AGE"], errors="coerce").to_numpy(),
            "sex": pd.to_numeric(table[sex_column], errors="coerce").map(IXI_SEX).to_numpy(),
        }
    )
    out = pd.concat([out, extra_columns(table, ["IXI_ID", sex_column, "AGE"]).reset_index(drop=True)], axis=1)
    duplicated = sorted(out.loc[out["subject"].duplicated(keep=False), "subject"].unique())
    if duplicated:
        log.warning(
            "%s: %d IXI_IDs appear more than once (%s); kept the first row with an AGE for each",
            path, len(duplicated), ", ".join(duplicated),
        )
        # Stable sort: rows with an age first, file order otherwise; then keep the first per subject.
        order = out["age"].isna().astype(int).sort_values(kind="stable").index
        out = out.loc[order].drop_duplicates("subject", keep="first").sort_index()
    return out.reset_index(drop=True), duplicated


def ixi_site(file_name: str) -> str | None:
    """Return the IXI site (Guys, HH, IOP) from an image file name, or None."""
    match = IXI_FILE_PATTERN.search(Path(str(file_name)).name)
    return match.group("site") if match else None


class Ixi(Source):
    name = "ixi"
    kind = "download"
    layout = "IXI###-{Guys,HH,IOP}-####-T1.nii.gz files"
    # Three scanners: keep each one's share the same in train and test.
    defaults = {"stratify": "site", "probe_target": "sex", "skull_strip": "none"}
    terms = (
        "IXI dataset (https://brain-development.org/ixi-dataset/), Imperial College London.\n"
        "Licence: Creative Commons Attribution-ShareAlike 3.0 Unported (CC BY-SA 3.0),\n"
        "https://creativecommons.org/licenses/by-sa/3.0/. Credit the IXI dataset and share derived data\n"
        "under the same licence."
    )
    attribution_html = """\
<p>This run uses the <a href="https://brain-development.org/ixi-dataset/">IXI dataset</a> (Information eXtraction
from Images, EPSRC GR/S21533/02; Imperial College London, Hammersmith Hospital, Guy's Hospital and the Institute of
Psychiatry), made available under the
<a href="https://creativecommons.org/licenses/by-sa/3.0/">Creative Commons CC BY-SA 3.0 licence</a>.
Derived data shared from this run must carry the same licence and this attribution.</p>
"""

    def discovery_settings(self, config: dict) -> dict:
        return {"demographics_file": config["datasets"]["ixi"]["demographics_file"]}

    def find_rows(self, raw_root: Path, settings: dict) -> list[dict]:
        return ixi_rows(raw_root)

    def participants(self, raw_root: Path, settings: dict, scans: pd.DataFrame) -> pd.DataFrame:
        """IXI.xls rows of the scanned subjects; the site comes from the scan file names (``path`` or ``scan``)."""
        path = Path(raw_root) / settings["demographics_file"]
        sheet, duplicates = normalise_ixi(path)
        wanted = scan_sessions(scans)
        names = scans["path"] if "path" in scans else scans.get("scan", scans["subject"])
        wanted["site"] = [ixi_site(name) for name in names.astype(str)]
        return sheet_participants(wanted, sheet.drop(columns=["session", "site"]), ["subject"], path, self.name,
                                  duplicates)

    def download_plan(self, config: dict) -> list:
        section = config["datasets"]["ixi"]
        return section_files(section, [section["archive_url"]], config["download"]["base_url"])


SOURCE = Ixi()
