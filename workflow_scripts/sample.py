"""Snakemake adapter for rule `sample`: prior + VQ-VAE decoder -> samples/samples.h5, samples/grid.png."""

import torch

from brainvq.prior import load_prior
from brainvq.runtime import select_device
from brainvq.sampling import (
    decode_codes,
    sample_codes,
    sample_labels,
    sample_plan,
    save_sample_grid,
    write_samples,
)
from brainvq.training import load_vqvae
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    torch.set_num_threads(snakemake.threads)
    settings = snakemake.params.sample
    device = select_device(settings["device"])
    prior = load_prior(snakemake.input.prior, device)
    labels = sample_labels(prior, settings["labels"])
    positions, map_labels = sample_plan(settings["n"], settings["positions"], labels)
    codes = sample_codes(prior, positions, map_labels, settings["temperature"], settings["seed"],
                         settings["batch_size"], device, settings["top_p"], settings["amp"])
    images = decode_codes(load_vqvae(snakemake.input.vqvae, device), codes, settings["batch_size"], device,
                          settings["amp"])
    log.info("sampled %d maps %s, decoded to %s", len(codes), tuple(codes.shape[1:]), images.shape[1:])
    write_samples(snakemake.output.samples, codes.numpy(), images, positions, map_labels,
                  attrs={"temperature": settings["temperature"], "top_p": settings["top_p"], "seed": settings["seed"],
                         "condition_label": prior.condition_label or ""})
    save_sample_grid(snakemake.output.grid, images, positions, map_labels, settings["grid_columns"])
