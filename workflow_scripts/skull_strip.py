"""Snakemake adapter for rule `skull_strip`: RAS volume -> brain (or head) volume + uint8 mask, optional N4."""

import nibabel as nib
import numpy as np

from brainvq.io import load_volume, save_volume_atomic
from brainvq.preprocessing import EmptyMaskError, mask_image, mask_on_grid, n4_bias_correct, skull_strip
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    params = snakemake.params
    ras = nib.load(snakemake.input.ras)
    precomputed = None
    if "precomputed_mask" in snakemake.input.keys():
        # The mask file found beside the raw volume: read with the volume's orientation, onto the RAS grid.
        precomputed = mask_on_grid(load_volume(snakemake.input.precomputed_mask, params.orientation or None), ras)
        log.info("%s: precomputed mask %s", snakemake.wildcards.scan, snakemake.input.precomputed_mask)
    try:
        brain, mask = skull_strip(
            ras, params.method,
            bet_fractional_threshold=params.bet_fractional_threshold, bet_iterations=params.bet_iterations,
            precomputed_mask=precomputed,
        )
    except EmptyMaskError as error:
        if params.on_error != "skip":
            raise
        # on_error: skip: an empty mask marks the scan; slice_volume then excludes it with a reason.
        log.warning("%s: %s; writing an empty mask so slice_volume excludes it", snakemake.wildcards.scan, error)
        brain, mask = ras, mask_image(np.zeros(ras.shape, bool), ras.affine)
    else:
        if params.n4:
            brain = n4_bias_correct(brain, mask)
    save_volume_atomic(mask, snakemake.output.mask)
    save_volume_atomic(brain, snakemake.output.brain)
    log.info("%s: skull_strip=%s n4=%s, %d mask voxels", snakemake.wildcards.scan, params.method, params.n4,
             int(np.asarray(mask.dataobj).sum()))
