# rules for stage 'vqvae' (see docs/architecture.md): train the slice autoencoder on the shards.
# Checkpoints live in vqvae/checkpoints/, which is not an output: Snakemake must not delete it when a
# run is killed, so that rerunning the rule resumes from vqvae/checkpoints/last.pt.


rule train_vqvae:
    input:
        shards=out("shards"),
        split=out("split.csv"),
    output:
        model=out("vqvae/model.pt"),
        history=out("vqvae/history.csv"),
    log:
        out("logs/train_vqvae.log"),
    benchmark:
        out("benchmarks/train_vqvae.tsv")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        gpu=config["vqvae"]["gpus"],
    params:
        vqvae=config["vqvae"],
    script:
        "../workflow_scripts/train_vqvae.py"
