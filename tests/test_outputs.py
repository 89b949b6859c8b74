"""Outputs every tool opens: the Python API, Zarr v2 for zarr-python 2 and Debian's GDAL,
CF attributes, the multi-year archive, STAC, and GIS-ready COGs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import msmtu_batch as mb
from msmtu_batch.inputs.cube import consolidate
from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.artifact import artifact_hash, save_artifact
from msmtu_batch.model.palette import class_colors, rgb
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.products.overviews import halve, halved_side
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate
from tests.conftest import gdal, zarr_files

ROOT = Path(__file__).resolve().parents[1]
YEARS = (2013, 2014)
SIZE = 24
CHUNK = 12
# colours a user chose at training time for two classes; the others keep the default palette
USER_COLORS = {"olive_grove": "#808000", "water": "#0000ff"}


@pytest.fixture(scope="module")
def regions(tmp_path_factory) -> dict[int, Path]:
    """Two simulated years of one small region (different weather, same grid)."""
    root = tmp_path_factory.mktemp("years")
    return {year: simulate(SimulationConfig(height=SIZE, width=SIZE, seed=year, year=year, chunk=CHUNK,
                                            msmtu_pixels=0, split_block=6), root / str(year)).cube
            for year in YEARS}


@pytest.fixture(scope="module")
def model(regions, tmp_path_factory) -> Path:
    region = regions[YEARS[0]]
    pixels = read_cube_reference(region, region.parent / "reference.zarr", "level2")
    artifact = train(pixels, "level2", TrainConfig(epochs=1, hidden=8, embed=4, head_hidden=8)).artifact
    artifact.class_colors = class_colors(artifact.classes, USER_COLORS)
    return save_artifact(artifact, tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def archive(regions, model, client, tmp_path_factory) -> Path:
    """Both years run (on the current client, which `run` picks up) and exported: a version folder."""
    root = tmp_path_factory.mktemp("archive")
    for year, cube in regions.items():
        mb.run(cube, model, root / str(year) / "abundance.zarr", config=mb.RunConfig(chunk=CHUNK),
               cog_dir=root / str(year) / "cog")
    return root


def test_api_example_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import python_api
    finally:
        sys.path.remove(str(ROOT / "examples"))
    result = python_api.main(tmp_path, size=40, epochs=1)
    assert result["pixel"]["abundance"].shape == (10, 1, 1)
    assert result["corner"]["abundance"].dims == ("lulc_class", "y", "x")
    assert pystac.read_file(result["catalog"]).id == "msmtu-products"
    assert result["figure"].read_bytes()[:4] == b"\x89PNG"


def test_run_uses_the_current_client(archive, client):
    """No LocalCluster of its own: the tasks ran on the notebook's client."""
    assert any(key.startswith("msmtu-chunk-") for key in client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.task_prefixes)))


def test_unmix_equals_run_for_a_cube_a_subset_a_pixel_and_memory(regions, model, archive):
    year = YEARS[0]
    expected = mb.open_output(archive / str(year) / "abundance.zarr").load()
    cube = mb.open_cube(regions[year])
    lazy = mb.unmix(cube, model, mb.RunConfig(chunk=CHUNK))
    assert lazy["abundance"].chunks is not None, "lazy, dask-backed"
    got = lazy.compute()
    xr.testing.assert_identical(got.drop_attrs(deep=False), expected.drop_attrs(deep=False))
    for name in expected.data_vars:  # the same per-variable attributes
        assert got[name].attrs == expected[name].attrs, name
    assert set(got.attrs) <= set(expected.attrs)
    pixel = mb.unmix(cube.isel(y=[5], x=[7]), model).compute()
    there = expected.isel(y=[5], x=[7])
    xr.testing.assert_identical(pixel.drop_attrs(deep=False).drop_vars("spatial_ref"),
                                there.drop_attrs(deep=False).drop_vars("spatial_ref"))
    assert pixel.rio.transform() == there.rio.transform(recalc=True), "georeferenced where the pixel is"
    in_memory = mb.unmix(cube.load(), model, mb.RunConfig(chunk=8)).compute()  # numpy-backed, chunked by unmix
    np.testing.assert_array_equal(in_memory["abundance"].values, expected["abundance"].values)
    decoded = xr.open_zarr(regions[year])  # plain xarray: float reflectance, NaN at gaps
    np.testing.assert_array_equal(mb.unmix(decoded, model)["abundance"].values, expected["abundance"].values)
    assert "expected_error" in expected, "a trained model has an error head"
    without = mb.unmix(cube.isel(y=[5], x=[7]), model, mb.RunConfig(expected_error=False)).compute()
    assert sorted(without.data_vars) == sorted(set(expected.data_vars) - {"expected_error"})


def test_every_store_opens_with_plain_xarray_without_a_warning(regions, archive):
    reference = regions[YEARS[0]].parent / "reference.zarr"
    stores = [(regions[YEARS[0]], None), (reference, None), (reference, "level1"), (archive / "2013" / "abundance.zarr",
                                                                                    None)]
    for store, group in stores:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = xr.open_zarr(store, group=group)
        assert not caught, f"{store}: {[str(w.message) for w in caught]}"
        assert ds.data_vars


def test_cf_attributes_and_provenance(archive, model):
    import cf_xarray  # noqa: F401  (registers the .cf accessor)

    ds = mb.open_output(archive / "2013" / "abundance.zarr")
    assert ds.cf["area_fraction"].name == "abundance"
    assert ds.cf["area_type"].name == "lulc_class"
    assert ds.cf.standard_names["status_flag"] == ["quality_flag"]
    assert ds.attrs["time_coverage_start"] == "2013-01-01" and ds.attrs["time_coverage_end"] == "2013-12-31"
    assert ds.attrs["date_created"].endswith("Z") and ds.attrs["history"].startswith(ds.attrs["date_created"])
    assert "msmtu-batch run --cube" in ds.attrs["history"]
    assert "IEEE JSTARS" in ds.attrs["references"] and "7752348" in ds.attrs["references"]
    assert ds.attrs["model_hash"] == artifact_hash(model)
    assert ds.attrs["input_content"].startswith("blake3:")
    assert f"msmtu-batch {mb.__version__}" in ds.attrs["software_versions"] and "torch " in ds.attrs[
        "software_versions"]
    assert ds["dominant_class"].attrs["flag_meanings"].split() == list(ds["lulc_class"].values)
    assert ds["dominant_class"].encoding["_FillValue"] == 255 and ds["dominant_class"].encoding["dtype"] == np.uint8
    raw = xr.open_zarr(archive / "2013" / "abundance.zarr", mask_and_scale=False)
    assert raw["dominant_class"].dtype == np.uint8 and raw["dominant_class"].attrs["_FillValue"] == 255


def test_creation_date_follows_source_date_epoch(monkeypatch, regions, model):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert mb.unmix(mb.open_cube(regions[YEARS[0]]), model).attrs["date_created"] == "2023-11-14T22:13:20Z"


def test_archive_opens_as_one_dataset_and_a_rerun_replaces_one_year_only(regions, model, archive, client):
    years = mb.open_output(archive)
    assert years["abundance"].dims == ("time", "lulc_class", "y", "x")
    assert [str(t)[:10] for t in years["time"].values] == ["2013-01-01", "2014-01-01"]
    for i, year in enumerate(YEARS):
        single = mb.open_output(archive / str(year) / "abundance.zarr")
        np.testing.assert_array_equal(years["abundance"].isel(time=i).values, single["abundance"].values)
    assert str(years["time_bounds"].values[1, 1])[:10] == "2015-01-01"

    untouched = zarr_files(archive / "2013" / "abundance.zarr")
    before = zarr_files(archive / "2014" / "abundance.zarr")
    mb.run(regions[2014], model, archive / "2014" / "abundance.zarr", config=mb.RunConfig(chunk=CHUNK, min_months=4),
           overwrite=True)
    assert zarr_files(archive / "2013" / "abundance.zarr") == untouched
    assert zarr_files(archive / "2014" / "abundance.zarr") != before
    assert sorted(p.name for p in (archive / "2014").iterdir()) == ["abundance.zarr", "cog"], "nothing left aside"
    assert mb.open_output(archive).attrs["time_coverage_end"] == "2014-12-31"


def test_stac_catalogue_round_trip(archive, model):
    path = mb.write_catalog(archive, "msmtu-test")
    collection = pystac.read_file(path)
    assert isinstance(collection, pystac.Collection) and collection.id == "msmtu-test"
    items = sorted(collection.get_items(), key=lambda i: i.id)
    assert [i.id for i in items] == ["msmtu-test-2013", "msmtu-test-2014"]
    interval = collection.extent.temporal.intervals[0]
    assert interval[0].isoformat()[:10] == "2013-01-01" and interval[1].isoformat()[:10] == "2014-12-31"
    artifact = mb.load_model(model)
    for item, year in zip(items, YEARS):
        assert item.properties["start_datetime"].startswith(f"{year}-01-01")
        assert item.properties["proj:code"] == "EPSG:25830" and item.properties["proj:shape"] == [SIZE, SIZE]
        assert item.assets["zarr"].media_type == "application/vnd+zarr" and item.assets["zarr"].roles == ["data"]
        cog = item.assets["dominant_class"]
        assert cog.media_type == pystac.MediaType.COG and cog.roles == ["data"]
        assert Path(cog.get_absolute_href()).is_file()
        assert cog.extra_fields["raster:bands"][0]["nodata"] == 255
        classes = cog.extra_fields["classification:classes"]
        assert [c["name"] for c in classes] == list(artifact.classes)
        assert [f"#{c['color_hint'].lower()}" for c in classes] == list(artifact.class_colors)
        record = json.loads(Path(item.assets["run_record"].get_absolute_href()).read_text())
        assert record["manifest"]["complete"] and record["model_hash"] == item.properties["msmtu:model_hash"]
        assert item.assets["abundance_style"].roles == ["style"]
        assert any("classification" in uri for uri in item.stac_extensions)


WARNINGS_AS_ERRORS = """
import sys, xarray as xr, msmtu_batch as mb
cube_path, model, archive, cog = sys.argv[1:]
maps = mb.unmix(mb.open_cube(cube_path).isel(y=slice(0, 6), x=slice(0, 6)), model).compute()
assert maps["abundance"].shape[1:] == (6, 6)
xr.open_zarr(archive + "/2013/abundance.zarr").load()
mb.open_output(archive).load()
mb.export_cogs(archive + "/2013/abundance.zarr", cog)
mb.write_catalog(archive, "msmtu-quiet")
print("quiet")
"""


def test_the_api_runs_with_warnings_as_errors(regions, model, archive, tmp_path):
    """A user running with -W error (or pytest's filterwarnings=error) meets no warning from the
    package: rioxarray's affine products, PendingDeprecationWarning in affine 3, are kept quiet."""
    done = subprocess.run([sys.executable, "-W", "error", "-c", WARNINGS_AS_ERRORS, str(regions[2013]), str(model),
                           str(archive), str(tmp_path / "cog")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "quiet", done.stderr


def test_catalog_follows_the_archive_rules_and_leaves_no_stale_items(archive, tmp_path):
    """Two stores of one year: `catalog` refuses as open_output does (it wrote duplicate Item ids
    and links); a new --collection-id replaces the Items of the old one."""
    import shutil

    from tests.test_faults import cli, one_line_error

    folder = tmp_path / "stores"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copytree(archive / "2013" / "abundance.zarr", folder / f"{name}.zarr")
    message = (f"two stores cover the year 2013: {folder / 'a.zarr'} and {folder / 'b.zarr'} (an archive holds one "
               "store per year: move one of them out)")
    assert one_line_error(cli("catalog", folder)) == message
    with pytest.raises(MsmtuError, match=re.escape(message)):
        mb.open_output(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["a.zarr", "b.zarr"], "nothing written"

    # a folder of stores of distinct years: a run record per store, not one shared
    shutil.rmtree(folder / "b.zarr")
    shutil.copytree(archive / "2014" / "abundance.zarr", folder / "b.zarr")
    assert cli("catalog", folder, "--collection-id", "first").returncode == 0
    assert json.loads((folder / "a.run-record.json").read_text())["output"] == "a.zarr"
    assert json.loads((folder / "b.run-record.json").read_text())["output"] == "b.zarr"
    assert sorted(p.name for p in folder.glob("first-*.json")) == ["first-2013.json", "first-2014.json"]
    assert cli("catalog", folder, "--collection-id", "second").returncode == 0
    assert sorted(p.name for p in folder.glob("*.json")) == [
        "a.run-record.json", "b.run-record.json", "collection.json", "second-2013.json", "second-2014.json"]
    assert sorted(i.id for i in pystac.read_file(folder / "collection.json").get_items()) == [
        "second-2013", "second-2014"]
    # the workflow layout, written again under its own id: the files it links stay
    mb.write_catalog(archive, "msmtu-test")
    before = sorted(p.relative_to(archive) for p in archive.rglob("*.json") if "abundance.zarr" not in p.parts)
    mb.write_catalog(archive, "msmtu-test")
    assert sorted(p.relative_to(archive) for p in archive.rglob("*.json") if "abundance.zarr" not in p.parts) == before


def test_cogs_carry_colour_table_categories_style_and_provenance(archive, model):
    artifact = mb.load_model(model)
    assert artifact.class_colors[artifact.classes.index("olive_grove")] == "#808000"
    cog = archive / "2013" / "cog" / "dominant_class_2013.tif"
    info = gdal("gdalinfo", str(cog))
    assert "Type=Byte, ColorInterp=Palette" in info and "NoData Value=255" in info
    categories = info.split("Categories:")[1].split("Color Table")[0]
    assert [line.split(": ")[1] for line in categories.strip().splitlines()] == list(artifact.classes)
    with rasterio.open(cog) as raster:
        assert raster.dtypes[0] == "uint8" and raster.nodata == 255
        colormap = raster.colormap(1)
        assert [colormap[i][:3] for i in range(len(artifact.classes))] == [rgb(c) for c in artifact.class_colors]
        assert raster.tags()["model_hash"] == artifact_hash(model)
        assert raster.tags()["time_coverage_start"] == "2013-01-01"
    style = ET.parse(cog.with_suffix(".qml")).getroot()
    entries = style.findall(".//paletteEntry")
    assert [(e.get("label"), e.get("color")) for e in entries] == list(zip(artifact.classes, artifact.class_colors))
    style = ET.parse(archive / "2013" / "cog" / "abundance_2013.qml").getroot()
    ramp = style.findall(".//colorrampshader/item")
    assert (ramp[0].get("value"), ramp[-1].get("value")) == ("0", "1")
    # the abundance style opens on the class with the highest mean abundance, not on band 1
    means = mb.open_output(archive / "2013" / "abundance.zarr")["abundance"].mean(("y", "x")).values
    band = int(style.find(".//rasterrenderer").get("band"))
    assert band == int(np.argmax(means)) + 1 and band != 1  # class 1, urban, is rare in the simulated region
    with rasterio.open(archive / "2013" / "cog" / "abundance_2013.tif") as cog:
        assert cog.descriptions[band - 1] == artifact.classes[int(np.argmax(means))]


def test_cog_export_reads_window_by_window_and_keeps_every_value(archive, tmp_path):
    """A product larger than one export window (several Zarr chunks and TIFF blocks a side, edges
    not on a block): every COG holds the store's values and georeferencing, read back with
    rasterio, and the export never holds more than a fraction of a product in memory (it read
    whole products: 4 GB for an abundance of 10,000 x 10,000 pixels)."""
    import tracemalloc

    small = xr.open_zarr(archive / "2013" / "abundance.zarr", decode_coords="all", mask_and_scale=False).load()
    reps = (46, 50)  # 1,104 x 1,200 pixels from the 24 x 24 output
    spatial = {n: v for n, v in small.data_vars.items() if v.dims[-2:] == ("y", "x")}
    resolution = float(small.x[1] - small.x[0])
    big = xr.Dataset({n: (v.dims, np.tile(v.values, (1,) * (v.ndim - 2) + reps), v.attrs) for n, v in spatial.items()},
                     coords={"y": float(small.y[0]) - resolution * np.arange(small.sizes["y"] * reps[0]),
                             "x": float(small.x[0]) + resolution * np.arange(small.sizes["x"] * reps[1]),
                             "lulc_class": small.lulc_class}, attrs=small.attrs).rio.write_crs(small.rio.crs)
    # NaN (no estimate) across overview blocks: some blocks wholly, some in part
    for name in ("abundance", "uncertainty", "expected_error"):
        big[name].values[..., 101:106, 7:10] = np.nan
    store = tmp_path / "big.zarr"
    for name in spatial:  # Zarr chunks of 100 x 100: export windows of 300 x 300, the last ones cut
        big[name].encoding["chunks"] = (*big[name].shape[:-2], 100, 100)
    big.to_zarr(store, zarr_format=3, consolidated=False)
    consolidate(store)  # as run leaves its outputs: a plain open_zarr then reads it without a warning

    tracemalloc.start()
    try:
        files = mb.export_cogs(store, tmp_path / "cog", parallel=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    product_bytes = big["abundance"].nbytes
    # measured 11.5-13.4 MB here (windows of 300 x 300 x 10 classes and their copies); the whole
    # product read at once gave 108 MB
    assert peak < product_bytes / 2, (peak, product_bytes)
    assert {p.name for p in files if p.suffix == ".tif"} == {f"{n}_2013.tif" for n in spatial}
    for name in spatial:
        with rasterio.open(tmp_path / "cog" / f"{name}_2013.tif") as cog:
            written = cog.read()
            assert cog.transform.almost_equals(big.rio.transform(), precision=1e-6) and cog.crs == big.rio.crs
        np.testing.assert_array_equal(written, big[name].values.reshape(written.shape))
        # the overviews: 552 x 600 down to 34 x 37 (halved, rounded down), GDAL's modes for the
        # categorical products, the NaN-aware means of 2 x 2 pixels of the level before for the others
        level = written
        for index, factor in enumerate((2, 4, 8, 16, 32)):
            with rasterio.open(tmp_path / "cog" / f"{name}_2013.tif", overview_level=index) as overview:
                assert (overview.height, overview.width) == (1104 // factor, 1200 // factor)
                values = overview.read()
            if name in ("dominant_class", "quality_flag"):
                continue
            level = halved_reference(level)
            np.testing.assert_allclose(values, level, rtol=1e-6, atol=1e-7)  # NaN where the reference has NaN
            if factor == 2 and name != "valid_fraction":
                assert np.isnan(values).any() and not np.isnan(values).all(axis=(1, 2)).any()


def halved_reference(values: np.ndarray) -> np.ndarray:
    """Plain NumPy: the mean of the non-NaN values of each 2 x 2 block of (bands, rows, columns),
    NaN where a block has none; the last row or column of an odd side joins the block before it
    (the sides halved and rounded down, as GDAL sizes overviews)."""
    out_rows, out_columns = max(1, values.shape[1] // 2), max(1, values.shape[2] // 2)
    row_blocks = [values[:, 2 * i:2 * i + 2 if i < out_rows - 1 else None] for i in range(out_rows)]
    out = np.empty((values.shape[0], out_rows, out_columns), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a block of NaN only: its mean is NaN
        for i, rows in enumerate(row_blocks):
            for j in range(out_columns):
                block = rows[:, :, 2 * j:2 * j + 2 if j < out_columns - 1 else None]
                out[:, i, j] = np.nanmean(block.astype(np.float64), axis=(1, 2))
    return out


@settings(max_examples=60, deadline=None)
@given(bands=st.integers(1, 3), rows=st.integers(1, 9), columns=st.integers(1, 9), seed=st.integers(0, 2**16),
       nan_share=st.sampled_from([0.0, 0.3, 0.9, 1.0]))
def test_overview_kernel_is_the_nan_aware_mean_of_2_by_2_blocks(bands, rows, columns, seed, nan_share):
    rng = np.random.default_rng(seed)
    values = rng.random((bands, rows, columns), dtype=np.float32)
    values[rng.random(values.shape) < nan_share] = np.nan
    out = np.empty((bands, halved_side(rows), halved_side(columns)), np.float32)
    halve(values, out)
    np.testing.assert_allclose(out, halved_reference(values), rtol=1e-6, atol=1e-7)


def test_output_store_of_a_large_region_is_planned_without_its_data(model, regions):
    """The empty output store of a 4096 x 4096 region: its products are lazy arrays of their
    fill values, so creating it allocates nothing of the region's size (a chunked broadcast of
    the fills allocated 870 MiB here, the peak of the whole run)."""
    import tracemalloc

    import dask.array

    from msmtu_batch.model.artifact import load_artifact
    from msmtu_batch.products.blocks import DOMINANT_FILL, FLAG_TOO_FEW_OBSERVATIONS, output_template

    artifact = load_artifact(model)
    small = xr.open_zarr(regions[2013], decode_coords="all")
    side, resolution = 4096, float(small.x[1] - small.x[0])
    grid = xr.Dataset(coords={"y": float(small.y[0]) - resolution * np.arange(side),
                              "x": float(small.x[0]) + resolution * np.arange(side), "time": small.time})
    tracemalloc.start()
    try:
        template = output_template(grid, artifact, mb.RunConfig(chunk=256))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    abundance = template["abundance"]
    assert abundance.shape == (len(artifact.classes), side, side) and abundance.nbytes > 600e6
    assert all(isinstance(v.data, dask.array.Array) for v in template.data_vars.values())
    assert peak < 20e6, peak
    corner = template.isel(y=slice(250, 260), x=slice(250, 260)).compute()  # two chunks a side
    assert np.isnan(corner["abundance"].values).all() and corner["abundance"].dtype == np.float32
    assert (corner["quality_flag"].values == FLAG_TOO_FEW_OBSERVATIONS).all()
    assert (corner["dominant_class"].values == DOMINANT_FILL).all() and corner["dominant_class"].dtype == np.uint8


@pytest.fixture(scope="module")
def zarr2_environment(tmp_path_factory) -> Path:
    """zarr-python 2 (and the numcodecs it works with) in a folder of its own, put before the
    project's packages on the path of a subprocess."""
    target = tmp_path_factory.mktemp("zarr2")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    "zarr==2.18.7", "numcodecs==0.15.1", "asciitree", "fasteners", "deprecated", "wrapt"],
                   check=True, capture_output=True, timeout=300)
    return target


def test_zarr_v2_output_read_by_zarr_python_2_and_debian_gdal(regions, model, archive, zarr2_environment,
                                                              tmp_path, client):
    out = tmp_path / "v2.zarr"
    mb.run(regions[2013], model, out, config=mb.RunConfig(chunk=CHUNK, zarr_format=2))
    assert (out / ".zmetadata").is_file() and not (out / "zarr.json").exists()
    expected = mb.open_output(archive / "2013" / "abundance.zarr")
    np.testing.assert_array_equal(mb.open_output(out)["abundance"].values, expected["abundance"].values)

    script = ("import json, sys, zarr, numpy as np; assert zarr.__version__.startswith('2.'), zarr.__version__; "
              "g = zarr.open_consolidated(sys.argv[1], mode='r'); "
              "print(json.dumps({'abundance': np.nan_to_num(g['abundance'][:], nan=-1).tolist(), "
              "'classes': [str(c) for c in g['lulc_class'][:]], 'fill': int(g['dominant_class'].fill_value), "
              "'start': g.attrs['time_coverage_start']}))")
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(zarr2_environment)})
    assert result.returncode == 0, result.stderr
    read = json.loads(result.stdout)
    np.testing.assert_array_equal(np.array(read["abundance"], np.float32),
                                  np.nan_to_num(expected["abundance"].values, nan=-1))
    assert read["classes"] == list(expected["lulc_class"].values) and read["fill"] == 255
    assert read["start"] == "2013-01-01"

    info = gdal("gdalinfo", f'ZARR:"{out}":/dominant_class')
    assert "Driver: Zarr/Zarr" in info and "Size is 24, 24" in info and "NoData Value=255" in info
    assert 'ID["EPSG",25830]' in info and "ERROR" not in info
    tif = tmp_path / "dominant.tif"
    gdal("gdal_translate", "-q", f'ZARR:"{out}":/dominant_class', str(tif))
    with rasterio.open(tif) as raster:
        assert raster.transform == expected.rio.transform()
        np.testing.assert_array_equal(raster.read(1), np.nan_to_num(expected["dominant_class"].values, nan=255))
