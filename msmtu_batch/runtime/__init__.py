"""The runtime floor, beneath everything else: clusters, tiling, output safety and durable
writes, digests, store manifests, provenance, reporting, errors. It imports nothing of the
floors above it (checked by tests/test_layers.py)."""
