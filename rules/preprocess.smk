# rules for stage 'preprocess' (see docs/architecture.md)
