"""Shared fixtures: tiny, contract-conformant data made in the test (see docs/architecture.md)."""

from __future__ import annotations

import os
from pathlib import Path

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
