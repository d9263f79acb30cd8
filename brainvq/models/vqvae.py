"""Residual convolutional autoencoder for 2D slices with a pluggable bottleneck (VQ, FSQ, AE, VAE)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from brainvq.models.quantizers import (
    FiniteScalarQuantizer,
    GaussianBottleneck,
    IdentityBottleneck,
    VectorQuantizer,
)

BOTTLENECKS = ("vq", "fsq", "ae", "vae")


class ModelConfigError(ValueError):
    """Model settings that cannot work together (channels vs downsampling, unknown bottleneck)."""


class ModelInputError(ValueError):
    """An input tensor the model cannot take (wrong rank, channels, or a size not divisible by the downsampling)."""


class NotDiscreteError(TypeError):
    """Codes were asked of a continuous bottleneck (ae, vae)."""


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))`` as in the original VQ-VAE; no normalisation, so it works
    the same for any batch split across processes.

    Args:
        channels: input and output channels.
        hidden_channels: channels of the inner 3x3 convolution.
    """

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _residual_stack(channels: int, n_blocks: int) -> list[nn.Module]:
    return [ResidualBlock(channels, max(channels // 2, 1)) for _ in range(n_blocks)]


class Encoder(nn.Module):
    """Per level a stride-2 4x4 conv and residual blocks, then a 1x1 conv to the latents.

    The first conv already downsamples (as in MONAI's VQVAE): nothing wide runs at full resolution,
    which keeps CPU training affordable.

    Args:
        in_channels: image channels.
        channels: channels after each downsampling; ``len(channels)`` halvings in total.
        res_blocks: residual blocks per level.
        latent_dim: output channels.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (64, 128, 256), res_blocks: int = 2,
                 latent_dim: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for level, width in enumerate(channels):
            if level:
                layers.append(nn.ReLU())
            layers.append(nn.Conv2d(previous, width, 4, stride=2, padding=1))
            layers += _residual_stack(width, res_blocks)
            previous = width
        layers += [nn.ReLU(), nn.Conv2d(previous, latent_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: a 3x3 conv from the latents, then per level residual blocks and a
    transposed stride-2 conv; the last one outputs the image.

    Args:
        out_channels: image channels.
        channels: the encoder's channels (used in reverse).
        res_blocks: residual blocks per level.
        latent_dim: input channels.
    """

    def __init__(self, out_channels: int = 1, channels: Sequence[int] = (64, 128, 256), res_blocks: int = 2,
                 latent_dim: int = 64):
        super().__init__()
        widths = list(channels)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, widths[0], 3, padding=1)]
        for width, next_width in zip(widths, widths[1:] + [out_channels]):
            layers += _residual_stack(width, res_blocks)
            layers += [nn.ReLU(), nn.ConvTranspose2d(width, next_width, 4, stride=2, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class VQVAE(nn.Module):
    """Convolutional autoencoder with a pluggable bottleneck; a VQ-VAE with the default one.

    Args:
        bottleneck: a module mapping latents ``(B, latent_dim, h, w)`` to ``(latents, aux)`` (see
            :mod:`brainvq.models.quantizers`); default ``VectorQuantizer(512, latent_dim)``.
        in_channels: image channels.
        channels: encoder channels after each stride-2 downsampling; the downsampling factor is
            ``2 ** len(channels)`` (3 levels: 256 px -> 32x32 codes).
        res_blocks: residual blocks per level, in encoder and decoder.
        latent_dim: channels of the latents the bottleneck sees.
    """

    def __init__(self, bottleneck: nn.Module | None = None, in_channels: int = 1,
                 channels: Sequence[int] = (64, 128, 256), res_blocks: int = 2, latent_dim: int = 64):
        super().__init__()
        if not channels:
            raise ModelConfigError("channels must list at least one level")
        self.in_channels = in_channels
        self.downsample = 2 ** len(channels)
        self.encoder = Encoder(in_channels, channels, res_blocks, latent_dim)
        self.bottleneck = bottleneck if bottleneck is not None else VectorQuantizer(512, latent_dim)
        self.decoder = Decoder(in_channels, channels, res_blocks, latent_dim)

    @property
    def is_discrete(self) -> bool:
        """Whether the bottleneck produces codes (vq, fsq)."""
        return hasattr(self.bottleneck, "latents_to_indices")

    @property
    def codebook_size(self) -> int | None:
        return getattr(self.bottleneck, "codebook_size", None)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ModelInputError(f"expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] % self.downsample or x.shape[-1] % self.downsample:
            raise ModelInputError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor {self.downsample}; "
                "choose preprocess.size as a multiple of vqvae.downsample"
            )

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the encoder output before the bottleneck, ``(B, latent_dim, H/f, W/f)``."""
        self._check_input(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(reconstruction (B, C, H, W), aux)``; the reconstruction is not clamped.

        ``aux["loss"]`` holds the bottleneck's weighted loss terms; discrete bottlenecks add
        ``indices (B, h, w)`` and ``perplexity``.
        """
        latents, aux = self.bottleneck(self.encode_features(x))
        return self.decoder(latents), aux

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Return the code indices ``(B, H/f, W/f)`` (long) of images ``x (B, C, H, W)``."""
        if not self.is_discrete:
            raise NotDiscreteError(
                f"bottleneck {type(self.bottleneck).__name__} has no codes; use vqvae.bottleneck vq or fsq"
            )
        return self.bottleneck.latents_to_indices(self.encode_features(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Return images ``(B, C, H, W)`` clamped to [0, 1] from code indices ``(B, h, w)``."""
        if not self.is_discrete:
            raise NotDiscreteError(
                f"bottleneck {type(self.bottleneck).__name__} has no codes; use vqvae.bottleneck vq or fsq"
            )
        latents = self.bottleneck.indices_to_latents(indices.long())
        return self.decoder(latents).clamp(0, 1)


def build_bottleneck(section: dict) -> nn.Module:
    """Return the bottleneck named by ``section["bottleneck"]``, configured from the ``vqvae`` section."""
    kind = section["bottleneck"]
    dim = section["latent_dim"]
    if kind == "vq":
        return VectorQuantizer(
            codebook_size=section["codebook_size"],
            dim=dim,
            codebook_dim=section["codebook_dim"],
            commitment_weight=section["commitment_weight"],
            decay=section["ema_decay"],
            kmeans_init=section["kmeans_init"],
            kmeans_iters=section["kmeans_iters"],
            dead_code_steps=section["dead_code_steps"],
            l2_normalize=section["l2_normalize"],
        )
    if kind == "fsq":
        return FiniteScalarQuantizer(levels=section["fsq_levels"], dim=dim)
    if kind == "ae":
        return IdentityBottleneck()
    if kind == "vae":
        return GaussianBottleneck(dim=dim, kl_weight=section["kl_weight"], free_bits=section["kl_free_bits"])
    raise ModelConfigError(f"vqvae.bottleneck={kind!r}: use one of {BOTTLENECKS}")


def build_vqvae(section: dict, in_channels: int = 1) -> VQVAE:
    """Return the model described by a validated ``vqvae`` config section.

    Raises:
        ModelConfigError: when ``channels`` does not have one entry per halving of ``downsample``.
    """
    levels = math.log2(section["downsample"])
    if len(section["channels"]) != levels:
        raise ModelConfigError(
            f"vqvae.channels={section['channels']} has {len(section['channels'])} levels but "
            f"vqvae.downsample={section['downsample']} needs {int(levels)} (one per halving); "
            "give one channel count per level, e.g. [32, 64] for 4 or [64, 128, 256] for 8"
        )
    return VQVAE(
        bottleneck=build_bottleneck(section),
        in_channels=in_channels,
        channels=section["channels"],
        res_blocks=section["res_blocks"],
        latent_dim=section["latent_dim"],
    )
