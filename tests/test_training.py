"""Training the autoencoder through the engine (brainvq.training), on the tiny contract shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import structural_similarity

from brainvq import training
from brainvq.data import ShardSizeError
from brainvq.engine import CheckpointError, GpuMemoryError, NonFiniteLossError, load_checkpoint
from brainvq.training import (
    EmptyTrainingSetError,
    VQVAETask,
    load_vqvae,
    ssim_per_image,
    train_vqvae,
)
from conftest import killed_at_step, synthetic_brain_slices, write_shard, write_split_csv
from conftest import tiny_vqvae_section as tiny_section

torch.set_num_threads(1)


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


def test_killed_and_resumed_training_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_shards, tmp_path,
                                                                                       monkeypatch):
    split_csv = write_split_csv(tmp_path / "split.csv")
    section = tiny_section(workers=1, steps=7, checkpoint_every=3)
    train_vqvae(section, tiny_shards, split_csv, tmp_path / "a")

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(VQVAETask, "loss_terms", killed_at_step(VQVAETask, 5))
        train_vqvae(section, tiny_shards, split_csv, tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 3
    assert not (tmp_path / "b" / "model.pt").exists()
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


def nan_loss_at_step(monkeypatch, step: int) -> None:
    """Make the reconstruction loss of training step ``step`` NaN (only training steps call it)."""
    real_loss = training.reconstruction_loss
    calls = {"n": 0}

    def nan_at_step(reconstruction, target, kind):
        calls["n"] += 1
        loss = real_loss(reconstruction, target, kind)
        return loss * float("nan") if calls["n"] == step else loss

    monkeypatch.setattr(training, "reconstruction_loss", nan_at_step)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(run, monkeypatch):
    shards, split_csv, out = run
    nan_loss_at_step(monkeypatch, 3)
    with pytest.raises(NonFiniteLossError, match=r"step 3.*last good checkpoint.*vqvae.lr"):
        train_vqvae(tiny_section(), shards, split_csv, out)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists()


def test_nan_between_reading_steps_is_caught_at_the_next_one_and_never_checkpointed(run, monkeypatch):
    shards, split_csv, out = run
    nan_loss_at_step(monkeypatch, 4)
    # Losses are read at step 3 (checkpoint) and step 5 (history row): the NaN of step 4 is noticed at step 5.
    with pytest.raises(NonFiniteLossError, match=r"between steps 4 and 5.*last good checkpoint"):
        train_vqvae(tiny_section(log_every=5, checkpoint_every=3, val_every=100), shards, split_csv, out)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cuda_out_of_memory_names_the_knobs_to_turn(run, monkeypatch):
    shards, split_csv, out = run

    def out_of_memory(self, output, x, step):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(VQVAETask, "loss_terms", out_of_memory)
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


@pytest.mark.parametrize("bottleneck", ["fsq", "vae", "som"])
def test_other_bottlenecks_train_through_the_same_trainer(run, bottleneck):
    shards, split_csv, out = run
    train_vqvae(tiny_section(steps=3, bottleneck=bottleneck), shards, split_csv, out)
    history = pd.read_csv(out / "history.csv")
    assert np.isfinite(history["loss"]).all()
    if bottleneck == "vae":
        assert history["kl"].notna().all()
    if bottleneck == "som":
        assert history["som"].notna().all() and history["codes_used"].notna().all()


def test_the_encoder_output_reconstruction_adds_its_pixel_and_ssim_terms_to_the_loss(run):
    shards, split_csv, out = run
    train_vqvae(tiny_section(steps=2, gamma_e=0.5, ssim_weight=0.5), shards, split_csv, out)
    history = pd.read_csv(out / "history.csv")
    terms = ["recon_loss", "recon_loss_e", "ssim_loss", "ssim_loss_e", "commitment"]
    assert (history[terms] > 0).all().all()
    np.testing.assert_allclose(history[terms].sum(axis=1), history["loss"], rtol=1e-6)


def test_torch_ssim_matches_skimage():
    images, _ = synthetic_brain_slices(2, 32, seed=4)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 0.05, images.shape), 0, 1).astype(np.float32)
    ours = ssim_per_image(torch.from_numpy(images)[:, None], torch.from_numpy(noisy)[:, None])
    reference = [structural_similarity(a, b, data_range=1.0) for a, b in zip(images, noisy)]
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5)
