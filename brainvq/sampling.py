"""Sampling from the prior (rule sample): code maps drawn by the PixelCNN, decoded by the VQ-VAE, written to
``samples/samples.h5`` and a PNG grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from brainvq.files import atomic_path, save_figure_atomic
from brainvq.models.pixelcnn import GatedPixelCNN, nucleus
from brainvq.prior import LabelConfigError, label_indices, model_device
from brainvq.runtime import autocast_context

# ---------------------------------------------------------------------------------------------- drawing


@torch.no_grad()
def sample_codes(prior: GatedPixelCNN, positions: Sequence[float], labels: Sequence[str] | None = None,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
                 device: str | torch.device | None = None, top_p: float = 1.0, amp: bool = True) -> torch.Tensor:
    """Return code maps (N, h, w) long on the CPU, drawn in raster order from the prior at slice ``positions``
    (N,) and ``labels`` (N strings, for a label-conditioned prior), logits divided by ``temperature`` and each
    code drawn from the nucleus of mass ``top_p`` (:func:`brainvq.models.pixelcnn.nucleus`).

    Maps are drawn ``batch_size`` at a time with one ``torch.Generator`` seeded with ``seed``: the same seed,
    batch size, device and ``amp`` (bf16 autocast on CUDA; ``sample.amp``) give the same maps. The prior is moved
    to ``device`` (default: where it is).
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
                                 top_p, amp).cpu()
    return out


def sample_batch(prior: GatedPixelCNN, positions: torch.Tensor, labels: torch.Tensor | None,
                 temperature: float, generator: torch.Generator, top_p: float = 1.0, amp: bool = True) -> torch.Tensor:
    """Return one batch of maps (B, h, w) drawn position by position from :meth:`GatedPixelCNN.raster_logits`."""
    device = positions.device
    codes = torch.zeros(len(positions), *prior.map_size, dtype=torch.long, device=device)
    with autocast_context(device, amp):
        cond = prior.condition(positions, labels)
        for i, j, logits in prior.raster_logits(codes, cond, positions):
            probs = nucleus(torch.softmax(logits.float() / temperature, dim=1), top_p)
            codes[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return codes


# -------------------------------------------------------------------------------------------- the files


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
                 device: torch.device, amp: bool = True) -> np.ndarray:
    """Return images (N, H, W) float32 clipped to [0, 1], decoded from code maps (N, h, w) by
    ``vqvae.decode_indices`` (the VQ-VAE contract in docs/architecture.md)."""
    images = []
    for start in range(0, len(codes), batch_size):
        with autocast_context(device, amp):
            decoded = vqvae.decode_indices(codes[start : start + batch_size].to(device))
        images.append(decoded.float().clamp(0, 1)[:, 0].cpu().numpy())
    return np.concatenate(images).astype(np.float32)


def write_samples(path: str | Path, codes, images: np.ndarray, positions, labels: Sequence[str] | None,
                  attrs: dict | None = None) -> Path:
    """Write samples.h5 (``codes`` (N,h,w) int16, ``images`` (N,H,W) float32 in [0, 1], ``slice_position`` (N,)
    float32, ``label`` (N,) strings, empty without labels) under a temporary name, then rename."""
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
