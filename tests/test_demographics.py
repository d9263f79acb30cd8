"""Demographics of each source normalised to subject, session, site, age, sex + lower-case extras."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from brainvq.demographics import (
    COLUMNS,
    DemographicsError,
    ixi_site,
    normalise_ixi,
    normalise_oasis1,
    normalise_oasis2,
    participants_table,
)

CONFIG = {
    "dataset": {"participants": None},
    "datasets": {
        "ixi": {"demographics_file": "IXI.xls"},
        "oasis1": {"demographics_file": "oasis_cross-sectional.csv"},
        "oasis2": {"demographics_file": "oasis_longitudinal_demographics.xlsx"},
    },
}
IXI_HEADER = ["IXI_ID", "SEX_ID (1=m, 2=f)", "HEIGHT", "WEIGHT", "ETHNIC_ID", "DOB", "AGE"]


def write_xls(path: Path, header: list[str], rows: list[list]) -> Path:
    """A real legacy .xls (BIFF8), as IXI ships it; empty cells stay empty."""
    import xlwt

    book = xlwt.Workbook()
    sheet = book.add_sheet("Table")
    for c, value in enumerate(header):
        sheet.write(0, c, value)
    for r, row in enumerate(rows, start=1):
        for c, value in enumerate(row):
            if value is not None:
                sheet.write(r, c, value)
    book.save(str(path))
    return path


def ixi_xls(path: Path) -> Path:
    return write_xls(
        path,
        IXI_HEADER,
        [
            [2, 2, 164, 58, 1, "1970-01-30", 35.8],
            [12, 1, 175, 70, 1, "1966-08-20", 38.78],
            # IXI_ID 13 twice: the first row has no age, the second has one -> the second is kept.
            [13, 1, 182, 70, 1, None, None],
            [13, 1, 182, 70, 1, "1958-09-15", 46.71],
            # IXI_ID 14 twice with different ages -> the first (file order) is kept.
            [14, 2, 163, 65, 2, "1971-03-15", 34.24],
            [14, 2, 163, 65, 2, "1971-03-15", 35.1],
            [100, 2, None, None, 1, None, None],
        ],
    )


def test_ixi_ids_are_zero_padded_and_sex_is_decoded(tmp_path):
    table, _ = normalise_ixi(ixi_xls(tmp_path / "IXI.xls"))
    assert list(table.columns[:5]) == COLUMNS
    by_subject = table.set_index("subject")
    assert list(by_subject.index) == ["IXI002", "IXI012", "IXI013", "IXI014", "IXI100"]
    assert by_subject.loc["IXI002", "sex"] == "F" and by_subject.loc["IXI012", "sex"] == "M"
    assert by_subject.loc["IXI012", "age"] == pytest.approx(38.78)
    assert {"height", "weight", "ethnic_id", "dob"} <= set(table.columns)
    assert pd.isna(by_subject.loc["IXI100", "age"])


def test_ixi_duplicate_ids_keep_the_first_row_with_an_age_and_are_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        table, duplicates = normalise_ixi(ixi_xls(tmp_path / "IXI.xls"))
    assert duplicates == ["IXI013", "IXI014"]
    assert table["subject"].is_unique
    ages = table.set_index("subject")["age"]
    assert ages["IXI013"] == pytest.approx(46.71) and ages["IXI014"] == pytest.approx(34.24)
    assert "IXI013" in caplog.text and "IXI014" in caplog.text


def test_ixi_sheet_without_required_columns_names_the_file_and_the_columns(tmp_path):
    path = write_xls(tmp_path / "IXI.xls", ["IXI_ID", "HEIGHT"], [[2, 164]])
    with pytest.raises(DemographicsError, match=r"IXI\.xls.*SEX_ID.*AGE"):
        normalise_ixi(path)


def test_unreadable_sheet_names_the_file(tmp_path):
    path = tmp_path / "IXI.xls"
    path.write_bytes(b"<html>404 page from a proxy</html>")
    with pytest.raises(DemographicsError, match=r"IXI\.xls"):
        normalise_ixi(path)


def test_ixi_site_comes_from_the_image_file_name():
    assert ixi_site("/data/IXI002-Guys-0828-T1.nii.gz") == "Guys"
    assert ixi_site("IXI012-HH-1211-T1.nii.gz") == "HH"
    assert ixi_site("IXI035-IOP-0873-T1.nii.gz") == "IOP"
    assert ixi_site("sub-01_T1w.nii.gz") is None


def oasis1_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ID": ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0061_MR1", "OAS1_0061_MR2"],
            "M/F": ["F", "F", "M", "M"],
            "Hand": ["R"] * 4,
            "Age": [74, 55, 20, 20],
            "Educ": [2, 4, None, None],
            "SES": [3, 1, None, None],
            "MMSE": [29, 29, None, None],
            "CDR": [0, 0, None, None],
            "eTIV": [1344, 1147, 1500, 1502],
            "nWBV": [0.743, 0.81, 0.85, 0.85],
            "ASF": [1.306, 1.531, 1.17, 1.17],
            "Delay": [None, None, None, 3],
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_oasis1_ids_split_into_subject_and_session_with_lower_case_extras(tmp_path, suffix):
    path = tmp_path / f"oasis_cross-sectional{suffix}"
    (oasis1_frame().to_csv if suffix == ".csv" else oasis1_frame().to_excel)(path, index=False)
    table = normalise_oasis1(path)
    assert list(table.columns[:5]) == COLUMNS
    assert {"hand", "educ", "ses", "mmse", "cdr", "etiv", "nwbv", "asf", "delay"} <= set(table.columns)
    row = table.set_index(["subject", "session"]).loc[("OAS1_0001", "MR1")]
    assert (row["sex"], row["age"], row["cdr"], row["mmse"], row["etiv"]) == ("F", 74, 0, 29, 1344)
    assert table.loc[table["session"] == "MR2", "subject"].tolist() == ["OAS1_0061"]


def test_oasis1_sheet_without_cdr_is_refused_naming_the_column(tmp_path):
    path = tmp_path / "oasis_cross-sectional.csv"
    oasis1_frame().drop(columns=["CDR"]).to_csv(path, index=False)
    with pytest.raises(DemographicsError, match=r"oasis_cross-sectional\.csv.*CDR"):
        normalise_oasis1(path)


def oasis2_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Subject ID": ["OAS2_0001", "OAS2_0001", "OAS2_0002", "OAS2_0002", "OAS2_0002"],
            "MRI ID": ["OAS2_0001_MR1", "OAS2_0001_MR2", "OAS2_0002_MR1", "OAS2_0002_MR2", "OAS2_0002_MR3"],
            "Group": ["Nondemented", "Nondemented", "Demented", "Demented", "Demented"],
            "Visit": [1, 2, 1, 2, 3],
            "MR Delay": [0, 457, 0, 560, 1895],
            "M/F": ["M", "M", "M", "M", "M"],
            "Hand": ["R"] * 5,
            "Age": [87, 88, 75, 76, 80],
            "EDUC": [14, 14, 12, 12, 12],
            "SES": [2, 2, None, None, None],
            "MMSE": [27, 30, 23, 28, 22],
            "CDR": [0, 0, 0.5, 0.5, 0.5],
            "eTIV": [1987, 2004, 1678, 1738, 1698],
            "nWBV": [0.696, 0.681, 0.736, 0.713, 0.701],
            "ASF": [0.883, 0.876, 1.046, 1.010, 1.034],
        }
    )


def test_oasis2_rows_are_visits_with_age_at_that_visit(tmp_path):
    path = tmp_path / "oasis_longitudinal_demographics.xlsx"
    oasis2_frame().to_excel(path, index=False)
    table = normalise_oasis2(path)
    assert len(table) == 5
    assert {"group", "visit", "mr_delay", "cdr", "mmse", "educ"} <= set(table.columns)
    visits = table.set_index(["subject", "session"])
    assert visits.loc[("OAS2_0002", "MR3"), "age"] == 80
    assert visits.loc[("OAS2_0002", "MR3"), "visit"] == 3
    assert visits.loc[("OAS2_0002", "MR1"), "group"] == "Demented"
    assert visits.loc[("OAS2_0001", "MR2"), "sex"] == "M"


def test_oasis2_sheet_missing_columns_is_refused_naming_them(tmp_path):
    path = tmp_path / "oasis_longitudinal_demographics.xlsx"
    oasis2_frame().drop(columns=["Group", "Visit"]).to_excel(path, index=False)
    with pytest.raises(DemographicsError, match=r"oasis_longitudinal_demographics\.xlsx.*Group.*Visit"):
        normalise_oasis2(path)


def test_participants_of_ixi_cover_exactly_the_scans_with_their_site(tmp_path):
    ixi_xls(tmp_path / "IXI.xls")
    scans = pd.DataFrame(
        {
            "scan": ["IXI002", "IXI013", "IXI999"],
            "subject": ["IXI002", "IXI013", "IXI999"],
            "session": ["", "", ""],
            "path": [
                str(tmp_path / name)
                for name in ("IXI002-Guys-0828-T1.nii.gz", "IXI013-HH-1212-T1.nii.gz", "IXI999-IOP-0001-T1.nii.gz")
            ],
        }
    )
    table = participants_table("ixi", tmp_path, CONFIG, scans)
    assert table["subject"].tolist() == ["IXI002", "IXI013", "IXI999"]
    assert table["site"].tolist() == ["Guys", "HH", "IOP"]
    assert pd.isna(table.set_index("subject").loc["IXI999", "age"])  # a scan without a sheet row keeps its row
    assert table.attrs["duplicate_subjects"] == ["IXI013", "IXI014"]


def test_participants_of_oasis2_match_scans_by_subject_and_session(tmp_path):
    oasis2_frame().to_excel(tmp_path / "oasis_longitudinal_demographics.xlsx", index=False)
    scans = pd.DataFrame({"subject": ["OAS2_0001", "OAS2_0002"], "session": ["MR2", "MR3"]})
    table = participants_table("oasis2", tmp_path, CONFIG, scans)
    rows = list(zip(table["subject"], table["session"], table["age"]))
    assert rows == [("OAS2_0001", "MR2", 88), ("OAS2_0002", "MR3", 80)]


def test_missing_demographics_file_of_a_dataset_is_a_clear_error(tmp_path):
    scans = pd.DataFrame({"subject": ["OAS1_0001"], "session": ["MR1"]})
    with pytest.raises(DemographicsError, match=r"oasis_cross-sectional\.csv.*extract"):
        participants_table("oasis1", tmp_path, CONFIG, scans)


def test_demo_participants_tsv_is_read_and_unknown_subjects_get_empty_rows(tmp_path):
    demo = {"subject": ["S1"], "session": [""], "site": ["A"], "age": [30], "sex": ["F"], "atrophy": [0.1]}
    pd.DataFrame(demo).to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    table = participants_table("demo", tmp_path, CONFIG, pd.DataFrame({"subject": ["S1", "S2"], "session": ["", ""]}))
    assert table["subject"].tolist() == ["S1", "S2"]
    assert table.loc[0, "atrophy"] == 0.1 and pd.isna(table.loc[1, "age"])
