"""Snakemake adapter for rule `evaluate`: metrics of the trained run on its test subjects."""

from pathlib import Path

from brainvq.data import read_split
from brainvq.evaluation import (
    EvaluationInputs,
    evaluate_run,
    evaluation_model,
    prior_scorer,
    software_versions,
    write_evaluation,
)
from brainvq.prior import load_prior
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    settings = snakemake.params.evaluate
    model, device, codebook_size = evaluation_model(snakemake.input.vqvae, snakemake.params.bottleneck, settings,
                                                    snakemake.threads)
    inputs = EvaluationInputs(
        split_csv=Path(snakemake.input.split),
        shards_dir=Path(snakemake.input.shards),
        codes_dir=Path(snakemake.input.codes),
        samples=Path(snakemake.input.samples),
    )
    scorer = prior_scorer(load_prior(snakemake.input.prior, device), read_split(inputs.split_csv))
    source_defaults = snakemake.params.source_defaults
    result = evaluate_run(inputs, model, scorer, codebook_size, settings, source_defaults, device)
    result.metrics["software"] = software_versions()
    write_evaluation(
        result,
        snakemake.output.metrics,
        snakemake.output.per_scan,
        snakemake.output.per_slice,
        snakemake.output.figures,
    )
    log.info("evaluated %d test slices of %d scans", result.metrics["n_test_slices"], result.metrics["n_test_scans"])
