"""Benchmark the PixelCNN prior: test NLL against the uniform and unigram baselines, training and sampling speed.

Usage:
    python benchmarks/prior.py --out results/bench/prior.json                     # synthetic Markov code maps
    python benchmarks/prior.py --results results/demo --out results/bench/prior.json  # a run's codes/ + split.csv

Training uses the ``pixelcnn`` section of --config (defaults from config/schema.yaml); --steps overrides its
step count for a quick look. Sampling speed is measured on the CPU and, when present, on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from brainvq.config import load_config
from brainvq.files import write_text_atomic
from brainvq.data import read_split
from brainvq.prior import (
    CodeMaps,
    bits_per_code,
    code_maps,
    load_prior,
    train_prior,
    training_maps,
    uniform_bits,
    unigram_bits,
)
from brainvq.runtime import select_device
from brainvq.sampling import sample_codes

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "prior.json")
    parser.add_argument("--results", type=Path, help="a run folder with codes/, split.csv and vqvae/model.pt")
    parser.add_argument("--config", type=Path, help="config file (default config/config.yaml)")
    parser.add_argument("--steps", type=int, help="override pixelcnn.steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--sample-n", type=int, default=16, help="maps drawn for the CPU sampling speed")
    parser.add_argument("--sample-n-cuda", type=int, default=256, help="maps drawn for the CUDA sampling speed")
    parser.add_argument("--synthetic-codebook", type=int, default=256, help="K of the synthetic Markov source")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- data


def markov_maps(n: int, size: int, codebook_size: int, stay: float, seed: int) -> np.ndarray:
    """Return (n, size, size) maps: code (0, 0) uniform; down the first column and along each row the next code
    is (previous + 1) mod K with probability ``stay``, otherwise one of the other K - 1 codes uniformly."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((n, size, size), np.int64)

    def step(previous: np.ndarray) -> np.ndarray:
        other = (previous + 1 + rng.integers(1, codebook_size, previous.shape)) % codebook_size
        return np.where(rng.random(previous.shape) < stay, (previous + 1) % codebook_size, other)

    maps[:, 0, 0] = rng.integers(0, codebook_size, n)
    for i in range(1, size):
        maps[:, i, 0] = step(maps[:, i - 1, 0])
    for j in range(1, size):
        maps[:, :, j] = step(maps[:, :, j - 1])
    return maps


def markov_entropy_bits(size: int, codebook_size: int, stay: float) -> float:
    """Return the exact entropy per code of :func:`markov_maps`."""
    step = -stay * math.log2(stay) - (1 - stay) * math.log2((1 - stay) / (codebook_size - 1))
    return (math.log2(codebook_size) + (size * size - 1) * step) / (size * size)


def synthetic_data(codebook_size: int) -> tuple[dict, CodeMaps, CodeMaps, CodeMaps, int]:
    """Return (description, train, validation, test, K) for a synthetic Markov source the size of the demo."""
    size, stay = 32, 0.7

    def maps(n: int, seed: int) -> CodeMaps:
        return CodeMaps(markov_maps(n, size, codebook_size, stay, seed), np.linspace(0, 1, n, dtype=np.float32),
                        None, np.array(["synthetic"] * n, object))

    info = {"source": "synthetic Markov code maps (left neighbour; first column: the code above)",
            "stay_probability": stay, "true_entropy_bits": markov_entropy_bits(size, codebook_size, stay)}
    return info, maps(2000, 0), maps(200, 1), maps(200, 2), codebook_size


def results_data(run: Path, config: dict) -> tuple[dict, CodeMaps, CodeMaps, CodeMaps, int]:
    """Return (description, train, validation, test, K) from a run folder's codes/, split.csv and VQ-VAE."""
    from brainvq.training import load_vqvae

    codes_dir, split_csv = run / "codes", run / "split.csv"
    label = config["condition_label"]
    train, val, classes = training_maps(codes_dir, split_csv, label)
    test = code_maps(codes_dir, read_split(split_csv), "test", label, classes)
    codebook_size = load_vqvae(run / "vqvae" / "model.pt", "cpu").codebook_size
    return {"source": str(run), "label_classes": classes}, train, val, test, codebook_size


# ---------------------------------------------------------------------------------------- measures


def sampling_speed(prior, positions, labels, device: str, batch_size: int) -> dict:
    """Return maps/s for drawing one map per position on ``device`` (after a one-map warm-up)."""
    prior = prior.to(device)
    sample_codes(prior, positions[:1], labels[:1] if labels else None, seed=0, batch_size=1, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sample_codes(prior, positions, labels, seed=0, batch_size=batch_size, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"device": device, "maps": len(positions), "batch_size": batch_size, "seconds": seconds,
            "maps_per_s": len(positions) / seconds}


def git_commit() -> str:
    """Return HEAD's commit, with '-dirty' when the working tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(benchmark: str) -> dict:
    """Return the fields a benchmark report opens with: its name, the command line, commit, time and machine."""
    return {
        "benchmark": benchmark,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
    }


def label_list(maps: CodeMaps, classes: list[str]) -> list[str] | None:
    return [classes[k] for k in maps.labels] if maps.labels is not None else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config)["pixelcnn"]
    if args.steps is not None:
        config["steps"] = args.steps
    if args.results:
        info, train, val, test, codebook_size = results_data(args.results, config)
    else:
        info, train, val, test, codebook_size = synthetic_data(args.synthetic_codebook)
    classes = info.get("label_classes", [])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        train_prior(train, val, config, codebook_size, classes, tmp, progress=sys.stderr.isatty())
        train_seconds = time.perf_counter() - start
        history = pd.read_csv(tmp / "history.csv")
        prior = load_prior(tmp / "model.pt", "cuda" if torch.cuda.is_available() else "cpu")

    test_labels = label_list(test, classes)
    nll = bits_per_code(prior, test.codes, test.positions, test_labels, batch_size=config["eval_batch_size"])
    unigram = unigram_bits(train.codes, test.codes, codebook_size)
    rng = np.random.default_rng(0)
    speed = []
    for device, n in (("cpu", args.sample_n), ("cuda", args.sample_n_cuda)):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        picks = rng.integers(0, len(test), n)
        labels = [test_labels[k] for k in picks] if test_labels else None
        speed.append(sampling_speed(prior, test.positions[picks], labels, device, min(n, 64 if device == "cpu" else n)))

    report = {
        **provenance("prior"),
        "data": {**info, "codebook_size": codebook_size, "map_size": list(train.map_size),
                 "train_maps": len(train), "validation_maps": len(val), "test_maps": len(test)},
        "config": config,
        "test_nll_bits": nll,
        "uniform_bits": uniform_bits(codebook_size),
        "unigram_bits": unigram,
        "nll_over_unigram": nll / unigram,
        "target_met": bool(nll <= 0.5 * unigram),
        "training": {"device": str(select_device(config["device"])),
                     "seconds": train_seconds, "steps": config["steps"],
                     "slices_per_s": float(history["slices_per_s"].mean()),
                     "codes_per_s": float(history["codes_per_s"].mean()),
                     "final_train_nll_bits": float(history["train_nll_bits"].iloc[-1]),
                     "final_val_nll_bits": float(history["val_nll_bits"].dropna().iloc[-1])
                     if history["val_nll_bits"].notna().any() else None},
        "sampling": speed,
    }
    write_text_atomic(args.out, json.dumps(report, indent=2, default=float) + "\n")
    print(json.dumps({k: report[k] for k in ("test_nll_bits", "uniform_bits", "unigram_bits", "target_met")}))
    return report


if __name__ == "__main__":
    main()
