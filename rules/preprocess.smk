# Stage 'preprocess' (see docs/architecture.md): discover the raw volumes, then per scan
# reorient to RAS at spacing_mm, skull strip (+ optional N4), and cut normalised axial slices
# (or, with preprocess.dims 3, the whole normalised volume in a fixed box).
checkpoint discover_subjects:
    input:
        raw=raw_root(),
        rebuild=rebuild_request("discover_subjects"),
    output:
        subjects=out("subjects.tsv"),
        participants=out("participants.tsv"),
        excluded=out("qc/excluded_inputs.csv"),
    log:
        out("logs/discover_subjects.log"),
    benchmark:
        out("benchmarks/discover_subjects.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 2
    params:
        source=SOURCE.name,
        on_error=PREPROCESS["on_error"],
        qc=config["qc"],
        # Exactly what the source's discovery reads: an unrelated edit does not redo discovery.
        settings=SOURCE.discovery_settings(config),
    script:
        "../workflow_scripts/discover_subjects.py"


rule reorient:
    input:
        unpack(raw_volume_files),
    output:
        out("ras/{scan}.nii.gz"),
    log:
        out("logs/reorient/{scan}.log"),
    benchmark:
        out("benchmarks/reorient/{scan}.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        orientation=lambda wildcards: scan_info(wildcards.scan)["orientation"],
        spacing_mm=PREPROCESS["spacing_mm"],
    script:
        "../workflow_scripts/reorient.py"


rule skull_strip:
    input:
        unpack(skull_strip_files),
    output:
        brain=out("brain/{scan}.nii.gz"),
        mask=out("brain/{scan}_mask.nii.gz"),
    log:
        out("logs/skull_strip/{scan}.log"),
    benchmark:
        out("benchmarks/skull_strip/{scan}.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        method=PREPROCESS["skull_strip"],
        n4=PREPROCESS["n4"],
        bet_fractional_threshold=PREPROCESS["bet_fractional_threshold"],
        bet_iterations=PREPROCESS["bet_iterations"],
        on_error=PREPROCESS["on_error"],
        # A precomputed mask file is read as its volume is (Analyze headers carry no orientation).
        orientation=lambda wildcards: scan_info(wildcards.scan)["orientation"],
    script:
        "../workflow_scripts/skull_strip.py"


rule slice_volume:
    input:
        unpack(brain_files),
    output:
        out("slices/{scan}.h5"),
    log:
        out("logs/slice_volume/{scan}.log"),
    benchmark:
        out("benchmarks/slice_volume/{scan}.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        subject=lambda wildcards: scan_info(wildcards.scan)["subject"],
        raw=lambda wildcards: scan_info(wildcards.scan)["path"],
        qc=config["qc"],
        source=SOURCE.name,
        # The whole section: its hash is stored in the file (config_hash), so any change reruns.
        preprocess=PREPROCESS,
    script:
        "../workflow_scripts/slice_volume.py"


rule cut_volume:
    input:
        unpack(brain_files),
    output:
        out("volumes/{scan}.h5"),
    log:
        out("logs/cut_volume/{scan}.log"),
    benchmark:
        out("benchmarks/cut_volume/{scan}.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        subject=lambda wildcards: scan_info(wildcards.scan)["subject"],
        raw=lambda wildcards: scan_info(wildcards.scan)["path"],
        qc=config["qc"],
        source=SOURCE.name,
        # The whole section: its hash is stored in the file (config_hash), so any change reruns.
        preprocess=PREPROCESS,
    script:
        "../workflow_scripts/cut_volume.py"
