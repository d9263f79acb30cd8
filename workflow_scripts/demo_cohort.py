"""Snakemake adapter for rule `demo_cohort`: write the synthetic IXI-/OASIS-like cohort and participants.tsv."""

import time

from brainvq.demo import build_demo_cohort
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    start = time.perf_counter()
    table = build_demo_cohort(
        snakemake.output[0],
        n_subjects=snakemake.params.n_subjects,
        seed=snakemake.params.seed,
        oasis_fraction=snakemake.params.oasis_fraction,
        workers=snakemake.threads,
        downsample=snakemake.params.downsample,
    )
    log.info(
        "demo cohort: %d subjects (%d OASIS-like) in %.1f s -> %s",
        len(table),
        (table["site"] == "WashU").sum(),
        time.perf_counter() - start,
        snakemake.output[0],
    )
