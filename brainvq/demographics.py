"""Participants tables: each source's demographics normalised to one set of columns.

Every table has ``subject, session, site, age, sex`` (sex ``M``/``F``, age in years) followed by the
source's other columns with lower-case snake_case names (``cdr``, ``mmse``, ``educ``, ...).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

COLUMNS = ["subject", "session", "site", "age", "sex"]
# IXI###-<site>-####-T1.nii.gz: the acquisition site is only in the file name, not in IXI.xls.
IXI_FILE_PATTERN = re.compile(r"IXI(?P<id>\d{3})-(?P<site>Guys|HH|IOP)-\d{4}")
IXI_SEX = {1: "M", 2: "F"}
SOURCES_WITH_SHEETS = ("ixi", "oasis1", "oasis2")


class DemographicsError(ValueError):
    """A demographics file is missing, unreadable, or lacks a required column."""


def read_participants_tsv(path: str | Path) -> pd.DataFrame:
    """Return a participants.tsv with at least the normalised columns (missing ones filled empty)."""
    path = Path(path)
    if not path.exists():
        raise DemographicsError(f"participants file {path} does not exist; fix the path or remove the setting")
    table = pd.read_csv(path, sep="\t", dtype={"subject": str, "session": str})
    if "subject" not in table.columns:
        raise DemographicsError(f"{path} has no 'subject' column; add one (the subject IDs of the volumes)")
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = pd.NA
    return table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]


def snake_case(name: str) -> str:
    """Return a column name as lower-case snake_case (``'MR Delay'`` -> ``'mr_delay'``)."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")


def _read_xls(path: Path) -> pd.DataFrame:
    # xlrd directly: pandas' xlrd engine is deprecated, and xlrd is the reader of legacy .xls.
    import xlrd

    book = xlrd.open_workbook(str(path))
    sheet = book.sheet_by_index(0)
    if sheet.nrows == 0:
        return pd.DataFrame()
    header = [str(value).strip() for value in sheet.row_values(0)]
    rows = []
    for r in range(1, sheet.nrows):
        row = []
        for c, cell in enumerate(sheet.row(r)):
            if cell.ctype == xlrd.XL_CELL_DATE:
                row.append(xlrd.xldate_as_datetime(cell.value, book.datemode).date().isoformat())
            elif cell.ctype in (xlrd.XL_CELL_EMPTY, xlrd.XL_CELL_BLANK) or cell.value == "":
                row.append(None)
            else:
                row.append(cell.value)
        rows.append(row)
    return pd.DataFrame(rows, columns=header)


def read_sheet(path: str | Path) -> pd.DataFrame:
    """Return the first sheet of a .xls/.xlsx file or a .csv/.tsv as a DataFrame.

    Raises:
        DemographicsError: missing or unreadable file, naming it.
    """
    path = Path(path)
    if not path.exists():
        raise DemographicsError(f"demographics file {path} does not exist; re-run the extract rule or fix the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".xls":
            table = _read_xls(path)
        elif suffix in (".xlsx", ".xlsm"):
            table = pd.read_excel(path, engine="openpyxl")
        elif suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        else:
            raise DemographicsError(f"{path}: unknown demographics format {suffix!r}; use .xls, .xlsx or .csv")
    except DemographicsError:
        raise
    except Exception as error:
        raise DemographicsError(
            f"cannot read demographics file {path} ({type(error).__name__}: {error}); delete it and re-run to "
            "download it again"
        ) from error
    table.columns = [str(c).strip() for c in table.columns]
    return table.dropna(how="all").reset_index(drop=True)


def _require_columns(table: pd.DataFrame, path: Path, required: list[str]) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DemographicsError(
            f"{path} lacks the column(s) {missing} (it has {list(table.columns)}); is this the right "
            "demographics file for the dataset? Delete it and re-run to download it again."
        )


def _extras(table: pd.DataFrame, used: list[str]) -> pd.DataFrame:
    rest = table[[c for c in table.columns if c not in used]].copy()
    rest.columns = [snake_case(c) for c in rest.columns]
    return rest.loc[:, [c for c in rest.columns if c and c not in COLUMNS]]


def _sex_from_letters(values: pd.Series) -> pd.Series:
    letters = values.astype("string").str.strip().str.upper().str[:1]
    return letters.where(letters.isin(["M", "F"]), pd.NA)


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
    _require_columns(table, path, ["IXI_ID", sex_column or "SEX_ID (1=m, 2=f)", "AGE"])
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
    out = pd.concat([out, _extras(table, ["IXI_ID", sex_column, "AGE"]).reset_index(drop=True)], axis=1)
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


def _oasis_columns(parts: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The normalised columns of an OASIS sheet whose IDs were split into ``subject`` and ``session``."""
    return pd.DataFrame(
        {
            "subject": parts["subject"],
            "session": parts["session"],
            "site": pd.NA,
            "age": pd.to_numeric(table["Age"], errors="coerce"),
            "sex": _sex_from_letters(table["M/F"]),
        }
    )


def normalise_oasis1(path: str | Path) -> pd.DataFrame:
    """Return the normalised OASIS-1 sheet (``oasis_cross-sectional`` .csv or .xlsx).

    ``ID`` ``OAS1_0001_MR1`` becomes subject ``OAS1_0001``, session ``MR1``; extras include
    ``hand, educ, ses, mmse, cdr, etiv, nwbv, asf, delay``.
    """
    path = Path(path)
    table = read_sheet(path)
    _require_columns(table, path, ["ID", "M/F", "Age", "MMSE", "CDR"])
    parts = table["ID"].astype(str).str.strip().str.extract(r"^(?P<subject>OAS1_\d{4})_(?P<session>MR\d+)$")
    if parts["subject"].isna().any():
        bad = table.loc[parts["subject"].isna(), "ID"].tolist()[:5]
        raise DemographicsError(f"{path}: IDs {bad} are not of the form OAS1_####_MR#; is this the OASIS-1 sheet?")
    out = _oasis_columns(parts, table)
    return pd.concat([out, _extras(table, ["ID", "M/F", "Age"])], axis=1).reset_index(drop=True)


def normalise_oasis2(path: str | Path) -> pd.DataFrame:
    """Return the normalised OASIS-2 sheet (``oasis_longitudinal_demographics.xlsx``), one row per visit.

    ``MRI ID`` ``OAS2_0001_MR2`` gives subject ``OAS2_0001``, session ``MR2``; ``age`` is the age at
    that visit; extras include ``group, visit, mr_delay, cdr, mmse, educ, ses, etiv, nwbv, asf``.
    """
    path = Path(path)
    table = read_sheet(path)
    _require_columns(table, path, ["Subject ID", "MRI ID", "Group", "Visit", "M/F", "Age", "MMSE", "CDR"])
    parts = table["MRI ID"].astype(str).str.strip().str.extract(r"^(?P<subject>OAS2_\d{4})_(?P<session>MR\d+)$")
    if parts["subject"].isna().any():
        bad = table.loc[parts["subject"].isna(), "MRI ID"].tolist()[:5]
        raise DemographicsError(f"{path}: MRI IDs {bad} are not of the form OAS2_####_MR#; is this the OASIS-2 sheet?")
    mismatch = parts["subject"] != table["Subject ID"].astype(str).str.strip()
    if mismatch.any():
        raise DemographicsError(
            f"{path}: 'Subject ID' and 'MRI ID' disagree in rows {list(table.index[mismatch][:5])}"
        )
    out = _oasis_columns(parts, table)
    return pd.concat([out, _extras(table, ["Subject ID", "MRI ID", "M/F", "Age"])], axis=1).reset_index(drop=True)


def _session_key(values: pd.Series) -> pd.Series:
    return values.astype("string").fillna("").str.strip()


def dataset_participants(source: str, raw_root: str | Path, config: dict, scans: pd.DataFrame) -> pd.DataFrame:
    """Return the participants of the discovered ``scans`` of a downloaded dataset (ixi, oasis1, oasis2).

    One row per (subject, session) of ``scans``; rows of the sheet without a scan are dropped, scans
    without a row get empty values. The IXI site comes from the scan file names (``path`` or
    ``scan`` column). ``table.attrs["duplicate_subjects"]`` lists subjects repeated in the sheet.
    """
    path = Path(raw_root) / config["datasets"][source]["demographics_file"]
    duplicates: list[str] = []
    if source == "ixi":
        sheet, duplicates = normalise_ixi(path)
    elif source == "oasis1":
        sheet = normalise_oasis1(path)
    else:
        sheet = normalise_oasis2(path)
    sessions = scans["session"] if "session" in scans else pd.Series([""] * len(scans))
    wanted = pd.DataFrame(
        {"subject": scans["subject"].astype(str).to_numpy(), "session": _session_key(sessions).to_numpy()}
    )
    if source == "ixi":
        names = scans["path"] if "path" in scans else scans.get("scan", scans["subject"])
        wanted["site"] = [ixi_site(name) for name in names.astype(str)]
        sheet = sheet.drop(columns=["session", "site"])
        table = wanted.drop_duplicates(["subject", "session"]).merge(sheet, on="subject", how="left")
    else:
        sheet = sheet.assign(session=_session_key(sheet["session"]))
        table = wanted.drop_duplicates(["subject", "session"]).merge(sheet, on=["subject", "session"], how="left")
    table["session"] = table["session"].replace("", pd.NA)
    table = table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]
    table = table.sort_values(["subject", "session"], na_position="first").reset_index(drop=True)
    table.attrs["duplicate_subjects"] = duplicates
    without = int(table["age"].isna().sum())
    if without:
        log.warning("%s: %d of %d scanned subjects/sessions have no age in %s", source, without, len(table), path)
    return table


def participants_table(source: str, raw_root: str | Path, config: dict, scans: pd.DataFrame) -> pd.DataFrame:
    """Return the normalised participants table of a run.

    Args:
        source: ``dataset.source``.
        raw_root: the folder holding the raw volumes (and the demo's participants.tsv, or the
            downloaded dataset's demographics sheet).
        config: the validated config.
        scans: the discovered scans (``subject`` and ``session`` columns, ``path`` for IXI sites);
            subjects without demographics still get a row, with empty values.
    """
    raw_root = Path(raw_root)
    if source in SOURCES_WITH_SHEETS:
        return dataset_participants(source, raw_root, config, scans)
    if source == "demo":
        table = read_participants_tsv(raw_root / "participants.tsv")
    elif source == "local" and config["dataset"].get("participants"):
        table = read_participants_tsv(config["dataset"]["participants"])
    else:
        table = pd.DataFrame(columns=COLUMNS)
    known = set(table["subject"].astype(str))
    missing = sorted(set(scans["subject"].astype(str)) - known)
    if missing:
        table = pd.concat([table, pd.DataFrame({"subject": missing})], ignore_index=True)
    return table.reset_index(drop=True)
