"""Shared fixtures: tiny, contract-conformant data made in the test (see docs/architecture.md)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvq.shards import write_slices_h5
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


# ---- tiny training runs (tests/test_training.py, test_quantize.py, test_prior.py, test_sampling.py, test_engine.py)

TRAIN_SCANS = [f"S{i:02d}" for i in range(6)]
TEST_SCANS = ["T00", "T01"]


def killed_at_step(task_class, step: int):
    """Return a replacement for ``task_class.loss_terms`` that raises KeyboardInterrupt (a kill) at ``step``."""
    real = task_class.loss_terms

    def killed(self, output, batch, at: int):
        if at == step:
            raise KeyboardInterrupt("killed")
        return real(self, output, batch, at)

    return killed


def tiny_vqvae_section(**overrides) -> dict:
    """The schema's vqvae section, shrunk to a model that trains on ``tiny_shards`` in seconds."""
    from brainvq.config import load_config

    settings = {
        "channels": [4, 8], "latent_dim": 4, "codebook_size": 16, "batch_size": 4, "steps": 6, "warmup_steps": 2,
        "workers": 0, "log_every": 1, "val_every": 3, "checkpoint_every": 2, "eval_batch_size": 16,
        "dead_code_steps": 2, "device": "cpu",
    }
    return load_config(overrides={"vqvae": {**settings, **overrides}})["vqvae"]


def write_split_csv(path, validation=("S05",), test=TEST_SCANS, train=TRAIN_SCANS):
    """Write a split.csv for ``tiny_shards``: one subject per scan, ``validation`` held out of training."""
    import pandas as pd

    rows = [{"scan": s, "subject": s, "session": "", "split": "train", "validation": s in validation} for s in train]
    rows += [{"scan": s, "subject": s, "session": "", "split": "test", "validation": False} for s in test]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def tiny_pixelcnn_config(**overrides) -> dict:
    """The schema's pixelcnn defaults, shrunk to a model that trains in seconds on one CPU thread."""
    from brainvq.config import load_config

    config = load_config()["pixelcnn"]
    config.update(channels=16, layers=2, head_channels=32, cond_channels=4, batch_size=16, lr=0.01,
                  warmup_steps=5, steps=20, log_every=5, val_every=10, checkpoint_every=5, device="cpu")
    config.update(overrides)
    return config


def as_maps(codes: np.ndarray, positions=None, labels=None):
    """Code maps (N, h, w) as brainvq.prior.CodeMaps, at slice position 0.5 unless given."""
    from brainvq.prior import CodeMaps

    positions = np.full(len(codes), 0.5, np.float32) if positions is None else np.asarray(positions, np.float32)
    return CodeMaps(codes, positions, labels, np.array(["synthetic"] * len(codes), object))


def train_tiny_prior(tmp_path, train, val, codebook_size: int, classes=(), name="run", **overrides):
    """Train a tiny prior into ``tmp_path/name``; return (summary, [model.pt, history.csv, checkpoints/last.pt])."""
    from brainvq.prior import train_prior

    paths = [tmp_path / name / f for f in ("model.pt", "history.csv", "checkpoints/last.pt")]
    summary = train_prior(train, val, tiny_pixelcnn_config(**overrides), codebook_size, list(classes),
                          tmp_path / name, progress=False)
    return summary, paths


@pytest.fixture(scope="session")
def labelled_prior(tmp_path_factory):
    """A prior trained on 6x6 maps (K=8) whose codes are 4 * label + 2 * (position > 0.5) + a fair coin."""
    from brainvq.prior import load_prior

    tmp = tmp_path_factory.mktemp("prior")
    rng = np.random.default_rng(0)
    labels, positions = np.arange(64) % 2, rng.random(64)
    codes = 4 * labels[:, None, None] + 2 * (positions > 0.5)[:, None, None] + rng.integers(0, 2, (64, 6, 6))
    maps = as_maps(codes, positions, labels)
    _, (model_path, _, _) = train_tiny_prior(tmp, maps, maps, 8, classes=["F", "M"], steps=100,
                                             condition_label="sex")
    return load_prior(model_path)
