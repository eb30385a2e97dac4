"""Experiments behind docs/results.md and the README: python -m experiments.toy_seeds, ..."""
