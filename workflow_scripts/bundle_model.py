"""Snakemake adapter for rule `bundle_model`: a finished run's models -> results/<run>/model/ (bundle.json + models)."""

from brainvq.bundle import run_description, write_bundle
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    params, inputs = snakemake.params, snakemake.input
    description = run_description(inputs.vqvae, inputs.metrics, inputs.split, params.run, params.source,
                                  params.attribution_html, params.preprocess, params.anomaly_smoothing_fraction)
    manifest = write_bundle(snakemake.output[0], inputs.vqvae, inputs.prior, description)
    log.info("wrote %s (run %s, source %s)", manifest, params.run, params.source)
