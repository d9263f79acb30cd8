"""Snakemake adapter for rule `qc_montage`: one scan's slices file -> a PNG grid (or why it was excluded)."""

from brainvq.shards import scan_montage
from brainvq.workflow import logged

with logged(snakemake):  # noqa: F821 (snakemake is injected by the script directive)
    scan_montage(snakemake.input[0], snakemake.output[0], title=snakemake.wildcards.scan)
