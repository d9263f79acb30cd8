# brainvq: public brain T1 MRI -> VQ-VAE + PixelCNN prior, reproducibly.
# Default run: the offline demo cohort (config/config.yaml). See README.md.
# With apply.model set (config/apply.yaml) it applies a trained model to new scans instead of training.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"


if APPLY:

    include: "rules/preprocess.smk"
    include: "rules/apply.smk"

    rule all:
        default_target: True
        input:
            out("report/index.html"),

else:

    include: "rules/demo.smk"
    include: "rules/download.smk"
    include: "rules/preprocess.smk"
    include: "rules/split.smk"
    include: "rules/shards.smk"
    include: "rules/vqvae.smk"
    include: "rules/quantize.smk"


# Whole volumes (preprocess.dims 3) end with their own evaluate and report rules: the prior, the sampler and the
# model bundle are 2D.
if not APPLY and VOLUMES:

    include: "rules/volumes.smk"

    rule all:
        default_target: True
        input:
            out("report/index.html"),

elif not APPLY:

    include: "rules/prior.smk"
    include: "rules/sample.smk"
    include: "rules/evaluate.smk"
    include: "rules/report.smk"
    include: "rules/bundle.smk"

    rule all:
        default_target: True
        input:
            out("report/index.html"),
            out("model"),


# Every rule is defined now: ask for the rebuild of stage outputs that Snakemake would leave missing.
request_rebuilds()
