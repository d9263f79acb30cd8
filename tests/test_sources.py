"""Data sources (brainvq/sources/): each source's layout, discovery, participants, defaults and terms,
and a new source module usable by the workflow with no edit elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainvq.acquire import TermsNotAcceptedError
from brainvq.config import validated_config
from brainvq.data import stratify_column, subject_split
from brainvq.demographics import COLUMNS, DemographicsError
from brainvq.io import (
    InvalidVolumesError,
    MissingOrientationError,
    ScanKeyError,
    VolumeNotFoundError,
    discover_scans,
)
from brainvq.evaluation import probe_target_spec
from brainvq.sources import KINDS, Source, SourceError, available_sources, get_source
from brainvq.sources.bids import BidsLayoutError, MissingScanError
from brainvq.sources.ixi import ixi_site, normalise_ixi
from brainvq.sources.oasis1 import normalise_oasis1
from brainvq.sources.oasis2 import normalise_oasis2
from snakemake_helpers import TinyRun, copy_workflow, tiny_config
from test_io import config, tiny_data, write_analyze, write_nifti
from test_workflow import head_affine, head_volume
from volume_trees import (
    asymmetric_head,
    nifti,
    oblique_affine,
    write_adni_collection_csv,
    write_adni_tree,
    write_bids_tree,
    write_dicom_series,
)

# The demographics files under the raw folder; the rest is the schema's defaults.
CONFIG = validated_config({"datasets": {"oasis1": {"demographics_file": "oasis_cross-sectional.csv"}}})



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


def participants(name: str, raw_root: Path, config: dict, scans: pd.DataFrame) -> pd.DataFrame:
    """The participants table of source ``name`` for ``scans``, as the discovery rule makes it."""
    source = get_source(name)
    return source.participants(raw_root, source.discovery_settings(config), scans)


# ---------------------------------------------------------------------------------------------- interface

def test_every_source_module_defines_a_complete_source():
    assert {"demo", "ixi", "oasis1", "oasis2", "local", "bids", "adni"} <= set(available_sources())
    settings = config(dataset={"local_dir": "/data/t1"})
    for name in available_sources():
        source = get_source(name)
        assert isinstance(source, Source) and source.name == name and source.kind in KINDS, name
        assert source.layout and source.attribution_html.lstrip().startswith("<p>"), name
        assert set(source.defaults) == {"stratify", "probe_target", "skull_strip"}, name
        assert source.raw_root(settings), name
        # Download rules exist only for a source with something to download.
        assert bool(source.download_plan(settings)) == (source.kind == "download"), name


def test_an_unknown_source_is_refused_listing_the_available_ones():
    with pytest.raises(SourceError, match="dataset.source 'nifd' is not a data source") as error:
        get_source("nifd")
    assert all(name in str(error.value) for name in available_sources())
    assert "brainvq/sources/nifd.py" in str(error.value)


def test_auto_means_the_source_default_and_an_explicit_setting_wins():
    demo, ixi, oasis1 = (get_source(name).defaults for name in ("demo", "ixi", "oasis1"))
    assert stratify_column({"stratify": "auto"}, demo) == "atrophy"
    assert stratify_column({"stratify": "auto"}, ixi) == "site"
    assert stratify_column({"stratify": "auto"}, oasis1) is None
    assert stratify_column({"stratify": None}, ixi) is None and stratify_column({"stratify": "sex"}, demo) == "sex"
    assert probe_target_spec({"probe_target": "auto"}, demo) == "atrophy>median"
    assert probe_target_spec({"probe_target": "auto"}, oasis1) == "cdr>0"
    assert probe_target_spec({"probe_target": "sex"}, oasis1) == "sex"
    # The demo writes true brain masks beside its volumes; the other sources keep the head unless told.
    assert get_source("demo").resolved_preprocess(config()["preprocess"])["skull_strip"] == "precomputed"
    assert get_source("ixi").resolved_preprocess(config()["preprocess"])["skull_strip"] == "none"
    assert get_source("demo").resolved_preprocess(config(preprocess={"skull_strip": "bet"})["preprocess"])[
        "skull_strip"] == "bet"
    # The schema's defaults are 'auto': the source decides unless the config says otherwise.
    assert config()["split"]["stratify"] == config()["evaluate"]["probe_target"] == "auto"
    assert config()["preprocess"]["skull_strip"] == "auto"


def test_discovery_settings_change_with_what_discovery_reads_and_nothing_else():
    oasis1 = get_source("oasis1")
    base = oasis1.discovery_settings(config())
    mirror = {"download": {"base_url": "http://mirror.test"}, "datasets": {"oasis1": {"discs": [1]}}}
    assert oasis1.discovery_settings(config(**mirror)) == base
    assert oasis1.discovery_settings(config(datasets={"oasis1": {"include_mr2": True}})) != base
    local = get_source("local")
    assert local.discovery_settings(config(dataset={"subject_regex": "(?P<subject>x)"})) != local.discovery_settings(
        config()
    )


def test_local_source_without_its_folder_names_the_key_to_set():
    with pytest.raises(SourceError, match="dataset.local_dir is not set"):
        get_source("local").raw_root(config(dataset={"source": "local"}))



# --------------------------------------------------------------------------------------------- demo


def test_demo_layout_mixes_ixi_nifti_and_oasis_analyze(tmp_path):
    write_nifti(tmp_path / "IXI" / "IXI002-Guys-0828-T1.nii.gz")
    write_analyze(tmp_path / "OAS1_0001_MR1" / "RAW" / "OAS1_0001_MR1_mpr-1_anon.hdr")
    (tmp_path / "participants.tsv").write_text("subject\nIXI002\nOAS1_0001\n")
    scans = discover_scans(get_source("demo"), tmp_path, config())
    assert scans["scan"].tolist() == ["IXI002", "OAS1_0001_MR1"]
    assert scans["format"].tolist() == ["nifti", "analyze"]
    assert scans["orientation"].tolist() == ["", "ASL"]
    assert scans["subject"].tolist() == ["IXI002", "OAS1_0001"]
    assert scans["session"].tolist() == ["", "MR1"]


def test_a_brain_mask_beside_a_volume_is_found_with_it_and_is_never_a_scan(tmp_path):
    ixi = tmp_path / "IXI" / "IXI002-Guys-0828-T1.nii.gz"
    oasis = tmp_path / "OAS1_0001_MR1" / "RAW" / "OAS1_0001_MR1_mpr-1_anon.hdr"
    write_nifti(ixi)
    write_nifti(tmp_path / "IXI" / "IXI002-Guys-0828-T1_brainmask.nii.gz")
    write_analyze(oasis)  # no mask beside this one
    (tmp_path / "participants.tsv").write_text("subject\nIXI002\nOAS1_0001\n")
    scans = discover_scans(get_source("demo"), tmp_path, config())
    assert scans["scan"].tolist() == ["IXI002", "OAS1_0001_MR1"]
    assert scans["mask"].tolist() == [str(tmp_path / "IXI" / "IXI002-Guys-0828-T1_brainmask.nii.gz"), ""]
    write_nifti(tmp_path / "local" / "sub01.nii.gz")
    write_nifti(tmp_path / "local" / "sub01_brainmask.nii.gz")
    local = discover_scans(get_source("local"), tmp_path / "local", config())
    assert local["scan"].tolist() == ["sub01"] and local["mask"].tolist()[0].endswith("sub01_brainmask.nii.gz")


def test_demo_participants_tsv_is_read_and_unknown_subjects_get_empty_rows(tmp_path):
    demo = {"subject": ["S1"], "session": [""], "site": ["A"], "age": [30], "sex": ["F"], "atrophy": [0.1]}
    pd.DataFrame(demo).to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    table = participants("demo", tmp_path, CONFIG, pd.DataFrame({"subject": ["S1", "S2"], "session": ["", ""]}))
    assert table["subject"].tolist() == ["S1", "S2"]
    assert table.loc[0, "atrophy"] == 0.1 and pd.isna(table.loc[1, "age"])


# ---------------------------------------------------------------------------------------------- ixi


def test_ixi_layout_finds_t1_files_at_any_depth_and_ignores_others(tmp_path):
    write_nifti(tmp_path / "a" / "b" / "IXI012-HH-1211-T1.nii.gz")
    write_nifti(tmp_path / "IXI002-Guys-0828-T1.nii.gz")
    write_nifti(tmp_path / "IXI002-Guys-0828-T2.nii.gz")
    scans = discover_scans(get_source("ixi"), tmp_path, config())
    assert scans["scan"].tolist() == ["IXI002", "IXI012"]
    assert scans["subject"].tolist() == ["IXI002", "IXI012"]


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


def test_ixi_site_comes_from_the_image_file_name():
    assert ixi_site("/data/IXI002-Guys-0828-T1.nii.gz") == "Guys"
    assert ixi_site("IXI012-HH-1211-T1.nii.gz") == "HH"
    assert ixi_site("IXI035-IOP-0873-T1.nii.gz") == "IOP"
    assert ixi_site("sub-01_T1w.nii.gz") is None


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
    table = participants("ixi", tmp_path, CONFIG, scans)
    assert table["subject"].tolist() == ["IXI002", "IXI013", "IXI999"]
    assert table["site"].tolist() == ["Guys", "HH", "IOP"]
    assert pd.isna(table.set_index("subject").loc["IXI999", "age"])  # a scan without a sheet row keeps its row
    assert table.attrs["duplicate_subjects"] == ["IXI013", "IXI014"]


# ------------------------------------------------------------------------------------------- oasis1


def oasis1_tree(root: Path) -> None:
    """disc1/OAS1_0001_MR1, disc2/OAS1_0002_MR1 and disc2/OAS1_0002_MR2, with RAW and T88 images."""
    for disc, session in (("disc1", "OAS1_0001_MR1"), ("disc2", "OAS1_0002_MR1"), ("disc2", "OAS1_0002_MR2")):
        folder = root / disc / session
        write_analyze(folder / "RAW" / f"{session}_mpr-1_anon.hdr")
        write_analyze(folder / "RAW" / f"{session}_mpr-2_anon.hdr")
        write_analyze(folder / "PROCESSED" / "MPRAGE" / "T88_111" / f"{session}_mpr_n4_anon_111_t88_masked_gfc.hdr")


def test_oasis1_excludes_mr2_rescans_by_default(tmp_path):
    oasis1_tree(tmp_path)
    scans = discover_scans(get_source("oasis1"), tmp_path, config())
    assert scans["scan"].tolist() == ["OAS1_0001_MR1", "OAS1_0002_MR1"]
    assert all(path.endswith("_mpr-1_anon.hdr") for path in scans["path"])
    assert scans["orientation"].tolist() == ["ASL", "ASL"]


def test_oasis1_includes_mr2_when_asked(tmp_path):
    oasis1_tree(tmp_path)
    scans = discover_scans(get_source("oasis1"), tmp_path, config(datasets={"oasis1": {"include_mr2": True}}))
    assert scans["scan"].tolist() == ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0002_MR2"]
    assert scans["subject"].tolist() == ["OAS1_0001", "OAS1_0002", "OAS1_0002"]


def test_oasis1_image_selection_picks_t88_with_its_orientation(tmp_path):
    oasis1_tree(tmp_path)
    scans = discover_scans(get_source("oasis1"), tmp_path, config(datasets={"oasis1": {"image": "t88_masked"}}))
    assert all("T88_111" in path for path in scans["path"])
    assert scans["orientation"].tolist() == ["LAS", "LAS"]


def test_oasis1_session_without_selected_image_fails_naming_expected_file(tmp_path):
    oasis1_tree(tmp_path)
    # Both sessions lack the image: one error names each expected file.
    with pytest.raises(InvalidVolumesError, match="OAS1_0001_MR1_mpr_n4_anon_sbj_111.hdr") as info:
        discover_scans(get_source("oasis1"), tmp_path, config(datasets={"oasis1": {"image": "subj111"}}))
    assert [type(problem) for _, problem in info.value.problems] == [VolumeNotFoundError] * 2
    assert "OAS1_0002_MR1_mpr_n4_anon_sbj_111.hdr" in str(info.value)


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


# ------------------------------------------------------------------------------------------- oasis2


def oasis2_tree(root: Path) -> None:
    """OAS2_0001 (MR1 Analyze, MR2 NIfTI pair with qform) and OAS2_0002 (MR2, MR3)."""
    write_analyze(root / "OAS2_0001_MR1" / "RAW" / "mpr-1.nifti.hdr")
    pair = nib.Nifti1Pair(tiny_data(), np.diag([-1.0, 1, 1, 1]))
    pair.set_qform(pair.affine, code=1)
    (root / "OAS2_0001_MR2" / "RAW").mkdir(parents=True)
    nib.save(pair, str(root / "OAS2_0001_MR2" / "RAW" / "mpr-1.nifti.hdr"))
    write_analyze(root / "part2" / "OAS2_0002_MR3" / "RAW" / "mpr-1.nifti.hdr")
    write_analyze(root / "part1" / "OAS2_0002_MR2" / "RAW" / "mpr-1.nifti.hdr")


def test_oasis2_all_sessions_use_header_orientation_only_when_usable(tmp_path):
    oasis2_tree(tmp_path)
    scans = discover_scans(get_source("oasis2"), tmp_path, config())
    assert scans["scan"].tolist() == ["OAS2_0001_MR1", "OAS2_0001_MR2", "OAS2_0002_MR2", "OAS2_0002_MR3"]
    assert scans["subject"].tolist() == ["OAS2_0001"] * 2 + ["OAS2_0002"] * 2
    assert scans["format"].tolist() == ["analyze", "nifti", "analyze", "analyze"]
    assert scans["orientation"].tolist() == ["ASL", "", "ASL", "ASL"]


def test_oasis2_baseline_keeps_first_session_of_each_subject(tmp_path):
    oasis2_tree(tmp_path)
    scans = discover_scans(get_source("oasis2"), tmp_path, config(datasets={"oasis2": {"sessions": "baseline"}}))
    assert scans["scan"].tolist() == ["OAS2_0001_MR1", "OAS2_0002_MR2"]


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


def test_participants_of_oasis2_match_scans_by_subject_and_session(tmp_path):
    oasis2_frame().to_excel(tmp_path / "oasis_longitudinal_demographics.xlsx", index=False)
    scans = pd.DataFrame({"subject": ["OAS2_0001", "OAS2_0002"], "session": ["MR2", "MR3"]})
    table = participants("oasis2", tmp_path, CONFIG, scans)
    rows = list(zip(table["subject"], table["session"], table["age"]))
    assert rows == [("OAS2_0001", "MR2", 88), ("OAS2_0002", "MR3", 80)]


# -------------------------------------------------------------------------------------------- local


def test_local_regex_gives_subject_and_session(tmp_path):
    write_nifti(tmp_path / "site1" / "sub01_ses-1_T1w.nii.gz")
    write_nifti(tmp_path / "site1" / "sub01_ses-2_T1w.nii.gz")
    write_nifti(tmp_path / "sub02.nii")
    (tmp_path / "notes.txt").write_text("not a volume")
    scans = discover_scans(get_source("local"), tmp_path, config())
    assert scans["scan"].tolist() == ["sub01_ses-1", "sub01_ses-2", "sub02"]
    assert scans["subject"].tolist() == ["sub01", "sub01", "sub02"]
    assert scans["session"].tolist() == ["ses-1", "ses-2", ""]


def test_local_custom_regex(tmp_path):
    write_nifti(tmp_path / "T1_patientA_visit3.nii.gz")
    regex = r"T1_(?P<subject>patient[A-Z])_(?P<session>visit\d)"
    scans = discover_scans(get_source("local"), tmp_path, config(dataset={"subject_regex": regex}))
    assert scans.loc[0, ["scan", "subject", "session"]].tolist() == ["patientA_visit3", "patientA", "visit3"]


def test_local_file_not_matching_regex_raises(tmp_path):
    write_nifti(tmp_path / "_odd.nii.gz")
    with pytest.raises(ScanKeyError, match="_odd.nii.gz"):
        discover_scans(get_source("local"), tmp_path, config())


def test_local_analyze_requires_analyze_orientation(tmp_path):
    write_analyze(tmp_path / "sub01.hdr")
    with pytest.raises(MissingOrientationError, match="dataset.analyze_orientation"):
        discover_scans(get_source("local"), tmp_path, config())
    scans = discover_scans(get_source("local"), tmp_path, config(dataset={"analyze_orientation": "LAS"}))
    assert scans.loc[0, ["format", "orientation"]].tolist() == ["analyze", "LAS"]

# --------------------------------------------------------------------------------------------- BIDS


@pytest.fixture(scope="module")
def t1_image():
    """One small head volume (NIfTI image), reused for every file of the BIDS and ADNI trees."""
    return nifti(asymmetric_head(), oblique_affine())


def bids_config(root: Path, **bids) -> dict:
    return config(dataset={"source": "bids", "local_dir": str(root)}, datasets={"bids": bids})


def discover_bids(root: Path, **bids) -> pd.DataFrame:
    return discover_scans(get_source("bids"), root, bids_config(root, **bids))


def test_bids_discovery_finds_exactly_the_t1w_scans_with_subjects_and_sessions(tmp_path, t1_image):
    root = write_bids_tree(tmp_path / "bids", t1_image)
    scans = discover_bids(root)
    assert scans[["scan", "subject", "session"]].values.tolist() == [
        ["sub-01", "sub-01", ""], ["sub-02_ses-1", "sub-02", "ses-1"], ["sub-02_ses-2", "sub-02", "ses-2"],
        ["sub-03_ses-1", "sub-03", "ses-1"]]
    names = [Path(path).name for path in scans["path"]]
    assert all(name.split(".")[0].endswith("_T1w") for name in names)  # no T2w, FLAIR or bold
    assert names[1] == "sub-02_ses-1_run-2_T1w.nii.gz"  # runs: last


def test_bids_run_rule_first_or_all_and_entity_filters(tmp_path, t1_image):
    root = write_bids_tree(tmp_path / "bids", t1_image)
    first = discover_bids(root, runs="first")
    assert Path(first.loc[first["scan"] == "sub-02_ses-1", "path"].item()).name == "sub-02_ses-1_run-1_T1w.nii.gz"
    every = discover_bids(root, runs="all")
    assert every["scan"].tolist() == ["sub-01", "sub-02_ses-1_run-1", "sub-02_ses-1_run-2", "sub-02_ses-2_acq-mprage",
                                      "sub-03_ses-1"]
    assert set(every["subject"]) == {"sub-01", "sub-02", "sub-03"}
    with pytest.raises(Exception, match=r"have no T1w image matching .*acquisition.*sub-01"):
        discover_bids(root, filters={"acquisition": "mprage"})
    only = discover_bids(root, filters={"acquisition": "mprage"}, exclude_subjects=["sub-01", "03"])
    assert only["scan"].tolist() == ["sub-02_ses-2"]


def test_bids_participants_and_session_ages_reach_the_split_which_keeps_sessions_together(tmp_path, t1_image):
    root = write_bids_tree(tmp_path / "bids", t1_image)
    pd.DataFrame({"session_id": ["ses-1", "ses-2"], "age": [67.0, 69.5]}).to_csv(
        root / "sub-02" / "sub-02_sessions.tsv", sep="\t", index=False)
    scans = discover_bids(root)
    table = participants("bids", root, bids_config(root), scans)
    rows = {(r.subject, r.session if isinstance(r.session, str) else ""): (r.age, r.sex, r.group)
            for r in table.itertuples()}
    assert rows == {("sub-01", ""): (31, "F", "control"), ("sub-02", "ses-1"): (67.0, "M", "patient"),
                    ("sub-02", "ses-2"): (69.5, "M", "patient"), ("sub-03", "ses-1"): (45, "F", "control")}
    for seed in range(5):
        split = subject_split(scans, table, test_fraction=0.34, val_fraction=0.0, seed=seed)
        assert split.groupby("subject")["split"].nunique().max() == 1
        assert split.set_index("scan").loc["sub-02_ses-2", "age"] == 69.5


def test_bids_folder_without_dataset_description_is_refused_naming_the_file(tmp_path, t1_image):
    root = write_bids_tree(tmp_path / "bids", t1_image, description=False)
    with pytest.raises(BidsLayoutError, match=r"bids/dataset_description.json does not exist.*dataset.local_dir"):
        discover_bids(root)


def test_bids_subject_without_t1w_is_refused_naming_it_and_the_fix(tmp_path, t1_image):
    root = write_bids_tree(tmp_path / "bids", t1_image)
    (root / "sub-04" / "anat").mkdir(parents=True)
    nib.save(t1_image, root / "sub-04" / "anat" / "sub-04_T2w.nii.gz")
    with pytest.raises(MissingScanError, match=r"bids/sub-04.*exclude_subjects: \[sub-04\]"):
        discover_bids(root)
    assert "sub-04" not in discover_bids(root, exclude_subjects=["sub-04"])["subject"].tolist()


def test_bids_sourcedata_dicom_series_stands_in_for_a_missing_nifti(tmp_path, t1_image):
    root = write_bids_tree(tmp_path / "bids", t1_image)
    (root / "sub-05" / "anat").mkdir(parents=True)
    nib.save(t1_image, root / "sub-05" / "anat" / "sub-05_T2w.nii.gz")
    write_dicom_series(t1_image, root / "sourcedata" / "sub-05" / "anat" / "sub-05_T1w")
    write_dicom_series(t1_image, root / "sourcedata" / "sub-01" / "anat" / "sub-01_T1w")  # has a NIfTI: unused
    write_dicom_series(t1_image, root / "sourcedata" / "sub-05" / "anat" / "sub-05_T2w")
    scans = discover_bids(root).set_index("scan")
    assert scans.loc["sub-05", "format"] == "dicom" and scans.loc["sub-01", "format"] == "nifti"
    assert scans.loc["sub-05", "path"] == str(root / "sourcedata" / "sub-05" / "anat" / "sub-05_T1w")


# --------------------------------------------------------------------------------------------- ADNI


def adni_config(root: Path, **adni) -> dict:
    return config(dataset={"source": "adni", "local_dir": str(root)}, datasets={"adni": adni})


def test_adni_visits_are_sessions_of_one_subject_from_nifti_and_dicom(tmp_path, t1_image):
    write_adni_tree(tmp_path / "download", t1_image)
    scans = discover_scans(get_source("adni"), tmp_path / "download", adni_config(tmp_path / "download"))
    assert scans[["scan", "subject", "session", "format"]].values.tolist() == [
        ["002_S_0295_2006-04-18", "002_S_0295", "2006-04-18", "nifti"],
        ["002_S_0295_2007-05-02", "002_S_0295", "2007-05-02", "dicom"],
        ["011_S_0002_2005-09-08", "011_S_0002", "2005-09-08", "nifti"]]
    assert scans.loc[0, "path"].endswith("_S13408_I13722.nii")  # the scheduled scan, not MPRAGE_Repeat
    # Pointing at ADNI/ itself finds the same; 'all' keeps the repeat as a scan of its own.
    again = discover_scans(get_source("adni"), tmp_path / "download" / "ADNI", adni_config(tmp_path / "download"))
    assert again["scan"].tolist() == scans["scan"].tolist()
    every = discover_scans(get_source("adni"), tmp_path / "download",
                           adni_config(tmp_path / "download", images_per_visit="all", description="MPRAGE"))
    assert every["scan"].tolist() == ["002_S_0295_2006-04-18_I13722", "002_S_0295_2006-04-18_I13723",
                                      "002_S_0295_2007-05-02_I55001"]
    split = subject_split(scans, participants("adni", tmp_path, adni_config(tmp_path), scans), 0.5, 0.0, seed=0)
    assert split.groupby("subject")["split"].nunique().max() == 1


def test_adni_collection_csv_gives_age_sex_and_group_per_visit(tmp_path, t1_image):
    write_adni_tree(tmp_path, t1_image)
    write_adni_collection_csv(tmp_path / "T1_collection_6_01_2026.csv")
    settings = adni_config(tmp_path, demographics="T1_collection_6_01_2026.csv")
    scans = discover_scans(get_source("adni"), tmp_path, settings)
    table = participants("adni", tmp_path, settings, scans)
    assert table[["subject", "session", "age", "sex", "group"]].values.tolist() == [
        ["002_S_0295", "2006-04-18", 84, "M", "CN"], ["002_S_0295", "2007-05-02", 85, "M", "CN"],
        ["011_S_0002", "2005-09-08", 74, "F", "AD"]]


def test_adnimerge_matches_the_nearest_exam_within_the_window_with_age_at_the_scan(tmp_path, t1_image):
    write_adni_tree(tmp_path, t1_image)
    pd.DataFrame({"PTID": ["002_S_0295", "002_S_0295", "011_S_0002"], "VISCODE": ["bl", "m12", "bl"],
                  "EXAMDATE": ["2006-05-02", "2007-05-10", "2004-01-01"], "AGE": [84.8, 84.8, 73.7],
                  "PTGENDER": ["Male", "Male", "Female"], "DX": ["CN", "CN", "Dementia"], "MMSE": [28, 29, 20],
                  "SITE": [2, 2, 11]}).to_csv(tmp_path / "ADNIMERGE.csv", index=False)
    settings = adni_config(tmp_path, demographics=str(tmp_path / "ADNIMERGE.csv"))
    scans = discover_scans(get_source("adni"), tmp_path, settings)
    table = participants("adni", tmp_path, settings, scans).set_index("session")
    assert table.loc["2007-05-02", "viscode"] == "m12" and table.loc["2007-05-02", "mmse"] == 29
    assert table.loc["2007-05-02", "age"] == pytest.approx(84.8 + 365 / 365.25)
    assert table.loc["2006-04-18", "age"] == pytest.approx(84.8 - 14 / 365.25)
    assert pd.isna(table.loc["2005-09-08", "age"])  # the only exam is 20 months away


def test_adni_needs_its_data_use_agreement_accepted(tmp_path):
    source = get_source("adni")
    with pytest.raises(TermsNotAcceptedError, match=r"(?s)ADNI Data Use Agreement.*accept_terms: true"):
        source.require_terms(adni_config(tmp_path))
    source.require_terms(adni_config(tmp_path, accept_terms=True))
    assert "adni.loni.usc.edu" in source.terms and "ADNI_Acknowledgement_List.pdf" in source.attribution_html


# ------------------------------------------------------------------------------------- a new source


TOY_SOURCE = '''"""A toy data source: toy-<subject>.nii.gz files and a toy.csv sheet (subject, years, sex, site)."""

import re
from pathlib import Path

import pandas as pd

from brainvq.demographics import COLUMNS, read_sheet, with_scanned_subjects
from brainvq.io import scan_row, visible_files
from brainvq.sources import Source

TOY_NAME = re.compile(r"toy-(\\w+)\\.nii\\.gz")


class Toy(Source):
    name = "toy"
    kind = "folder"
    layout = "toy-<subject>.nii.gz files"
    defaults = {"stratify": "site", "probe_target": "sex"}
    attribution_html = "<p>Toy volumes written by a test.</p>"

    def raw_root(self, config):
        return config["datasets"]["toy"]["folder"]

    def discovery_settings(self, config):
        return {"sheet": config["datasets"]["toy"]["sheet"]}

    def find_rows(self, raw_root, settings):
        matches = [(TOY_NAME.fullmatch(path.name), path) for path in visible_files(raw_root)]
        return [scan_row(m.group(1), m.group(1), "", path, None) for m, path in matches if m]

    def participants(self, raw_root, settings, scans):
        sheet = read_sheet(Path(raw_root) / settings["sheet"]).rename(columns={"years": "age"})
        return with_scanned_subjects(sheet.assign(session=pd.NA)[COLUMNS], scans)


SOURCE = Toy()
'''


def write_toy_folder(folder: Path, n_subjects: int) -> list[str]:
    """Small heads toy-sNN.nii.gz, a file the toy layout ignores, and toy.csv; return the subjects."""
    folder.mkdir(parents=True)
    affine = head_affine()
    subjects = [f"s{i:02d}" for i in range(n_subjects)]
    for i, subject in enumerate(subjects):
        nib.save(nib.Nifti1Image(head_volume(i).astype(np.int16), affine), folder / f"toy-{subject}.nii.gz")
    nib.save(nib.Nifti1Image(head_volume(99).astype(np.int16), affine), folder / "other-s99.nii.gz")
    pd.DataFrame({"subject": subjects, "years": [20 + 5 * i for i in range(n_subjects)],
                  "sex": ["F", "M"] * (n_subjects // 2), "site": ["A"] * (n_subjects // 2) + ["B"] * (n_subjects // 2)}
                 ).to_csv(folder / "toy.csv", index=False)
    return subjects


@pytest.mark.slow
def test_a_new_source_module_runs_the_workflow_with_no_other_edit(tmp_path, monkeypatch):
    # The module goes into a copy of the workflow; the real package never sees it.
    workflow = copy_workflow(tmp_path / "workflow")
    (workflow / "brainvq" / "sources" / "toy.py").write_text(TOY_SOURCE)
    assert "toy" not in available_sources()
    # Snakemake runs the copy's brainvq (the Snakefile's folder leads its sys.path and is handed to the
    # jobs), unless PYTHONPATH names another checkout first.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    subjects = write_toy_folder(tmp_path / "volumes", 4)
    changes = {
        "run": "toy",
        "dataset": {"source": "toy"},
        "datasets": {"toy": {"folder": str(tmp_path / "volumes"), "sheet": "toy.csv"}},
        "preprocess": {"size": 32, "spacing_mm": 2.0, "shard_size": 16},
        "split": {"test_fraction": 0.5, "val_fraction": 0.0},
    }
    run = TinyRun(workflow, tmp_path / "work", tiny_config(tmp_path / "config.yaml", changes))
    run.snakemake("results/toy/shards")

    results = run.workdir / "results" / "toy"
    assert sorted(pd.read_csv(results / "subjects.tsv", sep="\t")["scan"]) == subjects
    ages = pd.read_csv(results / "participants.tsv", sep="\t").set_index("subject")["age"]
    assert ages["s03"] == 35
    split = pd.read_csv(results / "split.csv")
    test = split[split["split"] == "test"]
    assert len(test) == 2 and sorted(test["site"]) == ["A", "B"]  # 'auto': stratified by the toy's site
    seen = {}
    for shard in sorted((results / "shards").glob("*.h5")):
        with h5py.File(shard) as f:
            assert f.attrs["source"] == "toy"
            seen.setdefault(f.attrs["split"], set()).update(s.decode() for s in f["subject"][:])
    assert seen["train"] | seen["test"] == set(subjects) and not seen["train"] & seen["test"]
    # The rest of the pipeline, the report included, is planned for it too.
    assert {"train_vqvae", "evaluate", "report"} <= set(run.dry_run())
