# rules for stage 'bundle' (see docs/architecture.md): the trained models with what using them needs
# (preprocessing settings, test metrics, package versions, checksums), for brainvq.load_model and apply.


rule bundle_model:
    input:
        vqvae=out("vqvae/model.pt"),
        prior=out("prior/model.pt"),
        metrics=out("eval/metrics.json"),
        split=out("split.csv"),
    output:
        directory(out("model")),
    log:
        out("logs/bundle_model.log"),
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        run=RUN,
        source=SOURCE.name,
        attribution_html=SOURCE.attribution_html,
        preprocess=PREPROCESS,
        anomaly_smoothing_fraction=config["evaluate"]["anomaly_smoothing_fraction"],
    script:
        "../workflow_scripts/bundle_model.py"
