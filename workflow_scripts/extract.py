"""Rule extract: every archive of a dataset into raw_root(), its demographics sheet alongside."""

from brainvq.acquire import extract_dataset
from brainvq.workflow import logged

with logged(snakemake) as log:
    files = extract_dataset(list(snakemake.input.archives), snakemake.input.demographics[0], snakemake.output[0])
    log.info("%s: %d files in %s", snakemake.params.dataset, len(files), snakemake.output[0])
