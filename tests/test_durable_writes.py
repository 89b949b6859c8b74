"""The one place every file is written through (runtime/outputs.py): a write that fails leaves
the old file and no temporary one; links and folders are replaced whole."""

import os

import numpy as np
import pytest

from msmtu_batch.runtime.outputs import durable_file, replace_link, staged_folder, write_text_durably


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "record.json"
    write_text_durably(target, "old")
    with pytest.raises(RuntimeError, match="killed"), durable_file(target) as partial:
        partial.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_writer_that_adds_a_suffix_writes_where_it_is_told(tmp_path):
    target = tmp_path / "cache.npz"
    with durable_file(target, suffix=".npz") as partial:
        np.savez(partial, values=np.arange(3))  # np.savez adds .npz to a name without it
    np.testing.assert_array_equal(np.load(target)["values"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]


def test_a_link_is_swapped_and_a_folder_replaced_whole(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    link = tmp_path / "latest"
    replace_link(link, "v1")
    replace_link(link, "v2")
    assert os.readlink(link) == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v1", "v2"]
    final = tmp_path / "store"
    with staged_folder(final) as staging:  # the writer makes it (to_zarr does)
        staging.mkdir()
        (staging / "a").write_text("1")
        assert not final.exists()
    with pytest.raises(RuntimeError), staged_folder(final) as staging:
        staging.mkdir()
        (staging / "b").write_text("2")
        raise RuntimeError("interrupted")
    assert [p.name for p in final.iterdir()] == ["a"]  # the published folder stays as it was
