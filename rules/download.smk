# rules for stage 'download' (see docs/architecture.md): fetch a public dataset's archives and
# demographics sheet (the source's download_plan) into resources/<dataset>/downloads/, verified
# and recorded in MANIFEST.tsv, then extract them into raw_root(), which the discovery checkpoint
# reads. The source's terms were checked at start-up (rules/common.smk).
import re

from brainvq import acquire

if SOURCE.kind == "download":

    DATASET_FILES = SOURCE.download_plan(config)
    DOWNLOADS = f"{RESOURCES}/{SOURCE.name}/downloads"

    localrules:
        download,

    # Params hold only the expected checksums: a new mirror or retry setting must not
    # re-trigger a multi-GB download (the script reads those from snakemake.config).
    rule download:
        output:
            f"{DOWNLOADS}/{{file}}",
        log:
            f"{RESOURCES}/{SOURCE.name}/logs/download/{{file}}.log",
        wildcard_constraints:
            file="|".join(re.escape(remote.name) for remote in DATASET_FILES),
        conda:
            "../envs/preprocess.yaml"
        threads: 1
        params:
            dataset=SOURCE.name,
            md5=lambda w: acquire.planned_file(SOURCE, w.file, config).md5,
            sha256=lambda w: acquire.planned_file(SOURCE, w.file, config).sha256,
        script:
            "../workflow_scripts/download.py"

    rule extract:
        input:
            archives=[
                f"{DOWNLOADS}/{remote.name}"
                for remote in DATASET_FILES
                if remote.kind == "archive"
            ],
            demographics=[
                f"{DOWNLOADS}/{remote.name}"
                for remote in DATASET_FILES
                if remote.kind == "demographics"
            ],
        output:
            directory(raw_root()),
        log:
            f"{RESOURCES}/{SOURCE.name}/logs/extract.log",
        conda:
            "../envs/preprocess.yaml"
        threads: 1
        params:
            dataset=SOURCE.name,
        script:
            "../workflow_scripts/extract.py"
