"""Snakemake adapter for rule `split`: subject-level train/test split and the exclusion table."""

from pathlib import Path

from brainvq.data import make_split
from brainvq.files import write_table_atomic
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    slice_files = {Path(path).stem: path for path in snakemake.input.slices}
    table, excluded = make_split(
        snakemake.input.subjects,
        snakemake.input.participants,
        snakemake.input.excluded,
        slice_files,
        snakemake.params.split,
    )
    write_table_atomic(excluded, snakemake.output.excluded)
    write_table_atomic(table, snakemake.output.split)
    counts = table.groupby("split")["subject"].nunique().to_dict()
    log.info(
        "split %d scans: %s subjects; %d validation subjects; %d scans excluded",
        len(table), counts, table.loc[table["validation"], "subject"].nunique(), len(excluded),
    )
