"""Metrics, the dense two-tower baseline and the evaluation CLI."""
