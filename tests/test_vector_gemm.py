"""The fp32 engine's product by 16-float vectors against NumPy, on random shapes and values (any CPU:
without AVX-512 LLVM splits the vectors)."""

from __future__ import annotations

import numba
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msmtu_batch.model.vector_gemm import PIXELS, ROWS, pack_weight, vector_product


@numba.njit
def _product(packed, k_count, x, n_rows):
    product = np.full((packed.shape[0] * ROWS, x.shape[1]), np.float32(np.nan))
    vector_product(packed, k_count, x, product)
    return product[:n_rows]


@settings(max_examples=40, deadline=None)
@given(n_rows=st.integers(1, 40), k=st.integers(1, 130), used=st.integers(0, 130), blocks=st.integers(1, 4),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_the_vector_product_sums_each_term_in_order_with_one_rounding(n_rows, k, used, blocks, scale, seed):
    """Every shape the engine gives it (rows padded to 12, pixels in multiples of 32, any number of
    the sum's terms, none included): each output is the terms' sum, added in order of k with a
    fused multiply-add each. The reference rounds each step once to float32 from x87's 80-bit
    long double, in which the product is exact; its own rounding of the sum could move a result
    across a float32 midpoint about once in 2^40 steps, so the comparison is exact."""
    used = min(used, k)
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((n_rows, k)) * scale).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((k, PIXELS * blocks)).astype(np.float32)).contiguous().numpy()
    got = _product(pack_weight(weight), used, x, n_rows)
    expected = np.zeros((n_rows, x.shape[1]), np.float32)
    wide = np.longdouble
    for term in range(used):
        expected = (weight[:, term:term + 1].astype(wide) * x[term].astype(wide) + expected.astype(wide)).astype(
            np.float32)
    np.testing.assert_array_equal(got, expected)
