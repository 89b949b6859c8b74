"""Reflectance sources for ``ingest``: MOD09A1 collection 6.1 HDF4-EOS granules and GeoTIFF exports.

Both give the compositor the same two things: a *source grid* (CRS, affine transform, shape)
and a list of dated :class:`Observation` objects, each able to read any window of that grid
(outside the data: fill). Granules of several tiles are mosaicked on the MODIS sinusoidal
grid by their grid metadata; GeoTIFF exports must all share one grid.

HDF4 is read with pyhdf (the wheels carry the HDF4 library; GDAL wheels lack the HDF4
driver). The HDF4 library is not thread-safe, so every call goes through one lock.

GeoTIFF exports (AppEEARS, Earth Engine...), one file per 8-day or monthly date:

- a multi-band file per date whose band descriptions are the MOD09A1 layer names
  (``sur_refl_b01`` .. ``sur_refl_b07``, optional ``sur_refl_state_500m`` and
  ``sur_refl_day_of_year``), or without descriptions 7 bands (+ StateQA, + day of year) in
  that order; or one single-band file per layer and date whose name contains the layer name
  (AppEEARS: ``MOD09A1.061_sur_refl_b01_doy2013001_aid0001.tif``);
- the date from the file name, ``A2013001`` / ``doy2013001`` (year and day of year) or
  ``2013-01-01`` / ``20130101``, or from a manifest CSV with columns ``path,date``
  (ISO dates; relative paths are relative to the manifest).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import re
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from msmtu_batch.inputs.layers import BAND_NAMES, REFLECTANCE_FILL
from msmtu_batch.inputs.sensors import (
    DEFAULT_SENSOR,
    MODIS_TERRA,
    SENSORS,
    Sensor,
    sensor_named,
    sensor_of_products,
)
from msmtu_batch.runtime.errors import MsmtuError

# The MODIS granule's facts, from its sensor spec (MYD09A1's are the same but for the product name)
PRODUCT = MODIS_TERRA.name  # the default product of a granule
HDF4_PRODUCTS = frozenset(p for s in SENSORS.values() if s.file_format == "HDF4-EOS" for p in s.products)
COLLECTION = MODIS_TERRA.collection
QA_LAYER = MODIS_TERRA.state_qa_layer
DOY_LAYER = MODIS_TERRA.day_of_year_layer
QC_LAYER = MODIS_TERRA.band_quality_layer  # per-band quality bits, read with IngestConfig.band_quality
QC_FILL = 4294967295
GRID_NAME = MODIS_TERRA.grid_name  # as in real MOD09A1/MYD09A1 C6 granules
LAYERS: tuple[str, ...] = (*MODIS_TERRA.band_layers, QA_LAYER, DOY_LAYER)
QA_FILL = 65535
DOY_FILL = -1
COMPOSITE_DAYS = MODIS_TERRA.composite_days

# The MODIS sinusoidal grid: a sphere of radius 6371007.181 m, 36 x 18 tiles of 1111950.5197665 m.
SPHERE_RADIUS = 6371007.181
SINUSOIDAL_CRS = CRS.from_proj4(f"+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R={SPHERE_RADIUS} +units=m +no_defs")
TILE_SIZE = 1111950.5196666666  # m: 2 x 10007554.677 / 18, as in real granules (h17v05 left -1111950.519667)
GRID_ORIGIN = (-20015109.354, 10007554.677)  # upper-left corner of tile h00v00

HDF4_LOCK = threading.Lock()
_ODL_OBJECT = r"OBJECT\s*=\s*{name}\b.*?VALUE\s*=\s*(\"[^\"]*\"|\S+)"


@dataclass(frozen=True)
class SourceGrid:
    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform * (0, 0)
        right, bottom = self.transform * (self.width, self.height)
        return min(left, right), min(top, bottom), max(left, right), max(top, bottom)


@dataclass
class ObservationWindow:
    """One date's values in a window: raw int16 reflectance (7, h, w), StateQA and day of
    year (h, w), the last two None when the source has no such layer."""

    reflectance: np.ndarray
    state_qa: np.ndarray | None
    day_of_year: np.ndarray | None
    band_quality: np.ndarray | None = None  # sur_refl_qc_500m (h, w), when asked for
    # the (9, h, w) int16 block whose views the first three are (reflectance, StateQA's bits,
    # day of year), when they come as one (GranuleObservation.read_strips)
    layers: np.ndarray | None = None


def _empty_window(height: int, width: int, has_qa: bool, has_doy: bool) -> ObservationWindow:
    return ObservationWindow(np.full((len(BAND_NAMES), height, width), REFLECTANCE_FILL, np.int16),
                             np.full((height, width), QA_FILL, np.uint16) if has_qa else None,
                             np.full((height, width), DOY_FILL, np.int16) if has_doy else None)


def _layered_window(block: np.ndarray) -> ObservationWindow:
    """A window of fill values whose arrays are views of ``block`` (9, h, w) int16."""
    block[:len(BAND_NAMES)] = REFLECTANCE_FILL
    block[len(BAND_NAMES)] = np.uint16(QA_FILL).view(np.int16)
    block[len(BAND_NAMES) + 1] = DOY_FILL
    return ObservationWindow(block[:len(BAND_NAMES)], block[len(BAND_NAMES)].view(np.uint16),
                             block[len(BAND_NAMES) + 1], layers=block)


def _paste(target: ObservationWindow, layer: str, values: np.ndarray, rows: slice, cols: slice) -> None:
    if layer == QA_LAYER:
        target.state_qa[rows, cols] = values
    elif layer == QC_LAYER:
        target.band_quality[rows, cols] = values
    elif layer == DOY_LAYER:
        target.day_of_year[rows, cols] = values.astype(np.int16)  # a uint16 layer's fill 65535 becomes -1
    else:
        target.reflectance[BAND_NAMES.index(layer), rows, cols] = values


def _overlap(start: int, stop: int, size: int) -> tuple[int, int]:
    """The part of [start, stop) inside [0, size)."""
    return max(start, 0), min(stop, size)


def strip_part(granule: Granule, row_off: int, col_off: int, top: int, bottom: int, col0: int, col1: int
               ) -> tuple[tuple[int, int], tuple[int, int], slice, slice] | None:
    """The part of the strip (mosaic rows ``top:bottom``, columns ``col0:col1``) that ``granule``,
    placed at (``row_off``, ``col_off``), covers: its own rows and columns, and where they go in
    the strip; None where it covers none of the strip's rows."""
    r0, r1 = _overlap(top - row_off, bottom - row_off, granule.shape[0])
    c0, c1 = _overlap(col0 - col_off, col1 - col_off, granule.shape[1])
    if r0 >= r1:
        return None
    return (r0, r1), (c0, c1), slice(r0 + row_off - top, r1 + row_off - top), slice(c0 + col_off - col0,
                                                                                  c1 + col_off - col0)


# --- MOD09A1 HDF4-EOS granules -------------------------------------------------------------

@dataclass(frozen=True)
class Granule:
    path: str
    start: dt.date  # first day of the 8-day composite
    tile: str  # hHHvVV
    upper_left: tuple[float, float]
    pixel_size: float
    shape: tuple[int, int]  # (rows, columns)
    product: str = PRODUCT  # MOD09A1 (Terra) or MYD09A1 (Aqua)


def _odl_value(text: str, name: str) -> str | None:
    match = re.search(_ODL_OBJECT.format(name=name), text, re.DOTALL | re.IGNORECASE)
    return match.group(1).strip('"') if match else None


def _struct_value(text: str, key: str) -> str | None:
    match = re.search(rf"\b{key}\s*=\s*([^\n]+)", text)
    return match.group(1).strip() if match else None


def _numbers(text: str | None) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", text or "")]


def text_attributes(sd, names: Sequence[str]) -> dict[str, str]:
    """The global text attributes ``names`` of an open pyhdf ``SD`` file (absent ones left out).
    pyhdf turns a text attribute into a string character by character in Python, 48 ms for
    the 32,000 characters HDF-EOS gives ``StructMetadata.0``; this takes the bytes from the
    buffer that pyhdf's own ``SDreadattr`` filled (0.3 ms), and falls back to pyhdf's way where
    that buffer's address is not available."""
    from pyhdf import hdfext
    from pyhdf.SD import SDC

    out: dict[str, str] = {}
    for index in range(sd.info()[1]):
        _status, name, data_type, count = hdfext.SDattrinfo(sd._id, index)
        if name not in names or data_type != SDC.CHAR8:
            continue
        buffer = hdfext.array_byte(count)
        if hdfext.SDreadattr(sd._id, index, buffer) < 0:
            continue
        try:
            raw = ctypes.string_at(int(buffer.this), count)
        except (AttributeError, TypeError, ValueError):
            raw = sd.attr(index).get().encode("latin-1")
        out[name] = raw.split(b"\0", 1)[0].decode("latin-1")
    return out


def sinusoidal_tile(path: str, struct: str, projection: str
                    ) -> tuple[str, tuple[float, float], float, tuple[int, int]]:
    """Where an HDF-EOS grid lies, from its ``StructMetadata.0`` (HDF-EOS2 or HDF-EOS5, whose
    projection is named ``GCTP_SNSOID`` or ``HE5_GCTP_SNSOID``): its tile (``hHHvVV``), upper-left
    corner, pixel size and (rows, columns), checked to be a square-pixel tile of the MODIS
    sinusoidal grid."""
    if _struct_value(struct, "Projection") != projection:
        raise MsmtuError(f"{path}: grid projection {_struct_value(struct, 'Projection')}, expected {projection}")
    radius = (_numbers(_struct_value(struct, "ProjParams")) or [0.0])[0]
    if not np.isclose(radius, SPHERE_RADIUS, rtol=1e-9):
        raise MsmtuError(f"{path}: sinusoidal sphere radius {radius}, expected {SPHERE_RADIUS}")
    columns, rows = (int(_numbers(_struct_value(struct, k))[0]) for k in ("XDim", "YDim"))
    left, top = _numbers(_struct_value(struct, "UpperLeftPointMtrs"))
    right, bottom = _numbers(_struct_value(struct, "LowerRightMtrs"))
    pixel = (right - left) / columns
    if not np.isclose((top - bottom) / rows, pixel, rtol=1e-6):
        raise MsmtuError(f"{path}: grid pixels are not square ({pixel} x {(top - bottom) / rows} m)")
    h, v = round((left - GRID_ORIGIN[0]) / TILE_SIZE), round((GRID_ORIGIN[1] - top) / TILE_SIZE)
    return f"h{h:02d}v{v:02d}", (left, top), pixel, (rows, columns)


def read_granule_info(path: str | Path) -> Granule:
    """Check a granule's product, collection, layers and grid metadata; return where it lies."""
    from pyhdf.error import HDF4Error
    from pyhdf.SD import SD, SDC

    path = str(path)
    try:
        with HDF4_LOCK:
            sd = SD(path, SDC.READ)
            try:
                attrs = text_attributes(sd, ("CoreMetadata.0", "StructMetadata.0"))
                datasets = sd.datasets()
            finally:
                sd.end()
    except HDF4Error as exc:
        raise MsmtuError(f"{path}: not a readable HDF4 file ({exc})") from None
    core, struct = attrs.get("CoreMetadata.0"), attrs.get("StructMetadata.0")
    if not core or not struct:
        raise MsmtuError(f"{path}: no CoreMetadata.0/StructMetadata.0 attributes; expected a MODIS HDF-EOS granule")
    product, version = _odl_value(core, "SHORTNAME"), _odl_value(core, "VERSIONID")
    if product not in HDF4_PRODUCTS:
        raise MsmtuError(f"{path}: product {product}, expected {' or '.join(sorted(HDF4_PRODUCTS))} (500 m 8-day "
                         "surface reflectance)")
    if version is None or int(float(version)) != COLLECTION:
        raise MsmtuError(f"{path}: collection {version}, expected {COLLECTION:03d} (collection 6.1)")
    begin = _odl_value(core, "RANGEBEGINNINGDATE")
    try:
        start = dt.date.fromisoformat(begin or "")
    except ValueError:
        raise MsmtuError(f"{path}: RANGEBEGINNINGDATE {begin!r} is not a date (YYYY-MM-DD)") from None
    tile, (left, top), pixel, (rows, columns) = sinusoidal_tile(path, struct, "GCTP_SNSOID")
    # day of year: uint16 (fill 65535) as MODAPS writes it, int16 (fill -1) as some tools rewrite it;
    # both read as int16 with -1 for fill
    expected_types = {QA_LAYER: (SDC.UINT16,), DOY_LAYER: (SDC.UINT16, SDC.INT16)}
    for layer in LAYERS:
        if layer not in datasets:
            raise MsmtuError(f"{path}: layer {layer} missing; a {product} granule has {', '.join(LAYERS)}")
        (_dims, shape, dtype, _index) = datasets[layer]
        types = expected_types.get(layer, (SDC.INT16,))
        if tuple(shape) != (rows, columns) or dtype not in types:
            raise MsmtuError(f"{path}: layer {layer} is {shape} of HDF4 type {dtype}, expected "
                             f"[{rows}, {columns}] of type {' or '.join(map(str, types))}")
    return Granule(path, start, tile, (left, top), pixel, (rows, columns), product)


@dataclass(frozen=True)
class GranuleObservation:
    """One 8-day composite of one satellite: a granule per tile, placed at (row, column)
    offsets of the mosaic."""

    start: dt.date
    granules: tuple[tuple[Granule, int, int], ...]

    @property
    def label(self) -> str:
        return self.granules[0][0].path

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(granule.path for granule, _, _ in self.granules)

    def read(self, row0: int, row1: int, col0: int, col1: int, band_quality: bool = False) -> ObservationWindow:
        """The window's values; with ``band_quality`` also ``sur_refl_qc_500m`` (fill outside
        the granules)."""
        strips = self.read_strips(row0, row1, col0, col1, row1 - row0, band_quality)
        try:
            return next(strips)[1]
        finally:
            strips.close()  # the granules are closed now, not when the generator is collected

    def read_strips(self, row0: int, row1: int, col0: int, col1: int, strip: int, band_quality: bool = False
                    ) -> Iterator[tuple[int, ObservationWindow]]:
        """The window in strips of ``strip`` rows, top to bottom: (first row, values) per strip.
        Each layer stays open from strip to strip, so that a deflate-compressed unchunked layer
        (as MODAPS writes them) is decompressed once: HDF4 inflates such a layer from its first
        row up to the last row asked for, and carries on from there on the next read of the
        same open layer. Every strip's values are views of one (9, strip, width) block
        (``ObservationWindow.layers``), refilled for the next strip: use a strip before asking
        for the next one (allocating 17 MB afresh per date cost a date task of the Andalusia
        benchmark a fifth of its page faults)."""
        from pyhdf.error import HDF4Error
        from pyhdf.SD import SD, SDC

        layers = (*LAYERS, QC_LAYER) if band_quality else LAYERS
        opened: list[tuple[Granule, int, int, object, dict]] = []
        granule, layer, r0, r1, c0, c1 = self.granules[0][0], LAYERS[0], row0, row1, col0, col1
        block = np.empty((len(BAND_NAMES) + 2, min(strip, row1 - row0), col1 - col0), np.int16)
        band_quality_block = np.empty(block.shape[1:], np.uint32) if band_quality else None
        try:
            try:
                for granule, row_off, col_off in self.granules:
                    c0, c1 = _overlap(col0 - col_off, col1 - col_off, granule.shape[1])
                    r0, r1 = _overlap(row0 - row_off, row1 - row_off, granule.shape[0])
                    if r0 >= r1 or c0 >= c1:
                        continue
                    with HDF4_LOCK:
                        sd = SD(granule.path, SDC.READ)
                        opened.append((granule, row_off, col_off, sd, {}))
                        if band_quality and QC_LAYER not in sd.datasets():
                            raise MsmtuError(f"{granule.path}: no {QC_LAYER} layer, which band_quality needs")
                        for layer in layers:
                            opened[-1][4][layer] = sd.select(layer)
                for top in range(row0, row1, strip):
                    bottom = min(top + strip, row1)
                    out = _layered_window(block[:, :bottom - top])
                    if band_quality_block is not None:
                        out.band_quality = band_quality_block[:bottom - top]
                        out.band_quality[:] = QC_FILL
                    for granule, row_off, col_off, _sd, datasets in opened:
                        if (part := strip_part(granule, row_off, col_off, top, bottom, col0, col1)) is None:
                            continue
                        (r0, r1), (c0, c1), rows, cols = part
                        for layer, sds in datasets.items():
                            with HDF4_LOCK:
                                values = sds[r0:r1, c0:c1]
                            _paste(out, layer, values, rows, cols)
                    yield top, out
            except HDF4Error as exc:
                raise MsmtuError(f"{granule.path}: cannot read {layer} rows {r0}:{r1}, columns {c0}:{c1} "
                                 f"({exc}); the file may be truncated or corrupt") from None
        finally:
            with HDF4_LOCK:
                for *_, sd, datasets in opened:
                    for sds in datasets.values():
                        sds.endaccess()
                    sd.end()


def granule_mosaic(granules: list[Granule], observation: type[GranuleObservation] | None = None
                   ) -> tuple[SourceGrid, list[GranuleObservation]]:
    """The mosaic of ``granules`` (tiles of one grid) and its observations, one per date and
    product, each read by ``observation`` (default :class:`GranuleObservation`, HDF4)."""
    observation = observation or GranuleObservation
    first = granules[0]
    for g in granules[1:]:
        if g.shape != first.shape or not np.isclose(g.pixel_size, first.pixel_size, rtol=1e-9):
            raise MsmtuError(f"{g.path}: grid of {g.shape[1]} x {g.shape[0]} pixels of {g.pixel_size:.4f} m "
                             f"differs from {first.path} ({first.shape[1]} x {first.shape[0]} of "
                             f"{first.pixel_size:.4f} m)")
    # one observation per date and satellite: Terra's and Aqua's composites of a date are two
    by_date: dict[tuple[dt.date, str], dict[str, Granule]] = defaultdict(dict)
    for g in granules:
        if g.tile in by_date[g.start, g.product]:
            raise MsmtuError(f"{g.path}: a second {g.product} granule of tile {g.tile} for {g.start} "
                             f"(the first is {by_date[g.start, g.product][g.tile].path})")
        by_date[g.start, g.product][g.tile] = g
    tiles = sorted({g.tile for g in granules})
    for (start, _product), found in sorted(by_date.items()):
        if len(found) != len(tiles):
            missing = sorted(set(tiles) - set(found))
            raise MsmtuError(f"{next(iter(found.values())).path}: the composite of {start} has tiles "
                             f"{', '.join(sorted(found))} but other dates have {', '.join(tiles)} "
                             f"(missing {', '.join(missing)}); give the same tiles for every date")
    pixel = first.pixel_size
    left = min(g.upper_left[0] for g in granules)
    top = max(g.upper_left[1] for g in granules)
    right = max(g.upper_left[0] + g.shape[1] * pixel for g in granules)
    bottom = min(g.upper_left[1] - g.shape[0] * pixel for g in granules)
    grid = SourceGrid(SINUSOIDAL_CRS, Affine(pixel, 0, left, 0, -pixel, top),
                      round((right - left) / pixel), round((top - bottom) / pixel))

    def offsets(g: Granule) -> tuple[Granule, int, int]:
        col, row = (g.upper_left[0] - left) / pixel, (top - g.upper_left[1]) / pixel
        if abs(col - round(col)) > 1e-3 or abs(row - round(row)) > 1e-3:
            raise MsmtuError(f"{g.path}: tile corner is not on the pixel grid of {first.path}")
        return g, round(row), round(col)

    observations = [observation(start, tuple(offsets(found[t]) for t in tiles))
                    for (start, _product), found in sorted(by_date.items())]
    return grid, observations


# --- GeoTIFF exports -----------------------------------------------------------------------

_DOY_NAME = re.compile(r"(?:^|[^0-9])(?:A|doy)(\d{4})(\d{3})(?![0-9])")
_ISO_NAME = re.compile(r"(?:^|[^0-9])(\d{4})-?(\d{2})-?(\d{2})(?![0-9])")


def date_from_name(name: str) -> dt.date | None:
    """The date in an export's file name: A2013001 / doy2013001, or 2013-01-01 / 20130101."""
    if match := _DOY_NAME.search(name):
        year, day = int(match.group(1)), int(match.group(2))
        return dt.date(year, 1, 1) + dt.timedelta(days=day - 1)
    if match := _ISO_NAME.search(name):
        try:
            return dt.date(*(int(g) for g in match.groups()))
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class GeoTiffObservation:
    """One date of a GeoTIFF export: for each layer, the file and its band (1-based)."""

    start: dt.date
    layers: tuple[tuple[str, str, int], ...]  # (layer, path, band)

    @property
    def label(self) -> str:
        return self.layers[0][1]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(path for _, path, _ in self.layers))

    def read(self, row0: int, row1: int, col0: int, col1: int, band_quality: bool = False) -> ObservationWindow:
        if band_quality:
            raise MsmtuError(f"{self.label}: GeoTIFF exports carry no {QC_LAYER}; band_quality needs MOD09A1 "
                             "granules")
        present = {layer for layer, _, _ in self.layers}
        out = _empty_window(row1 - row0, col1 - col0, QA_LAYER in present, DOY_LAYER in present)
        window = Window(col0, row0, col1 - col0, row1 - row0)
        for layer, path, band in self.layers:
            fill = {QA_LAYER: QA_FILL, DOY_LAYER: DOY_FILL}.get(layer, REFLECTANCE_FILL)
            try:
                with rasterio.open(path) as src:
                    values = src.read(band, window=window, boundless=True, fill_value=fill)
            except rasterio.RasterioIOError as exc:
                raise MsmtuError(f"{path}: cannot read {layer} ({exc}); the file may be truncated or corrupt") from None
            _paste(out, layer, values, slice(None), slice(None))
        return out


def _tiff_layers(path: Path, src: rasterio.DatasetReader) -> list[tuple[str, int]]:
    descriptions = [d for d in src.descriptions if d]
    if descriptions and all(d in LAYERS for d in descriptions) and len(descriptions) == src.count:
        return [(d, i + 1) for i, d in enumerate(src.descriptions)]
    if src.count == 1:
        named = [layer for layer in LAYERS if layer in path.name]
        if len(named) == 1:
            return [(named[0], 1)]
    if src.count in (7, 8, 9) and not descriptions:
        return [(layer, i + 1) for i, layer in enumerate(LAYERS[: src.count])]
    raise MsmtuError(f"{path}: cannot tell which MOD09A1 layers its {src.count} band(s) hold; name them "
                     f"by band description ({', '.join(LAYERS)}), give 7-9 bands in that order, or one "
                     "band per file with the layer in the file name")


def _geotiff_observations(paths: Sequence[Path], dates: dict[Path, dt.date]
                          ) -> tuple[SourceGrid, list[GeoTiffObservation]]:
    grid: SourceGrid | None = None
    first: Path | None = None
    by_date: dict[dt.date, dict[str, tuple[str, int]]] = defaultdict(dict)
    for path in paths:
        try:
            with rasterio.open(path) as src:
                if src.crs is None:
                    raise MsmtuError(f"{path}: raster has no CRS; expected a georeferenced GeoTIFF")
                this = SourceGrid(src.crs, src.transform, src.width, src.height)
                layers = _tiff_layers(path, src)
                dtypes = set(src.dtypes)
        except rasterio.RasterioIOError as exc:
            raise MsmtuError(f"{path}: not a readable raster ({exc})") from None
        if not dtypes <= {"int16", "uint16", "int32", "uint8"}:
            raise MsmtuError(f"{path}: data type {', '.join(sorted(dtypes))}; expected the MOD09A1 integers "
                             "(int16 reflectance scaled by 1e4, uint16 StateQA, int16 day of year)")
        if grid is None:
            grid, first = this, path
        elif this.crs != grid.crs or not this.transform.almost_equals(grid.transform) \
                or (this.width, this.height) != (grid.width, grid.height):
            raise MsmtuError(f"{path}: grid ({this.crs}, {this.width} x {this.height}, {tuple(this.transform)[:6]}) "
                             f"differs from {first} ({grid.crs}, {grid.width} x {grid.height}, "
                             f"{tuple(grid.transform)[:6]}); all exports must share one grid")
        start = dates.get(path) or date_from_name(path.name)
        if start is None:
            raise MsmtuError(f"{path}: no date in the file name (A2013001, doy2013001, 2013-01-01 or 20130101) "
                             "and no manifest entry")
        for layer, band in layers:
            if layer in by_date[start]:
                raise MsmtuError(f"{path}: a second {layer} for {start} (the first is {by_date[start][layer][0]})")
            by_date[start][layer] = (str(path), band)
    observations = []
    for start, layers in sorted(by_date.items()):
        missing = [b for b in BAND_NAMES if b not in layers]
        if missing:
            raise MsmtuError(f"{next(iter(layers.values()))[0]}: the export of {start} lacks {', '.join(missing)}")
        observations.append(GeoTiffObservation(start, tuple((layer, *layers[layer]) for layer in LAYERS
                                                            if layer in layers)))
    return grid, observations


def _read_manifest(manifest: Path) -> dict[Path, dt.date]:
    try:
        import pandas as pd  # here only: the Dask tasks that import this module do without pandas

        table = pd.read_csv(manifest, dtype=str)
    except (OSError, ValueError) as exc:
        raise MsmtuError(f"{manifest}: cannot read the manifest ({exc})") from None
    if not {"path", "date"} <= set(table.columns):
        raise MsmtuError(f"{manifest}: expected columns path,date; found {', '.join(table.columns)}")
    dates = {}
    for row in table.itertuples():
        path = Path(row.path) if Path(row.path).is_absolute() else manifest.parent / row.path
        try:
            dates[path] = dt.date.fromisoformat(row.date.strip())
        except ValueError:
            raise MsmtuError(f"{manifest}: date {row.date!r} of {row.path} is not YYYY-MM-DD") from None
    return dates


# --- entry point ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ReflectanceSource:
    kind: str  # "MOD09A1 HDF4", "MYD09A1 HDF4", "MOD09A1+MYD09A1 HDF4" or "GeoTIFF"
    grid: SourceGrid
    observations: tuple[GranuleObservation | GeoTiffObservation, ...]
    files: tuple[str, ...]
    sensor: Sensor = DEFAULT_SENSOR


def open_reflectance(inputs: Sequence[str | Path], manifest: str | Path | None = None,
                     sensor: str | None = None) -> ReflectanceSource:
    """Scan granules (MODIS HDF4-EOS ``.hdf``, VIIRS HDF5-EOS ``.h5``) or GeoTIFF exports (files
    or folders) and check that they fit together. ``sensor``: the spec the granules must be of
    (inputs/sensors.py); None takes the one that reads the products found (MOD09A1, MYD09A1,
    both: Terra+Aqua, VNP09A1 or VJ109A1)."""
    from msmtu_batch.inputs.viirs import ViirsObservation, read_viirs_granule_info  # it builds on this module

    dates = _read_manifest(Path(manifest)) if manifest else {}
    paths: list[Path] = list(dates) if manifest and not inputs else []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in _FORMATS)
        elif item.exists():
            paths.append(item)
        else:
            raise MsmtuError(f"{item}: input not found")
    if not paths:
        raise MsmtuError("no reflectance inputs: give MOD09A1/MYD09A1 granules (.hdf), VNP09A1 granules (.h5), "
                         "GeoTIFF exports or folders of them")
    kinds = {_FORMATS.get(p.suffix.lower(), "HDF4") for p in paths}
    if len(kinds) > 1:
        raise MsmtuError(f"inputs mix {' and '.join(sorted(kinds))} files; give one kind")
    kind = kinds.pop()
    if kind == "GeoTIFF":
        grid, observations = _geotiff_observations(paths, dates)
        return ReflectanceSource(kind, grid, tuple(observations), tuple(map(str, paths)), sensor_named(sensor))
    read_info, observation = (read_granule_info, GranuleObservation) if kind == "HDF4" else (
        read_viirs_granule_info, ViirsObservation)
    granules = [read_info(p) for p in paths]
    if sensor is None:
        spec = sensor_of_products({g.product for g in granules}, "inputs")
    else:
        spec = sensor_named(sensor)
        other = sorted((g for g in granules if not spec.reads(g.product)), key=lambda g: g.path)
        if other:
            raise MsmtuError(f"{other[0].path}: a {other[0].product} granule, but sensor {spec.name} reads "
                             f"{' and '.join(spec.products)} granules only")
    grid, observations = granule_mosaic(granules, observation)
    return ReflectanceSource(f"{spec.name} {kind}", grid, tuple(observations), tuple(map(str, paths)), spec)


_FORMATS = {".hdf": "HDF4", ".h5": "HDF5", ".tif": "GeoTIFF", ".tiff": "GeoTIFF"}  # input file kinds by suffix
