# rules for stage 'demo' (see docs/architecture.md)
