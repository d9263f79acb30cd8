"""Snakemake adapter for checkpoint `discover_subjects`: raw folder -> subjects.tsv, participants.tsv, excluded inputs."""

from brainvq.files import write_table_atomic
from brainvq.io import discover_scans_with_exclusions
from brainvq.sources import get_source
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    source, raw_root = get_source(snakemake.params.source), snakemake.input.raw
    scans, excluded = discover_scans_with_exclusions(source, raw_root, snakemake.config, threads=snakemake.threads)
    participants = source.participants(raw_root, snakemake.params.settings, scans)
    write_table_atomic(excluded, snakemake.output.excluded)
    write_table_atomic(participants, snakemake.output.participants, sep="\t")
    write_table_atomic(scans, snakemake.output.subjects, sep="\t")
    log.info(
        "discovered %d scans of %d subjects in %s (%d inputs excluded)",
        len(scans), scans["subject"].nunique(), raw_root, len(excluded),
    )
