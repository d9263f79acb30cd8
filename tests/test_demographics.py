"""Generic demographics: sheets matched to the scanned sessions; a sheet that cannot be read is named with the fix.

Each source's own sheet (IXI.xls, the OASIS sheets, the demo's participants.tsv) is tested in test_sources.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from brainvq.config import validated_config
from brainvq.demographics import COLUMNS, DemographicsError, scan_sessions, sheet_participants, with_scanned_subjects
from brainvq.sources import get_source
from brainvq.sources.ixi import normalise_ixi

# The demographics files under the raw folder; the rest is the schema's defaults.
CONFIG = validated_config({"datasets": {"oasis1": {"demographics_file": "oasis_cross-sectional.csv"}}})


def test_unreadable_sheet_names_the_file(tmp_path):
    path = tmp_path / "IXI.xls"
    path.write_bytes(b"<html>404 page from a proxy</html>")
    with pytest.raises(DemographicsError, match=r"IXI\.xls"):
        normalise_ixi(path)


def test_missing_demographics_file_of_a_dataset_is_a_clear_error(tmp_path):
    scans = pd.DataFrame({"subject": ["OAS1_0001"], "session": ["MR1"]})
    oasis1 = get_source("oasis1")
    with pytest.raises(DemographicsError, match=r"oasis_cross-sectional\.csv.*extract"):
        oasis1.participants(tmp_path, oasis1.discovery_settings(CONFIG), scans)


def test_sheet_rows_are_matched_to_the_scanned_sessions_and_the_rest_dropped(caplog):
    scans = pd.DataFrame({"subject": ["A", "A", "B"], "session": ["v1", "v2", ""]})
    sheet = pd.DataFrame({"subject": ["A", "A", "C"], "session": ["v1", " v2 ", "v1"], "site": pd.NA,
                          "age": [30, 31, 50], "sex": ["F", "F", "M"], "score": [1, 2, 3]})
    with caplog.at_level(logging.WARNING):
        table = sheet_participants(scan_sessions(scans), sheet, ["subject", "session"], Path("s.csv"), "toy")
    assert list(table.columns) == COLUMNS + ["score"]
    assert table["subject"].tolist() == ["A", "A", "B"] and table["age"].tolist()[:2] == [30, 31]
    assert pd.isna(table.loc[2, "age"]) and pd.isna(table.loc[2, "session"])
    assert "1 of 3 scanned subjects/sessions have no age in s.csv" in caplog.text


def test_subjects_without_a_row_get_an_empty_one():
    table = pd.DataFrame({"subject": ["A"], "age": [30]})
    filled = with_scanned_subjects(table, pd.DataFrame({"subject": ["B", "A", "C"]}))
    assert filled["subject"].tolist() == ["A", "B", "C"] and filled["age"].isna().tolist() == [False, True, True]
