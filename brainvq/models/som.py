"""SOM-VAE bottleneck (Fortuin et al. 2019, "SOM-VAE: Interpretable discrete representation learning on
time series", ICLR): codes are the nodes of a self-organising map on a rectangular or toroidal grid, and
a neighbourhood term pulls the winning node's grid neighbours towards each encoding, so neighbouring
codes come to mean similar things.

The loss, per latent position ``i`` with encoding ``z_e,i`` (D channels), winning node ``k_i`` (the
nearest embedding) and grid neighbourhood ``N(k)`` (up, down, left, right; wrapped on a torus), is

    alpha * mean_c (z_e,i - e_{k_i})^2                                   ("commitment")
    + beta / (5 D) * sum_{j in {k_i} + N(k_i)} ||e_j - sg[z_e,i]||^2      ("som")

averaged over positions, plus the reconstruction terms ``L_rec(x, D(z_q)) + L_rec(x, D(z_e))`` that the
model (:class:`brainvq.models.VQVAE` with ``gamma_q``/``gamma_e``) supplies. Stop-gradients, as in the
authors' reference implementation (ratschlab/SOM-VAE):

- the commitment term has none: it moves the encoder towards its winner and the winner towards the
  encoding;
- the SOM term stops the gradient at the encoding (``sg``): it moves only the embeddings of the winner
  and its grid neighbours, never the encoder;
- the decoder's input is the winning embedding itself, so ``L_rec(x, D(z_q))`` trains the embeddings.
  The reference passes no gradient from ``D(z_q)`` to the encoder, whose only reconstruction signal is
  then ``L_rec(x, D(z_e))`` (``gamma_e > 0``); ``straight_through=True`` (the default here) also copies
  that gradient to the encoder, as the VQ-VAE does, so the model trains with ``gamma_e = 0`` too.

The reference averages the SOM term over five slots and fills neighbours missing at the edge of a
rectangular grid with zero vectors (a constant without gradient); here missing neighbours are left out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from brainvq.models.quantizers import (
    KMeansInitialized,
    QuantizerConfigError,
    all_reduce_sum,
    check_codebook_size,
    code_counts,
    kmeans_codebook,
    nearest_code_indices,
    perplexity_of_counts,
)
from brainvq.models.spatial import channels_to_rows, check_spatial_dims, rows_to_channels

TOPOLOGIES = ("rectangular", "toroidal")
# Slots of the neighbourhood: the winner and its four grid neighbours.
NEIGHBOURHOOD_SLOTS = 5


def most_square_grid(codebook_size: int) -> tuple[int, int]:
    """Return ``(rows, columns)`` with ``rows * columns == codebook_size`` and ``rows <= columns`` as close as
    possible (256 -> 16 x 16, 512 -> 16 x 32, a prime p -> 1 x p)."""
    rows = max(r for r in range(1, math.isqrt(codebook_size) + 1) if codebook_size % r == 0)
    return rows, codebook_size // rows


def grid_neighbours(rows: int, columns: int, topology: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each node's four grid neighbours (up, down, left, right) and which of them exist.

    Node ``r * columns + c`` sits at row ``r``, column ``c``. On a toroidal grid the edges wrap (the
    corner's neighbours include the opposite edges); on a rectangular one, neighbours beyond an edge do
    not exist. A neighbour that is the node itself or repeats an earlier one (a grid 1 or 2 wide) does
    not count either.

    Returns:
        ``(neighbours (K, 4) long, exists (K, 4) bool)``; where ``exists`` is False the index is unused.
    """
    if topology not in TOPOLOGIES:
        raise QuantizerConfigError(f"vqvae.som_topology={topology!r}: use one of {TOPOLOGIES}")
    neighbours, exists = [], []
    for r in range(rows):
        for c in range(columns):
            node = r * columns + c
            found, seen = [], {node}
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                rr, cc = r + dr, c + dc
                if topology == "toroidal":
                    rr, cc = rr % rows, cc % columns
                inside = 0 <= rr < rows and 0 <= cc < columns
                other = rr * columns + cc if inside else node
                found.append((other, inside and other not in seen))
                seen.add(other)
            neighbours.append([other for other, _ in found])
            exists.append([ok for _, ok in found])
    return torch.tensor(neighbours, dtype=torch.long), torch.tensor(exists, dtype=torch.bool)


def layout_on_grid(centroids: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Return ``centroids`` (rows * columns, d) reordered so that grid neighbours are close in latent space.

    The centroids are sorted by their first principal component into ``rows`` bands of ``columns``, and
    each band by the second component (the linear initialisation of a Kohonen map, applied to k-means
    centroids): neighbouring nodes start near each other, so the map need not untangle itself.
    """
    centred = centroids - centroids.mean(0)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)
    scores = centred @ components[:2].t()
    if scores.shape[1] < 2:  # one latent channel: a single direction to sort by
        scores = torch.cat([scores, torch.zeros_like(scores)], 1)
    bands = torch.argsort(scores[:, 0], stable=True).reshape(rows, columns)
    within = torch.argsort(scores[bands, 1], dim=1, stable=True)
    return centroids[torch.gather(bands, 1, within).reshape(-1)]


class SOMQuantizer(KMeansInitialized):
    """Self-organising-map codebook (SOM-VAE); the loss and its stop-gradients are in the module docstring.

    The embeddings are parameters trained by the optimizer (not an EMA). Under torch.distributed DDP
    averages their gradients and the k-means initialisation is broadcast from rank 0, so every process
    keeps the same map. In eval mode nothing moves.

    Args:
        codebook_size: number of nodes K = rows * columns.
        dim: channels D of the latents (the embeddings have D dimensions).
        grid: ``(rows, columns)``; ``None`` takes the most square factorisation of ``codebook_size``.
        topology: ``"rectangular"`` or ``"toroidal"`` (edges wrap, every node has four neighbours).
        commitment_weight: alpha, the weight of ``mean (z_e - e_k)^2``.
        neighbour_weight: beta, the weight of the neighbourhood (SOM) term.
        straight_through: also copy the decoder's gradient at the winning embedding to the encoder.
        kmeans_init: initialise the map by k-means on the first training batch (or call
            :meth:`initialize_from` before training), centroids laid out on the grid by
            :func:`layout_on_grid`.
        kmeans_iters: Lloyd iterations of that initialisation.
        spatial_dims: 2 for slices ``(B, D, h, w)``, 3 for volumes ``(B, D, d, h, w)``.
    """

    def __init__(
        self,
        codebook_size: int = 256,
        dim: int = 64,
        grid: tuple[int, int] | list[int] | None = None,
        topology: str = "rectangular",
        commitment_weight: float = 0.25,
        neighbour_weight: float = 1.0,
        straight_through: bool = True,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        spatial_dims: int = 2,
    ):
        super().__init__()
        check_codebook_size(codebook_size)
        rows, columns = grid if grid is not None else most_square_grid(codebook_size)
        if rows < 1 or columns < 1 or rows * columns != codebook_size:
            raise QuantizerConfigError(
                f"vqvae.som_grid={list(grid)} has {rows * columns} nodes but vqvae.codebook_size={codebook_size}; "
                "give [rows, columns] with rows * columns = codebook_size, or null for the most square grid"
            )
        self.codebook_size = codebook_size
        self.dim = dim
        self.grid = (int(rows), int(columns))
        self.topology = topology
        self.commitment_weight = commitment_weight
        self.neighbour_weight = neighbour_weight
        self.straight_through = straight_through
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.spatial_dims = check_spatial_dims(spatial_dims)
        # Small random embeddings, as in the reference implementation (k-means replaces them by default).
        self.codebook = torch.nn.Parameter(0.05 * torch.randn(codebook_size, dim))
        neighbours, exists = grid_neighbours(rows, columns, topology)
        self.register_buffer("neighbours", neighbours, persistent=False)
        self.register_buffer("neighbour_exists", exists.float(), persistent=False)
        self._register_initialized(kmeans_init)

    def _lookup_rows(self, z: torch.Tensor) -> torch.Tensor:
        return channels_to_rows(z.float())

    @torch.no_grad()
    def _initialize(self, rows: torch.Tensor) -> None:
        self.codebook.copy_(kmeans_codebook(
            rows, self.codebook_size, self.kmeans_iters, arrange=lambda c: layout_on_grid(c, *self.grid)
        ))

    def neighbourhood_loss(self, encodings: torch.Tensor, winners: torch.Tensor) -> torch.Tensor:
        """Return the unweighted SOM term: mean over rows of ``sum_{j in {k} + N(k)} ||e_j - sg[z_e]||^2 / (5 D)``.

        Args:
            encodings: ``z_e`` rows (N, D); the gradient is stopped here.
            winners: the winning node of each row (N,).
        """
        nodes = torch.cat([winners.unsqueeze(1), self.neighbours[winners]], dim=1)
        exists = torch.cat([torch.ones_like(winners, dtype=torch.float32).unsqueeze(1),
                            self.neighbour_exists[winners]], dim=1)
        squared = (self.codebook[nodes] - encodings.detach().unsqueeze(1)).pow(2).sum(-1)
        return (squared * exists).sum(1).mean() / (NEIGHBOURHOOD_SLOTS * self.dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Quantize ``z`` (B, dim, *spatial) to its winning embeddings.

        Returns:
            ``(quantized (B, dim, *spatial), aux)``; ``aux`` has ``loss: {"commitment", "som"}`` (weighted),
            ``indices (B, *spatial)`` and ``perplexity`` (of this batch, over all processes in training).
        """
        return self._quantize(z)

    @torch.compiler.disable  # the one-off initialisation and collectives: keep out of graphs
    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.autocast(z.device.type, enabled=False):
            batch, spatial = z.shape[0], z.shape[2:]
            flat = self._lookup_rows(z)
            self._initialize_if_needed(flat)
            indices = nearest_code_indices(flat.detach(), self.codebook.detach())
            winners = self.codebook[indices]
            commitment = F.mse_loss(flat, winners)
            som = self.neighbourhood_loss(flat, indices)
            # The value is the winning embedding; its gradient reaches the embedding, and the encoder too
            # when straight_through (flat - sg[flat] is zero in value).
            quantized = winners + (flat - flat.detach()) if self.straight_through else winners
            out = rows_to_channels(quantized, batch, spatial)
        counts = code_counts(indices, self.codebook_size)
        if self.training:  # evaluation may run on one process while the others wait
            all_reduce_sum(counts)
        aux = {
            "loss": {"commitment": self.commitment_weight * commitment, "som": self.neighbour_weight * som},
            "indices": indices.reshape(batch, *spatial),
            "perplexity": perplexity_of_counts(counts),
        }
        return out, aux

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the latents ``(B, dim, *spatial)`` (the embeddings) of code indices ``(B, *spatial)``."""
        return self.codebook[indices].movedim(-1, 1)

    def latents_to_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Return the winning nodes ``(B, *spatial)`` of latents ``(B, dim, *spatial)`` (no update)."""
        with torch.autocast(z.device.type, enabled=False):
            indices = nearest_code_indices(self._lookup_rows(z), self.codebook.detach())
        return indices.reshape(z.shape[0], *z.shape[2:])
