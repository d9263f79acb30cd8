"""The autoencoder's training task (rule train_vqvae) on slices or, with preprocess.dims 3, whole volumes: its
data, loss terms, validation and model file.

:func:`train_vqvae` hands a :class:`VQVAETask` to the one training loop (:func:`brainvq.engine.train`), which
checkpoints to ``vqvae/checkpoints/last.pt`` and resumes from it; :func:`load_vqvae` reads ``vqvae/model.pt``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from brainvq import engine
from brainvq.config import validated_config
from brainvq.data import read_split, validation_subjects
from brainvq.engine import EmptyTrainingSetError, StepBatchSampler, load_model_file
from brainvq.models import VQVAE, CodeUsage, build_vqvae
from brainvq.runtime import autocast_context
from brainvq.shards import ShardDataset, shard_paths
from brainvq.slice_reader import batch_loader

log = logging.getLogger(__name__)

HISTORY_FIELDS = [
    "step", "loss", "recon_loss", "recon_loss_e", "ssim_loss", "ssim_loss_e", "commitment", "som", "kl_loss", "kl",
    "perplexity", "codes_used", "codes_restarted", "grad_norm", "lr", "slices_per_s",
    "val_l1", "val_ssim", "val_psnr", "val_codes_used", "val_perplexity",
]


# ---------------------------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """The training and validation slices and the fingerprint that identifies them in a checkpoint."""

    train: ShardDataset
    validation: ShardDataset | None
    image_size: tuple[int, ...]
    fingerprint: dict


def shards_config_hash(path: Path) -> str:
    """Return a shard's ``config_hash`` attribute ("" when absent)."""
    with h5py.File(path, "r") as f:
        value = f.attrs.get("config_hash", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def slices_fingerprint(train: ShardDataset, validation: ShardDataset | None) -> dict:
    """Return what identifies the training data: image size, the training and validation slices (scan, slice
    index), the preprocessing hash and the shards' size in bytes (their gzip masks, and gzip images, change it with
    the content; uncompressed images do not)."""
    digest = hashlib.sha256()
    for dataset in (train, validation):
        if dataset is not None:
            digest.update(dataset.index[["scan", "slice_index"]].to_csv(index=False).encode())
        digest.update(b"|")
    return {
        "image_size": list(train.image_size),
        "train_slices": len(train),
        "validation_slices": len(validation) if validation is not None else 0,
        "shards_config_hash": shards_config_hash(train.paths[0]),
        "slices": digest.hexdigest()[:16],
        "shard_bytes": sum(path.stat().st_size for path in train.paths),
    }


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
    return TrainingData(train, validation, tuple(train.image_size), slices_fingerprint(train, validation))


def evenly_spaced_batches(n: int, max_items: int | None, batch_size: int) -> list[np.ndarray]:
    """Return the indices of all ``n`` items, or of at most ``max_items`` evenly spaced ones, cut into batches."""
    indices = np.arange(n) if max_items is None or n <= max_items else np.unique(
        np.linspace(0, n - 1, max_items).round().astype(np.int64))
    return [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]


# ---------------------------------------------------------------------------------------------- loss


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, window: int = 7, data_range: float = 1.0) -> torch.Tensor:
    """Return the SSIM of each image pair ``(B, C, H, W)`` (or volume pair ``(B, C, D, H, W)``) -> ``(B,)``.

    Same definition as ``skimage.metrics.structural_similarity(x, y, data_range=1)``: a uniform
    ``window`` x ``window`` (x ``window``) filter, sample covariances, the mean over the fully covered region.
    """
    x, y = x.float(), y.float()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = window ** (x.ndim - 2)
    cov_norm = n / (n - 1)
    pool = F.avg_pool3d if x.ndim == 5 else F.avg_pool2d

    def mean(t: torch.Tensor) -> torch.Tensor:
        return pool(t, window, stride=1)

    mu_x, mu_y = mean(x), mean(y)
    var_x = cov_norm * (mean(x * x) - mu_x**2)
    var_y = cov_norm * (mean(y * y) - mu_y**2)
    cov = cov_norm * (mean(x * y) - mu_x * mu_y)
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the PSNR (dB, peak 1) of each image (or volume) pair ``(B, C, *size)`` -> ``(B,)``."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Return the mean L1 (``kind="l1"``) or squared error (``"mse"``) in float32."""
    if kind == "l1":
        return F.l1_loss(reconstruction.float(), target.float())
    return F.mse_loss(reconstruction.float(), target.float())


def vqvae_loss_terms(model: VQVAE, reconstruction: torch.Tensor, target: torch.Tensor, aux: dict, section: dict,
                     step: int) -> dict:
    """Return the weighted loss terms of one step: the model's reconstruction terms for the pixel loss
    (``recon_loss``, and ``recon_loss_e`` for the encoder output with ``gamma_e``), the same for ``1 - SSIM`` when
    ``ssim_weight`` is set (``ssim_loss``, ``ssim_loss_e``), then the bottleneck's terms, the VAE KL ramped up over
    ``kl_warmup_steps``. Together: ``gamma_q * L_rec(x, D(z_q)) + gamma_e * L_rec(x, D(z_e)) + aux["loss"]`` with
    ``L_rec`` = pixel loss + ``ssim_weight * (1 - SSIM)``."""
    terms = model.reconstruction_losses(reconstruction, target, aux,
                                        lambda r, x: reconstruction_loss(r, x, section["loss"]))
    if section["ssim_weight"] > 0:
        ssim = model.reconstruction_losses(reconstruction, target, aux,
                                           lambda r, x: section["ssim_weight"] * (1 - ssim_per_image(r, x).mean()))
        terms.update({name.replace("recon", "ssim"): value for name, value in ssim.items()})
    for name, value in aux["loss"].items():
        if name == "kl_loss" and section["kl_warmup_steps"] > 0:
            value = value * min(1.0, step / section["kl_warmup_steps"])
        terms[name] = value
    return terms


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
            l1.append((reconstruction - x).abs().flatten(1).mean(1).cpu())
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


# -------------------------------------------------------------------------------------------- the task


class VQVAETask:
    """The autoencoder for :func:`brainvq.engine.train`: the slices of ``data``, trained with the ``vqvae``
    config section ``settings`` (validated)."""

    section = "vqvae"
    history_fields = HISTORY_FIELDS

    def __init__(self, settings: dict, data: TrainingData):
        self.settings, self.data = settings, data
        self.model: VQVAE | None = None
        self._validation_loader = None

    def fingerprint(self) -> dict:
        return self.data.fingerprint

    def train_size(self) -> int:
        return len(self.data.train)

    @property
    def _spatial_dims(self) -> int:
        # The model follows the data: slices (H, W) or volumes (D, H, W); without data (a task built only to
        # time steps, as benchmarks/device_check.py does) it is the slice model.
        return 2 if self.data is None else len(self.data.image_size)

    def _memory_format(self, device: torch.device) -> torch.memory_format | None:
        """Channels-last on CUDA, and for volumes on the CPU too (3D convolutions' backward runs about twice as
        fast there); None keeps the default layout."""
        if not self.settings["channels_last"] or (device.type != "cuda" and self._spatial_dims == 2):
            return None
        return torch.channels_last_3d if self._spatial_dims == 3 else torch.channels_last

    def build_model(self, device: torch.device) -> VQVAE:
        model = build_vqvae(self.settings, spatial_dims=self._spatial_dims).to(device)
        memory_format = self._memory_format(device)
        self.model = model.to(memory_format=memory_format) if memory_format else model
        return self.model

    def _loader(self, dataset: ShardDataset, batches, device: torch.device, persistent: bool = False):
        return batch_loader(dataset, batches, self.settings["workers"], pin_memory=device.type == "cuda",
                            persistent=persistent, seed=self.settings["seed"])

    def batches(self, sampler: StepBatchSampler, device: torch.device):
        for batch in self._loader(self.data.train, sampler, device):
            x = batch["image"].to(device, non_blocking=True)
            memory_format = self._memory_format(device)
            yield x.contiguous(memory_format=memory_format) if memory_format else x

    def forward(self, module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if getattr(self.model.bottleneck, "needs_initialization", False):  # a host-side flag, no device read
            # k-means on the first batch, in every process, before the first step rather than inside it.
            self.model.initialize_codebook(x)
        return module(x)

    def loss_terms(self, output: tuple[torch.Tensor, dict], x: torch.Tensor, step: int) -> tuple[dict, dict]:
        reconstruction, aux = output
        terms = vqvae_loss_terms(self.model, reconstruction, x, aux, self.settings, step)
        numbers = {name: aux[key] for key, name in (("perplexity", "perplexity"), ("restarted", "codes_restarted"),
                                                     ("kl", "kl")) if key in aux}
        if self.model.codebook_size and "indices" in aux:
            # Counted on the device (bincount would read the largest code back to the host).
            indices = aux["indices"].reshape(-1)
            numbers["code_counts"] = torch.zeros(self.model.codebook_size, device=x.device).index_add_(
                0, indices, torch.ones(indices.numel(), device=x.device))
        return terms, numbers

    def history_values(self, totals: dict, steps: int, slices_per_s: float) -> dict:
        """Means over the steps; restarted codes summed; codes used in any of them."""
        row = {k: float(v) / steps for k, v in totals.items() if k not in ("codes_restarted", "code_counts")}
        if "codes_restarted" in totals:
            row["codes_restarted"] = float(totals["codes_restarted"])
        if "code_counts" in totals:
            row["codes_used"] = int((totals["code_counts"] > 0).sum())
        return row

    def validate(self, model: VQVAE, device: torch.device) -> dict:
        if self.data.validation is None:
            return {}
        if self._validation_loader is None:
            batches = evenly_spaced_batches(len(self.data.validation), self.settings["val_max_slices"],
                                            self.settings["eval_batch_size"])
            # Persistent workers: validation reads the same slices every val_every steps without new processes.
            self._validation_loader = self._loader(self.data.validation, batches, device, persistent=True)
        return reconstruction_metrics(model, self._validation_loader, device, self.settings["amp"])

    def model_file(self, model: VQVAE, last_row: dict) -> dict:
        return {"image_size": list(self.data.image_size)}

    def memory_hint(self) -> str:
        s = self.settings
        size = "preprocess.box_mm (or a coarser spacing_mm)" if self._spatial_dims == 3 else "preprocess.size"
        return (f"lower vqvae.batch_size (now {s['batch_size']}), vqvae.channels (now {s['channels']}) "
                f"or {size}, or spread the batch with vqvae.gpus")


def train_vqvae(section: dict, shards_dir: str | Path, split_csv: str | Path, out_dir: str | Path,
                progress: bool = False, stale: str = "refuse") -> Path:
    """Train (or resume training) the autoencoder; return the path of ``out_dir/model.pt``.

    Writes ``out_dir/checkpoints/last.pt`` every ``checkpoint_every`` steps, ``out_dir/history.csv`` and, at the end,
    ``out_dir/model.pt`` (see :func:`brainvq.engine.train`). Under torchrun or srun each process trains its share of
    every batch (DDP); ``gpus > 1`` starts that many local processes itself.

    Args:
        section: the ``vqvae`` config section (missing keys get their schema defaults).
        shards_dir: the shards folder (``train-NNN.h5``).
        split_csv: split.csv; training uses the train subjects not marked ``validation``.
        out_dir: the ``vqvae`` output folder.
        progress: show a tqdm bar on stderr (the rule's log).
        stale: what to do with a checkpoint of other settings or data: ``"refuse"`` or ``"archive"`` (move it
            aside and train anew, as the workflow does).

    Raises:
        EmptyTrainingSetError, brainvq.data.ShardSizeError: unusable training data.
        brainvq.engine.CheckpointError: ``last.pt`` was written under other settings (``stale="refuse"``).
        brainvq.engine.NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
        brainvq.engine.GpuMemoryError: CUDA ran out of memory.
    """
    section = validated_config({"vqvae": dict(section)})["vqvae"]
    engine.run_local_processes(section["gpus"], "vqvae.gpus", section["device"], _train_process,
                               (section, str(shards_dir), str(split_csv), str(out_dir), progress, stale))
    return Path(out_dir) / "model.pt"


def _train_process(section: dict, shards_dir: str, split_csv: str, out_dir: str, progress: bool, stale: str) -> None:
    engine.train(VQVAETask(section, training_data(shards_dir, split_csv)), out_dir, stale, progress=progress)


def load_vqvae(path: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """Return the trained model of ``vqvae/model.pt`` in eval mode on ``device`` (loaded with weights_only).

    Raises:
        brainvq.engine.CheckpointError: unreadable, or not a VQ-VAE model file of this version.
    """
    state = load_model_file(path, "vqvae", "train_vqvae")
    model = build_vqvae(state["config"], spatial_dims=len(state["image_size"]))
    model.load_state_dict(state["model"])
    model.image_size = tuple(state["image_size"])
    return model.to(device).eval()
