"""The model: BRITS, chunk preparation (Numba), the fused CPU inference engine, the artifact, training."""
