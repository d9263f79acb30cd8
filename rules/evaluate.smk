# rules for stage 'evaluate' (see docs/architecture.md)
