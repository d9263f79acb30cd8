"""Bottlenecks for the autoencoder: EMA vector quantizer, finite scalar quantizer, identity, Gaussian (VAE).

Every bottleneck maps channels-first latents ``(B, D, *spatial)`` (``(B, D, h, w)`` for slices,
``(B, D, d, h, w)`` for volumes) to ``(latents, aux)`` where ``aux`` holds ``"loss"`` (a dict of weighted
terms to add to the training loss) and, for the discrete ones, ``"indices"`` ``(B, *spatial)`` and
``"perplexity"``. Each is usable on its own; ``spatial_dims`` only picks the 1x1 convolutions.

A training forward never reads a value back from the device (no ``.item()``, ``bool(tensor)``,
data-dependent shapes) after the codebook's one-off k-means initialisation, so a GPU step is not held
up by the host; everything ``aux`` reports is a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from brainvq.models.spatial import channel_view, channels_to_rows, conv, rows_to_channels


class QuantizerConfigError(ValueError):
    """A quantizer argument is out of range (codebook size, FSQ levels, projection size)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (no-op outside torch.distributed)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Return the rows of ``tensor`` from every process, concatenated in rank order (equal sizes)."""
    if not _distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def check_codebook_size(codebook_size: int) -> None:
    """Raise :class:`QuantizerConfigError` unless ``codebook_size`` codes fit the int16 code files."""
    if not 2 <= codebook_size <= 32767:
        raise QuantizerConfigError(f"codebook_size={codebook_size}: must be in [2, 32767] (codes are stored as int16)")


def perplexity_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """Return ``exp(entropy)`` of the code histogram ``counts`` (1 = one code used, K = uniform use, 0 = none)."""
    total = counts.sum()
    # clamp and where instead of an `if`: no device-to-host read (counts are integers, so a non-zero total is >= 1)
    p = counts.float() / total.clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return torch.where(total > 0, perplexity, torch.zeros_like(perplexity))


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Return how often each of ``codebook_size`` codes occurs in ``indices`` (any shape), as float32.

    Added onto a fixed-size zeros tensor: unlike ``torch.bincount``, which reads the largest index back
    to size its output even when ``minlength`` is given, this never waits for the device.
    """
    flat = indices.reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    return torch.zeros(codebook_size, device=flat.device).index_add_(0, flat, ones)


def nearest_code_indices(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Return the index of the nearest (squared Euclidean) code in ``codebook`` (K, d) for each row (N, d)."""
    distances = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ codebook.t() + codebook.pow(2).sum(1)[None]
    return distances.argmin(dim=1)


def kmeans(samples: torch.Tensor, k: int, iters: int, l2_normalize: bool = False) -> torch.Tensor:
    """Return ``k`` centroids of ``samples`` (N, d) from Lloyd's algorithm seeded with random samples.

    Empty clusters keep their previous centroid. Uses the global torch RNG (seed it for reproducibility).
    """
    n = samples.shape[0]
    start = torch.randperm(n, device=samples.device)[:k] if n >= k else torch.randint(n, (k,), device=samples.device)
    centroids = samples[start].clone()
    for _ in range(iters):
        assign = torch.cdist(samples, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if l2_normalize:
            centroids = F.normalize(centroids, dim=-1)
    return centroids


@torch.no_grad()
def kmeans_codebook(rows: torch.Tensor, codebook_size: int, iters: int, l2_normalize: bool = False,
                    arrange=None) -> torch.Tensor:
    """Return a codebook (codebook_size, d) by k-means on the rows of every process, identical on all.

    ``arrange`` optionally reorders the centroids (e.g. onto a SOM grid) before rank 0's result is
    broadcast.
    """
    samples = _all_gather_rows(rows)
    centroids = kmeans(samples, codebook_size, iters, l2_normalize)
    if arrange is not None:
        centroids = arrange(centroids)
    return _broadcast_from_rank0(centroids.contiguous())


class KMeansInitialized(nn.Module):
    """Base of the codebooks that k-means initialises once, from the first training batch or an explicit
    :meth:`initialize_from` call made before training.

    Whether that happened is kept twice: in the ``initialized`` buffer, so checkpoints carry it, and in a
    host-side bool that the training forward reads, so a step never waits for the device to answer. The
    bool is refreshed from the buffer once, when a state dict is loaded. Every process runs the
    initialisation at the same step (the same collectives), so DDP stays in step.
    """

    def _register_initialized(self, kmeans_init: bool) -> None:
        # An integer flag rather than bool: every DDP backend can broadcast it.
        self.register_buffer("initialized", torch.tensor(0 if kmeans_init else 1, dtype=torch.long))
        self.needs_initialization = kmeans_init

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.needs_initialization = not bool(self.initialized)  # one read per load, never per step

    def _lookup_rows(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, dim, *spatial)`` -> float32 rows ``(N, d)`` in the space the codebook lives in."""
        raise NotImplementedError

    def _initialize(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def initialize_from(self, z: torch.Tensor) -> None:
        """Initialise the codebook by k-means on latents ``z (B, dim, *spatial)`` (all processes must call it)."""
        with torch.autocast(z.device.type, enabled=False):
            self._initialize(self._lookup_rows(z))
        self.initialized.fill_(1)
        self.needs_initialization = False

    def _initialize_if_needed(self, rows: torch.Tensor) -> None:
        if self.training and self.needs_initialization:
            self._initialize(rows.detach())
            self.initialized.fill_(1)
            self.needs_initialization = False


class CodeUsage:
    """Counts how often each code is used over a pass (validation set, quantization run).

    Args:
        codebook_size: number of codes.
    """

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, indices: torch.Tensor) -> None:
        """Add the codes in ``indices`` (any shape) to the counts."""
        self.counts += torch.bincount(indices.detach().reshape(-1).cpu(), minlength=len(self.counts))

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def used(self) -> int:
        """Number of distinct codes seen."""
        return int((self.counts > 0).sum())

    @property
    def fraction_used(self) -> float:
        return self.used / len(self.counts)

    @property
    def perplexity(self) -> float:
        return float(perplexity_of_counts(self.counts))


class VectorQuantizer(KMeansInitialized):
    """Vector quantizer with an exponential-moving-average codebook (van den Oord et al. 2017, appendix).

    Remedies for codebook collapse are keyword arguments: k-means initialisation from the first batch
    (on by default: a random codebook far from the encoder outputs leaves most codes unused),
    dead-code restart (off with 0), l2-normalised lookup and a low-dimensional (factorised) codebook
    (Yu et al. 2022, off by default since they change what a code means). In eval mode nothing moves.
    Under torch.distributed the codebook statistics are summed over processes, so every process keeps
    the same codebook and the result equals one process on the whole batch.

    Args:
        codebook_size: number of codes K.
        dim: channels D of the latents to quantize.
        codebook_dim: when set and different from ``dim``, codes live in this many dimensions and
            1x1 projections map in and out (factorised codes).
        commitment_weight: weight of ``||z - sg(code)||^2`` pulling the encoder towards its codes.
        decay: EMA decay of code counts and sums.
        eps: Laplace smoothing of the code counts.
        kmeans_init: initialise the codebook by k-means on the first training batch (or call
            :meth:`initialize_from` before training).
        kmeans_iters: Lloyd iterations of that initialisation.
        dead_code_steps: re-seed codes unused for this many training steps with random current encoder
            outputs (0 disables). The candidates are drawn from rank 0's batch under DDP.
        l2_normalize: look up codes by cosine similarity (latents and codes l2-normalised).
        spatial_dims: 2 for slices ``(B, dim, h, w)``, 3 for volumes ``(B, dim, d, h, w)``.
    """

    def __init__(
        self,
        codebook_size: int = 512,
        dim: int = 64,
        codebook_dim: int | None = None,
        commitment_weight: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_steps: int = 0,
        l2_normalize: bool = False,
        spatial_dims: int = 2,
    ):
        super().__init__()
        check_codebook_size(codebook_size)
        if not 0.0 <= decay < 1.0:
            raise QuantizerConfigError(f"decay={decay}: must be in [0, 1)")
        self.codebook_size = codebook_size
        self.dim = dim
        self.codebook_dim = codebook_dim or dim
        self.commitment_weight = commitment_weight
        self.decay = decay
        self.eps = eps
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_steps = dead_code_steps
        self.l2_normalize = l2_normalize
        self.spatial_dims = spatial_dims
        factorised = self.codebook_dim != dim
        conv_nd = conv(spatial_dims)
        self.project_in = conv_nd(dim, self.codebook_dim, 1) if factorised else nn.Identity()
        self.project_out = conv_nd(self.codebook_dim, dim, 1) if factorised else nn.Identity()

        codebook = torch.randn(codebook_size, self.codebook_dim)
        if l2_normalize:
            codebook = F.normalize(codebook, dim=-1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        self._register_initialized(kmeans_init)
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d, *spatial) -> (N, d) float32."""
        flat = channels_to_rows(z).float()
        return F.normalize(flat, dim=-1) if self.l2_normalize else flat

    def _lookup_rows(self, z: torch.Tensor) -> torch.Tensor:
        return self._flat(self.project_in(z.float()))

    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Return the index of the nearest code for each row of ``flat`` (N, codebook_dim)."""
        return nearest_code_indices(flat, self.codebook)

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        centroids = kmeans_codebook(flat, self.codebook_size, self.kmeans_iters, self.l2_normalize)
        self.codebook.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Move the codebook towards the mean of its assigned latents; return the global code counts."""
        counts = code_counts(indices, self.codebook_size)
        sums = torch.zeros_like(self.codebook).index_add_(0, indices, flat)
        all_reduce_sum(counts)
        all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        codebook = self.embed_sum / smoothed.unsqueeze(1)
        self.codebook.copy_(F.normalize(codebook, dim=-1) if self.l2_normalize else codebook)
        return counts

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Re-seed codes unused for ``dead_code_steps`` steps from current latents; return how many (a tensor).

        A candidate is drawn for every code and kept where the code is dead, so nothing depends on how
        many died (no device-to-host read); rank 0's candidates are broadcast, so all processes agree.
        """
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_unused >= self.dead_code_steps
        choice = torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)
        fresh = _broadcast_from_rank0(flat[choice].contiguous())
        dead_rows = dead.unsqueeze(1)
        self.codebook.copy_(torch.where(dead_rows, fresh, self.codebook))
        self.embed_sum.copy_(torch.where(dead_rows, fresh, self.embed_sum))
        self.cluster_size.masked_fill_(dead, 1.0)
        self.steps_unused.masked_fill_(dead, 0)
        return dead.sum()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Quantize ``z`` (B, dim, *spatial).

        Returns:
            ``(quantized (B, dim, *spatial) with straight-through gradients, aux)``; ``aux`` has
            ``loss: {"commitment"}``, ``indices (B, *spatial)``, ``perplexity`` (of this batch, over all
            processes) and ``restarted`` (codes re-seeded this step, a 0-d tensor).
        """
        return self._quantize(z)

    @torch.compiler.disable  # buffer updates, collectives and a host-side branch: keep out of graphs
    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.autocast(z.device.type, enabled=False):
            projected = self.project_in(z.float())
            batch, spatial = projected.shape[0], projected.shape[2:]
            flat = self._flat(projected)
            self._initialize_if_needed(flat)
            indices = self.nearest_codes(flat.detach())
            restarted = torch.zeros((), dtype=torch.long, device=flat.device)
            if self.training:
                counts = self._ema_update(flat.detach(), indices)
                if self.dead_code_steps > 0:
                    restarted = self._restart_dead_codes(flat.detach(), counts)
            else:
                # Local counts only: evaluation may run on one process while the others wait.
                counts = code_counts(indices, self.codebook_size)
            codes = self.codebook[indices]
            commitment = F.mse_loss(flat, codes.detach())
            # Straight-through: the forward pass sees the code, the gradient flows to the latent.
            quantized_flat = flat + (codes - flat).detach()
            out = self.project_out(rows_to_channels(quantized_flat, batch, spatial))
        aux = {
            "loss": {"commitment": self.commitment_weight * commitment},
            "indices": indices.reshape(batch, *spatial),
            "perplexity": perplexity_of_counts(counts),
            "restarted": restarted,
        }
        return out, aux

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the latents ``(B, dim, *spatial)`` of code indices ``(B, *spatial)``."""
        return self.project_out(self.codebook[indices].movedim(-1, 1))

    def latents_to_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Return the nearest code indices ``(B, *spatial)`` of latents ``(B, dim, *spatial)`` (no update)."""
        with torch.autocast(z.device.type, enabled=False):
            projected = self.project_in(z.float())
            return self.nearest_codes(self._flat(projected)).reshape(projected.shape[0], *projected.shape[2:])


class FiniteScalarQuantizer(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): each of ``len(levels)`` channels is bounded and
    rounded to ``levels[i]`` values; the implicit codebook has ``prod(levels)`` codes and cannot collapse.

    Args:
        levels: number of values per channel, e.g. ``(8, 5, 5, 5)`` for 1000 codes.
        dim: channels D of the latents; 1x1 projections map D -> len(levels) -> D.
        spatial_dims: 2 for slices, 3 for volumes.
    """

    def __init__(self, levels: Sequence[int] = (8, 5, 5, 5), dim: int = 64, spatial_dims: int = 2):
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise QuantizerConfigError(f"levels={levels}: need at least one level, each >= 2")
        self.codebook_size = math.prod(levels)
        if self.codebook_size > 32767:
            raise QuantizerConfigError(
                f"levels={levels} give {self.codebook_size} codes; at most 32767 fit the int16 code files"
            )
        self.levels = levels
        self.spatial_dims = spatial_dims
        conv_nd = conv(spatial_dims)
        self.project_in = conv_nd(dim, len(levels), 1)
        self.project_out = conv_nd(len(levels), dim, 1)
        level_t = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("_levels", level_t, persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0)
        self.register_buffer("_basis", basis.long(), persistent=False)

    def _per_channel(self, values: torch.Tensor) -> torch.Tensor:
        return channel_view(values, self.spatial_dims)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash each channel to (-(L-1)/2, (L-1)/2), shifted by 1/2 for even L so rounding gives L values."""
        levels = self._per_channel(self._levels)
        half = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, L) per channel (B, C, *spatial) -> indices (B, *spatial)."""
        return (codes.long() * self._per_channel(self._basis)).sum(dim=1)

    def _half_width(self) -> torch.Tensor:
        return self._per_channel(self._levels // 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Quantize ``z`` (B, dim, *spatial); returns ``(latents, aux)`` with ``indices``, ``perplexity``, no loss."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(self.project_in(z.float()))
            rounded = bounded + (bounded.round() - bounded).detach()
            half_width = self._half_width()
            digits = rounded.detach() + half_width
            quantized = rounded / half_width
            out = self.project_out(quantized)
        indices = self._codes_to_indices(digits.round())
        counts = code_counts(indices, self.codebook_size)
        if self.training:  # evaluation may run on one process while the others wait
            all_reduce_sum(counts)
        return out, {"loss": {}, "indices": indices, "perplexity": perplexity_of_counts(counts)}

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the latents ``(B, dim, *spatial)`` of code indices ``(B, *spatial)``."""
        digits = (indices.unsqueeze(1) // self._per_channel(self._basis)) % self._per_channel(self._levels.long())
        half_width = self._half_width()
        return self.project_out((digits.float() - half_width) / half_width)

    def latents_to_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Return code indices ``(B, *spatial)`` of latents ``(B, dim, *spatial)``."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(self.project_in(z.float()))
            return self._codes_to_indices(bounded.round() + self._half_width())


class IdentityBottleneck(nn.Module):
    """Plain autoencoder bottleneck: latents pass unchanged, no loss, no codes (any ``spatial_dims``)."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return z, {"loss": {}}


class GaussianBottleneck(nn.Module):
    """VAE bottleneck: a 1x1 conv gives mean and log-variance; samples with the reparameterisation trick
    in training, returns the mean in eval. KL to N(0, I) is averaged over latent elements.

    The log-variance is clamped, so the KL cannot grow without bound when the reconstruction pushes
    the posterior variance to zero (the per-element variance term is at most
    ``0.5 * (exp(max) - min - 1)`` in either direction).

    Args:
        dim: channels D of the latents.
        kl_weight: weight of the KL term ``aux["loss"]["kl_loss"]`` (the trainer may ramp it up).
        free_bits: KL per channel (nats, mean over batch and positions) below which it is not
            penalised (Kingma et al. 2016); 0 disables.
        logvar_range: ``(min, max)`` clamp of the log-variance.
        spatial_dims: 2 for slices, 3 for volumes.
    """

    def __init__(
        self,
        dim: int = 64,
        kl_weight: float = 1e-3,
        free_bits: float = 0.0,
        logvar_range: tuple[float, float] = (-8.0, 4.0),
        spatial_dims: int = 2,
    ):
        super().__init__()
        if logvar_range[0] >= logvar_range[1]:
            raise QuantizerConfigError(f"logvar_range={logvar_range}: min must be below max")
        self.spatial_dims = spatial_dims
        self.to_moments = conv(spatial_dims)(dim, 2 * dim, 1)
        self.kl_weight = kl_weight
        self.free_bits = free_bits
        self.logvar_range = tuple(float(v) for v in logvar_range)

    def moments(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean, clamped log-variance)``, each (B, dim, *spatial)."""
        mean, logvar = self.to_moments(z.float()).chunk(2, dim=1)
        return mean, logvar.clamp(*self.logvar_range)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Returns ``(sample or mean, aux)`` with ``loss: {"kl_loss": weighted KL}`` and the unweighted ``kl``."""
        with torch.autocast(z.device.type, enabled=False):
            mean, logvar = self.moments(z)
            kl_elements = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1)
            kl_per_channel = kl_elements.mean(dim=(0, *range(2, kl_elements.ndim)))
            kl = kl_per_channel.mean()
            penalised = kl_per_channel.clamp_min(self.free_bits).mean() if self.free_bits > 0 else kl
            if self.training:
                out = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
            else:
                out = mean
        return out, {"loss": {"kl_loss": self.kl_weight * penalised}, "kl": kl.detach()}
