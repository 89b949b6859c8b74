"""The Andalusia-MSMTU layout written by simulate, and the spatial block split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msmtu_batch.cube import ANCILLARY_NAMES, REFLECTANCE_FILL
from msmtu_batch.simulate import LEVELS
from msmtu_batch.training_data import PARTITIONS, spatial_block_split
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
        np.testing.assert_allclose(values, np.where(expected_mask, pixel * 1e-4, 0.0), atol=1e-9)
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
