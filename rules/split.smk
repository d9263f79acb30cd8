# rules for stage 'split' (see docs/architecture.md)
