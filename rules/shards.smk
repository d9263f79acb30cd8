# rules for stage 'shards' (see docs/architecture.md)
