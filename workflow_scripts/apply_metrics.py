"""Snakemake adapter for rule `apply_metrics`: the applied scans' records -> metrics.json, per_scan.csv, codes/index.csv."""

import json
from pathlib import Path

import numpy as np

from brainvq.apply import applied_metrics, read_summaries, write_applied_metrics
from brainvq.demographics import read_participants_tsv
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    params, inputs, output = snakemake.params, snakemake.input, snakemake.output
    summaries = read_summaries(inputs.summaries)
    codes = {Path(path).stem: np.load(path) for path in inputs.codes}
    manifest = json.loads(Path(inputs.bundle).read_text())
    metrics, per_scan, index = applied_metrics(summaries, codes, manifest, read_participants_tsv(inputs.participants),
                                               params.about, params.probe_target, params.evaluate)
    write_applied_metrics(metrics, per_scan, index, output.metrics, output.per_scan, output.index)
    log.info("%d scans applied (%d excluded); trained on %s, applied to %s", metrics["applied_to"]["n_scans"],
             len(metrics["applied_to"]["excluded"]), metrics["trained_on"]["source"], metrics["applied_to"]["source"])
