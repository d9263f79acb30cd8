"""Rule download: one archive or demographics sheet of a dataset into resources/<dataset>/downloads/."""

from brainvq.acquire import acquire_file
from brainvq.sources import get_source
from brainvq.workflow import logged

with logged(snakemake) as log:
    # URLs, mirror and retry settings come from the config itself (see rules/download.smk).
    config = snakemake.config
    path = acquire_file(
        get_source(snakemake.params.dataset), snakemake.wildcards.file, config, progress=config["download"]["progress"]
    )
    log.info("ready: %s", path)
