"""What ``evaluate`` reads, loaded once into an :class:`EvaluationRun` that every section measures from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from brainvq.data import read_split
from brainvq.prior import (
    bits_per_code,
    label_indices,
    load_code_rows,
    read_code_index,
    scan_labels,
    uniform_bits,
    unigram_bits,
)
from brainvq.runtime import seed_everything, select_device
from brainvq.shards import load_shard_rows, shard_index, shard_paths
from brainvq.training import load_vqvae


class EvaluationInputError(ValueError):
    """An input of the evaluation (model, split, shards, codes, samples) is missing, inconsistent or empty."""


@dataclass
class EvaluationInputs:
    """The files ``evaluate`` reads (see docs/architecture.md)."""

    split_csv: Path
    shards_dir: Path
    codes_dir: Path
    samples: Path


@dataclass
class PriorScorer:
    """The prior's scoring functions (``brainvq.prior``), bound to a loaded model by the caller.

    Attributes:
        bits_per_code: ``(codes (N,h,w), positions (N,), labels (N,)) -> float``, the test NLL in bits per code.
        uniform_bits: ``K -> float``.
        unigram_bits: ``(train_codes, test_codes, K) -> float``.
        labels: code-index rows (``codes/index.csv``) -> the prior's conditioning labels ``(N,)``.
        model: the loaded prior itself, for measures that need more than its likelihood (None in tests that
            only score).
        bits_map: ``(codes (N,h,w), positions (N,), labels (N,)) -> (N,h,w)``, the bits of every code (None when
            only the average is known; the brain-masked average is then missing).
    """

    bits_per_code: Callable[[np.ndarray, np.ndarray, np.ndarray], float]
    uniform_bits: Callable[[int], float]
    unigram_bits: Callable[[np.ndarray, np.ndarray, int], float]
    labels: Callable[[pd.DataFrame], np.ndarray]
    model: object | None = None
    bits_map: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None


@dataclass
class EvaluationResult:
    """What ``evaluate`` writes: the metrics dict, the per-slice and per-scan tables, figure arrays."""

    metrics: dict
    per_slice: pd.DataFrame
    per_scan: pd.DataFrame
    figures: dict = field(default_factory=dict)


@dataclass
class EvaluationRun:
    """Everything a section measures from: the run's tables, shards, codes and samples, and the loaded models.

    Attributes:
        split: split.csv.
        train_paths, test_paths: the shards of each split.
        test_slices: ``shard_index`` of the test shards (one row per test slice, in shard order).
        codes: each scan's code maps ``(n_slices, h, w)``, train and test.
        code_index: codes/index.csv.
        samples: samples.h5 as arrays (``read_samples``).
        model: the VQ-VAE (eval mode); prior: its scorer; codebook_size: K; device: where both live.
        settings: the ``evaluate`` config section; source_defaults: the data source's ``defaults``.
        shard_attrs: the first test shard's attributes (``pixel_mm``, ``mask_kind``, ... where written).
    """

    split: pd.DataFrame
    train_paths: list[Path]
    test_paths: list[Path]
    test_slices: pd.DataFrame
    codes: dict[str, np.ndarray]
    code_index: pd.DataFrame
    samples: dict
    model: object
    prior: PriorScorer
    codebook_size: int
    device: object
    settings: dict
    source_defaults: dict
    shard_attrs: dict = field(default_factory=dict)

    def index_of(self, split: str) -> pd.DataFrame:
        """Return the codes/index.csv rows of ``split`` in (scan, row) order."""
        rows = self.code_index[self.code_index["split"] == split]
        return rows.sort_values(["scan", "row"], ignore_index=True)

    def split_codes(self, split: str) -> np.ndarray:
        """Return every code map of ``split`` stacked ``(N, h, w)``, in the order of :meth:`index_of`."""
        scans = sorted(set(self.index_of(split)["scan"]))
        return np.concatenate([self.codes[s] for s in scans]) if scans else np.zeros((0, 0, 0), np.int64)

    def test_images(self, rows: np.ndarray) -> np.ndarray:
        """Return the test slices at ``rows`` (positions in ``test_slices``) ``(N, H, W)`` float32."""
        return load_shard_rows(self.test_paths, self.test_slices.iloc[np.asarray(rows, int)])

    def test_masks(self, rows: np.ndarray) -> np.ndarray:
        """Return the masks of the test slices at ``rows`` ``(N, H, W)`` bool."""
        return load_shard_rows(self.test_paths, self.test_slices.iloc[np.asarray(rows, int)], "masks")


def prior_scorer(prior_model, split_df: pd.DataFrame) -> PriorScorer:
    """Return the PriorScorer of a model from ``brainvq.prior.load_prior``; labels come from split.csv's
    column named by the prior's ``condition_label`` (none for an unconditioned prior)."""
    column = getattr(prior_model, "condition_label", None)
    by_scan = scan_labels(split_df, column) if column else {}
    return PriorScorer(
        bits_per_code=lambda codes, positions, labels: bits_per_code(prior_model, codes, positions, labels),
        uniform_bits=uniform_bits,
        unigram_bits=unigram_bits,
        labels=lambda rows: [by_scan[scan] for scan in rows["scan"]] if column else None,
        model=prior_model,
        bits_map=lambda codes, positions, labels: code_bits_map(prior_model, codes, positions, labels),
    )


@torch.no_grad()
def code_bits_map(prior_model, codes, positions, labels, batch_size: int = 64) -> np.ndarray:
    """Return the prior's negative log-likelihood in bits of every code ``(N, h, w)`` of code maps ``codes`` at
    slice ``positions`` with ``labels`` (label strings, for a label-conditioned prior)."""
    prior_model.eval()
    device = next(prior_model.parameters()).device
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    positions = torch.as_tensor(np.asarray(positions), dtype=torch.float32)
    label_idx = label_indices(prior_model, labels, len(codes))
    chunks = []
    for start in range(0, len(codes), batch_size):
        part = slice(start, start + batch_size)
        chunks.append(prior_model.code_bits(codes[part].to(device), positions[part].to(device),
                                            None if label_idx is None else label_idx[part].to(device)).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros(codes.shape, np.float32)


def vqvae_codebook_size(model, vqvae_path: str | Path, bottleneck: str) -> int:
    """Return the loaded VQ-VAE's codebook size K.

    Raises:
        EvaluationInputError: when the model has no codebook (a bottleneck other than vq or fsq).
    """
    size = getattr(model, "codebook_size", None)
    if not size:
        raise EvaluationInputError(f"{vqvae_path} has no codebook (vqvae.bottleneck={bottleneck}); "
                                   "evaluate needs vqvae.bottleneck vq or fsq")
    return int(size)


def evaluation_model(vqvae_path: str | Path, bottleneck: str, settings: dict, threads: int):
    """Return ``(model, device, codebook_size)``: the run's VQ-VAE loaded on the ``evaluate`` section's device, after
    setting ``threads`` torch threads and seeding everything with its ``seed`` (the start of both evaluate rules).

    Raises:
        EvaluationInputError: when the model has no codebook (:func:`vqvae_codebook_size`).
    """
    torch.set_num_threads(threads)
    seed_everything(settings["seed"])
    device = select_device(settings["device"])
    model = load_vqvae(vqvae_path, device)
    return model, device, vqvae_codebook_size(model, vqvae_path, bottleneck)


def read_samples(path: str | Path) -> dict:
    """Return samples.h5 as arrays: ``codes, images, slice_position, label``.

    Raises:
        EvaluationInputError: when the file or one of its datasets is missing, or it holds no samples.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("codes", "images", "slice_position", "label") if k not in f]
            if missing:
                raise EvaluationInputError(f"{path} lacks datasets {missing}; re-run the sample rule")
            samples = {k: f[k][()] for k in ("codes", "images", "slice_position", "label")}
    except OSError as error:
        raise EvaluationInputError(f"cannot read {path}: {error}; re-run the sample rule") from error
    if len(samples["images"]) == 0:
        raise EvaluationInputError(f"{path} holds no samples; raise sample.n and re-run the sample rule")
    samples["images"] = samples["images"].astype(np.float32)
    return samples


def shard_attributes(path: str | Path) -> dict:
    """Return a shard's HDF5 attributes as plain Python values."""
    with h5py.File(path, "r") as f:
        return {key: value.item() if isinstance(value, np.generic) else value for key, value in f.attrs.items()}


def code_maps_by_scan(codes_dir: str | Path, index: pd.DataFrame) -> dict[str, np.ndarray]:
    """Return each scan's code maps ``(n_slices, h, w)`` listed in ``index`` (codes/index.csv rows), in ``row``
    order."""
    index = index.sort_values(["scan", "row"], ignore_index=True)
    codes = load_code_rows(codes_dir, index)
    return {scan: codes[rows.to_numpy()] for scan, rows in index.groupby("scan", sort=True).groups.items()}


def evaluation_run(inputs: EvaluationInputs, model, prior: PriorScorer, codebook_size: int, settings: dict,
                   source_defaults: dict, device) -> EvaluationRun:
    """Return the run's inputs loaded for evaluation.

    Raises:
        EvaluationInputError: when the codes hold no test scan, or samples.h5 is unusable.
    """
    index = read_code_index(inputs.codes_dir)
    if (index["split"] == "test").sum() == 0:
        raise EvaluationInputError(f"{inputs.codes_dir}/index.csv lists no test codes; re-run the quantize rule")
    test_paths = shard_paths(inputs.shards_dir, "test")
    model.eval()
    return EvaluationRun(
        split=read_split(inputs.split_csv), train_paths=shard_paths(inputs.shards_dir, "train"),
        test_paths=test_paths, test_slices=shard_index(test_paths),
        codes=code_maps_by_scan(inputs.codes_dir, index), code_index=index, samples=read_samples(inputs.samples),
        model=model, prior=prior, codebook_size=codebook_size, device=device, settings=settings,
        source_defaults=source_defaults, shard_attrs=shard_attributes(test_paths[0]),
    )
