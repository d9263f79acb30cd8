"""The one training loop (brainvq.engine): batch order, schedule, the staleness check, processes (torchrun, srun),
and no host synchronisation inside a training step, for both the VQ-VAE and the prior."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import brainvq
from brainvq.engine import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    StepBatchSampler,
    process_layout,
    resumable_checkpoint,
    run_identity,
    save_checkpoint_atomic,
    warmup_cosine,
)
from brainvq.prior import train_prior
from brainvq.training import load_vqvae, train_vqvae
from conftest import as_maps, tiny_pixelcnn_config, tiny_vqvae_section, train_tiny_prior, write_split_csv

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ batches, schedule


def test_batches_depend_only_on_seed_and_step_and_cover_each_slice_once_per_epoch():
    full = list(StepBatchSampler(10, 4, seed=3, start_step=0, stop_step=10))
    resumed = list(StepBatchSampler(10, 4, seed=3, start_step=6, stop_step=10))
    assert full[6:] == resumed
    assert sorted(sum(full[:5], [])[:10]) == list(range(10))
    other_seed = list(StepBatchSampler(10, 4, seed=4, start_step=0, stop_step=10))
    assert other_seed != full
    halves = [list(StepBatchSampler(10, 4, 3, 0, 10, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == full


def test_learning_rate_warms_up_then_decays_to_zero_or_to_the_final_fraction():
    factor = warmup_cosine(warmup_steps=4, total_steps=20)
    values = [factor(s) for s in range(21)]
    assert values[0] == 0.25 and values[3] == 1.0 and values[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert warmup_cosine(4, 20, final_fraction=0.05)(20) == pytest.approx(0.05)


# ------------------------------------------------------------------------------ identity and staleness


def write_checkpoint(checkpoint_dir: Path, identity: dict) -> None:
    save_checkpoint_atomic({"format": CHECKPOINT_FORMAT, "config": identity, "step": 1}, checkpoint_dir / "last.pt")


def test_checkpoints_survive_a_rerun_with_the_same_settings_and_data(tmp_path):
    ckpt = tmp_path / "checkpoints"
    identity = run_identity("vqvae", {"steps": 10, "workers": 2}, {"slices": "abc"})
    assert resumable_checkpoint(ckpt, identity, "archive") is None
    write_checkpoint(ckpt, identity)
    other_workers = run_identity("vqvae", {"steps": 10, "workers": 8}, {"slices": "abc"})
    assert resumable_checkpoint(ckpt, other_workers, "archive")["step"] == 1
    assert (ckpt / "last.pt").exists()


def test_checkpoints_from_other_settings_or_data_are_moved_aside_not_deleted(tmp_path):
    ckpt = tmp_path / "checkpoints"
    write_checkpoint(ckpt, run_identity("vqvae", {"steps": 10}, {"slices": "abc"}))
    assert resumable_checkpoint(ckpt, run_identity("vqvae", {"steps": 20}, {"slices": "abc"}), "archive") is None
    archived = tmp_path / "checkpoints-stale-1"
    assert load_checkpoint_step(archived) == 1 and not ckpt.exists()
    write_checkpoint(ckpt, run_identity("vqvae", {"steps": 20}, {"slices": "abc"}))
    assert resumable_checkpoint(ckpt, run_identity("vqvae", {"steps": 20}, {"slices": "xyz"}), "archive") is None
    assert (tmp_path / "checkpoints-stale-2" / "last.pt").exists()


def load_checkpoint_step(checkpoint_dir: Path) -> int:
    return torch.load(checkpoint_dir / "last.pt", weights_only=True)["step"]


def test_a_checkpoint_of_other_settings_or_data_is_refused_naming_the_keys(tmp_path):
    ckpt = tmp_path / "checkpoints"
    write_checkpoint(ckpt, run_identity("vqvae", {"steps": 10}, {"slices": "abc"}))
    with pytest.raises(CheckpointError, match=r"data.slices.*vqvae.steps \(checkpoint: 10, config: 20\)"):
        resumable_checkpoint(ckpt, run_identity("vqvae", {"steps": 20}, {"slices": "xyz"}), "refuse")
    assert (ckpt / "last.pt").exists()


def test_a_model_file_of_the_other_model_is_refused_naming_the_rule(tmp_path):
    codes = np.random.default_rng(0).integers(0, 8, (20, 4, 4))
    _, (prior_file, _, _) = train_tiny_prior(tmp_path, as_maps(codes), as_maps(codes[:0]), 8, steps=1)
    with pytest.raises(CheckpointError, match="re-run the train_vqvae rule"):
        load_vqvae(prior_file)


# --------------------------------------------------------------------------------------------- processes


@pytest.mark.parametrize("env, layout", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1)),  # torchrun
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1)),  # srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}, (0, 1, 0)),  # an sbatch script: one process
    ({}, (0, 1, 0)),
])
def test_the_process_layout_comes_from_torchrun_or_srun(env, layout):
    assert process_layout(env) == layout


def train_both(vqvae_out: str, prior_out: str, shards: str, split_csv: str) -> None:
    """Train a tiny VQ-VAE and a tiny prior (in each process of a torchrun, or in one)."""
    train_vqvae(tiny_vqvae_section(steps=3, checkpoint_every=3, val_every=3), shards, split_csv, vqvae_out)
    codes = np.random.default_rng(0).integers(0, 8, (40, 6, 6))
    train_prior(as_maps(codes), as_maps(codes[:8]), tiny_pixelcnn_config(steps=10, log_every=2), 8, [], prior_out,
                progress=False)


def test_two_gloo_processes_started_by_torchrun_end_equal_to_one_process_on_the_same_global_batch(tiny_shards,
                                                                                                tmp_path):
    split_csv = write_split_csv(tmp_path / "split.csv")
    train_both(str(tmp_path / "one" / "vqvae"), str(tmp_path / "one" / "prior"), str(tiny_shards), str(split_csv))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               str(tmp_path / "two" / "vqvae"), str(tmp_path / "two" / "prior"), str(tiny_shards), str(split_csv)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    one, two = (pd.read_csv(tmp_path / d / "vqvae" / "history.csv") for d in ("one", "two"))
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(two["perplexity"], one["perplexity"], rtol=1e-4)
    np.testing.assert_allclose(two["val_ssim"].dropna(), one["val_ssim"].dropna(), rtol=1e-4)
    one, two = (pd.read_csv(tmp_path / d / "prior" / "history.csv") for d in ("one", "two"))
    np.testing.assert_allclose(two["train_nll_bits"], one["train_nll_bits"], rtol=1e-5)
    np.testing.assert_allclose(two["val_nll_bits"].dropna(), one["val_nll_bits"].dropna(), rtol=1e-5)
    for model in ("vqvae", "prior"):
        a, b = (torch.load(tmp_path / d / model / "model.pt", weights_only=True)["model"] for d in ("one", "two"))
        for key in a:
            torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- host syncs

# Tensor methods that read a tensor back to the host (on CUDA: wait for the device).
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
PACKAGE = Path(brainvq.__file__).parent


@pytest.fixture
def host_reads(monkeypatch) -> Counter:
    """Count host reads made from brainvq's code (file:line method), by patching the Tensor methods."""
    reads = Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            path = Path(caller.f_code.co_filename)
            if PACKAGE in path.parents:
                reads[f"{path.relative_to(PACKAGE)}:{caller.f_lineno} {_name}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def reads_of(host_reads: Counter, train) -> Counter:
    host_reads.clear()
    train()
    return Counter(host_reads)


def test_training_steps_read_nothing_back_from_the_device_between_log_steps(tiny_shards, tmp_path, host_reads):
    split_csv = write_split_csv(tmp_path / "split.csv")
    codes = np.random.default_rng(0).integers(0, 8, (40, 6, 6))
    rare = {"log_every": 100, "val_every": 100, "checkpoint_every": 100}  # the last step is the only reading step

    def vqvae(steps):
        return lambda: train_vqvae(tiny_vqvae_section(steps=steps, **rare), tiny_shards, split_csv,
                                   tmp_path / f"vqvae-{steps}")

    def prior(steps):
        return lambda: train_prior(as_maps(codes), as_maps(codes[:8]), tiny_pixelcnn_config(steps=steps, **rare), 8,
                                   [], tmp_path / f"prior-{steps}", progress=False)

    for model in (vqvae, prior):
        two, six = reads_of(host_reads, model(2)), reads_of(host_reads, model(6))
        assert any(site.startswith("engine.py") for site in two), "the reading step's one read was not seen"
        assert six == two, f"reads that grow with the steps: {six - two}"


if __name__ == "__main__":  # one process of the torchrun test
    train_both(*sys.argv[1:])


def test_ddp_lays_out_1x1_convolution_gradients_as_their_buckets_so_nothing_is_copied_or_warned():
    # A 1x1 convolution's weight gradient comes back in the other of its two valid stride patterns; DDP then
    # warns "grad strides do not match bucket view strides" and copies it every step (seen with gloo on the CPU).
    import warnings

    import torch.distributed as dist

    from brainvq.engine import _free_port, distributed_module
    from brainvq.models import build_vqvae

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = build_vqvae(tiny_vqvae_section())
        assert any(p.dim() == 4 and p.shape[-2:] == (1, 1) for p in model.parameters())
        module = distributed_module(model, torch.device("cpu"))
        x = torch.rand(2, 1, 32, 32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                reconstruction, aux = module(x)
                ((reconstruction - x).abs().mean() + sum(aux["loss"].values())).backward()
        assert not [w for w in caught if "bucket view strides" in str(w.message)]
        assert all(p.grad.stride() == p.stride() for p in model.parameters() if p.grad is not None)
    finally:
        dist.destroy_process_group()
