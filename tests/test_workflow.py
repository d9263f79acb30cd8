"""The foundation end to end under real snakemake: a local folder with good and bad volumes → shards; stage
outputs that went missing are rebuilt; temporaries of killed jobs are cleaned."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from snakemake_helpers import TinyRun, copy_workflow, job_counts, tiny_config
from test_files import dead_pid
from test_qc import constant, debris, eight_cubed, saturated_in_noise, zero_sform

from brainvq.demo import write_oasis_like
from brainvq.workflow import rebuild_reason

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
VOXEL_MM = 4.5  # head_volume's 40 voxels then span 180 mm: an adult head for the QC gate


def head_volume(seed: int) -> np.ndarray:
    """A 40³-voxel 'head' (180 mm across at VOXEL_MM): an ellipsoid brain with two tissue levels."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, 40),) * 3, indexing="ij")
    r = np.sqrt((zz / 0.75) ** 2 + (yy / 0.85) ** 2 + (xx / 0.7) ** 2)
    volume = np.where(r < 0.9, 600.0, 0.0) + np.where(r < 0.5, 300.0, 0.0)
    return (volume + rng.normal(0, 5, volume.shape) * (r < 0.9)).clip(0).transpose(2, 1, 0)  # (x, y, z)


def head_affine() -> np.ndarray:
    """head_volume's voxel-to-world affine: VOXEL_MM voxels, centred."""
    affine = np.diag([VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = -VOXEL_MM * 39 / 2
    return affine


def write_local_folder(folder: Path) -> dict[str, Path]:
    """Four good scans (three NIfTI, one ASL Analyze) and the bad inputs of issue 16, each built small here;
    return the bad files by kind."""
    folder.mkdir()
    affine = head_affine()
    for i in range(3):
        nib.save(nib.Nifti1Image(head_volume(i).astype(np.int16), affine), folder / f"sub{i:02d}_T1.nii.gz")
    write_oasis_like(head_volume(3), affine, folder / "sub03_T1.hdr", zooms_mm=(2.0, 2.0, 2.0))
    truncated = folder / "sub04_T1.nii.gz"
    whole = gzip.compress(nib.Nifti1Image(head_volume(4).astype(np.int16), affine).to_bytes())
    truncated.write_bytes(whole[: len(whole) // 2])
    lonely_header = folder / "sub05_T1.hdr"
    write_oasis_like(head_volume(5), affine, lonely_header, zooms_mm=(2.0, 2.0, 2.0))
    lonely_header.with_suffix(".img").unlink()
    bad = {"truncated": truncated, "missing_pair": lonely_header}
    for i, (kind, write) in enumerate([("saturated", saturated_in_noise), ("constant", constant),
                                       ("tiny", eight_cubed), ("zero_affine", zero_sform)], start=6):
        bad[kind] = write(folder / f"sub{i:02d}_T1.nii.gz")
    return bad


# The error class that each bad input of write_local_folder is left out with (qc/excluded.csv's reason).
EXPECTED_REASONS = {"truncated": "CorruptVolumeError", "missing_pair": "MissingPairError",
                    "saturated": "ForegroundVolumeError", "constant": "IntensityLevelsError",
                    "tiny": "FieldOfViewError", "zero_affine": "AffineError"}


def run_workflow(workdir: Path, config: dict, target: str) -> subprocess.CompletedProcess:
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [SNAKEMAKE, "--cores", "2", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(REPO / "config" / "config.yaml"), str(config_file), "--", target]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def local_config(folder: Path, on_error: str) -> dict:
    return {
        "run": "local",
        "dataset": {"source": "local", "local_dir": str(folder), "analyze_orientation": "ASL"},
        "preprocess": {"size": 32, "spacing_mm": 2.0, "shard_size": 16, "on_error": on_error},
        "split": {"test_fraction": 0.25, "val_fraction": 0.0},
    }


@pytest.mark.slow
def test_bad_volumes_are_skipped_with_reasons_and_the_rest_become_leak_free_shards(tmp_path):
    bad = write_local_folder(tmp_path / "volumes")
    nib.save(debris(), tmp_path / "volumes" / "sub10_T1.nii.gz")  # passes discovery, not skull stripping
    result = run_workflow(tmp_path, local_config(tmp_path / "volumes", "skip"), "results/local/shards")
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "results" / "local"
    excluded = pd.read_csv(run / "qc" / "excluded.csv").set_index("path")
    for kind, path in bad.items():
        row = excluded.loc[str(path)]
        assert row["stage"] == "discover_subjects"
        assert row["reason"].startswith(EXPECTED_REASONS[kind] + ": "), (kind, row["reason"])
    stripped = excluded.loc[str(tmp_path / "volumes" / "sub10_T1.nii.gz")]
    assert stripped["stage"] == "skull_strip"
    assert stripped["reason"].startswith("ForegroundVolumeError: ") and "'head mask size'" in stripped["reason"]

    split = pd.read_csv(run / "split.csv")
    assert sorted(split["scan"]) == ["sub00", "sub01", "sub02", "sub03"]
    subjects, brightest = {}, 0.0
    for shard in sorted((run / "shards").glob("*.h5")):
        with h5py.File(shard) as f:
            images = f["images"][:]
            assert images.shape[1:] == (32, 32) and images.dtype == np.float16
            assert 0.0 <= images.min() and images.max() <= 1.0
            assert f["masks"].shape == images.shape
            brightest = max(brightest, float(images.max()))
            subjects.setdefault(f.attrs["split"], set()).update(s.decode() for s in f["subject"][:])
    assert brightest > 0.9  # scaled to the full [0, 1] range at the subject's upper percentile
    assert subjects["train"] and subjects["test"]
    assert not subjects["train"] & subjects["test"]

    ras = nib.load(run / "ras" / "sub03.nii.gz")
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert np.allclose(ras.header.get_zooms(), 2.0)


@pytest.mark.slow
def test_bad_volumes_stop_the_run_in_one_table_naming_every_file_and_leave_no_table(tmp_path):
    bad = write_local_folder(tmp_path / "volumes")
    result = run_workflow(tmp_path, local_config(tmp_path / "volumes", "fail"), "results/local/shards")
    assert result.returncode != 0
    assert "InvalidVolumesError: 6 volumes cannot be used" in result.stderr, result.stderr[-3000:]
    for kind, path in bad.items():
        assert re.search(rf"{re.escape(str(path))} +{EXPECTED_REASONS[kind]}: ", result.stderr), kind
    assert not (tmp_path / "results" / "local" / "subjects.tsv").exists()


# ---------------------------------------------------------------------------------------------- rebuilds


def test_a_missing_stage_output_is_due_for_a_rebuild_only_while_something_built_from_it_exists(tmp_path):
    split, shards, model = tmp_path / "split.csv", tmp_path / "shards", tmp_path / "model.pt"
    assert rebuild_reason([str(split)], [[str(shards)]]) == ""  # nothing built from it yet: snakemake builds it
    shards.mkdir()
    assert rebuild_reason([str(split)], [[str(shards)], [str(model)]]) == (
        f"{split} is missing while {shards}, built from it, exists")
    split.write_text("scan\n")
    assert rebuild_reason([str(split)], [[str(shards)]]) == ""


def test_a_folder_output_lacking_a_file_is_due_for_a_rebuild(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    lacking = {"train-000.h5"}
    assert rebuild_reason([str(shards)], [], lambda folder: sorted(lacking)) == f"{shards} lacks train-000.h5"
    lacking.clear()
    assert rebuild_reason([str(shards)], [], lambda folder: sorted(lacking)) == ""


@pytest.mark.slow
def test_missing_stage_outputs_are_rebuilt_with_until_and_temporaries_of_killed_jobs_are_cleaned(tmp_path):
    # The sequence of issue 16, on the tiny pipeline: each step used to report "Nothing to be done".
    run = TinyRun(copy_workflow(tmp_path / "workflow"), tmp_path / "work", tiny_config(tmp_path / "config.yaml"))
    results = run.workdir / "results" / "tiny"
    run.snakemake("--until", "write_shards")
    split_csv = (results / "split.csv").read_text()

    (results / "split.csv").unlink()
    assert job_counts(run.snakemake("--until", "write_shards", "--dry-run").stdout) == {"split": 1, "write_shards": 1}
    run.snakemake("--until", "write_shards")
    assert (results / "split.csv").read_text() == split_csv
    assert run.dry_run("--until", "write_shards") == {}, "a rebuild must not ask for another one"

    # A failed split removes split.csv; the next run with the config fixed rebuilds it.
    failing = tiny_config(tmp_path / "failing.yaml", {"split": {"stratify": "no_such_column"}})
    assert run.snakemake("--until", "write_shards", configfile=failing, check=False).returncode != 0
    assert not (results / "split.csv").exists()
    run.snakemake("--until", "write_shards")
    assert (results / "split.csv").read_text() == split_csv

    shard = sorted((results / "shards").glob("train-*.h5"))[0]
    shard.unlink()
    run.snakemake("--until", "write_shards")
    assert shard.exists()

    (results / "subjects.tsv").unlink()
    run.snakemake("--until", "write_shards")
    assert (results / "subjects.tsv").exists() and (results / "split.csv").read_text() == split_csv
    assert run.dry_run("--until", "write_shards") == {}

    # A reorient job killed mid-write leaves its hidden temporary and no output; its next run removes it.
    ras = sorted((results / "ras").glob("*.nii.gz"))[0]
    leftover = ras.with_name(f".{ras.name}.tmp-{dead_pid()}.nii.gz")
    os.replace(ras, leftover)
    run.snakemake(ras.relative_to(run.workdir))
    assert ras.exists() and not leftover.exists()
    assert not [p.name for p in results.rglob("*.tmp-*")]
