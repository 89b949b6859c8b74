"""Synthetic data: the simulated Andalusia-like region."""
