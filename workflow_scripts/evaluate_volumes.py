"""Snakemake adapter for rule `evaluate` with whole volumes (preprocess.dims 3): 3D metrics on the test subjects."""

import torch

from brainvq.evaluation import software_versions, vqvae_codebook_size, write_evaluation
from brainvq.evaluation.volumes import evaluate_volumes
from brainvq.runtime import seed_everything, select_device
from brainvq.training import load_vqvae
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    settings = snakemake.params.evaluate
    torch.set_num_threads(snakemake.threads)
    seed_everything(settings["seed"])
    device = select_device(settings["device"])
    model = load_vqvae(snakemake.input.vqvae, device)
    vqvae_codebook_size(model, snakemake.input.vqvae, snakemake.params.bottleneck)
    result = evaluate_volumes(snakemake.input.shards, snakemake.input.codes, model, device)
    result.metrics["software"] = software_versions()
    write_evaluation(result, snakemake.output.metrics, snakemake.output.per_scan, None, snakemake.output.figures)
    log.info("evaluated %d test volumes", result.metrics["n_test_scans"])
