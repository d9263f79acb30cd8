"""Snakemake adapter for rule `train_vqvae`: shards + split.csv -> vqvae/model.pt and vqvae/history.csv."""

from pathlib import Path

import torch

from brainvq.training import train_vqvae
from brainvq.workflow import logged

# The guard keeps DDP worker processes (spawned with vqvae.gpus > 1, which re-import this file) from training.
if __name__ == "__main__":
    with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
        torch.set_num_threads(snakemake.threads)
        out_dir = Path(snakemake.output.model).parent
        assert Path(snakemake.output.history) == out_dir / "history.csv", "rule outputs must share a folder"
        # A rerun after a kill resumes; one after a change of settings or data keeps the old checkpoints aside.
        model = train_vqvae(snakemake.params.vqvae, snakemake.input.shards, snakemake.input.split, out_dir,
                            progress=True, stale="archive")
        log.info("wrote %s", model)
