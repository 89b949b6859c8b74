"""Input-cube validation: the valid cube passes, each real corrupted store fails clearly."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from msmtu_batch.inputs.cube import (
    BAND_NAMES,
    GEOTOPO_NAMES,
    REFLECTANCE_FILL,
    open_input_cube,
    write_input_cube,
)
from msmtu_batch.runtime.errors import CubeValidationError


def test_valid_cube_passes_and_stays_lazy(region, tiny, tmp_path):
    ds = open_input_cube(region.cube)
    assert ds["reflectance"].chunks is not None, "opened dask-backed"
    assert ds["reflectance"].dtype == np.int16
    write_input_cube(tiny, tmp_path / "copy.zarr")
    copy = open_input_cube(tmp_path / "copy.zarr").load()
    xr.testing.assert_identical(copy.drop_vars("spatial_ref"), tiny.drop_vars("spatial_ref"))
    assert copy.rio.crs == tiny.rio.crs


def _set(name: str, values, dims=None) -> Callable[[xr.Dataset], xr.Dataset]:
    def corrupt(ds: xr.Dataset) -> xr.Dataset:
        ds = ds.copy()
        attrs = ds[name].attrs
        ds[name] = (dims or ds[name].dims, values(ds[name].values) if callable(values) else values)
        ds[name].attrs.update(attrs)
        return ds
    return corrupt


def _nan_ancillary_at_observed(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    alt = ds["altitude"].values.copy()
    alt[3, 5] = np.nan
    alt[10, 1] = np.inf
    ds["altitude"] = ds["altitude"].copy(data=alt)
    return ds


def _retime(times) -> Callable[[xr.Dataset], xr.Dataset]:
    return lambda ds: ds.isel(time=slice(0, len(times))).assign_coords(time=times)


def _without_crs(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.drop_vars("spatial_ref")
    for var in ds.data_vars.values():
        var.attrs.pop("grid_mapping", None)
        var.encoding.pop("grid_mapping", None)
    return ds


MID_MONTH = pd.date_range("2013-01-01", periods=12, freq="MS") + pd.Timedelta(days=14)

CORRUPTIONS = {
    "no reflectance": (lambda ds: ds.drop_vars("reflectance"),
                       "variable 'reflectance': expected a data variable, found none (data variables: "
                       "altitude, evapotranspiration, latitude, longitude, precipitation, slope, "
                       "state_qa, temperature_ave, temperature_max, temperature_min)"),
    "dims order": (lambda ds: ds.assign(reflectance=ds["reflectance"].transpose("band", "time", "y", "x")),
                   "variable 'reflectance': expected dims (time, band, y, x), found (band, time, y, x)"),
    "float reflectance": (_set("reflectance", lambda v: v.astype(np.float32)),
                          "variable 'reflectance': expected dtype int16, found dtype float32"),
    "scale": (lambda ds: ds.assign(reflectance=ds["reflectance"].assign_attrs(scale_factor=0.001)),
              "variable 'reflectance': expected scale_factor 0.0001, found scale_factor 0.001"),
    "six bands": (lambda ds: ds.isel(band=slice(0, 6)),
                  "variable 'band': expected 7 bands (MOD09A1), found 6 bands"),
    "band order": (lambda ds: ds.assign_coords(band=np.array(
        [BAND_NAMES[1], BAND_NAMES[0], *BAND_NAMES[2:]], dtype=object)),
        "variable 'band': expected labels " + ", ".join(BAND_NAMES) + ", found labels "
        + ", ".join([BAND_NAMES[1], BAND_NAMES[0], *BAND_NAMES[2:]])),
    "eleven months": (_retime(pd.date_range("2013-01-01", periods=11, freq="MS")),
                      "variable 'time': expected 12 monthly steps, found 11 steps"),
    "mid-month": (_retime(MID_MONTH),
                  "variable 'time': expected first-of-month timestamps 2013-01-01 .. 2013-12-01, found "
                  + ", ".join(str(d.date()) for d in MID_MONTH)),
    "missing slope": (lambda ds: ds.drop_vars("slope"),
                      "variable 'slope': expected an ancillary data variable (y, x), found nothing"),
    "float64 altitude": (_set("altitude", lambda v: v.astype(np.float64)),
                         "variable 'altitude': expected dtype float32, found dtype float64"),
    "nan altitude": (_nan_ancillary_at_observed,
                     "variable 'altitude': expected finite values where reflectance is observed, "
                     "found 2 non-finite pixel(s), first at y index 3, x index 5"),
    "int16 qa": (_set("state_qa", lambda v: v.astype(np.int16)),
                 "variable 'state_qa': expected dtype uint16, found dtype int16"),
    "no crs": (_without_crs, "variable 'spatial_ref': expected a CRS (rioxarray convention: "
                             "'spatial_ref' coordinate with crs_wkt), found no CRS"),
    "irregular x": (lambda ds: ds.assign_coords(x=ds["x"].values + np.r_[0.0, np.zeros(30), 5.0]),
                    "variable 'x': expected regularly spaced pixel centres, found spacings from "
                    "463.313 to 468.313"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_each_corruption_is_refused_with_its_message(case, tiny, tmp_path):
    corrupt, message = CORRUPTIONS[case]
    store = tmp_path / f"{case.replace(' ', '_')}.zarr"
    write_input_cube(corrupt(tiny), store)
    with pytest.raises(CubeValidationError) as err:
        open_input_cube(store)
    assert str(err.value) == f"{store}: {message}"


def test_wrong_fill_value_is_refused(tiny, tmp_path):
    store = tmp_path / "fill.zarr"
    write_input_cube(tiny, store)
    array = zarr.open_array(store / "reflectance", mode="r+")
    array.attrs["_FillValue"] = -9999
    with pytest.raises(CubeValidationError) as err:
        open_input_cube(store)
    assert str(err.value) == (f"{store}: variable 'reflectance': expected _FillValue -28672, "
                              "found _FillValue -9999")


def test_ancillary_on_another_grid_is_named(tiny, tmp_path):
    store = tmp_path / "grid.zarr"
    write_input_cube(tiny, store)
    group = zarr.open_group(store, mode="r+")
    attrs = dict(group["slope"].attrs)
    del group["slope"]
    group.create_array("slope", shape=(24, 30), dtype="float32", dimension_names=("y", "x"),
                       attributes=attrs)
    with pytest.raises(CubeValidationError) as err:
        open_input_cube(store)
    assert str(err.value) == (f"{store}: variable 'slope' has x=30, expected x=32 like the other "
                              "variables (all variables must share one grid)")


def test_non_finite_ancillary_where_nothing_is_observed_is_accepted(tiny, tmp_path):
    ds = tiny.copy()
    refl = ds["reflectance"].values.copy()
    refl[:, :, 0, 0] = REFLECTANCE_FILL
    alt = ds["altitude"].values.copy()
    alt[0, 0] = np.nan
    ds["reflectance"] = ds["reflectance"].copy(data=refl)
    ds["altitude"] = ds["altitude"].copy(data=alt)
    write_input_cube(ds, tmp_path / "ok.zarr")
    open_input_cube(tmp_path / "ok.zarr")


def test_required_ancillary_can_be_narrowed(tiny, tmp_path):
    store = tmp_path / "geotopo.zarr"
    write_input_cube(tiny.drop_vars(["precipitation", "temperature_ave"]), store)
    open_input_cube(store, ancillary=GEOTOPO_NAMES)
    open_input_cube(store, ancillary=())
    with pytest.raises(CubeValidationError, match="'precipitation': expected an ancillary"):
        open_input_cube(store)


def test_missing_and_unreadable_stores(tmp_path):
    with pytest.raises(CubeValidationError) as err:
        open_input_cube(tmp_path / "absent.zarr")
    assert str(err.value) == f"{tmp_path / 'absent.zarr'}: input cube not found"
    (tmp_path / "text.zarr").write_text("not a store")
    with pytest.raises(CubeValidationError, match=r"text\.zarr: not a readable Zarr store"):
        open_input_cube(tmp_path / "text.zarr")
