"""Numba kernels for the per-pixel preparation of a cube chunk (run on Dask CPU workers).

One fused pass over a chunk turns raw int16 reflectance and StateQA into what BRITS
consumes, pixel-major: the gap mask (fill value, MOD09A1 valid range, cloudy / mixed
cloud / cloud shadow / snow bits), standardised values with 0 at gaps, the forward and
backward BRITS deltas, and standardised ancillary values. Compiled once per process and
cached on disk (``cache=True``), parallel over pixels, and free of the GIL so Dask threads
run it concurrently. The plain NumPy definitions are :func:`msmtu_batch.inputs.cube.observed_mask`
and :func:`msmtu_batch.model.preprocess.prepare_inputs`; the tests hold the kernel to them.
"""

from __future__ import annotations

import numba
import numpy as np

from msmtu_batch.inputs.layers import (
    QA_CLOUD_STATE_MASK,
    QA_CLOUDY,
    QA_MIXED_CLOUD,
    QA_REJECT_BITS,
    REFLECTANCE_FILL,
    REFLECTANCE_SCALE,
    REFLECTANCE_VALID_RANGE,
)
from msmtu_batch.model.preprocess import ModelInputs, Standardizer

_LOW, _HIGH = REFLECTANCE_VALID_RANGE


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=False)
def _prepare_chunk(reflectance, state_qa, has_qa, band_mean, band_std, ancillary, ancillary_mean,
                   ancillary_std, values, masks, deltas_forward, deltas_backward, ancillary_out,
                   observed_count):
    # row by row, each input plane read along its row (contiguous): pixel by pixel walked the
    # T x B planes at once, 84 streams, and took 40 ms a 256 x 256 chunk where this takes 35
    # (one thread, benchmarks/NOTES.md, 2026-12-07); a row's outputs (4 x 86 KB for 256
    # pixels) stay in L2 until the deltas read them
    steps, bands, height, width = reflectance.shape
    n_ancillary = ancillary.shape[0]
    for row in numba.prange(height):
        first = row * width
        rejected = np.zeros(width, np.bool_)
        count = np.zeros(width, np.int32)
        for t in range(steps):
            if has_qa:
                for col in range(width):
                    qa = state_qa[t, row, col]
                    cloud = qa & QA_CLOUD_STATE_MASK
                    rejected[col] = cloud in (QA_CLOUDY, QA_MIXED_CLOUD) or (qa & QA_REJECT_BITS) != 0
            for b in range(bands):
                for col in range(width):
                    pixel = first + col
                    raw = reflectance[t, b, row, col]
                    usable = (not rejected[col]) and raw != REFLECTANCE_FILL and raw >= _LOW and raw <= _HIGH
                    if usable:
                        masks[pixel, t, b] = 1.0
                        scaled = np.float32(raw) * np.float32(REFLECTANCE_SCALE)
                        values[pixel, t, b] = (scaled - band_mean[b]) / band_std[b]
                        count[col] += 1
                    else:
                        masks[pixel, t, b] = 0.0
                        values[pixel, t, b] = 0.0
        for col in range(width):
            pixel = first + col
            observed_count[pixel] = count[col]
            for b in range(bands):
                deltas_forward[pixel, 0, b] = 1.0
                deltas_backward[pixel, 0, b] = 1.0
            # the bands inside: each step's 7 deltas are independent and contiguous, where a band's
            # 12 steps are a chain of dependent products (23 against 32 ms a chunk, one thread)
            for t in range(1, steps):
                for b in range(bands):
                    deltas_forward[pixel, t, b] = 1.0 + (1.0 - masks[pixel, t - 1, b]) * deltas_forward[pixel, t - 1, b]
                    # the backward pass reads the series reversed: its step t is time steps-1-t
                    deltas_backward[pixel, t, b] = 1.0 + (1.0 - masks[pixel, steps - t, b]) * \
                        deltas_backward[pixel, t - 1, b]
            for a in range(n_ancillary):
                ancillary_out[pixel, a] = (ancillary[a, row, col] - ancillary_mean[a]) / ancillary_std[a]


def prepare_chunk(reflectance: np.ndarray, state_qa: np.ndarray | None, ancillary: np.ndarray,
                  band_stats: Standardizer, ancillary_stats: Standardizer | None
                  ) -> tuple[ModelInputs, np.ndarray]:
    """Model inputs for every pixel of a chunk (row-major) and each pixel's count of usable values.

    ``reflectance`` is (T, B, y, x) int16 as stored, ``state_qa`` (T, y, x) uint16 or None,
    ``ancillary`` (A, y, x) float32 in the model's variable order.
    """
    steps, bands, height, width = reflectance.shape
    n = height * width
    n_ancillary = ancillary.shape[0]
    shape = (n, steps, bands)
    values, masks = np.empty(shape, np.float32), np.empty(shape, np.float32)
    deltas_forward, deltas_backward = np.empty(shape, np.float32), np.empty(shape, np.float32)
    ancillary_out = np.empty((n, n_ancillary), np.float32)
    observed = np.empty(n, np.int32)
    qa = state_qa if state_qa is not None else np.zeros((steps, height, width), np.uint16)
    if ancillary_stats is None:
        ancillary_stats = Standardizer(np.zeros(n_ancillary, np.float32), np.ones(n_ancillary, np.float32))
    _prepare_chunk(np.ascontiguousarray(reflectance, dtype=np.int16), np.ascontiguousarray(qa, dtype=np.uint16),
                   state_qa is not None, band_stats.mean.astype(np.float32), band_stats.std.astype(np.float32),
                   np.ascontiguousarray(ancillary, dtype=np.float32), ancillary_stats.mean.astype(np.float32),
                   ancillary_stats.std.astype(np.float32), values, masks, deltas_forward, deltas_backward,
                   ancillary_out, observed)
    return ModelInputs(values, masks, deltas_forward, deltas_backward, ancillary_out), observed
