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
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Sequence
from enum import StrEnum

import numpy as np

from msmtu_batch.inputs.cube import N_MONTHS, REFLECTANCE_FILL, REFLECTANCE_VALID_RANGE, qa_rejected


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


def composite_months(reflectance: np.ndarray, state_qa: np.ndarray | None, day_of_year: np.ndarray,
                     starts: Sequence[dt.date], year: int,
                     rule: CompositeRule | str = CompositeRule.median) -> tuple[np.ndarray, np.ndarray]:
    """Composite ``reflectance (D, 7, h, w)`` int16 of observations starting on ``starts`` into
    ``(12, 7, h, w)`` int16 monthly values and ``(12, h, w)`` uint8 clear-observation counts."""
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
