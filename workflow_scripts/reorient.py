"""Snakemake adapter for rule `reorient`: raw volume -> float32 RAS volume at isotropic spacing_mm."""

import nibabel as nib

from brainvq.io import load_volume, save_volume_atomic
from brainvq.preprocessing import reorient_to_ras, resample_isotropic
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    raw = load_volume(snakemake.input.volume, snakemake.params.orientation or None)
    ras = resample_isotropic(reorient_to_ras(raw), snakemake.params.spacing_mm)
    save_volume_atomic(ras, snakemake.output[0])
    log.info(
        "%s: %s %s -> RAS %s at %s mm",
        snakemake.wildcards.scan, "".join(nib.aff2axcodes(raw.affine)), raw.shape, ras.shape,
        snakemake.params.spacing_mm,
    )
