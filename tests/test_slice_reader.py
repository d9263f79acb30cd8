"""Reading shard slices by the fastest path each storage layout allows, one batch at a time (brainvq.slice_reader)."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import synthetic_brain_slices, write_shard

from brainvq.shards import ShardDataset, shard_paths, write_shards
from brainvq.slice_reader import SliceReader, batch_loader

ATTRS = {"spacing_mm": 1.0, "size": 24, "source": "synthetic", "config_hash": "test"}


def slices_files(folder, n_scans: int = 4, per: int = 5, size: int = 24) -> dict:
    folder.mkdir()
    files = {}
    for k in range(n_scans):
        images, masks = synthetic_brain_slices(per, size, seed=k)
        scan = f"S{k}"
        files[scan] = write_shard(folder / f"{scan}.h5", images, masks, [scan] * per, [scan] * per, range(per),
                                  np.linspace(0, 1, per), "")
    return files


def shards(tmp_path, compression: str):
    files = slices_files(tmp_path / f"slices-{compression}")
    split = pd.DataFrame({"scan": ["S0", "S1", "S2", "S3"], "subject": ["S0", "S1", "S2", "S3"], "session": "",
                          "split": ["train", "train", "train", "test"], "validation": False})
    out = tmp_path / f"shards-{compression}"
    write_shards(split, files, out, shard_size=7, dtype="float16", attrs=ATTRS, compression=compression)
    return out


@pytest.mark.parametrize(("compression", "layout"), [("none", "mapped"), ("gzip", "inflated")])
def test_each_shard_layout_reads_exactly_what_h5py_reads(tmp_path, compression, layout):
    for path in shard_paths(shards(tmp_path, compression), "train"):
        with h5py.File(path, "r") as f:
            images, masks = SliceReader(f["images"]), SliceReader(f["masks"])
            assert images.layout == layout
            for row in range(f["images"].shape[0]):
                np.testing.assert_array_equal(images.read(row), f["images"][row])
                np.testing.assert_array_equal(masks.read(row), f["masks"][row])


def test_other_filters_fall_back_to_hdf5_and_read_the_same(tmp_path):
    data = np.random.default_rng(0).random((3, 8, 8)).astype(np.float16)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("shuffled", data=data, chunks=(1, 8, 8), compression="gzip", shuffle=True)
        f.create_dataset("two_rows", data=data, chunks=(2, 8, 8), compression="gzip")
        for name in ("shuffled", "two_rows"):
            reader = SliceReader(f[name])
            assert reader.layout == "hdf5"
            np.testing.assert_array_equal(np.stack([reader.read(k) for k in range(3)]), data)


def test_uncompressed_and_gzip_shards_give_the_same_batches(tmp_path):
    plain = ShardDataset(shard_paths(shards(tmp_path, "none"), "train"), with_masks=True)
    packed = ShardDataset(shard_paths(shards(tmp_path, "gzip"), "train"), with_masks=True)
    order = [14, 0, 7, 3, 8, 1]  # across shards and out of order
    a, b = plain.read_batch(order), packed.read_batch(order)
    assert a["image"].shape == (6, 1, 24, 24) and a["image"].dtype == torch.float32 and a["mask"].dtype == torch.bool
    for key in ("image", "mask", "slice_index", "slice_position"):
        torch.testing.assert_close(a[key], b[key])
    assert a["scan"] == b["scan"] == [plain.index["scan"][i] for i in order]
    item = plain[7]
    torch.testing.assert_close(item["image"], a["image"][2])
    assert item["scan"] == a["scan"][2] and item["slice_index"] == int(a["slice_index"][2])


def test_batch_loader_with_workers_yields_the_batches_read_in_this_process(tmp_path):
    dataset = ShardDataset(shard_paths(shards(tmp_path, "none"), "train"), with_masks=True)
    batches = [[0, 5, 10], [14, 13], [2]]
    dataset.read_batch([0])  # an open map in the parent must not leak into the workers
    for workers in (0, 2):
        got = list(batch_loader(dataset, batches, workers, pin_memory=False, persistent=workers > 0))
        for indices, batch in zip(batches, got, strict=True):
            expected = dataset.read_batch(indices)
            torch.testing.assert_close(batch["image"], expected["image"])
            assert batch["scan"] == expected["scan"]


def test_write_shards_refuses_an_unknown_compression(tmp_path):
    files = slices_files(tmp_path / "slices", n_scans=2)
    split = pd.DataFrame({"scan": ["S0", "S1"], "subject": ["S0", "S1"], "session": "", "split": ["train", "test"],
                          "validation": False})
    with pytest.raises(ValueError, match="shard compression 'lz4'"):
        write_shards(split, files, tmp_path / "out", 8, "float16", ATTRS, compression="lz4")
