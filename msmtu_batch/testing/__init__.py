"""Helpers for tests, examples and benchmarks: files written the way other tools write them."""
