"""Benchmark the 3D bottlenecks of issue 13 on whole volumes: VQ (with this project's remedies, and without),
SOM-VAE on a rectangular and a toroidal grid, a plain autoencoder and a VAE, at equal steps, beside the
OASIS-1 3D study's table.

Every model trains through the workflow's own engine (``brainvq.training.train_vqvae``) on the same shards, with the
same encoder/decoder (the ``vqvae`` section of ``--config`` plus ``--steps``), and is scored on the test subjects'
volumes: 3D SSIM with the Gaussian window and with the uniform 7-voxel window the study used, PSNR, codes used and
perplexity (``brainvq.measures.volumes``, ``brainvq.measures.codebook``).

Usage (after the 3D demo's shards exist: ``snakemake --cores 2 --configfile config/config.yaml config/demo3d.yaml
results/demo3d/shards``):
    python -m benchmarks.vq3d                                   # the demo at config/demo3d.yaml's settings
    python -m benchmarks.vq3d --steps 100 --models vq som_rect  # fewer steps / models
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.prior import provenance
from brainvq.files import write_text_atomic
from brainvq.reporting_volumes import STUDY_RESULTS

REPO = Path(__file__).resolve().parents[1]

# The variants: overrides of the config's vqvae section. "Remedies" are this project's defaults against codebook
# collapse (k-means initialisation on the first batch, restart of codes dead for dead_code_steps, EMA updates).
VARIANTS = {
    "vq": {"bottleneck": "vq"},
    "vq_plain": {"bottleneck": "vq", "kmeans_init": False, "dead_code_steps": 0},
    "som_rect": {"bottleneck": "som", "som_topology": "rectangular"},
    "som_torus": {"bottleneck": "som", "som_topology": "toroidal"},
    "ae": {"bottleneck": "ae"},
    "vae": {"bottleneck": "vae"},
}
LABELS = {
    "vq": "VQ-VAE, this project's remedies (k-means init, dead-code restart, EMA)",
    "vq_plain": "VQ-VAE without remedies (random init, no restart)",
    "som_rect": "SOM-VAE, rectangular grid, k-means init",
    "som_torus": "SOM-VAE, toroidal grid, k-means init",
    "ae": "plain autoencoder",
    "vae": "VAE",
}
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "vq3d.json")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "demo3d.yaml",
                        help="the 3D run's config (its vqvae section and run name)")
    parser.add_argument("--shards", type=Path, help="default: results/<run>/shards of --config")
    parser.add_argument("--split", type=Path, help="default: results/<run>/split.csv of --config")
    parser.add_argument("--steps", type=int, help="training steps of every model (default: the config's)")
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def run_config(path: Path) -> dict:
    from brainvq.config import load_config

    return load_config(overrides=yaml.safe_load(path.read_text()))


def heldout_volumes(shards: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return the test scans, their volumes ``(N, D, H, W)`` and masks."""
    from brainvq.shards import load_shard_rows, shard_index, shard_paths

    paths = shard_paths(shards, "test")
    index = shard_index(paths)
    return list(index["scan"]), load_shard_rows(paths, index), load_shard_rows(paths, index, "masks")


def evaluate(model, volumes: np.ndarray, masks: np.ndarray) -> dict:
    """Return the test-set means of the 3D measures, and codes used / perplexity for a model with a codebook."""
    from brainvq.evaluation.reconstruction import model_outputs
    from brainvq.measures.codebook import code_counts, codebook_usage
    from brainvq.measures.volumes import volume_metric_table

    reconstructions = model_outputs(model, volumes, torch.device("cpu"), 1, "reconstruction")
    table = volume_metric_table(volumes, reconstructions, masks)
    result = {name: float(table[name].mean()) for name in table.columns}
    if getattr(model, "codebook_size", None):
        with torch.no_grad():
            codes = [model.encode_indices(torch.as_tensor(v[None, None])).numpy() for v in volumes]
        result.update(codebook_usage(code_counts(codes, model.codebook_size)))
    return result


def train_and_evaluate(name: str, section: dict, shards: Path, split: Path, work: Path, data) -> dict:
    from brainvq.training import load_vqvae, train_vqvae

    settings = {**section, **VARIANTS[name]}
    start = time.perf_counter()
    model_path = train_vqvae(settings, shards, split, work / name)
    train_s = time.perf_counter() - start
    scans, volumes, masks = data
    row = {"model": name, "label": LABELS[name], "train_s": round(train_s, 1), "n_test_scans": len(scans),
           **evaluate(load_vqvae(model_path), volumes, masks)}
    print(json.dumps(row), flush=True)
    return row


def table_markdown(rows: list[dict]) -> str:
    lines = ["| model | SSIM uniform 7 | SSIM Gaussian | PSNR (dB) | codes used | perplexity |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        codes = f"{row['codes_used']}/{row['codebook_size']}" if "codes_used" in row else "-"
        perplexity = f"{row['perplexity']:.1f}" if row.get("perplexity") else "-"
        lines.append(f"| {row['label']} | {row['ssim_uniform7']:.3f} | {row['ssim_gaussian']:.3f} | "
                     f"{row['psnr_db']:.1f} | {codes} | {perplexity} |")
    lines += ["", "The study (OASIS-1 3D, validation, SSIM window as the study used it):", "",
              "| model | SSIM | PSNR (dB) | codes used |", "| --- | --- | --- | --- |"]
    lines += [f"| {model} | {ssim} | {psnr} | {codes} |" for model, ssim, psnr, codes in STUDY_RESULTS]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = run_config(args.config)
    if config["preprocess"]["dims"] != 3:
        raise SystemExit(f"{args.config} has preprocess.dims {config['preprocess']['dims']}; give a 3D config")
    run_dir = REPO / config["results_dir"] / config["run"]  # results_dir is relative to the repository
    shards, split = args.shards or run_dir / "shards", args.split or run_dir / "split.csv"
    if not (shards / "manifest.json").exists():
        raise SystemExit(f"{shards} has no shards; make them first: snakemake --cores 2 --configfile "
                         f"config/config.yaml {args.config} {shards}")
    section = {**config["vqvae"], "device": "cpu", "workers": 0}
    if args.steps:
        section["steps"] = args.steps
    data = heldout_volumes(shards)
    with tempfile.TemporaryDirectory(prefix="vq3d-") as tmp:
        rows = [train_and_evaluate(name, section, shards, split, Path(tmp), data) for name in args.models]
    result = {
        **provenance("vq3d"),
        "settings": {"config": str(args.config.relative_to(REPO) if args.config.is_absolute() else args.config),
                     "volume_shape": list(data[1].shape[1:]), "voxel_mm": config["preprocess"]["spacing_mm"],
                     "steps": section["steps"], "batch_size": section["batch_size"],
                     "channels": section["channels"], "codebook_size": section["codebook_size"],
                     "latent_dim": section["latent_dim"], "downsample": section["downsample"]},
        "results": rows,
        "study": [dict(zip(("model", "ssim", "psnr_db", "codes_used"), row)) for row in STUDY_RESULTS],
        "note": ("the demo cohort is one MNI template warped per subject: far more alike than OASIS-1 subjects, so "
                 "its volumes are easier to reconstruct than the study's; compare the ranking, not the values"),
        "table_markdown": table_markdown(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(result["table_markdown"])
    return result


if __name__ == "__main__":
    main()
