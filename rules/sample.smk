# rules for stage 'sample' (see docs/architecture.md)
