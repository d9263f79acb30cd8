# rules for stage 'evaluate' (see docs/architecture.md): metrics on the test subjects only.


rule evaluate:
    input:
        split=out("split.csv"),
        shards=out("shards"),
        vqvae=out("vqvae/model.pt"),
        codes=out("codes"),
        prior=out("prior/model.pt"),
        samples=out("samples/samples.h5"),
    output:
        metrics=report(
            out("eval/metrics.json"),
            caption="../report/metrics.rst",
            category="Evaluation",
        ),
        per_scan=report(
            out("eval/per_scan.csv"),
            caption="../report/per_scan.rst",
            category="Evaluation",
        ),
        per_slice=out("eval/per_slice.csv"),
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
        # What evaluate.probe_target 'auto' means for this source.
        source_defaults=SOURCE.defaults,
    script:
        "../workflow_scripts/evaluate.py"
