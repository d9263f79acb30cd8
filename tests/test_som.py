"""The SOM-VAE bottleneck (brainvq.models.som): grid, neighbourhood loss and its gradients, k-means layout."""

from __future__ import annotations

import pytest
import torch

from brainvq.models import (
    QuantizerConfigError,
    SOMQuantizer,
    grid_neighbours,
    layout_on_grid,
    most_square_grid,
)

torch.set_num_threads(1)


def neighbour_sets(rows: int, columns: int, topology: str) -> dict[int, set[int]]:
    neighbours, exists = grid_neighbours(rows, columns, topology)
    return {node: set(neighbours[node][exists[node]].tolist()) for node in range(rows * columns)}


def lattice_som(topology: str, straight_through: bool = True) -> SOMQuantizer:
    """A 3x3 map, dim 2, with node (r, c) embedded at (c, r): grid neighbours are unit steps apart."""
    som = SOMQuantizer(9, dim=2, grid=(3, 3), topology=topology, kmeans_init=False,
                       straight_through=straight_through)
    rows, columns = torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij")
    with torch.no_grad():
        som.codebook.copy_(torch.stack([columns.reshape(-1), rows.reshape(-1)], dim=1))
    return som


def one_latent(x: float, y: float) -> torch.Tensor:
    """One encoding at (x, y), as a (1, 2, 1, 1) latent map that records its gradient."""
    return torch.tensor([x, y]).reshape(1, 2, 1, 1).requires_grad_()


@pytest.mark.parametrize("size, grid", [(256, (16, 16)), (512, (16, 32)), (12, (3, 4)), (7, (1, 7))])
def test_default_grid_is_the_most_square_factorisation(size, grid):
    assert most_square_grid(size) == grid
    assert SOMQuantizer(size, dim=2).grid == grid


def test_toroidal_neighbourhood_wraps_at_the_corner_and_rectangular_does_not():
    # 4 rows x 5 columns; node r * 5 + c.
    toroidal, rectangular = neighbour_sets(4, 5, "toroidal"), neighbour_sets(4, 5, "rectangular")
    assert toroidal[0] == {5, 1, 15, 4}  # below, right, and wrapped: bottom row, last column
    assert rectangular[0] == {5, 1}
    assert toroidal[19] == {14, 18, 4, 15}
    assert rectangular[19] == {14, 18}
    assert toroidal[7] == rectangular[7] == {2, 12, 6, 8}  # inside the grid both agree
    assert all(len(s) == 4 for s in toroidal.values())


def test_narrow_grids_count_neither_the_node_itself_nor_a_repeat_as_a_neighbour():
    assert neighbour_sets(2, 3, "toroidal")[0] == {3, 2, 1}  # up and down are the same node
    assert neighbour_sets(1, 4, "toroidal")[0] == {3, 1}
    _, exists = grid_neighbours(2, 3, "toroidal")
    assert exists[0].tolist() == [True, False, True, True]


def test_grid_that_does_not_hold_the_codebook_is_refused_naming_the_keys():
    with pytest.raises(QuantizerConfigError, match="som_grid.*codebook_size"):
        SOMQuantizer(16, dim=2, grid=(3, 5))
    with pytest.raises(QuantizerConfigError, match="som_topology"):
        SOMQuantizer(16, dim=2, topology="hexagonal")


@pytest.mark.parametrize("topology, pulled", [("rectangular", {0, 1, 3}), ("toroidal", {0, 1, 3, 2, 6})])
def test_som_term_pulls_the_winner_and_its_grid_neighbours_towards_the_encoding_and_nothing_else(topology, pulled):
    som = lattice_som(topology).train()
    z = one_latent(0.2, 0.1)  # nearest to node 0, the corner at (0, 0)
    _, aux = som(z)
    assert aux["indices"].item() == 0
    (encoder_grad,) = torch.autograd.grad(aux["loss"]["som"], z, retain_graph=True, allow_unused=True)
    assert encoder_grad is None  # sg[z_e]: the SOM term never moves the encoder
    aux["loss"]["som"].backward()
    grad = som.codebook.grad
    target = torch.tensor([0.2, 0.1])
    for node in range(9):
        if node in pulled:
            towards = target - som.codebook[node].detach()
            step = -grad[node]  # a gradient-descent step moves the embedding along this
            cosine = torch.nn.functional.cosine_similarity(step, towards, dim=0)
            assert cosine > 0.999, (node, step, towards)
        else:
            assert torch.equal(grad[node], torch.zeros(2)), node
    # The value is the documented one: sum over the neighbourhood of ||e - z||^2 / (5 * D).
    expected = sum(float((som.codebook[n].detach() - target).pow(2).sum()) for n in pulled) / (5 * 2)
    assert aux["loss"]["som"].item() == pytest.approx(som.neighbour_weight * expected)


def test_commitment_moves_the_encoder_and_only_the_winning_embedding():
    som = lattice_som("toroidal").train()
    z = one_latent(1.2, 0.9)  # winner: node 4 at (1, 1)
    _, aux = som(z)
    aux["loss"]["commitment"].backward()
    assert z.grad.abs().sum() > 0
    assert som.codebook.grad[4].abs().sum() > 0
    assert som.codebook.grad[torch.arange(9) != 4].abs().sum() == 0


@pytest.mark.parametrize("straight_through", [True, False])
def test_decoder_gradient_reaches_the_winning_embedding_and_the_encoder_only_when_straight_through(straight_through):
    som = lattice_som("rectangular", straight_through=straight_through).train()
    z = one_latent(2.1, 1.2)  # winner: node 5 at (2, 1)
    out, aux = som(z)
    torch.testing.assert_close(out.detach().reshape(2), torch.tensor([2.0, 1.0]))  # the winning embedding
    (out * torch.tensor([1.0, -2.0]).reshape(1, 2, 1, 1)).sum().backward()
    torch.testing.assert_close(som.codebook.grad[5], torch.tensor([1.0, -2.0]))
    if straight_through:
        torch.testing.assert_close(z.grad.reshape(2), torch.tensor([1.0, -2.0]))
    else:
        assert z.grad is None


def plane_clusters(grid: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (n, dim, 4, 4) in grid x grid tight clusters whose centres form a square lattice on a random
    plane of the dim-dimensional space; returns (latents, centres)."""
    g = torch.Generator().manual_seed(seed)
    frame, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g))
    steps = torch.arange(float(grid)) * 4.0
    lattice = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)
    centres = lattice @ frame.t() + 5.0
    points = centres.repeat_interleave(64, 0) + 0.05 * torch.randn(len(centres) * 64, dim, generator=g)
    points = points[torch.randperm(len(points), generator=g)]
    return points.reshape(-1, 4, 4, dim).permute(0, 3, 1, 2).contiguous(), centres


def mean_distance(codebook: torch.Tensor, pairs: list[tuple[int, int]]) -> float:
    return float(torch.stack([(codebook[a] - codebook[b]).norm() for a, b in pairs]).mean())


def square_latents(dim: int, seed: int, n: int = 2048, side: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (n / 16, dim, 4, 4) uniform on a side x side square in a random plane of the dim-dimensional
    space, its corner at 5 (far from where an uninitialised codebook sits); returns (latents, plane frame)."""
    g = torch.Generator().manual_seed(seed)
    frame, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g))
    points = (torch.rand(n, 2, generator=g) * side) @ frame.t() + 5.0
    return points.reshape(-1, 4, 4, dim).permute(0, 3, 1, 2).contiguous(), frame


def test_kmeans_init_puts_the_codes_on_the_data_and_lays_them_out_so_grid_neighbours_are_close():
    latents, frame = square_latents(6, seed=0)
    torch.manual_seed(0)
    som = SOMQuantizer(16, dim=6, grid=(4, 4), kmeans_iters=20).train()
    uninitialised = som.codebook.detach().clone()
    som(latents)
    codes = som.codebook.detach()
    # On the data: in the plane of the square, inside it, and close to every latent.
    in_plane = (codes - 5.0) @ frame
    assert float((codes - 5.0 - in_plane @ frame.t()).norm(dim=1).max()) < 1e-3
    assert 0.0 < float(in_plane.min()) and float(in_plane.max()) < 4.0
    rows = latents.permute(0, 2, 3, 1).reshape(-1, 6)
    assert float(torch.cdist(rows, codes).min(dim=1).values.mean()) < 0.5
    assert float(torch.cdist(rows, uninitialised).min(dim=1).values.mean()) > 5.0
    # Laid out on the grid: a perfect 4 x 4 layout has grid neighbours 1 apart and other pairs ~2.4.
    neighbours = [(a, b) for a, others in neighbour_sets(4, 4, "rectangular").items() for b in others]
    others = [(a, b) for a in range(16) for b in range(16) if a != b and (a, b) not in neighbours]
    assert mean_distance(codes, neighbours) < 0.6 * mean_distance(codes, others)


def test_layout_on_grid_only_reorders_the_centroids():
    centroids = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    laid_out = layout_on_grid(centroids, 3, 4)
    assert sorted(map(tuple, laid_out.tolist())) == sorted(map(tuple, centroids.tolist()))
    assert layout_on_grid(centroids[:, :1], 3, 4).shape == (12, 1)  # one channel: sorted along it


def test_training_the_map_organises_it_so_grid_neighbours_are_closer_than_other_nodes():
    # No k-means: random embeddings near the origin must self-organise through the neighbourhood term.
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    som = SOMQuantizer(16, dim=2, grid=(4, 4), kmeans_init=False, commitment_weight=1.0,
                       neighbour_weight=1.0).train()
    optimizer = torch.optim.SGD(som.parameters(), lr=2.0)
    for _ in range(300):
        z = torch.rand(8, 2, 4, 4, generator=g)  # uniform on the unit square
        _, aux = som(z)
        optimizer.zero_grad()
        sum(aux["loss"].values()).backward()
        optimizer.step()
    codes = som.codebook.detach()
    neighbours = [(a, b) for a, others in neighbour_sets(4, 4, "rectangular").items() for b in others]
    others = [(a, b) for a in range(16) for b in range(16) if a != b and (a, b) not in neighbours]
    assert mean_distance(codes, neighbours) < 0.6 * mean_distance(codes, others)


def test_eval_mode_leaves_the_map_alone_and_latents_to_indices_matches_the_forward():
    latents, _ = plane_clusters(2, dim=3, seed=4)
    som = SOMQuantizer(4, dim=3).train()
    som(latents)
    som.eval()
    before = som.codebook.detach().clone()
    _, aux = som(latents + 1.0)
    assert torch.equal(som.codebook.detach(), before)
    assert torch.equal(som.latents_to_indices(latents + 1.0), aux["indices"])
    torch.testing.assert_close(som.indices_to_latents(aux["indices"]), som(latents + 1.0)[0])
