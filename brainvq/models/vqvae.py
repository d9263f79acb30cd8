"""Residual convolutional autoencoder for 2D slices or 3D volumes with a pluggable bottleneck
(VQ, FSQ, SOM, AE, VAE).

One definition serves both: ``spatial_dims`` (2 or 3) picks the convolutions, as MONAI's
``Convolution`` does; codes are ``(B, h, w)`` for slices and ``(B, d, h, w)`` for volumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from brainvq.models.quantizers import (
    FiniteScalarQuantizer,
    GaussianBottleneck,
    IdentityBottleneck,
    VectorQuantizer,
)
from brainvq.models.som import SOMQuantizer
from brainvq.models.spatial import check_spatial_dims, conv, conv_transpose

BOTTLENECKS = ("vq", "fsq", "som", "ae", "vae")


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
        hidden_channels: channels of the inner 3x3 (3x3x3 in 3D) convolution.
        spatial_dims: 2 for slices, 3 for volumes.
    """

    def __init__(self, channels: int, hidden_channels: int, spatial_dims: int = 2):
        super().__init__()
        conv_nd = conv(spatial_dims)
        self.body = nn.Sequential(
            nn.ReLU(),
            conv_nd(channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            conv_nd(hidden_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _residual_stack(channels: int, n_blocks: int, spatial_dims: int) -> list[nn.Module]:
    return [ResidualBlock(channels, max(channels // 2, 1), spatial_dims) for _ in range(n_blocks)]


class Encoder(nn.Module):
    """Per level a stride-2 4x4 conv and residual blocks, then a 1x1 conv to the latents.

    The first conv already downsamples (as in MONAI's VQVAE): nothing wide runs at full resolution,
    which keeps CPU training affordable.

    Args:
        in_channels: image channels.
        channels: channels after each downsampling; ``len(channels)`` halvings in total.
        res_blocks: residual blocks per level.
        latent_dim: output channels.
        spatial_dims: 2 for slices, 3 for volumes.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (64, 128, 256), res_blocks: int = 2,
                 latent_dim: int = 64, spatial_dims: int = 2):
        super().__init__()
        conv_nd = conv(spatial_dims)
        layers: list[nn.Module] = []
        previous = in_channels
        for level, width in enumerate(channels):
            if level:
                layers.append(nn.ReLU())
            layers.append(conv_nd(previous, width, 4, stride=2, padding=1))
            layers += _residual_stack(width, res_blocks, spatial_dims)
            previous = width
        layers += [nn.ReLU(), conv_nd(previous, latent_dim, 1)]
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
        spatial_dims: 2 for slices, 3 for volumes.
    """

    def __init__(self, out_channels: int = 1, channels: Sequence[int] = (64, 128, 256), res_blocks: int = 2,
                 latent_dim: int = 64, spatial_dims: int = 2):
        super().__init__()
        widths = list(channels)[::-1]
        layers: list[nn.Module] = [conv(spatial_dims)(latent_dim, widths[0], 3, padding=1)]
        for width, next_width in zip(widths, widths[1:] + [out_channels]):
            layers += _residual_stack(width, res_blocks, spatial_dims)
            layers += [nn.ReLU(), conv_transpose(spatial_dims)(width, next_width, 4, stride=2, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class VQVAE(nn.Module):
    """Convolutional autoencoder with a pluggable bottleneck; a VQ-VAE with the default one.

    The same class builds the slice model (``spatial_dims=2``: images ``(B, C, H, W)``, codes
    ``(B, h, w)``) and the volume model (``spatial_dims=3``: ``(B, C, D, H, W)``, codes ``(B, d, h, w)``).

    Reconstruction from the encoder output: with ``gamma_e > 0`` the training forward also decodes the
    encoder output ``z_e`` itself, skipping the bottleneck, into ``aux["reconstruction_e"]`` (the
    SOM-VAE's second reconstruction, available to every bottleneck). The training loss then is

        ``gamma_q * L_rec(x, D(z_q)) + gamma_e * L_rec(x, D(z_e)) + sum(aux["loss"].values())``

    which :meth:`reconstruction_losses` returns as the terms ``recon_loss`` and ``recon_loss_e``.
    With the defaults (``gamma_q=1``, ``gamma_e=0``) nothing extra is computed and the loss is the
    plain one.

    Args:
        bottleneck: a module mapping latents ``(B, latent_dim, *spatial)`` to ``(latents, aux)`` (see
            :mod:`brainvq.models.quantizers`); default ``VectorQuantizer(512, latent_dim)``.
        in_channels: image channels.
        channels: encoder channels after each stride-2 downsampling; the downsampling factor is
            ``2 ** len(channels)`` along every axis (3 levels: 256 px -> 32x32 codes).
        res_blocks: residual blocks per level, in encoder and decoder.
        latent_dim: channels of the latents the bottleneck sees.
        spatial_dims: 2 for slices, 3 for whole volumes.
        gamma_q: weight of the reconstruction from the bottleneck's latents.
        gamma_e: weight of the reconstruction decoded from the encoder output (0: not computed).
    """

    def __init__(self, bottleneck: nn.Module | None = None, in_channels: int = 1,
                 channels: Sequence[int] = (64, 128, 256), res_blocks: int = 2, latent_dim: int = 64,
                 spatial_dims: int = 2, gamma_q: float = 1.0, gamma_e: float = 0.0):
        super().__init__()
        if not channels:
            raise ModelConfigError("channels must list at least one level")
        if gamma_q < 0 or gamma_e < 0:
            raise ModelConfigError(f"vqvae.gamma_q={gamma_q}, vqvae.gamma_e={gamma_e}: weights must be >= 0")
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = in_channels
        self.downsample = 2 ** len(channels)
        self.gamma_q, self.gamma_e = gamma_q, gamma_e
        self.encoder = Encoder(in_channels, channels, res_blocks, latent_dim, spatial_dims)
        self.bottleneck = (
            bottleneck if bottleneck is not None else VectorQuantizer(512, latent_dim, spatial_dims=spatial_dims)
        )
        bottleneck_dims = getattr(self.bottleneck, "spatial_dims", spatial_dims)
        if bottleneck_dims != spatial_dims:
            raise ModelConfigError(
                f"the bottleneck was built for spatial_dims={bottleneck_dims} but the model for {spatial_dims}; "
                "build both with the same spatial_dims"
            )
        self.decoder = Decoder(in_channels, channels, res_blocks, latent_dim, spatial_dims)

    @property
    def is_discrete(self) -> bool:
        """Whether the bottleneck produces codes (vq, fsq, som)."""
        return hasattr(self.bottleneck, "latents_to_indices")

    @property
    def codebook_size(self) -> int | None:
        return getattr(self.bottleneck, "codebook_size", None)

    def _check_input(self, x: torch.Tensor) -> None:
        axes = "H, W" if self.spatial_dims == 2 else "D, H, W"
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            kind = "images" if self.spatial_dims == 2 else "volumes"
            raise ModelInputError(f"expected {kind} (B, {self.in_channels}, {axes}), got shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if any(n % self.downsample for n in size):
            raise ModelInputError(
                f"image size {size} is not divisible by the downsampling factor {self.downsample}; "
                "choose preprocess.size as a multiple of vqvae.downsample"
            )

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the encoder output before the bottleneck, ``(B, latent_dim, *size / f)``."""
        self._check_input(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(reconstruction (B, C, *size), aux)``; the reconstruction is not clamped.

        ``aux["loss"]`` holds the bottleneck's weighted loss terms; discrete bottlenecks add
        ``indices (B, *size / f)`` and ``perplexity``. In training with ``gamma_e > 0``,
        ``aux["reconstruction_e"]`` is the decoding of the encoder output (see the class docstring).
        """
        features = self.encode_features(x)
        latents, aux = self.bottleneck(features)
        if self.training and self.gamma_e > 0:
            aux["reconstruction_e"] = self.decoder(features)
        return self.decoder(latents), aux

    def reconstruction_losses(self, reconstruction: torch.Tensor, target: torch.Tensor, aux: dict,
                              loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
        """Return the weighted reconstruction terms of one step.

        Args:
            reconstruction: the forward's reconstruction ``D(z_q)``.
            target: the input images.
            aux: the forward's ``aux``.
            loss: the reconstruction loss ``L_rec(reconstruction, target)`` (e.g. L1, plus 1 - SSIM).

        Returns:
            ``{"recon_loss": gamma_q * L_rec(D(z_q), x)}`` plus ``"recon_loss_e": gamma_e * L_rec(D(z_e), x)``
            when the forward produced ``aux["reconstruction_e"]``; add them to ``aux["loss"]``'s terms.
        """
        terms = {"recon_loss": self.gamma_q * loss(reconstruction, target)}
        if "reconstruction_e" in aux:
            terms["recon_loss_e"] = self.gamma_e * loss(aux["reconstruction_e"], target)
        return terms

    @torch.no_grad()
    def initialize_codebook(self, x: torch.Tensor) -> bool:
        """Initialise the bottleneck's codebook by k-means on the encodings of images ``x``.

        Call it on every process with one batch before training to keep the first training step free of
        the initialisation (it otherwise happens there). Returns whether there was a codebook to initialise.
        """
        if not hasattr(self.bottleneck, "initialize_from"):
            return False
        self.bottleneck.initialize_from(self.encode_features(x))
        return True

    def _require_codes(self) -> None:
        if not self.is_discrete:
            raise NotDiscreteError(
                f"bottleneck {type(self.bottleneck).__name__} has no codes; use vqvae.bottleneck vq or fsq (or som)"
            )

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Return the code indices ``(B, *size / f)`` (long) of images ``x (B, C, *size)``."""
        self._require_codes()
        return self.bottleneck.latents_to_indices(self.encode_features(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Return images ``(B, C, *size)`` clamped to [0, 1] from code indices ``(B, *size / f)``."""
        self._require_codes()
        latents = self.bottleneck.indices_to_latents(indices.long())
        return self.decoder(latents).clamp(0, 1)


def build_bottleneck(section: dict, spatial_dims: int = 2) -> nn.Module:
    """Return the bottleneck named by ``section["bottleneck"]``, configured from the ``vqvae`` section."""
    kind = section["bottleneck"]
    dim = section["latent_dim"]
    # What the learned codebooks (vq, som) read alike.
    codebook = dict(
        codebook_size=section["codebook_size"],
        dim=dim,
        commitment_weight=section["commitment_weight"],
        kmeans_init=section["kmeans_init"],
        kmeans_iters=section["kmeans_iters"],
        spatial_dims=spatial_dims,
    )
    if kind == "vq":
        return VectorQuantizer(
            codebook_dim=section["codebook_dim"],
            decay=section["ema_decay"],
            dead_code_steps=section["dead_code_steps"],
            l2_normalize=section["l2_normalize"],
            **codebook,
        )
    if kind == "som":
        return SOMQuantizer(
            grid=section["som_grid"],
            topology=section["som_topology"],
            neighbour_weight=section["som_neighbour_weight"],
            straight_through=section["som_straight_through"],
            **codebook,
        )
    if kind == "fsq":
        return FiniteScalarQuantizer(levels=section["fsq_levels"], dim=dim, spatial_dims=spatial_dims)
    if kind == "ae":
        return IdentityBottleneck()
    if kind == "vae":
        return GaussianBottleneck(dim=dim, kl_weight=section["kl_weight"], free_bits=section["kl_free_bits"],
                                  spatial_dims=spatial_dims)
    raise ModelConfigError(f"vqvae.bottleneck={kind!r}: use one of {BOTTLENECKS}")


def build_vqvae(section: dict, in_channels: int = 1, spatial_dims: int = 2) -> VQVAE:
    """Return the model described by a validated ``vqvae`` config section, for slices (``spatial_dims=2``)
    or whole volumes (``spatial_dims=3``).

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
    # Sections saved with models trained before the gamma keys existed lack them: the class defaults apply.
    gammas = {key: section[key] for key in ("gamma_q", "gamma_e") if key in section}
    return VQVAE(
        bottleneck=build_bottleneck(section, spatial_dims),
        in_channels=in_channels,
        channels=section["channels"],
        res_blocks=section["res_blocks"],
        latent_dim=section["latent_dim"],
        spatial_dims=spatial_dims,
        **gammas,
    )
