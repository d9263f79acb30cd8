# rules for stage 'apply' (see docs/architecture.md): a trained model on new scans (apply.model set).
# Discovery, reorientation and skull stripping are the preprocess rules, run with the bundle's settings.
rule apply_scan:
    input:
        unpack(raw_volume_files),
        brain=out("brain/{scan}.nii.gz"),
        mask=out("brain/{scan}_mask.nii.gz"),
        bundle=BUNDLE_FILES,
    output:
        codes=out("codes/{scan}.npy"),
        recon=out("recon/{scan}.nii.gz"),
        anomaly=out("anomaly/{scan}.nii.gz"),
        summary=out("scans/{scan}.json"),
        figure=out("figures/{scan}.npz"),
    log:
        out("logs/apply_scan/{scan}.log"),
    benchmark:
        out("benchmarks/apply_scan/{scan}.tsv")
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        orientation=lambda wildcards: scan_info(wildcards.scan)["orientation"],
        subject=lambda wildcards: scan_info(wildcards.scan)["subject"],
        session=lambda wildcards: scan_info(wildcards.scan)["session"],
        device=config["apply"]["device"],
        batch_size=config["apply"]["batch_size"],
        qc=config["qc"],
        on_error=config["preprocess"]["on_error"],
    script:
        "../workflow_scripts/apply_scan.py"


rule apply_metrics:
    input:
        summaries=applied_files("scans", ".json"),
        codes=applied_files("codes", ".npy"),
        participants=out("participants.tsv"),
        bundle=BUNDLE_FILES[0],
    output:
        metrics=out("metrics.json"),
        per_scan=out("per_scan.csv"),
        index=out("codes/index.csv"),
    log:
        out("logs/apply_metrics.log"),
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        about={
            "name": config["apply"]["name"],
            "model": config["apply"]["model"],
            "input_source": SOURCE.name,
            "input_folder": str(RAW_ROOT),
        },
        probe_target=config["apply"]["probe_target"],
        evaluate=config["evaluate"],
    script:
        "../workflow_scripts/apply_metrics.py"


rule apply_report:
    input:
        metrics=out("metrics.json"),
        per_scan=out("per_scan.csv"),
        figures=applied_files("figures", ".npz"),
        excluded=out("qc/excluded_inputs.csv"),
        bundle=BUNDLE_FILES[0],
    output:
        html=out("report/index.html"),
    log:
        out("logs/apply_report.log"),
    conda:
        "../envs/report.yaml"
    threads: 1
    params:
        attribution_html=SOURCE.attribution_html,
        report=config["report"],
        examples=config["apply"]["report_examples"],
    script:
        "../workflow_scripts/apply_report.py"
