"""Writing the codes of every scan (brainvq.quantize) with a tiny trained autoencoder, on the tiny contract shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from brainvq.data import LeakageError
from brainvq.models import NotDiscreteError
from brainvq.quantize import write_codes
from brainvq.training import load_vqvae, train_vqvae
from conftest import TEST_SCANS, TRAIN_SCANS, write_split_csv
from conftest import tiny_vqvae_section as tiny_section

torch.set_num_threads(1)


@pytest.fixture
def run(tiny_shards, tmp_path):
    """(shards_dir, split_csv, out_dir) of a tiny run."""
    return tiny_shards, write_split_csv(tmp_path / "split.csv"), tmp_path / "vqvae"


def test_quantize_writes_one_code_file_per_scan_in_its_split_folder_in_slice_order(run, tmp_path):
    shards, split_csv, out = run
    train_vqvae(tiny_section(steps=2), shards, split_csv, out)
    index = write_codes(out / "model.pt", shards, split_csv, tmp_path / "codes", batch_size=5)
    codes = tmp_path / "codes"
    assert sorted(p.name for p in (codes / "train").iterdir()) == [f"{s}.npy" for s in TRAIN_SCANS]
    assert sorted(p.name for p in (codes / "test").iterdir()) == [f"{s}.npy" for s in TEST_SCANS]
    array = np.load(codes / "test" / "T01.npy")
    assert array.dtype == np.int16 and array.shape == (8, 8, 8)
    written = pd.read_csv(codes / "index.csv")
    assert list(written.columns) == ["subject", "scan", "split", "slice_index", "slice_position", "file", "row"]
    assert len(written) == len(index) == 64
    assert set(written.loc[written["split"] == "test", "scan"]) == set(TEST_SCANS)
    t01 = written[written["scan"] == "T01"]
    assert t01["slice_index"].tolist() == sorted(t01["slice_index"]) and t01["row"].tolist() == list(range(8))
    # The codes are the model's codes of those slices.
    model = load_vqvae(out / "model.pt")
    from brainvq.shards import ShardDataset, shard_paths

    dataset = ShardDataset(shard_paths(shards, "test"), subjects={"T01"})
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    order = np.argsort(dataset.index["slice_index"].to_numpy())
    np.testing.assert_array_equal(array, model.encode_indices(images).numpy()[order])


def test_quantize_refuses_shards_holding_a_scan_of_the_other_split_and_writes_nothing(run, tmp_path):
    shards, split_csv, out = run
    train_vqvae(tiny_section(steps=2), shards, split_csv, out)
    moved = write_split_csv(tmp_path / "moved.csv", train=TRAIN_SCANS[1:], test=TEST_SCANS + ["S00"])
    with pytest.raises(LeakageError, match="S00"):
        write_codes(out / "model.pt", shards, moved, tmp_path / "codes", batch_size=8)
    assert not (tmp_path / "codes").exists()
    assert not list(tmp_path.glob(".codes*"))


def test_quantize_refuses_a_model_without_codes(run, tmp_path):
    shards, split_csv, out = run
    train_vqvae(tiny_section(steps=1, bottleneck="ae"), shards, split_csv, out)
    with pytest.raises(NotDiscreteError, match="vq or fsq"):
        write_codes(out / "model.pt", shards, split_csv, tmp_path / "codes", batch_size=8)
