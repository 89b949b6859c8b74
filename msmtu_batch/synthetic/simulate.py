"""Seeded synthetic Andalusia-like region that follows the input-cube contract.

The region is built from physics a remote-sensing scientist would recognise, so that a
model trained on it has something real to learn:

* terrain: Sierra Morena in the north, the Guadalquivir valley running SW-NE, the Betic
  ranges with a Sierra Nevada-like massif (up to 3400 m) in the south-east, a coastal
  plain in the south; multi-scale roughness; slope from altitude at the pixel spacing;
* climate from terrain and position: temperature with a 6.5 K/km lapse rate and a
  continentality-driven diurnal range, an Atlantic (west) to arid (east) precipitation
  gradient with orographic enhancement, Hargreaves-Samani reference evapotranspiration;
* 10 level-2 LULC classes nested in 5 level-1 classes, abundances from spatially
  correlated fields whose odds depend on the ancillary variables (mixed pixels dominate);
* per-class monthly spectra for the 7 MOD09A1 bands from Mediterranean phenology, with
  timing and vigour tied to each pixel's climate; a mostly linear mixture with a bilinear
  (Fan model) term, multiplicative and additive noise, int16 at scale 1e-4;
* gaps from spatially correlated seasonal clouds (more in winter and over mountains),
  cloud shadow, winter snow on the summits and a few persistently missing pixels, with a
  matching MOD09A1 StateQA.

Every spatial field is a sum of random plane waves evaluated separably (two small matrix
products per tile), and per-pixel noise comes from per-row seeded generators, so any block
of rows is generated on its own: memory is bounded by the block, not the region, and the
output does not depend on the block size.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pyproj import Transformer
from scipy.special import ndtri

from msmtu_batch.inputs.cube import (
    ANCILLARY_NAMES,
    ANCILLARY_UNITS,
    BAND_NAMES,
    CLASS_DIM,
    N_MONTHS,
    QA_ADJACENT_CLOUD,
    QA_AEROSOL_LOW,
    QA_CLOUD_SHADOW,
    QA_CLOUDY,
    QA_INTERNAL_CLOUD,
    QA_INTERNAL_SNOW,
    QA_LAND,
    QA_MIXED_CLOUD,
    QA_MOD35_SNOW,
    QA_SHALLOW_INLAND_WATER,
    REFLECTANCE_FILL,
    REFLECTANCE_SCALE,
    REFLECTANCE_VALID_RANGE,
    consolidate,
    cube_encoding,
    observed_mask,
    project_store,
    rioxarray_quietly,
    write_window,
)
from msmtu_batch.inputs.training_data import (
    PARTITIONS,
    spatial_block_split,
    write_msmtu_layout,
)
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.outputs import staged_folder
from msmtu_batch.runtime.provenance import __version__

MODIS_PIXEL_SIZE = 463.312716528  # m, MOD09A1 500 m grid
MAX_ALTITUDE = 3400.0

# (level-2 class, level-1 parent). Level 1 follows the CORINE/SIOSE first level.
CLASS_HIERARCHY: tuple[tuple[str, str], ...] = (
    ("urban", "artificial"),
    ("winter_cereal", "agricultural"),
    ("irrigated_crop", "agricultural"),
    ("olive_grove", "agricultural"),
    ("evergreen_forest", "forest"),
    ("dehesa", "forest"),
    ("shrubland", "open_natural"),
    ("grassland", "open_natural"),
    ("bare_soil", "open_natural"),
    ("water", "water"),
)
LEVEL2_CLASSES: tuple[str, ...] = tuple(name for name, _ in CLASS_HIERARCHY)
LEVEL1_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(parent for _, parent in CLASS_HIERARCHY))
LEVELS: dict[str, tuple[str, ...]] = {"level1": LEVEL1_CLASSES, "level2": LEVEL2_CLASSES}


def level_matrix() -> np.ndarray:
    """(n_level1, n_level2) 0/1 matrix: level-1 abundance = matrix @ level-2 abundance."""
    parents = dict(CLASS_HIERARCHY)
    return np.array([[parents[c2] == c1 for c2 in LEVEL2_CLASSES] for c1 in LEVEL1_CLASSES],
                    dtype=np.float32)


# --- Endmember spectra (reflectance, MOD09A1 band order: red, nir1, blue, green, nir2, swir1, swir2)
GREEN_VEGETATION = np.array([0.035, 0.45, 0.025, 0.075, 0.40, 0.22, 0.10])
EVERGREEN_CANOPY = np.array([0.030, 0.29, 0.020, 0.055, 0.25, 0.13, 0.055])
DRY_VEGETATION = np.array([0.20, 0.30, 0.10, 0.15, 0.36, 0.40, 0.30])
SOIL = np.array([0.21, 0.27, 0.11, 0.16, 0.32, 0.39, 0.33])
ROCK = np.array([0.28, 0.32, 0.20, 0.25, 0.35, 0.38, 0.33])
IMPERVIOUS = np.array([0.16, 0.21, 0.12, 0.14, 0.24, 0.27, 0.23])
WATER = np.array([0.035, 0.020, 0.060, 0.055, 0.010, 0.006, 0.004])
# Contaminated values that slip through compositing, flagged in StateQA.
CLOUD = np.array([0.45, 0.48, 0.50, 0.47, 0.45, 0.35, 0.25])
SNOW = np.array([0.75, 0.70, 0.80, 0.78, 0.55, 0.08, 0.05])

# --- Mediterranean phenology, January..December (green cover fraction)
CEREAL_GREEN = np.array([0.45, 0.62, 0.78, 0.80, 0.55, 0.15, 0.04, 0.02, 0.02, 0.05, 0.15, 0.30])
CEREAL_STRAW = np.array([0.20, 0.20, 0.20, 0.20, 0.60, 0.90, 0.80, 0.60, 0.30, 0.10, 0.10, 0.15])
IRRIGATED_GREEN = np.array([0.05, 0.05, 0.06, 0.10, 0.30, 0.62, 0.85, 0.85, 0.62, 0.28, 0.10, 0.05])
HERBACEOUS_GREEN = np.array([0.55, 0.65, 0.75, 0.70, 0.45, 0.15, 0.05, 0.04, 0.08, 0.25, 0.45, 0.50])
EVERGREEN_VIGOUR = np.array([0.95, 0.95, 1.0, 1.0, 1.0, 0.95, 0.90, 0.88, 0.88, 0.90, 0.93, 0.95])
RESERVOIR_LEVEL = np.array([0.95, 0.97, 0.98, 0.98, 0.96, 0.92, 0.86, 0.80, 0.78, 0.80, 0.86, 0.92])

# Probability that a monthly composite has no clear observation (lowland, before orography).
MONTHLY_GAP_PROBABILITY = np.array(
    [0.30, 0.25, 0.20, 0.15, 0.08, 0.04, 0.02, 0.03, 0.07, 0.13, 0.22, 0.30])
BAND_NOISE_SD = np.array([0.006, 0.010, 0.009, 0.006, 0.010, 0.008, 0.006])  # additive, reflectance
GAIN_NOISE_SD = 0.03  # multiplicative, per pixel-month (residual atmosphere, BRDF)
SLIPPED_THROUGH = 0.3  # share of flagged months that keep a contaminated value instead of fill


class SimulationConfig(BaseModel):
    """What to simulate. Defaults give a 200 x 300 region on the MODIS 500 m grid."""

    model_config = ConfigDict(extra="forbid")

    height: int = Field(200, ge=8, description="rows (pixels)")
    width: int = Field(300, ge=8, description="columns (pixels)")
    seed: int = Field(0, ge=0)
    year: int = Field(2013, ge=2000, le=2100)
    pixel_size: float = Field(MODIS_PIXEL_SIZE, gt=0, description="m")
    crs: str = "EPSG:25830"  # ETRS89 / UTM zone 30N, the usual CRS for Andalusia
    origin_x: float = Field(100_000.0, description="easting of the north-west corner, m")
    origin_y: float = Field(4_290_000.0, description="northing of the north-west corner, m")
    chunk: int = Field(128, ge=8, description="spatial chunk of the stores (pixels)")
    msmtu_pixels: int = Field(2000, ge=0, description="pixels written in the MSMTU layout")
    split_block: int = Field(16, ge=1, description="side of the spatial split blocks (pixels)")
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    nonlinearity: float = Field(1.0, ge=0, description="weight of the bilinear mixing term")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SimulationConfig:
        if abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError("split_fractions must be three non-negative shares summing to 1")
        return self


def _stable_seed(*parts: object) -> list[int]:
    """Seed material from names and numbers that does not depend on Python's hash salt."""
    return [zlib.crc32(str(p).encode()) for p in parts]


class GaussianField:
    """Stationary Gaussian random field of unit variance from random plane waves.

    ``f(y, x) = sum_i a_i cos(ky_i y + kx_i x + phi_i)`` is separable through
    ``cos(a + b) = cos a cos b - sin a sin b``, so a tile costs two small matrix products and
    needs nothing from its neighbours. ``scales`` are (correlation length in m, weight).
    """

    def __init__(self, seed: int, name: str, scales: tuple[tuple[float, float], ...],
                 n_waves: int = 96) -> None:
        rng = np.random.default_rng(_stable_seed(seed, "field", name))
        total = sum(w for _, w in scales)
        ky, kx, amp = [], [], []
        for length, weight in scales:
            k = rng.normal(0.0, 1.0 / length, size=(2, n_waves))  # Gaussian covariance spectrum
            ky.append(k[0])
            kx.append(k[1])
            amp.append(np.full(n_waves, np.sqrt(2.0 * weight / total / n_waves)))
        self.ky = np.concatenate(ky)
        self.kx = np.concatenate(kx)
        self.amp = np.concatenate(amp)
        self.phase = rng.uniform(0, 2 * np.pi, self.ky.size)

    def __call__(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Evaluate on the grid ``y`` (rows, m) x ``x`` (columns, m)."""
        arg_y = np.outer(y, self.ky)
        arg_x = np.outer(x, self.kx) + self.phase
        return (np.cos(arg_y) * self.amp) @ np.cos(arg_x).T - (np.sin(arg_y) * self.amp) @ np.sin(arg_x).T


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _bump(z: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-(((z - centre) / width) ** 2))


def _shift_profile(profile: np.ndarray, shift_months: np.ndarray) -> np.ndarray:
    """(12, ny, nx): the periodic monthly ``profile`` delayed by ``shift_months`` per pixel."""
    t = (np.arange(N_MONTHS)[:, None, None] - shift_months[None]) % N_MONTHS
    i0 = np.floor(t).astype(np.int64)
    w = t - i0
    return profile[i0] * (1 - w) + profile[(i0 + 1) % N_MONTHS] * w


@dataclass
class Block:
    """Everything generated for the rows ``[row0, row1)`` of the region."""

    row0: int
    row1: int
    ancillary: dict[str, np.ndarray]  # name -> (ny, nx) float32
    abundance: np.ndarray  # (n_level2, ny, nx) float32, true level-2 abundances
    reflectance: np.ndarray  # (12, 7, ny, nx) int16
    state_qa: np.ndarray  # (12, ny, nx) uint16


class SyntheticAndalusia:
    """The random landscape of one seed; :meth:`block` generates any rows on demand."""

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        s = config.seed
        km = 1000.0
        self.fields = {
            "terrain": GaussianField(s, "terrain", ((25 * km, 0.55), (6 * km, 0.3), (1.5 * km, 0.15))),
            "precipitation": GaussianField(s, "precipitation", ((40 * km, 1.0),)),
            "temperature": GaussianField(s, "temperature", ((30 * km, 1.0),)),
            "towns": GaussianField(s, "towns", ((1.2 * km, 0.6), (4 * km, 0.4))),
            "reservoirs": GaussianField(s, "reservoirs", ((1.5 * km, 1.0),)),
            "soil": GaussianField(s, "soil", ((5 * km, 1.0),)),
            "phenology": GaussianField(s, "phenology", ((8 * km, 1.0),)),
            "persistent_gaps": GaussianField(s, "persistent_gaps", ((1.0 * km, 1.0),)),
        }
        for name in LEVEL2_CLASSES:
            self.fields[f"class_{name}"] = GaussianField(
                s, f"class_{name}", ((2.5 * km, 0.5), (10 * km, 0.5)))
        for month in range(N_MONTHS):
            self.fields[f"cloud_{month}"] = GaussianField(
                s, f"cloud_{month}", ((20 * km, 0.7), (3 * km, 0.3)))
        self.to_lonlat = Transformer.from_crs(config.crs, "EPSG:4326", always_xy=True)

    # -- coordinates -------------------------------------------------------------------
    def x_coords(self) -> np.ndarray:
        c = self.config
        return c.origin_x + (np.arange(c.width) + 0.5) * c.pixel_size

    def y_coords(self) -> np.ndarray:
        c = self.config
        return c.origin_y - (np.arange(c.height) + 0.5) * c.pixel_size

    # -- terrain -----------------------------------------------------------------------
    def _altitude(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Altitude (m) at fractional pixel indices; defined beyond the edges for slope."""
        c = self.config
        u = ((cols + 0.5) / c.width)[None, :]  # 0 west .. 1 east
        v = ((rows + 0.5) / c.height)[:, None]  # 0 north .. 1 south
        morena = 850.0 * _bump(v, 0.13, 0.10) * (0.75 + 0.25 * np.cos(3 * np.pi * u))
        valley_axis = 0.56 - 0.30 * u  # Guadalquivir: from the SW towards the NE
        valley = _bump(v, valley_axis, 0.11)
        betic = (900.0 + 900.0 * u) * _bump(v, 0.72, 0.11) * _sigmoid((u - 0.15) / 0.05)
        nevada = 3200.0 * np.exp(-(((u - 0.68) / 0.08) ** 2) - (((v - 0.76) / 0.05) ** 2))
        raw = (60.0 + 300.0 * u + morena + betic + nevada) * (1.0 - 0.85 * valley)
        rough = self.fields["terrain"](rows * c.pixel_size, cols * c.pixel_size)
        raw = raw + (60.0 + 0.30 * raw) * rough
        coast = np.clip((1.0 - v) / 0.06, 0.05, 1.0)  # coastal plain along the southern edge
        return MAX_ALTITUDE * np.tanh(np.maximum(raw * coast, 0.0) / MAX_ALTITUDE)

    def _terrain(self, row0: int, row1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Altitude and slope on the block, plus relative position u (east) and v (south)."""
        c = self.config
        rows = np.arange(row0 - 1, row1 + 1, dtype=np.float64)
        cols = np.arange(-1, c.width + 1, dtype=np.float64)
        alt_halo = self._altitude(rows, cols)
        alt = alt_halo[1:-1, 1:-1]
        dz_dx = (alt_halo[1:-1, 2:] - alt_halo[1:-1, :-2]) / (2 * c.pixel_size)
        dz_dy = (alt_halo[2:, 1:-1] - alt_halo[:-2, 1:-1]) / (2 * c.pixel_size)
        slope = np.degrees(np.arctan(np.hypot(dz_dx, dz_dy)))
        u = ((cols[1:-1] + 0.5) / c.width)[None, :] * np.ones_like(alt)
        v = ((rows[1:-1] + 0.5) / c.height)[:, None] * np.ones_like(alt)
        return alt, slope, u, v

    # -- one block ---------------------------------------------------------------------
    def rows(self, row0: int, row1: int, max_pixels: int = 65_536) -> Block:
        """Rows ``[row0, row1)``, generated in pieces of at most ``max_pixels`` pixels.

        Rows are independent, so the pieces join seamlessly; the float temporaries (tens
        of arrays of 12 x 7 values per pixel) stay bounded whatever the region's width.
        """
        step = max(1, max_pixels // self.config.width)
        pieces = [self.block(r, min(r + step, row1)) for r in range(row0, row1, step)]
        if len(pieces) == 1:
            return pieces[0]
        return Block(row0, row1,
                     {k: np.concatenate([p.ancillary[k] for p in pieces], axis=-2) for k in ANCILLARY_NAMES},
                     *(np.concatenate([getattr(p, f) for p in pieces], axis=-2)
                       for f in ("abundance", "reflectance", "state_qa")))

    def block(self, row0: int, row1: int) -> Block:
        c = self.config
        ym = np.arange(row0, row1) * c.pixel_size  # field coordinates, m from the NW corner
        xm = np.arange(c.width) * c.pixel_size
        alt, slope, u, v = self._terrain(row0, row1)
        lon, lat = self.to_lonlat.transform(*np.meshgrid(self.x_coords(), self.y_coords()[row0:row1]))

        # Climate from terrain and position.
        continentality = np.clip((0.97 - v) / 0.6, 0.0, 1.0)
        valley = _bump(v, 0.56 - 0.30 * u, 0.11)
        t_ave = 18.6 - 0.0065 * alt - 0.9 * continentality + 0.4 * self.fields["temperature"](ym, xm)
        diurnal = 8.0 + 6.0 * continentality + 2.5 * valley
        t_max = t_ave + diurnal / 2
        t_min = t_ave - diurnal / 2
        westerly = 1.25 - 0.9 * u  # Atlantic fronts come from the west
        precipitation = np.maximum(
            680.0 - 430.0 * u + 0.55 * westerly * np.maximum(alt - 150.0, 0.0)
            + 70.0 * self.fields["precipitation"](ym, xm), 120.0)
        radiation = 11.6 - 0.15 * (lat - 37.0)  # extraterrestrial radiation, mm/day equivalent
        evapotranspiration = 0.0023 * radiation * (t_ave + 17.8) * np.sqrt(diurnal) * 365.0
        ancillary = {
            "longitude": lon, "latitude": lat, "altitude": alt, "slope": slope,
            "precipitation": precipitation, "evapotranspiration": evapotranspiration,
            "temperature_ave": t_ave, "temperature_max": t_max, "temperature_min": t_min,
        }
        abundance = self._abundance(ym, xm, alt, slope, precipitation, u, v, valley)
        reflectance, state_qa = self._observe(row0, row1, ym, xm, abundance, alt, t_ave,
                                              precipitation)
        return Block(row0, row1, {k: a.astype(np.float32) for k, a in ancillary.items()},
                     abundance.astype(np.float32), reflectance, state_qa)

    def _abundance(self, ym, xm, alt, slope, precip, u, v, valley) -> np.ndarray:
        """Level-2 abundances: a softmax of ancillary-driven odds plus correlated fields."""
        f = {name: self.fields[f"class_{name}"](ym, xm) for name in LEVEL2_CLASSES}
        a_km = alt / 1000.0
        p_m = precip / 1000.0
        towns = np.maximum(self.fields["towns"](ym, xm) - 1.0, 0.0)
        reservoirs = np.maximum(self.fields["reservoirs"](ym, xm) - 1.6, 0.0)
        marsh = _bump(u, 0.05, 0.12) * _sigmoid((v - 0.85) / 0.03) * (alt < 60)
        logits = np.stack([
            -2.0 - 1.5 * a_km - 0.08 * slope + 1.2 * _sigmoid((v - 0.93) / 0.02) + 4.0 * towns,
            1.5 - 4.0 * (a_km - 0.35) ** 2 - 0.22 * slope + 1.2 * (valley > 0.3)
            - 15.0 * np.maximum(0.35 - p_m, 0.0),
            0.2 + 2.8 * valley - 3.0 * a_km - 0.30 * slope,
            0.1 - 3.0 * (a_km - 0.6) ** 2 - 0.02 * (slope - 8.0) ** 2 + 1.5 * _sigmoid((u - 0.45) / 0.08),
            -1.5 + 2.2 * p_m + 0.06 * slope + 0.8 * _bump(a_km, 1.2, 0.6),
            -0.2 + 2.8 * _bump(v, 0.15, 0.12) * (1.3 - u) - 0.06 * slope,
            -0.6 + 0.07 * slope + 1.2 * np.maximum(0.7 - p_m, 0.0) + 0.4 * a_km,
            -0.9 + 2.2 * _sigmoid((a_km - 1.9) / 0.2) + 0.6 * _bump(a_km, 1.0, 0.3),
            -1.6 + 3.0 * _sigmoid((a_km - 2.5) / 0.15) + 2.5 * _sigmoid((0.33 - p_m) / 0.04) + 0.03 * slope,
            -3.8 + 5.0 * reservoirs + 4.0 * marsh,
        ])
        logits += np.stack([1.1 * f[name] for name in LEVEL2_CLASSES])
        logits /= 0.75  # sharpness: mixed pixels dominate, as at 460 m in Andalusia
        logits -= logits.max(axis=0, keepdims=True)
        abundance = np.exp(logits)
        abundance /= abundance.sum(axis=0, keepdims=True)
        abundance[abundance < 0.02] = 0.0  # traces below 2 % are not mapped as present
        return abundance / abundance.sum(axis=0, keepdims=True)

    def class_spectra(self, ym, xm, alt, t_ave, precip) -> Iterator[np.ndarray]:
        """Yield each level-2 class's (12, 7, ny, nx) reflectance for this block's pixels."""
        vigour = np.clip(precip / 550.0, 0.35, 1.25)  # rainfed greenness follows rainfall
        delay = np.clip((16.5 - t_ave) * 0.25, -1.0, 3.0) + 0.35 * self.fields["phenology"](ym, xm)
        herb = np.clip(_shift_profile(HERBACEOUS_GREEN, delay) * vigour, 0, 0.95)
        cereal = np.clip(_shift_profile(CEREAL_GREEN, delay) * vigour, 0, 0.95)
        straw = _shift_profile(CEREAL_STRAW, delay)
        irrigated = _shift_profile(IRRIGATED_GREEN, 0.3 * self.fields["phenology"](ym, xm))
        soil_gain = 1.0 + 0.18 * self.fields["soil"](ym, xm)
        rockiness = np.clip(alt / 2000.0, 0.0, 1.0)
        ones = np.ones((N_MONTHS, *alt.shape))
        soil = SOIL[None, :, None, None] * soil_gain[None, None]

        def mix(*parts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            out = np.zeros((N_MONTHS, len(BAND_NAMES), *alt.shape))
            for share, spectrum in parts:
                share = share if share.ndim == 3 else share[None]
                out += share[:, None] * (spectrum[None, :, None, None] if spectrum.ndim == 1 else spectrum)
            return out

        yield mix((0.75 * ones, IMPERVIOUS), (0.13 * ones, soil), (0.12 * herb, GREEN_VEGETATION),
                  (0.12 * (1 - herb), DRY_VEGETATION))
        yield mix((cereal, GREEN_VEGETATION), ((1 - cereal) * straw, DRY_VEGETATION),
                  ((1 - cereal) * (1 - straw), soil))
        yield mix((irrigated, GREEN_VEGETATION), ((1 - irrigated) * 0.8, soil))
        yield mix((0.35 * ones, EVERGREEN_CANOPY), (0.65 * 0.45 * herb, GREEN_VEGETATION),
                  (0.65 * (1 - 0.45 * herb), soil))
        canopy = 0.8 * EVERGREEN_VIGOUR[:, None, None] * ones
        yield mix((canopy, EVERGREEN_CANOPY), ((1 - canopy) * herb, GREEN_VEGETATION),
                  ((1 - canopy) * (1 - herb), DRY_VEGETATION))
        yield mix((0.28 * ones, EVERGREEN_CANOPY), (0.72 * herb, GREEN_VEGETATION),
                  (0.72 * (1 - herb), DRY_VEGETATION))
        yield mix((0.45 * ones, EVERGREEN_CANOPY), (0.2 * herb, GREEN_VEGETATION),
                  (0.35 * (1 - rockiness) * ones, soil), ((0.35 * rockiness + 0.2 * (1 - herb)) * ones, ROCK))
        yield mix((0.9 * herb, GREEN_VEGETATION), (0.9 * (1 - herb), DRY_VEGETATION), (0.1 * ones, ROCK))
        yield mix((rockiness * ones, ROCK), ((1 - rockiness) * ones, soil))
        level = RESERVOIR_LEVEL[:, None, None] * ones
        yield mix((level, WATER), ((1 - level) * 0.7, soil))

    def _observe(self, row0, row1, ym, xm, abundance, alt, t_ave, precip):
        """Mixture + noise -> int16 reflectance, gaps and StateQA for the block."""
        c = self.config
        linear = np.zeros((N_MONTHS, len(BAND_NAMES), *alt.shape), dtype=np.float32)
        squares = np.zeros_like(linear)
        for share, spectrum in zip(abundance.astype(np.float32),
                                   self.class_spectra(ym, xm, alt, t_ave, precip)):
            weighted = share[None, None] * spectrum
            linear += weighted
            squares += weighted * weighted
        # Fan bilinear model: sum_{i<j} a_i a_j s_i s_j = ((sum a s)^2 - sum (a s)^2) / 2
        surface = linear + c.nonlinearity * 0.5 * (linear * linear - squares)
        del squares

        noise = self._per_row(row0, row1, "noise", lambda rng, width: rng.standard_normal(
            (2, N_MONTHS, len(BAND_NAMES), width), dtype=np.float32))
        surface *= 1.0 + np.float32(GAIN_NOISE_SD) * noise[0]
        surface += BAND_NOISE_SD.astype(np.float32)[None, :, None, None] * noise[1]
        del noise

        # Gaps: seasonal, spatially correlated clouds, more frequent over mountains.
        p_gap = np.clip(MONTHLY_GAP_PROBABILITY[:, None, None] * (1.0 + 0.6 * alt / 1000.0), 0, 0.95)
        clouds = np.stack([self.fields[f"cloud_{m}"](ym, xm) for m in range(N_MONTHS)])
        threshold = ndtri(1.0 - p_gap)
        gap = clouds > threshold
        adjacent = ~gap & (clouds > threshold - 0.25)
        persistent = self.fields["persistent_gaps"](ym, xm) > ndtri(0.99)
        draws = self._per_row(row0, row1, "gaps",
                              lambda rng, width: rng.random((3, N_MONTHS, width), dtype=np.float32))
        gap |= persistent[None] & (draws[0] < 0.85)
        t_month = t_ave[None] - 8.0 * np.cos(2 * np.pi * np.arange(N_MONTHS) / N_MONTHS)[:, None, None]
        snow = (t_month < 0.5) & ~gap

        water_pixel = abundance[LEVEL2_CLASSES.index("water")] > 0.5
        qa = np.where(water_pixel, QA_SHALLOW_INLAND_WATER, QA_LAND) | QA_AEROSOL_LOW
        qa = np.broadcast_to(qa, gap.shape).astype(np.uint16)
        kind = draws[1]  # which flag a gap carries: cloudy 70 %, mixed 20 %, shadow 10 %
        qa = np.where(gap & (kind < 0.7), qa | QA_CLOUDY | QA_INTERNAL_CLOUD, qa)
        qa = np.where(gap & (kind >= 0.7) & (kind < 0.9), qa | QA_MIXED_CLOUD, qa)
        qa = np.where(gap & (kind >= 0.9), qa | QA_CLOUD_SHADOW, qa)
        qa = np.where(snow, qa | QA_MOD35_SNOW | QA_INTERNAL_SNOW, qa)
        qa = np.where(adjacent & ~snow, qa | QA_ADJACENT_CLOUD, qa).astype(np.uint16)

        # Most flagged months have no clear observation (fill); some keep a contaminated value.
        slipped = draws[2] < SLIPPED_THROUGH
        cloud_share = np.clip(0.5 + 0.3 * clouds, 0.2, 1.0).astype(np.float32)[:, None]
        contaminated = np.where((gap & (kind < 0.9))[:, None],
                                cloud_share * CLOUD.astype(np.float32)[None, :, None, None]
                                + (1 - cloud_share) * surface,
                                np.float32(0.4) * surface)
        surface = np.where((gap & slipped)[:, None], contaminated, surface)
        surface = np.where((snow & slipped)[:, None], SNOW.astype(np.float32)[None, :, None, None], surface)

        low, high = REFLECTANCE_VALID_RANGE
        refl = np.clip(np.rint(surface * np.float32(1 / REFLECTANCE_SCALE)), low, high).astype(np.int16)
        refl[((gap | snow) & ~slipped)[:, None].repeat(len(BAND_NAMES), axis=1)] = REFLECTANCE_FILL
        return refl, qa

    def _per_row(self, row0: int, row1: int, name: str,
                 draw: Callable[[np.random.Generator, int], np.ndarray]) -> np.ndarray:
        """Random draws made row by row (``draw(rng, width)`` for each row, stacked on the
        second-last axis), so any block of rows sees the same numbers."""
        seeds = (_stable_seed(self.config.seed, name, r) for r in range(row0, row1))
        return np.stack([draw(np.random.default_rng(s), self.config.width) for s in seeds], axis=-2)


# --- Writing -----------------------------------------------------------------------------

@dataclass
class SimulationResult:
    cube: Path
    reference: Path
    msmtu: Path
    config: SimulationConfig


def _template(landscape: SyntheticAndalusia, with_reflectance: bool) -> xr.Dataset:
    """Lazy, all-zero dataset carrying coordinates, encodings and attributes."""
    c = landscape.config
    chunks2 = (c.chunk, c.chunk)
    coords = {"y": landscape.y_coords(), "x": landscape.x_coords()}
    ds = xr.Dataset(coords=coords)
    if with_reflectance:
        ds = ds.assign_coords(
            time=pd.date_range(f"{c.year}-01-01", periods=N_MONTHS, freq="MS"),
            band=np.array(BAND_NAMES, dtype=object))
        ds["reflectance"] = (("time", "band", "y", "x"), da.zeros(
            (N_MONTHS, len(BAND_NAMES), c.height, c.width), dtype=np.int16,
            chunks=(N_MONTHS, len(BAND_NAMES), *chunks2)))
        ds["state_qa"] = (("time", "y", "x"), da.zeros(
            (N_MONTHS, c.height, c.width), dtype=np.uint16, chunks=(N_MONTHS, *chunks2)))
        for name in ANCILLARY_NAMES:
            ds[name] = (("y", "x"), da.zeros((c.height, c.width), dtype=np.float32, chunks=chunks2))
            ds[name].attrs.update(units=ANCILLARY_UNITS[name], long_name=name.replace("_", " "))
        ds["reflectance"].attrs.update(
            scale_factor=REFLECTANCE_SCALE, units="1", long_name="surface reflectance",
            valid_range=list(REFLECTANCE_VALID_RANGE), source="synthetic MOD09A1 monthly composite")
        ds["state_qa"].attrs.update(
            long_name="MOD09A1 500 m state QA of the composited observation",
            comment="bits 0-1 cloud state, 2 cloud shadow, 3-5 land/water, 12 and 15 snow")
    ds["x"].attrs.update(units="m", standard_name="projection_x_coordinate")
    ds["y"].attrs.update(units="m", standard_name="projection_y_coordinate")
    with rioxarray_quietly():
        ds = ds.rio.write_crs(c.crs).rio.write_transform()
    ds.attrs.update(title="synthetic Andalusia-like region", source="msmtu-batch simulate",
                    software_version=__version__, seed=c.seed,
                    simulation_config=c.model_dump_json())
    return project_store(ds)


def _write_rows(store: Path, row0: int, arrays: dict[str, np.ndarray], group: str | None = None) -> None:
    """Write raw blocks of rows (y is the second-last axis) into an initialised store.

    The xarray template already holds every encoding and attribute; going through zarr
    keeps the stored integers exactly as generated.
    """
    height = next(iter(arrays.values())).shape[-2]
    write_window(store, arrays, slice(row0, row0 + height), group=group or "")


def _take_pixels(blk: Block, level1: np.ndarray, local: np.ndarray) -> dict[str, np.ndarray]:
    """The block's values at flat in-block pixel indices ``local`` (pixel axis last)."""
    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape((*a.shape[:-2], -1))[..., local]
    return {"reflectance": flat(blk.reflectance), "state_qa": flat(blk.state_qa),
            "level1": flat(level1), "level2": flat(blk.abundance),
            **{name: flat(a) for name, a in blk.ancillary.items()}}


def _write_sample(root: Path, landscape: SyntheticAndalusia, pixels: np.ndarray,
                  parts: list[dict[str, np.ndarray]], partition: np.ndarray) -> None:
    """Write the sampled pixels (sorted flat indices, collected block by block) as MSMTU."""
    c = landscape.config
    cols = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
    rows, columns = pixels // c.width, pixels % c.width
    refl = cols["reflectance"]
    write_msmtu_layout(
        root,
        square_ids=pixels,
        values=refl.transpose(2, 0, 1) * REFLECTANCE_SCALE,
        masks=observed_mask(refl, cols["state_qa"]).transpose(2, 0, 1),
        ancillary=pd.DataFrame({k: cols[k] for k in ANCILLARY_NAMES}),
        labels={level: pd.DataFrame(cols[level].T, columns=list(classes))
                for level, classes in LEVELS.items()},
        partition=partition[rows, columns],
        metadata=[{"row": int(r), "col": int(q), "x": float(landscape.x_coords()[q]),
                   "y": float(landscape.y_coords()[r]), "crs": c.crs}
                  for r, q in zip(rows, columns)],
        ancillary_units=ANCILLARY_UNITS,
        hierarchy=dict(CLASS_HIERARCHY),
    )


def simulate(config: SimulationConfig, out: str | Path, *, overwrite: bool = False,
             progress: Callable[[Iterator], Iterator] | None = None) -> SimulationResult:
    """Write ``out/cube.zarr``, ``out/reference.zarr`` and ``out/msmtu/`` for ``config``.

    ``progress`` wraps the iterator over row blocks (e.g. a rich progress bar).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    landscape = SyntheticAndalusia(config)
    c = config
    partition = spatial_block_split(c.height, c.width, c.split_block, c.split_fractions, c.seed)
    sample = np.sort(np.random.default_rng(_stable_seed(c.seed, "msmtu")).choice(
        c.height * c.width, min(c.msmtu_pixels, c.height * c.width), replace=False))
    sampled: list[dict[str, np.ndarray]] = []

    outputs = [out / "cube.zarr", out / "reference.zarr", out / "msmtu"]
    for final in outputs:
        if final.exists() and not overwrite:
            raise MsmtuError(f"{final} already exists; pass --overwrite to replace it")
    with staged_folder(outputs[0]) as cube, staged_folder(outputs[1]) as reference, staged_folder(outputs[2]) as msmtu:
        cube_template = _template(landscape, with_reflectance=True)
        cube_template.to_zarr(cube, mode="w", compute=False, encoding=cube_encoding(cube_template, c.chunk),
                              consolidated=False)
        ref_root = _template(landscape, with_reflectance=False)
        ref_root["partition"] = (("y", "x"), partition)
        ref_root["partition"].attrs.update(
            long_name="spatial block split", flag_values=list(range(len(PARTITIONS))),
            flag_meanings=" ".join(PARTITIONS), block_size_pixels=c.split_block)
        ref_root.attrs.update(levels=list(LEVELS), hierarchy=json.dumps(dict(CLASS_HIERARCHY)))
        ref_root.to_zarr(reference, mode="w", encoding=cube_encoding(ref_root, c.chunk), consolidated=False)
        for level, classes in LEVELS.items():
            level_ds = _template(landscape, with_reflectance=False).assign_coords(
                **{CLASS_DIM: np.array(classes, dtype=object)})
            level_ds["abundance"] = ((CLASS_DIM, "y", "x"), da.zeros(
                (len(classes), c.height, c.width), dtype=np.float32,
                chunks=(len(classes), c.chunk, c.chunk)))
            level_ds["abundance"].attrs.update(units="1", long_name=f"true {level} abundance",
                                               valid_range=[0.0, 1.0])
            if level == "level2":
                level_ds = level_ds.assign_coords(
                    parent_class=(CLASS_DIM, np.array([p for _, p in CLASS_HIERARCHY], dtype=object)))
            level_ds.to_zarr(reference, group=level, mode="w", compute=False,
                             encoding=cube_encoding(level_ds, c.chunk), consolidated=False)

        to_level1 = level_matrix()
        starts = range(0, c.height, c.chunk)
        for row0 in (progress(starts) if progress else starts):
            row1 = min(row0 + c.chunk, c.height)
            blk = landscape.rows(row0, row1)
            _write_rows(cube, row0, {"reflectance": blk.reflectance, "state_qa": blk.state_qa,
                                     **blk.ancillary})
            level1 = np.einsum("ck,kyx->cyx", to_level1, blk.abundance)
            for level, values in (("level1", level1), ("level2", blk.abundance)):
                _write_rows(reference, row0, {"abundance": values}, group=level)
            local = sample[(sample >= row0 * c.width) & (sample < row1 * c.width)] - row0 * c.width
            sampled.append(_take_pixels(blk, level1, local))
        _write_sample(msmtu, landscape, sample, sampled, partition)
        consolidate(cube)
        consolidate(reference)
    return SimulationResult(out / "cube.zarr", out / "reference.zarr", out / "msmtu", config)


def describe_region(out: str | Path) -> str:
    """A short, human-readable summary of a simulated region (what the demo prints)."""
    from msmtu_batch.inputs.cube import open_input_cube

    out = Path(out)
    ds = open_input_cube(out / "cube.zarr", validate=False)
    observed = xr.DataArray(
        da.blockwise(observed_mask, "tbyx", ds["reflectance"].data, "tbyx", ds["state_qa"].data, "tyx",
                     dtype=bool), dims=ds["reflectance"].dims).isel(band=0)
    per_month = observed.mean(("y", "x"))
    mostly_missing = (observed.sum("time") <= 3).mean()
    level2 = xr.open_zarr(out / "reference.zarr", group="level2")["abundance"]
    mixed = (level2.max(CLASS_DIM) < 0.9).mean()
    shares = level2.mean(("y", "x"))
    stats = {n: (ds[n].min(), ds[n].max()) for n in ("altitude", "slope", "precipitation",
                                                     "temperature_ave", "longitude", "latitude")}
    (per_month, mostly_missing, mixed, shares, stats) = dask.compute(
        per_month, mostly_missing, mixed, shares, stats)
    counts = {name: len(pd.read_csv(out / "msmtu" / "labels" / "level2" / "partitions" / f"{name}.csv",
                                    usecols=["square_id"])) for name in PARTITIONS}
    c = SimulationConfig.model_validate_json(ds.attrs["simulation_config"])
    rng = {k: f"{float(lo):.1f} .. {float(hi):.1f}" for k, (lo, hi) in stats.items()}
    months = pd.DatetimeIndex(ds["time"].values).strftime("%b")
    lines = [
        f"region      {c.height} x {c.width} pixels of {c.pixel_size:.1f} m, {ds.rio.crs.to_string()}, "
        f"seed {c.seed}, year {c.year}",
        f"position    longitude {rng['longitude']} deg, latitude {rng['latitude']} deg",
        f"terrain     altitude {rng['altitude']} m, slope {rng['slope']} deg",
        f"climate     precipitation {rng['precipitation']} mm/yr, mean temperature "
        f"{rng['temperature_ave']} degC",
        "observed    " + " ".join(f"{m} {float(v):.0%}" for m, v in zip(months, per_month.values)),
        f"gaps        {float(mostly_missing):.1%} of pixels have 3 or fewer clear months",
        f"mixing      {float(mixed):.0%} of pixels have no class above 90 % (level 2)",
        "classes     " + ", ".join(f"{k} {float(v):.0%}" for k, v in
                                   zip(LEVEL2_CLASSES, shares.values)),
        f"msmtu       {sum(counts.values())} pixels: " +
        ", ".join(f"{k} {v}" for k, v in counts.items()),
    ]
    return "\n".join(lines)
