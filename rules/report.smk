# rules for stage 'report' (see docs/architecture.md): the self-contained HTML run report.


rule report:
    input:
        metrics=out("eval/metrics.json"),
        per_scan=out("eval/per_scan.csv"),
        figures=out("eval/figures.npz"),
        vqvae_history=out("vqvae/history.csv"),
        prior_history=out("prior/history.csv"),
        split=out("split.csv"),
        excluded=out("qc/excluded.csv"),
        samples_grid=out("samples/grid.png"),
        # The QC montage of every discovered scan; the report shows report.max_montages of them.
        montages=lambda wildcards: [
            out(f"qc/montage/{scan}.png") for scan in discovered_scans()
        ],
    output:
        html=report(
            out("report/index.html"),
            caption="../report/index.rst",
            category="Report",
        ),
        training_curves=report(
            out("report/figures/training_curves.png"),
            caption="../report/training_curves.rst",
            category="Training",
        ),
        reconstructions=report(
            out("report/figures/reconstructions.png"),
            caption="../report/reconstructions.rst",
            category="Reconstruction",
        ),
        ssim_distribution=report(
            out("report/figures/ssim_distribution.png"),
            caption="../report/ssim_distribution.rst",
            category="Reconstruction",
        ),
        codebook_usage=report(
            out("report/figures/codebook_usage.png"),
            caption="../report/codebook_usage.rst",
            category="Codebook",
        ),
        samples_vs_real=report(
            out("report/figures/samples_vs_real.png"),
            caption="../report/samples_vs_real.rst",
            category="Generation",
        ),
        sample_grid=report(
            out("report/figures/sample_grid.png"),
            caption="../report/sample_grid.rst",
            category="Generation",
        ),
        copies=report(
            out("report/figures/copies.png"),
            caption="../report/copies.rst",
            category="Generation",
        ),
        anomaly_maps=report(
            out("report/figures/anomaly_maps.png"),
            caption="../report/anomaly_maps.rst",
            category="Anomaly maps",
        ),
    log:
        out("logs/report.log"),
    benchmark:
        out("benchmarks/report.tsv")
    conda:
        "../envs/report.yaml"
    threads: 1
    params:
        # The whole config: the report prints it, so any change re-renders the report.
        config=config,
        attribution_html=SOURCE.attribution_html,
    script:
        "../workflow_scripts/report.py"
