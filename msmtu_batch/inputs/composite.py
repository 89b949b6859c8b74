"""Monthly compositing: 8-day (or monthly) observations -> 12 monthly values per band.

An observation of a pixel is *clear* when

- its StateQA does not say cloudy or mixed cloud (bits 0-1 = 01 or 10), cloud shadow
  (bit 2), MOD35 snow/ice (bit 12) or internal snow (bit 15) -- :func:`msmtu_batch.inputs.cube.qa_rejected`;
- all seven bands hold a value in the MOD09A1 valid range (-100..16000, not the fill);
- its day of year is valid (1..366) and falls in the requested year.

Each observation goes to the month of its *actual* acquisition day (the
``sur_refl_day_of_year`` layer), not of its composite's start: a composite starting on
29 January can hold February days. A day of year smaller than the composite's starting day
belongs to the next year (the composite starting on 27 December holds 1-3 January), so the
previous year's last composite contributes to January. Without a day-of-year layer, every
pixel takes the date of its file.

The composite of a month is computed per band from its clear observations only, by the
chosen rule, and rounded to the nearest integer (halves to even):

- ``median`` (default): the median of the clear observations (mean of the middle two when
  their number is even) -- robust to residual clouds and shadows the QA missed;
- ``mean``: their mean;
- ``max_ndvi``: all bands of the clear observation with the largest NDVI
  ((nir1 - red) / (nir1 + red)), the classical maximum-value composite (first on ties).

A month without a clear observation is the fill value (-28672), never zero. The number of
clear observations of each month is returned alongside.

:func:`composite_months` runs a Numba kernel, parallel over pixels (about 30x the NumPy
definition, :func:`composite_months_numpy`, on a 256 x 256 chunk of 46 dates); the tests
hold the two equal on random inputs.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Sequence
from enum import StrEnum

import numba
import numpy as np

from msmtu_batch.inputs.layers import (
    N_MONTHS,
    QA_CLOUD_STATE_MASK,
    QA_CLOUDY,
    QA_MIXED_CLOUD,
    QA_REJECT_BITS,
    REFLECTANCE_FILL,
    REFLECTANCE_VALID_RANGE,
    qa_rejected,
)


class CompositeRule(StrEnum):
    median = "median"
    mean = "mean"
    max_ndvi = "max_ndvi"


def observation_months(day_of_year: np.ndarray, starts: Sequence[dt.date], year: int) -> np.ndarray:
    """Month index (0-11) of each observation ``(D, ...)`` in ``year``; -1 outside it or invalid."""
    doy = np.asarray(day_of_year).astype(np.int64)
    shape = (len(starts),) + (1,) * (doy.ndim - 1)
    start_doy = np.array([s.timetuple().tm_yday for s in starts]).reshape(shape)
    start_year = np.array([s.year for s in starts]).reshape(shape)
    obs_year = np.where(doy >= start_doy, start_year, start_year + 1)
    first_day = (obs_year - 1970).astype("datetime64[Y]").astype("datetime64[D]")
    obs_date = first_day + (np.clip(doy, 1, 366) - 1).astype("timedelta64[D]")
    month = (obs_date.astype("datetime64[M]") - np.datetime64(f"{year}-01", "M")).astype(np.int64)
    valid = (doy >= 1) & (doy <= 366) & (month >= 0) & (month < N_MONTHS)
    return np.where(valid, month, -1).astype(np.int8)


def clear_observations(reflectance: np.ndarray, state_qa: np.ndarray | None) -> np.ndarray:
    """``(D, h, w)`` True where QA passes and all bands of ``reflectance (D, 7, h, w)`` are valid."""
    low, high = REFLECTANCE_VALID_RANGE
    clear = ((reflectance >= low) & (reflectance <= high)).all(axis=1)  # the fill is below the range
    if state_qa is not None:
        clear &= ~qa_rejected(state_qa)
    return clear


def composite_months_numpy(reflectance: np.ndarray, state_qa: np.ndarray | None, day_of_year: np.ndarray,
                           starts: Sequence[dt.date], year: int,
                           rule: CompositeRule | str = CompositeRule.median) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy definition of :func:`composite_months` (the tests hold the kernel to it)."""
    rule = CompositeRule(rule)
    n_bands, height, width = reflectance.shape[1:]
    months = observation_months(day_of_year, starts, year)
    clear = clear_observations(reflectance, state_qa) & (months >= 0)
    out = np.full((N_MONTHS, n_bands, height, width), REFLECTANCE_FILL, np.int16)
    counts = np.zeros((N_MONTHS, height, width), np.uint8)
    for month in range(N_MONTHS):
        selected = clear & (months == month)
        dates = np.flatnonzero(selected.any(axis=(1, 2)))
        if dates.size == 0:
            continue
        selected = selected[dates]
        count = selected.sum(axis=0)
        values = np.where(selected[:, None], reflectance[dates], np.nan).astype(np.float32)
        if rule is CompositeRule.max_ndvi:
            red, nir = values[:, 0], values[:, 1]
            with np.errstate(divide="ignore", invalid="ignore"):
                ndvi = np.where(selected, (nir - red) / (nir + red), -np.inf)
            ndvi = np.where(np.isnan(ndvi), -2.0, ndvi)  # red = nir = 0: a valid observation, lowest NDVI
            best = np.argmax(ndvi, axis=0)[None, None]
            value = np.take_along_axis(values, np.broadcast_to(best, (1, n_bands, height, width)), axis=0)[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: no clear observation
                value = (np.nanmedian if rule is CompositeRule.median else np.nanmean)(values, axis=0)
        observed = count > 0
        out[month] = np.where(observed[None], np.rint(np.nan_to_num(value)), REFLECTANCE_FILL).astype(np.int16)
        counts[month] = count
    return out, counts


_RULE_CODES = {CompositeRule.median: 0, CompositeRule.mean: 1, CompositeRule.max_ndvi: 2}
_LOW, _HIGH = REFLECTANCE_VALID_RANGE
_MAX_DAY = 366


def composite_months(reflectance: np.ndarray, state_qa: np.ndarray | None, day_of_year: np.ndarray,
                     starts: Sequence[dt.date], year: int,
                     rule: CompositeRule | str = CompositeRule.median) -> tuple[np.ndarray, np.ndarray]:
    """Composite ``reflectance (D, 7, h, w)`` int16 of observations starting on ``starts`` into
    ``(12, 7, h, w)`` int16 monthly values and ``(12, h, w)`` uint8 clear-observation counts."""
    n_dates, n_bands, height, width = reflectance.shape
    # month of each (date, day of year) pair, by the definition itself: the kernel only looks it up
    days = np.broadcast_to(np.arange(_MAX_DAY + 1, dtype=np.int16), (n_dates, _MAX_DAY + 1))
    month_of_day = observation_months(days, starts, year)
    out = np.empty((N_MONTHS, n_bands, height, width), np.int16)
    counts = np.empty((N_MONTHS, height, width), np.uint8)
    has_qa = state_qa is not None
    qa = np.asarray(state_qa if has_qa else np.zeros((1, 1, 1), np.uint16), dtype=np.uint16)
    # strided views are taken as they are (no copy: a chunk's 46 dates are 50 MB)
    _composite_kernel(np.asarray(reflectance, dtype=np.int16), qa, has_qa, np.asarray(day_of_year, dtype=np.int16),
                      month_of_day, _RULE_CODES[CompositeRule(rule)], out, counts)
    return out, counts


# One signature of any-layout arrays, compiled once (cached on disk): the by-date ingest passes
# strided views of its scratch block, the other callers contiguous arrays
_KERNEL_SIGNATURE = ("void(int16[:, :, :, :], uint16[:, :, :], boolean, int16[:, :, :], int8[:, :], int64, "
                     "int16[:, :, :, :], uint8[:, :, :])")


@numba.njit(_KERNEL_SIGNATURE, parallel=True, nogil=True, cache=True, error_model="numpy")
def _composite_kernel(reflectance, state_qa, has_qa, day_of_year, month_of_day, rule, out, counts):
    n_dates, n_bands, height, width = reflectance.shape
    for row in numba.prange(height):
        # each date's month per pixel of the row (-1: not clear), the layers read along the row
        months = np.empty((n_dates, width), np.int8)
        for d in range(n_dates):
            for col in range(width):
                day = day_of_year[d, row, col]
                month = month_of_day[d, day] if 0 <= day <= _MAX_DAY else -1
                if has_qa:
                    qa = state_qa[d, row, col]
                    if (qa & QA_CLOUD_STATE_MASK) in (QA_CLOUDY, QA_MIXED_CLOUD) or (qa & QA_REJECT_BITS) != 0:
                        month = -1
                months[d, col] = month
            for b in range(n_bands):
                for col in range(width):
                    value = reflectance[d, b, row, col]
                    if value < _LOW or value > _HIGH:
                        months[d, col] = -1
        order = np.empty(n_dates, np.int64)  # a pixel's clear dates month by month (counting sort)
        first = np.empty(N_MONTHS + 1, np.int64)
        filled = np.empty(N_MONTHS, np.int64)
        values = np.empty(n_dates, np.int64)
        for col in range(width):
            first[:] = 0
            for d in range(n_dates):
                if months[d, col] >= 0:
                    first[months[d, col] + 1] += 1
            for m in range(N_MONTHS):
                counts[m, row, col] = first[m + 1]
                first[m + 1] += first[m]
            filled[:] = first[:N_MONTHS]
            for d in range(n_dates):  # dates stay in time order within a month (first on ties)
                m = months[d, col]
                if m >= 0:
                    order[filled[m]] = d
                    filled[m] += 1
            for m in range(N_MONTHS):
                begin, count = first[m], first[m + 1] - first[m]
                if count == 0:
                    for b in range(n_bands):
                        out[m, b, row, col] = REFLECTANCE_FILL
                elif rule == 2:  # max_ndvi, in float32 as the definition; 0/0 lowest, first on ties
                    best, best_ndvi = order[begin], np.float32(-np.inf)
                    for k in range(begin, begin + count):
                        red = np.float32(reflectance[order[k], 0, row, col])
                        nir = np.float32(reflectance[order[k], 1, row, col])
                        ndvi = (nir - red) / (nir + red)
                        if np.isnan(ndvi):
                            ndvi = np.float32(-2.0)
                        if ndvi > best_ndvi:
                            best, best_ndvi = order[k], ndvi
                    for b in range(n_bands):
                        out[m, b, row, col] = reflectance[best, b, row, col]
                else:
                    for b in range(n_bands):
                        for k in range(count):  # insertion sort of a handful of values
                            value = np.int64(reflectance[order[begin + k], b, row, col])
                            j = k
                            while j > 0 and values[j - 1] > value:
                                values[j] = values[j - 1]
                                j -= 1
                            values[j] = value
                        if rule == 0:  # exact in float64: halves of integers
                            half = count // 2
                            result = np.float64(values[half]) if count % 2 else (values[half - 1] + values[half]) / 2
                        else:
                            result = values[:count].sum() / count
                        out[m, b, row, col] = np.int16(np.rint(result))
