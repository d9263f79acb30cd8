"""Benchmark brainvq's VQ-VAE against MONAI's VQVAE: same shards, same batches, same steps.

Reports per model: training slices/s, peak memory (CUDA max_memory_allocated, or the process's peak RSS
on the CPU; each model trains in its own process), and on held-out (test) subjects the brain-masked
SSIM and PSNR, the full-image SSIM and the number of codes used.

Usage:
    python benchmarks/train_vqvae.py                                  # small synthetic CPU run (~1 min)
    python benchmarks/train_vqvae.py --shards results/demo/shards --split results/demo/split.csv --size 128
    python benchmarks/train_vqvae.py --shards ... --split ... --size 256 --downsample 8 \\
        --channels 64 128 256 --codebook-size 512 --steps 2000 --batch-size 64      # GPU scale

MONAI's VQVAE is trained in two configurations (``MONAI_CONFIGS``), each on the same batches for the same steps:

- ``monai_defaults``: the network's constructor defaults (three levels of 96/96/192 channels, 3 residual layers,
  32 codes of 64 dimensions, EMA decay 0.5), trained like brainvq (AdamW at ``--lr``).
- ``monai_tutorial``: what MONAI's own 2D VQ-VAE tutorial (Project-MONAI/tutorials, generation/2d_vqvae) sets,
  and only that: 256 codes of 32 dimensions, two stride-2 levels, 2 residual layers, Adam at lr 1e-4, decay and
  commitment at their defaults; the tutorial's 256 channels per level are scaled to brainvq's ``--channels`` so
  the two networks have a similar size (and the run fits a CPU).

brainvq uses stride-2 4x4 convs, residual blocks with half-width 3x3 convs and ``--channels`` per level, with
k-means initialisation and dead-code restart (its other settings come from the ``vqvae`` config section).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainvq.demo import synthetic_brain_slices
from brainvq.shards import write_slices_h5

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "train_vqvae.json")
    parser.add_argument("--shards", type=Path, help="a shards folder (default: synthetic slices made here)")
    parser.add_argument("--split", type=Path, help="split.csv of --shards (training = train subjects)")
    parser.add_argument("--size", type=int, default=64, help="image size of synthetic slices (px)")
    parser.add_argument("--synthetic-subjects", type=int, nargs=2, default=(12, 3), metavar=("TRAIN", "TEST"))
    parser.add_argument("--slices-per-subject", type=int, default=24)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--downsample", type=int, default=4, choices=(2, 4, 8, 16))
    parser.add_argument("--channels", type=int, nargs="+", default=(32, 64), help="channels per level")
    parser.add_argument("--res-blocks", type=int, default=1)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--decay", type=float, default=0.95, help="EMA decay of brainvq's codebook")
    parser.add_argument("--eval-slices", type=int, default=256, help="held-out slices evaluated (evenly spaced)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["brainvq", *MONAI_CONFIGS],
                        choices=["brainvq", *MONAI_CONFIGS], help="models to train, in turn")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- data


def write_synthetic_shard(path: Path, n_subjects: int, per_subject: int, size: int, seed: int, split: str) -> Path:
    """Write a contract-layout shard of synthetic slices (subjects ``{split}NN``)."""
    images, masks = synthetic_brain_slices(n_subjects * per_subject, size, seed)
    scans = np.array([f"{split}{i:02d}" for i in range(n_subjects) for _ in range(per_subject)], dtype=object)
    write_slices_h5(path, images.astype(np.float16), masks, scans, scans,
                    np.tile(np.arange(per_subject, dtype=np.int32), n_subjects),
                    np.tile(np.linspace(0, 1, per_subject, dtype=np.float32), n_subjects),
                    {"spacing_mm": 1.0, "size": size, "source": "synthetic", "config_hash": "benchmark", "split": split})
    return path


def benchmark_shards(args, tmp: Path) -> dict:
    """Return ``train`` shard paths, the training ``subjects`` (None = all) and the held-out ``test`` paths/subjects."""
    from brainvq.data import read_split
    from brainvq.shards import shard_paths

    if args.shards:
        if not args.split:
            raise SystemExit("--shards needs --split")
        split = read_split(args.split)
        return {"train": [str(p) for p in shard_paths(args.shards, "train")],
                "train_subjects": sorted(set(split.loc[split["split"] == "train", "subject"])),
                "test": [str(p) for p in shard_paths(args.shards, "test")]}
    n_train, n_test = args.synthetic_subjects
    train = write_synthetic_shard(tmp / "train-000.h5", n_train, args.slices_per_subject, args.size, args.seed, "train")
    test = write_synthetic_shard(tmp / "test-000.h5", n_test, args.slices_per_subject, args.size, args.seed + 1, "test")
    return {"train": [str(train)], "train_subjects": None, "test": [str(test)]}


def heldout_slices(paths: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` evenly spaced held-out (images, masks) from the test shards."""
    from brainvq.shards import ShardDataset

    dataset = ShardDataset(paths, with_masks=True)
    rows = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    items = [dataset[int(i)] for i in rows]
    dataset.close()
    return (np.stack([item["image"][0].numpy() for item in items]),
            np.stack([item["mask"][0].numpy() for item in items]))


# ----------------------------------------------------------------------------------------- models


def brainvq_model(args) -> torch.nn.Module:
    from brainvq.config import load_config
    from brainvq.models import build_vqvae

    section = load_config(overrides={"vqvae": {
        "downsample": args.downsample, "channels": list(args.channels), "res_blocks": args.res_blocks,
        "latent_dim": args.latent_dim, "codebook_size": args.codebook_size, "ema_decay": args.decay,
    }})["vqvae"]
    return build_vqvae(section)


# name -> (VQVAE keyword arguments, optimizer: None = the benchmark's AdamW at --lr, else (class name, lr)).
MONAI_CONFIGS = {
    "monai_defaults": ({}, None),
    "monai_tutorial": ({"num_res_layers": 2, "num_embeddings": 256, "embedding_dim": 32,
                        "downsample_parameters": ((2, 4, 1, 1),) * 2,
                        "upsample_parameters": ((2, 4, 1, 1, 0),) * 2}, ("Adam", 1e-4)),
}


def monai_model(name: str, args) -> torch.nn.Module:
    """MONAI's VQVAE in configuration ``name`` of ``MONAI_CONFIGS`` (the tutorial's widths scaled to the first two
    of brainvq's ``--channels``)."""
    from monai.networks.nets import VQVAE

    settings = dict(MONAI_CONFIGS[name][0])
    if name == "monai_tutorial":
        channels = tuple(args.channels[:2])
        settings.update(channels=channels, num_res_channels=channels)
    return VQVAE(spatial_dims=2, in_channels=1, out_channels=1, **settings)


def build_model(name: str, args) -> torch.nn.Module:
    return brainvq_model(args) if name == "brainvq" else monai_model(name, args)


def optimizer_of(name: str, model: torch.nn.Module, args, cuda: bool) -> torch.optim.Optimizer:
    """Return the benchmark's AdamW at ``--lr`` for brainvq and monai_defaults, the tutorial's optimizer otherwise."""
    chosen = None if name == "brainvq" else MONAI_CONFIGS[name][1]
    if chosen is None:
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4, fused=cuda)
    kind, lr = chosen
    return getattr(torch.optim, kind)(model.parameters(), lr=lr)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_loss(name: str, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (reconstruction, L1 + bottleneck loss) for either model."""
    if name == "brainvq":
        reconstruction, aux = model(x)
        extra = sum(aux["loss"].values())
    else:
        reconstruction, extra = model(x)
    return reconstruction, torch.nn.functional.l1_loss(reconstruction.float(), x) + extra


def code_indices(name: str, model, x: torch.Tensor) -> torch.Tensor:
    return model.encode_indices(x) if name == "brainvq" else model.index_quantize(x)


# -------------------------------------------------------------------------------------------- run


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def train_and_evaluate(name: str, args, shards: dict, queue) -> None:
    """Child process: train one model on the shared batches, evaluate on the held-out slices, report."""
    from torch.utils.data import DataLoader

    from brainvq.engine import StepBatchSampler
    from brainvq.measures.similarity import brain_masked_ssim, mse_and_psnr_db, ssim
    from brainvq.runtime import autocast_context, select_device
    from brainvq.shards import ShardDataset

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    cuda = device.type == "cuda"
    train = ShardDataset(shards["train"], subjects=shards["train_subjects"])
    sampler = StepBatchSampler(len(train), args.batch_size, args.seed, 0, args.steps)
    loader = DataLoader(train, batch_sampler=sampler, num_workers=args.workers, pin_memory=cuda,
                        generator=torch.Generator().manual_seed(args.seed))
    rss_before = peak_rss_mb()
    torch.manual_seed(args.seed)
    model = build_model(name, args).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = optimizer_of(name, model, args, cuda)
    model.train()
    losses, start, timed_from = [], None, min(5, args.steps - 1)
    for step, batch in enumerate(loader):
        if step == timed_from:  # the first steps include k-means, worker start-up and kernel warm-up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        x = batch["image"].to(device, non_blocking=True)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device):
            _, loss = forward_loss(name, model, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    slices_per_s = (args.steps - timed_from) * args.batch_size / seconds
    memory = ({"peak_cuda_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20} if cuda else
              {"peak_rss_mb": peak_rss_mb(), "rss_before_model_mb": rss_before})

    model.eval()
    images, masks = heldout_slices(shards["test"], args.eval_slices)
    metrics = {"ssim_brain": [], "psnr_brain": [], "ssim_full": []}
    used = set()
    with torch.no_grad():
        for begin in range(0, len(images), 64):
            x = torch.from_numpy(images[begin:begin + 64])[:, None].to(device)
            with autocast_context(device):
                reconstruction, _ = forward_loss(name, model, x)
                used.update(code_indices(name, model, x).reshape(-1).tolist())
            recon = reconstruction.float().clamp(0, 1)[:, 0].cpu().numpy()
            for original, rec, mask in zip(images[begin:begin + 64], recon, masks[begin:begin + 64]):
                metrics["ssim_brain"].append(brain_masked_ssim(original, rec, mask))
                metrics["psnr_brain"].append(mse_and_psnr_db(original, rec, mask)[1])
                metrics["ssim_full"].append(ssim(original, rec))
    queue.put({
        "name": name,
        "configuration": "brainvq vqvae config section" if name == "brainvq" else {
            "network": {k: v for k, v in MONAI_CONFIGS[name][0].items()},
            "optimizer": MONAI_CONFIGS[name][1] or ["AdamW", args.lr]},
        "parameters": parameter_count(model),
        "train_slices_per_s": slices_per_s,
        "train_seconds": seconds,
        "final_train_loss": float(torch.stack(losses[-10:]).float().mean()),
        **memory,
        "heldout_slices": len(images),
        **{f"heldout_{k}_mean": float(np.nanmean(v)) for k, v in metrics.items()},
        "heldout_codes_used": len(used),
    })


def result_of(child, queue) -> dict:
    """Wait for the child's result; fail (rather than hang) if it dies without one."""
    import queue as queues

    while True:
        try:
            result = queue.get(timeout=5)
            child.join()
            return result
        except queues.Empty:
            if not child.is_alive():
                raise SystemExit(f"benchmark process for {child.name} exited with code {child.exitcode}")


def data_summary(shards: dict) -> dict:
    from brainvq.shards import ShardDataset

    train, test = ShardDataset(shards["train"], subjects=shards["train_subjects"]), ShardDataset(shards["test"])
    return {"image_size": list(train.image_size), "train_slices": len(train), "heldout_slices_available": len(test),
            "train_subjects": int(train.index["subject"].nunique()),
            "heldout_subjects": int(test.index["subject"].nunique())}


def git_commit() -> dict:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": mp.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["load_average_1min"] = __import__("os").getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    if len(args.channels) != int(np.log2(args.downsample)):
        raise SystemExit(f"--channels needs {int(np.log2(args.downsample))} entries for --downsample {args.downsample}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = benchmark_shards(args, Path(tmp))
        context = mp.get_context("spawn")
        for name in args.models:
            queue = context.Queue()
            child = context.Process(target=train_and_evaluate, args=(name, args, shards, queue), name=name)
            child.start()
            result = result_of(child, queue)
            results[name] = result
            print(json.dumps(result, indent=2), file=sys.stderr)
        data = data_summary(shards)
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "git": git_commit(),
        "machine": machine(),
        "data": {"source": str(args.shards) if args.shards else "synthetic", **data},
        "settings": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
