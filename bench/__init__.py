"""Benchmarks: speed and memory (never timed tests)."""
