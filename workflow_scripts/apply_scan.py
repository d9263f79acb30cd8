"""Snakemake adapter for rule `apply_scan`: one preprocessed scan through the trained models -> codes, native-space
reconstruction and anomaly map, per-scan record and report figure."""

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np

from brainvq.apply import write_applied_scan
from brainvq.inference import load_slice_model, prepared_scan
from brainvq.io import load_volume
from brainvq.qc import gated_brain
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    params, inputs, scan = snakemake.params, snakemake.input, snakemake.wildcards.scan
    # The bundle folder is the one holding its bundle.json (the first bundle input).
    model = load_slice_model(Path(inputs.bundle[0]).parent, params.device, batch_size=params.batch_size)
    native = load_volume(inputs.volume, params.orientation or None)
    # The gate slice_volume runs after skull stripping: a mask far from a brain's size stops the run or
    # (on_error skip) leaves the scan out, such as a head given to a model trained on skull-stripped brains.
    brain, voxels, reason = gated_brain(inputs.brain, inputs.mask, inputs.volume, params.qc,
                                        {**model.settings, "on_error": params.on_error})
    kept = np.zeros_like(voxels) if reason else voxels
    prepared = prepared_scan(brain, kept, nib.load(inputs.brain).affine, native, model.settings)
    if reason:
        prepared = dataclasses.replace(prepared, excluded_reason=reason)
    outputs = {name: snakemake.output[name] for name in ("codes", "recon", "anomaly", "summary", "figure")}
    summary = write_applied_scan(model, prepared, scan, params.subject, params.session, inputs.volume, outputs)
    log.info("%s: %d slices, %s codes used%s", scan, summary["n_slices"], summary["codes_used"],
             f" (excluded: {summary['excluded_reason']})" if summary["excluded_reason"] else "")
