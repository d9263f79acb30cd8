"""Snakemake adapter for rule `train_vqvae`: shards + split.csv -> vqvae/model.pt and vqvae/history.csv."""

from pathlib import Path

import torch

from brainvq.runtime import archive_stale_checkpoints, file_digest
from brainvq.training import RUNTIME_ONLY_KEYS, train_vqvae
from brainvq.workflow import logged

# The guard keeps DDP worker processes (spawned with vqvae.gpus > 1, which re-import this file) from training.
if __name__ == "__main__":
    with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
        torch.set_num_threads(snakemake.threads)
        out_dir = Path(snakemake.output.model).parent
        assert Path(snakemake.output.history) == out_dir / "history.csv", "rule outputs must share a folder"
        inputs = {"shards": file_digest(Path(snakemake.input.shards) / "manifest.json"),
                  "split": file_digest(snakemake.input.split)}
        stale = archive_stale_checkpoints(out_dir / "checkpoints", {"vqvae": {k: v for k, v in snakemake.params.vqvae.items() if k not in RUNTIME_ONLY_KEYS}, **inputs})
        if stale:
            log.warning("settings or inputs changed since the last checkpoint: kept it as %s, training anew", stale)
        model = train_vqvae(snakemake.params.vqvae, snakemake.input.shards, snakemake.input.split, out_dir,
                            progress=True)
        log.info("wrote %s", model)
