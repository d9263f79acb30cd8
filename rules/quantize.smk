# rules for stage 'quantize' (see docs/architecture.md): the trained model's codes of every scan.


rule quantize:
    input:
        model=out("vqvae/model.pt"),
        shards=out("shards"),
        split=out("split.csv"),
    output:
        directory(out("codes")),
    log:
        out("logs/quantize.log"),
    benchmark:
        out("benchmarks/quantize.tsv")
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        batch_size=config["vqvae"]["eval_batch_size"],
        workers=config["vqvae"]["workers"],
        device=config["vqvae"]["device"],
    script:
        "../workflow_scripts/quantize.py"
