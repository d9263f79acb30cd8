"""Snakemake adapter for rule `train_pixelcnn`: training code maps -> prior/model.pt, prior/history.csv."""

from pathlib import Path

import torch

from brainvq.prior import train_prior, training_maps
from brainvq.training import load_vqvae
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    torch.set_num_threads(snakemake.threads)
    config = snakemake.params.pixelcnn
    out_dir = Path(snakemake.output.model).parent
    assert Path(snakemake.output.history) == out_dir / "history.csv", "rule outputs must share a folder"
    codebook_size = load_vqvae(snakemake.input.vqvae, "cpu").codebook_size
    if codebook_size is None:
        raise ValueError(f"{snakemake.input.vqvae} has no codebook; set vqvae.bottleneck to vq or fsq for a prior")
    train, val, classes = training_maps(snakemake.input.codes, snakemake.input.split, config["condition_label"])
    log.info("prior: %d training maps, %d validation maps of %s, K=%d, labels %s",
             len(train), len(val), train.map_size, codebook_size, classes or "none")
    # A rerun after a kill resumes; one after a change of settings or codes keeps the old checkpoints aside.
    summary = train_prior(train, val, config, codebook_size, classes, out_dir, stale="archive")
    log.info("prior: %s", summary)
