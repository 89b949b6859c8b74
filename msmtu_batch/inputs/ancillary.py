"""Ancillary variables on the cube's grid, one chunk at a time, from rasters in any CRS.

- ``longitude``, ``latitude``: pixel centres transformed to WGS 84 (pyproj).
- ``altitude``: the DEM area-averaged onto each pixel (GDAL's ``average`` resampling, which
  weights source pixels by the fraction of them inside the target pixel).
- ``slope``: computed at the DEM's native resolution (central differences, degrees) with the
  pixel size in metres -- for a geographic DEM the metres of one pixel east and north on the
  DEM's ellipsoid at each row's latitude -- and then area-averaged like the altitude.
- climate (``precipitation``, ``evapotranspiration``, ``temperature_ave|max|min``): each
  raster resampled onto the grid, ``average`` when its pixels are smaller than the grid's
  and ``bilinear`` when larger (coarse climate grids are smooth fields).

Every chunk reads only the window of a source raster that covers it (plus a margin), so
memory follows the chunk size, not the raster size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numba
import numpy as np
import pyproj
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window

from msmtu_batch.inputs.layers import ANCILLARY_UNITS, CLIMATIC_NAMES
from msmtu_batch.inputs.units import convert, linear_conversion
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.tiling import covering_window

MARGIN = 3  # source pixels read beyond a chunk: the slope's neighbours and the resampling kernels
SLOPE_NAMES = ("altitude", "slope")


@dataclass(frozen=True)
class AncillarySources:
    dem: str | None = None
    climate: dict[str, str] = field(default_factory=dict)  # variable -> raster
    climate_units: dict[str, str] = field(default_factory=dict)  # variable -> units of its raster
    def names(self) -> tuple[str, ...]:
        """The ancillary variables these sources give, in contract order."""
        return ("longitude", "latitude") + (SLOPE_NAMES if self.dem else ()) + tuple(
            n for n in CLIMATIC_NAMES if n in self.climate)

    def check(self) -> AncillarySources:
        """Every raster opens and has a CRS; climate variables have contract names and units that
        convert to the contract's. Returns the sources with every climate raster's units resolved:
        as declared (``--climate-units``), else as the raster says (GDAL's band unit), else the
        contract's unit is assumed."""
        unknown = sorted((set(self.climate) | set(self.climate_units)) - set(CLIMATIC_NAMES))
        if unknown:
            raise MsmtuError(f"unknown climate variable(s) {', '.join(unknown)}; expected {', '.join(CLIMATIC_NAMES)}")
        if undeclared := sorted(set(self.climate_units) - set(self.climate)):
            raise MsmtuError(f"units given for {', '.join(undeclared)} but no raster (--climate NAME=RASTER)")
        if self.dem:
            with open_raster(self.dem):
                pass
        resolved = {}
        for name, path in self.climate.items():
            with open_raster(path) as src:
                units = self.climate_units.get(name) or (src.units[0] if src.units and src.units[0] else None)
            units = units or ANCILLARY_UNITS[name]
            if linear_conversion(units, ANCILLARY_UNITS[name]) is None:
                raise MsmtuError(f"{path}: {name} in {units!r} cannot be converted to the cube's "
                                 f"{ANCILLARY_UNITS[name]!r}; declare its units with --climate-units {name}=UNITS")
            resolved[name] = units
        return replace(self, climate_units=resolved)


def open_raster(path: str) -> rasterio.DatasetReader:
    """Open an ancillary raster; one clear message when it is unreadable or has no CRS."""
    try:
        src = rasterio.open(path)
    except rasterio.RasterioIOError as exc:
        raise MsmtuError(f"{path}: not a readable raster ({exc})") from None
    if src.crs is None:
        src.close()
        raise MsmtuError(f"{path}: raster has no CRS; expected a georeferenced raster")
    return src


def lonlat(crs: CRS, transform: Affine, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (degrees, WGS 84) of the pixel centres."""
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x, y = transform * (cols, rows)
    to_wgs84 = pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(crs.to_wkt()), "EPSG:4326", always_xy=True)
    lon, lat = to_wgs84.transform(x, y)
    return lon.astype(np.float32), lat.astype(np.float32)


def _source_window(src: rasterio.DatasetReader, crs: CRS, transform: Affine, height: int, width: int
                   ) -> Window | None:
    """The window of ``src`` covering the chunk plus MARGIN pixels, or None if they do not meet."""
    rows = covering_window(crs, transform, height, width, src.crs, src.transform, src.height, src.width, MARGIN)
    return None if rows is None else Window(rows[2], rows[0], rows[3] - rows[2], rows[1] - rows[0])


# source types whose every value, and so every nodata value, float32 holds exactly
_EXACT_IN_FLOAT32 = {"uint8", "int8", "uint16", "int16", "float32"}


def _read_float(src: rasterio.DatasetReader, window: Window, out: np.ndarray | None = None) -> np.ndarray:
    """Band 1 of ``window`` as float32, NaN where the raster says there is no value. Read as
    float32 straight into ``out`` when a nodata value marks the gaps (a chunk's DEM window
    costs a quarter of a masked read); through a masked read otherwise (mask bands, alpha,
    types float32 cannot hold)."""
    try:
        if src.dtypes[0] in _EXACT_IN_FLOAT32 and MaskFlags.per_dataset not in src.mask_flag_enums[0] \
                and MaskFlags.alpha not in src.mask_flag_enums[0]:
            values = src.read(1, window=window, out_dtype=np.float32, out=out)
            if src.nodata is not None and not np.isnan(src.nodata):
                values[values == np.float32(src.nodata)] = np.nan
            return values
        values = src.read(1, window=window, masked=True).astype(np.float32).filled(np.nan)
    except rasterio.RasterioIOError as exc:
        raise MsmtuError(f"{src.name}: cannot read window {window} ({exc})") from None
    if out is None:
        return values
    out[...] = values
    return out


def pixel_metres(src: rasterio.DatasetReader, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Metres spanned by one pixel east (dx) and north (dy) on each row of ``window``."""
    transform = src.window_transform(window)
    rows = int(window.height)
    if src.crs.is_geographic:
        geod = pyproj.CRS.from_user_input(src.crs.to_wkt()).get_geod()
        lat = transform.f + transform.e * (np.arange(rows) + 0.5)
        step_lon, step_lat = abs(transform.a), abs(transform.e)
        zeros = np.zeros(rows)
        # central differences span two pixels: measure two and halve
        dx = geod.inv(zeros, lat, zeros + 2 * step_lon, lat)[2] / 2
        dy = geod.inv(zeros, lat - step_lat, zeros, lat + step_lat)[2] / 2
        return dx, dy
    factor = src.crs.linear_units_factor[1]
    return np.full(rows, abs(transform.a) * factor), np.full(rows, abs(transform.e) * factor)


def slope_degrees(elevation: np.ndarray, dx: np.ndarray, dy: np.ndarray, out: np.ndarray | None = None
                  ) -> np.ndarray:
    """Slope (degrees) of ``elevation (rows, cols)``, at least 2 x 2, with per-row pixel sizes in
    metres: central differences inside, one-sided at the edges (``np.gradient``'s), in float32.
    One pass of a Numba kernel, into ``out`` if given (a chunk's 2 M DEM pixels took NumPy's
    gradient, hypot and arctan 0.08-0.12 s and five temporaries; the kernel 0.04 s, none)."""
    if out is None:
        out = np.empty(elevation.shape, np.float32)
    _slope_kernel(elevation.astype(np.float32, copy=False), dx.astype(np.float32), dy.astype(np.float32), out)
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _slope_kernel(elevation, dx, dy, out):  # pragma: no cover - compiled; tested against np.gradient
    rows, cols = elevation.shape
    for r in range(rows):
        above, below = max(r - 1, 0), min(r + 1, rows - 1)
        span_y = np.float32(below - above) * dy[r]
        for c in range(cols):
            left, right = max(c - 1, 0), min(c + 1, cols - 1)
            east = (elevation[r, right] - elevation[r, left]) / (np.float32(right - left) * dx[r])
            north = (elevation[below, c] - elevation[above, c]) / span_y
            out[r, c] = np.degrees(np.arctan(np.sqrt(east * east + north * north)))


def _warp(values: np.ndarray, src: rasterio.DatasetReader, window: Window, crs: CRS, transform: Affine,
          height: int, width: int, resampling: Resampling) -> np.ndarray:
    out = np.full((values.shape[0], height, width), np.nan, np.float32)
    reproject(values, out, src_transform=src.window_transform(window), src_crs=src.crs, src_nodata=np.nan,
              dst_transform=transform, dst_crs=crs, dst_nodata=np.nan, resampling=resampling, tolerance=0)
    return out


def _pixel_size_in(src: rasterio.DatasetReader, crs: CRS) -> float:
    """The source's pixel size expressed in the units of ``crs`` (from its whole extent)."""
    left, bottom, right, top = transform_bounds(src.crs, crs, *src.bounds, densify_pts=21)
    return float(np.sqrt((right - left) * (top - bottom) / (src.width * src.height)))


def chunk_ancillary(sources: AncillarySources, crs: CRS, transform: Affine, height: int, width: int
                    ) -> dict[str, np.ndarray]:
    """Every variable of :meth:`AncillarySources.names` on the chunk ``transform (height, width)``."""
    out: dict[str, np.ndarray] = {}
    out["longitude"], out["latitude"] = lonlat(crs, transform, height, width)
    if sources.dem:
        with open_raster(sources.dem) as src:
            window = _source_window(src, crs, transform, height, width)
            if window is None:
                out["altitude"] = out["slope"] = np.full((height, width), np.nan, np.float32)
            else:
                stacked = np.empty((2, window.height, window.width), np.float32)  # warped at once
                _read_float(src, window, out=stacked[0])
                slope_degrees(stacked[0], *pixel_metres(src, window), out=stacked[1])
                out["altitude"], out["slope"] = _warp(stacked, src, window, crs, transform, height, width,
                                                      Resampling.average)
    target_pixel = abs(transform.a)
    for name in CLIMATIC_NAMES:
        if name not in sources.climate:
            continue
        with open_raster(sources.climate[name]) as src:
            window = _source_window(src, crs, transform, height, width)
            if window is None:
                out[name] = np.full((height, width), np.nan, np.float32)
                continue
            finer = _pixel_size_in(src, crs) < target_pixel
            values = _warp(_read_float(src, window)[None], src, window, crs, transform, height, width,
                           Resampling.average if finer else Resampling.bilinear)[0]
            out[name] = convert(values, sources.climate_units.get(name, ANCILLARY_UNITS[name]), ANCILLARY_UNITS[name],
                                f"{src.name}: {name}")
    return out


def source_of(sources: AncillarySources, name: str) -> str:
    """The file a variable comes from (for messages)."""
    if name in SLOPE_NAMES:
        return str(sources.dem)
    return sources.climate.get(name, "the grid (pyproj)")


