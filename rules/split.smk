# rules for stage 'split' (see docs/architecture.md): subject-level train/test split.
from brainvq.data import stratify_column


rule split:
    input:
        subjects=out("subjects.tsv"),
        participants=out("participants.tsv"),
        excluded=out("qc/excluded_inputs.csv"),
        slices=discovered_slice_files,
        rebuild=rebuild_request("split"),
    output:
        split=out("split.csv"),
        excluded=out("qc/excluded.csv"),
    log:
        out("logs/split.log"),
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        split={
            **config["split"],
            "stratify": stratify_column(config["split"], SOURCE.defaults),
        },
    script:
        "../workflow_scripts/split.py"
