"""Comparing runs: evaluation tables and plots, sweeps."""
