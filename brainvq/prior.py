"""The learned prior over VQ-VAE code maps (rule train_pixelcnn): the code-map data, the PixelCNN's training
task, its likelihood and the baselines.

Public API (used by the evaluation stage): :func:`load_prior`, :func:`bits_per_code`, :func:`uniform_bits`,
:func:`unigram_bits`, :func:`scan_labels`, :func:`read_code_index`, :func:`load_code_rows`, :func:`code_maps`.
The ``train_pixelcnn`` rule calls :func:`train_prior` on the maps from :func:`training_maps`, which hands a
:class:`PriorTask` to the one training loop (:func:`brainvq.engine.train`). Sampling is in
:mod:`brainvq.sampling`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainvq import engine
from brainvq.config import validated_config
from brainvq.data import read_split
from brainvq.engine import StepBatchSampler, device_batches, load_model_file
from brainvq.models.pixelcnn import GatedPixelCNN
from brainvq.quantize import INDEX_COLUMNS
from brainvq.runtime import autocast_context

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["step", "train_nll_bits", "val_nll_bits", "codes_per_s", "slices_per_s", "lr"]
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
        brainvq.engine.CheckpointError: when the file cannot be read or is not a prior's model file.
    """
    state = load_model_file(path, "pixelcnn", "train_pixelcnn")
    model = build_prior(state["model_kwargs"], state["label_classes"], state["condition_label"], state["config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


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
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one read at the end
    for start in range(0, len(codes), batch_size):
        part = slice(start, start + batch_size)
        total += batch_nll_sum(
            model, codes[part].to(device), positions[part].to(device),
            None if labels is None else labels[part].to(device), amp,
        ).double()
    model.train(was_training)
    return float(total) / codes.numel() / math.log(2)


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


# ---------------------------------------------------------------------------------------------- training


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


def maps_on_device(maps: CodeMaps, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Return (codes long, positions float, labels long or None) of ``maps`` as tensors on ``device``."""
    return (
        torch.as_tensor(maps.codes, dtype=torch.long, device=device),
        torch.as_tensor(maps.positions, dtype=torch.float32, device=device),
        None if maps.labels is None else torch.as_tensor(maps.labels, dtype=torch.long, device=device),
    )


class PriorTask:
    """The PixelCNN prior for :func:`brainvq.engine.train`: the ``train`` maps (validated on ``val``) with the
    ``pixelcnn`` config section ``settings``, over ``codebook_size`` codes and ``label_classes``. The maps live
    on the device; each step indexes its batch there."""

    section = "pixelcnn"
    history_fields = HISTORY_FIELDS

    def __init__(self, settings: dict, train: CodeMaps, val: CodeMaps, codebook_size: int,
                 label_classes: Sequence[str]):
        self.settings, self.train, self.val = settings, train, val
        self.codebook_size, self.label_classes = int(codebook_size), list(label_classes)
        self.kwargs = model_kwargs(settings, codebook_size, train.map_size, len(label_classes))
        self._val_tensors = None

    def fingerprint(self) -> dict:
        return {"codebook_size": self.codebook_size, "label_classes": self.label_classes,
                "maps": data_fingerprint(self.train, self.val)}

    def train_size(self) -> int:
        return len(self.train)

    def build_model(self, device: torch.device) -> GatedPixelCNN:
        model = build_prior(self.kwargs, self.label_classes, self.settings["condition_label"], self.settings)
        model = model.to(device)
        start_from_unigram(model, self.train.codes)
        return model

    def batches(self, sampler: StepBatchSampler, device: torch.device):
        return device_batches(maps_on_device(self.train, device), sampler, device)

    def forward(self, module: torch.nn.Module, batch) -> torch.Tensor:
        return module(*batch)

    def loss_terms(self, logits: torch.Tensor, batch, step: int) -> tuple[dict, dict]:
        return {"nll": F.cross_entropy(logits.float(), batch[0])}, {}

    def history_values(self, totals: dict, steps: int, slices_per_s: float) -> dict:
        return {"train_nll_bits": float(totals["loss"]) / steps / math.log(2),
                "codes_per_s": slices_per_s * math.prod(self.train.map_size)}

    def validate(self, model: GatedPixelCNN, device: torch.device) -> dict:
        if len(self.val) == 0:
            return {}
        if self._val_tensors is None:
            self._val_tensors = maps_on_device(self.val, device)
        return {"val_nll_bits": mean_bits(model, *self._val_tensors, self.settings["eval_batch_size"],
                                          self.settings["amp"])}

    def summary(self, last_row: dict) -> dict:
        """The final training and validation NLL (bits per code) from the last history row."""
        return {"train_nll_bits": last_row.get("train_nll_bits"),
                "val_nll_bits": last_row.get("val_nll_bits") if len(self.val) else None}

    def model_file(self, model: GatedPixelCNN, last_row: dict) -> dict:
        return {"model_kwargs": self.kwargs, "codebook_size": self.codebook_size,
                "label_classes": self.label_classes, "condition_label": self.settings["condition_label"],
                "map_size": list(self.train.map_size), **self.summary(last_row)}

    def memory_hint(self) -> str:
        s = self.settings
        return (f"lower pixelcnn.batch_size (now {s['batch_size']}), pixelcnn.eval_batch_size (now "
                f"{s['eval_batch_size']}), pixelcnn.channels (now {s['channels']}) or pixelcnn.layers (now {s['layers']})")


def train_prior(train: CodeMaps, val: CodeMaps, config: dict, codebook_size: int, label_classes: Sequence[str],
                out_dir: str | Path, stale: str = "refuse", stop_at_step: int | None = None,
                progress: bool = True) -> dict:
    """Train the prior on ``train``, validate on ``val``; write ``out_dir/model.pt`` and ``out_dir/history.csv``;
    return a summary dict (``step``, ``finished``, ``train_nll_bits``, ``val_nll_bits``).

    ``config`` is the ``pixelcnn`` section. ``out_dir/checkpoints/last.pt`` (written every ``checkpoint_every``
    steps and at the end) is resumed when present; one from the last step just rewrites the model.
    ``stop_at_step`` stops early after checkpointing (time-boxed jobs); no model is written then. ``stale``: what
    to do with a checkpoint of other settings or data, ``"refuse"`` or ``"archive"`` (see
    :func:`brainvq.engine.resumable_checkpoint`). Under torchrun or srun the processes share each batch (DDP).

    Raises:
        brainvq.engine.CheckpointError: when the checkpoint was written for another config or other data.
        CodesError: when a code value is outside ``[0, codebook_size)``.
    """
    check_code_range(codebook_size, train=train, validation=val)
    task = PriorTask(validated_config({"pixelcnn": dict(config)})["pixelcnn"], train, val, codebook_size,
                     label_classes)
    result = engine.train(task, out_dir, stale, stop_at_step, progress)
    if not result["finished"]:
        return {"step": result["step"], "finished": False}
    return {"step": result["step"], "finished": True, **task.summary(result["history"])}
