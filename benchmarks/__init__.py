"""Benchmarks of the brainvq stages (run as modules: python -m benchmarks.<name>)."""
