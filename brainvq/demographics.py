"""Participants tables: reading demographics sheets and matching them to the discovered scans.

Every table has ``subject, session, site, age, sex`` (sex ``M``/``F``, age in years) followed by the
source's other columns with lower-case snake_case names (``cdr``, ``mmse``, ``educ``, ...). Each
source's own sheet conventions live in its module in ``brainvq/sources/``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

COLUMNS = ["subject", "session", "site", "age", "sex"]


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


def require_columns(table: pd.DataFrame, path: Path, required: list[str]) -> None:
    """Raise DemographicsError naming ``path`` and the ``required`` columns that ``table`` lacks."""
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DemographicsError(
            f"{path} lacks the column(s) {missing} (it has {list(table.columns)}); is this the right "
            "demographics file for the dataset? Delete it and re-run to download it again."
        )


def extra_columns(table: pd.DataFrame, used: list[str]) -> pd.DataFrame:
    """Return the columns of ``table`` not in ``used``, named in snake_case, without the normalised ones."""
    rest = table[[c for c in table.columns if c not in used]].copy()
    rest.columns = [snake_case(c) for c in rest.columns]
    return rest.loc[:, [c for c in rest.columns if c and c not in COLUMNS]]


def sex_from_letters(values: pd.Series) -> pd.Series:
    """Return ``M``/``F`` from values such as 'M', 'female' (anything else missing)."""
    letters = values.astype("string").str.strip().str.upper().str[:1]
    return letters.where(letters.isin(["M", "F"]), pd.NA)


def _session_key(values: pd.Series) -> pd.Series:
    return values.astype("string").fillna("").str.strip()


def scan_sessions(scans: pd.DataFrame) -> pd.DataFrame:
    """Return the ``subject`` and ``session`` ('' when none) of each discovered scan."""
    sessions = scans["session"] if "session" in scans else pd.Series([""] * len(scans))
    return pd.DataFrame(
        {"subject": scans["subject"].astype(str).to_numpy(), "session": _session_key(sessions).to_numpy()}
    )


def sheet_participants(
    wanted: pd.DataFrame,
    sheet: pd.DataFrame,
    on: list[str],
    path: Path,
    source: str,
    duplicates: list[str] | None = None,
) -> pd.DataFrame:
    """Return the participants of the discovered scans from a normalised demographics sheet.

    Args:
        wanted: ``scan_sessions`` of the scans (plus any column known from the scans, e.g. ``site``).
        sheet: the normalised sheet, without the columns ``wanted`` already has other than ``on``.
        on: the columns that match a sheet row to a scan (``subject``, and ``session`` for visits).
        path: the sheet's file, for the log; source: the source's name, for the log.
        duplicates: subjects repeated in the sheet, kept in ``table.attrs["duplicate_subjects"]``.

    Returns:
        One row per (subject, session) of ``wanted``; rows of the sheet without a scan are dropped,
        scans without a row get empty values.
    """
    if "session" in on:
        sheet = sheet.assign(session=_session_key(sheet["session"]))
    table = wanted.drop_duplicates(["subject", "session"]).merge(sheet, on=on, how="left")
    table["session"] = table["session"].replace("", pd.NA)
    table = table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]
    table = table.sort_values(["subject", "session"], na_position="first").reset_index(drop=True)
    table.attrs["duplicate_subjects"] = list(duplicates or [])
    without = int(table["age"].isna().sum())
    if without:
        log.warning("%s: %d of %d scanned subjects/sessions have no age in %s", source, without, len(table), path)
    return table


def with_scanned_subjects(table: pd.DataFrame, scans: pd.DataFrame) -> pd.DataFrame:
    """Return ``table`` with an empty row added for each subject of ``scans`` it does not list."""
    known = set(table["subject"].astype(str))
    missing = sorted(set(scans["subject"].astype(str)) - known)
    if missing:
        table = pd.concat([table, pd.DataFrame({"subject": missing})], ignore_index=True)
    return table.reset_index(drop=True)
