"""Snakemake adapter for rule `slice_volume`: brain volume + mask -> normalised axial slices (slices/{scan}.h5)."""

from brainvq.config import config_hash
from brainvq.preprocessing import scan_slices
from brainvq.qc import gated_brain
from brainvq.shards import write_slices_h5
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    scan, settings = snakemake.wildcards.scan, snakemake.params.preprocess
    volume, mask, reason = gated_brain(snakemake.input.brain, snakemake.input.mask, snakemake.params.raw,
                                       snakemake.params.qc, settings)
    result = scan_slices(volume, mask, settings, reason)
    n = len(result["slice_index"])
    write_slices_h5(
        snakemake.output[0],
        result["images"],
        result["masks"],
        [scan] * n,
        [snakemake.params.subject] * n,
        result["slice_index"],
        result["slice_position"],
        attrs={
            "spacing_mm": settings["spacing_mm"],
            "size": settings["size"],
            "source": snakemake.params.source,
            "config_hash": config_hash(settings),
            "split": "",
            "excluded_reason": result["excluded_reason"],
            "excluded_stage": result["excluded_stage"],
            "pixel_mm": result["pixel_mm"],
            "window_vox": result["window"],
        },
    )
    if result["excluded_reason"]:
        log.warning("%s excluded at %s: %s", scan, result["excluded_stage"], result["excluded_reason"])
    log.info("%s: %d slices", scan, n)
