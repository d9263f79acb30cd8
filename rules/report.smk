# rules for stage 'report' (see docs/architecture.md)
