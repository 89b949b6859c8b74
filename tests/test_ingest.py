"""Ingest from real files written here: HDF4-EOS granules (pyhdf), GeoTIFFs and a GeoJSON
boundary (rasterio/GDAL), run on real Dask worker processes, checked value by value."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pyproj
import pytest
import rasterio
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.transform import from_origin

from msmtu_batch.inputs.ancillary import AncillarySources, _read_float, chunk_ancillary
from msmtu_batch.inputs.composite import CompositeRule, composite_months, composite_months_numpy
from msmtu_batch.inputs.cube import (
    BAND_NAMES,
    CLIMATIC_NAMES,
    REFLECTANCE_FILL,
    band_quality_rejected,
    open_input_cube,
)
from msmtu_batch.inputs.ingest_tasks import ScratchStore
from msmtu_batch.inputs.modis import (
    DOY_FILL,
    DOY_LAYER,
    QA_FILL,
    QA_LAYER,
    SINUSOIDAL_CRS,
    SPHERE_RADIUS,
    TILE_SIZE,
    ObservationWindow,
    open_reflectance,
    read_granule_info,
)
from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.artifact import save_artifact
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.orchestration.ingest import COUNT_VARIABLE, IngestConfig, ingest, planned_sources
from msmtu_batch.orchestration.pipeline import RunConfig, run
from msmtu_batch.runtime.digests import file_blake3
from msmtu_batch.runtime.errors import CubeValidationError, MsmtuError
from msmtu_batch.testing.granules import tile_upper_left, write_granule
from tests.conftest import gdal

N = 24  # pixels per tile side of the test granules (2400 in the product): 46.3 km pixels
YEAR = 2013
CLEAR = 0b001 << 3  # StateQA: land, cloud state 00 (clear)
STARTS = [dt.date(YEAR, 1, 1) + dt.timedelta(days=8 * i) for i in range(46)]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def scheduler(local_scheduler) -> str:
    """The session's LocalCluster, which this module's ingests connect to."""
    return local_scheduler


def tile_values(h: int) -> np.ndarray:
    """(7, N, N) reflectance that tells tile, row, column and band apart."""
    rows, cols = np.mgrid[0:N, 0:N]
    return np.stack([(h - 17) * 5000 + rows * 100 + cols + 7 * b for b in range(7)]).astype(np.int16)


def write_year(folder: Path, tiles=((17, 5), (18, 5)), starts=STARTS, values=tile_values, qa=None,
               band_quality=lambda start: None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for start in starts:
        doy = start.timetuple().tm_yday
        for h, v in tiles:
            write_granule(folder / f"MOD09A1.A{start.year}{doy:03d}.h{h:02d}v{v:02d}.061.2021000000000.hdf",
                          start, (h, v), values(h), np.full((N, N), CLEAR if qa is None else qa, np.uint16),
                          np.full((N, N), min(doy + 2, 365), np.int16), band_quality=band_quality(start))
    return folder


def geojson(path: Path, lon0: float, lat0: float, lon1: float, lat1: float) -> Path:
    ring = [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    return path


def write_raster(path: Path, values: np.ndarray, crs: str | None, transform, nodata: float | None = None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[-1], height=values.shape[-2],
                       count=1, dtype=values.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(values, 1)
    return path


# --- compositing ---------------------------------------------------------------------------

def reference_composite(refl, qa, doy, starts, year, rule):
    """Per pixel, in plain Python: the rules of msmtu_batch.inputs.composite written out another way."""
    n_dates, n_bands, height, width = refl.shape
    out = np.full((12, n_bands, height, width), REFLECTANCE_FILL, np.int16)
    counts = np.zeros((12, height, width), np.uint8)
    for y in range(height):
        for x in range(width):
            by_month: dict[int, list[int]] = {}
            for d in range(n_dates):
                q = int(qa[d, y, x])
                if (q & 3) in (1, 2) or q & 4 or q & (1 << 12) or q & (1 << 15):
                    continue
                if not all(-100 <= int(refl[d, b, y, x]) <= 16000 for b in range(n_bands)):
                    continue
                day = int(doy[d, y, x])
                if not 1 <= day <= 366:
                    continue
                obs_year = starts[d].year if day >= starts[d].timetuple().tm_yday else starts[d].year + 1
                date = dt.date(obs_year, 1, 1) + dt.timedelta(days=day - 1)
                if date.year == year:
                    by_month.setdefault(date.month - 1, []).append(d)
            for month, dates in by_month.items():
                counts[month, y, x] = len(dates)
                series = [[int(refl[d, b, y, x]) for d in dates] for b in range(n_bands)]
                if rule == "median":
                    out[month, :, y, x] = [round(statistics.median(s)) for s in series]
                elif rule == "mean":
                    out[month, :, y, x] = [round(statistics.mean(s)) for s in series]
                else:
                    ndvi = []
                    for d in dates:
                        red, nir = np.float32(refl[d, 0, y, x]), np.float32(refl[d, 1, y, x])
                        with np.errstate(divide="ignore", invalid="ignore"):
                            v = (nir - red) / (nir + red)
                        ndvi.append(-2.0 if np.isnan(v) else float(v))
                    out[month, :, y, x] = refl[dates[int(np.argmax(ndvi))], :, y, x]
    return out, counts


QA_BITS = st.sampled_from([0, 1, 2, 3, 4, 8, 1 << 12, 1 << 13, 1 << 15, 1 << 10, 0b011 << 3, 3 | 8])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), rule=st.sampled_from(list(CompositeRule)))
def test_composite_matches_a_per_pixel_reference(data, rule):
    n_dates = data.draw(st.integers(1, 10))
    starts = sorted(data.draw(st.lists(st.sampled_from([dt.date(2012, 12, 26), *STARTS]),
                                       min_size=n_dates, max_size=n_dates)))
    shape = (n_dates, 2, 3)
    values = st.one_of(st.integers(-100, 16000), st.sampled_from([REFLECTANCE_FILL, -101, 16001, 0]))
    refl = np.array(data.draw(st.lists(values, min_size=n_dates * 7 * 6, max_size=n_dates * 7 * 6)),
                    np.int16).reshape(n_dates, 7, 2, 3)
    qa = np.array(data.draw(st.lists(QA_BITS, min_size=n_dates * 6, max_size=n_dates * 6)), np.uint16).reshape(shape)
    offsets = np.array(data.draw(st.lists(st.sampled_from([0, 3, 7, -1, 400]), min_size=n_dates * 6,
                                          max_size=n_dates * 6))).reshape(shape)
    start_doy = np.array([s.timetuple().tm_yday for s in starts])[:, None, None]
    year_length = np.array([366 if s.year % 4 == 0 else 365 for s in starts])[:, None, None]
    doy = np.where(offsets == -1, -1, (start_doy - 1 + offsets) % year_length + 1).astype(np.int16)
    got = composite_months(refl, qa, doy, starts, YEAR, rule)
    want = reference_composite(refl, qa, doy, starts, YEAR, str(rule))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_dates=st.integers(1, 14), height=st.integers(1, 6), width=st.integers(1, 6),
       rule=st.sampled_from(list(CompositeRule)), with_qa=st.booleans(), strided=st.booleans())
def test_composite_kernel_matches_the_numpy_definition(seed, n_dates, height, width, rule, with_qa, strided):
    """The Numba kernel against composite_months_numpy on random dates, values (fill, out of
    range, equal values for ties), QA bits and days of year, on contiguous arrays and on the
    strided views the by-date ingest hands it."""
    rng = np.random.default_rng(seed)
    starts = sorted(rng.choice([dt.date(2012, 12, 26), *STARTS], n_dates))
    values = rng.choice(np.array([REFLECTANCE_FILL, -101, -100, 0, 1, 16000, 16001, 500, 500, 900], np.int16),
                        (n_dates, 9, height, width))
    values[:, :7] = np.where(rng.random((n_dates, 7, height, width)) < 0.5, values[:, :7],
                             rng.integers(-100, 16001, (n_dates, 7, height, width)))
    values[:, 7] = rng.choice(np.array([0, 1, 2, 3, 4, 8, 1 << 12, 1 << 15, 1 << 13], np.uint16),
                              (n_dates, height, width)).view(np.int16)
    start_doy = np.array([s.timetuple().tm_yday for s in starts])[:, None, None]
    values[:, 8] = np.where(rng.random((n_dates, height, width)) < 0.1, -1,
                            (start_doy - 1 + rng.integers(0, 8, (n_dates, height, width))) % 365 + 1)
    reflectance = values[:, :7] if strided else np.ascontiguousarray(values[:, :7])
    qa = (values[:, 7].view(np.uint16) if strided else np.ascontiguousarray(values[:, 7]).view(np.uint16)) \
        if with_qa else None
    doy = values[:, 8] if strided else np.ascontiguousarray(values[:, 8])
    got = composite_months(reflectance, qa, doy, starts, YEAR, rule)
    want = composite_months_numpy(reflectance, qa, doy, starts, YEAR, rule)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def one_pixel(values_by_date, qa_by_date, doy_by_date, starts, rule="median"):
    refl = np.array([[[[v]] for v in ([value] * 7 if np.isscalar(value) else value)]
                     for value in values_by_date], np.int16)
    qa = np.array(qa_by_date, np.uint16).reshape(-1, 1, 1)
    doy = np.array(doy_by_date, np.int16).reshape(-1, 1, 1)
    composite, counts = composite_months(refl, qa, doy, starts, YEAR, rule)
    return composite[:, :, 0, 0], counts[:, 0, 0]


@pytest.mark.parametrize(("flag", "kept"), [
    (0b00, True), (0b11, True),  # clear; cloud state not set (assumed clear)
    (0b01, False), (0b10, False),  # cloudy, mixed cloud
    (1 << 2, False),  # cloud shadow
    (1 << 12, False), (1 << 15, False),  # MOD35 snow/ice, internal snow mask
    (1 << 13, True), (1 << 10, True),  # adjacent to cloud, internal cloud flag: informative, kept
])
def test_each_qa_flag_rejects_or_keeps_an_observation(flag, kept):
    starts = [dt.date(YEAR, 3, 6), dt.date(YEAR, 3, 14)]
    composite, counts = one_pixel([1000, 3000], [CLEAR, CLEAR | flag], [66, 74], starts)
    assert counts[2] == (2 if kept else 1)
    assert composite[2, 0] == (2000 if kept else 1000)


def test_known_observations_composite_by_rule_and_actual_day():
    # composites of 29 Jan (days 29-36) and 6 Feb: the first holds a 2 February acquisition
    starts = [dt.date(YEAR, 1, 1), dt.date(YEAR, 1, 9), dt.date(YEAR, 1, 29), dt.date(YEAR, 2, 6)]
    values = [[1000, 2000, 100, 100, 100, 100, 100], [3000, 4000, 100, 100, 100, 100, 100],
              [500, 600, 7, 7, 7, 7, 7], [800, 4000, 9, 9, 9, 9, 9]]
    doys = [3, 12, 33, 40]
    median, counts = one_pixel(values, [CLEAR] * 4, doys, starts)
    assert list(counts[:3]) == [2, 2, 0]
    assert list(median[0, :2]) == [2000, 3000] and list(median[1, :3]) == [650, 2300, 8]
    assert (median[2:] == REFLECTANCE_FILL).all()  # months without a clear observation: fill, never 0
    mean, _ = one_pixel(values, [CLEAR] * 4, doys, starts, "mean")
    assert list(mean[1, :3]) == [650, 2300, 8]
    best, _ = one_pixel(values, [CLEAR] * 4, doys, starts, "max_ndvi")
    assert list(best[0, :3]) == [1000, 2000, 100]  # NDVI 0.33 beats 0.14
    assert list(best[1, :3]) == [800, 4000, 9]  # NDVI 0.67 beats 0.09


def test_previous_december_composite_gives_its_january_days():
    starts = [dt.date(YEAR - 1, 12, 26), dt.date(YEAR - 1, 12, 26)]
    composite, counts = one_pixel([1200, 1500], [CLEAR, CLEAR], [1, 366], starts)  # 1 Jan 2013, 31 Dec 2012
    assert counts[0] == 1 and composite[0, 0] == 1200 and counts.sum() == 1


# --- grid, mosaic, region, warping ---------------------------------------------------------

@pytest.fixture(scope="module")
def granules(tmp_path_factory) -> Path:
    return write_year(tmp_path_factory.mktemp("granules"), starts=STARTS[::4])


def test_mosaic_of_two_tiles_has_no_gap_or_duplicate(granules, tmp_path, scheduler):
    summary = ingest(IngestConfig(inputs=[granules], chunk=16), tmp_path / "cube.zarr", scheduler=scheduler)
    ds = open_input_cube(summary.out, ancillary=("longitude", "latitude")).load()
    assert (ds.sizes["y"], ds.sizes["x"]) == (N, 2 * N) and ds.rio.crs == SINUSOIDAL_CRS
    expected = np.concatenate([tile_values(17), tile_values(18)], axis=2)
    observed_months = [m for m in range(12) if (ds[COUNT_VARIABLE][m] > 0).any()]
    assert len(observed_months) == 12
    for month in observed_months:
        np.testing.assert_array_equal(ds["reflectance"][month].values, expected)
    left, top = tile_upper_left(17, 5)
    pixel = 2 * (tile_upper_left(18, 5)[0] - left) / (2 * N)
    np.testing.assert_allclose(ds["x"].values[[0, -1]], [left + pixel / 2, left + 2 * N * pixel - pixel / 2])
    np.testing.assert_allclose(ds["y"].values[[0, -1]], [top - pixel / 2, top - N * pixel + pixel / 2])
    # corner pixels: the sinusoidal formulas on the sphere (lat = y / R, lon = x / (R cos lat))
    for iy, ix in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        x, y = float(ds["x"][ix]), float(ds["y"][iy])
        lat = y / SPHERE_RADIUS
        assert float(ds["latitude"][iy, ix]) == pytest.approx(math.degrees(lat), abs=1e-4)
        assert float(ds["longitude"][iy, ix]) == pytest.approx(math.degrees(x / (SPHERE_RADIUS * math.cos(lat))),
                                                              abs=1e-4)
    assert ds.attrs["ancillary_variables"] == "longitude, latitude"
    assert ds.attrs["composite_rule"] == "median"
    # provenance: every granule with its digest, and a content id that follows the bytes
    import blake3

    record = json.loads(ds.attrs["source_files_record"])
    assert sorted(Path(r["path"]).name for r in record) == sorted(p.name for p in granules.iterdir())
    first = Path(record[0]["path"])
    assert record[0]["blake3"] == blake3.blake3(first.read_bytes()).hexdigest()
    changed = tmp_path / "changed"
    shutil.copytree(granules, changed)
    (changed / first.name).write_bytes(first.read_bytes() + b"\0")  # same granule, one byte more
    again = ingest(IngestConfig(inputs=[changed], chunk=16), tmp_path / "again.zarr", scheduler=scheduler)
    attrs = xr.open_zarr(again.out, consolidated=False).attrs
    assert attrs["content_id"].startswith("sha256:") and attrs["content_id"] != ds.attrs["content_id"]


def test_reprojected_grid_takes_the_nearest_source_pixel_inside_the_region(granules, tmp_path, scheduler):
    region = geojson(tmp_path / "region.geojson", -4.0, 37.0, 3.0, 39.5)
    config = IngestConfig(inputs=[granules], region=region, crs="EPSG:25830", resolution=20000, chunk=8)
    ds = open_input_cube(ingest(config, tmp_path / "cube.zarr", scheduler=scheduler).out,
                         ancillary=("longitude", "latitude")).load()
    assert ds.rio.crs.to_epsg() == 25830 and ds.rio.resolution() == (20000.0, -20000.0)
    assert float(ds["x"][0]) % 20000 == 10000  # pixels aligned on multiples of the resolution
    xx, yy = np.meshgrid(ds["x"].values, ds["y"].values)
    lon, lat = pyproj.Transformer.from_crs("EPSG:25830", "EPSG:4326", always_xy=True).transform(xx, yy)
    inside = (lon > -4) & (lon < 3) & (lat > 37) & (lat < 39.5)
    edge = (np.abs(lon + 4) < 0.3) | (np.abs(lon - 3) < 0.3) | (np.abs(lat - 37) < 0.3) | (np.abs(lat - 39.5) < 0.3)
    sx, sy = pyproj.Transformer.from_crs("EPSG:25830", SINUSOIDAL_CRS.to_wkt(), always_xy=True).transform(xx, yy)
    left, top = tile_upper_left(17, 5)
    pixel = (tile_upper_left(18, 5)[0] - left) / N
    col_f, row_f = (sx - left) / pixel, (top - sy) / pixel
    col, row = np.floor(col_f).astype(int), np.floor(row_f).astype(int)
    # GDAL's warper approximates the transformation along rows (error up to 0.125 pixel), so a centre
    # within 0.1 source pixel of a source pixel edge may go to either side
    tie = (np.abs(col_f - np.rint(col_f)) < 0.1) | (np.abs(row_f - np.rint(row_f)) < 0.1)
    mosaic = np.concatenate([tile_values(17), tile_values(18)], axis=2)
    band0 = ds["reflectance"][5, 0].values
    core = inside & ~edge & ~tie
    assert core.sum() > 100
    np.testing.assert_array_equal(band0[core], mosaic[0][row[core], col[core]])
    outside = ~inside & ~edge
    assert (band0[outside] == REFLECTANCE_FILL).all() and (ds[COUNT_VARIABLE].values[:, outside] == 0).all()
    assert np.isnan(ds["longitude"].values[outside]).all()
    np.testing.assert_allclose(ds["longitude"].values[core], lon[core], atol=1e-4)


def test_same_cube_from_geotiff_exports_as_from_granules(granules, tmp_path, scheduler):
    """AppEEARS-style exports (one file per layer and date, native projection) of the same data."""
    exports = tmp_path / "exports"
    exports.mkdir()
    left, top = tile_upper_left(17, 5)
    pixel = (tile_upper_left(18, 5)[0] - left) / N
    mosaic = np.concatenate([tile_values(17), tile_values(18)], axis=2)
    for start in STARTS[::4]:
        doy = start.timetuple().tm_yday
        layers = dict(zip(BAND_NAMES, mosaic)) | {QA_LAYER: np.full((N, 2 * N), CLEAR, np.uint16),
                                                  DOY_LAYER: np.full((N, 2 * N), doy + 2, np.int16)}
        for layer, values in layers.items():
            write_raster(exports / f"MOD09A1.061_{layer}_doy{YEAR}{doy:03d}_aid0001.tif", values,
                         SINUSOIDAL_CRS.to_wkt(), from_origin(left, top, pixel, pixel))
    from_hdf = ingest(IngestConfig(inputs=[granules], chunk=16), tmp_path / "hdf.zarr", scheduler=scheduler)
    # (and as Zarr v2, for readers without v3: the same values, consolidated, no warning)
    from_tif = ingest(IngestConfig(inputs=[exports], chunk=16, zarr_format=2), tmp_path / "tif.zarr",
                      scheduler=scheduler)
    assert (from_tif.out / ".zmetadata").is_file() and (from_tif.out / "reflectance" / ".zarray").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = (xr.open_zarr(s.out, mask_and_scale=False).load() for s in (from_hdf, from_tif))
    np.testing.assert_array_equal(a["reflectance"].values, b["reflectance"].values)
    np.testing.assert_array_equal(a[COUNT_VARIABLE].values, b[COUNT_VARIABLE].values)


# --- ancillary -----------------------------------------------------------------------------

def test_slope_of_inclined_planes_in_geographic_and_projected_dems(tmp_path):
    geod = pyproj.Geod(ellps="WGS84")
    step = 0.01
    lats = 40.0 - (np.arange(600) + 0.5) * step
    north = geod.inv(np.zeros_like(lats), np.full_like(lats, 34.0), np.zeros_like(lats), lats)[2]
    plane_20 = np.repeat((100 + np.tan(np.radians(20)) * north)[:, None], 1300, axis=1).astype(np.float32)
    geographic = write_raster(tmp_path / "dem_4326.tif", plane_20, "EPSG:4326", from_origin(-9.0, 40.0, step, step))
    xs = 100000 + (np.arange(900) + 0.5) * 1000.0
    plane_30 = np.repeat((np.tan(np.radians(30)) * (xs - 100000))[None], 700, axis=0).astype(np.float32)
    projected = write_raster(tmp_path / "dem_25830.tif", plane_30, "EPSG:25830",
                             from_origin(100000, 4500000, 1000, 1000))
    grid = (rasterio.crs.CRS.from_epsg(25830), from_origin(300000, 4300000, 5000, 5000), 30, 40)
    for dem, degrees in [(geographic, 20.0), (projected, 30.0)]:
        values = chunk_ancillary(AncillarySources(str(dem)), *grid)
        assert np.isfinite(values["slope"]).all()
        np.testing.assert_allclose(values["slope"], degrees, atol=0.1)
    # altitude: the area average of the 30-degree plane is its value at the pixel centre
    altitude = chunk_ancillary(AncillarySources(str(projected)), *grid)["altitude"]
    centres = 300000 + (np.arange(40) + 0.5) * 5000
    np.testing.assert_allclose(altitude, np.broadcast_to(np.tan(np.radians(30)) * (centres - 100000), (30, 40)),
                               rtol=1e-4)


@pytest.mark.parametrize("dtype, nodata, mask_band", [
    ("int16", -32768, False), ("uint16", 0, False), ("float32", -9999.0, False), ("float32", float("nan"), False),
    ("float32", None, False), ("float64", -9999.0, False), ("int32", -2147483648, False), ("float32", None, True)])
def test_ancillary_reads_are_float32_with_nan_where_the_raster_has_no_value(tmp_path, dtype, nodata, mask_band):
    """Whatever way a raster marks its gaps (a nodata value of any type, or a mask band), a window
    reads as float32 with NaN there, into a given array too."""
    rng = np.random.default_rng(7)
    values = rng.integers(1, 3000, size=(40, 50)).astype(dtype)
    gaps = rng.random(values.shape) < 0.1
    path = tmp_path / "dem.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=1, dtype=dtype, crs="EPSG:4326",
                       transform=from_origin(-3, 38, 0.01, 0.01), nodata=nodata) as dst:
        written = np.where(gaps, nodata if nodata is not None else 0, values).astype(dtype)
        dst.write(written, 1)
        if mask_band:
            dst.write_mask(np.where(gaps, 0, 255).astype(np.uint8))
    marked = nodata is not None or mask_band  # without either, a gap is a value like any other
    want = np.where(gaps & marked, np.nan, written.astype(np.float32))
    window = rasterio.windows.Window(5, 3, 30, 20)
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(_read_float(src, window), want[3:23, 5:35])
        into = np.zeros((20, 30), np.float32)
        assert _read_float(src, window, out=into) is into
        np.testing.assert_array_equal(into, want[3:23, 5:35])


def test_coarse_climate_is_interpolated_and_fine_climate_averaged(tmp_path):
    grid = (rasterio.crs.CRS.from_epsg(25830), from_origin(300000, 4300000, 5000, 5000), 10, 12)
    xs = 200000 + (np.arange(40) + 0.5) * 20000
    coarse = write_raster(tmp_path / "pre.tif", np.repeat((xs / 1000)[None], 20, 0).astype(np.float32),
                          "EPSG:25830", from_origin(200000, 4400000, 20000, 20000))
    fine_x = 250000 + (np.arange(400) + 0.5) * 1000
    fine = write_raster(tmp_path / "tmax.tif", np.repeat((fine_x / 1000)[None], 300, 0).astype(np.float32),
                        "EPSG:25830", from_origin(250000, 4350000, 1000, 1000))
    values = chunk_ancillary(AncillarySources(climate={"precipitation": str(coarse), "temperature_max": str(fine)}),
                             *grid)
    centres_km = (300000 + (np.arange(12) + 0.5) * 5000) / 1000  # a linear field: both give the centre value
    np.testing.assert_allclose(values["precipitation"], np.broadcast_to(centres_km, (10, 12)), rtol=1e-5)
    np.testing.assert_allclose(values["temperature_max"], np.broadcast_to(centres_km, (10, 12)), rtol=1e-5)


def test_climate_units_are_declared_or_read_and_converted(tmp_path):
    grid = (rasterio.crs.CRS.from_epsg(25830), from_origin(300000, 4300000, 5000, 5000), 10, 12)
    transform = from_origin(250000, 4350000, 1000, 1000)
    monthly = write_raster(tmp_path / "pre.tif", np.full((300, 400), 50.0, np.float32), "EPSG:25830", transform)
    kelvin = write_raster(tmp_path / "tave.tif", np.full((300, 400), 290.0, np.float32), "EPSG:25830", transform)
    with rasterio.open(kelvin, "r+") as raster:
        raster.set_band_unit(1, "K")  # the raster says its unit; precipitation's is declared
    sources = AncillarySources(climate={"precipitation": str(monthly), "temperature_ave": str(kelvin)},
                               climate_units={"precipitation": "mm month-1"}).check()
    assert sources.climate_units == {"precipitation": "mm month-1", "temperature_ave": "K"}
    values = chunk_ancillary(sources, *grid)
    np.testing.assert_allclose(values["precipitation"], 600.0, rtol=1e-6)  # mm year-1
    np.testing.assert_allclose(values["temperature_ave"], 290.0 - 273.15, rtol=1e-5)  # degC
    with pytest.raises(MsmtuError) as err:
        AncillarySources(climate={"precipitation": str(monthly)}, climate_units={"precipitation": "degC"}).check()
    assert str(err.value) == (f"{monthly}: precipitation in 'degC' cannot be converted to the cube's 'mm year-1'; "
                              "declare its units with --climate-units precipitation=UNITS")


# --- bad input -----------------------------------------------------------------------------

def one_granule(folder: Path, start=STARTS[0], tile=(17, 5), **kwargs) -> Path:
    folder.mkdir(exist_ok=True)
    doy = start.timetuple().tm_yday
    return write_granule(folder / f"MOD09A1.A{start.year}{doy:03d}.h{tile[0]}v{tile[1]:02d}.061.hdf", start, tile,
                         tile_values(17), np.full((N, N), CLEAR, np.uint16), np.full((N, N), doy, np.int16), **kwargs)


def test_bad_granules_are_named(tmp_path):
    wrong_product = one_granule(tmp_path / "a", product="MOD09Q1")
    with pytest.raises(MsmtuError, match=rf"^{wrong_product}: product MOD09Q1, expected MOD09A1 "):
        ingest(IngestConfig(inputs=[wrong_product]), tmp_path / "c.zarr")
    wrong_collection = one_granule(tmp_path / "b", collection=6)
    with pytest.raises(MsmtuError, match=rf"^{wrong_collection}: collection 6, expected 061 \(collection 6.1\)$"):
        ingest(IngestConfig(inputs=[wrong_collection]), tmp_path / "c.zarr")
    good = one_granule(tmp_path / "c")
    corrupt = tmp_path / "c" / "MOD09A1.A2013009.h17v05.061.hdf"
    corrupt.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(MsmtuError, match=rf"^{corrupt}: not a readable HDF4 file"):
        ingest(IngestConfig(inputs=[good, corrupt]), tmp_path / "c.zarr")


def test_mismatched_tiles_and_years_are_named(tmp_path):
    folder = tmp_path / "g"
    one_granule(folder, tile=(17, 5))
    one_granule(folder, tile=(18, 5))
    lone = one_granule(folder, start=STARTS[1], tile=(17, 5))
    with pytest.raises(MsmtuError, match=rf"^{lone}: the composite of 2013-01-09 has tiles h17v05 but other dates "
                                         r"have h17v05, h18v05 \(missing h18v05\)"):
        ingest(IngestConfig(inputs=[folder]), tmp_path / "c.zarr")
    one_granule(folder, start=STARTS[1], tile=(18, 5))
    other_year = one_granule(folder, start=dt.date(2014, 6, 2), tile=(17, 5))
    one_granule(folder, start=dt.date(2014, 6, 2), tile=(18, 5))
    with pytest.raises(MsmtuError, match=rf"^{other_year}: the composite of 2014-06-02 is outside 2013; the inputs "
                                         r"span 2013-2014: set the year \(repeat --year for several years\)$"):
        ingest(IngestConfig(inputs=[folder]), tmp_path / "c.zarr")
    with pytest.raises(MsmtuError, match=r"^no composite of the inputs reaches into 2015 \(they span 2013-01-01 to "
                                         r"2014-06-09\)$"):
        ingest(IngestConfig(inputs=[folder], year=2015), tmp_path / "c.zarr")


def test_raster_without_crs_and_boundary_elsewhere_are_named(granules, tmp_path):
    dem = write_raster(tmp_path / "dem.tif", np.zeros((10, 10), np.float32), None, from_origin(0, 10, 1, 1))
    with pytest.raises(MsmtuError, match=rf"^{dem}: raster has no CRS; expected a georeferenced raster$"):
        ingest(IngestConfig(inputs=[granules], dem=dem), tmp_path / "c.zarr")
    far = geojson(tmp_path / "far.geojson", 100.0, 10.0, 101.0, 11.0)
    with pytest.raises(MsmtuError, match=rf"^{far}: boundary does not intersect the reflectance data"):
        ingest(IngestConfig(inputs=[granules], region=far), tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()


def test_interrupted_ingest_leaves_nothing_that_validates(granules, tmp_path, scheduler):
    # precipitation covering only the western tile: the chunks over the eastern one fail
    left, top = tile_upper_left(17, 5)
    pixel = (tile_upper_left(18, 5)[0] - left) / N
    half = write_raster(tmp_path / "pre.tif", np.full((N, N), 500, np.float32), SINUSOIDAL_CRS.to_wkt(),
                        from_origin(left, top, pixel, pixel))
    out = tmp_path / "cube.zarr"
    with pytest.raises(MsmtuError, match=rf"^{half}: no precipitation value for \d+ pixel\(s\) with observed "
                                         r"reflectance in chunk y 0:8, x \d+:\d+ of the cube"):
        ingest(IngestConfig(inputs=[granules], climate={"precipitation": half}, chunk=8), out, scheduler=scheduler)
    assert not out.exists() and not (tmp_path / ".cube.zarr.scratch").exists()
    staging = tmp_path / ".cube.zarr.partial"
    assert staging.exists()
    with pytest.raises(CubeValidationError, match="ingest_status is 'incomplete': an interrupted ingest"):
        open_input_cube(staging, ancillary=())


def test_missing_sources_refused_when_the_model_needs_them(granules, region, tmp_path):
    pixels = read_cube_reference(region.cube, region.reference, "level1")
    artifact = train(pixels, "level1", TrainConfig(epochs=1, hidden=8, embed=4, head_hidden=8, ancillary="geotopo"))
    model = save_artifact(artifact.artifact, tmp_path / "model.safetensors")
    with pytest.raises(MsmtuError, match=rf"^{model}: the model needs ancillary variable\(s\) altitude, slope that "
                                         r"the given sources do not provide \(add --dem\)$"):
        ingest(IngestConfig(inputs=[granules]), tmp_path / "c.zarr", model=model)


# --- end to end: ingest, then run unchanged ------------------------------------------------

def test_ingest_then_run_from_the_command_line(granules, region, scheduler, tmp_path):
    pixels = read_cube_reference(region.cube, region.reference, "level1")
    artifact = train(pixels, "level1", TrainConfig(epochs=1, hidden=8, embed=4, head_hidden=8))
    model = save_artifact(artifact.artifact, tmp_path / "model.safetensors")
    transform = from_origin(-10.0, 42.0, 0.05, 0.05)
    dem = write_raster(tmp_path / "dem.tif", np.linspace(0, 900, 200 * 300, dtype=np.float32).reshape(200, 300),
                       "EPSG:4326", transform)
    args = ["--dem", str(dem)]
    for i, name in enumerate(CLIMATIC_NAMES):
        path = write_raster(tmp_path / f"{name}.tif", np.full((200, 300), 10.0 * (i + 1), np.float32), "EPSG:4326",
                            transform)
        args += ["--climate", f"{name}={path}"]
    region_file = geojson(tmp_path / "region.geojson", -4.0, 37.0, 3.0, 39.5)
    cube, out = tmp_path / "cube.zarr", tmp_path / "out.zarr"
    done = subprocess.run([BIN / "msmtu-batch", "ingest", str(granules), "--out", str(cube), "--region",
                           str(region_file), "--crs", "EPSG:25830", "--resolution", "20000", "--chunk", "16",
                           "--model", str(model), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ancillary longitude, latitude, altitude, slope, precipitation" in done.stdout
    # the granules lie far from the simulated region the model was trained on: the guard stops the
    # run, and mapping it anyway flags every estimated pixel (in this process: the command line
    # of `run` is tested in test_pipeline)
    with pytest.raises(MsmtuError, match="standard deviations"):
        run(cube, model, out, config=RunConfig(chunk=16), scheduler=scheduler)
    run(cube, model, out, config=RunConfig(chunk=16, out_of_distribution="flag"), scheduler=scheduler)
    result = xr.open_zarr(out, consolidated=False)
    observed = (xr.open_zarr(cube, consolidated=False)["clear_count"] > 0).any("time").values
    estimated = np.isfinite(result["abundance"].values).all(axis=0)
    assert estimated.sum() > 100 and not estimated[~observed].any()
    assert (result["quality_flag"].values[estimated] == 2).all()


def test_workflow_ingest_section_is_a_valid_ingest_config():
    import yaml

    section = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflows/andalusia_2013.yaml").read_text())
    config = IngestConfig(**section["ingest"])
    assert config.crs == "EPSG:25830" and config.resolution == 460 and set(config.climate) == set(CLIMATIC_NAMES)
    assert config.ancillary_sources().names() == ("longitude", "latitude", "altitude", "slope", *CLIMATIC_NAMES)


def test_ingest_example_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "examples/ingest_granules.py", "--out", str(tmp_path), "--pixels", "12"],
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "inside the region" in result.stdout and "mean clear observations per month" in result.stdout


def test_ingest_example_without_the_hdfeos_library_says_what_to_install(tmp_path):
    """On a machine without Debian's libhdfeos0 the example ends with one line naming the
    package, exit 2, not a traceback (the library is hidden here by pointing at a missing file)."""
    root = Path(__file__).resolve().parents[1]
    missing = tmp_path / "libhdfeos.so.0"
    result = subprocess.run([sys.executable, "examples/ingest_granules.py", "--out", str(tmp_path), "--pixels", "4"],
                            capture_output=True, text=True, timeout=300, cwd=root,
                            env=os.environ | {"MSMTU_HDFEOS_LIBRARY": str(missing)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"ingest_granules.py: error: the HDF-EOS2 library ({missing}) is not installed: apt-get install libhdfeos0 "
        "(Debian, Ubuntu; `make system-packages`), or set MSMTU_HDFEOS_LIBRARY to its path; it writes "
        "MOD09A1-shaped granules")


def test_monthly_multiband_exports_listed_in_a_manifest(tmp_path, scheduler):
    """Earth-Engine-style exports: one 7-band file per month (band descriptions, geographic CRS),
    dates from a manifest; without QA or day-of-year layers each file's date gives the month."""
    folder = tmp_path / "exports"
    folder.mkdir()
    values = np.arange(12 * 7 * 6 * 8, dtype=np.int16).reshape(12, 7, 6, 8)
    values[3, 2, 1, 1] = REFLECTANCE_FILL  # one band missing: the whole observation is not clear
    rows = ["path,date"]
    for month in range(12):
        path = folder / f"export_{month:02d}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=8, height=6, count=7, dtype="int16", crs="EPSG:4326",
                           transform=from_origin(-5.0, 38.0, 0.01, 0.01)) as dst:
            dst.write(values[month])
            dst.descriptions = BAND_NAMES
        rows.append(f"exports/{path.name},{YEAR}-{month + 1:02d}-01")  # relative to the manifest
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    summary = ingest(IngestConfig(manifest=manifest), tmp_path / "cube.zarr", scheduler=scheduler)
    ds = open_input_cube(summary.out, ancillary=("longitude", "latitude")).load()
    expected = values.copy()
    expected[3, :, 1, 1] = REFLECTANCE_FILL
    np.testing.assert_array_equal(ds["reflectance"].values, expected)
    assert ds[COUNT_VARIABLE].values[3, 1, 1] == 0 and ds[COUNT_VARIABLE].values.sum() == 12 * 48 - 1
    np.testing.assert_allclose(ds["longitude"].values[0, 0], -4.995, atol=1e-5)
    np.testing.assert_allclose(ds["latitude"].values[-1, 0], 37.945, atol=1e-5)


# --- granules as NASA writes them: through the HDF-EOS2 library -----------------------------

def write_hand_made_granule(path: Path, start: dt.date, tile: tuple[int, int], reflectance: np.ndarray,
                            state_qa: np.ndarray, day_of_year: np.ndarray) -> Path:
    """The same content as another tool writes it without the HDF-EOS library: plain HDF4
    SDS (pyhdf), a StructMetadata.0 written by hand, day of year as int16 with fill -1."""
    from pyhdf.SD import SD, SDC

    rows, columns = state_qa.shape
    left, top = tile_upper_left(*tile)
    struct = ("GROUP=SwathStructure\nEND_GROUP=SwathStructure\nGROUP=GridStructure\n\tGROUP=GRID_1\n"
              '\t\tGridName="MOD_Grid_500m_Surface_Reflectance"\n'
              f"\t\tXDim={columns}\n\t\tYDim={rows}\n\t\tUpperLeftPointMtrs=({left:.6f},{top:.6f})\n"
              f"\t\tLowerRightMtrs=({left + TILE_SIZE:.6f},{top - TILE_SIZE:.6f})\n\t\tProjection=GCTP_SNSOID\n"
              f"\t\tProjParams=({SPHERE_RADIUS:.6f},0,0,0,0,0,0,0,0,0,0,0,0)\n\t\tSphereCode=-1\n"
              "\tEND_GROUP=GRID_1\nEND_GROUP=GridStructure\nEND\n")
    core = (f'GROUP = INVENTORYMETADATA\n  OBJECT = SHORTNAME\n    VALUE = "MOD09A1"\n  END_OBJECT = SHORTNAME\n'
            f'  OBJECT = VERSIONID\n    VALUE = 61\n  END_OBJECT = VERSIONID\n  OBJECT = RANGEBEGINNINGDATE\n'
            f'    VALUE = "{start}"\n  END_OBJECT = RANGEBEGINNINGDATE\nEND_GROUP = INVENTORYMETADATA\nEND\n')
    sd = SD(str(path), SDC.WRITE | SDC.CREATE | SDC.TRUNC)
    sd.attr("StructMetadata.0").set(SDC.CHAR, struct)
    sd.attr("CoreMetadata.0").set(SDC.CHAR, core)
    layers = [(b, reflectance[i], SDC.INT16, REFLECTANCE_FILL) for i, b in enumerate(BAND_NAMES)]
    layers += [(QA_LAYER, state_qa, SDC.UINT16, 65535), (DOY_LAYER, day_of_year, SDC.INT16, -1)]
    for name, values, hdf_type, fill in layers:
        sds = sd.create(name, hdf_type, (rows, columns))
        sds.setcompress(SDC.COMP_DEFLATE, 1)
        sds.setfillvalue(fill)
        sds[:] = np.asarray(values)
        sds.endaccess()
    sd.end()
    return path


def test_gdal_sees_library_written_granules_as_eos_grids_with_the_projects_georeferencing(tmp_path):
    """The granules of tiles h17v05 and h18v05 that write_granule makes through the HDF-EOS2
    library: Debian's GDAL (HDF4 driver) opens them as HDF-EOS grids, with the georeferencing
    the project computes and real MOD09A1 granules carry."""
    real_upper_left = {17: (-1111950.519667, 4447802.078667), 18: (0.0, 4447802.078667)}  # from real granules
    for h in (17, 18):
        path = write_granule(tmp_path / f"MOD09A1.A2013001.h{h}v05.061.hdf", STARTS[0], (h, 5), tile_values(h),
                             np.full((N, N), CLEAR, np.uint16), np.full((N, N), 3, np.int16))
        listing = gdal("gdalinfo", str(path))
        subdataset = f'HDF4_EOS:EOS_GRID:"{path}":MOD_Grid_500m_Surface_Reflectance:sur_refl_b01'
        assert f"SUBDATASET_1_NAME={subdataset}" in listing
        info = json.loads(gdal("gdalinfo", "-json", subdataset, stderr=False))
        granule = read_granule_info(path)
        left, top = granule.upper_left
        np.testing.assert_allclose(info["geoTransform"], [left, granule.pixel_size, 0, top, 0, -granule.pixel_size],
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose((left, top), real_upper_left[h], rtol=0, atol=1e-3)
        assert granule.pixel_size * N / 2400 == pytest.approx(463.312716528, abs=1e-6)
        assert CRS.from_wkt(info["coordinateSystem"]["wkt"]).to_dict() == SINUSOIDAL_CRS.to_dict()
        assert info["size"] == [N, N] and info["bands"][0]["noDataValue"] == REFLECTANCE_FILL
        metadata = info["metadata"][""]
        assert metadata["scale_factor"] == "0.0001" and metadata["valid_range"] == "-100, 16000"
        for line in ("SHORTNAME=MOD09A1", "VERSIONID=61", "RANGEBEGINNINGDATE=2013-01-01",
                     "NORTHBOUNDINGCOORDINATE=40.000000"):  # the ECS metadata, as GDAL parses it
            assert f"  {line}\n" in listing


def test_ingest_reads_library_written_and_hand_written_granules_alike(tmp_path, scheduler):
    starts = STARTS[:10]
    library = write_year(tmp_path / "library", starts=starts)
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    for start in starts:
        doy = start.timetuple().tm_yday
        for h in (17, 18):
            write_hand_made_granule(by_hand / f"MOD09A1.A{YEAR}{doy:03d}.h{h:02d}v05.061.hdf", start, (h, 5),
                                    tile_values(h), np.full((N, N), CLEAR, np.uint16),
                                    np.full((N, N), min(doy + 2, 365), np.int16))
    cubes = [ingest(IngestConfig(inputs=[folder], chunk=16), tmp_path / f"{folder.name}.zarr", scheduler=scheduler)
             for folder in (library, by_hand)]
    a, b = (xr.open_zarr(c.out, mask_and_scale=False, decode_coords="all").load() for c in cubes)
    assert (a["reflectance"] != REFLECTANCE_FILL).any()
    xr.testing.assert_equal(a[["reflectance", COUNT_VARIABLE]], b[["reflectance", COUNT_VARIABLE]])
    assert a.rio.transform() == b.rio.transform() and a.rio.crs == b.rio.crs


# --- per-band quality (sur_refl_qc_500m) --------------------------------------------------------

def test_band_quality_bits_one_by_one():
    """Every band's four bits, every code, with the other bits set at random: only code 0000
    keeps a band; MODLAND QA 10 and 11 reject every band; 00, 01 and bits 30-31 leave it to the
    bands. Checked against the bit layout read from the value's binary string."""
    rng = np.random.default_rng(5)
    for band in range(7):
        for code in range(16):
            for modland in range(4):
                noise = int(rng.integers(0, 4)) << 30  # atmospheric / adjacency correction performed
                value = np.uint32(noise | (code << (2 + 4 * band)) | modland)
                rejected = band_quality_rejected(np.array([value]))[:, 0]
                bits = format(int(value), "032b")[::-1]  # bits[i] is bit i
                expected = [int(bits[2 + 4 * b:6 + 4 * b][::-1], 2) != 0 or int(bits[1] + bits[0], 2) >= 2
                            for b in range(7)]
                assert rejected.tolist() == expected, (band, code, modland)
                assert rejected[band] == (code != 0 or modland >= 2)


def test_band_quality_option_drops_flagged_observations(tmp_path, scheduler):
    """Band 3 flagged 'noisy detector' (0111) on the first two composites: with band_quality the
    cube is the one made without those composites; without it, they count."""
    starts = STARTS[:8]
    flagged = set(starts[:2])
    noisy_band3 = np.full((N, N), 0b0111 << (2 + 4 * 2), np.uint32)
    with_flags = write_year(tmp_path / "flagged", starts=starts,
                            band_quality=lambda start: noisy_band3 if start in flagged else None)
    without = write_year(tmp_path / "without", starts=starts[2:])
    screened, plain, reference = (
        xr.open_zarr(ingest(IngestConfig(inputs=[folder], chunk=16, year=YEAR, band_quality=quality),
                            tmp_path / name, scheduler=scheduler).out, mask_and_scale=False).load()
        for folder, quality, name in ((with_flags, True, "screened.zarr"), (with_flags, False, "plain.zarr"),
                                      (without, False, "reference.zarr")))
    xr.testing.assert_equal(screened[["reflectance", COUNT_VARIABLE]], reference[["reflectance", COUNT_VARIABLE]])
    assert int(plain[COUNT_VARIABLE].sum()) > int(screened[COUNT_VARIABLE].sum()) > 0
    assert "sur_refl_qc_500m" in screened.attrs["qa_rejected"]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), height=st.integers(1, 13), width=st.integers(1, 13), strip=st.integers(1, 6),
       dates=st.integers(1, 3), data=st.data())
def test_scratch_store_gives_back_any_window_as_staged(tmp_path_factory, seed, height, width, strip, dates, data):
    """Staged strip by strip, read back by any window (inside, across blocks, reaching outside
    the staged window as a warped grid's chunk may): the staged values, fill outside."""
    rng = np.random.default_rng(seed)
    row0, col0 = 100, 200
    staged = rng.integers(-32768, 32767, size=(dates, 9, height, width)).astype(np.int16)
    store = ScratchStore(str(tmp_path_factory.mktemp("scratch") / "s"), row0, col0, height, width, strip, dates)
    store.create()
    for index in range(dates):
        for top in range(0, height, strip):
            block = staged[index, :, top:top + strip].copy()
            window = ObservationWindow(block[:7], block[7].view(np.uint16), block[8], layers=block)
            store.write(index, row0 + top, window, band_quality=False)
    r0 = data.draw(st.integers(row0 - 3, row0 + height - 1))
    r1 = data.draw(st.integers(r0 + 1, row0 + height + 3))
    c0 = data.draw(st.integers(col0 - 3, col0 + width - 1))
    c1 = data.draw(st.integers(c0 + 1, col0 + width + 3))
    padded = np.empty((dates, 9, height + 6, width + 6), np.int16)
    padded[:, :7], padded[:, 7], padded[:, 8] = REFLECTANCE_FILL, np.uint16(QA_FILL).view(np.int16), DOY_FILL
    padded[:, :, 3:3 + height, 3:3 + width] = staged
    want = padded[:, :, r0 - row0 + 3:r1 - row0 + 3, c0 - col0 + 3:c1 - col0 + 3]
    reflectance, state_qa, doy = store.read(r0, r1, c0, c1)
    np.testing.assert_array_equal(reflectance, want[:, :7])
    np.testing.assert_array_equal(state_qa, want[:, 7].view(np.uint16))
    np.testing.assert_array_equal(doy, want[:, 8])


def test_strips_of_a_date_are_its_window_read_at_once(tmp_path):
    """read_strips (the date tasks' reader, one reused block for every strip) gives, strip after
    strip, what one read of the whole window gives, band qualities included, across the seam of
    two tiles and with a last strip shorter than the others."""
    starts = STARTS[:2]
    qc = (np.arange(N * N, dtype=np.uint64).reshape(N, N) * 2654435761 % 2**32).astype(np.uint32)  # varied bits
    source = open_reflectance([write_year(tmp_path / "granules", starts=starts, band_quality=lambda start: qc)])
    row0, row1, col0, col1 = 3, N - 2, N - 7, N + 9  # both tiles' columns
    for observation in source.observations:
        whole = observation.read(row0, row1, col0, col1, band_quality=True)
        strips = [(top, window.reflectance.copy(), window.state_qa.copy(), window.day_of_year.copy(),
                   window.band_quality.copy()) for top, window in
                  observation.read_strips(row0, row1, col0, col1, 5, band_quality=True)]
        assert [top for top, *_ in strips] == list(range(row0, row1, 5))
        assert strips[-1][1].shape[1] == (row1 - row0) % 5
        np.testing.assert_array_equal(np.concatenate([s[1] for s in strips], axis=1), whole.reflectance)
        for k, expected in ((2, whole.state_qa), (3, whole.day_of_year), (4, whole.band_quality)):
            np.testing.assert_array_equal(np.concatenate([s[k] for s in strips]), expected)


def test_sources_are_hashed_at_the_lowest_priority(tmp_path):
    """The digests run beside the ingest's workers in threads at nice 19 (Linux), taking only
    the CPU the workers leave; the calling thread keeps its priority."""
    folder = write_year(tmp_path / "granules", starts=STARTS[:2])
    priorities = []

    def digest(path: Path) -> str:
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return file_blake3(path)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    record = planned_sources(IngestConfig(inputs=[folder]), file_digest=digest)
    assert len(priorities) == len(record["files"]) == 4
    assert set(priorities) == {19} and before < 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_band_quality_is_refused_for_geotiff_exports(tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    left, top = tile_upper_left(17, 5)
    for layer, values in zip(BAND_NAMES, tile_values(17)):
        write_raster(exports / f"MOD09A1.061_{layer}_doy{YEAR}001_aid0001.tif", values, SINUSOIDAL_CRS.to_wkt(),
                     from_origin(left, top, TILE_SIZE / N, TILE_SIZE / N))
    with pytest.raises(MsmtuError) as err:
        ingest(IngestConfig(inputs=[exports], band_quality=True), tmp_path / "cube.zarr")
    assert str(err.value) == ("band_quality needs the sur_refl_qc_500m layer of MODIS granules; GeoTIFF inputs "
                              "do not carry it")
    with pytest.raises(MsmtuError) as err:
        ingest(IngestConfig(inputs=[exports], read_order="by-date"), tmp_path / "cube.zarr")
    assert str(err.value) == ("read_order by-date is for MOD09A1 granules (unchunked deflate layers); GeoTIFF exports "
                              "are read by chunk (read_order auto or by-chunk)")
    assert not list(tmp_path.glob("*.zarr")) and not list(tmp_path.glob(".*"))


# --- reading order: by date (scratch store) or by chunk, unchunked or chunked HDF4 -----------------

def write_varied_year(folder: Path, starts, seed: int, chunks=None) -> Path:
    """Granules whose every date differs: random reflectance with fill and out-of-range values,
    clouds, days of year within the composite, per-band quality codes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for start in starts:
        doy = start.timetuple().tm_yday
        for h in (17, 18):
            reflectance = rng.integers(-100, 9000, (7, N, N)).astype(np.int16)
            reflectance[rng.random((7, N, N)) < 0.05] = REFLECTANCE_FILL
            qa = np.where(rng.random((N, N)) < 0.3, CLEAR | 0b01, CLEAR).astype(np.uint16)
            quality = np.where(rng.random((N, N)) < 0.1, 0b0111 << 6, 0).astype(np.uint32)
            write_granule(folder / f"MOD09A1.A{start.year}{doy:03d}.h{h}v05.061.2021000000000.hdf", start, (h, 5),
                          reflectance, qa, np.minimum(doy + rng.integers(0, 8, (N, N)), 365).astype(np.int16),
                          band_quality=quality, chunks=chunks)
    return folder


def test_every_reading_order_and_hdf4_layout_make_the_same_cube(tmp_path, scheduler):
    """By date (through the scratch store, each unchunked layer inflated once) and by chunk,
    from unchunked granules (as MODAPS writes them) and from chunked ones: the same cube, value
    for value, on the native grid cut to a region and warped onto another CRS; the scratch
    store is gone afterwards."""
    import pyhdf.VS  # noqa: F401  (HDF.vstart needs it imported)
    from pyhdf.HDF import HDF
    from pyhdf.SD import SD, SDC

    from msmtu_batch.inputs.modis import text_attributes

    starts = STARTS[:8]
    whole = write_varied_year(tmp_path / "whole", starts, seed=3)
    chunked = write_varied_year(tmp_path / "chunked", starts, seed=3, chunks=(8, 12))
    sample = next(chunked.iterdir())
    hdf = HDF(str(sample))
    vdatas = hdf.vstart()
    assert sum(info[1].startswith("_HDF_CHK_TBL_") for info in vdatas.vdatainfo()) == 13  # every field chunked
    vdatas.end()
    hdf.close()
    sd = SD(str(sample), SDC.READ)
    assert text_attributes(sd, ("StructMetadata.0", "CoreMetadata.0")) == {
        k: v.split("\0", 1)[0] for k, v in sd.attributes().items() if k in ("StructMetadata.0", "CoreMetadata.0")}
    sd.end()
    region = geojson(tmp_path / "region.geojson", -3.0, 37.2, 2.5, 39.0)
    for grid in ({"region": region}, {"region": region, "crs": "EPSG:25830", "resolution": 20000}):
        cubes = []
        for folder, order in ((whole, "by-date"), (whole, "by-chunk"), (chunked, "auto")):
            config = IngestConfig(inputs=[folder], chunk=8, band_quality=True, read_order=order, **grid)
            out = ingest(config, tmp_path / f"{folder.name}-{order}.zarr", scheduler=scheduler, overwrite=True).out
            cubes.append(xr.open_zarr(out, mask_and_scale=False).load())
        assert (cubes[0][COUNT_VARIABLE] > 0).any() and (cubes[0]["reflectance"] == REFLECTANCE_FILL).any()
        layers = ["reflectance", COUNT_VARIABLE]
        for other in cubes[1:]:
            xr.testing.assert_equal(cubes[0][layers], other[layers])
    assert not list(tmp_path.glob(".*.scratch"))


# --- several years at once ----------------------------------------------------------------------

def test_several_years_at_once_on_one_cluster(tmp_path, scheduler):
    """`ingest --year 2013 --year 2014` over one folder of both years' granules: each cube is the
    one ingested from that year's composites alone (the composite of 27 December 2013, whose
    days reach 2014, goes to both); without {year} in --out, one line and exit 2."""
    from tests.test_faults import cli, one_line_error

    last_2013 = dt.date(YEAR, 12, 27)
    starts_2013 = [*STARTS[:4], last_2013]
    starts_2014 = [dt.date(YEAR + 1, 1, 1) + dt.timedelta(days=8 * i) for i in range(4)]
    both = write_varied_year(tmp_path / "both", [*starts_2013, *starts_2014], seed=9)
    alone = {2013: tmp_path / "2013", 2014: tmp_path / "2014"}
    for year, starts in ((2013, starts_2013), (2014, [last_2013, *starts_2014])):
        alone[year].mkdir()
        for start in starts:
            for granule in both.glob(f"MOD09A1.A{start.year}{start.timetuple().tm_yday:03d}.*"):
                shutil.copy(granule, alone[year] / granule.name)
    done = cli("ingest", both, "--year", 2013, "--year", 2014, "--out", tmp_path / "cubes" / "{year}.zarr",
               "--chunk", 16, "--scheduler", scheduler)
    assert done.returncode == 0, done.stderr
    for year in (2013, 2014):
        cube = tmp_path / "cubes" / f"{year}.zarr"
        assert f"wrote {cube}: 24 x 48 pixels, 5 dates" in done.stdout
        reference = ingest(IngestConfig(inputs=[alone[year]], year=year, chunk=16), tmp_path / f"alone-{year}.zarr",
                           scheduler=scheduler).out
        got, want = (xr.open_zarr(store, mask_and_scale=False).load() for store in (cube, reference))
        xr.testing.assert_equal(got[["reflectance", COUNT_VARIABLE]], want[["reflectance", COUNT_VARIABLE]])
        assert (got[COUNT_VARIABLE] > 0).any() and got.attrs["year"] == year
        files = sorted(Path(r["path"]).name for r in json.loads(got.attrs["source_files_record"]))
        assert files == sorted(p.name for p in alone[year].iterdir())
    assert one_line_error(cli("ingest", both, "--year", 2013, "--year", 2014, "--out", tmp_path / "c.zarr")) == (
        f"--out {tmp_path / 'c.zarr'}: several years need {{year}} in the output path (e.g. cubes/{{year}}.zarr)")
