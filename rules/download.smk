# rules for stage 'download' (see docs/architecture.md)
