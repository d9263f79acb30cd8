# rules for stage 'prior' (see docs/architecture.md): a gated PixelCNN over the training code maps.


rule train_pixelcnn:
    input:
        codes=out("codes"),
        split=out("split.csv"),
        vqvae=out("vqvae/model.pt"),
    output:
        model=out("prior/model.pt"),
        history=out("prior/history.csv"),
    log:
        out("logs/train_pixelcnn.log"),
    benchmark:
        out("benchmarks/train_pixelcnn.tsv")
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        pixelcnn=config["pixelcnn"],
    script:
        "../workflow_scripts/train_pixelcnn.py"
