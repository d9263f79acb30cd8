"""Subject-level split, HDF5 shards, the shard reader and QC montages (brainvq.data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, synthetic_brain_slices, write_shard

from brainvq.data import (
    LeakageError,
    ShardError,
    ShardFormatError,
    ShardSizeError,
    SplitError,
    make_split,
    merge_participants,
    read_split,
    subject_split,
    validation_subjects,
)
from brainvq.files import write_table_atomic
from brainvq.shards import (
    ShardDataset,
    qc_montage,
    scan_montage,
    shard_image_size,
    shard_paths,
    write_shards,
    write_slices_h5,
)

SPLIT = {"test_fraction": 0.1, "val_fraction": 0.1, "seed": 0, "stratify": None}


def cohort(n_subjects: int, sessions: int = 1, sites: tuple = ("Guys", "HH", "IOP")) -> tuple[pd.DataFrame, ...]:
    """Return (scans, participants) for subjects S00.. with ``sessions`` scans each, sites round-robin."""
    subjects = [f"S{i:02d}" for i in range(n_subjects)]
    session_names = [f"MR{k + 1}" for k in range(sessions)] if sessions > 1 else [""]
    scans = pd.DataFrame(
        [{"scan": f"{s}_{m}" if m else s, "subject": s, "session": m} for s in subjects for m in session_names]
    )
    participants = pd.DataFrame({
        "subject": subjects, "session": [""] * n_subjects,
        "site": [sites[i % len(sites)] for i in range(n_subjects)], "age": np.arange(n_subjects, dtype=float) + 20,
    })
    return scans, participants


def write_scan_file(path: Path, scan: str, subject: str, n: int, size: int = 16, seed: int = 0,
                    reason: str = "") -> Path:
    """Write a slices/{scan}.h5 with the upstream writer; slice indices are stored in reverse order."""
    images, masks = synthetic_brain_slices(n, size, seed)
    index = np.arange(40 + n - 1, 39, -1)
    attrs = {"spacing_mm": 1.0, "size": size, "source": "synthetic", "config_hash": "abc", "split": "",
             "excluded_reason": reason, "excluded_stage": "skull_strip" if reason else ""}
    write_slices_h5(path, images.astype(np.float16), masks, [scan] * n, [subject] * n, index,
                    (index - 40) / max(n - 1, 1), attrs)
    return path


def scan_files(folder: Path, split_df: pd.DataFrame, n: int = 3, size: int = 16) -> dict[str, Path]:
    """Write one slices file per scan of ``split_df``; return scan -> path."""
    folder.mkdir(exist_ok=True)
    return {
        row.scan: write_scan_file(folder / f"{row.scan}.h5", row.scan, row.subject, n, size, seed=k)
        for k, row in enumerate(split_df.itertuples())
    }


SHARD_ATTRS = {"spacing_mm": 1.0, "size": 16, "source": "synthetic", "config_hash": "abc"}


# ------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("seed", range(5))
def test_split_never_puts_one_subject_in_both_sets(seed):
    scans, participants = cohort(23, sessions=3)
    table = subject_split(scans, participants, 0.2, 0.2, seed)
    assert table.groupby("subject")["split"].nunique().max() == 1
    assert table.groupby("subject")["scan"].count().eq(3).all()
    assert set(table["split"]) == {"train", "test"}
    assert table.loc[table["split"] == "test", "subject"].nunique() == 5  # ceil(0.2 * 23)


def test_split_holds_out_at_least_one_test_subject_even_for_a_tiny_fraction():
    scans, participants = cohort(2)
    table = subject_split(scans, participants, 0.01, 0.0, 0)
    assert sorted(table["split"]) == ["test", "train"]
    assert not table["validation"].any()


def test_split_refuses_a_single_subject():
    scans, participants = cohort(1, sessions=2)
    with pytest.raises(SplitError, match="at least 2"):
        subject_split(scans, participants, 0.1, 0.1, 0)


def test_stratified_split_puts_every_site_in_both_sets():
    scans, participants = cohort(30, sites=("Guys", "HH", "IOP"))
    for seed in range(5):
        table = subject_split(scans, participants, 0.1, 0.0, seed, stratify="site")
        assert set(table.loc[table["split"] == "test", "site"]) == {"Guys", "HH", "IOP"}
        assert set(table.loc[table["split"] == "train", "site"]) == {"Guys", "HH", "IOP"}


def test_stratifying_by_a_continuous_column_puts_both_halves_of_it_in_the_test_set():
    scans, participants = cohort(24)  # age 20..43, one value per subject
    for seed in range(10):
        table = subject_split(scans, participants, 0.2, 0.0, seed, stratify="age")
        test_ages = table.loc[table["split"] == "test", "age"]
        assert (test_ages > 31.5).any() and (test_ages <= 31.5).any()


def test_stratified_split_falls_back_when_there_are_more_sites_than_test_subjects():
    scans, participants = cohort(10, sites=("A", "B", "C", "D"))
    table = subject_split(scans, participants, 0.1, 0.0, 0, stratify="site")
    assert table.loc[table["split"] == "test", "subject"].nunique() == 1


def test_stratify_by_an_unknown_column_names_it():
    scans, participants = cohort(10)
    with pytest.raises(SplitError, match="'scanner'"):
        subject_split(scans, participants, 0.1, 0.1, 0, stratify="scanner")


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    scans, participants = cohort(40, sessions=2)
    first = subject_split(scans, participants, 0.1, 0.1, 7)
    again = subject_split(scans.sample(frac=1, random_state=1), participants, 0.1, 0.1, 7)
    other = subject_split(scans, participants, 0.1, 0.1, 8)
    pd.testing.assert_frame_equal(first, again)
    assert set(first.loc[first["split"] == "test", "subject"]) != set(other.loc[other["split"] == "test", "subject"])


def test_validation_subjects_are_training_subjects_only():
    scans, participants = cohort(40, sessions=2)
    table = subject_split(scans, participants, 0.25, 0.2, 3, stratify="site")
    held = validation_subjects(table)
    test = set(table.loc[table["split"] == "test", "subject"])
    assert len(held) == 6  # ceil(0.2 * 30 training subjects)
    assert held.isdisjoint(test)
    assert table.groupby("subject")["validation"].nunique().max() == 1  # sessions stay together
    tampered = table.copy()
    tampered.loc[tampered["split"] == "test", "validation"] = True
    with pytest.raises(LeakageError, match="validation"):
        validation_subjects(tampered)


def test_changing_val_fraction_does_not_move_test_subjects():
    scans, participants = cohort(40)
    a = subject_split(scans, participants, 0.1, 0.1, 0)
    b = subject_split(scans, participants, 0.1, 0.3, 0)
    assert (a["split"] == b["split"]).all()


def test_participants_merge_prefers_the_session_row_then_the_subject_row():
    scans = pd.DataFrame({"scan": ["A_MR1", "A_MR2", "B"], "subject": ["A", "A", "B"], "session": ["MR1", "MR2", ""]})
    participants = pd.DataFrame({"subject": ["A", "A", "B"], "session": ["", "MR2", None],
                                 "age": [70.0, 72.0, 30.0], "cdr": [0.0, 0.5, None]})
    merged = merge_participants(scans, participants)
    assert list(merged["age"]) == [70.0, 72.0, 30.0]
    assert merged.loc[1, "cdr"] == 0.5


def test_make_split_drops_and_reports_excluded_scans(tmp_path):
    scans, participants = cohort(6, sessions=2)
    scans["path"] = [f"/raw/{s}.nii.gz" for s in scans["scan"]]
    scans.to_csv(tmp_path / "subjects.tsv", sep="\t", index=False)
    participants.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    discovery = pd.DataFrame([{"scan": "S05_MR2", "path": "/raw/S05_MR2.img", "stage": "discover",
                               "reason": "unreadable"}])
    discovery.to_csv(tmp_path / "excluded_inputs.csv", index=False)
    files = {}
    for k, row in enumerate(scans.itertuples()):
        if row.scan == "S05_MR2":
            continue
        n, reason = (0, "skull strip failed") if row.scan == "S01_MR1" else (2, "")
        files[row.scan] = write_scan_file(tmp_path / f"{row.scan}.h5", row.scan, row.subject, n, seed=k, reason=reason)
    files["S02_MR2"] = write_scan_file(tmp_path / "S02_MR2.h5", "S02_MR2", "S02", 0)  # no reason, no slices
    table, excluded = make_split(tmp_path / "subjects.tsv", tmp_path / "participants.tsv",
                                 tmp_path / "excluded_inputs.csv", files, SPLIT)
    assert list(excluded["scan"]) == ["S01_MR1", "S02_MR2", "S05_MR2"]
    assert list(excluded["reason"]) == ["skull strip failed", "no slices kept", "unreadable"]
    assert excluded.loc[0, "path"] == "/raw/S01_MR1.nii.gz"
    assert set(table["scan"]).isdisjoint(excluded["scan"]) and len(table) == 9
    assert list(table.columns[:5]) == ["scan", "subject", "session", "split", "validation"]
    write_table_atomic(table, tmp_path / "split.csv")
    pd.testing.assert_frame_equal(read_split(tmp_path / "split.csv")[["scan", "subject", "split", "validation"]],
                                  table[["scan", "subject", "split", "validation"]], check_dtype=False)


def test_make_split_names_scans_without_a_slices_file(tmp_path):
    scans, participants = cohort(3)
    scans.to_csv(tmp_path / "subjects.tsv", sep="\t", index=False)
    participants.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    (tmp_path / "excluded_inputs.csv").write_text("scan,path,stage,reason\n")
    files = scan_files(tmp_path / "slices", scans.iloc[:2].assign(split="train"))
    with pytest.raises(SplitError, match="S02"):
        make_split(tmp_path / "subjects.tsv", tmp_path / "participants.tsv", tmp_path / "excluded_inputs.csv",
                   files, SPLIT)


# ------------------------------------------------------------------------------------------ shards


def small_split(n_subjects: int = 5, sessions: int = 2) -> pd.DataFrame:
    scans, participants = cohort(n_subjects, sessions=sessions)
    return subject_split(scans, participants, 0.2, 0.25, 0)


def test_write_shards_refuses_a_subject_in_both_splits(tmp_path):
    table = small_split()
    files = scan_files(tmp_path / "slices", table)
    leaked = table.copy()
    first_test = leaked.index[leaked["split"] == "test"][0]
    subject = leaked.loc[first_test, "subject"]
    leaked.loc[(leaked["subject"] == subject) & (leaked.index != first_test), "split"] = "train"
    with pytest.raises(LeakageError, match=subject):
        write_shards(leaked, files, tmp_path / "shards", 4, "float16", SHARD_ATTRS)
    assert not (tmp_path / "shards").exists()
    assert os.listdir(tmp_path) == ["slices"]


def test_write_shards_refuses_when_slices_files_put_a_participant_in_both_splits(tmp_path):
    table = small_split()
    files = scan_files(tmp_path / "slices", table)
    train_subject = table.loc[table["split"] == "train", "subject"].iloc[0]
    test_scan = table.loc[table["split"] == "test", "scan"].iloc[0]
    write_scan_file(files[test_scan], test_scan, train_subject, 3)  # mislabelled slices of a test scan
    with pytest.raises(LeakageError, match=train_subject):
        write_shards(table, files, tmp_path / "shards", 4, "float16", SHARD_ATTRS)
    assert not (tmp_path / "shards").exists()


def test_shards_hold_each_split_in_scan_then_slice_order_with_contract_layout(tmp_path):
    table = small_split()
    files = scan_files(tmp_path / "slices", table, n=3)
    manifest = write_shards(table, files, tmp_path / "shards", 100, "float16", SHARD_ATTRS)
    folder = tmp_path / "shards"
    assert sorted(os.listdir(folder)) == ["manifest.json", "test-000.h5", "train-000.h5"]
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    with h5py.File(folder / "test-000.h5", "r") as f:
        test_scans = sorted(table.loc[table["split"] == "test", "scan"])
        assert list(f["scan"].asstr()[()]) == [s for s in test_scans for _ in range(3)]
        assert list(f["slice_index"][()]) == [40, 41, 42] * len(test_scans)
        assert f["images"].dtype == np.float16 and f["images"].chunks == (1, 16, 16)
        assert f["images"].compression == "gzip" and f["masks"].compression == "gzip"
        assert f["masks"].dtype == bool and f["slice_position"].dtype == np.float32
        assert f["slice_index"].dtype == np.int32
        assert dict(f.attrs) == {**SHARD_ATTRS, "split": "test", "format_version": 2}
        with h5py.File(files[test_scans[0]], "r") as source:  # slices reordered by slice index
            np.testing.assert_array_equal(f["images"][0], source["images"][2])
    assert manifest["splits"]["test"]["subjects"] == sorted(set(table.loc[table["split"] == "test", "subject"]))
    assert manifest["splits"]["train"]["n_slices"] == 3 * (table["split"] == "train").sum()


def test_shard_size_splits_a_split_across_numbered_files(tmp_path):
    table = small_split(5, sessions=1)  # 4 train scans x 3 slices = 12 slices
    files = scan_files(tmp_path / "slices", table, n=3)
    manifest = write_shards(table, files, tmp_path / "shards", 5, "float32", SHARD_ATTRS)
    train = shard_paths(tmp_path / "shards", "train")
    assert [p.name for p in train] == ["train-000.h5", "train-001.h5", "train-002.h5"]
    assert [e["n_slices"] for e in manifest["shards"] if e["split"] == "train"] == [5, 5, 2]
    with h5py.File(train[1], "r") as f:
        assert f["images"].dtype == np.float32
        train_scans = sorted(table.loc[table["split"] == "train", "scan"])
        assert list(f["subject"].asstr()[()]) == [train_scans[1]] * 1 + [train_scans[2]] * 3 + [train_scans[3]]


def test_failed_shard_write_keeps_the_previous_shards_and_leaves_no_temp_folder(tmp_path):
    table = small_split()
    files = scan_files(tmp_path / "slices", table)
    write_shards(table, files, tmp_path / "shards", 4, "float16", SHARD_ATTRS)
    before = sorted(os.listdir(tmp_path / "shards"))
    odd = table["scan"].iloc[-1]
    write_scan_file(files[odd], odd, table["subject"].iloc[-1], 3, size=24)
    with pytest.raises(ShardSizeError, match="24x24"):
        write_shards(table, files, tmp_path / "shards", 4, "float16", SHARD_ATTRS)
    assert sorted(os.listdir(tmp_path)) == ["shards", "slices"]
    assert sorted(os.listdir(tmp_path / "shards")) == before


# ------------------------------------------------------------------------------------------ reader


def all_items(dataset, num_workers: int) -> list[tuple]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=False, num_workers=num_workers)
    items = []
    for batch in loader:
        for k in range(len(batch["scan"])):
            items.append((batch["scan"][k], int(batch["slice_index"][k]), float(batch["slice_position"][k]),
                          batch["image"][k].numpy().tobytes(), batch["mask"][k].numpy().tobytes()))
    return items


def test_dataset_with_two_workers_returns_the_same_items_as_without(tiny_shards):
    dataset = ShardDataset(shard_paths(tiny_shards, "train"), with_masks=True)
    dataset[0]  # an open handle in the parent must not leak into the workers
    single, workers = all_items(dataset, 0), all_items(dataset, 2)
    assert len(single) == 48 and single == workers
    item = dataset[9]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 32, 32)
    assert item["mask"].dtype == torch.bool and item["scan"] == "S01" and item["slice_index"] == 1
    with h5py.File(tiny_shards / "train-000.h5", "r") as f:
        np.testing.assert_array_equal(item["image"][0].numpy(), f["images"][9].astype(np.float32))
    dataset.close()


def test_dataset_keeps_only_the_requested_subjects(tiny_shards):
    dataset = ShardDataset(shard_paths(tiny_shards, "train"), subjects={"S02", "S04"})
    assert len(dataset) == 16
    assert {dataset[i]["scan"] for i in range(len(dataset))} == {"S02", "S04"}
    assert "mask" not in dataset[0]


def test_shard_image_size_rejects_shards_of_different_sizes(tmp_path, tiny_shards):
    assert shard_image_size(shard_paths(tiny_shards, "train") + shard_paths(tiny_shards, "test")) == (32, 32)
    images, masks = synthetic_brain_slices(2, 16, 0)
    odd = write_shard(tmp_path / "train-001.h5", images, masks, ["X", "X"], ["X", "X"], [0, 1], [0.0, 1.0], "train")
    with pytest.raises(ShardSizeError, match="16x16"):
        shard_image_size([tiny_shards / "train-000.h5", odd])
    with pytest.raises(ShardSizeError):
        ShardDataset([tiny_shards / "train-000.h5", odd])


def test_shard_paths_names_the_folder_when_it_has_no_shards(tmp_path):
    with pytest.raises(ShardError, match=str(tmp_path)):
        shard_paths(tmp_path, "train")


# ---------------------------------------------------------------------------------------- montages


def test_qc_montage_writes_a_png_grid(tmp_path):
    images, masks = synthetic_brain_slices(5, 32, 0)
    path = qc_montage(images, masks, "IXI002", tmp_path / "qc" / "IXI002.png", labels=[40, 41, 42, 43, 44])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(path.parent) == ["IXI002.png"]


def test_scan_montage_of_an_excluded_scan_says_why(tmp_path):
    source = write_scan_file(tmp_path / "OAS1_0001_MR1.h5", "OAS1_0001_MR1", "OAS1_0001", 0, reason="mask empty")
    kept = write_scan_file(tmp_path / "IXI002.h5", "IXI002", "IXI002", 4)
    excluded_png = scan_montage(source, tmp_path / "excluded.png")
    kept_png = scan_montage(kept, tmp_path / "kept.png")
    assert excluded_png.stat().st_size > 0 and kept_png.stat().st_size > excluded_png.stat().st_size


# ------------------------------------------------------------------------------------------- rules


@pytest.mark.slow
def test_split_shards_and_montage_rules_run_under_snakemake(tmp_path):
    run = tmp_path / "results" / "demo"
    (run / "slices").mkdir(parents=True)
    scans, participants = cohort(6)
    participants["atrophy"] = np.linspace(0.1, 0.9, 6)  # a demo participants.tsv has it (the demo stratifies by it)
    scans["path"] = ""
    scans.to_csv(run / "subjects.tsv", sep="\t", index=False)
    participants.to_csv(run / "participants.tsv", sep="\t", index=False)
    (run / "qc").mkdir()
    (run / "qc" / "excluded_inputs.csv").write_text("scan,path,stage,reason\n")
    for k, row in enumerate(scans.itertuples()):
        write_scan_file(run / "slices" / f"{row.scan}.h5", row.scan, row.subject, 2 if k else 0, seed=k,
                        reason="" if k else "too small")
    # Stands in for rules/preprocess.smk's input functions (its checkpoint needs raw volumes).
    (tmp_path / "Snakefile").write_text(
        f'configfile: "{REPO}/config/config.yaml"\n'
        f'include: "{REPO}/rules/common.smk"\n'
        f"def discovered_scans(wildcards=None):\n    return {list(scans['scan'])!r}\n"
        "def discovered_slice_files(wildcards=None):\n"
        "    return [out(f'slices/{scan}.h5') for scan in discovered_scans()]\n"
        f'include: "{REPO}/rules/split.smk"\n'
        f'include: "{REPO}/rules/shards.smk"\n'
    )
    targets = ["results/demo/shards", "results/demo/qc/montage/S00.png"]
    command = [str(Path(sys.executable).with_name("snakemake")), *targets, "-s", str(tmp_path / "Snakefile"),
               "-d", str(tmp_path), "-c1", "--quiet", "all"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    split = read_split(run / "split.csv")
    assert "S00" not in set(split["scan"]) and len(split) == 5
    assert list(pd.read_csv(run / "qc" / "excluded.csv")["reason"]) == ["too small"]
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["n_slices"] + manifest["splits"]["test"]["n_slices"] == 10
    assert (run / "qc" / "montage" / "S00.png").exists() and (run / "logs" / "split.log").exists()


def test_importing_brainvq_data_and_shards_leaves_torch_and_sklearn_unloaded_for_light_per_scan_jobs():
    code = "import sys, brainvq.data, brainvq.shards; print('torch' in sys.modules, 'sklearn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_slices_file_with_no_slices_keeps_contract_layout(tmp_path):
    path = tmp_path / "slices.h5"
    write_slices_h5(path, np.zeros((0, 16, 16), np.float16), np.zeros((0, 16, 16), bool), [], [], [], [],
                    {"excluded_reason": "empty mask", "size": 16})
    with h5py.File(path) as f:
        assert f["images"].shape == (0, 16, 16) and f["images"].chunks == (1, 16, 16)
        assert f.attrs["excluded_reason"] == "empty mask"
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_shard_of_the_old_format_is_refused_with_the_rerun_advice(tiny_shards):
    path = tiny_shards / "train-000.h5"
    with h5py.File(path, "a") as f:
        f.move("subject", "participant")
        f.move("scan", "subject")
        del f.attrs["format_version"]
    with pytest.raises(ShardFormatError, match="shard format 1.*--forcerun slice_volume"):
        ShardDataset([path])


def test_shard_reader_selects_by_subject_or_by_scan_never_mixing_the_two(tmp_path):
    images, masks = synthetic_brain_slices(6, 16, 0)
    path = write_slices_h5(tmp_path / "train-000.h5", images, masks, ["A_MR1", "A_MR1", "A_MR2", "A_MR2", "B", "B"],
                           ["A", "A", "A", "A", "B", "B"], [0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1], {"split": "train"})
    assert len(ShardDataset([path], subjects={"A"})) == 4
    assert len(ShardDataset([path], subjects={"A_MR1"})) == 0
    assert len(ShardDataset([path], scans={"A_MR2"})) == 2
    item = ShardDataset([path], scans={"B"})[0]
    assert (item["scan"], item["subject"]) == ("B", "B")


def test_shards_refuse_slices_cut_at_another_pixel_size(tmp_path):
    table = small_split()
    files = scan_files(tmp_path / "slices", table, n=2)
    odd = sorted(files)[0]
    with h5py.File(files[odd], "a") as f:
        f.attrs["pixel_mm"] = 2.5
    with pytest.raises(ShardSizeError, match=f"{odd}.*2.5 mm"):
        write_shards(table, files, tmp_path / "shards", 100, "float16", {**SHARD_ATTRS, "pixel_mm": 1.875})
    assert not (tmp_path / "shards").exists()
