"""Per-pixel preparation of time series for BRITS: gap-filled values, masks, deltas, scaling.

These are the plain NumPy definitions. The production pipeline runs Numba versions of the
same steps inside Dask; they are tested against these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def compute_deltas(masks: np.ndarray) -> np.ndarray:
    """BRITS time gaps per feature: 1 at the first step, else 1 + (1 - m[t-1]) * delta[t-1].

    ``masks`` is ``(..., time, feature)`` with 1 where observed; the result has its shape and
    counts, in steps, how long ago the feature was last observed (plus one).
    """
    masks = np.asarray(masks, dtype=np.float32)
    deltas = np.ones_like(masks)
    for t in range(1, masks.shape[-2]):
        deltas[..., t, :] = 1.0 + (1.0 - masks[..., t - 1, :]) * deltas[..., t - 1, :]
    return deltas


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean and standard deviation, estimated on training data only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, masks: np.ndarray | None = None) -> Standardizer:
        """Statistics over the last axis' features, using only observed entries."""
        flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
        weights = np.ones_like(flat) if masks is None else masks.reshape(flat.shape).astype(np.float64)
        count = np.maximum(weights.sum(axis=0), 1.0)
        mean = (flat * weights).sum(axis=0) / count
        var = (((flat - mean) ** 2) * weights).sum(axis=0) / count
        std = np.sqrt(var)
        return cls(mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32))

    def apply(self, values: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Standardised values; 0 where ``masks`` says missing (BRITS convention)."""
        out = (values - self.mean) / self.std
        return out if masks is None else np.where(masks > 0, out, 0.0).astype(np.float32)

    def invert(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean


def linear_interpolate_gaps(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Fill gaps of ``(n, time, feature)`` series by linear interpolation over time.

    Leading and trailing gaps take the nearest observation; a feature never observed in a
    series takes ``nan``. Vectorised over pixels: for each step, the previous and next
    observed step are found with cumulative maxima.
    """
    steps = values.shape[1]
    observed = masks > 0
    t = np.arange(steps)[None, :, None]
    prev_idx = np.maximum.accumulate(np.where(observed, t, -1), axis=1)
    next_idx = np.flip(np.minimum.accumulate(np.flip(np.where(observed, t, steps), axis=1), axis=1), axis=1)
    has_prev, has_next = prev_idx >= 0, next_idx < steps
    take = np.take_along_axis
    prev_val = take(values, np.clip(prev_idx, 0, steps - 1), axis=1)
    next_val = take(values, np.clip(next_idx, 0, steps - 1), axis=1)
    span = np.where(has_prev & has_next, next_idx - prev_idx, 1)
    weight = np.where(has_prev & has_next, (t - prev_idx) / np.maximum(span, 1), 0.0)
    filled = np.where(has_prev & has_next, prev_val + weight * (next_val - prev_val),
                      np.where(has_prev, prev_val, np.where(has_next, next_val, np.nan)))
    return np.where(observed, values, filled).astype(np.float32)


@dataclass(frozen=True)
class ModelInputs:
    """What BRITS consumes, as arrays: standardised values (0 at gaps), masks, deltas of
    both directions (backward ones on the time-reversed masks), standardised ancillary."""

    values: np.ndarray  # (n, T, F)
    masks: np.ndarray  # (n, T, F)
    deltas_forward: np.ndarray  # (n, T, F)
    deltas_backward: np.ndarray  # (n, T, F)
    ancillary: np.ndarray  # (n, A)

    def __len__(self) -> int:
        return len(self.values)


def prepare_inputs(values: np.ndarray, masks: np.ndarray, ancillary: np.ndarray,
                   bands: Standardizer, ancillary_stats: Standardizer | None) -> ModelInputs:
    """Reflectance series (n, T, F) with 0/1 masks plus raw ancillary (n, A) -> inputs."""
    masks = masks.astype(np.float32)
    scaled_ancillary = (ancillary_stats.apply(ancillary).astype(np.float32)
                        if ancillary_stats is not None and ancillary.shape[1]
                        else np.zeros((len(values), 0), np.float32))
    return ModelInputs(values=bands.apply(values, masks), masks=masks,
                       deltas_forward=compute_deltas(masks),
                       deltas_backward=compute_deltas(masks[:, ::-1]),
                       ancillary=scaled_ancillary)
