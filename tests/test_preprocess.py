"""Deltas, standardisation and gap filling against hand-computed and np.interp references."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from msmtu_batch.model.preprocess import Standardizer, compute_deltas, linear_interpolate_gaps


def test_deltas_match_a_hand_computed_example():
    # one feature observed at steps 0, 3 and 4 of six: delta counts steps since the last
    # observation before t, so it is 1 right after an observed step
    masks = np.array([1, 0, 0, 1, 1, 0], np.float32)[None, :, None]
    expected = np.array([1, 1, 2, 3, 1, 1], np.float32)[None, :, None]
    np.testing.assert_array_equal(compute_deltas(masks), expected)
    # leading gap: the first step is 1 whatever its mask, then gaps accumulate
    masks = np.array([[0, 1], [0, 1], [1, 0], [0, 1]], np.float32)
    np.testing.assert_array_equal(compute_deltas(masks), [[1, 1], [2, 1], [3, 1], [1, 2]])


def test_standardizer_ignores_missing_entries():
    values = np.array([[[1.0, 10.0]], [[3.0, 0.0]], [[99.0, 30.0]]], np.float32)  # (3, 1, 2)
    masks = np.array([[[1, 1]], [[1, 0]], [[0, 1]]], np.float32)
    stats = Standardizer.fit(values, masks)
    np.testing.assert_allclose(stats.mean, [2.0, 20.0])
    np.testing.assert_allclose(stats.std, [1.0, 10.0])
    scaled = stats.apply(values, masks)
    np.testing.assert_allclose(scaled[:, 0], [[-1, -1], [1, 0], [0, 1]])
    np.testing.assert_allclose(stats.invert(stats.apply(values)), values, rtol=1e-6)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), steps=st.integers(1, 12), features=st.integers(1, 4))
def test_linear_gap_filling_matches_np_interp(data, n, steps, features):
    values = data.draw(arrays(np.float32, (n, steps, features),
                              elements=st.floats(-1, 1, width=32, allow_nan=False)))
    masks = data.draw(arrays(np.float32, (n, steps, features), elements=st.sampled_from([0.0, 1.0])))
    filled = linear_interpolate_gaps(values, masks)
    for i in range(n):
        for f in range(features):
            seen = masks[i, :, f] > 0
            if not seen.any():
                assert np.isnan(filled[i, :, f]).all()
                continue
            expected = np.interp(np.arange(steps), np.flatnonzero(seen), values[i, seen, f])
            np.testing.assert_allclose(filled[i, :, f], expected, atol=1e-5)
