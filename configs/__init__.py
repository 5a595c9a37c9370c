"""Experiment configs: one get_config() per file (see each docstring for the command, result and cost)."""
