"""Where and how a model runs: device choice, bf16 autocast, seeding (training lives in brainvq.engine)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def select_device(preference: str = "auto") -> torch.device:
    """Return CUDA when present (or asked for), else the CPU."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible; set device: auto or cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_context(device: torch.device, enabled: bool = True):
    """Return a bf16 autocast context on CUDA, a no-op context on the CPU (fp32 keeps CPU runs exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
