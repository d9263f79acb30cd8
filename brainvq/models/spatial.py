"""One network definition for 2D slices and 3D volumes: layers and reshapes chosen by ``spatial_dims``.

As in MONAI's ``Convolution``, the dimensionality is an argument, not a copy of a class: images are
``(B, C, H, W)`` with ``spatial_dims=2`` and ``(B, C, D, H, W)`` with ``spatial_dims=3``.
"""

from __future__ import annotations

import torch
from torch import nn

SPATIAL_DIMS = (2, 3)


class SpatialDimsError(ValueError):
    """``spatial_dims`` is neither 2 (slices) nor 3 (volumes)."""


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise :class:`SpatialDimsError`."""
    if spatial_dims not in SPATIAL_DIMS:
        raise SpatialDimsError(f"spatial_dims={spatial_dims!r}: use 2 (slices) or 3 (whole volumes)")
    return spatial_dims


def conv(spatial_dims: int) -> type[nn.Module]:
    """Return ``nn.Conv2d`` or ``nn.Conv3d``."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[check_spatial_dims(spatial_dims)]


def conv_transpose(spatial_dims: int) -> type[nn.Module]:
    """Return ``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[check_spatial_dims(spatial_dims)]


def channels_to_rows(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B * prod(spatial), C)``: one row per position."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def rows_to_channels(rows: torch.Tensor, batch: int, spatial: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`channels_to_rows`: ``(B * prod(spatial), C)`` -> ``(B, C, *spatial)`` (a view)."""
    return rows.reshape(batch, *spatial, -1).movedim(-1, 1)


def channel_view(values: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Per-channel values ``(C,)`` shaped ``(1, C, 1, ...)`` to broadcast over ``(B, C, *spatial)``."""
    return values.view(1, -1, *([1] * spatial_dims))
