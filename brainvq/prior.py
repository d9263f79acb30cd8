"""The learned prior over VQ-VAE code maps: data loading, training, likelihood, sampling and baselines.

Public API (used by the evaluation stage): :func:`load_prior`, :func:`sample_codes`, :func:`bits_per_code`,
:func:`uniform_bits`, :func:`unigram_bits`. The workflow's ``train_pixelcnn`` rule calls :func:`train_prior`
on the maps from :func:`training_maps`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from brainvq.data import read_split
from brainvq.files import atomic_path, save_figure_atomic
from brainvq.models.pixelcnn import GatedPixelCNN, nucleus
from brainvq.runtime import (
    HistoryWriter,
    autocast_context,
    load_checkpoint,
    save_checkpoint_atomic,
    seed_everything,
    select_device,
)

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["subject", "scan", "split", "slice_index", "slice_position", "file", "row"]
HISTORY_FIELDS = ["step", "train_nll_bits", "val_nll_bits", "codes_per_s", "slices_per_s", "lr"]
# Keys that change how a run is carried out, not what it computes: a checkpoint stays resumable across them.
OPERATIONAL_KEYS = ("device", "compile", "checkpoint_every")
MISSING_LABEL = "n/a"


class CodesError(RuntimeError):
    """The codes folder (codes/index.csv and the .npy maps it lists) is missing, malformed or inconsistent."""


class LabelConfigError(ValueError):
    """``pixelcnn.condition_label`` names a column that split.csv lacks, or labels do not match the prior's classes."""


# ------------------------------------------------------------------------------------------------ data


@dataclass
class CodeMaps:
    """Code maps with their conditioning: ``codes`` (N, h, w) int64, ``positions`` (N,) float32 in [0, 1],
    ``labels`` (N,) int64 class indices (or None when no label is used) and the ``scans`` they come from."""

    codes: np.ndarray
    positions: np.ndarray
    labels: np.ndarray | None
    scans: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def map_size(self) -> tuple[int, int]:
        return tuple(self.codes.shape[1:])


def read_code_index(codes_dir: str | Path) -> pd.DataFrame:
    """Return ``codes/index.csv`` (one row per slice) with its contract columns checked.

    Raises:
        CodesError: when the file or a column is missing; re-run the quantize rule.
    """
    path = Path(codes_dir) / "index.csv"
    if not path.is_file():
        raise CodesError(f"{path} does not exist; re-run the quantize rule")
    index = pd.read_csv(path, dtype={"subject": str, "scan": str, "split": str, "file": str})
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise CodesError(f"{path} lacks columns {missing}; re-run the quantize rule")
    return index


def code_file(codes_dir: Path, name: str) -> Path:
    """Return the .npy file named in index.csv: relative to the codes folder, else as written (absolute or cwd)."""
    for candidate in (codes_dir / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise CodesError(f"code file {name!r} listed in {codes_dir / 'index.csv'} is missing; re-run the quantize rule")


def load_code_rows(codes_dir: str | Path, index: pd.DataFrame) -> np.ndarray:
    """Return the code maps (N, h, w) int64 for the rows of ``index``, in its order.

    Raises:
        CodesError: for a missing file, a row out of range, or maps of different sizes.
    """
    codes_dir = Path(codes_dir)
    index = index.reset_index(drop=True)
    out = None
    for name, rows in index.groupby("file", sort=False)["row"]:
        path = code_file(codes_dir, name)
        array = np.load(path, mmap_mode="r")
        if array.ndim != 3 or rows.max() >= len(array) or rows.min() < 0:
            raise CodesError(f"{path} has shape {array.shape}; index.csv asks for rows up to {rows.max()}. "
                             "Re-run the quantize rule")
        if out is None:
            out = np.empty((len(index), *array.shape[1:]), np.int64)
        elif array.shape[1:] != out.shape[1:]:
            raise CodesError(f"{path} holds {array.shape[1:]} maps, others {out.shape[1:]}; re-run the quantize rule")
        out[rows.index.to_numpy()] = array[rows.to_numpy()]
    return out if out is not None else np.zeros((0, 0, 0), np.int64)


def label_classes(split_df: pd.DataFrame, column: str | None) -> list[str]:
    """Return the sorted label classes of ``column`` over all scans in split.csv ([] when ``column`` is None).

    Missing values become the class ``"n/a"``.

    Raises:
        LabelConfigError: when split.csv has no such column.
    """
    if column is None:
        return []
    if column not in split_df.columns:
        raise LabelConfigError(
            f"pixelcnn.condition_label is {column!r} but split.csv has no such column "
            f"(columns: {sorted(split_df.columns)}); set it to one of those or null"
        )
    return sorted(set(scan_labels(split_df, column).values()))


def scan_labels(split_df: pd.DataFrame, column: str) -> dict[str, str]:
    """Return ``{scan: label string}`` for ``column`` of split.csv, missing values as ``"n/a"``."""
    values = split_df[column].astype(object).where(split_df[column].notna(), MISSING_LABEL)
    return dict(zip(split_df["scan"], values.astype(str)))


def code_maps(codes_dir: str | Path, split_df: pd.DataFrame, subset: str, label_column: str | None = None,
              classes: Sequence[str] = ()) -> CodeMaps:
    """Return the code maps of ``subset``: ``train`` (training subjects not held out for validation),
    ``validation`` (the held-out training subjects) or ``test``.

    Raises:
        CodesError: when index.csv lists scans that split.csv lacks.
    """
    index = read_code_index(codes_dir)
    unknown = sorted(set(index["scan"]) - set(split_df["scan"]))
    if unknown:
        raise CodesError(f"{Path(codes_dir) / 'index.csv'} lists scans absent from split.csv: {unknown[:5]}; "
                         "re-run the quantize rule after the split")
    held_out = set(split_df.loc[split_df["validation"] & (split_df["split"] == "train"), "scan"])
    in_split = {s: set(split_df.loc[split_df["split"] == s, "scan"]) for s in ("train", "test")}
    wanted = {
        "train": in_split["train"] - held_out,
        "validation": in_split["train"] & held_out,
        "test": in_split["test"],
    }[subset]
    rows = index[index["scan"].isin(wanted)].reset_index(drop=True)
    labels = None
    if label_column is not None:
        by_scan = scan_labels(split_df, label_column)
        lookup = {name: k for k, name in enumerate(classes)}
        labels = np.array([lookup[by_scan[s]] for s in rows["scan"]], np.int64)
    return CodeMaps(
        codes=load_code_rows(codes_dir, rows),
        positions=rows["slice_position"].to_numpy(np.float32),
        labels=labels,
        scans=rows["scan"].to_numpy(object),
    )


def training_maps(codes_dir: str | Path, split_csv: str | Path, condition_label: str | None
                  ) -> tuple[CodeMaps, CodeMaps, list[str]]:
    """Return (train maps, validation maps, label classes) for the prior, from the quantize and split outputs.

    Raises:
        CodesError: when there are no training code maps.
    """
    split_df = read_split(split_csv)
    classes = label_classes(split_df, condition_label)
    train = code_maps(codes_dir, split_df, "train", condition_label, classes)
    val = code_maps(codes_dir, split_df, "validation", condition_label, classes)
    if len(train) == 0:
        raise CodesError(f"no training code maps in {codes_dir}; check split.csv and re-run the quantize rule")
    return train, val, classes


def data_fingerprint(*sets: CodeMaps) -> str:
    """Return a short hash of the code maps and their conditioning, so a checkpoint never resumes on other data."""
    digest = hashlib.sha256()
    for maps in sets:
        for array in (maps.codes, maps.positions, maps.labels):
            if array is not None:
                digest.update(np.ascontiguousarray(array).tobytes())
                digest.update(str(array.shape).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- model


def model_kwargs(config: dict, codebook_size: int, map_size: tuple[int, int], n_labels: int) -> dict:
    """Return the :class:`GatedPixelCNN` constructor arguments for a ``pixelcnn`` config section."""
    return {
        "codebook_size": int(codebook_size),
        "channels": config["channels"],
        "layers": config["layers"],
        "kernel_size": config["kernel_size"],
        "cond_channels": config["cond_channels"],
        "position_frequencies": config["position_frequencies"],
        "head_channels": config["head_channels"],
        "n_labels": int(n_labels),
        "map_size": [int(s) for s in map_size] if config["location_bias"] else None,
        "dilations": list(config["dilations"]),
        "dropout": config["dropout"],
        "position_anchors": config["position_anchors"],
    }


def build_prior(kwargs: dict, label_classes: Sequence[str] = (), condition_label: str | None = None,
                config: dict | None = None) -> GatedPixelCNN:
    """Return a :class:`GatedPixelCNN` from ``kwargs``, carrying ``label_classes``, ``condition_label``, ``config``."""
    model = GatedPixelCNN(**kwargs)
    model.label_classes = list(label_classes)
    model.condition_label = condition_label
    model.config = config or {}
    return model


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> GatedPixelCNN:
    """Return the prior saved by the ``train_pixelcnn`` rule, in eval mode on ``device``.

    The model carries ``label_classes`` (list of str), ``condition_label`` and ``config`` attributes.

    Raises:
        brainvq.runtime.CheckpointError: when the file cannot be read.
    """
    state = load_checkpoint(path)
    model = build_prior(state["model_kwargs"], state["label_classes"], state["condition_label"], state["config"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def model_file_state(model: GatedPixelCNN, kwargs: dict, **extra) -> dict:
    """Return the plain dict saved as prior/model.pt (tensors and Python values only)."""
    return {
        "config": model.config,
        "model_kwargs": kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "codebook_size": model.codebook_size,
        "label_classes": model.label_classes,
        "condition_label": model.condition_label,
        **extra,
    }


# ------------------------------------------------------------------------------------------ likelihood


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def label_indices(prior: GatedPixelCNN, labels: Sequence[str] | None, n: int) -> torch.Tensor | None:
    """Return class indices (n,) for label strings, or None for a prior without label conditioning.

    Raises:
        LabelConfigError: when labels are missing for a label-conditioned prior, or name an unknown class.
    """
    classes = getattr(prior, "label_classes", [])
    if not classes:
        return None
    if labels is None:
        raise LabelConfigError(f"this prior is conditioned on {prior.condition_label!r} (classes {classes}); "
                               "pass one label per map")
    lookup = {name: k for k, name in enumerate(classes)}
    unknown = sorted({str(label) for label in labels} - set(lookup))
    if unknown:
        raise LabelConfigError(f"labels {unknown} are not among the prior's classes {classes}")
    if len(labels) != n:
        raise LabelConfigError(f"got {len(labels)} labels for {n} maps")
    return torch.tensor([lookup[str(label)] for label in labels], dtype=torch.long)


def batch_nll_sum(model: GatedPixelCNN, codes: torch.Tensor, positions: torch.Tensor,
                  labels: torch.Tensor | None, amp: bool = True) -> torch.Tensor:
    """Return the summed negative log-likelihood (nats) of one batch of code maps."""
    device = model_device(model)
    with autocast_context(device, amp):
        logits = model(codes, positions, labels)
    return F.cross_entropy(logits.float(), codes, reduction="sum")


@torch.no_grad()
def bits_per_code(prior: GatedPixelCNN, codes, positions, labels: Sequence[str] | None = None,
                  batch_size: int = 64, amp: bool = False) -> float:
    """Return the prior's average negative log-likelihood, in bits per code, of code maps ``codes`` (N, h, w)
    at slice ``positions`` (N,) with ``labels`` (N label strings, for a label-conditioned prior).

    ``amp`` computes in bf16 on CUDA (faster, slightly less exact); by default everything runs in float32."""
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    positions = torch.as_tensor(np.asarray(positions), dtype=torch.float32)
    label_idx = label_indices(prior, labels, len(codes))
    return mean_bits(prior, codes, positions, label_idx, batch_size, amp)


@torch.no_grad()
def mean_bits(model: GatedPixelCNN, codes: torch.Tensor, positions: torch.Tensor,
              labels: torch.Tensor | None, batch_size: int, amp: bool = True) -> float:
    """Return the average NLL in bits per code of (N, h, w) maps given as tensors (labels as class indices)."""
    if len(codes) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    device = model_device(model)
    total = 0.0
    for start in range(0, len(codes), batch_size):
        part = slice(start, start + batch_size)
        total += batch_nll_sum(
            model, codes[part].to(device), positions[part].to(device),
            None if labels is None else labels[part].to(device), amp,
        ).item()
    model.train(was_training)
    return total / codes.numel() / math.log(2)


def uniform_bits(codebook_size: int) -> float:
    """Return log2 K: the bits per code of a uniform distribution over the codebook."""
    return math.log2(codebook_size)


def unigram_bits(train_codes, test_codes, codebook_size: int) -> float:
    """Return the cross-entropy (bits per code) of ``test_codes`` under the unigram (code frequency) distribution
    of ``train_codes``, Laplace (add-one) smoothed over all ``codebook_size`` codes so unseen codes cost finite bits."""
    train = np.asarray(train_codes).ravel().astype(np.int64)
    test = np.asarray(test_codes).ravel().astype(np.int64)
    counts = np.bincount(train, minlength=codebook_size)[:codebook_size] + 1.0
    log_p = np.log2(counts / counts.sum())
    return float(-log_p[test].mean())


# -------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_codes(prior: GatedPixelCNN, positions: Sequence[float], labels: Sequence[str] | None = None,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
                 device: str | torch.device | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Return code maps (N, h, w) long on the CPU, drawn in raster order from the prior at slice ``positions``
    (N,) and ``labels`` (N strings, for a label-conditioned prior), logits divided by ``temperature`` and each
    code drawn from the nucleus of mass ``top_p`` (:func:`brainvq.models.pixelcnn.nucleus`).

    Maps are drawn ``batch_size`` at a time with one ``torch.Generator`` seeded with ``seed``: the same seed,
    batch size and device give the same maps. The prior is moved to ``device`` (default: where it is).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if prior.map_size is None:
        raise ValueError("this prior has no fixed map size (location_bias off); it cannot choose one to sample")
    device = torch.device(device) if device is not None else model_device(prior)
    prior = prior.to(device).eval()
    positions = torch.as_tensor(np.asarray(positions, np.float32))
    label_idx = label_indices(prior, labels, len(positions))
    generator = torch.Generator(device=device).manual_seed(seed)
    h, w = prior.map_size
    out = torch.zeros(len(positions), h, w, dtype=torch.long)
    for start in range(0, len(positions), batch_size):
        part = slice(start, start + batch_size)
        cond_labels = None if label_idx is None else label_idx[part].to(device)
        out[part] = sample_batch(prior, positions[part].to(device), cond_labels, temperature, generator,
                                 top_p).cpu()
    return out


def sample_batch(prior: GatedPixelCNN, positions: torch.Tensor, labels: torch.Tensor | None,
                 temperature: float, generator: torch.Generator, top_p: float = 1.0) -> torch.Tensor:
    """Return one batch of maps (B, h, w) drawn position by position from :meth:`GatedPixelCNN.raster_logits`."""
    device = positions.device
    codes = torch.zeros(len(positions), *prior.map_size, dtype=torch.long, device=device)
    with autocast_context(device):
        cond = prior.condition(positions, labels)
        for i, j, logits in prior.raster_logits(codes, cond, positions):
            probs = nucleus(torch.softmax(logits.float() / temperature, dim=1), top_p)
            codes[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return codes


# -------------------------------------------------------------------------------------------- training


def warmup_cosine(warmup_steps: int, total_steps: int, final_fraction: float):
    """Return a LambdaLR factor: linear warm-up to 1, then cosine decay to ``final_fraction``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Return the indices of training step ``step`` (1-based): epochs are seeded permutations, so the batch
    depends on (seed, step) alone and a resumed run sees the same batches as an uninterrupted one."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step - 1, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if n < batch_size:
        return order
    return order[k * batch_size : (k + 1) * batch_size]


def training_identity(config: dict, train: CodeMaps, val: CodeMaps, codebook_size: int,
                      label_classes: Sequence[str]) -> dict:
    """Return what a resumable checkpoint must match: the config (less operational keys), the codebook size,
    the label classes and a fingerprint of the training and validation maps."""
    return {
        "pixelcnn": {k: v for k, v in config.items() if k not in OPERATIONAL_KEYS},
        "codebook_size": int(codebook_size),
        "label_classes": list(label_classes),
        "data": data_fingerprint(train, val),
    }


def check_code_range(codebook_size: int, **sets: CodeMaps) -> None:
    """Raise CodesError when a code lies outside ``[0, codebook_size)`` (codes from another VQ-VAE)."""
    for name, maps in sets.items():
        if len(maps) and (maps.codes.min() < 0 or maps.codes.max() >= codebook_size):
            raise CodesError(f"{name} codes span [{maps.codes.min()}, {maps.codes.max()}] but the codebook has "
                             f"{codebook_size} entries; re-run quantize with the current VQ-VAE")


@torch.no_grad()
def start_from_unigram(model: GatedPixelCNN, train_codes: np.ndarray) -> None:
    """Zero the last layer's weights and set its bias to the log unigram frequencies (add-one smoothed), so
    training starts at the unigram baseline instead of spending its first steps learning code frequencies."""
    counts = np.bincount(train_codes.ravel(), minlength=model.codebook_size)[: model.codebook_size] + 1.0
    last = model.head[-1]
    last.weight.zero_()
    last.bias.copy_(torch.as_tensor(np.log(counts / counts.sum()), dtype=last.bias.dtype))


def optimizer_and_schedule(model: torch.nn.Module, config: dict):
    """Return (AdamW, LambdaLR with warm-up and cosine decay) for a ``pixelcnn`` config section."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config["warmup_steps"], config["steps"], config["final_lr_fraction"]))
    return optimizer, scheduler


def resume_from(checkpoint_path: Path, identity: dict, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Load a resumable checkpoint into model/optimizer/scheduler when one exists; return (step, history rows)."""
    if not checkpoint_path.exists():
        return 0, []
    state = load_checkpoint(checkpoint_path, expected_config=identity)
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resumed from %s at step %d", checkpoint_path, state["step"])
    return state["step"], state["history"]


def training_step(forward, model, optimizer, scheduler, batch, config: dict) -> float:
    """Take one optimizer step on ``batch`` (codes, positions, labels); return its NLL in bits per code."""
    codes, positions, labels = batch
    with autocast_context(codes.device, config["amp"]):
        logits = forward(codes, positions, labels)
    loss = F.cross_entropy(logits.float(), codes)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config["grad_clip"] is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
    optimizer.step()
    scheduler.step()
    return loss.item() / math.log(2)


def train_prior(train: CodeMaps, val: CodeMaps, config: dict, codebook_size: int, label_classes: Sequence[str],
                model_path: str | Path, history_path: str | Path, checkpoint_path: str | Path,
                stop_at_step: int | None = None, progress: bool = True) -> dict:
    """Train the prior on ``train``, validate on ``val``, write the model and history; return a summary dict.

    ``config`` is the validated ``pixelcnn`` section. A checkpoint at ``checkpoint_path`` (written every
    ``checkpoint_every`` steps and at the end, with the history so far) is resumed when present; one from the
    last step just rewrites the model. ``stop_at_step`` stops early after checkpointing (time-boxed jobs);
    no model is written then.

    Raises:
        brainvq.runtime.CheckpointError: when the checkpoint was written for another config or other data.
        CodesError: when a code value is outside ``[0, codebook_size)``.
    """
    check_code_range(codebook_size, train=train, validation=val)
    device = select_device(config["device"])
    seed_everything(config["seed"])
    kwargs = model_kwargs(config, codebook_size, train.map_size, len(label_classes))
    model = build_prior(kwargs, label_classes, config["condition_label"], config).to(device)
    start_from_unigram(model, train.codes)
    optimizer, scheduler = optimizer_and_schedule(model, config)
    identity = training_identity(config, train, val, codebook_size, label_classes)
    checkpoint_path = Path(checkpoint_path)
    start, rows = resume_from(checkpoint_path, identity, model, optimizer, scheduler)
    history = HistoryWriter(history_path, HISTORY_FIELDS)
    for row in rows:
        history.write(row)

    tensors, val_tensors = maps_on_device(train, device), maps_on_device(val, device)
    forward = torch.compile(model) if config["compile"] and device.type == "cuda" else model
    steps = config["steps"]
    last = min(stop_at_step, steps) if stop_at_step is not None else steps
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="pixelcnn", mininterval=5)
    bits, clock = [], time.perf_counter()
    model.train()
    for step in range(start + 1, last + 1):
        idx = batch_indices(len(train), config["batch_size"], step, config["seed"]).to(device)
        bits.append(training_step(forward, model, optimizer, scheduler,
                                  [None if t is None else t[idx] for t in tensors], config))
        bar.update(1)
        if step % config["log_every"] == 0 or step == steps:
            validate = len(val) > 0 and (step % config["val_every"] == 0 or step == steps)
            val_bits = mean_bits(model, *val_tensors, config["eval_batch_size"], config["amp"]) if validate else ""
            elapsed = time.perf_counter() - clock
            row = history_row(step, bits, val_bits, len(bits) * len(idx) / elapsed, math.prod(train.map_size),
                              scheduler.get_last_lr()[0])
            rows.append(row)
            history.write(row)
            bar.set_postfix(train=f"{row['train_nll_bits']:.3f}", val=_fmt(val_bits))
            bits, clock = [], time.perf_counter()
        if step % config["checkpoint_every"] == 0 or step == last:
            save_checkpoint_atomic({
                "config": identity, "step": step, "history": rows, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            }, checkpoint_path)
    bar.close()
    if last < steps:
        return {"step": last, "finished": False}
    summary = {"step": steps, "finished": True, "train_nll_bits": rows[-1]["train_nll_bits"],
               "val_nll_bits": rows[-1]["val_nll_bits"] if len(val) else None}
    save_checkpoint_atomic(model_file_state(model, kwargs, map_size=list(train.map_size), **summary), model_path)
    return summary


def history_row(step: int, bits: list[float], val_bits, slices_per_s: float, codes_per_map: int, lr: float) -> dict:
    """Return one history.csv row (training NLL averaged over the steps since the last row)."""
    log.info("step %d: train %.4f bits/code, val %s bits/code, %.1f slices/s", step, sum(bits) / len(bits),
             _fmt(val_bits), slices_per_s)
    return {"step": step, "train_nll_bits": sum(bits) / len(bits), "val_nll_bits": val_bits,
            "slices_per_s": slices_per_s, "codes_per_s": slices_per_s * codes_per_map, "lr": lr}


def maps_on_device(maps: CodeMaps, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Return (codes long, positions float, labels long or None) of ``maps`` as tensors on ``device``."""
    return (
        torch.as_tensor(maps.codes, dtype=torch.long, device=device),
        torch.as_tensor(maps.positions, dtype=torch.float32, device=device),
        None if maps.labels is None else torch.as_tensor(maps.labels, dtype=torch.long, device=device),
    )


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


# ---------------------------------------------------------------------------------------- sample files


def sample_plan(n: int, positions: Sequence[float], labels: Sequence[str] | None = None
                ) -> tuple[np.ndarray, list[str] | None]:
    """Return (positions (n,), labels (n,) or None): ``n`` maps spread evenly over every (position, label)
    pair, grouped by pair in the order given (the first ``n % pairs`` pairs get one map more)."""
    pairs = [(p, label) for p in positions for label in (labels if labels else [None])]
    counts = [n // len(pairs) + (k < n % len(pairs)) for k in range(len(pairs))]
    plan = [pair for pair, count in zip(pairs, counts) for _ in range(count)]
    plan_positions = np.array([p for p, _ in plan], np.float32)
    return plan_positions, ([label for _, label in plan] if labels else None)


def sample_labels(prior: GatedPixelCNN, requested: Sequence[str] | None) -> list[str] | None:
    """Return the label classes to sample: ``requested`` (``sample.labels``), else all the prior's classes;
    None for a prior without label conditioning.

    Raises:
        LabelConfigError: when labels are requested from a prior trained without ``pixelcnn.condition_label``,
            or name classes the prior does not know.
    """
    classes = list(getattr(prior, "label_classes", []))
    if requested is None:
        return classes or None
    if not classes:
        raise LabelConfigError(f"sample.labels is {list(requested)} but the prior was trained without "
                               "pixelcnn.condition_label; set sample.labels to null")
    unknown = sorted(set(requested) - set(classes))
    if unknown:
        raise LabelConfigError(f"sample.labels {unknown} are not among the prior's classes {classes}")
    return list(requested)


@torch.no_grad()
def decode_codes(vqvae: torch.nn.Module, codes: torch.Tensor, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """Return images (N, H, W) float32 clipped to [0, 1], decoded from code maps (N, h, w) by
    ``vqvae.decode_indices`` (the VQ-VAE contract in docs/architecture.md)."""
    images = []
    for start in range(0, len(codes), batch_size):
        with autocast_context(device):
            decoded = vqvae.decode_indices(codes[start : start + batch_size].to(device))
        images.append(decoded.float().clamp(0, 1)[:, 0].cpu().numpy())
    return np.concatenate(images).astype(np.float32)


def write_samples(path: str | Path, codes, images: np.ndarray, positions, labels: Sequence[str] | None,
                  attrs: dict | None = None) -> Path:
    """Write samples.h5 (``codes`` (N,h,w) int16, ``images`` (N,H,W) float32 in [0, 1], ``slice_position`` (N,)
    float32, ``label`` (N,) strings, empty without labels) under a temporary name, then rename."""
    import h5py

    n = len(images)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("codes", data=np.asarray(codes).astype(np.int16))
        f.create_dataset("images", data=np.clip(images, 0, 1).astype(np.float32), chunks=(1, *images.shape[1:]),
                         compression="gzip")
        f.create_dataset("slice_position", data=np.asarray(positions, np.float32))
        f.create_dataset("label", data=np.array(list(labels) if labels else [""] * n, dtype=object),
                         dtype=h5py.string_dtype())
        f.attrs.update(attrs or {})
    return Path(path)


def save_sample_grid(path: str | Path, images: np.ndarray, positions, labels: Sequence[str] | None,
                     columns: int) -> Path:
    """Save a PNG grid of sampled images: one row per (position, label), at most ``columns`` images each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(float(p), labels[k] if labels else "") for k, p in enumerate(positions)]
    groups = list(dict.fromkeys(keys))
    fig, axes = plt.subplots(len(groups), columns, figsize=(1.6 * columns, 1.7 * len(groups)), squeeze=False)
    for row, group in enumerate(groups):
        members = [k for k, key in enumerate(keys) if key == group][:columns]
        for col in range(columns):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(members):
                ax.imshow(images[members[col]], cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_title(f"position {group[0]:.2f} {group[1]}".strip(), fontsize=8, loc="left")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return Path(path)
