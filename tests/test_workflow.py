"""The foundation end to end under real snakemake: a local folder with good and bad volumes → shards."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from brainvq.demo import write_oasis_like

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

pytestmark = pytest.mark.slow


def head_volume(seed: int) -> np.ndarray:
    """A 40 mm³-voxel 'head': an ellipsoid brain with two tissue levels, a marker in the right hemisphere."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, 40),) * 3, indexing="ij")
    r = np.sqrt((zz / 0.75) ** 2 + (yy / 0.85) ** 2 + (xx / 0.7) ** 2)
    volume = np.where(r < 0.9, 600.0, 0.0) + np.where(r < 0.5, 300.0, 0.0)
    return (volume + rng.normal(0, 5, volume.shape) * (r < 0.9)).clip(0).transpose(2, 1, 0)  # (x, y, z)


def write_local_folder(folder: Path) -> dict[str, Path]:
    """Four good scans (three NIfTI, one ASL Analyze) and two bad ones; return the bad files by kind."""
    folder.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -40
    for i in range(3):
        nib.save(nib.Nifti1Image(head_volume(i).astype(np.int16), affine), folder / f"sub{i:02d}_T1.nii.gz")
    write_oasis_like(head_volume(3), affine, folder / "sub03_T1.hdr")
    truncated = folder / "sub04_T1.nii.gz"
    whole = gzip.compress(nib.Nifti1Image(head_volume(4).astype(np.int16), affine).to_bytes())
    truncated.write_bytes(whole[: len(whole) // 2])
    lonely_header = folder / "sub05_T1.hdr"
    write_oasis_like(head_volume(5), affine, lonely_header)
    lonely_header.with_suffix(".img").unlink()
    return {"truncated": truncated, "missing_pair": lonely_header}


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


def test_bad_volumes_are_skipped_with_reasons_and_the_rest_become_leak_free_shards(tmp_path):
    bad = write_local_folder(tmp_path / "volumes")
    result = run_workflow(tmp_path, local_config(tmp_path / "volumes", "skip"), "results/local/shards")
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "results" / "local"
    excluded = pd.read_csv(run / "qc" / "excluded.csv")
    assert set(excluded["path"].map(lambda p: Path(p).name)) == {p.name for p in bad.values()}
    assert excluded["reason"].str.len().min() > 10

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


def test_a_bad_volume_stops_the_run_naming_the_file_and_leaves_no_table(tmp_path):
    bad = write_local_folder(tmp_path / "volumes")
    result = run_workflow(tmp_path, local_config(tmp_path / "volumes", "fail"), "results/local/shards")
    assert result.returncode != 0
    named = [p.name for p in bad.values() if p.name in result.stderr]
    assert named, result.stderr[-3000:]
    assert not (tmp_path / "results" / "local" / "subjects.tsv").exists()
