# rules for stage 'prior' (see docs/architecture.md)
