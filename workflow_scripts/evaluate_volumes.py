"""Snakemake adapter for rule `evaluate` with whole volumes (preprocess.dims 3): 3D metrics on the test subjects."""

from brainvq.evaluation import evaluation_model, software_versions, write_evaluation
from brainvq.evaluation.volumes import evaluate_volumes
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    settings = snakemake.params.evaluate
    model, device, _ = evaluation_model(snakemake.input.vqvae, snakemake.params.bottleneck, settings, snakemake.threads)
    result = evaluate_volumes(snakemake.input.shards, snakemake.input.codes, model, device)
    result.metrics["software"] = software_versions()
    write_evaluation(result, snakemake.output.metrics, snakemake.output.per_scan, None, snakemake.output.figures)
    log.info("evaluated %d test volumes", result.metrics["n_test_scans"])
