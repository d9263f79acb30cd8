"""HDF5 slices files and shards: writing them, the PyTorch shard reader and per-scan QC montages.

Contracts (paths, HDF5 layout) are in docs/architecture.md. The shard writer refuses to write anything if
a subject would end up in both splits (brainvq.data decides the split).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from brainvq.data import (
    SPLITS,
    LeakageError,
    ShardError,
    ShardFormatError,
    ShardSizeError,
    SplitError,
    assert_subjects_disjoint,
    slice_file_exclusion,
    text_attr,
)
from brainvq.files import atomic_path, save_figure_atomic
from brainvq.slice_reader import SliceReader, batch_tensor

# torch is imported where used: shard and per-scan montage jobs run without torch (preprocess env).

log = logging.getLogger(__name__)

# Small per-slice datasets: the reader builds its index from these without touching the images.
METADATA_DATASETS = ("scan", "subject", "slice_index", "slice_position")
SHARD_DATASETS = ("images", "masks") + METADATA_DATASETS
# Version 2: datasets `scan` (the volume) and `subject` (the person); version 1 called them `subject` and
# `participant`. Files of another version are refused rather than misread.
SHARD_FORMAT_VERSION = 2
SHARD_COMPRESSIONS = ("none", "gzip")  # of shard images: preprocess.shard_compression


# -------------------------------------------------------------------------------------------- shards


def _strings(dataset) -> np.ndarray:
    """Return an HDF5 string dataset as a numpy array of ``str``."""
    return np.asarray(dataset.asstr()[()], dtype=object)


def check_shard_format(f: h5py.File, path: Path) -> None:
    """Raise ShardFormatError unless the open file ``f`` is in SHARD_FORMAT_VERSION with every contract dataset."""
    version = int(f.attrs.get("format_version", 1))
    if version != SHARD_FORMAT_VERSION:
        raise ShardFormatError(
            f"{path} is in shard format {version} but this brainvq reads format {SHARD_FORMAT_VERSION} "
            "(format 1 stored the scan key as 'subject' and the subject as 'participant'); it was written by "
            "another version. Re-run preprocessing: delete results/<run>/slices and results/<run>/shards, or "
            "run snakemake with --forcerun slice_volume"
        )
    missing = [name for name in SHARD_DATASETS if name not in f]
    if missing:
        raise ShardError(f"{path} lacks datasets {missing}; re-create it (slice_volume / write_shards)")


def read_slice_metadata(path: str | Path) -> dict:
    """Return the per-slice metadata of a slices/shard file: the METADATA_DATASETS and ``shape`` (N, H, W).

    Raises:
        ShardFormatError: when the file is of another shard format version.
        ShardError: when the file cannot be opened or lacks a contract dataset.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            check_shard_format(f, path)
            return {
                "scan": _strings(f["scan"]),
                "subject": _strings(f["subject"]),
                "slice_index": f["slice_index"][()].astype(np.int32),
                "slice_position": f["slice_position"][()].astype(np.float32),
                "shape": tuple(int(d) for d in f["images"].shape),
            }
    except OSError as error:
        raise ShardError(f"cannot read {path}: {error}; delete it and re-run the rule that writes it") from error


def assert_written_subjects_disjoint(subjects_by_split: Mapping[str, set[str]]) -> None:
    """Raise LeakageError if a subject is about to be written to more than one split."""
    train, test = subjects_by_split.get("train", set()), subjects_by_split.get("test", set())
    leaked = sorted(train & test)
    if leaked:
        raise LeakageError(f"subjects found in slices of both train and test scans: {leaked}; "
                           "the slices files disagree with split.csv — re-run slice_volume and split")


def write_slices_h5(
    path: str | Path,
    images: np.ndarray,
    masks: np.ndarray,
    scans,
    subjects,
    slice_index,
    slice_position,
    attrs: dict,
) -> Path:
    """Write slices in the shard layout of docs/architecture.md, atomically; return ``path``.

    Args:
        path: the .h5 file to write.
        images: (N, H, W) slices or (N, D, H, W) volumes, float16/float32 in [0, 1] (stored with this dtype).
        masks: bool, the shape of ``images``.
        scans: N scan keys (dataset ``scan``); subjects: N subject IDs (dataset ``subject``).
        slice_index: N axial indices; slice_position: N positions in [0, 1].
        attrs: file attributes (spacing_mm, size, source, config_hash, split, excluded_reason...).
    """
    shape = tuple(images.shape[1:])
    # maxshape lets an excluded scan (N = 0) keep the (1, H, W) (or (1, D, H, W)) chunking of the contract.
    chunked = dict(chunks=(1, *shape), maxshape=(None, *shape), compression="gzip")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=images, **chunked)
        f.create_dataset("masks", data=np.asarray(masks, bool), **chunked)
        strings = h5py.string_dtype()
        f.create_dataset("scan", data=np.array(list(scans), dtype=object), dtype=strings, maxshape=(None,))
        f.create_dataset("subject", data=np.array(list(subjects), dtype=object), dtype=strings, maxshape=(None,))
        f.create_dataset("slice_index", data=np.asarray(slice_index, np.int32), maxshape=(None,))
        f.create_dataset("slice_position", data=np.asarray(slice_position, np.float32), maxshape=(None,))
        f.attrs.update(attrs)
        f.attrs["format_version"] = SHARD_FORMAT_VERSION
    return Path(path)


def shard_plan(scan_counts: Sequence[tuple[str, int]], shard_size: int) -> list[list[tuple[str, int, int]]]:
    """Return, per shard, the ``(scan, start, stop)`` row ranges that fill it, in order.

    Args:
        scan_counts: ``(scan, n_slices)`` in the order slices are concatenated.
        shard_size: slices per shard (the last shard may be smaller).
    """
    shards: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    room = shard_size
    for scan, count in scan_counts:
        start = 0
        while start < count:
            take = min(room, count - start)
            current.append((scan, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], shard_size
    if current:
        shards.append(current)
    return shards


def _ordered_scan_arrays(path: Path, metadata: dict) -> dict:
    """Return a slices file's arrays with rows ordered by slice index."""
    order = np.argsort(metadata["slice_index"], kind="stable")
    with h5py.File(path, "r") as f:
        images, masks = f["images"][()], f["masks"][()]
    arrays = {name: metadata[name][order] for name in METADATA_DATASETS}
    arrays["images"], arrays["masks"] = images[order], masks[order].astype(bool)
    return arrays


def _write_shard(path: Path, pieces: list[tuple[str, int, int]], arrays_of, image_shape: tuple[int, ...],
                 dtype: str, attrs: dict, compression: str) -> dict:
    """Write one shard from ``pieces`` (items of ``image_shape``: slices or volumes); return its manifest entry."""
    n = sum(stop - start for _, start, stop in pieces)
    shape, chunks = (n, *image_shape), (1, *image_shape)
    # Uncompressed images are stored contiguous, so the reader can map them (brainvq.slice_reader).
    layout = {"chunks": chunks, "compression": "gzip"} if compression == "gzip" else {}
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", shape, dtype=dtype, **layout)
        masks = f.create_dataset("masks", shape, dtype=bool, chunks=chunks, compression="gzip")
        meta = {name: [] for name in METADATA_DATASETS}
        row = 0
        for scan, start, stop in pieces:
            arrays = arrays_of(scan)
            images[row:row + stop - start] = arrays["images"][start:stop].astype(dtype)
            masks[row:row + stop - start] = arrays["masks"][start:stop]
            for name in METADATA_DATASETS:
                meta[name].append(arrays[name][start:stop])
            row += stop - start
        for name in ("scan", "subject"):
            f.create_dataset(name, data=np.concatenate(meta[name]).astype(object), dtype=h5py.string_dtype())
        f.create_dataset("slice_index", data=np.concatenate(meta["slice_index"]).astype(np.int32))
        f.create_dataset("slice_position", data=np.concatenate(meta["slice_position"]).astype(np.float32))
        f.attrs.update(attrs)
        f.attrs["format_version"] = SHARD_FORMAT_VERSION
    subjects = sorted(set(np.concatenate(meta["subject"])))
    return {"file": path.name, "split": attrs["split"], "n_slices": n,
            "n_scans": len({scan for scan, _, _ in pieces}), "n_subjects": len(subjects)}



def write_shards(split_df: pd.DataFrame, slice_files: Mapping[str, str | Path], out_dir: str | Path,
                 shard_size: int, dtype: str, attrs: Mapping, compression: str = "gzip") -> dict:
    """Write ``{split}-NNN.h5`` shards and ``manifest.json`` into ``out_dir``, atomically.

    Slices of each split are concatenated in scan order, then slice-index order, and cut into shards
    of ``shard_size`` slices. Nothing is written when a subject would land in both splits.

    Args:
        split_df: the split table (``read_split``).
        slice_files: scan key -> slices/{scan}.h5, for every scan in ``split_df``.
        out_dir: the shards folder; written under a temporary name and renamed when complete.
        shard_size: slices per shard.
        dtype: image dtype in the shards (``float16`` or ``float32``).
        attrs: shard attributes (``spacing_mm``, ``size``, ``source``, ``config_hash``); ``split`` is added.
        compression: images as ``"gzip"`` (1, H, W) chunks or ``"none"`` (contiguous, read by memory map); the
            workflow passes ``preprocess.shard_compression``. Masks are always gzip chunks.

    Returns:
        The manifest written to ``manifest.json``.

    Raises:
        LeakageError: a subject in both splits, by the table or by the slices files' participants.
        SplitError: a scan of the table has no slices file.
        ShardSizeError: slices files disagree on the image size.
    """
    out_dir = Path(out_dir)
    if compression not in SHARD_COMPRESSIONS:
        raise ValueError(f"shard compression {compression!r} (preprocess.shard_compression): "
                         f"use one of {SHARD_COMPRESSIONS}")
    assert_subjects_disjoint(split_df)
    missing = sorted(set(split_df["scan"]) - set(slice_files))
    if missing:
        raise SplitError(f"no slices file for scans {missing[:10]} of split.csv; run slice_volume for them")
    scans_by_split = {s: sorted(split_df.loc[split_df["split"] == s, "scan"]) for s in SPLITS}
    metadata = {scan: read_slice_metadata(slice_files[scan]) for scans in scans_by_split.values() for scan in scans}
    # Second leakage check, on what would actually be written rather than on the table.
    assert_written_subjects_disjoint({s: {p for scan in scans for p in metadata[scan]["subject"]}
                                      for s, scans in scans_by_split.items()})
    for split, scans in scans_by_split.items():
        if not sum(metadata[scan]["shape"][0] for scan in scans):
            raise ShardError(f"split {split!r} has no slices to write (scans: {scans}); check qc/excluded.csv")
    image_shape = _common_image_shape({Path(slice_files[scan]): m["shape"] for scan, m in metadata.items()
                                       if m["shape"][0] > 0})
    if "pixel_mm" in attrs:
        check_pixel_size([Path(slice_files[scan]) for scan, m in metadata.items() if m["shape"][0] > 0],
                         float(attrs["pixel_mm"]))

    cache: dict[str, dict] = {}

    def arrays_of(scan: str) -> dict:
        # A scan spans at most two consecutive shards: keep only the latest one in memory.
        if scan not in cache:
            cache.clear()
            cache[scan] = _ordered_scan_arrays(Path(slice_files[scan]), metadata[scan])
        return cache[scan]

    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        entries = []
        for split, scans in scans_by_split.items():
            plan = shard_plan([(scan, metadata[scan]["shape"][0]) for scan in scans], shard_size)
            for k, pieces in enumerate(plan):
                path = tmp / f"{split}-{k:03d}.h5"
                entries.append(_write_shard(path, pieces, arrays_of, image_shape, dtype, {**attrs, "split": split},
                                            compression))
                log.info("wrote %s (%d slices)", path.name, entries[-1]["n_slices"])
        manifest = shard_manifest(entries, split_df, metadata, image_shape, dtype, shard_size, attrs)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def shard_manifest(entries: list[dict], split_df: pd.DataFrame, metadata: Mapping[str, dict],
                   image_shape: tuple[int, ...], dtype: str, shard_size: int, attrs: Mapping) -> dict:
    """Return the manifest: shards with counts, and per split its subjects, scans and slice count."""
    splits = {}
    for split in SPLITS:
        rows = split_df[split_df["split"] == split]
        scans = sorted(rows["scan"])
        splits[split] = {
            "n_slices": int(sum(metadata[scan]["shape"][0] for scan in scans)),
            "n_scans": len(scans),
            "subjects": sorted(set(rows["subject"])),
            "validation_subjects": sorted(set(rows.loc[rows["validation"], "subject"])),
        }
    return {"shards": entries, "splits": splits, "image_shape": list(image_shape), "dtype": dtype,
            "shard_size": shard_size, **{k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()}}


# -------------------------------------------------------------------------------------------- reader


def missing_shard_files(shards_dir: str | Path) -> list[str]:
    """Return the files a shards folder should hold but lacks: the shards its manifest.json lists, or the manifest."""
    shards_dir = Path(shards_dir)
    try:
        manifest = json.loads((shards_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return ["manifest.json"]
    return [entry["file"] for entry in manifest.get("shards", []) if not (shards_dir / entry["file"]).is_file()]


def shard_paths(shards_dir: str | Path, split: str) -> list[Path]:
    """Return the ``{split}-NNN.h5`` shards of a shards folder, in order.

    Raises:
        ShardError: when ``split`` is unknown or the folder has no such shards.
    """
    if split not in SPLITS:
        raise ShardError(f"unknown split {split!r}; use one of {SPLITS}")
    paths = sorted(Path(shards_dir).glob(f"{split}-*.h5"))
    if not paths:
        raise ShardError(f"no {split}-*.h5 shards in {shards_dir}; run the write_shards rule")
    return paths


def _common_image_shape(shapes: Mapping[Path, tuple[int, ...]]) -> tuple[int, ...]:
    """Return the one item shape shared by all files ((H, W); (D, H, W) for volumes), or raise ShardSizeError."""
    distinct = {tuple(shape[1:]) for shape in shapes.values()}
    if len(distinct) != 1:
        by_size = {}
        for path, shape in shapes.items():
            by_size.setdefault(tuple(shape[1:]), []).append(str(path))
        raise ShardSizeError(
            "files disagree on image size: "
            + "; ".join(f"{'x'.join(map(str, size))}: {paths[:3]}" for size, paths in sorted(by_size.items()))
            + ". Re-run preprocessing with one preprocess.size so every file has the same size"
        )
    (size,) = distinct
    return size


def check_pixel_size(paths: Iterable[Path], pixel_mm: float) -> None:
    """Raise ShardSizeError naming the slices files whose ``pixel_mm`` attribute differs from ``pixel_mm``."""
    odd = []
    for path in paths:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("pixel_mm")
        if value is not None and not np.isclose(float(value), pixel_mm):
            odd.append(f"{path} ({float(value):g} mm)")
    if odd:
        raise ShardSizeError(f"slices files with another pixel size than the run's {pixel_mm:g} mm: {odd[:5]}; "
                             "they were cut under other preprocess settings. Re-run slice_volume for them")


def shard_image_size(paths: Iterable[str | Path]) -> tuple[int, ...]:
    """Return the (H, W) image size shared by all shards ((D, H, W) for shards of volumes).

    Raises:
        ShardSizeError: when the shards disagree.
        ShardError: when ``paths`` is empty or a shard cannot be read.
    """
    shapes = {}
    for path in map(Path, paths):
        try:
            with h5py.File(path, "r") as f:
                shapes[path] = tuple(f["images"].shape)
        except (OSError, KeyError) as error:
            raise ShardError(f"cannot read images of shard {path}: {error}; re-run write_shards") from error
    if not shapes:
        raise ShardError("no shards given; run the write_shards rule")
    return _common_image_shape(shapes)


def shard_index(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Return one row per slice of the shards ``paths``, in order: ``file`` (index into ``paths``), ``row``,
    ``scan``, ``subject``, ``slice_index``, ``slice_position``; read from the small metadata datasets only."""
    frames = []
    for k, path in enumerate(paths):
        meta = read_slice_metadata(path)
        frames.append(pd.DataFrame({"file": k, "row": np.arange(meta["shape"][0]),
                                    **{name: meta[name] for name in METADATA_DATASETS}}))
    return pd.concat(frames, ignore_index=True)


def shard_chunks(paths: Iterable[str | Path], with_masks: bool = True):
    """Yield each shard whole as a dict of arrays: ``images`` (float32), ``masks`` (bool, with ``with_masks``)
    and the METADATA_DATASETS."""
    for path in paths:
        meta = read_slice_metadata(path)
        with h5py.File(path, "r") as f:
            chunk = {"images": f["images"][()].astype(np.float32)}
            if with_masks:
                chunk["masks"] = f["masks"][()].astype(bool)
        chunk.update({name: meta[name] for name in METADATA_DATASETS})
        yield chunk


def load_shard_rows(paths: Sequence[str | Path], rows: pd.DataFrame, dataset: str = "images") -> np.ndarray:
    """Return ``dataset`` (images as float32, masks as bool) of ``rows`` (``shard_index`` rows), in their order."""
    out = [None] * len(rows)
    for k, group in rows.reset_index(drop=True).groupby("file"):
        order = np.argsort(group["row"].to_numpy(), kind="stable")
        wanted = group["row"].to_numpy()[order]
        unique, inverse = np.unique(wanted, return_inverse=True)  # h5py wants increasing, distinct rows
        with h5py.File(paths[k], "r") as f:
            block = f[dataset][unique][inverse]
        for position, image in zip(group.index.to_numpy()[order], block):
            out[position] = image
    if not out:
        return np.zeros((0, 1, 1), np.float32)
    stacked = np.stack(out)
    return stacked.astype(bool) if dataset == "masks" else stacked.astype(np.float32)


class ShardDataset:
    """Slices of HDF5 shards as a map-style dataset for ``torch.utils.data.DataLoader``.

    Each item is ``{"image": (1, H, W) float32 tensor, "scan": str, "subject": str,
    "slice_index": int, "slice_position": float}`` plus ``"mask": (1, H, W) bool tensor`` with
    ``with_masks``. ``index`` (a DataFrame: file, row, scan, subject, slice_index,
    slice_position) describes the items in order; ``image_size`` is (H, W). Shards of whole volumes
    (``preprocess.dims: 3``) give one item per scan, ``image`` (1, D, H, W).

    Safe with DataLoader workers: the index comes from the small metadata datasets, read and closed
    in ``__init__``; image files are opened lazily, once per process, on first access.

    Args:
        shard_paths: shard files (e.g. ``shard_paths(shards_dir, "train")``).
        subjects: keep only slices of these subjects (None keeps all).
        scans: keep only slices of these scans (None keeps all).
        with_masks: also return the brain mask.
    """

    def __init__(self, shard_paths: Sequence[str | Path], subjects: set[str] | None = None,
                 scans: set[str] | None = None, with_masks: bool = False):
        self.paths = [Path(p) for p in shard_paths]
        if not self.paths:
            raise ShardError("ShardDataset got no shard files; run the write_shards rule")
        self.with_masks = with_masks
        self.image_size = shard_image_size(self.paths)
        index = shard_index(self.paths)
        if subjects is not None:
            index = index[index["subject"].isin(set(subjects))]
        if scans is not None:
            index = index[index["scan"].isin(set(scans))]
        self.index = index.reset_index(drop=True)
        # Plain arrays: DataFrame.iloc costs more per item than reading the image itself.
        self._columns = {name: self.index[name].to_numpy() for name in self.index.columns}
        self._handles: dict[int, tuple[h5py.File, h5py.Dataset, h5py.Dataset]] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _datasets(self, k: int) -> tuple[h5py.File, SliceReader, SliceReader]:
        """Return (file, images reader, masks reader) of shard ``k``, opened once per process."""
        # A handle inherited across fork is unsafe in HDF5: reopen in every new process.
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            f = h5py.File(self.paths[k], "r")
            self._handles[k] = (f, SliceReader(f["images"]), SliceReader(f["masks"]))
        return self._handles[k]

    def __getitem__(self, i: int) -> dict:
        batch = self.read_batch([i])
        item = {name: values[0] for name, values in batch.items()}
        return {**item, "slice_index": int(item["slice_index"]), "slice_position": float(item["slice_position"])}

    def read_batch(self, indices: Sequence[int], shared_memory: bool = False) -> dict:
        """Return items ``indices`` collated as a DataLoader collates items: ``image`` (B, 1, H, W) float32
        (``mask`` bool), ``slice_index`` int64 and ``slice_position`` float64 tensors, ``scan`` and ``subject``
        lists. Slices are read in shard and row order straight into the batch, in shared memory with
        ``shared_memory`` (a DataLoader worker's batch then reaches the training process without a copy; see
        :func:`brainvq.slice_reader.batch_loader`)."""
        import torch

        indices = np.asarray(indices, dtype=np.int64)
        columns = self._columns
        files, rows = columns["file"][indices], columns["row"][indices]
        shape = (len(indices), 1, *self.image_size)
        images = batch_tensor(shape, torch.float32, shared_memory)
        masks = batch_tensor(shape, torch.bool, shared_memory) if self.with_masks else None
        for k in np.lexsort((rows, files)):
            _, image_reader, mask_reader = self._datasets(int(files[k]))
            images[k, 0].copy_(torch.from_numpy(image_reader.read(int(rows[k]))))
            if masks is not None:
                masks[k, 0].copy_(torch.from_numpy(mask_reader.read(int(rows[k]))))
        batch = {
            "image": images,
            "scan": list(columns["scan"][indices]),
            "subject": list(columns["subject"][indices]),
            "slice_index": torch.from_numpy(columns["slice_index"][indices].astype(np.int64)),
            "slice_position": torch.from_numpy(columns["slice_position"][indices].astype(np.float64)),
        }
        return batch if masks is None else {**batch, "mask": masks}

    def __getstate__(self) -> dict:
        # Open handles cannot be pickled (spawned workers); each process opens its own.
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def close(self) -> None:
        """Close the files this process opened."""
        if self._pid == os.getpid():
            for handle, _, _ in self._handles.values():
                handle.close()
        self._handles = {}


# ------------------------------------------------------------------------------------------ montages


def read_scan_slices(path: str | Path) -> dict:
    """Return a slices/{scan}.h5 file's images, masks, slice_index (ordered by slice) and excluded_reason."""
    path = Path(path)
    metadata = read_slice_metadata(path)
    arrays = _ordered_scan_arrays(path, metadata)
    with h5py.File(path, "r") as f:
        arrays["excluded_reason"] = text_attr(f.attrs.get("excluded_reason", ""))
    return arrays


def qc_montage(images: np.ndarray, masks: np.ndarray | None, title: str, path: str | Path,
               labels: Sequence | None = None, max_tiles: int = 64, tile_inches: float = 1.2) -> Path:
    """Write a PNG grid of slices with the mask outline in red, each tile labelled.

    Args:
        images: ``(N, H, W)`` in [0, 1].
        masks: ``(N, H, W)`` bool, or None for no outline.
        title: figure title (the scan key).
        path: output PNG.
        labels: per-slice labels (slice indices); defaults to 0..N-1.
        max_tiles: at most this many evenly spaced slices are shown, so large scans stay readable.
        tile_inches: size of one tile.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # Figure alone renders with Agg: no global backend switch

    path = Path(path)
    n = len(images)
    if n == 0:
        return excluded_montage(title, "no slices kept", path)
    labels = list(range(n)) if labels is None else list(labels)
    shown = np.unique(np.linspace(0, n - 1, min(n, max_tiles)).round().astype(int))
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(cols * tile_inches, rows * tile_inches + 0.4), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(np.asarray(images[i], np.float32), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if masks is not None and masks[i].any() and not masks[i].all():
            ax.contour(np.asarray(masks[i], np.float32), levels=[0.5], colors="red", linewidths=0.5)
        ax.set_title(f"z={labels[i]}", fontsize=6, pad=1)
    fig.suptitle(f"{title}: {n} slices" + (f", {len(shown)} shown" if len(shown) < n else ""), fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (rows * tile_inches + 0.4), wspace=0.05,
                        hspace=0.25)
    save_figure_atomic(fig, path)
    return path


def excluded_montage(title: str, reason: str, path: str | Path) -> Path:
    """Write a small PNG saying that scan ``title`` was excluded and why; return ``path``."""
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(4, 1.5), dpi=100)
    fig.text(0.5, 0.6, f"{title}: excluded", ha="center", va="center", fontsize=10, weight="bold")
    fig.text(0.5, 0.3, reason, ha="center", va="center", fontsize=8, wrap=True)
    save_figure_atomic(fig, path)
    return path


def scan_montage(slices_file: str | Path, path: str | Path, title: str | None = None) -> Path:
    """Write the QC montage of one slices/{scan}.h5 file (or the exclusion notice); return ``path``."""
    slices_file = Path(slices_file)
    title = title or slices_file.stem
    stage, reason = slice_file_exclusion(slices_file)
    if reason:
        return excluded_montage(title, f"{stage}: {reason}", path)
    arrays = read_scan_slices(slices_file)
    if arrays["images"].ndim == 4:  # a volumes/{scan}.h5 file: its axial slices, inferior to superior
        return qc_montage(arrays["images"][0], arrays["masks"][0], title, path, max_tiles=36)
    return qc_montage(arrays["images"], arrays["masks"], title, path, labels=arrays["slice_index"])
