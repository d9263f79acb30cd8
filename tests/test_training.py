"""Training the autoencoder and writing codes (brainvq.training), on the tiny contract shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import structural_similarity

from brainvq import training
from brainvq.config import load_config
from brainvq.data import LeakageError, ShardSizeError
from brainvq.models import NotDiscreteError
from brainvq.runtime import CheckpointError, load_checkpoint
from brainvq.training import (
    EmptyTrainingSetError,
    GpuMemoryError,
    NonFiniteLossError,
    StepBatchSampler,
    Trainer,
    load_vqvae,
    ssim_per_image,
    train_vqvae,
    warmup_cosine,
    write_codes,
)
from conftest import synthetic_brain_slices, write_shard

torch.set_num_threads(1)

TRAIN_SCANS = [f"S{i:02d}" for i in range(6)]
TEST_SCANS = ["T00", "T01"]


def tiny_section(**overrides) -> dict:
    settings = {
        "channels": [4, 8], "latent_dim": 4, "codebook_size": 16, "batch_size": 4, "steps": 6, "warmup_steps": 2,
        "workers": 0, "log_every": 1, "val_every": 3, "checkpoint_every": 2, "eval_batch_size": 16,
        "dead_code_steps": 2, "device": "cpu",
    }
    return load_config(overrides={"vqvae": {**settings, **overrides}})["vqvae"]


def write_split_csv(path, validation=("S05",), test=TEST_SCANS, train=TRAIN_SCANS):
    rows = [{"scan": s, "subject": s, "session": "", "split": "train", "validation": s in validation} for s in train]
    rows += [{"scan": s, "subject": s, "session": "", "split": "test", "validation": False} for s in test]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def run(tiny_shards, tmp_path):
    """(shards_dir, split_csv, out_dir) of a tiny run."""
    return tiny_shards, write_split_csv(tmp_path / "split.csv"), tmp_path / "vqvae"


def weights(path) -> dict:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_writes_model_history_and_checkpoint_that_load_with_weights_only(run):
    shards, split_csv, out = run
    train_vqvae(tiny_section(), shards, split_csv, out)
    history = pd.read_csv(out / "history.csv")
    assert history["step"].tolist() == [1, 2, 3, 4, 5, 6]
    for column in ("loss", "recon_loss", "commitment", "perplexity", "codes_used", "lr", "slices_per_s", "grad_norm"):
        assert history[column].notna().all(), column
    assert history.loc[history["step"].isin([3, 6]), ["val_ssim", "val_psnr", "val_codes_used"]].notna().all().all()
    assert history.loc[~history["step"].isin([3, 6]), "val_ssim"].isna().all()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 6 and {"model", "optimizer", "scheduler", "rng", "config"} <= set(state)
    model = load_vqvae(out / "model.pt", "cpu")
    assert not model.training and model.image_size == (32, 32)
    assert model.encode_indices(torch.rand(2, 1, 32, 32)).shape == (2, 8, 8)


def test_validation_uses_only_the_validation_subjects(run, monkeypatch):
    shards, split_csv, out = run
    data = training.training_data(shards, split_csv)
    assert set(data.train.index["subject"]) == {"S00", "S01", "S02", "S03", "S04"}
    assert set(data.validation.index["subject"]) == {"S05"}


def test_batches_depend_only_on_seed_and_step_and_cover_each_slice_once_per_epoch():
    full = list(StepBatchSampler(10, 4, seed=3, start_step=0, stop_step=10))
    resumed = list(StepBatchSampler(10, 4, seed=3, start_step=6, stop_step=10))
    assert full[6:] == resumed
    assert sorted(sum(full[:5], [])[:10]) == list(range(10))
    other_seed = list(StepBatchSampler(10, 4, seed=4, start_step=0, stop_step=10))
    assert other_seed != full
    halves = [list(StepBatchSampler(10, 4, 3, 0, 10, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == full


def test_killed_and_resumed_training_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_shards, tmp_path,
                                                                                       monkeypatch):
    split_csv = write_split_csv(tmp_path / "split.csv")
    section = tiny_section(workers=1, steps=7, checkpoint_every=3)
    train_vqvae(section, tiny_shards, split_csv, tmp_path / "a")

    real_step = Trainer._step

    def killed_at_step_5(self, module, x, step):
        if step == 5:
            raise KeyboardInterrupt("killed")
        return real_step(self, module, x, step)

    monkeypatch.setattr(Trainer, "_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_vqvae(section, tiny_shards, split_csv, tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 3
    assert not (tmp_path / "b" / "model.pt").exists()
    monkeypatch.setattr(Trainer, "_step", real_step)
    train_vqvae(section, tiny_shards, split_csv, tmp_path / "b")

    assert_same_weights(weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "b" / "model.pt"))
    a, b = (pd.read_csv(tmp_path / d / "history.csv") for d in "ab")
    assert a["step"].tolist() == b["step"].tolist() == list(range(1, 8))
    pd.testing.assert_series_equal(a["loss"], b["loss"])


def test_two_gloo_processes_give_the_loss_of_one_process_on_the_same_global_batch(run, tmp_path):
    shards, split_csv, _ = run
    section = tiny_section(steps=3, checkpoint_every=3, val_every=3)
    train_vqvae(section, shards, split_csv, tmp_path / "one")
    train_vqvae({**section, "gpus": 2}, shards, split_csv, tmp_path / "two")
    one, two = (pd.read_csv(tmp_path / d / "history.csv") for d in ("one", "two"))
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(two["perplexity"], one["perplexity"], rtol=1e-4)
    np.testing.assert_allclose(two["val_ssim"].dropna(), one["val_ssim"].dropna(), rtol=1e-4)
    a, b = weights(tmp_path / "one" / "model.pt"), weights(tmp_path / "two" / "model.pt")
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-4, atol=1e-5)


def test_checkpoint_written_under_another_config_is_refused_naming_the_differing_key(run):
    shards, split_csv, out = run
    train_vqvae(tiny_section(steps=2), shards, split_csv, out)
    with pytest.raises(CheckpointError, match=r"codebook_size \(checkpoint: 16, config: 8\)"):
        train_vqvae(tiny_section(steps=2, codebook_size=8), shards, split_csv, out)


def test_settings_that_do_not_change_the_weights_do_not_block_resuming(run):
    shards, split_csv, out = run
    train_vqvae(tiny_section(steps=2), shards, split_csv, out)
    train_vqvae(tiny_section(steps=2, val_every=1, log_every=2, eval_batch_size=3), shards, split_csv, out)
    assert (out / "model.pt").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(run, monkeypatch):
    shards, split_csv, out = run
    real_loss = training.reconstruction_loss
    calls = {"n": 0}

    def nan_at_step_3(reconstruction, target, kind):
        calls["n"] += 1
        loss = real_loss(reconstruction, target, kind)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "reconstruction_loss", nan_at_step_3)
    with pytest.raises(NonFiniteLossError, match=r"step 3.*last good checkpoint.*vqvae.lr"):
        train_vqvae(tiny_section(), shards, split_csv, out)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists()


def test_cuda_out_of_memory_names_the_knobs_to_turn(run, monkeypatch):
    shards, split_csv, out = run

    def out_of_memory(self, module, x, step):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Trainer, "_step", out_of_memory)
    with pytest.raises(GpuMemoryError, match=r"vqvae.batch_size.*vqvae.channels.*preprocess.size"):
        train_vqvae(tiny_section(), shards, split_csv, out)


def test_training_subjects_missing_from_the_shards_are_an_empty_training_set(tiny_shards, tmp_path):
    split_csv = write_split_csv(tmp_path / "split.csv", train=["X00", "X01"], validation=("X01",))
    with pytest.raises(EmptyTrainingSetError, match="write_shards"):
        train_vqvae(tiny_section(), tiny_shards, split_csv, tmp_path / "vqvae")


def test_train_shards_of_different_image_sizes_are_refused(run):
    shards, split_csv, out = run
    images, masks = synthetic_brain_slices(4, 16, seed=2)
    write_shard(shards / "train-001.h5", images, masks, ["S00"] * 4, ["S00"] * 4, range(8, 12),
                np.linspace(0, 1, 4), "train")
    with pytest.raises(ShardSizeError, match="preprocess.size"):
        train_vqvae(tiny_section(), shards, split_csv, out)


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
    from brainvq.data import ShardDataset, shard_paths

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


@pytest.mark.parametrize("bottleneck", ["fsq", "vae"])
def test_other_bottlenecks_train_through_the_same_trainer(run, bottleneck):
    shards, split_csv, out = run
    train_vqvae(tiny_section(steps=3, bottleneck=bottleneck), shards, split_csv, out)
    history = pd.read_csv(out / "history.csv")
    assert np.isfinite(history["loss"]).all()
    if bottleneck == "vae":
        assert history["kl"].notna().all()


def test_torch_ssim_matches_skimage():
    images, _ = synthetic_brain_slices(2, 32, seed=4)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 0.05, images.shape), 0, 1).astype(np.float32)
    ours = ssim_per_image(torch.from_numpy(images)[:, None], torch.from_numpy(noisy)[:, None])
    reference = [structural_similarity(a, b, data_range=1.0) for a, b in zip(images, noisy)]
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5)


def test_learning_rate_warms_up_then_decays_to_zero():
    factor = warmup_cosine(warmup_steps=4, total_steps=20)
    values = [factor(s) for s in range(21)]
    assert values[0] == 0.25 and values[3] == 1.0 and values[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
