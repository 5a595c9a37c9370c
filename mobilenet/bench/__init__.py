"""Throughput, per-layer timing and input-pipeline benchmarks on synthetic batches."""
