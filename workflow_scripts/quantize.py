"""Snakemake adapter for rule `quantize`: vqvae/model.pt + shards -> codes/{train,test}/{scan}.npy, codes/index.csv."""

import torch

from brainvq.quantize import write_codes
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    index = write_codes(snakemake.input.model, snakemake.input.shards, snakemake.input.split, snakemake.output[0],
                        batch_size=params.batch_size, device=params.device, workers=params.workers)
    log.info("wrote codes of %d scans (%d slices)", index["scan"].nunique(), len(index))
