# rules for stage 'vqvae' (see docs/architecture.md)
