"""Bottlenecks for the autoencoder: EMA vector quantizer, finite scalar quantizer, identity, Gaussian (VAE).

Every bottleneck maps channels-first latents ``(B, D, h, w)`` to ``(latents, aux)`` where ``aux`` holds
``"loss"`` (a dict of weighted terms to add to the training loss) and, for the discrete ones,
``"indices"`` ``(B, h, w)`` and ``"perplexity"``. Each is usable on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class QuantizerConfigError(ValueError):
    """A quantizer argument is out of range (codebook size, FSQ levels, projection size)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
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


def perplexity_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """Return ``exp(entropy)`` of the code histogram ``counts`` (1 = one code used, K = uniform use)."""
    total = counts.sum()
    if total == 0:
        return torch.zeros((), device=counts.device)
    p = counts.float() / total
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


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


class VectorQuantizer(nn.Module):
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
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        dead_code_steps: re-seed codes unused for this many training steps with random current encoder
            outputs (0 disables).
        l2_normalize: look up codes by cosine similarity (latents and codes l2-normalised).
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
    ):
        super().__init__()
        if not 2 <= codebook_size <= 32767:
            raise QuantizerConfigError(
                f"codebook_size={codebook_size}: must be in [2, 32767] (codes are stored as int16)"
            )
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
        factorised = self.codebook_dim != dim
        self.project_in = nn.Conv2d(dim, self.codebook_dim, 1) if factorised else nn.Identity()
        self.project_out = nn.Conv2d(self.codebook_dim, dim, 1) if factorised else nn.Identity()

        codebook = torch.randn(codebook_size, self.codebook_dim)
        if l2_normalize:
            codebook = F.normalize(codebook, dim=-1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        # An integer flag rather than bool: every DDP backend can broadcast it.
        self.register_buffer("initialized", torch.tensor(0 if kmeans_init else 1, dtype=torch.long))
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) -> (B*h*w, d) float32."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        return F.normalize(flat, dim=-1) if self.l2_normalize else flat

    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Return the index of the nearest code for each row of ``flat`` (N, codebook_dim)."""
        distances = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]
        )
        return distances.argmin(dim=1)

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        samples = _all_gather_rows(flat)
        centroids = kmeans(samples, self.codebook_size, self.kmeans_iters, self.l2_normalize)
        centroids = _broadcast_from_rank0(centroids.contiguous())
        self.codebook.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(1)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Move the codebook towards the mean of its assigned latents; return the global code counts."""
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.codebook).index_add_(0, indices, flat)
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        codebook = self.embed_sum / smoothed.unsqueeze(1)
        self.codebook.copy_(F.normalize(codebook, dim=-1) if self.l2_normalize else codebook)
        return counts

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> int:
        """Re-seed codes unused for ``dead_code_steps`` steps from current latents; return how many."""
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_unused >= self.dead_code_steps
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        samples = _all_gather_rows(flat)
        choice = torch.randint(samples.shape[0], (n_dead,), device=samples.device)
        fresh = _broadcast_from_rank0(samples[choice].contiguous())
        self.codebook[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0
        return n_dead

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Quantize ``z`` (B, dim, h, w).

        Returns:
            ``(quantized (B, dim, h, w) with straight-through gradients, aux)``; ``aux`` has
            ``loss: {"commitment"}``, ``indices (B, h, w)``, ``perplexity`` (of this batch, over all
            processes) and ``restarted`` (codes re-seeded this step).
        """
        return self._quantize(z)

    @torch.compiler.disable  # data-dependent branches, buffer updates and collectives: keep out of graphs
    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.autocast(z.device.type, enabled=False):
            projected = self.project_in(z.float())
            b, _, h, w = projected.shape
            flat = self._flat(projected)
            if self.training and not bool(self.initialized):
                self._initialize(flat.detach())
            indices = self.nearest_codes(flat.detach())
            restarted = 0
            if self.training:
                counts = self._ema_update(flat.detach(), indices)
                if self.dead_code_steps > 0:
                    restarted = self._restart_dead_codes(flat.detach(), counts)
            else:
                # Local counts only: evaluation may run on one process while the others wait.
                counts = torch.bincount(indices, minlength=self.codebook_size).float()
            codes = self.codebook[indices]
            commitment = F.mse_loss(flat, codes.detach())
            # Straight-through: the forward pass sees the code, the gradient flows to the latent.
            quantized_flat = flat + (codes - flat).detach()
            quantized = quantized_flat.reshape(b, h, w, -1).permute(0, 3, 1, 2)
            out = self.project_out(quantized)
        aux = {
            "loss": {"commitment": self.commitment_weight * commitment},
            "indices": indices.reshape(b, h, w),
            "perplexity": perplexity_of_counts(counts),
            "restarted": restarted,
        }
        return out, aux

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the latents ``(B, dim, h, w)`` of code indices ``(B, h, w)``."""
        codes = self.codebook[indices].permute(0, 3, 1, 2)
        return self.project_out(codes)

    def latents_to_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Return the nearest code indices ``(B, h, w)`` of latents ``(B, dim, h, w)`` (no update)."""
        with torch.autocast(z.device.type, enabled=False):
            projected = self.project_in(z.float())
            b, _, h, w = projected.shape
            return self.nearest_codes(self._flat(projected)).reshape(b, h, w)


class FiniteScalarQuantizer(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): each of ``len(levels)`` channels is bounded and
    rounded to ``levels[i]`` values; the implicit codebook has ``prod(levels)`` codes and cannot collapse.

    Args:
        levels: number of values per channel, e.g. ``(8, 5, 5, 5)`` for 1000 codes.
        dim: channels D of the latents; 1x1 projections map D -> len(levels) -> D.
    """

    def __init__(self, levels: Sequence[int] = (8, 5, 5, 5), dim: int = 64):
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
        self.project_in = nn.Conv2d(dim, len(levels), 1)
        self.project_out = nn.Conv2d(len(levels), dim, 1)
        level_t = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("_levels", level_t, persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0)
        self.register_buffer("_basis", basis.long(), persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash each channel to (-(L-1)/2, (L-1)/2), shifted by 1/2 for even L so rounding gives L values."""
        levels = self._levels.view(1, -1, 1, 1)
        half = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, L) per channel (B, C, h, w) -> indices (B, h, w)."""
        return (codes.long() * self._basis.view(1, -1, 1, 1)).sum(dim=1)

    def _scaled(self, digits: torch.Tensor) -> torch.Tensor:
        """Digits in [0, L) -> latents in [-1, 1]."""
        half_width = (self._levels // 2).view(1, -1, 1, 1)
        return (digits - half_width) / half_width

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Quantize ``z`` (B, dim, h, w); returns ``(latents, aux)`` with ``indices``, ``perplexity``, no loss."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(self.project_in(z.float()))
            rounded = bounded + (bounded.round() - bounded).detach()
            half_width = (self._levels // 2).view(1, -1, 1, 1)
            digits = rounded.detach() + half_width
            quantized = rounded / half_width
            out = self.project_out(quantized)
        indices = self._codes_to_indices(digits.round())
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float()
        if self.training:  # evaluation may run on one process while the others wait
            _all_reduce_sum(counts)
        return out, {"loss": {}, "indices": indices, "perplexity": perplexity_of_counts(counts)}

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the latents ``(B, dim, h, w)`` of code indices ``(B, h, w)``."""
        digits = (indices.unsqueeze(1) // self._basis.view(1, -1, 1, 1)) % self._levels.long().view(1, -1, 1, 1)
        return self.project_out(self._scaled(digits.float()))

    def latents_to_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Return code indices ``(B, h, w)`` of latents ``(B, dim, h, w)``."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(self.project_in(z.float()))
            half_width = (self._levels // 2).view(1, -1, 1, 1)
            return self._codes_to_indices(bounded.round() + half_width)


class IdentityBottleneck(nn.Module):
    """Plain autoencoder bottleneck: latents pass unchanged, no loss, no codes."""

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
    """

    def __init__(
        self,
        dim: int = 64,
        kl_weight: float = 1e-3,
        free_bits: float = 0.0,
        logvar_range: tuple[float, float] = (-8.0, 4.0),
    ):
        super().__init__()
        if logvar_range[0] >= logvar_range[1]:
            raise QuantizerConfigError(f"logvar_range={logvar_range}: min must be below max")
        self.to_moments = nn.Conv2d(dim, 2 * dim, 1)
        self.kl_weight = kl_weight
        self.free_bits = free_bits
        self.logvar_range = tuple(float(v) for v in logvar_range)

    def moments(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean, clamped log-variance)``, each (B, dim, h, w)."""
        mean, logvar = self.to_moments(z.float()).chunk(2, dim=1)
        return mean, logvar.clamp(*self.logvar_range)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Returns ``(sample or mean, aux)`` with ``loss: {"kl_loss": weighted KL}`` and the unweighted ``kl``."""
        with torch.autocast(z.device.type, enabled=False):
            mean, logvar = self.moments(z)
            kl_elements = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1)
            kl_per_channel = kl_elements.mean(dim=(0, 2, 3))
            kl = kl_per_channel.mean()
            penalised = kl_per_channel.clamp_min(self.free_bits).mean() if self.free_bits > 0 else kl
            if self.training:
                out = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
            else:
                out = mean
        return out, {"loss": {"kl_loss": self.kl_weight * penalised}, "kl": kl.detach()}
