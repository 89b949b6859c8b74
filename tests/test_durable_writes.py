"""The one place every file is written through (runtime/outputs.py): a write that fails leaves
the old file and no temporary one; links and folders are replaced whole; a file read while it
is replaced is read as one version."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from msmtu_batch.model.checkpoint import load_checkpoint
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


REWRITER = """
import sys, numpy as np, torch
from msmtu_batch.model.checkpoint import TrainingState, save_checkpoint
for epoch in range(1, 100_000):
    save_checkpoint(TrainingState(
        identity="race", epoch=epoch, history=[], best_rmse=1.0, best_epoch=epoch, stale=0, train_seconds=0.0,
        model={"w": torch.full((50_000,), float(epoch))}, best_model=None, optimiser={"state": {}, "param_groups": []},
        scheduler={}, torch_rng=torch.get_rng_state(), numpy_rng=np.random.default_rng(0).bit_generator.state),
        sys.argv[1])
"""


def test_a_checkpoint_read_while_the_training_replaces_it_is_one_version(tmp_path):
    """A training rewrites its checkpoint every epoch while a job's monitor (here: the requeue
    test) reads it. safe_open takes the header and the tensors from two openings of the file,
    so 7 % of such reads mixed two versions and were refused as damaged; read whole, none is."""
    checkpoint = tmp_path / ".model.safetensors.checkpoint"
    writer = subprocess.Popen([sys.executable, "-c", REWRITER, str(checkpoint)])
    try:
        while not checkpoint.exists():
            assert writer.poll() is None, "the writer failed"
            time.sleep(0.01)
        epochs = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            state = load_checkpoint(checkpoint)  # raises on a mixed read: its checksum does not match
            assert state.model["w"][0].item() == state.epoch
            epochs.add(state.epoch)
    finally:
        writer.kill()
        writer.wait()
    assert len(epochs) > 20, "the file was not replaced while it was read: the test tested nothing"
