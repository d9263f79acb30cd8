"""Shared plumbing for the two trainers: device choice, seeding, atomic checkpoints, history CSV."""

from __future__ import annotations

import contextlib
import csv
import os
import random
from pathlib import Path

import numpy as np
import torch

from brainvq.files import atomic_path, write_text_atomic


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, or written under another configuration."""


def select_device(preference: str = "auto") -> torch.device:
    """Return CUDA when present (or asked for), else the CPU."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible; set device: auto or cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_context(device: torch.device, enabled: bool = True):
    """Return a bf16 autocast context on CUDA, a no-op context on the CPU (fp32 keeps CPU runs exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint_atomic(state: dict, path: str | Path) -> None:
    """Write ``state`` with torch.save to a temporary name, then rename, so a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def differing_keys(saved: dict, expected: dict, prefix: str = "") -> list[str]:
    """Return the dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(saved) | set(expected)):
        a, b = saved.get(key, "<missing>"), expected.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} (checkpoint: {a!r}, config: {b!r})")
    return keys


def load_checkpoint(path: str | Path, expected_config: dict | None = None, map_location="cpu") -> dict:
    """Return a checkpoint dict loaded with ``weights_only=True``.

    If ``expected_config`` is given, the checkpoint's ``config`` entry must match it for the keys
    that shape the model; otherwise CheckpointError names the differing keys.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}. Delete it to start over.") from error
    if expected_config is not None:
        diff = differing_keys(state.get("config", {}), expected_config)
        if diff:
            raise CheckpointError(
                f"checkpoint {path} was written with another configuration; differing keys: "
                + "; ".join(diff)
                + ". Restore those settings, or delete the checkpoint to train from scratch."
            )
    return state


class HistoryWriter:
    """Append-only ``history.csv`` that stays consistent across resume (rows after the resume step are dropped)."""

    def __init__(self, path: str | Path, fieldnames: list[str], resume_step: int | None = None):
        self.path = Path(path)
        self.fieldnames = fieldnames
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        # Rewritten atomically: a kill here must not lose the rows a resume keeps; rows are then appended.
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict) -> None:
        """Append one row (missing fields are left empty)."""
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fieldnames, extrasaction="ignore").writerow(row)


def file_digest(path: str | Path) -> str:
    """Return the SHA-256 of a file (small files: manifests, split and index tables)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def archive_stale_checkpoints(checkpoint_dir: str | Path, settings: dict) -> Path | None:
    """Move ``checkpoint_dir`` aside when it was written under other ``settings``; record the current ones.

    A Snakemake rerun after a kill has the same settings, so training resumes; a rerun because a
    parameter or an input changed starts from scratch, and the old checkpoints are kept (renamed
    ``<dir>-stale-N``) rather than deleted. Returns the archive path, or None when nothing moved.
    """
    import json

    checkpoint_dir = Path(checkpoint_dir)
    record = checkpoint_dir / "settings.json"
    current = json.dumps(settings, sort_keys=True, default=str)
    archived = None
    if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        saved = record.read_text() if record.exists() else None
        if saved != current:
            n = 1
            while (archived := checkpoint_dir.with_name(f"{checkpoint_dir.name}-stale-{n}")).exists():
                n += 1
            os.replace(checkpoint_dir, archived)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, current)
    return archived
