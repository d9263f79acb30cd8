"""A training step of every bottleneck never waits for the device, and stays in step across processes."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from brainvq.engine import leave_process_group
from brainvq.models import (
    VQVAE,
    FiniteScalarQuantizer,
    GaussianBottleneck,
    IdentityBottleneck,
    SOMQuantizer,
    VectorQuantizer,
)

torch.set_num_threads(1)

# Every Python-level way a tensor's value reaches the host (each one blocks on a GPU until it is ready).
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

BOTTLENECKS = {
    "vq": lambda dims: VectorQuantizer(16, dim=4, dead_code_steps=1, decay=0.9, spatial_dims=dims),
    "vq_factorised": lambda dims: VectorQuantizer(16, dim=4, codebook_dim=2, l2_normalize=True, dead_code_steps=2,
                                                  spatial_dims=dims),
    "fsq": lambda dims: FiniteScalarQuantizer((3, 3), dim=4, spatial_dims=dims),
    "som": lambda dims: SOMQuantizer(16, dim=4, topology="toroidal", spatial_dims=dims),
    "som_reference": lambda dims: SOMQuantizer(16, dim=4, straight_through=False, spatial_dims=dims),
    "ae": lambda dims: IdentityBottleneck(),
    "vae": lambda dims: GaussianBottleneck(dim=4, free_bits=0.1, spatial_dims=dims),
}


@contextmanager
def counted_host_reads():
    """Count calls of the tensor methods in HOST_READS (by name) while the block runs."""
    calls: list[str] = []
    own = {name: vars(torch.Tensor)[name] for name in HOST_READS if name in vars(torch.Tensor)}

    def counting(name, original):
        def method(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    try:
        yield calls
    finally:
        for name in HOST_READS:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)


def tiny_model(bottleneck: str, dims: int, gamma_e: float = 0.0) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(BOTTLENECKS[bottleneck](dims), channels=(4, 8), res_blocks=1, latent_dim=4, spatial_dims=dims,
                 gamma_q=1.0, gamma_e=gamma_e)


def images(dims: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *([8] * dims), generator=g)


def training_step(model: VQVAE, x: torch.Tensor) -> dict:
    """Forward, the documented loss, backward (the optimizer's own step is the engine's business)."""
    reconstruction, aux = model(x)
    terms = model.reconstruction_losses(reconstruction, x, aux, F.l1_loss)
    loss = sum(terms.values()) + sum(aux["loss"].values())
    model.zero_grad(set_to_none=True)
    loss.backward()
    return aux


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.tensor([3])
    with counted_host_reads() as calls:
        t.item(), t.tolist(), bool(t), int(t), float(t), range(10)[t]
        if t:
            pass
    assert sorted(set(calls)) == sorted(HOST_READS)
    assert t.item() == 3 and bool(t)  # the methods are restored


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("bottleneck", sorted(BOTTLENECKS))
def test_training_steps_after_the_first_read_nothing_back_from_the_device(bottleneck, dims):
    model = tiny_model(bottleneck, dims, gamma_e=0.5).train()
    training_step(model, images(dims, seed=0))  # may run the k-means initialisation
    with counted_host_reads() as calls:
        for seed in (1, 2, 3):
            aux = training_step(model, images(dims, seed=seed))
    assert calls == [], f"{bottleneck} {dims}D: host reads {calls}"
    for key in ("perplexity", "restarted", "kl"):
        if key in aux:
            assert isinstance(aux[key], torch.Tensor), key


def test_dead_code_restarts_run_inside_the_counted_steps():
    # The restart path must really execute in the steps the sync test counts.
    model = tiny_model("vq", 2).train()
    restarted = [training_step(model, images(2, seed=s))["restarted"] for s in range(4)]
    assert sum(int(r) for r in restarted[1:]) > 0


@pytest.mark.parametrize("bottleneck", ["vq", "som"])
def test_an_explicit_initialisation_before_training_leaves_even_the_first_step_without_host_reads(bottleneck):
    model = tiny_model(bottleneck, 2).train()
    assert model.bottleneck.needs_initialization
    assert model.initialize_codebook(images(2, seed=9))
    assert not model.bottleneck.needs_initialization and int(model.bottleneck.initialized) == 1
    with counted_host_reads() as calls:
        training_step(model, images(2, seed=1))
    assert calls == []


def test_loading_a_state_dict_sets_whether_the_codebook_still_needs_initialisation():
    trained = tiny_model("som", 2).train()
    training_step(trained, images(2))
    fresh = tiny_model("som", 2)
    assert fresh.bottleneck.needs_initialization
    fresh.load_state_dict(trained.state_dict())
    assert not fresh.bottleneck.needs_initialization
    fresh.load_state_dict(tiny_model("som", 2).state_dict())
    assert fresh.bottleneck.needs_initialization


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize("bottleneck", sorted(BOTTLENECKS))
def test_cuda_training_steps_make_no_synchronising_call(bottleneck):
    model = tiny_model(bottleneck, 2, gamma_e=0.5).cuda().train()
    training_step(model, images(2).cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in (1, 2):
            training_step(model, images(2, seed=seed).cuda())
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bottleneck_after_ddp_steps(name: str, rank: int) -> dict:
    """Return the bottleneck's state after 4 DDP steps on this process's half of each batch (the DDP wrapper is
    freed on return, before the process group is destroyed)."""
    model = tiny_model(name, 2).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        x = images(2, seed=10 * step + rank)  # each process sees its own half of the batch
        reconstruction, aux = ddp(x)
        loss = sum(model.reconstruction_losses(reconstruction, x, aux, F.l1_loss).values())
        loss = loss + sum(aux["loss"].values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.bottleneck.state_dict().items()}


def _two_process_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different RNG streams: agreement must come from the collectives
    results = {name: _bottleneck_after_ddp_steps(name, rank) for name in ("vq", "som")}
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    # The engine's exit path: destroying the group while a DDP wrapper still held it hung this test once
    # (the wrapper, freed afterwards, destroyed the Gloo group under the GIL its worker thread waited for).
    leave_process_group()


def test_two_processes_keep_identical_codebooks_through_init_restarts_and_updates(tmp_path):
    mp.spawn(_two_process_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("vq", "som"):
        for key, value in zero[name].items():
            assert torch.equal(value, one[name][key]), f"{name}.{key} differs between processes"
