"""Training the slice autoencoder (rule train_vqvae) and writing its codes (rule quantize).

Training is resumable: ``vqvae/checkpoints/last.pt`` holds model, optimizer, scheduler, step and RNG
states, and the batch of every step is a function of ``(seed, step)`` alone (:class:`StepBatchSampler`),
so a run killed and rerun ends with the same weights as one that was never interrupted (CPU).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, Subset

from brainvq.config import ConfigError, validated_config
from brainvq.data import (
    SPLITS,
    LeakageError,
    ShardDataset,
    read_split,
    shard_paths,
    validation_subjects,
)
from brainvq.files import atomic_path
from brainvq.models import CodeUsage, NotDiscreteError, VQVAE, build_vqvae
from brainvq.runtime import (
    HistoryWriter,
    autocast_context,
    load_checkpoint,
    save_checkpoint_atomic,
    seed_everything,
    select_device,
)

log = logging.getLogger(__name__)

# Settings that change speed or bookkeeping but not the trained weights: a checkpoint written under
# other values of these may be resumed.
RUNTIME_ONLY_KEYS = (
    "workers", "compile", "channels_last", "device", "gpus", "log_every", "val_every", "val_max_slices",
    "checkpoint_every", "eval_batch_size",
)
HISTORY_FIELDS = [
    "step", "loss", "recon_loss", "ssim_loss", "commitment", "kl_loss", "kl", "perplexity", "codes_used", "codes_restarted",
    "grad_norm", "lr", "slices_per_s", "val_l1", "val_ssim", "val_psnr", "val_codes_used", "val_perplexity",
]
MODEL_FILE_FORMAT = 1


class EmptyTrainingSetError(RuntimeError):
    """No training slices: no training subjects, or the shards hold none of them."""


class ShardMismatchError(RuntimeError):
    """Shards that do not fit the model or split.csv (image size, scans missing or in the wrong split)."""


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN or infinite."""


class GpuMemoryError(RuntimeError):
    """CUDA ran out of memory."""


# ---------------------------------------------------------------------------------------------- data


class StepBatchSampler(Sampler):
    """Yields the batch indices of steps ``start_step + 1 .. stop_step`` (this process's share).

    The dataset is walked in epochs, each a permutation seeded by ``(seed, epoch)``; step ``s`` takes the
    global positions ``[(s-1)*B, s*B)`` of that endless sequence. The batch of a step therefore depends on
    the seed and the step only, so a resumed run sees exactly the batches an uninterrupted one would.

    Args:
        n: dataset size.
        batch_size: global batch size (all processes together).
        seed: seeds the epoch permutations.
        start_step: steps already done (0 for a fresh run).
        stop_step: last step.
        rank: this process; it takes the contiguous ``rank``-th share of each global batch.
        world_size: number of processes; must divide ``batch_size``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, stop_step: int,
                 rank: int = 0, world_size: int = 1):
        if n < 1:
            raise EmptyTrainingSetError("StepBatchSampler got an empty dataset")
        if batch_size % world_size:
            raise ConfigError(f"vqvae.batch_size={batch_size} must be divisible by vqvae.gpus={world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._order

    def global_batch(self, step: int) -> np.ndarray:
        """Return the dataset indices of step ``step`` (1-based), all processes together."""
        positions = np.arange((step - 1) * self.batch_size, step * self.batch_size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // self.n):
            here = positions // self.n == epoch
            out[here] = self._permutation(int(epoch))[positions[here] % self.n]
        return out

    def __iter__(self):
        share = self.batch_size // self.world_size
        for step in range(self.start_step + 1, self.stop_step + 1):
            yield self.global_batch(step)[self.rank * share:(self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return max(self.stop_step - self.start_step, 0)


@dataclass
class TrainingData:
    """The training and validation slices and what identifies them in a checkpoint."""

    train: ShardDataset
    validation: ShardDataset | None
    image_size: tuple[int, int]
    identity: dict


def shards_config_hash(path: Path) -> str:
    """Return a shard's ``config_hash`` attribute ("" when absent)."""
    with h5py.File(path, "r") as f:
        value = f.attrs.get("config_hash", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def training_data(shards_dir: str | Path, split_csv: str | Path) -> TrainingData:
    """Return the training slices (training subjects not held out) and the validation slices.

    Raises:
        EmptyTrainingSetError: no training subject, or the train shards hold none of their slices.
        brainvq.data.ShardSizeError: train shards of different image sizes.
    """
    split = read_split(split_csv)
    held_out = validation_subjects(split)
    train_subjects = set(split.loc[split["split"] == "train", "subject"]) - held_out
    if not train_subjects:
        raise EmptyTrainingSetError(
            f"{split_csv} has no training subjects outside validation ({len(held_out)} held out); "
            "lower split.test_fraction / split.val_fraction or add subjects"
        )
    paths = shard_paths(shards_dir, "train")
    train = ShardDataset(paths, subjects=train_subjects)
    if len(train) == 0:
        raise EmptyTrainingSetError(
            f"the train shards in {shards_dir} hold no slices of the {len(train_subjects)} training subjects "
            f"of {split_csv}; re-run write_shards so the shards match split.csv"
        )
    validation = ShardDataset(paths, subjects=held_out) if held_out else None
    if validation is not None and len(validation) == 0:
        log.warning("validation subjects %s have no slices in %s; validation skipped", sorted(held_out), shards_dir)
        validation = None
    identity = {
        "image_size": list(train.image_size),
        "train_slices": len(train),
        "shards_config_hash": shards_config_hash(paths[0]),
    }
    return TrainingData(train, validation, tuple(train.image_size), identity)


def evenly_spaced_subset(dataset, max_items: int | None):
    """Return ``dataset`` or at most ``max_items`` evenly spaced items of it."""
    if max_items is None or len(dataset) <= max_items:
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, max_items).round().astype(int).tolist())


def _loader_generator(seed: int) -> torch.Generator:
    # DataLoader draws worker seeds from this instead of the global RNG, which must stay untouched
    # so a resumed run consumes random numbers exactly like an uninterrupted one.
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- loss


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, window: int = 7, data_range: float = 1.0) -> torch.Tensor:
    """Return the SSIM of each image pair ``(B, C, H, W)`` -> ``(B,)``.

    Same definition as ``skimage.metrics.structural_similarity(x, y, data_range=1)``: a uniform
    ``window`` x ``window`` filter, sample covariances, the mean over the fully covered region.
    """
    x, y = x.float(), y.float()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    cov_norm = window**2 / (window**2 - 1)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, stride=1)

    mu_x, mu_y = mean(x), mean(y)
    var_x = cov_norm * (mean(x * x) - mu_x**2)
    var_y = cov_norm * (mean(y * y) - mu_y**2)
    cov = cov_norm * (mean(x * y) - mu_x * mu_y)
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the PSNR (dB, peak 1) of each image pair ``(B, C, H, W)`` -> ``(B,)``."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Return the mean L1 (``kind="l1"``) or squared error (``"mse"``) in float32."""
    if kind == "l1":
        return F.l1_loss(reconstruction.float(), target.float())
    return F.mse_loss(reconstruction.float(), target.float())


def loss_terms(reconstruction: torch.Tensor, target: torch.Tensor, aux: dict, section: dict, step: int) -> dict:
    """Return the weighted loss terms of one step: ``recon_loss``, ``ssim_loss`` (if weighted) and the
    bottleneck's terms, the VAE KL ramped up over ``kl_warmup_steps``."""
    terms = {"recon_loss": reconstruction_loss(reconstruction, target, section["loss"])}
    if section["ssim_weight"] > 0:
        ssim = ssim_per_image(reconstruction, target).mean()
        terms["ssim_loss"] = section["ssim_weight"] * (1 - ssim)
    for name, value in aux["loss"].items():
        if name == "kl_loss" and section["kl_warmup_steps"] > 0:
            value = value * min(1.0, step / section["kl_warmup_steps"])
        terms[name] = value
    return terms


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Return the LambdaLR factor: linear warmup from ~0 to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# ---------------------------------------------------------------------------------------- validation


@torch.no_grad()
def reconstruction_metrics(model: VQVAE, loader, device: torch.device, amp: bool = True) -> dict:
    """Return mean per-slice ``val_l1``, ``val_ssim``, ``val_psnr`` (reconstructions clamped to [0, 1])
    and, for discrete bottlenecks, ``val_codes_used`` and ``val_perplexity`` over the whole pass.

    The model is put in eval mode (EMA codebook frozen) and restored to its previous mode.
    """
    was_training = model.training
    model.eval()
    usage = CodeUsage(model.codebook_size) if model.is_discrete else None
    l1, ssim, psnr = [], [], []
    try:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            with autocast_context(device, amp):
                reconstruction, aux = model(x)
            reconstruction = reconstruction.float().clamp(0, 1)
            l1.append((reconstruction - x).abs().mean(dim=(1, 2, 3)).cpu())
            ssim.append(ssim_per_image(reconstruction, x).cpu())
            psnr.append(psnr_per_image(reconstruction, x).cpu())
            if usage is not None:
                usage.update(aux["indices"])
    finally:
        model.train(was_training)
    metrics = {
        "val_l1": float(torch.cat(l1).mean()),
        "val_ssim": float(torch.cat(ssim).mean()),
        "val_psnr": float(torch.cat(psnr).mean()),
    }
    if usage is not None:
        metrics.update(val_codes_used=usage.used, val_perplexity=usage.perplexity)
    return metrics


# ------------------------------------------------------------------------------------- checkpoints


def resume_identity(section: dict, data_identity: dict) -> dict:
    """Return what a checkpoint must match to be resumed: the settings that shape the weights and the data."""
    shaping = {k: v for k, v in section.items() if k not in RUNTIME_ONLY_KEYS}
    return {**shaping, "data": data_identity}


def rng_state() -> dict:
    """Return the torch RNG states (CPU and every CUDA device) as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints" / "last.pt"


def load_vqvae(path: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """Return the trained model of ``vqvae/model.pt`` in eval mode on ``device`` (loaded with weights_only)."""
    state = load_checkpoint(path, map_location="cpu")
    model = build_vqvae(state["config"])
    model.load_state_dict(state["model"])
    model.image_size = tuple(state["image_size"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------- training


def _validated_section(section: dict) -> dict:
    return validated_config({"vqvae": dict(section)})["vqvae"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_file_of_stderr() -> str | None:
    """The file sys.stderr writes to when it is a real file (the rule's log), so spawned ranks can append."""
    name = getattr(sys.stderr, "name", None)
    return name if isinstance(name, str) and os.path.isfile(name) else None


def train_vqvae(section: dict, shards_dir: str | Path, split_csv: str | Path, out_dir: str | Path,
                progress: bool = False) -> Path:
    """Train (or resume training) the autoencoder; return the path of ``out_dir/model.pt``.

    Writes ``out_dir/checkpoints/last.pt`` every ``checkpoint_every`` steps (with its history in
    ``out_dir/checkpoints/history.csv``), then ``out_dir/model.pt`` and ``out_dir/history.csv`` at the end.
    With ``gpus > 1``, spawns one process per device (DDP: NCCL on CUDA, gloo on the CPU).

    Args:
        section: the ``vqvae`` config section (missing keys get their schema defaults).
        shards_dir: the shards folder (``train-NNN.h5``).
        split_csv: split.csv; training uses the train subjects not marked ``validation``.
        out_dir: the ``vqvae`` output folder.
        progress: show a tqdm bar on stderr (the rule's log).

    Raises:
        EmptyTrainingSetError, brainvq.data.ShardSizeError: unusable training data.
        brainvq.runtime.CheckpointError: ``last.pt`` was written under other settings.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
        GpuMemoryError: CUDA ran out of memory.
    """
    section = _validated_section(section)
    world = section["gpus"]
    args = (world, section, str(shards_dir), str(split_csv), str(out_dir), progress, torch.get_num_threads(),
            _log_file_of_stderr())
    if world == 1:
        _train_process(0, *args)
    else:
        device = select_device(section["device"])
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ConfigError(
                f"vqvae.gpus={world} but {torch.cuda.device_count()} CUDA device(s) are visible; lower vqvae.gpus"
            )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        torch.multiprocessing.spawn(_train_process, args=args, nprocs=world, join=True)
    return Path(out_dir) / "model.pt"


def _train_process(rank: int, world: int, section: dict, shards_dir: str, split_csv: str, out_dir: str,
                   progress: bool, threads: int, log_file: str | None) -> None:
    """One training process (rank); the only one when ``world == 1``."""
    handle = None
    if world > 1:
        torch.set_num_threads(max(1, threads // world))
        if log_file and rank == 0:
            handle = open(log_file, "a")
            sys.stderr = handle
            logging.basicConfig(stream=handle, level=logging.INFO, force=True,
                                format=f"%(asctime)s %(levelname)s [rank {rank}] %(message)s")
    device = select_device(section["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        Trainer(section, device, rank, world, Path(out_dir)).run(Path(shards_dir), Path(split_csv), progress)
    finally:
        if world > 1:
            dist.destroy_process_group()
        if handle is not None:
            handle.close()


class Trainer:
    """The training loop of one process. Use :func:`train_vqvae`; this class keeps the loop's state.

    Args:
        section: validated ``vqvae`` config section.
        device: this process's device.
        rank, world: this process and the number of processes.
        out_dir: the ``vqvae`` output folder.
    """

    def __init__(self, section: dict, device: torch.device, rank: int, world: int, out_dir: Path):
        self.section, self.device, self.rank, self.world, self.out_dir = section, device, rank, world, out_dir
        self.main = rank == 0
        self.amp = section["amp"]
        self.channels_last = section["channels_last"] and device.type == "cuda"
        self.ckpt_path = checkpoint_path(out_dir)

    # -- setup

    def _build(self, data: TrainingData) -> int:
        """Build model, optimizer and scheduler; load the checkpoint if there is one; return the start step."""
        s = self.section
        seed_everything(s["seed"])
        self.model = build_vqvae(s).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"],
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(s["warmup_steps"], s["steps"]))
        self.identity = resume_identity(s, data.identity)
        if not self.ckpt_path.exists():
            return 0
        state = load_checkpoint(self.ckpt_path, self.identity, map_location="cpu")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        log.info("resuming from %s at step %d", self.ckpt_path, state["step"])
        return int(state["step"])

    def _wrapped(self) -> torch.nn.Module:
        """The module the loop calls: DDP and/or torch.compile around the model."""
        module = self.model
        if self.world > 1:
            # Gradients as views into the all-reduce buckets: no extra copy, no stride-mismatch warnings.
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        if self.section["compile"]:
            module = torch.compile(module)
        return module

    def _loader(self, dataset, batch_sampler=None, batch_size=None) -> DataLoader:
        batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
        return DataLoader(
            dataset, **batching, num_workers=self.section["workers"], pin_memory=self.device.type == "cuda",
            generator=_loader_generator(self.section["seed"]),
        )

    # -- checkpoints and outputs

    def _save_checkpoint(self, step: int) -> None:
        state = {
            "config": self.identity,
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }
        save_checkpoint_atomic(state, self.ckpt_path)

    def _write_outputs(self, step: int, image_size: tuple[int, int]) -> None:
        state = {
            "format": MODEL_FILE_FORMAT,
            "config": self.section,
            "model": self.model.state_dict(),
            "step": step,
            "image_size": list(image_size),
        }
        with atomic_path(self.out_dir / "history.csv") as tmp:
            shutil.copyfile(self.ckpt_path.parent / "history.csv", tmp)
        save_checkpoint_atomic(state, self.out_dir / "model.pt")

    # -- one step

    def _step(self, module: torch.nn.Module, x: torch.Tensor, step: int) -> tuple[dict, dict]:
        """Forward, backward, optimizer step; return (loss values as floats, aux)."""
        with autocast_context(self.device, self.amp):
            reconstruction, aux = module(x)
        terms = loss_terms(reconstruction, x, aux, self.section, step)
        loss = sum(terms.values())
        # Every process sees the global mean, so all of them stop together on a NaN.
        values = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        values = values.tolist()
        if not math.isfinite(values[0]):
            raise NonFiniteLossError(self._nan_message(step, "loss"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.section["grad_clip"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        if not math.isfinite(float(grad_norm)):
            raise NonFiniteLossError(self._nan_message(step, "gradient norm"))
        self.optimizer.step()
        self.scheduler.step()
        floats = dict(zip(["loss", *terms], values))
        floats["grad_norm"] = float(grad_norm)
        return floats, aux

    def _nan_message(self, step: int, what: str) -> str:
        kept = (f"the last good checkpoint {self.ckpt_path} is kept and a rerun resumes from it"
                if self.ckpt_path.exists() else "no checkpoint was written yet")
        return (f"training {what} became NaN/inf at step {step}; {kept}. Lower vqvae.lr, keep vqvae.grad_clip set, "
                "or set vqvae.amp false; delete the checkpoint to restart with new settings")

    def _memory_message(self) -> str:
        return (f"CUDA ran out of memory on {self.device}; lower vqvae.batch_size "
                f"(now {self.section['batch_size']}), vqvae.channels (now {self.section['channels']}) "
                "or preprocess.size, or spread the batch with vqvae.gpus")

    # -- the loop

    def run(self, shards_dir: Path, split_csv: Path, progress: bool) -> None:
        """Train from the last checkpoint (or from scratch) to ``steps``; write the outputs (rank 0)."""
        from tqdm import tqdm

        s = self.section
        data = training_data(shards_dir, split_csv)
        start = self._build(data)
        total = s["steps"]
        history = HistoryWriter(self.ckpt_path.parent / "history.csv", HISTORY_FIELDS, resume_step=start) \
            if self.main else None
        module = self._wrapped()
        sampler = StepBatchSampler(len(data.train), s["batch_size"], s["seed"], start, total, self.rank, self.world)
        val_loader = None
        if data.validation is not None and self.main:
            val_loader = self._loader(evenly_spaced_subset(data.validation, s["val_max_slices"]),
                                      batch_size=s["eval_batch_size"])
        log.info("training %s (%d parameters) on %s x%d: %d training slices, %d validation slices, steps %d..%d",
                 s["bottleneck"], sum(p.numel() for p in self.model.parameters()), self.device, self.world,
                 len(data.train), len(data.validation) if data.validation is not None else 0, start, total)
        bar = tqdm(total=total, initial=start, disable=not (progress and self.main), file=sys.stderr,
                   mininterval=5, ascii=True, desc="train_vqvae")
        interval = _Interval(self.model.codebook_size, self.device)
        module.train()
        step = start
        try:
            for step, batch in zip(range(start + 1, total + 1), self._loader(data.train, batch_sampler=sampler)):
                x = batch["image"].to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                values, aux = self._step(module, x, step)
                interval.add(values, aux, len(x) * self.world)
                bar.update(1)
                row = {}
                if step % s["log_every"] == 0 or step == total:
                    row.update(interval.summary(), lr=self.scheduler.get_last_lr()[0])
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                if val_loader is not None and (step % s["val_every"] == 0 or step == total):
                    row.update(reconstruction_metrics(self.model, val_loader, self.device, self.amp))
                    log.info("step %d: %s", step, {k: round(v, 4) for k, v in row.items() if k.startswith("val_")})
                if row and self.main:
                    history.write({"step": step, **row})
                if step % s["checkpoint_every"] == 0 or step == total:
                    if self.main:
                        self._save_checkpoint(step)
                    if self.world > 1:
                        dist.barrier()
                if row:
                    interval.restart_clock()
        except torch.OutOfMemoryError as error:
            raise GpuMemoryError(self._memory_message()) from error
        finally:
            bar.close()
        if self.main:
            if start < total:
                log.info("finished step %d", step)
            self._write_outputs(total, data.image_size)


class _Interval:
    """Training metrics accumulated between two history rows."""

    def __init__(self, codebook_size: int | None, device: torch.device):
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device) if codebook_size else None
        self.restart_clock()
        self.sums: dict[str, float] = {}
        self.steps = 0

    def restart_clock(self) -> None:
        self.clock, self.slices = time.perf_counter(), 0

    def add(self, values: dict, aux: dict, slices: int) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        for key in ("perplexity", "restarted", "kl"):
            if key in aux:
                name = "codes_restarted" if key == "restarted" else key
                self.sums[name] = self.sums.get(name, 0.0) + float(aux[key])
        if self.counts is not None and "indices" in aux:
            self.counts += torch.bincount(aux["indices"].reshape(-1), minlength=len(self.counts))
        self.steps += 1
        self.slices += slices

    def summary(self) -> dict:
        """Return the interval's means (restarts summed), codes used and slices/s; then reset."""
        row = {k: (v if k == "codes_restarted" else v / max(self.steps, 1)) for k, v in self.sums.items()}
        if self.counts is not None:
            row["codes_used"] = int((self.counts > 0).sum())
            self.counts.zero_()
        row["slices_per_s"] = self.slices / max(time.perf_counter() - self.clock, 1e-9)
        self.sums, self.steps = {}, 0
        return row


# ---------------------------------------------------------------------------------------- quantize


INDEX_COLUMNS = ["subject", "scan", "split", "slice_index", "slice_position", "file", "row"]


@torch.no_grad()
def split_codes(model: VQVAE, dataset: ShardDataset, device: torch.device, batch_size: int,
                workers: int = 0) -> np.ndarray:
    """Return the codes ``(N, h, w)`` int16 of every slice of ``dataset``, in its order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=_loader_generator(0))
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
    """Write ``codes/{split}/{scan}.npy`` (int16, ``(n_slices, h, w)`` in slice order) for every scan of
    split.csv, and ``codes/index.csv``; return the index.

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
                np.save(tmp / name, codes[rows.index.to_numpy()])
                tables.append(pd.DataFrame({
                    "subject": rows["subject"].to_numpy(), "scan": scan, "split": split,
                    "slice_index": rows["slice_index"].to_numpy(), "slice_position": rows["slice_position"].to_numpy(),
                    "file": name, "row": np.arange(len(rows)),
                }))
            dataset.close()
        table = pd.concat(tables, ignore_index=True)[INDEX_COLUMNS]
        table.to_csv(tmp / "index.csv", index=False)
    return table

