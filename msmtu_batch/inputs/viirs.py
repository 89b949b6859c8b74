"""VIIRS 8-day surface reflectance granules (VNP09A1 from Suomi NPP, VJ109A1 from NOAA-20):
HDF-EOS5 files, read with h5py.

A granule is one tile of the MODIS sinusoidal grid at 1 km (1200 x 1200 pixels of 926.6 m).
Its grid is described by ``/HDFEOS INFORMATION/StructMetadata.0`` (projection
``HE5_GCTP_SNSOID``), its layers are under ``/HDFEOS/GRIDS/VNP_Grid_1km_2D/Data Fields``, and
its facts (``ShortName``, ``RangeBeginningDate``) are attributes of
``/HDFEOS/ADDITIONAL/FILE_ATTRIBUTES``. The sensor spec (:mod:`msmtu_batch.inputs.sensors`)
names the seven layers read as the cube's bands, the StateQA layer and the day-of-year layer.
Unlike MODAPS's HDF4 layers, these layers are stored in compressed chunks, so a window is
read by itself at no extra cost.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msmtu_batch.inputs.layers import BAND_NAMES
from msmtu_batch.inputs.modis import (
    Granule,
    GranuleObservation,
    ObservationWindow,
    _layered_window,
    _overlap,
    sinusoidal_tile,
    strip_part,
)
from msmtu_batch.inputs.sensors import SENSORS, Sensor
from msmtu_batch.runtime.errors import MsmtuError

STRUCT_METADATA = "HDFEOS INFORMATION/StructMetadata.0"
FILE_ATTRIBUTES = "HDFEOS/ADDITIONAL/FILE_ATTRIBUTES"
VIIRS_PRODUCTS = {p: s for s in SENSORS.values() if s.file_format == "HDF5-EOS" for p in s.products}


def _text(value: object) -> str:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    return value.decode("latin-1") if isinstance(value, bytes | np.bytes_) else str(value)


def _fields_path(sensor: Sensor) -> str:
    return f"HDFEOS/GRIDS/{sensor.grid_name}/Data Fields"


def read_viirs_granule_info(path: str | Path) -> Granule:
    """Check a VIIRS granule's product, grid and layers; return where it lies."""
    import h5py

    path = str(path)
    try:
        with h5py.File(path, "r") as f:
            if STRUCT_METADATA not in f:
                raise MsmtuError(f"{path}: no {STRUCT_METADATA}; expected a VIIRS HDF-EOS5 granule")
            struct = _text(f[STRUCT_METADATA][()])
            facts = f[FILE_ATTRIBUTES].attrs if FILE_ATTRIBUTES in f else f.attrs
            product, begin = _text(facts.get("ShortName", "")), _text(facts.get("RangeBeginningDate", ""))
            if product not in VIIRS_PRODUCTS:
                raise MsmtuError(f"{path}: product {product or 'not named'}, expected "
                                 f"{' or '.join(sorted(VIIRS_PRODUCTS))} (VIIRS 8-day 1 km surface reflectance)")
            sensor = VIIRS_PRODUCTS[product]
            tile, upper_left, pixel, shape = sinusoidal_tile(path, struct, "HE5_GCTP_SNSOID")
            fields = f.get(_fields_path(sensor))
            expected = {**{layer: np.int16 for layer in sensor.band_layers}, sensor.state_qa_layer: np.uint16,
                        sensor.day_of_year_layer: np.uint16}
            for layer, dtype in expected.items():
                if fields is None or layer not in fields:
                    raise MsmtuError(f"{path}: layer {layer} missing; a {product} granule has it under "
                                     f"/{_fields_path(sensor)}")
                if fields[layer].shape != shape or fields[layer].dtype != dtype:
                    raise MsmtuError(f"{path}: layer {layer} is {list(fields[layer].shape)} of {fields[layer].dtype}, "
                                     f"expected {list(shape)} of {np.dtype(dtype)}")
    except OSError as exc:
        raise MsmtuError(f"{path}: not a readable HDF5 file ({exc})") from None
    try:
        start = dt.date.fromisoformat(begin)
    except ValueError:
        raise MsmtuError(f"{path}: RangeBeginningDate {begin!r} is not a date (YYYY-MM-DD)") from None
    return Granule(path, start, tile, upper_left, pixel, shape, product)


@dataclass(frozen=True)
class ViirsObservation(GranuleObservation):
    """One 8-day composite of VIIRS granules (one per tile), read with h5py."""

    def read_strips(self, row0: int, row1: int, col0: int, col1: int, strip: int, band_quality: bool = False
                    ) -> Iterator[tuple[int, ObservationWindow]]:
        """The window in strips of ``strip`` rows, top to bottom, as
        :meth:`GranuleObservation.read_strips` gives them (views of one block, refilled)."""
        import h5py

        if band_quality:
            raise MsmtuError(f"{self.label}: band_quality reads MODIS's sur_refl_qc_500m; VIIRS granules have no "
                             "such layer")
        block = np.empty((len(BAND_NAMES) + 2, min(strip, row1 - row0), col1 - col0), np.int16)
        opened: list[tuple[Granule, int, int, h5py.File]] = []
        granule = self.granules[0][0]
        try:
            for granule, row_off, col_off in self.granules:
                c0, c1 = _overlap(col0 - col_off, col1 - col_off, granule.shape[1])
                r0, r1 = _overlap(row0 - row_off, row1 - row_off, granule.shape[0])
                if r0 < r1 and c0 < c1:
                    opened.append((granule, row_off, col_off, h5py.File(granule.path, "r")))
            for top in range(row0, row1, strip):
                bottom = min(top + strip, row1)
                out = _layered_window(block[:, :bottom - top])
                for granule, row_off, col_off, f in opened:
                    if (part := strip_part(granule, row_off, col_off, top, bottom, col0, col1)) is None:
                        continue
                    (r0, r1), (c0, c1), rows, cols = part
                    sensor = VIIRS_PRODUCTS[granule.product]
                    fields = f[_fields_path(sensor)]
                    for band, layer in enumerate(sensor.band_layers):
                        out.reflectance[band, rows, cols] = fields[layer][r0:r1, c0:c1]
                    out.state_qa[rows, cols] = fields[sensor.state_qa_layer][r0:r1, c0:c1]
                    # uint16 with fill 65535, read as int16 with -1 for fill (as the HDF4 reader does)
                    out.day_of_year[rows, cols] = fields[sensor.day_of_year_layer][r0:r1, c0:c1].astype(np.int16)
                yield top, out
        except OSError as exc:
            raise MsmtuError(f"{granule.path}: cannot read rows {row0}:{row1}, columns {col0}:{col1} ({exc}); the "
                             "file may be truncated or corrupt") from None
        finally:
            for *_, f in opened:
                f.close()
