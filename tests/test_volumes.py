"""Whole volumes (preprocess.dims 3): the box cut of brainvq.volumes, its per-scan file, shards of volumes."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from brainvq.config import load_config
from brainvq.shards import ShardDataset, shard_image_size, shard_paths, write_shards
from brainvq.preprocessing import PreprocessingError, shard_geometry
from brainvq.volumes import scan_volume, volume_box_voxels, write_volume_file

# 2 mm voxels, a 40 x 48 x 32 mm box: 20 (x) x 24 (y) x 16 (z) voxels, every side a multiple of 4.
SETTINGS = load_config(overrides={"preprocess": {"dims": 3, "spacing_mm": 2.0, "box_mm": [40, 48, 32],
                                                 "dtype": "float32"}})["preprocess"]


def ras_head(seed: int, shape=(30, 34, 26), centre=(15, 17, 13)) -> tuple[np.ndarray, np.ndarray]:
    """A RAS volume ``(x, y, z)``: an ellipsoid 'brain' with a bright marker in its right, anterior, superior
    corner; return (volume, mask)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) - c for n, c in zip(shape, centre)), indexing="ij")
    mask = (x / 8) ** 2 + (y / 10) ** 2 + (z / 6) ** 2 < 1
    volume = np.where(mask, 400 + rng.normal(0, 10, shape), 0.0)
    volume[(x > 3) & (y > 4) & (z > 2) & mask] = 900  # right (x+), anterior (y+), superior (z+)
    return volume.astype(np.float32), mask


def test_a_volume_is_cut_to_the_configured_physical_box_centred_on_its_mask():
    volume, mask = ras_head(0)
    result = scan_volume(volume, mask, SETTINGS)
    assert volume_box_voxels(SETTINGS) == (16, 24, 20)  # (z, y, x): axial images stacked inferior to superior
    assert result["images"].shape == result["masks"].shape == (1, 16, 24, 20)
    assert result["excluded_reason"] == "" and result["voxel_mm"] == 2.0
    image, box_mask = result["images"][0], result["masks"][0]
    assert box_mask.sum() == mask.sum()  # the whole brain fits: nothing cropped
    assert 0 <= image.min() and image.max() == pytest.approx(1.0) and (image[~box_mask] == 0).all()
    occupied = [np.flatnonzero(box_mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    for axis, side in zip(occupied, (16, 24, 20)):  # centred: equal margins (within a voxel) on both sides
        assert abs(axis[0] - (side - 1 - axis[-1])) <= 1
    bright = np.argwhere(image > 0.99).mean(axis=0)
    centre = np.argwhere(box_mask).mean(axis=0)
    # superior = higher axial index; anterior = upper rows; right = right-hand columns.
    assert bright[0] > centre[0] and bright[1] < centre[1] and bright[2] > centre[2]


def test_a_brain_larger_than_the_box_is_cropped_and_a_smaller_one_zero_padded():
    small = load_config(overrides={"preprocess": {"dims": 3, "spacing_mm": 2.0, "box_mm": [16, 16, 16]}})["preprocess"]
    volume, mask = ras_head(1)
    cropped = scan_volume(volume, mask, small)
    assert cropped["images"].shape == (1, 8, 8, 8) and cropped["masks"][0].all()
    large = load_config(overrides={"preprocess": {"dims": 3, "spacing_mm": 2.0, "box_mm": [80, 80, 80]}})["preprocess"]
    padded = scan_volume(volume, mask, large)
    assert padded["images"].shape == (1, 40, 40, 40) and padded["masks"][0].sum() == mask.sum()


def test_an_empty_mask_excludes_the_scan_with_its_reason_and_keeps_the_file_layout(tmp_path):
    volume, mask = ras_head(2)
    result = scan_volume(volume, np.zeros_like(mask), SETTINGS)
    assert result["images"].shape == (0, 16, 24, 20) and "empty mask" in result["excluded_reason"]
    path = write_volume_file(tmp_path / "S00.h5", result, "S00", "S00", {"spacing_mm": 2.0, **shard_geometry(SETTINGS)})
    with h5py.File(path) as f:
        assert f["images"].shape == (0, 16, 24, 20) and f["images"].chunks == (1, 16, 24, 20)
        assert f.attrs["excluded_stage"] == "skull_strip"


def test_a_box_the_model_cannot_downsample_is_refused_naming_the_keys():
    with pytest.raises(PreprocessingError, match="vqvae.downsample=8"):
        volume_box_voxels(SETTINGS, downsample=8)  # 20 x 24 x 16 voxels: 20 and 24 are not multiples of 8
    odd = {**SETTINGS, "box_mm": [41, 48, 32]}
    with pytest.raises(PreprocessingError, match="box_mm"):
        volume_box_voxels(odd)


def test_a_3d_shard_round_trips_every_volume_with_its_mask_and_provenance(tmp_path):
    scans = [f"S{i:02d}" for i in range(5)]
    split = pd.DataFrame({"scan": scans, "subject": scans, "session": "",
                          "split": ["train", "train", "train", "test", "test"], "validation": False})
    attrs = {"spacing_mm": 2.0, **shard_geometry(SETTINGS), "source": "synthetic", "config_hash": "abc"}
    results, files = {}, {}
    for k, scan in enumerate(scans):
        results[scan] = scan_volume(*ras_head(k, centre=(15 + k % 2, 17, 13 - k % 3)), SETTINGS)
        files[scan] = write_volume_file(tmp_path / "volumes" / f"{scan}.h5", results[scan], scan, scan, attrs)
    manifest = write_shards(split, files, tmp_path / "shards", shard_size=2, dtype="float16", attrs=attrs)

    assert [p.name for p in shard_paths(tmp_path / "shards", "train")] == ["train-000.h5", "train-001.h5"]
    assert shard_image_size(shard_paths(tmp_path / "shards", "test")) == (16, 24, 20)
    assert manifest["splits"]["test"]["n_slices"] == 2  # one item per volume
    with h5py.File(tmp_path / "shards" / "test-000.h5") as f:
        assert f.attrs["dims"] == 3 and list(f.attrs["box_mm"]) == [40, 48, 32] and f.attrs["voxel_mm"] == 2.0
        assert f["images"].chunks == (1, 16, 24, 20) and f["masks"].dtype == bool
    dataset = ShardDataset(shard_paths(tmp_path / "shards", "train"), with_masks=True)
    assert len(dataset) == 3 and dataset.image_size == (16, 24, 20)
    for i in range(3):
        item = dataset[i]
        scan = item["scan"]
        assert item["image"].shape == item["mask"].shape == (1, 16, 24, 20)
        np.testing.assert_allclose(item["image"][0].numpy(), results[scan]["images"][0], atol=1e-3)  # float16
        np.testing.assert_array_equal(item["mask"][0].numpy(), results[scan]["masks"][0])


# ----------------------------------------------------------------------------------- the 3D workflow


@pytest.mark.slow
def test_a_tiny_3d_run_writes_code_volumes_3d_metrics_and_a_som_report(tmp_path):
    from snakemake_helpers import REPO, run_snakemake, tiny_config

    # 4 mm voxels in a 160 x 192 x 160 mm box: 40 x 48 x 40 volumes, 10 x 12 x 10 code volumes.
    config = tiny_config(tmp_path / "tiny3d.yaml", {
        "run": "tiny3d",
        "preprocess": {"dims": 3, "spacing_mm": 4.0, "box_mm": [160, 192, 160], "shard_size": 4},
        "vqvae": {"bottleneck": "som", "som_topology": "toroidal", "channels": [8, 16], "latent_dim": 8,
                  "codebook_size": 16, "batch_size": 2, "eval_batch_size": 2, "steps": 12, "val_every": 6,
                  "checkpoint_every": 6, "log_every": 3},
    })
    run_snakemake("--snakefile", REPO / "Snakefile", "--directory", tmp_path, "--cores", "2",
                  "--configfile", REPO / "config" / "config.yaml", config, timeout=900)
    run = tmp_path / "results" / "tiny3d"
    split = pd.read_csv(run / "split.csv")
    for row in split.itertuples():
        with h5py.File(run / "volumes" / f"{row.scan}.h5") as f:
            assert f["images"].shape == f["masks"].shape == (1, 40, 48, 40)
        codes = np.load(run / "codes" / row.split / f"{row.scan}.npy")
        assert codes.shape == (10, 12, 10) and codes.dtype == np.int16 and 0 <= codes.min() <= codes.max() < 16
    assert not (run / "prior").exists() and not (run / "samples").exists()  # the prior and sampler are 2D

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["dims"] == 3 and metrics["n_test_scans"] == (split["split"] == "test").sum()
    means = {name: value["over_scans"]["mean"] for name, value in metrics["reconstruction"].items()}
    assert 0 < means["ssim_gaussian"] < 1 and 0 < means["ssim_uniform7"] < 1 and means["psnr_db"] > 5
    assert set(metrics["ssim_windows"]) == {"ssim_gaussian", "ssim_uniform7"}
    assert 1 <= metrics["codebook"]["codes_used"] <= 16 and metrics["codebook"]["perplexity"] >= 1
    som = metrics["som"]
    assert som["topology"] == "toroidal" and som["embedding_correlation"]["n_neighbour_pairs"] == 2 * 16
    per_scan = pd.read_csv(run / "eval" / "per_scan.csv")
    assert sorted(per_scan["scan"]) == sorted(split.loc[split["split"] == "test", "scan"])
    html = (run / "report" / "index.html").read_text()
    assert "uniform" in html and "Gaussian" in html
    assert (run / "report" / "figures" / "som_grid.png").stat().st_size > 1000
