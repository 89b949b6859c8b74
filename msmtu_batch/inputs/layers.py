"""The input cube's layers without xarray: names, units, fill values, StateQA and per-band
quality bits, and the array-level rules on them (docs/design.md section 4).

:mod:`msmtu_batch.inputs.cube` re-exports every name here; the modules that Dask tasks import
(granule reading, compositing, ancillary data, the ingest tasks) take them from here, so that a
worker does not load xarray, pandas and dask.array (about 1 s and 40 MB a worker) to ingest.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Iterable, Mapping

import numpy as np
import zarr
from zarr.core.sync import sync

BAND_NAMES: tuple[str, ...] = tuple(f"sur_refl_b0{i}" for i in range(1, 8))
"""MOD09A1 bands 1-7, in product order: red, nir1, blue, green, nir2, swir1, swir2."""
BAND_COMMON_NAMES: tuple[str, ...] = ("red", "nir1", "blue", "green", "nir2", "swir1", "swir2")
GEOTOPO_NAMES: tuple[str, ...] = ("longitude", "latitude", "altitude", "slope")
CLIMATIC_NAMES: tuple[str, ...] = (
    "precipitation",
    "evapotranspiration",
    "temperature_ave",
    "temperature_max",
    "temperature_min",
)
ANCILLARY_NAMES: tuple[str, ...] = GEOTOPO_NAMES + CLIMATIC_NAMES
# The ancillary variants a model can use (the paper's ablation): none, geo-topographic, all.
ANCILLARY_SETS: dict[str, tuple[str, ...]] = {"none": (), "geotopo": GEOTOPO_NAMES, "all": ANCILLARY_NAMES}
ANCILLARY_UNITS: dict[str, str] = {
    "longitude": "degrees_east",
    "latitude": "degrees_north",
    "altitude": "m",
    "slope": "degree",
    "precipitation": "mm year-1",
    "evapotranspiration": "mm year-1",
    "temperature_ave": "degC",
    "temperature_max": "degC",
    "temperature_min": "degC",
}

N_MONTHS = 12
COUNT_VARIABLE = "clear_count"  # clear observations composited into each month (written by ingest)
# The class dimension of abundance cubes (reference and output). Not "class", a Python keyword
# that ds.sel(class=...) cannot take; a reference cube with a "class" dimension is still read.
CLASS_DIM = "lulc_class"
LEGACY_CLASS_DIM = "class"
REFLECTANCE_FILL = -28672
REFLECTANCE_SCALE = 1e-4
REFLECTANCE_VALID_RANGE = (-100, 16000)  # MOD09A1 valid range, in stored integer units
INGEST_STATUS_ATTR = "ingest_status"  # "incomplete" while `ingest` is writing the cube
# Root attribute of every store the project writes: each chunk of each variable is on disk
# (written even when it holds only fill values), so an absent chunk is damage, never "empty".
ALL_CHUNKS_ATTR = "msmtu_all_chunks_written"

# MOD09A1 500 m StateQA bits (MOD09 user guide, table 13). The ones we reject:
QA_CLOUD_STATE_MASK = 0b11  # bits 0-1: 00 clear, 01 cloudy, 10 mixed, 11 not set (assumed clear)
QA_CLOUDY = 0b01
QA_MIXED_CLOUD = 0b10
QA_CLOUD_SHADOW = 1 << 2
QA_LAND = 0b001 << 3  # bits 3-5 land/water flag: 001 land
QA_SHALLOW_INLAND_WATER = 0b011 << 3
QA_AEROSOL_LOW = 0b01 << 6  # bits 6-7 aerosol quantity
QA_INTERNAL_CLOUD = 1 << 10
QA_MOD35_SNOW = 1 << 12
QA_ADJACENT_CLOUD = 1 << 13  # informative only: not rejected
QA_INTERNAL_SNOW = 1 << 15
QA_REJECT_BITS = QA_CLOUD_SHADOW | QA_MOD35_SNOW | QA_INTERNAL_SNOW  # besides cloud states 01 and 10


# MOD09A1 sur_refl_qc_500m (uint32), MOD09 user guide table 10: bits 0-1 MODLAND QA (00 ideal
# quality, all bands; 01 less than ideal, some or all bands; 10 not produced, cloud effects; 11 not
# produced, other reasons); bits 2-5 band 1 data quality, 6-9 band 2, ... 26-29 band 7, four bits
# each (0000 highest quality; 0111 noisy detector; 1000 dead detector, interpolated in L1B; 1001
# solar zenith >= 86 deg; 1010 solar zenith 85-86 deg; 1011 missing input; 1100 internal constant
# used for an atmospheric constant; 1101 correction out of bounds; 1110 L1B data faulty; 1111 not
# processed, deep ocean or clouds); bit 30 atmospheric correction performed; bit 31 adjacency
# correction performed.
QC_MODLAND_MASK = 0b11
QC_NOT_PRODUCED = (0b10, 0b11)
QC_BAND_SHIFT, QC_BAND_BITS = 2, 4


def band_quality_rejected(band_quality: np.ndarray) -> np.ndarray:
    """``(7, ...)`` True where ``sur_refl_qc_500m`` (``...``, uint32) says a band's value is not
    of the highest quality (its four bits are not 0000), or that the product was not produced
    (MODLAND QA 10 or 11: every band)."""
    qc = np.asarray(band_quality).astype(np.uint32, copy=False)
    codes = np.stack([(qc >> np.uint32(QC_BAND_SHIFT + QC_BAND_BITS * band)) & np.uint32(0b1111)
                      for band in range(len(BAND_NAMES))])
    not_produced = np.isin(qc & np.uint32(QC_MODLAND_MASK), QC_NOT_PRODUCED)
    return (codes != 0) | not_produced[None]


def qa_rejected(state_qa: np.ndarray) -> np.ndarray:
    """True where StateQA says cloudy, mixed cloud, cloud shadow or snow (docs/design.md section 4)."""
    qa = np.asarray(state_qa).astype(np.uint16, copy=False)
    cloud_state = qa & QA_CLOUD_STATE_MASK
    cloudy = (cloud_state == QA_CLOUDY) | (cloud_state == QA_MIXED_CLOUD)
    return cloudy | ((qa & QA_REJECT_BITS) != 0)


def observed_mask(reflectance: np.ndarray, state_qa: np.ndarray | None = None) -> np.ndarray:
    """Plain NumPy reference of the gap mask: True where a value is usable.

    ``reflectance`` is ``(time, band, ...)`` in stored int16 units and ``state_qa``
    ``(time, ...)``. A value is usable when it is not the fill value, lies in the MOD09A1
    valid range, and (when QA is given) its month is not cloudy, shadowed or snowy.
    """
    refl = np.asarray(reflectance)
    low, high = REFLECTANCE_VALID_RANGE
    usable = (refl != REFLECTANCE_FILL) & (refl >= low) & (refl <= high)
    if state_qa is not None:
        usable &= ~qa_rejected(state_qa)[:, None]
    return usable


def write_window(store: str | os.PathLike | zarr.Group, arrays: Mapping[str, np.ndarray], ys: slice,
                 xs: slice = slice(None), group: str = "") -> list[zarr.Array]:
    """Write ``arrays`` (name -> values) at rows ``ys`` and columns ``xs`` of their variables in
    an initialised store (or its group ``group``; or an open group), every chunk written even
    when it holds only fill values (zarr skips those by default, and our readers take an absent
    chunk for damage). Set per array: Zarr's global config is one per process, and a thread
    restoring it races the others' writes. Returns the arrays written, as opened."""
    root = store if isinstance(store, zarr.Group) else zarr.open_group(store, mode="r+", path=group)
    targets = [(root[name].with_config({"write_empty_chunks": True}), values) for name, values in arrays.items()]
    for outcome in zarr_together([array.async_array.setitem((..., ys, xs), values) for array, values in targets]):
        if isinstance(outcome, BaseException):
            raise outcome
    return [array for array, _ in targets]


def zarr_together(requests: Iterable[Awaitable]) -> list:
    """The outcomes (results, or the exceptions raised) of zarr's asynchronous requests
    (``Array.async_array``'s, zarr's way of batching), in their order, all awaited together on
    zarr's event loop. One synchronous call at a time, each waits alone on that loop: reading a
    256 x 256 chunk's 11 input variables took 42-49 CPU-ms and 42-60 ms so, 34-40 and 30-40
    together; writing the run's 6 products 24-27 CPU-ms and 26-29 ms, 21-25 and 18-22 together
    (benchmarks/NOTES.md, 2026-12-07, eighth session). Every request has ended when it returns."""
    async def together() -> list:
        return await asyncio.gather(*requests, return_exceptions=True)

    return sync(together())
