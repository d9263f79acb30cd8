"""Snakemake adapter for rule `apply_report`: the applied folder's metrics and figures -> report/index.html."""

from brainvq.apply_report import build_apply_report
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    inputs, params = snakemake.input, snakemake.params
    build_apply_report(inputs.metrics, inputs.per_scan, inputs.figures, inputs.excluded, inputs.bundle,
                       snakemake.output.html, params.report, params.examples, params.attribution_html)
    log.info("wrote %s", snakemake.output.html)
