"""The trained autoencoder's codes of every scan (rule quantize): ``codes/{split}/{scan}.npy`` and
``codes/index.csv``: one code map per slice ``(n_slices, h, w)``, or with whole volumes (``preprocess.dims: 3``)
one code volume per scan ``(d, h, w)``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from brainvq.data import SPLITS, LeakageError, read_split
from brainvq.files import atomic_path
from brainvq.models import VQVAE, CodeUsage, NotDiscreteError
from brainvq.runtime import select_device
from brainvq.shards import ShardDataset, shard_paths
from brainvq.slice_reader import batch_loader
from brainvq.training import load_vqvae

log = logging.getLogger(__name__)

# The codes/index.csv contract (docs/architecture.md): one row per slice, in slice order within each scan
# (one row per scan for volumes, slice_index -1).
INDEX_COLUMNS = ["subject", "scan", "split", "slice_index", "slice_position", "file", "row"]


class ShardMismatchError(RuntimeError):
    """Shards that do not fit the model or split.csv (image size, scans missing or in the wrong split)."""


@torch.no_grad()
def split_codes(model: VQVAE, dataset: ShardDataset, device: torch.device, batch_size: int,
                workers: int = 0) -> np.ndarray:
    """Return the codes ``(N, h, w)`` int16 of every slice of ``dataset`` (``(N, d, h, w)`` of every volume), in
    its order."""
    batches = [range(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size)]
    loader = batch_loader(dataset, batches, workers, pin_memory=device.type == "cuda")
    chunks = [model.encode_indices(batch["image"].to(device)).to(torch.int16).cpu().numpy() for batch in loader]
    return np.concatenate(chunks)


def _check_split_scans(split: str, dataset: ShardDataset, split_df: pd.DataFrame, shards_dir: Path) -> list[str]:
    """Return the scans of ``split`` in split.csv, after checking the shards hold exactly those."""
    expected = set(split_df.loc[split_df["split"] == split, "scan"])
    present = set(dataset.index["scan"])
    foreign = sorted(present - expected)
    if foreign:
        raise LeakageError(
            f"{split} shards in {shards_dir} hold scans that split.csv does not put in {split}: {foreign[:10]}; "
            "re-run write_shards so the shards match split.csv"
        )
    missing = sorted(expected - present)
    if missing:
        raise ShardMismatchError(
            f"split.csv lists {split} scans with no slices in {shards_dir}: {missing[:10]}; "
            "re-run write_shards so the shards match split.csv"
        )
    return sorted(expected)


def write_codes(model_path: str | Path, shards_dir: str | Path, split_csv: str | Path, codes_dir: str | Path,
                batch_size: int, device: str = "auto", workers: int = 0) -> pd.DataFrame:
    """Write ``codes/{split}/{scan}.npy`` (int16, ``(n_slices, h, w)`` in slice order; ``(d, h, w)`` for a
    volume) for every scan of split.csv, and ``codes/index.csv``; return the index.

    The folder is written under a temporary name and renamed when complete.

    Raises:
        NotDiscreteError: the model has no codes (bottleneck ae or vae).
        ShardMismatchError: the shards' image size differs from the model's, or a scan has no slices.
        brainvq.data.LeakageError: a shard holds a scan of the other split.
    """
    codes_dir, shards_dir = Path(codes_dir), Path(shards_dir)
    torch_device = select_device(device)
    model = load_vqvae(model_path, torch_device)
    if not model.is_discrete:
        raise NotDiscreteError(
            f"{model_path} has bottleneck {type(model.bottleneck).__name__}, which has no codes; "
            "train with vqvae.bottleneck vq or fsq to quantize"
        )
    split_df = read_split(split_csv)
    tables = []
    with atomic_path(codes_dir) as tmp:
        for split in SPLITS:
            dataset = ShardDataset(shard_paths(shards_dir, split))
            if tuple(dataset.image_size) != tuple(model.image_size):
                raise ShardMismatchError(
                    f"{split} shards in {shards_dir} are {dataset.image_size} px but {model_path} was trained on "
                    f"{model.image_size}; re-run train_vqvae after changing preprocess.size"
                )
            scans = _check_split_scans(split, dataset, split_df, shards_dir)
            codes = split_codes(model, dataset, torch_device, batch_size, workers)
            usage = CodeUsage(model.codebook_size)
            usage.update(torch.from_numpy(codes.astype(np.int64)))
            log.info("%s: %d slices of %d scans, %d/%d codes used", split, len(codes), len(scans), usage.used,
                     model.codebook_size)
            (tmp / split).mkdir(parents=True)
            by_scan = dataset.index.groupby("scan", sort=False)
            for scan in scans:
                rows = by_scan.get_group(scan).sort_values("slice_index", kind="stable")
                name = f"{split}/{scan}.npy"
                scan_codes = codes[rows.index.to_numpy()]
                # A volume's codes are one 3D array: the scan's single item.
                np.save(tmp / name, scan_codes[0] if len(dataset.image_size) == 3 else scan_codes)
                tables.append(pd.DataFrame({
                    "subject": rows["subject"].to_numpy(), "scan": scan, "split": split,
                    "slice_index": rows["slice_index"].to_numpy(), "slice_position": rows["slice_position"].to_numpy(),
                    "file": name, "row": np.arange(len(rows)),
                }))
            dataset.close()
        table = pd.concat(tables, ignore_index=True)[INDEX_COLUMNS]
        table.to_csv(tmp / "index.csv", index=False)
    return table

