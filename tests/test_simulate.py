"""The synthetic region: contract, invariants, physics, determinism and seamless blocks."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from pyproj import Transformer

from msmtu_batch.inputs.cube import REFLECTANCE_FILL, open_input_cube
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.synthetic.simulate import (
    CLASS_HIERARCHY,
    LEVEL1_CLASSES,
    LEVEL2_CLASSES,
    SimulationConfig,
    SyntheticAndalusia,
    simulate,
)
from tests.conftest import SMALL, zarr_files


def rejected_by_qa(qa: np.ndarray) -> np.ndarray:
    """StateQA rejection written out bit by bit (independent of msmtu_batch.inputs.cube)."""
    cloud_state = qa % 4
    shadow = (qa // 4) % 2
    mod35_snow = (qa // 4096) % 2
    internal_snow = (qa // 32768) % 2
    return (cloud_state == 1) | (cloud_state == 2) | (shadow == 1) | (mod35_snow == 1) | (internal_snow == 1)


def test_cube_follows_contract(region, cube):
    assert cube.sizes == {"time": 12, "band": 7, "y": SMALL.height, "x": SMALL.width}
    assert cube["reflectance"].dtype == np.int16
    assert cube["state_qa"].dtype == np.uint16
    assert str(cube.rio.crs) == "EPSG:25830"
    assert cube["time"].dt.day.values.tolist() == [1] * 12
    assert cube["time"].dt.month.values.tolist() == list(range(1, 13))
    # opened the plain way, xarray applies the scale factor and masks the fill value
    decoded = xr.open_zarr(region.cube, consolidated=False)["reflectance"]
    raw = cube["reflectance"].values
    np.testing.assert_allclose(decoded.values, np.where(raw == REFLECTANCE_FILL, np.nan, raw * 1e-4),
                               rtol=1e-6)


def test_abundances_sum_to_one_within_unit_interval(reference):
    for level in ("level1", "level2"):
        a = reference[level]["abundance"].values
        assert a.min() >= 0 and a.max() <= 1
        np.testing.assert_allclose(a.sum(axis=0), 1.0, atol=1e-5)


def test_level1_is_the_sum_of_its_level2_children(reference):
    level2 = reference["level2"]["abundance"]
    for parent in LEVEL1_CLASSES:
        children = [child for child, p in CLASS_HIERARCHY if p == parent]
        expected = level2.sel(lulc_class=children).sum("lulc_class").values
        np.testing.assert_allclose(reference["level1"]["abundance"].sel(lulc_class=parent).values,
                                   expected, atol=1e-6)
    assert reference["level2"]["parent_class"].values.tolist() == [p for _, p in CLASS_HIERARCHY]


def test_mixed_pixels_dominate_but_every_class_occurs(reference):
    a = reference["level2"]["abundance"].values
    dominant = a.max(axis=0)
    assert (dominant < 0.9).mean() > 0.6
    assert (dominant > 0.9).any()
    assert ((a > 0).sum(axis=0) >= 2).mean() > 0.8
    assert (a.max(axis=(1, 2)) > 0.2).all(), "each class reaches a sizeable abundance somewhere"


def test_gaps_are_fill_in_all_bands_and_flagged_in_state_qa(cube):
    refl = cube["reflectance"].values
    qa = cube["state_qa"].values
    fill = refl == REFLECTANCE_FILL
    assert (fill.all(axis=1) == fill.any(axis=1)).all(), "a month is missing in all bands or none"
    month_fill = fill[:, 0]
    rejected = rejected_by_qa(qa)
    assert rejected[month_fill].all(), "every fill value has a QA reason"
    # some flagged values slip through compositing with contaminated reflectance
    slipped = rejected & ~month_fill
    assert 0.1 < slipped.sum() / rejected.sum() < 0.5
    # a valid value is never out of the MOD09A1 valid range
    assert refl[~fill].min() >= -100 and refl[~fill].max() <= 16000


def test_gaps_are_seasonal_and_some_pixels_mostly_missing(cube):
    usable = ~rejected_by_qa(cube["state_qa"].values) & (cube["reflectance"].values[:, 0] != REFLECTANCE_FILL)
    missing = 1 - usable.mean(axis=(1, 2))
    winter, summer = missing[[11, 0, 1]].mean(), missing[[5, 6, 7]].mean()
    assert winter > 2 * summer
    assert ((~usable).sum(axis=0) >= 9).sum() >= 5


def test_snow_only_where_cold(cube):
    qa = cube["state_qa"].values
    snow = ((qa // 4096) % 2 == 1) | ((qa // 32768) % 2 == 1)
    assert snow.any()
    assert cube["altitude"].values[snow.any(axis=0)].min() > 1000
    assert not snow[5:9].any(), "no snow from June to September"
    assert snow[[11, 0, 1]].sum() > snow[[3, 4, 9, 10]].sum(), "snow peaks in winter"


def test_slope_is_the_gradient_of_altitude(cube):
    alt = cube["altitude"].values.astype(np.float64)
    spacing = float(abs(cube["x"][1] - cube["x"][0]))
    dz_dy, dz_dx = np.gradient(alt, spacing)
    expected = np.degrees(np.arctan(np.hypot(dz_dx, dz_dy)))
    np.testing.assert_allclose(cube["slope"].values[1:-1, 1:-1], expected[1:-1, 1:-1], atol=0.02)


def test_terrain_and_climate_are_physical(tmp_path):
    big = SimulationConfig(height=160, width=240, seed=3, chunk=64, msmtu_pixels=0)
    ds = open_input_cube(simulate(big, tmp_path).cube).load()
    alt, t = ds["altitude"].values, ds["temperature_ave"].values
    assert 0 <= alt.min() < 100 and 2500 < alt.max() <= 3400
    lapse = np.polyfit(alt.ravel() / 1000, t.ravel(), 1)[0]
    assert -7.5 < lapse < -5.5, f"lapse rate {lapse:.2f} K/km"
    assert (ds["temperature_max"].values > t).all() and (t > ds["temperature_min"].values).all()
    p = ds["precipitation"].values
    west, east = p[:, : big.width // 4].mean(), p[:, -big.width // 4:].mean()
    assert west > east > 0, "Atlantic west wetter than the arid east"
    et = ds["evapotranspiration"].values
    assert et.min() > 300 and et.max() < 1800


def test_lonlat_match_the_grid_and_crs(cube):
    to_lonlat = Transformer.from_crs(cube.rio.crs, "EPSG:4326", always_xy=True)
    xx, yy = np.meshgrid(cube["x"].values, cube["y"].values)
    lon, lat = to_lonlat.transform(xx, yy)
    np.testing.assert_allclose(cube["longitude"].values, lon, atol=1e-5)
    np.testing.assert_allclose(cube["latitude"].values, lat, atol=1e-5)
    assert lon.min() > -8 and lon.max() < -1 and lat.min() > 36 and lat.max() < 39


def ndvi(spectrum: np.ndarray) -> np.ndarray:
    red, nir = spectrum[:, 0], spectrum[:, 1]
    return (nir - red) / (nir + red)


def test_class_spectra_follow_mediterranean_phenology():
    land = SyntheticAndalusia(SimulationConfig(height=8, width=8))
    one = np.zeros((1, 1))
    spectra = dict(zip(LEVEL2_CLASSES, land.class_spectra(one, one, one + 300, one + 17.0, one + 600)))
    veg = {name: ndvi(s)[:, 0, 0] for name, s in spectra.items()}
    assert np.argmax(veg["winter_cereal"]) in (1, 2, 3), "cereals peak in Feb-Apr"
    assert np.argmax(veg["irrigated_crop"]) in (5, 6, 7), "irrigated crops peak in Jun-Aug"
    assert veg["winter_cereal"][3] > veg["winter_cereal"][7] + 0.3
    assert veg["evergreen_forest"].min() > 0.5
    assert np.ptp(veg["evergreen_forest"]) < 0.5 * np.ptp(veg["winter_cereal"]), "evergreen is stable"
    assert veg["bare_soil"].max() < 0.2 and veg["water"].max() < 0
    # colder (higher) pixels green up later
    cold = dict(zip(LEVEL2_CLASSES, land.class_spectra(one, one, one + 1500, one + 9.0, one + 600)))
    assert np.argmax(ndvi(cold["winter_cereal"])[:, 0, 0]) > np.argmax(veg["winter_cereal"])


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    cfg = SimulationConfig(height=24, width=40, seed=11, chunk=16, msmtu_pixels=50, split_block=8)
    first, second = simulate(cfg, tmp_path / "a"), simulate(cfg, tmp_path / "b")
    for a, b in [(first.cube, second.cube), (first.reference, second.reference),
                 (first.msmtu, second.msmtu)]:
        assert zarr_files(a) == zarr_files(b)
    other = simulate(cfg.model_copy(update={"seed": 12}), tmp_path / "c")
    assert zarr_files(other.cube) != zarr_files(first.cube)


def test_output_does_not_depend_on_block_size(tmp_path):
    cfg = SimulationConfig(height=40, width=24, seed=5, chunk=16, msmtu_pixels=0)
    a = open_input_cube(simulate(cfg, tmp_path / "a").cube).load()
    b = open_input_cube(simulate(cfg.model_copy(update={"chunk": 24}), tmp_path / "b").cube).load()
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    land = SyntheticAndalusia(cfg)
    whole, pieces = land.block(3, 31), land.rows(3, 31, max_pixels=5 * cfg.width)
    np.testing.assert_array_equal(whole.reflectance, pieces.reflectance)
    np.testing.assert_array_equal(whole.state_qa, pieces.state_qa)
    np.testing.assert_array_equal(whole.abundance, pieces.abundance)
    for name, values in whole.ancillary.items():
        np.testing.assert_array_equal(values, pieces.ancillary[name], err_msg=name)


def test_existing_outputs_are_kept_without_overwrite(tmp_path):
    cfg = SimulationConfig(height=16, width=16, msmtu_pixels=10, chunk=16)
    simulate(cfg, tmp_path)
    before = zarr_files(tmp_path / "cube.zarr")
    with pytest.raises(MsmtuError, match=r"cube\.zarr already exists; pass --overwrite to replace it"):
        simulate(cfg.model_copy(update={"seed": 1}), tmp_path)
    assert zarr_files(tmp_path / "cube.zarr") == before
    simulate(cfg.model_copy(update={"seed": 1}), tmp_path, overwrite=True)
    assert zarr_files(tmp_path / "cube.zarr") != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr", "msmtu", "reference.zarr"]


def test_interrupted_simulation_leaves_nothing_that_looks_complete(tmp_path):
    cfg = SimulationConfig(height=48, width=16, msmtu_pixels=10, chunk=16)

    def interrupt_after_first_block(blocks):
        for i, block in enumerate(blocks):
            if i == 1:
                raise KeyboardInterrupt
            yield block

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, tmp_path, progress=interrupt_after_first_block)
    assert not (tmp_path / "cube.zarr").exists() and not (tmp_path / "reference.zarr").exists()
    assert not (tmp_path / "msmtu").exists()
    simulate(cfg, tmp_path)  # a rerun completes and cleans the partial stores
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.zarr", "msmtu", "reference.zarr"]
