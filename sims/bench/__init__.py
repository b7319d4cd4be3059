"""Benchmark scripts (`python -m sims.bench.<name>`) and the sweep framework they share."""
