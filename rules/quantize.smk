# rules for stage 'quantize' (see docs/architecture.md)
