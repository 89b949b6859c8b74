"""Sensors as data: MYD09A1 (Aqua) and Terra+Aqua granules written through the HDF-EOS2
library are ingested by their specs, cubes and models record their sensor, and a model
refuses a cube of another sensor unless told."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from msmtu_batch.inputs.cube import consolidate, open_input_cube
from msmtu_batch.inputs.sensors import SENSORS
from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.artifact import ArtifactError, load_artifact, save_artifact
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.orchestration.ingest import COUNT_VARIABLE, IngestConfig, ingest
from msmtu_batch.orchestration.pipeline import RunConfig, run
from msmtu_batch.runtime.errors import CubeValidationError, MsmtuError
from msmtu_batch.testing.granules import VIIRS_M_BANDS, write_granule, write_viirs_granule
from tests.conftest import gdal
from tests.test_ingest import CLEAR, STARTS, N, tile_values

CLOUDY = CLEAR | 0b01
BIN = Path(sys.executable).parent


def write_granules(folder: Path, product: str, clear: callable, offset: int = 0) -> Path:
    """A year of one tile's granules of ``product``: clear on the dates ``clear(i)`` says, cloudy
    on the others; reflectance :func:`tile_values` plus ``offset``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(STARTS):
        doy = start.timetuple().tm_yday
        write_granule(folder / f"{product}.A{start.year}{doy:03d}.h17v05.061.2021000000000.hdf", start, (17, 5),
                      tile_values(17) + np.int16(offset), np.full((N, N), CLEAR if clear(i) else CLOUDY, np.uint16),
                      np.full((N, N), doy, np.int16), product=product)
    return folder


def cube_of(inputs: list[Path], out: Path, scheduler: str, **settings) -> xr.Dataset:
    ingest(IngestConfig(inputs=inputs, chunk=16, **settings), out, scheduler=scheduler)
    return open_input_cube(out, ancillary=()).load()


def test_aqua_granules_make_a_cube_of_their_own_sensor(tmp_path, local_scheduler):
    terra = cube_of([write_granules(tmp_path / "terra", "MOD09A1", lambda i: True)], tmp_path / "terra.zarr",
                    local_scheduler)
    aqua = cube_of([write_granules(tmp_path / "aqua", "MYD09A1", lambda i: True)], tmp_path / "aqua.zarr",
                   local_scheduler)
    assert (terra.attrs["sensor"], terra.attrs["platform"]) == ("MOD09A1", "Terra")
    assert (aqua.attrs["sensor"], aqua.attrs["platform"]) == ("MYD09A1", "Aqua")
    assert aqua["reflectance"].attrs["long_name"] == "monthly composite of MYD09A1 surface reflectance"
    # the same values through another product's granules make the same cube
    np.testing.assert_array_equal(aqua["reflectance"].values, terra["reflectance"].values)
    np.testing.assert_array_equal(aqua[COUNT_VARIABLE].values, terra[COUNT_VARIABLE].values)


def test_terra_and_aqua_composited_together_count_the_clear_observations_of_both(tmp_path, local_scheduler):
    # Terra clear on even dates, Aqua on odd ones, each 100 (0.01) apart in every band
    terra = write_granules(tmp_path / "terra", "MOD09A1", lambda i: i % 2 == 0)
    aqua = write_granules(tmp_path / "aqua", "MYD09A1", lambda i: i % 2 == 1, offset=100)
    alone = cube_of([terra], tmp_path / "terra.zarr", local_scheduler)
    both = cube_of([terra, aqua], tmp_path / "both.zarr", local_scheduler)
    assert both.attrs["sensor"] == "MOD09A1+MYD09A1" and both.attrs["platform"] == "Terra and Aqua"
    aqua_alone = cube_of([aqua], tmp_path / "aqua.zarr", local_scheduler)
    np.testing.assert_array_equal(both[COUNT_VARIABLE].values,
                                  alone[COUNT_VARIABLE].values + aqua_alone[COUNT_VARIABLE].values)
    assert (both[COUNT_VARIABLE].values > alone[COUNT_VARIABLE].values).all()
    # the median of a month's clear values of both satellites, computed here from the dates
    months = np.array([s.month for s in STARTS]) - 1
    expected = np.zeros((12, 7, N, N))
    for month in range(12):
        values = [tile_values(17) + (100 if i % 2 else 0) for i in np.nonzero(months == month)[0]]
        expected[month] = np.median(values, axis=0)
    stored = both["reflectance"].values
    np.testing.assert_array_equal(stored, np.round(expected).astype(np.int16) if stored.dtype == np.int16
                                  else expected)


def test_granules_of_another_sensor_than_the_one_asked_for_are_named(tmp_path):
    aqua = write_granules(tmp_path / "aqua", "MYD09A1", lambda i: True)
    first = sorted(aqua.iterdir())[0]
    with pytest.raises(MsmtuError, match=rf"^{first}: a MYD09A1 granule, but sensor MOD09A1 reads MOD09A1 granules "
                                         r"only$"):
        ingest(IngestConfig(inputs=[aqua], sensor="MOD09A1"), tmp_path / "cube.zarr")
    with pytest.raises(ValueError, match="Input should be 'MOD09A1', 'MYD09A1', 'MOD09A1\\+MYD09A1', 'VNP09A1' or "
                                         "'VJ109A1'"):
        IngestConfig(inputs=[aqua], sensor="AVHRR")


def tagged_copy(region, tmp_path: Path, sensor: str) -> Path:
    """The region's cube with its ``sensor`` attribute set (as an ingest of that sensor writes it)."""
    cube = shutil.copytree(region.cube, tmp_path / f"{sensor}.zarr")
    zarr.open_group(cube, mode="r+", use_consolidated=False).attrs["sensor"] = sensor
    consolidate(cube)
    return cube


def test_a_model_records_its_sensor_and_refuses_another_unless_told(region, small_model, tmp_path):
    assert load_artifact(small_model).sensor == "MOD09A1"  # trained on a cube without the attribute
    aqua = tagged_copy(region, tmp_path, "MYD09A1")
    assert read_cube_reference(aqua, region.reference, "level2").sensor == "MYD09A1"  # what training records
    message = f"{aqua}: sensor MYD09A1, but the model was trained on MOD09A1 data; pass --allow-other-sensor " \
              "to map it all the same"
    with pytest.raises(ArtifactError) as caught:
        run(aqua, small_model, tmp_path / "refused.zarr", config=RunConfig(chunk=32))
    assert str(caught.value) == message and not (tmp_path / "refused.zarr").exists()
    cli = subprocess.run([str(BIN / "msmtu-batch"), "run", "--cube", str(aqua), "--model", str(small_model),
                          "--out", str(tmp_path / "cli.zarr")], capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.strip() == f"msmtu-batch: error: {message}", cli.stderr
    run(aqua, small_model, tmp_path / "aqua-out.zarr", config=RunConfig(chunk=32), allow_other_sensor=True)
    run(region.cube, small_model, tmp_path / "terra-out.zarr", config=RunConfig(chunk=32))
    mapped = xr.open_zarr(tmp_path / "aqua-out.zarr")
    np.testing.assert_array_equal(mapped["abundance"].values,
                                  xr.open_zarr(tmp_path / "terra-out.zarr")["abundance"].values)
    assert "BRITS on MYD09A1 monthly reflectance" in mapped.attrs["source"]
    # a model trained on the Aqua cube records Aqua, and maps it without being told
    pixels = read_cube_reference(aqua, region.reference, "level2")
    aqua_model = save_artifact(train(pixels, "level2", TrainConfig(epochs=1, hidden=8, embed=4, head_hidden=8)
                                     ).artifact, tmp_path / "aqua.safetensors")
    assert load_artifact(aqua_model).sensor == "MYD09A1"
    run(aqua, aqua_model, tmp_path / "aqua-own.zarr", config=RunConfig(chunk=32))


def test_a_cube_naming_an_unknown_sensor_is_refused(region, tmp_path):
    cube = tagged_copy(region, tmp_path, "AVHRR")
    known = ", ".join(SENSORS)
    with pytest.raises(CubeValidationError, match=rf"^{cube}: attribute sensor: unknown sensor 'AVHRR'; "
                                                  rf"known: {known.replace('+', '[+]')}$"):
        open_input_cube(cube)


# --- VIIRS ------------------------------------------------------------------------------------

def viirs_values(band: str) -> np.ndarray:
    """(N, N) int16 that tells band, row and column apart."""
    rows, cols = np.mgrid[0:N, 0:N]
    return (rows * 100 + cols + 1000 * VIIRS_M_BANDS.index(band)).astype(np.int16)


def write_viirs_year(folder: Path, product: str = "VNP09A1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for start in STARTS:
        doy = start.timetuple().tm_yday
        write_viirs_granule(folder / f"{product}.A{start.year}{doy:03d}.h17v05.002.2023000000000.h5", start, (17, 5),
                            {b: viirs_values(b) for b in VIIRS_M_BANDS}, np.full((N, N), CLEAR, np.uint16),
                            np.full((N, N), doy, np.int16), product=product)
    return folder


def test_viirs_granules_in_the_vnp09a1_layout_are_read_by_the_project_gdal_and_h5py(tmp_path, local_scheduler):
    import h5py
    import rasterio
    import rasterio.errors

    folder = write_viirs_year(tmp_path / "viirs")
    granule = sorted(folder.iterdir())[0]
    with h5py.File(granule, "r") as f:  # the layout, as h5py sees it
        fields = f["HDFEOS/GRIDS/VNP_Grid_1km_2D/Data Fields"]
        assert {f"SurfReflect_{b}" for b in VIIRS_M_BANDS} <= set(fields)
        assert fields["SurfReflect_M5"].attrs["scale_factor"][0] == 0.0001
        assert b"HE5_GCTP_SNSOID" in f["HDFEOS INFORMATION/StructMetadata.0"][()]
    # GDAL's HDF5 driver finds the band as a subdataset and reads the same values (Debian's GDAL 3.6
    # reads values and attributes; its HDF-EOS5 georeferencing came in GDAL 3.7)
    subdataset = f'HDF5:"{granule}"://HDFEOS/GRIDS/VNP_Grid_1km_2D/Data_Fields/SurfReflect_M5'
    assert subdataset in gdal("gdalinfo", str(granule))
    gdal("gdal_translate", "-q", subdataset, str(tmp_path / "m5.tif"))
    with warnings.catch_warnings():  # GDAL 3.6 leaves it without a grid (see above)
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        raster = rasterio.open(tmp_path / "m5.tif")
    with raster:
        np.testing.assert_array_equal(raster.read(1), viirs_values("M5"))
        assert raster.nodata == -28672

    cube = cube_of([folder], tmp_path / "viirs.zarr", local_scheduler)
    assert (cube.attrs["sensor"], cube.attrs["platform"]) == ("VNP09A1", "Suomi NPP")
    assert [str(b) for b in cube["band"].values] == ["M5", "M7", "M3", "M4", "M8", "M10", "M11"]
    expected = np.stack([viirs_values(b) for b in ("M5", "M7", "M3", "M4", "M8", "M10", "M11")])
    np.testing.assert_array_equal(cube["reflectance"].values, np.broadcast_to(expected, (12, *expected.shape)))
    assert cube.rio.resolution()[0] == pytest.approx(1111950.5196666666 / N)  # a tile's width over its pixels
    # a MODIS model refuses it: its sensor, then (told to go on) its bands
    aqua_first = IngestConfig(inputs=[folder], sensor="MYD09A1")
    with pytest.raises(MsmtuError, match=rf"^{granule}: a VNP09A1 granule, but sensor MYD09A1 reads MYD09A1 "):
        ingest(aqua_first, tmp_path / "refused.zarr")
    with pytest.raises(MsmtuError, match=r"band_quality needs the sur_refl_qc_500m layer of MODIS granules; "
                                         r"VNP09A1 HDF5 inputs do not carry it"):
        ingest(IngestConfig(inputs=[folder], band_quality=True), tmp_path / "bq.zarr")


def test_a_modis_model_refuses_a_viirs_cube_even_when_told_to_take_another_sensor(region, tmp_path,
                                                                                  local_scheduler):
    folder = write_viirs_year(tmp_path / "viirs", product="VJ109A1")
    cube = tmp_path / "viirs.zarr"
    ingest(IngestConfig(inputs=[folder], chunk=16), cube, scheduler=local_scheduler)
    # a model without ancillary variables, so that the cube's bands are what differs
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    model = save_artifact(train(pixels, "level2", TrainConfig(epochs=1, hidden=8, embed=4, head_hidden=8,
                                                              ancillary="none")).artifact, tmp_path / "m.safetensors")
    with pytest.raises(ArtifactError, match=rf"^{cube}: sensor VJ109A1, but the model was trained on MOD09A1 data"):
        run(cube, model, tmp_path / "out.zarr")
    with pytest.raises(ArtifactError, match=r"^model bands sur_refl_b01, .* do not match .* bands M5, M7, M3"):
        run(cube, model, tmp_path / "out.zarr", allow_other_sensor=True)
