# rules for stage 'shards' (see docs/architecture.md): HDF5 shards per split, per-scan QC montages.


rule write_shards:
    input:
        split=out("split.csv"),
        slices=discovered_slice_files,
        rebuild=rebuild_request("write_shards"),
    output:
        directory(out("shards")),
    log:
        out("logs/write_shards.log"),
    benchmark:
        out("benchmarks/write_shards.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        preprocess=PREPROCESS,
        source=SOURCE.name,
    script:
        "../workflow_scripts/write_shards.py"


rule qc_montage:
    input:
        scan_items_file,
    output:
        out("qc/montage/{scan}.png"),
    log:
        out("logs/qc_montage/{scan}.log"),
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    script:
        "../workflow_scripts/qc_montage.py"
