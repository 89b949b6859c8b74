"""The Andalusia-MSMTU layout written by simulate, and the spatial block split."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msmtu_batch.inputs.cube import ANCILLARY_NAMES, REFLECTANCE_FILL
from msmtu_batch.inputs.training_data import PARTITIONS, read_cube_reference, read_msmtu, spatial_block_split
from msmtu_batch.runtime.errors import TrainingDataError
from msmtu_batch.synthetic.simulate import LEVELS
from tests.conftest import SMALL
from tests.test_simulate import rejected_by_qa


@pytest.fixture(scope="module")
def labels(region) -> dict[str, pd.DataFrame]:
    """Labels per level, all partitions stacked, with a 'partition' column."""
    out = {}
    for level in LEVELS:
        parts = []
        for name in PARTITIONS:
            table = pd.read_csv(region.msmtu / "labels" / level / "partitions" / f"{name}.csv",
                                dtype={c: np.float32 for c in LEVELS[level]})
            parts.append(table.assign(partition=name))
        out[level] = pd.concat(parts).sort_values("square_id").reset_index(drop=True)
    return out


def test_every_labelled_pixel_has_a_series_and_ancillary_row(region, labels):
    ids = labels["level2"]["square_id"]
    assert len(ids) == SMALL.msmtu_pixels and ids.is_unique
    assert labels["level1"]["square_id"].tolist() == ids.tolist()
    files = sorted(p.name for p in (region.msmtu / "ts_files").iterdir())
    assert files == [f"{i:07d}.json" for i in ids]
    ancillary = pd.read_csv(region.msmtu / "ancillary" / "topo_climatic.csv")
    assert ancillary.columns.tolist() == ["square_id", *ANCILLARY_NAMES]
    assert ancillary["square_id"].tolist() == ids.tolist()


def test_series_match_the_cube(region, cube, labels):
    refl = cube["reflectance"].values
    qa = cube["state_qa"].values
    for square_id in labels["level2"]["square_id"][::7]:
        row, col = divmod(int(square_id), SMALL.width)
        record = json.loads((region.msmtu / "ts_files" / f"{square_id:07d}.json").read_text())
        assert record["metadata"]["row"] == row and record["metadata"]["col"] == col
        forward = record["ts_data"]["forward"]
        values, masks = np.array(forward["values"]), np.array(forward["masks"])
        assert values.shape == masks.shape == (12, 7)
        pixel = refl[:, :, row, col]
        expected_mask = (pixel != REFLECTANCE_FILL) & ~rejected_by_qa(qa[:, row, col])[:, None]
        np.testing.assert_array_equal(masks, expected_mask.astype(int))
        # published units: reflectance x 1e4, the cube's stored integers
        np.testing.assert_array_equal(values, np.where(expected_mask, pixel, 0))
        backward = record["ts_data"]["backward"]
        assert backward["values"] == forward["values"][::-1]
        assert backward["masks"] == forward["masks"][::-1]


def test_labels_and_ancillary_match_the_reference_and_cube(region, cube, reference, labels):
    ancillary = pd.read_csv(region.msmtu / "ancillary" / "topo_climatic.csv",
                            dtype={n: np.float32 for n in ANCILLARY_NAMES})
    rows, cols = np.divmod(labels["level2"]["square_id"].to_numpy(), SMALL.width)
    for level, classes in LEVELS.items():
        table = labels[level]
        truth = reference[level]["abundance"].values[:, rows, cols].T
        np.testing.assert_array_equal(table[list(classes)].to_numpy(), truth)
        assert (table["Class_max"] == np.array(classes)[truth.argmax(axis=1)]).all()
    for name in ANCILLARY_NAMES:
        np.testing.assert_array_equal(ancillary[name].to_numpy(), cube[name].values[rows, cols])


def test_partitions_follow_the_spatial_blocks(region, reference, labels):
    import xarray as xr

    partition = xr.open_zarr(region.reference, consolidated=False)["partition"].values
    block = SMALL.split_block
    for r in range(0, SMALL.height, block):
        for c in range(0, SMALL.width, block):
            assert np.unique(partition[r:r + block, c:c + block]).size == 1, "a block is split"
    rows, cols = np.divmod(labels["level2"]["square_id"].to_numpy(), SMALL.width)
    np.testing.assert_array_equal(
        labels["level2"]["partition"].map(PARTITIONS.index).to_numpy(), partition[rows, cols])
    assert set(labels["level2"]["partition"]) == set(PARTITIONS)


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 80), width=st.integers(1, 80), block=st.integers(1, 20),
       seed=st.integers(0, 2**32 - 1))
def test_block_split_never_leaks_across_blocks(height, width, block, seed):
    split = spatial_block_split(height, width, block, (0.7, 0.15, 0.15), seed)
    assert split.shape == (height, width) and split.dtype == np.int8
    rows, cols = -(-height // block), -(-width // block)
    labels = np.full((rows, cols), -1)
    for r in range(height):
        for c in range(width):
            b = labels[r // block, c // block]
            assert b in (-1, split[r, c]), "pixels of one block in two partitions"
            labels[r // block, c // block] = split[r, c]
    counts = np.bincount(labels.ravel(), minlength=3)
    if rows * cols >= 3:
        assert (counts > 0).all(), "every partition gets a block"
    assert counts[0] >= counts[1] and counts[0] >= counts[2]
    np.testing.assert_array_equal(split, spatial_block_split(height, width, block, (0.7, 0.15, 0.15), seed))


# --- Readers ----------------------------------------------------------------------------------


@pytest.fixture
def msmtu_copy(region, tmp_path):
    target = tmp_path / "msmtu"
    shutil.copytree(region.msmtu, target, ignore=shutil.ignore_patterns(".msmtu_cache"))
    return target


def test_msmtu_reader_returns_the_cube_values(msmtu_copy, cube, reference):
    pixels = read_msmtu(msmtu_copy, "level2")
    rows, cols = np.divmod(pixels.ids, SMALL.width)
    raw = cube["reflectance"].values[:, :, rows, cols].transpose(2, 0, 1)
    usable = (raw != REFLECTANCE_FILL) & ~rejected_by_qa(cube["state_qa"].values[:, rows, cols].T)[:, :, None]
    np.testing.assert_array_equal(pixels.masks, usable)
    np.testing.assert_allclose(pixels.values, np.where(usable, raw * 1e-4, 0), atol=1e-7)
    np.testing.assert_array_equal(pixels.abundance, reference["level2"]["abundance"].values[:, rows, cols].T)
    assert pixels.classes == LEVELS["level2"] and pixels.ancillary_names == ANCILLARY_NAMES
    for name in PARTITIONS:
        assert len(pixels.split(name)) == len(pd.read_csv(
            msmtu_copy / "labels" / "level2" / "partitions" / f"{name}.csv"))


def test_msmtu_reader_caches_and_notices_changes(msmtu_copy):
    first = read_msmtu(msmtu_copy, "level1")
    cache = msmtu_copy / ".msmtu_cache" / "level1.npz"
    assert cache.is_file()
    with np.load(cache, allow_pickle=False) as data:
        assert data["values"].shape == first.values.shape
    again = read_msmtu(msmtu_copy, "level1")
    np.testing.assert_array_equal(again.values, first.values)
    # change one series: the cache is stale and rebuilt
    path = msmtu_copy / "ts_files" / f"{int(first.ids[0]):07d}.json"
    record = json.loads(path.read_text())
    record["ts_data"]["forward"]["values"][0][0] = 4321
    record["ts_data"]["forward"]["masks"][0][0] = 1
    path.write_text(json.dumps(record))
    changed = read_msmtu(msmtu_copy, "level1")
    assert changed.values[0, 0, 0] == np.float32(4321) * np.float32(1e-4)


def _first_train_id(root) -> int:
    return int(pd.read_csv(root / "labels" / "level2" / "partitions" / "train.csv")["square_id"][0])


def test_missing_series_is_named(msmtu_copy):
    square_id = _first_train_id(msmtu_copy)
    (msmtu_copy / "ts_files" / f"{square_id:07d}.json").unlink()
    with pytest.raises(TrainingDataError) as err:
        read_msmtu(msmtu_copy, "level2")
    assert str(err.value) == (
        f"{msmtu_copy}/ts_files/{square_id:07d}.json: missing time series for square_id {square_id} "
        f"listed in {msmtu_copy}/labels/level2/partitions/train.csv")


def test_class_columns_must_agree_across_partitions(msmtu_copy):
    test_csv = msmtu_copy / "labels" / "level2" / "partitions" / "test.csv"
    pd.read_csv(test_csv).rename(columns={"water": "lakes"}).to_csv(test_csv, index=False)
    with pytest.raises(TrainingDataError) as err:
        read_msmtu(msmtu_copy, "level2")
    assert str(err.value).startswith(f"{test_csv}: class columns urban, ")
    assert "lakes differ from train.csv's urban," in str(err.value)


def test_nan_ancillary_is_named(msmtu_copy):
    table_path = msmtu_copy / "ancillary" / "topo_climatic.csv"
    table = pd.read_csv(table_path)
    square_id = _first_train_id(msmtu_copy)
    table.loc[table["square_id"] == square_id, "slope"] = np.nan
    table.to_csv(table_path, index=False)
    with pytest.raises(TrainingDataError) as err:
        read_msmtu(msmtu_copy, "level2")
    assert str(err.value) == f"{table_path}: NaN in 'slope' for square_id {square_id}"


def test_wrong_series_shape_missing_partition_and_extra_keys(msmtu_copy):
    square_id = _first_train_id(msmtu_copy)
    path = msmtu_copy / "ts_files" / f"{square_id:07d}.json"
    record = json.loads(path.read_text())
    record["extra"] = {"anything": [1, 2]}  # unknown keys are tolerated
    path.write_text(json.dumps(record))
    read_msmtu(msmtu_copy, "level2", cache=False)
    record["ts_data"]["forward"]["values"] = record["ts_data"]["forward"]["values"][:11]
    path.write_text(json.dumps(record))
    with pytest.raises(TrainingDataError) as err:
        read_msmtu(msmtu_copy, "level2", cache=False)
    assert str(err.value) == f"{path}: ts_data.forward.values is 11 x 7, expected 12 x 7"
    (msmtu_copy / "labels" / "level1" / "partitions" / "validation.csv").unlink()
    with pytest.raises(TrainingDataError, match=r"level1/partitions/validation\.csv: missing partition file"):
        read_msmtu(msmtu_copy, "level1")
    with pytest.raises(TrainingDataError, match=r"no such label level folder \(levels found: level1, level2"):
        read_msmtu(msmtu_copy, "level9")


def test_cube_reader_uses_the_stored_split(region, cube, reference):
    import xarray as xr

    pixels = read_cube_reference(region.cube, region.reference, "level1")
    assert len(pixels) == SMALL.height * SMALL.width and pixels.grid_shape == (SMALL.height, SMALL.width)
    partition = xr.open_zarr(region.reference, consolidated=False)["partition"].values.ravel()
    np.testing.assert_array_equal(pixels.partition, partition)
    row, col = 5, 17
    i = row * SMALL.width + col
    np.testing.assert_array_equal(pixels.abundance[i], reference["level1"]["abundance"].values[:, row, col])
    assert pixels.ancillary[i, ANCILLARY_NAMES.index("altitude")] == cube["altitude"].values[row, col]


def test_cube_reader_refuses_another_grid(region, tmp_path):
    import xarray as xr

    ref = xr.open_zarr(region.reference, group="level2", consolidated=False).isel(x=slice(1, None)).load()
    for var in ref.variables.values():
        var.encoding = {}
    ref.to_zarr(tmp_path / "ref.zarr", group="level2", consolidated=False)
    with pytest.raises(TrainingDataError) as err:
        read_cube_reference(region.cube, tmp_path / "ref.zarr", "level2")
    assert str(err.value) == (f"{tmp_path / 'ref.zarr'}: 95 pixels along x, the cube {region.cube} has 96 "
                              "(reference and cube must share one grid)")


def test_a_damaged_cache_is_rebuilt(msmtu_copy):
    first = read_msmtu(msmtu_copy, "level2")
    cache = msmtu_copy / ".msmtu_cache" / "level2.npz"
    cache.write_bytes(cache.read_bytes()[:500])
    again = read_msmtu(msmtu_copy, "level2")
    np.testing.assert_array_equal(again.values, first.values)
    assert cache.stat().st_size > 500 and not list(cache.parent.glob("*.partial.npz"))
