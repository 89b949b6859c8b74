"""The sensors a cube can come from, as data: one :class:`Sensor` spec each, read by the
granule reader, the ingest, the cube contract and the model.

A spec says which granule products it reads, the bands (in the model's order) and the
layers that hold them, the stored scale, fill value and valid range, the quality layers and
how to decode them, the grid, and the file format. A cube records its sensor's name in its
``sensor`` attribute (a cube without one is MOD09A1: the published layout); a model records
the sensor its training data came from, and ``run`` refuses a cube of another sensor unless
told (``--allow-other-sensor``).

MODIS Terra (MOD09A1) and Aqua (MYD09A1) write the same 8-day 500 m product on the same
sinusoidal tiles, with the same layers, so they share every field but the product name.
Terra+Aqua reads both and composites each month from the granules of both satellites: about
twice the clear observations per month. VIIRS (VNP09A1, VJ109A1) continues them on the same
tiles at 1 km, read from HDF-EOS5 files (:mod:`msmtu_batch.inputs.viirs`), with its seven bands
that match MODIS bands 1-7. docs/sensors.md gives the band mapping and sources.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from msmtu_batch.inputs.layers import (
    BAND_COMMON_NAMES,
    BAND_NAMES,
    REFLECTANCE_FILL,
    REFLECTANCE_SCALE,
    REFLECTANCE_VALID_RANGE,
)
from msmtu_batch.runtime.errors import MsmtuError

SENSOR_ATTR = "sensor"  # a cube's root attribute naming its sensor spec


@dataclass(frozen=True)
class Sensor:
    """One sensor's surface reflectance product, as the project reads it."""

    name: str  # what cubes and models record
    description: str
    products: tuple[str, ...]  # granule short names (CoreMetadata SHORTNAME) it reads
    platforms: tuple[str, ...]
    bands: tuple[str, ...]  # the cube's band labels, in the model's order
    band_layers: tuple[str, ...]  # the granule layer of each band
    common_names: tuple[str, ...]
    scale: float = REFLECTANCE_SCALE
    fill: int = REFLECTANCE_FILL
    valid_range: tuple[int, int] = REFLECTANCE_VALID_RANGE
    # StateQA in MOD09's bit layout for every sensor here (inputs/layers.py decodes it: bits 0-1
    # cloud state, 2 shadow, 12 and 15 snow); a sensor with another layout needs a decoder field
    state_qa_layer: str = "sur_refl_state_500m"
    band_quality_layer: str | None = "sur_refl_qc_500m"
    day_of_year_layer: str = "sur_refl_day_of_year"
    grid_name: str = "MOD_Grid_500m_Surface_Reflectance"
    collection: int = 61
    file_format: str = "HDF4-EOS"
    composite_days: int = 8

    def reads(self, product: str) -> bool:
        return product in self.products


MODIS_TERRA = Sensor(
    name="MOD09A1", description="MODIS Terra 8-day 500 m surface reflectance (MOD09A1 C6.1)",
    products=("MOD09A1",), platforms=("Terra",), bands=BAND_NAMES, band_layers=BAND_NAMES,
    common_names=BAND_COMMON_NAMES)
MODIS_AQUA = replace(MODIS_TERRA, name="MYD09A1", products=("MYD09A1",), platforms=("Aqua",),
                     description="MODIS Aqua 8-day 500 m surface reflectance (MYD09A1 C6.1)")
MODIS_TERRA_AQUA = replace(MODIS_TERRA, name="MOD09A1+MYD09A1", products=("MOD09A1", "MYD09A1"),
                           platforms=("Terra", "Aqua"),
                           description="MODIS Terra and Aqua 8-day 500 m surface reflectance, composited together")

# VIIRS: the seven moderate-resolution bands whose spectral bands match MODIS bands 1-7, in
# MODIS order (docs/sensors.md): red M5, nir1 M7, blue M3, green M4, nir2 M8, swir1 M10, swir2 M11.
# VNP09A1 (Suomi NPP) and VJ109A1 (NOAA-20): 8-day, 1 km (926.6 m) on the MODIS sinusoidal tiles,
# HDF-EOS5; reflectance scale, fill and valid range as MOD09A1's.
VIIRS_BANDS = ("M5", "M7", "M3", "M4", "M8", "M10", "M11")
VIIRS_SNPP = Sensor(
    name="VNP09A1", description="VIIRS Suomi NPP 8-day 1 km surface reflectance (VNP09A1)",
    products=("VNP09A1",), platforms=("Suomi NPP",), bands=VIIRS_BANDS,
    band_layers=tuple(f"SurfReflect_{b}" for b in VIIRS_BANDS), common_names=BAND_COMMON_NAMES,
    state_qa_layer="SurfReflect_State", band_quality_layer=None, day_of_year_layer="SurfReflect_Day_Of_Year",
    grid_name="VNP_Grid_1km_2D", collection=2, file_format="HDF5-EOS")
VIIRS_NOAA20 = replace(VIIRS_SNPP, name="VJ109A1", products=("VJ109A1",), platforms=("NOAA-20",),
                       description="VIIRS NOAA-20 8-day 1 km surface reflectance (VJ109A1)")

SENSORS: dict[str, Sensor] = {s.name: s for s in (MODIS_TERRA, MODIS_AQUA, MODIS_TERRA_AQUA, VIIRS_SNPP,
                                                  VIIRS_NOAA20)}
DEFAULT_SENSOR = MODIS_TERRA  # cubes and models that name none: the published MSMTU layout


def sensor_named(name: str | None, where: str = "sensor") -> Sensor:
    """The spec called ``name`` (None: the default); one line naming the known ones if none is."""
    if name is None:
        return DEFAULT_SENSOR
    try:
        return SENSORS[name]
    except KeyError:
        raise MsmtuError(f"{where}: unknown sensor {name!r}; known: {', '.join(SENSORS)}") from None


def sensor_of_products(products: set[str], where: str) -> Sensor:
    """The spec that reads exactly the granule ``products`` found among the inputs."""
    for sensor in SENSORS.values():
        if set(sensor.products) == products:
            return sensor
    raise MsmtuError(f"{where}: granules of {', '.join(sorted(products))}; no sensor reads that mix "
                     f"(known: {', '.join(SENSORS)})")
