"""Small CNNs that judge slices: the classifier of the two-sample test and the slice-position regressor.

They are trained inside ``evaluate`` on the CPU in seconds: slices are area-downsampled to ``size`` px, four
stride-2 convolutions with GroupNorm and SiLU lead to a global average (the *features*), and a linear layer gives
the output. They never share weights with the VQ-VAE they help to judge.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainvq.engine import training_step


class SliceCNN(nn.Module):
    """A small CNN from slices ``(B, 1, S, S)`` to ``outputs`` numbers per slice.

    Args:
        outputs: numbers per slice (1 for a logit or a regression target).
        width: channels of the first convolution; later ones have 2x and 4x as many. The features are ``4 * width``.
        size: side in px the slices are downsampled to before the first convolution.
    """

    def __init__(self, outputs: int = 1, width: int = 16, size: int = 64):
        super().__init__()
        self.size = size
        channels = [1, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(4, c_out), nn.SiLU()]
        self.body = nn.Sequential(*blocks)
        self.out = nn.Linear(channels[-1], outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled features ``(B, 4 * width)``."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def slices_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """Return slices ``(N, H, W)`` as a float tensor ``(N, 1, size, size)``, area-downsampled when larger."""
    x = torch.tensor(np.asarray(images, np.float32))[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def fit_slice_network(images: np.ndarray, targets: np.ndarray, loss: str, epochs: int, seed: int, size: int = 64,
                      width: int = 16, batch_size: int = 32, lr: float = 2e-3) -> SliceCNN:
    """Return a :class:`SliceCNN` trained on ``images`` ``(N, H, W)`` to predict ``targets`` ``(N,)``.

    Args:
        loss: ``"logistic"`` (targets 0/1, the output is a logit) or ``"l1"`` (a regression target).
        epochs: passes over the data in seeded random order (AdamW, constant ``lr``).
    """
    if loss not in ("logistic", "l1"):
        raise ValueError(f"loss must be 'logistic' or 'l1', got {loss!r}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SliceCNN(1, width, size)
    x, y = slices_tensor(images, size), torch.tensor(np.asarray(targets, np.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    constant_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    task = JudgeTask(nn.BCEWithLogitsLoss() if loss == "logistic" else nn.L1Loss())
    model.train()
    device = torch.device("cpu")
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            training_step(task, model, model, optimizer, constant_lr, (x[batch], y[batch]), 0, device)
    return model.eval()


class JudgeTask:
    """The step of :func:`fit_slice_network` as a :class:`brainvq.engine.Task` for the engine's one training step
    (no mixed precision, no gradient clipping); the engine's checkpointed loop is not needed for seconds of CPU."""

    settings = {"amp": False, "grad_clip": None}

    def __init__(self, criterion: nn.Module):
        self.criterion = criterion

    def forward(self, module: nn.Module, batch):
        return module(batch[0])[:, 0]

    def loss_terms(self, output, batch, step: int) -> tuple[dict, dict]:
        return {"loss_term": self.criterion(output, batch[1])}, {}


@torch.no_grad()
def network_outputs(model: SliceCNN, images: np.ndarray, what: str = "output", batch_size: int = 256) -> np.ndarray:
    """Return the network's first output per slice ``(N,)`` (``what="output"``) or its features ``(N, D)``."""
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = slices_tensor(images[start:start + batch_size], model.size)
        chunks.append((model(x)[:, 0] if what == "output" else model.features(x)).numpy())
    if not chunks:
        return np.zeros((0,) if what == "output" else (0, model.out.in_features), np.float32)
    return np.concatenate(chunks)
