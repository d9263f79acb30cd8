# rules for stage 'download' (see docs/architecture.md): fetch a public dataset's archives and
# demographics sheet into resources/<dataset>/downloads/, verified and recorded in MANIFEST.tsv,
# then extract them into raw_root(), which the discovery checkpoint reads.
import re
import sys

from brainvq import acquire

if SOURCE in acquire.DATASETS:

    # Fails at parse time, before anything is downloaded, with the terms and the config line to add.
    acquire.require_terms_accepted(SOURCE, config)
    print(
        f"brainvq: {SOURCE} terms of use:\n{acquire.terms_text(SOURCE)}",
        file=sys.stderr,
    )

    DATASET_FILES = acquire.dataset_files(SOURCE, config)
    DOWNLOADS = f"{RESOURCES}/{SOURCE}/downloads"

    localrules:
        download,

    # Params hold only the expected checksums: a new mirror or retry setting must not
    # re-trigger a multi-GB download (the script reads those from snakemake.config).
    rule download:
        output:
            f"{DOWNLOADS}/{{file}}",
        log:
            f"{RESOURCES}/{SOURCE}/logs/download/{{file}}.log",
        wildcard_constraints:
            file="|".join(re.escape(remote.name) for remote in DATASET_FILES),
        conda:
            "../envs/preprocess.yaml"
        threads: 1
        params:
            dataset=SOURCE,
            md5=lambda w: acquire.dataset_file(SOURCE, w.file, config).md5,
            sha256=lambda w: acquire.dataset_file(SOURCE, w.file, config).sha256,
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
            f"{RESOURCES}/{SOURCE}/logs/extract.log",
        conda:
            "../envs/preprocess.yaml"
        threads: 1
        params:
            dataset=SOURCE,
        script:
            "../workflow_scripts/extract.py"
