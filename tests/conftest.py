"""Shared fixtures: tiny, contract-conformant data made in the test (see docs/architecture.md)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvq.data import write_slices_h5
from brainvq.demo import synthetic_brain_slices  # noqa: F401 (tests import it from here)

# CI has 2 cores; tests are tiny, so one thread avoids oversubscription when pytest runs in parallel.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def write_shard(path: Path, images, masks, scans, subjects, slice_index, slice_position, split: str) -> Path:
    """Write one shard in the contract layout."""
    write_slices_h5(path, images.astype(np.float16), masks, scans, subjects, slice_index, slice_position,
                    {"spacing_mm": 1.0, "size": images.shape[1], "source": "synthetic", "config_hash": "test",
                     "split": split})
    return path


def t1_head(shape=(90, 100, 80), zooms=(2.0, 2.0, 2.0), dtype=np.int16, seed=0) -> nib.Nifti1Image:
    """A plausible adult T1 for the QC gate: a noisy ellipsoid head (radii 70, 85, 65 mm, about 1,600 cm3)
    on a background of low noise, centred, with scanner sform and qform."""
    grid = (np.indices(shape) - (np.asarray(shape)[:, None, None, None] - 1) / 2) * np.reshape(zooms, (3, 1, 1, 1))
    inside = ((grid / np.reshape([70, 85, 65], (3, 1, 1, 1))) ** 2).sum(0) < 1
    rng = np.random.default_rng(seed)
    data = np.where(inside, 600 + 200 * rng.standard_normal(shape), 20 + 5 * rng.standard_normal(shape))
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -np.asarray(zooms) * (np.asarray(shape) - 1) / 2
    img = nib.Nifti1Image(np.clip(data, 0, None).astype(dtype), affine)
    img.set_qform(affine, code=1)
    return img


@pytest.fixture
def tiny_shards(tmp_path) -> Path:
    """A shards/ folder with train-000.h5 (6 subjects) and test-000.h5 (2 subjects), 8 slices each, 32 px."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for split, subjects, seed in (("train", [f"S{i:02d}" for i in range(6)], 0), ("test", ["T00", "T01"], 1)):
        per = 8
        images, masks = synthetic_brain_slices(per * len(subjects), 32, seed)
        scans = [s for s in subjects for _ in range(per)]
        write_shard(
            folder / f"{split}-000.h5", images, masks, scans, scans,
            list(range(per)) * len(subjects), list(np.linspace(0, 1, per)) * len(subjects), split,
        )
    return folder
