"""The Numba chunk kernel against the plain NumPy definitions, on random inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msmtu_batch.inputs.ancillary import slope_degrees
from msmtu_batch.inputs.cube import REFLECTANCE_FILL, REFLECTANCE_SCALE, observed_mask
from msmtu_batch.model.kernels import prepare_chunk
from msmtu_batch.model.preprocess import Standardizer, prepare_inputs


def pixel_major(a: np.ndarray) -> np.ndarray:
    """(T, B, y, x) -> (y * x, T, B)."""
    return a.transpose(2, 3, 0, 1).reshape(-1, a.shape[0], a.shape[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), height=st.integers(1, 9), width=st.integers(1, 9),
       steps=st.integers(1, 12), n_ancillary=st.integers(0, 4), with_qa=st.booleans())
def test_kernel_matches_numpy_reference(seed, height, width, steps, n_ancillary, with_qa):
    rng = np.random.default_rng(seed)
    refl = rng.integers(-300, 17000, size=(steps, 7, height, width)).astype(np.int16)
    refl[rng.random(refl.shape) < 0.2] = REFLECTANCE_FILL
    qa = rng.integers(0, 2**16, size=(steps, height, width)).astype(np.uint16) if with_qa else None
    if with_qa:  # plenty of clear months too: clear cloud state and no shadow/snow bits
        clear = rng.random(qa.shape) < 0.5
        qa[clear] &= np.uint16(~(0b111 | (1 << 12) | (1 << 15)) & 0xFFFF)
    ancillary = rng.normal(size=(n_ancillary, height, width)).astype(np.float32)
    bands = Standardizer(rng.random(7).astype(np.float32), rng.random(7).astype(np.float32) + 0.5)
    anc_stats = Standardizer(rng.random(n_ancillary).astype(np.float32),
                             rng.random(n_ancillary).astype(np.float32) + 0.5) if n_ancillary else None

    got, observed = prepare_chunk(refl, qa, ancillary, bands, anc_stats)

    usable = pixel_major(observed_mask(refl, qa)).astype(np.float32)
    scaled = pixel_major(np.where(observed_mask(refl, qa), refl * np.float32(REFLECTANCE_SCALE), 0.0))
    anc_pixels = ancillary.reshape(n_ancillary, height * width).T
    want = prepare_inputs(scaled.astype(np.float32), usable, anc_pixels, bands, anc_stats)
    np.testing.assert_array_equal(got.masks, want.masks)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.deltas_forward, want.deltas_forward)
    np.testing.assert_array_equal(got.deltas_backward, want.deltas_backward)
    np.testing.assert_allclose(got.ancillary, want.ancillary, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(observed, usable.sum(axis=(1, 2)))


def test_kernel_on_a_simulated_chunk(cube):
    refl = cube["reflectance"].values[:, :, :16, :20]
    qa = cube["state_qa"].values[:, :16, :20]
    bands = Standardizer(np.full(7, 0.2, np.float32), np.full(7, 0.1, np.float32))
    got, observed = prepare_chunk(refl, qa, np.zeros((0, 16, 20), np.float32), bands, None)
    assert got.values.shape == (320, 12, 7) and got.ancillary.shape == (320, 0)
    row, col = 7, 11
    mask = observed_mask(refl[:, :, row, col], qa[:, row, col])
    np.testing.assert_array_equal(got.masks[row * 20 + col], mask)
    assert observed[row * 20 + col] == mask.sum()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), height=st.integers(2, 9), width=st.integers(2, 9), gaps=st.booleans())
def test_slope_kernel_matches_numpy_gradient(seed, height, width, gaps):
    rng = np.random.default_rng(seed)
    elevation = rng.uniform(-50, 3500, size=(height, width)).astype(np.float32)
    if gaps:
        elevation[rng.random(elevation.shape) < 0.2] = np.nan
    dx, dy = rng.uniform(20, 1000, height), rng.uniform(20, 1000, height)
    dz_row, dz_col = np.gradient(elevation.astype(np.float64))  # central inside, one-sided at the edges
    want = np.degrees(np.arctan(np.hypot(dz_col / dx[:, None], dz_row / dy[:, None])))
    got = slope_degrees(elevation, dx, dy)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    into = np.full((height, width), -1, np.float32)
    assert slope_degrees(elevation, dx, dy, out=into) is into
    np.testing.assert_array_equal(into, got)
