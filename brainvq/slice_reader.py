"""Reading one slice of a shard's ``images`` or ``masks`` the fastest way its storage layout allows.

A training step at 256 px on one GPU wants about 10,000 slices a second, so the per-slice cost of the reader
matters more than anything around it. h5py's own read of a ``(1, H, W)`` gzip chunk spends as much time in
HDF5's selection machinery as in inflating it; three paths avoid that:

- **contiguous, uncompressed** (``preprocess.shard_compression: none``, the default): a memory map of the
  dataset's bytes in the file; a slice is a view of the page cache, read at memory speed.
- **(1, H, W) chunks, gzip** (shards of ``shard_compression: gzip`` and of earlier versions, per-scan slices
  files): the chunk's stored bytes (``read_direct_chunk``) inflated by ``zlib`` here.
- **anything else** (other filters or chunk shapes): h5py's ``read_direct``, always correct.

Every path returns the same array (tests/test_slice_reader.py).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence

import h5py
import numpy as np

# HDF5 sets bit k of a chunk's filter mask when filter k was skipped for it (stored as is).
_DEFLATE_SKIPPED = 1


class SliceReader:
    """Rows of one ``(N, H, W)`` HDF5 dataset, read one at a time.

    Args:
        dataset: an open ``images`` or ``masks`` dataset; it must stay open while the reader is used.

    ``layout`` says which path it takes: ``"mapped"``, ``"inflated"`` or ``"hdf5"``.
    """

    def __init__(self, dataset: h5py.Dataset):
        self.dataset = dataset
        self.shape = tuple(dataset.shape[1:])
        self.dtype = dataset.dtype
        self._map = None
        if self._mappable(dataset):
            # Copy-on-write mode gives writable views (torch.from_numpy wants them); nothing is ever written.
            self._map = np.memmap(dataset.file.filename, dtype=dataset.dtype, mode="c",
                                  offset=dataset.id.get_offset(), shape=dataset.shape)
            self.layout = "mapped"
        elif self._inflatable(dataset):
            self.layout = "inflated"
        else:
            self.layout = "hdf5"

    @staticmethod
    def _mappable(dataset: h5py.Dataset) -> bool:
        return (dataset.chunks is None and dataset.compression is None and dataset.dtype.isnative
                and dataset.shape[0] > 0 and dataset.id.get_offset() is not None)

    @staticmethod
    def _inflatable(dataset: h5py.Dataset) -> bool:
        plain = not (dataset.shuffle or dataset.fletcher32 or dataset.scaleoffset is not None)
        return (dataset.chunks == (1, *dataset.shape[1:]) and dataset.compression == "gzip" and plain
                and dataset.dtype.isnative)

    def read(self, row: int) -> np.ndarray:
        """Return row ``row`` as an ``(H, W)`` array of the stored dtype (writable; a view of the map when mapped)."""
        if self._map is not None:
            return self._map[row]
        if self.layout == "inflated":
            mask, stored = self.dataset.id.read_direct_chunk((row,) + (0,) * len(self.shape))  # slices or volumes
            raw = stored if mask & _DEFLATE_SKIPPED else zlib.decompress(stored)
            return np.frombuffer(bytearray(raw), dtype=self.dtype).reshape(self.shape)
        buffer = np.empty(self.shape, self.dtype)
        self.dataset.read_direct(buffer, np.s_[row])
        return buffer


# ------------------------------------------------------------------------------------------- batches


def batch_tensor(shape: tuple[int, ...], dtype, shared_memory: bool = False):
    """Return an uninitialised tensor, in shared memory with ``shared_memory`` (allocated there directly, as
    torch's default collate does in a DataLoader worker, so sending it to the training process copies nothing)."""
    import torch

    if not shared_memory:
        return torch.empty(shape, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)
    storage = empty._typed_storage()._new_shared(math.prod(shape), device=empty.device)
    return empty.new(storage).view(shape)


class _Batches:
    """A map-style dataset whose items are whole batches: ``[indices]`` -> ``dataset.read_batch(indices)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, indices) -> dict:
        from torch.utils.data import get_worker_info

        return self.dataset.read_batch(indices, shared_memory=get_worker_info() is not None)


def batch_loader(dataset, batches: Iterable[Sequence[int]], workers: int, pin_memory: bool,
                 persistent: bool = False, seed: int = 0):
    """Return a DataLoader yielding ``dataset.read_batch(indices)`` for each ``indices`` of ``batches`` (a batch
    sampler, or a list of index lists), read in ``workers`` processes (0: in this one).

    One read per batch instead of one item each and a collate: each slice is copied once, from the shard into
    the batch. ``pin_memory`` copies batches into page-locked memory for fast, asynchronous transfers to CUDA;
    ``persistent`` keeps the workers between passes (a validation set read again and again). Worker seeds come
    from ``seed``, not the global RNG (a resumed run must consume that exactly like an uninterrupted one).
    """
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(_Batches(dataset), batch_size=None, sampler=batches, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
                      generator=torch.Generator().manual_seed(seed))
