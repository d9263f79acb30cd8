"""Snakemake adapter for rule `cut_volume`: brain volume + mask -> the whole normalised volume (volumes/{scan}.h5)."""

import nibabel as nib
import numpy as np

from brainvq.config import config_hash
from brainvq.preprocessing import shard_geometry
from brainvq.qc import Thresholds, skull_strip_problem
from brainvq.volumes import scan_volume, write_volume_file
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    settings = snakemake.params.preprocess
    brain = nib.load(snakemake.input.brain).get_fdata(dtype=np.float32)
    mask_img = nib.load(snakemake.input.mask)
    mask = np.asarray(mask_img.dataobj) > 0
    # The QC gate after skull stripping, as for slices: a mask far below an adult size stops the run or leaves
    # the scan out.
    limits = Thresholds.from_config(snakemake.params.qc)
    reason = skull_strip_problem(mask, mask_img.affine, snakemake.params.raw, limits, settings["skull_strip"],
                                 settings["on_error"])
    result = scan_volume(brain, mask, settings, reason)
    attrs = {"spacing_mm": settings["spacing_mm"], **shard_geometry(settings), "source": snakemake.params.source,
             "config_hash": config_hash(settings), "box_vox": result["box"]}
    write_volume_file(snakemake.output[0], result, snakemake.wildcards.scan, snakemake.params.subject, attrs)
    if result["excluded_reason"]:
        log.warning("excluded at %s: %s", result["excluded_stage"], result["excluded_reason"])
    log.info("volume %s (z, y, x voxels of %g mm)", result["images"].shape[1:], settings["spacing_mm"])
