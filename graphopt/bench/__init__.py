"""Benchmark and training harness (timing, memory, training loops, datasets, reports, plots)."""
