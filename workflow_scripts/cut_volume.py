"""Snakemake adapter for rule `cut_volume`: brain volume + mask -> the whole normalised volume (volumes/{scan}.h5)."""

from brainvq.config import config_hash
from brainvq.preprocessing import shard_geometry
from brainvq.qc import gated_brain
from brainvq.volumes import scan_volume, write_volume_file
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    settings = snakemake.params.preprocess
    brain, mask, reason = gated_brain(snakemake.input.brain, snakemake.input.mask, snakemake.params.raw,
                                      snakemake.params.qc, settings)
    result = scan_volume(brain, mask, settings, reason)
    attrs = {"spacing_mm": settings["spacing_mm"], **shard_geometry(settings), "source": snakemake.params.source,
             "config_hash": config_hash(settings), "box_vox": result["box"]}
    write_volume_file(snakemake.output[0], result, snakemake.wildcards.scan, snakemake.params.subject, attrs)
    if result["excluded_reason"]:
        log.warning("excluded at %s: %s", result["excluded_stage"], result["excluded_reason"])
    log.info("volume %s (z, y, x voxels of %g mm)", result["images"].shape[1:], settings["spacing_mm"])
