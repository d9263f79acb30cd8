# rules for whole volumes (preprocess.dims 3; see docs/architecture.md, "Whole volumes"): the 3D DAG ends
# with these evaluate and report rules, in place of rules/evaluate.smk and rules/report.smk. The PixelCNN
# prior and sampling model 2D code maps, so a 3D run has neither (the Snakefile leaves them out).


rule evaluate:
    input:
        split=out("split.csv"),
        shards=out("shards"),
        vqvae=out("vqvae/model.pt"),
        codes=out("codes"),
    output:
        metrics=report(
            out("eval/metrics.json"),
            caption="../report/metrics_volumes.rst",
            category="Evaluation",
        ),
        per_scan=report(
            out("eval/per_scan.csv"),
            caption="../report/per_scan_volumes.rst",
            category="Evaluation",
        ),
        figures=out("eval/figures.npz"),
    log:
        out("logs/evaluate.log"),
    benchmark:
        out("benchmarks/evaluate.tsv")
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        evaluate=config["evaluate"],
        bottleneck=config["vqvae"]["bottleneck"],
    script:
        "../workflow_scripts/evaluate_volumes.py"


rule report:
    input:
        metrics=out("eval/metrics.json"),
        per_scan=out("eval/per_scan.csv"),
        figures=out("eval/figures.npz"),
        vqvae_history=out("vqvae/history.csv"),
        split=out("split.csv"),
        excluded=out("qc/excluded.csv"),
        # The QC montage of every discovered scan; the report shows report.max_montages of them.
        montages=lambda wildcards: [
            out(f"qc/montage/{scan}.png") for scan in discovered_scans()
        ],
    output:
        html=report(
            out("report/index.html"),
            caption="../report/index_volumes.rst",
            category="Report",
        ),
        training_curves=report(
            out("report/figures/training_curves.png"),
            caption="../report/training_curves_volumes.rst",
            category="Training",
        ),
        reconstructions=report(
            out("report/figures/reconstructions.png"),
            caption="../report/reconstructions_volumes.rst",
            category="Reconstruction",
        ),
        ssim_distribution=report(
            out("report/figures/ssim_distribution.png"),
            caption="../report/ssim_distribution_volumes.rst",
            category="Reconstruction",
        ),
        codebook_usage=report(
            out("report/figures/codebook_usage.png"),
            caption="../report/codebook_usage.rst",
            category="Codebook",
        ),
        som_grid=report(
            out("report/figures/som_grid.png"),
            caption="../report/som_grid.rst",
            category="Codebook",
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
        "../workflow_scripts/report_volumes.py"
