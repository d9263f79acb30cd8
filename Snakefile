# brainvq: public brain T1 MRI -> VQ-VAE + PixelCNN prior, reproducibly.
# Default run: the offline demo cohort (config/config.yaml). See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/download.smk"
include: "rules/preprocess.smk"
include: "rules/split.smk"
include: "rules/shards.smk"
include: "rules/vqvae.smk"
include: "rules/quantize.smk"
include: "rules/prior.smk"
include: "rules/sample.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        out("report/index.html"),


# Every rule is defined now: ask for the rebuild of stage outputs that Snakemake would leave missing.
request_rebuilds()
