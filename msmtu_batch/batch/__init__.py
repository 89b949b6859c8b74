"""Batch production: the distributed resumable pipeline, clusters, tiling, output safety, the yearly workflow."""
