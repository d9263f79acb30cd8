# rules for stage 'sample' (see docs/architecture.md): code maps from the prior, decoded by the VQ-VAE.


rule sample:
    input:
        prior=out("prior/model.pt"),
        vqvae=out("vqvae/model.pt"),
    output:
        samples=out("samples/samples.h5"),
        grid=out("samples/grid.png"),
    log:
        out("logs/sample.log"),
    benchmark:
        out("benchmarks/sample.tsv")
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        sample=config["sample"],
    script:
        "../workflow_scripts/sample.py"
