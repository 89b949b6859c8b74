"""Fault injection: every way a user's data, disk or neighbour can hurt a run ends either in a
correct result or in one clear refusal, and nothing is lost (the README's "What can go wrong").

Each test names the fault it injects. The inputs come from other tools where it matters
(xarray's own Zarr writer with its default codecs, files edited byte by byte), not only from
the project's writers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import xarray as xr
import zarr

from msmtu_batch.evaluation.evaluate import evaluate
from msmtu_batch.inputs.cube import ALL_CHUNKS_ATTR, REFLECTANCE_FILL, read_windows
from msmtu_batch.inputs.training_data import read_msmtu
from msmtu_batch.model.artifact import load_artifact, save_artifact
from msmtu_batch.model.inference import predict
from msmtu_batch.model.metrics import rmse
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.orchestration.pipeline import RunConfig, run
from msmtu_batch.products.archive import open_output
from msmtu_batch.runtime.digests import with_checksum
from msmtu_batch.runtime.errors import MsmtuError, TrainingDataError
from tests.conftest import SMALL, die_mid_write, gdal, zarr_files

BIN = Path(sys.executable).parent
CHUNK = 24  # 3 x 4 = 12 chunks on the 72 x 96 test region
SMALL_MODEL = TrainConfig(epochs=2, hidden=16, embed=8, head_hidden=16, batch_size=128)


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: object) -> Done:
    """The command line in this process (typer's runner): the same error handling as the
    installed command, without a new interpreter per call."""
    from typer.testing import CliRunner

    from msmtu_batch.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return Done(result.exit_code, result.stdout, result.stderr)


def cli_process(*args: object, timeout: int = 300) -> Done:
    """The installed command in its own process: where what the process prints is the point."""
    done = subprocess.run([str(BIN / "msmtu-batch"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return Done(done.returncode, done.stdout, done.stderr)


def one_line_error(result: Done) -> str:
    """The single line a refused command prints (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("msmtu-batch: error: "), result.stderr
    return lines[-1].removeprefix("msmtu-batch: error: ")


@pytest.fixture(scope="module")
def scheduler(local_scheduler) -> str:
    return local_scheduler


@pytest.fixture(scope="module")
def model(region, tmp_path_factory) -> Path:
    """A model trained on the region's Andalusia-MSMTU files (published units, x 1e4)."""
    pixels = read_msmtu(region.msmtu, "level2")
    result = train(pixels, "level2", SMALL_MODEL)
    return save_artifact(result.artifact, tmp_path_factory.mktemp("msmtu-model") / "model.safetensors")


@pytest.fixture(scope="module")
def clean_output(region, model, scheduler, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("msmtu-run") / "out.zarr"
    run(region.cube, model, out, config=RunConfig(chunk=CHUNK), scheduler=scheduler)
    return out


# --- 1. training-data units ---------------------------------------------------------------------

def test_msmtu_files_hold_published_units(region):
    """The layout's JSON values are reflectance x 1e4 (hundreds to thousands), as published."""
    record = json.loads(next((region.msmtu / "ts_files").glob("*.json")).read_text())
    forward = record["ts_data"]["forward"]
    observed = [v for row, mask in zip(forward["values"], forward["masks"]) for v, m in zip(row, mask) if m]
    assert observed and all(float(v).is_integer() for v in observed)
    assert 100 < np.median(observed) < 10_000


def test_model_from_msmtu_files_maps_the_cube_as_evaluate_scores_the_files(region, model, clean_output,
                                                                          tmp_path):
    """Trained on the MSMTU layout and applied with `run` to the same region's cube, a model gives
    the MSMTU pixels the abundances `evaluate` computes from the files."""
    artifact = load_artifact(model)
    pixels = read_msmtu(region.msmtu, "level2")
    test = pixels.split("test")
    report = evaluate(artifact, pixels, tmp_path / "report", baselines=False)
    from_files = predict(artifact.model, artifact.inputs(test))["abundance"]
    output = open_output(clean_output)
    rows, cols = np.divmod(test.ids, SMALL.width)
    from_map = output["abundance"].values[:, rows, cols].T
    estimated = output["quality_flag"].values[rows, cols] == 0
    assert estimated.mean() > 0.9
    np.testing.assert_allclose(from_map[estimated], from_files[estimated], atol=2e-5)
    assert rmse(from_map[estimated], test.abundance[estimated]) == pytest.approx(
        rmse(from_files[estimated], test.abundance[estimated]), abs=1e-5)
    if estimated.all():
        assert report["methods"]["brits"]["rmse"] == pytest.approx(rmse(from_map, test.abundance), abs=1e-5)


def test_msmtu_files_in_scaled_units_are_refused(region, tmp_path):
    """A folder whose values are 0-1 reflectance (not the published x 1e4) stops with one line."""
    root = tmp_path / "msmtu"
    shutil.copytree(region.msmtu, root, ignore=shutil.ignore_patterns(".msmtu_cache"))
    for path in (root / "ts_files").glob("*.json"):
        record = json.loads(path.read_text())
        for direction in ("forward", "backward"):
            series = record["ts_data"][direction]
            series["values"] = [[v * 1e-4 for v in row] for row in series["values"]]
        path.write_text(json.dumps(record))
    with pytest.raises(TrainingDataError) as err:
        read_msmtu(root, "level2")
    assert str(err.value).startswith(f"{root / 'ts_files'}: observed values have median 0.")
    assert str(err.value).endswith(", expected reflectance x 1e4 as published (hundreds to thousands); "
                                   "multiply 0-1 reflectance by 10000")


def test_artifact_without_band_units_is_refused(model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(model, framework="pt") as f:
        meta = json.loads(f.metadata()["msmtu_batch"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for units, expected in ((None, "none recorded (an artifact from before msmtu-batch 0.2: retrain it)"),
                            ("DN", "'DN'")):
        meta.pop("band_statistics_units", None)
        if units:
            meta["band_statistics_units"] = units
        path = tmp_path / f"{units}.safetensors"
        save_file(tensors, path, metadata={"msmtu_batch": json.dumps(with_checksum(meta, tensors))})
        with pytest.raises(MsmtuError) as err:
            load_artifact(path)
        assert str(err.value) == (f"{path}: unit of the band statistics is {expected}; expected 'reflectance' "
                                  "or 'reflectance x 1e4'")
    # statistics recorded in the published x 1e4 units are converted on load: same model, same inputs
    meta["band_statistics_units"] = "reflectance x 1e4"
    tensors["band_mean"], tensors["band_std"] = tensors["band_mean"] * 1e4, tensors["band_std"] * 1e4
    path = tmp_path / "x1e4.safetensors"
    save_file(tensors, path, metadata={"msmtu_batch": json.dumps(with_checksum(meta, tensors))})
    converted, original = load_artifact(path), load_artifact(model)
    np.testing.assert_allclose(converted.band_stats.mean, original.band_stats.mean, rtol=1e-6)
    np.testing.assert_allclose(converted.band_stats.std, original.band_stats.std, rtol=1e-6)


# --- 3-5. Zarr written by others; absent and damaged chunks -----------------------------------

def xarray_default_copy(cube: Path, target: Path, zarr_format: int) -> Path:
    """The cube as a user's own xarray would write it: raw integers with their CF attributes,
    default codecs of that Zarr format, no encodings of ours."""
    ds = xr.open_zarr(cube, mask_and_scale=False, decode_coords="all", consolidated=False)
    ds.attrs.pop(ALL_CHUNKS_ATTR)
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(target, zarr_format=zarr_format, consolidated=False)
    return target


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_cubes_written_by_xarray_with_default_codecs_validate_train_and_run(region, model, clean_output, zarr_format,
                                                                            scheduler, tmp_path):
    store = xarray_default_copy(region.cube, tmp_path / "cube.zarr", zarr_format)
    if zarr_format == 2:
        assert (store / "reflectance" / ".zarray").is_file(), "a Zarr v2 store with xarray's default compressor"
    assert cli("validate", store).returncode == 0
    result = cli("train", "--cube", store, "--reference", region.reference, "--level", "level2", "--ancillary",
                 "none", "--epochs", "1", "--hidden", "8", "--out", tmp_path / "m.safetensors")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out.zarr"
    run(store, model, out, config=RunConfig(chunk=CHUNK), scheduler=scheduler)
    assert (out / "abundance" / "zarr.json").is_file(), "outputs are the project's own Zarr v3"
    got, expected = open_output(out), open_output(clean_output)
    for name in ("abundance", "dominant_class", "uncertainty", "valid_fraction", "quality_flag"):
        np.testing.assert_array_equal(got[name].values, expected[name].values)


def test_project_stores_declare_their_fill_values_and_checksum_every_chunk(region, clean_output):
    reflectance = zarr.open_array(region.cube / "reflectance", mode="r")
    assert reflectance.fill_value == REFLECTANCE_FILL
    assert np.isnan(zarr.open_array(region.cube / "altitude", mode="r").fill_value)
    for store, name in ((region.cube, "reflectance"), (clean_output, "abundance"), (clean_output, "quality_flag")):
        codecs = json.loads((store / name / "zarr.json").read_text())["codecs"]
        assert codecs[-1]["name"] == "crc32c", (store, name, codecs)


def copy_of(store: Path, target: Path) -> Path:
    shutil.copytree(store, target)
    return target


def test_absent_input_chunk_is_named_not_read_as_zero(region, model, scheduler, tmp_path):
    cube = copy_of(region.cube, tmp_path / "cube.zarr")
    (cube / "reflectance" / "c" / "0" / "0" / "1" / "2").unlink()
    message = (f"{cube}: variable 'reflectance': chunk y 32:64, x 64:96 (c/0/0/1/2) is absent (the store was "
               "written with every chunk)")
    with pytest.raises(MsmtuError) as err:
        run(cube, model, tmp_path / "out.zarr", config=RunConfig(chunk=CHUNK), scheduler=scheduler)
    assert str(err.value) == message
    assert not (tmp_path / "out.zarr").exists()
    assert one_line_error(cli("validate", cube)) == message
    # a store written by xarray v3 defaults: zarr's fill_value 0 would read as valid reflectance
    other = xarray_default_copy(region.cube, tmp_path / "xr.zarr", 3)
    assert zarr.open_array(other / "reflectance", mode="r").fill_value == 0
    (other / "reflectance" / "c" / "0" / "0" / "0" / "1").unlink()
    with pytest.raises(MsmtuError) as err:
        run(other, model, tmp_path / "out2.zarr", config=RunConfig(chunk=CHUNK), scheduler=scheduler)
    assert str(err.value) == (f"{other}: variable 'reflectance': chunk y 0:32, x 32:64 (c/0/0/0/1) is absent "
                              "(Zarr would read it as 0, not as missing data)")


def test_corrupted_chunk_fails_its_checksum_and_is_named(region, model, tmp_path):
    cube = copy_of(region.cube, tmp_path / "cube.zarr")
    chunk = cube / "reflectance" / "c" / "0" / "0" / "1" / "2"
    data = bytearray(chunk.read_bytes())
    data[100:164] = bytes(b ^ 0xFF for b in data[100:164])  # 64 flipped bytes
    chunk.write_bytes(bytes(data))
    result = cli_process("run", "--cube", cube, "--model", model, "--out", tmp_path / "out.zarr", "--chunk", CHUNK)
    line = one_line_error(result)
    assert line.startswith(f"{cube}: variable 'reflectance': chunk y 32:64, x 64:96 (c/0/0/1/2) is unreadable ("), line
    assert "checksum" in line
    assert "Compute Failed" not in result.stderr, "an input error is not retried by Dask"
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_windows_read_together_are_zarrs_values_and_the_first_failure_is_named(region, zarr_format, tmp_path):
    """read_windows asks zarr for all variables at once; each value must be what a plain zarr
    read gives (here of a store that xarray wrote), and a damaged chunk is named for the first
    failing variable in the order asked, as reading one by one would."""
    store = xarray_default_copy(region.cube, tmp_path / "cube.zarr", zarr_format)
    group = zarr.open_group(store, mode="r")
    names = ["reflectance", "state_qa", "altitude", "precipitation"]
    ys, xs = slice(40, 70), slice(10, 50)  # across chunks of 32, and cut by the region's edge
    values = read_windows(store, group, names, ys, xs)
    assert list(values) == names
    for name in names:
        expected = zarr.open_array(store / name, mode="r")[..., 40:70, 10:50]
        assert values[name].dtype == expected.dtype and np.array_equal(values[name], expected, equal_nan=True), name
    for name in ("altitude", "reflectance"):  # the chunk at rows 32:64, columns 0:32 of each
        array = group[name]
        key = array.metadata.encode_chunk_key((0,) * (array.ndim - 2) + (1, 0))
        (store / name / key).write_bytes(b"not a compressed chunk")
    for order in (["altitude", "reflectance"], ["reflectance", "altitude"]):
        with pytest.raises(MsmtuError) as err:
            read_windows(store, group, order, ys, xs)
        assert str(err.value).startswith(f"{store}: variable '{order[0]}': chunk y 32:64, x 0:32 "), str(err.value)


LOGS_WHILE_CLOSING = """
import logging
from distributed import WorkerPlugin
from msmtu_batch.runtime.clusters import LocalSpec, connect

class LoudTeardown(WorkerPlugin):  # as a heartbeat cut by the close (dask/distributed#7105)
    def teardown(self, worker):
        logging.getLogger("distributed.worker").error("closing: Traceback (most recent call last)")

def while_running(dask_worker):
    logging.getLogger("distributed.worker").error("running: the worker still speaks")

with connect(LocalSpec(n_workers=1)) as client:
    client.register_plugin(LoudTeardown())
    client.run(while_running)
"""


def test_a_closing_local_worker_adds_nothing_to_the_one_line():
    """A refused run's worker closed mid-heartbeat logged a traceback after the one line (seen
    in CI); a local worker's logs end once it is closing, and not before."""
    result = subprocess.run([sys.executable, "-c", LOGS_WHILE_CLOSING], capture_output=True, text=True,
                            timeout=120, check=True)
    assert "running: the worker still speaks" in result.stderr
    assert "closing:" not in result.stderr, result.stderr


# --- 6. identity follows content; 12. a complete output is re-verified ----------------------------

def test_changed_input_is_never_reported_complete(region, model, clean_output, scheduler, tmp_path):
    cube = copy_of(region.cube, tmp_path / "cube.zarr")
    out = copy_of(clean_output, tmp_path / "out.zarr")
    args = ("run", "--cube", cube, "--model", model, "--out", out, "--chunk", CHUNK, "--scheduler", scheduler)
    # a copied input with the same content: the output made from the original is complete
    assert "already complete" in cli(*args).stdout
    # edited in place, same shape and metadata (as a re-ingest would): refused, then recomputed
    reflectance = zarr.open_array(cube / "reflectance", mode="r+")
    edited = reflectance[:, :, 30:40, 30:40]
    reflectance[:, :, 30:40, 30:40] = np.where(edited == REFLECTANCE_FILL, edited, edited // 2)
    assert one_line_error(cli(*args)) == (f"{out} exists and was made from another model, input or settings; "
                                          "pass --overwrite to replace it")
    result = cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "12 of 12 chunks computed" in result.stdout
    before, after = open_output(clean_output)["abundance"].values, open_output(out)["abundance"].values
    changed = ~np.isclose(before, after, equal_nan=True)
    assert changed[:, 30:40, 30:40].any() and not changed[:, :24, 48:].any()


@pytest.mark.parametrize("damage", ["deleted", "emptied by a power cut", "bit rot"])
def test_damaged_complete_output_is_recomputed_where_damaged(region, model, clean_output, damage, scheduler,
                                                             tmp_path):
    out = copy_of(clean_output, tmp_path / "out.zarr")
    chunk = out / "abundance" / "c" / "0" / "1" / "2"
    if damage == "deleted":
        chunk.unlink()
    elif damage == "bit rot":
        data = bytearray(chunk.read_bytes())
        data[-10] ^= 0x01
        chunk.write_bytes(bytes(data))
    else:
        chunk.write_bytes(b"")
    summary = run(region.cube, model, out, config=RunConfig(chunk=CHUNK), scheduler=scheduler)
    assert not summary.already_complete and summary.computed_chunks == 1
    assert zarr_files(out) == zarr_files(clean_output)


# --- 7. --overwrite only replaces what the project wrote -------------------------------------------

def test_overwrite_never_touches_the_input_or_foreign_folders(region, model, tmp_path):
    project = tmp_path / "p"
    cube = copy_of(region.cube, project / "cube.zarr")
    unrelated = project / "notes.txt"
    unrelated.write_text("keep me")
    (project / "sub").mkdir()
    before = zarr_files(cube)
    cases = {
        cube: f"--out {cube} is or contains the input cube {cube}; choose another output path",
        project / "sub" / "..": f"--out {project} is or contains the input cube {cube}; choose another output path",
        cube / "inner.zarr": f"--out {cube / 'inner.zarr'} lies inside the input cube {cube}; choose a path "
                             "outside it",
        unrelated: f"--out {unrelated} is an existing file, not an output store; choose another path",
        project / "sub": f"{project / 'sub'} exists and is not an msmtu-batch output (no run manifest); it is never "
                         "replaced: remove it yourself or choose another --out",
    }
    for out, message in cases.items():
        for flags in ((), ("--overwrite",)):
            result = cli("run", "--cube", cube, "--model", model, "--out", out, "--chunk", CHUNK, *flags)
            assert one_line_error(result) == message, (out, flags)
    assert zarr_files(cube) == before and unrelated.read_text() == "keep me" and (project / "sub").is_dir()


# --- 8. two runs on one output ---------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from msmtu_batch.runtime.outputs import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_run_on_the_same_output_stops_and_a_dead_runs_lock_is_taken_over(region, model, clean_output,
                                                                              scheduler, tmp_path):
    out = tmp_path / "out.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line_error(cli("run", "--cube", region.cube, "--model", model, "--out", out, "--chunk", CHUNK))
        host = re.escape(socket.gethostname())
        assert re.fullmatch(rf"{re.escape(str(out))} is being written by another run \(host {host}, "
                            rf"pid {holder.pid}, started \S+\); wait for it to end", line), line
        assert not out.exists() and not (tmp_path / ".out.zarr.partial").exists()
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, stale
        holder.wait()
    assert (tmp_path / ".out.zarr.lock").exists()
    result = cli("run", "--cube", region.cube, "--model", model, "--out", out, "--chunk", CHUNK,
                 "--cog", tmp_path / "cogs", "--scheduler", scheduler)
    assert result.returncode == 0, result.stderr
    assert zarr_files(out) == zarr_files(clean_output)
    assert not (tmp_path / ".out.zarr.lock").exists(), "the lock is released at the end"
    assert sorted(p.name for p in (tmp_path / "cogs").iterdir()) == [
        "abundance_2013.qml", "abundance_2013.tif", "dominant_class_2013.qml", "dominant_class_2013.tif",
        "dominant_class_2013.tif.aux.xml", "expected_error_2013.qml", "expected_error_2013.tif",
        "quality_flag_2013.qml", "quality_flag_2013.tif",
        "quality_flag_2013.tif.aux.xml", "uncertainty_2013.qml", "uncertainty_2013.tif", "valid_fraction_2013.qml",
        "valid_fraction_2013.tif"]


# --- 9. every failure a user can cause: one line, exit 2, before the heavy work -------------------

@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A small file system of its own at ``folder`` (root can mount one; elsewhere: skipped)."""
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB file system: room for a store's metadata, not for its chunks."""
    with tmpfs(tmp_path / "disk", "size=64k") as folder:
        yield folder


@pytest.fixture
def read_only_folder(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        yield folder


def test_full_disk_ends_in_one_line_and_resumes_elsewhere(region, model, small_disk, clean_output):
    line = one_line_error(cli_process("run", "--cube", region.cube, "--model", model, "--out",
                                      small_disk / "out.zarr", "--chunk", CHUNK))
    assert "No space left on device" in line and str(small_disk) in line, line
    assert not (small_disk / "out.zarr").exists(), "nothing incomplete at the final path"


def test_read_only_output_folder_ends_in_one_line(region, model, read_only_folder):
    line = one_line_error(cli("run", "--cube", region.cube, "--model", model, "--out",
                              read_only_folder / "out.zarr", "--chunk", CHUNK))
    assert line == f"{read_only_folder / '.out.zarr.lock'}: Read-only file system"


SPECS = {
    "cluster: local\nn_workers: [1\n": "not valid YAML at line 3 (expected ',' or ']', but got '<stream end>')",
    "cluster: local\nn_workers: many\n": "invalid cluster spec: n_workers: Input should be a valid integer, "
                                         "unable to parse string as an integer",
    "cluster: address\n": "invalid cluster spec: address: Field required",
    "cluster: local\nworkers: 4\n": "invalid cluster spec: workers: Extra inputs are not permitted",
    "cluster: local\nn_workers: 0\n": "invalid cluster spec: n_workers: Input should be greater than or equal to 1",
    "cluster: slurmm\n": "invalid cluster spec: cluster: Input tag 'slurmm' found using 'cluster' does not match "
                         "any of the expected tags: 'local', 'address', 'slurm', 'pbs'",
    "- local\n": "expected a mapping with a 'cluster' key (local, address, slurm or pbs)",
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_bad_cluster_specs_are_refused_before_any_work(region, model, spec, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(spec)
    line = one_line_error(cli("run", "--cube", region.cube, "--model", model, "--out", tmp_path / "out.zarr",
                              "--scheduler", path))
    assert line == f"{path}: {SPECS[spec]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml"], "nothing written"


def test_truncated_zarr_json_is_named(region, model, tmp_path):
    cube = copy_of(region.cube, tmp_path / "cube.zarr")
    metadata = cube / "reflectance" / "zarr.json"
    metadata.write_text(metadata.read_text()[:100])
    for args in (("validate", cube), ("run", "--cube", cube, "--model", model, "--out", tmp_path / "o.zarr")):
        line = one_line_error(cli(*args))
        assert line.startswith(f"{cube}: variable 'reflectance': unreadable metadata {metadata} ("), line


def test_one_pixel_region_exports_valid_cogs(region, model, scheduler, tmp_path):
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    pixel = xr.open_zarr(region.cube, mask_and_scale=False, decode_coords="all", consolidated=False).isel(
        y=slice(40, 41), x=slice(50, 51))
    from msmtu_batch.inputs.cube import write_input_cube

    write_input_cube(pixel, tmp_path / "pixel.zarr")
    result = cli("run", "--cube", tmp_path / "pixel.zarr", "--model", model, "--out", tmp_path / "o.zarr",
                 "--cog", tmp_path / "cogs", "--scheduler", scheduler)
    assert result.returncode == 0, result.stderr
    with rasterio.open(tmp_path / "cogs" / "abundance_2013.tif") as raster:
        assert raster.shape == (1, 1)
        expected = open_output(tmp_path / "o.zarr")["abundance"].values[:, 0, 0]
        np.testing.assert_allclose(raster.read()[:, 0, 0], expected)
    assert cog_validate(tmp_path / "cogs" / "abundance_2013.tif")[0]


# --- 10. artifact contents are checked for meaning --------------------------------------------------

def rewritten(model: Path, target: Path, meta_update: dict | None = None, tensors_update: dict | None = None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(model, framework="pt") as f:
        meta = json.loads(f.metadata()["msmtu_batch"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update(meta_update or {})
    tensors.update(tensors_update or {})
    save_file(tensors, target, metadata={"msmtu_batch": json.dumps(with_checksum(meta, tensors))})
    return target


def test_meaningless_artifacts_are_refused(model, tmp_path):
    import torch

    classes = load_artifact(model).classes
    zero_std = torch.ones(7)
    zero_std[3] = 0
    cases = [
        ({}, {"band_std": zero_std}, "normalisation statistic band_std must be finite and positive, found "
                                     "[1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]"),
        ({"classes": [classes[0], *classes[:-1]]}, {}, f"class name(s) {classes[0]} appear more than once"),
        ({"classes": [1, *classes[1:]]}, {}, f"classes must be a non-empty list of names, found {[1, *classes[1:]]!r}"),
        ({"classes": list(classes[:-1]), "hyperparameters": {**load_artifact(model).config.to_dict(),
                                                            "n_classes": len(classes) - 1}}, {},
         f"weights do not match the architecture in its metadata (forward_pass.head.3.weight ({len(classes)}, 16) "
         f"!= ({len(classes) - 1}, 16), forward_pass.head.3.bias ({len(classes)},) != ({len(classes) - 1},), "
         f"backward_pass.head.3.weight ({len(classes)}, 16) != ({len(classes) - 1}, 16), backward_pass.head.3.bias "
         f"({len(classes)},) != ({len(classes) - 1},))"),
        ({"level": "../../etc"}, {}, "level '../../etc' is not a safe name (letters, digits, _ . -; at most 64 "
                                     "characters)"),
        ({"ancillary_names": ["longitude", "latitude", "altitude", "slope", "rainfall", "evapotranspiration",
                              "temperature_ave", "temperature_max", "temperature_min"]}, {},
         "unknown ancillary variable(s) rainfall (known: longitude, latitude, altitude, slope, precipitation, "
         "evapotranspiration, temperature_ave, temperature_max, temperature_min)"),
        ({"band_names": ["sur_refl_b02", "sur_refl_b01", *[f"sur_refl_b0{i}" for i in range(3, 8)]]}, {},
         "band_names ['sur_refl_b02', 'sur_refl_b01', 'sur_refl_b03', 'sur_refl_b04', 'sur_refl_b05', "
         "'sur_refl_b06', 'sur_refl_b07'], expected sur_refl_b01, sur_refl_b02, sur_refl_b03, sur_refl_b04, "
         "sur_refl_b05, sur_refl_b06, sur_refl_b07 in that order (MOD09A1)"),
    ]
    for i, (meta, tensors, message) in enumerate(cases):
        path = rewritten(model, tmp_path / f"bad{i}.safetensors", meta, tensors)
        with pytest.raises(MsmtuError) as err:
            load_artifact(path)
        assert str(err.value) == f"{path}: {message}"
        line = one_line_error(cli("run", "--cube", "absent.zarr", "--model", path, "--out", tmp_path / "o.zarr"))
        assert line == f"{path}: {message}"


# --- 11. the local cluster accepts only this run's clients ------------------------------------------

def test_local_cluster_refuses_clients_without_its_credentials():
    from distributed import Client
    from distributed.security import Security

    from msmtu_batch.runtime.clusters import connect

    with connect() as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:"), address
        # another user's process: plain TCP, or TLS with credentials of its own making
        for attempt, security in ((address.replace("tls://", "tcp://"), None), (address, Security.temporary())):
            with pytest.raises((OSError, TimeoutError)):
                Client(attempt, timeout="3s", security=security)
        assert client.submit(sum, [1, 2]).result() == 3, "the run's own client works"
        assert client.dashboard_link.startswith("http://127.0.0.1:"), "dashboard on loopback only"


def test_threads_of_one_process_listen_on_nothing():
    """``run``'s default: the workers are threads of the driver, reached in memory."""
    from msmtu_batch.runtime.clusters import connect

    with connect(processes=False) as client:
        assert client.scheduler.address.startswith("inproc://"), client.scheduler.address
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1 and all(w["nthreads"] == (os.cpu_count() or 1) for w in workers.values())
        assert client.submit(sum, [1, 2]).result() == 3
        # what Dask still serves over HTTP (health, metrics) is on loopback; nothing else listens
        listening = psutil.Process().net_connections(kind="inet")
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening if c.status == psutil.CONN_LISTEN)
        # Dask's periodic callbacks few (their GIL slowed the model's threads), memory still watched
        worker, scheduler = next(iter(client.cluster.workers.values())), client.cluster.scheduler
        for server in (worker, scheduler):
            assert server.periodic_callbacks["tick"].callback_time == 1000
            assert server.periodic_callbacks["monitor"].callback_time == 2000
        assert worker.periodic_callbacks["memory_monitor"].callback_time == 1000
        assert "stealing" not in scheduler.extensions


# --- 2. data unlike the training data: the input-distribution guard and ancillary units -----------

def edited_cube(region, target: Path, edit) -> Path:
    """A copy of the region's cube with ``edit(arrays) -> arrays`` applied to its variables."""
    from msmtu_batch.inputs.cube import write_window

    cube = copy_of(region.cube, target)
    names = ["reflectance", "precipitation"]
    arrays = {name: zarr.open_array(cube / name, mode="r")[...] for name in names}
    write_window(cube, edit(arrays), slice(None))
    return cube


GUARD = (r"(?P<cube>.+): chunk y \d+:\d+, x \d+:\d+: (?P<what>.+) has mean (?P<mean>\S+)(?P<unit> [^()]+)? where "
         r"the model's training data has \S+ \+/- \S+(?P=unit)? \((?P<z>[-+]\d+\.\d) standard deviations, limit "
         r"(?P<limit>\d+)\); check "
         r"its units and band order, or pass --out-of-distribution flag to map it with quality_flag 2")


def swap_red_and_nir(arrays: dict) -> dict:
    return {"reflectance": arrays["reflectance"][:, [1, 0, 2, 3, 4, 5, 6]]}


def reflectance_scaled_twice(arrays: dict) -> dict:
    refl = arrays["reflectance"]
    return {"reflectance": np.where(refl == REFLECTANCE_FILL, refl, np.rint(refl * 1e-4)).astype(np.int16)}


def precipitation_in_table_units(arrays: dict) -> dict:
    return {"precipitation": arrays["precipitation"] * np.float32(6.2)}  # about the research table's 3,400


@pytest.mark.parametrize(("edit", "what"), [(swap_red_and_nir, "band sur_refl_b0[12] \\((red|nir1)\\)"),
                                            (reflectance_scaled_twice, "band sur_refl_b0\\d \\(\\w+\\)"),
                                            (precipitation_in_table_units, "ancillary 'precipitation'")])
def test_inputs_unlike_the_training_data_stop_the_run_or_are_flagged(region, model, edit, what, scheduler, tmp_path):
    cube = edited_cube(region, tmp_path / "cube.zarr", edit)
    line = one_line_error(cli("run", "--cube", cube, "--model", model, "--out", tmp_path / "out.zarr", "--chunk",
                              CHUNK, "--scheduler", scheduler))
    match = re.fullmatch(GUARD, line)
    assert match and match["cube"] == str(cube) and re.fullmatch(what, match["what"]), line
    assert abs(float(match["z"])) > float(match["limit"])
    assert not (tmp_path / "out.zarr").exists()
    # asked to go on, the run maps every chunk and flags the pixels it estimated
    summary = run(cube, model, tmp_path / "flagged.zarr", config=RunConfig(chunk=CHUNK, out_of_distribution="flag"),
                  scheduler=scheduler)
    flags = open_output(tmp_path / "flagged.zarr")["quality_flag"].values
    assert summary.valid_pixels == int((flags == 2).sum()) > 0 and set(np.unique(flags)) <= {1, 2}
    assert (summary.flagged_pixels, summary.flagged_chunks) == (summary.valid_pixels, summary.chunks)
    # the command's summary says so, also when the output is already complete
    again = cli("run", "--cube", cube, "--model", model, "--out", tmp_path / "flagged.zarr", "--chunk", CHUNK,
                "--scheduler", scheduler, "--out-of-distribution", "flag")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        f"{tmp_path / 'flagged.zarr'} is already complete for this model, input and settings; nothing to do; WARNING: "
        f"{summary.flagged_pixels:,} pixels in {summary.chunks} of {summary.chunks} chunks mapped from inputs unlike "
        "the training data (quality_flag 2)")


def test_statistics_in_the_wrong_unit_are_caught_by_the_guard(region, model, scheduler, tmp_path):
    """The failure mode of the research layout's units: band statistics x 1e4 labelled as reflectance."""
    artifact = load_artifact(model)
    stats = {"band_mean": artifact.band_stats.mean * 1e4, "band_std": artifact.band_stats.std * 1e4}
    import torch

    path = rewritten(model, tmp_path / "x1e4.safetensors", tensors_update={k: torch.from_numpy(v)
                                                                         for k, v in stats.items()})
    with pytest.raises(MsmtuError) as err:
        run(region.cube, path, tmp_path / "out.zarr", config=RunConfig(chunk=CHUNK), scheduler=scheduler)
    match = re.fullmatch(GUARD, str(err.value))
    assert match and match["what"].startswith("band ") and float(match["z"]) < -4, str(err.value)


def test_ancillary_units_are_converted_or_refused_by_name(region, model, clean_output, scheduler, tmp_path):
    # precipitation declared and stored in metres per year: converted to the model's mm year-1
    cube = edited_cube(region, tmp_path / "metres.zarr", lambda a: {"precipitation": a["precipitation"] / 1000})
    attrs_path = cube / "precipitation" / "zarr.json"
    meta = json.loads(attrs_path.read_text())
    meta["attributes"]["units"] = "m year-1"
    attrs_path.write_text(json.dumps(meta))
    run(cube, model, tmp_path / "out.zarr", config=RunConfig(chunk=CHUNK), scheduler=scheduler)
    np.testing.assert_allclose(open_output(tmp_path / "out.zarr")["abundance"].values,
                               open_output(clean_output)["abundance"].values, atol=1e-5)
    # no units at all: the cube contract asks for them
    meta["attributes"].pop("units")
    attrs_path.write_text(json.dumps(meta))
    assert one_line_error(cli("validate", cube)) == (f"{cube}: variable 'precipitation': expected a CF units "
                                                     "attribute (e.g. 'mm year-1'), found none")
    # a model trained on the published table (precipitation in its own unit) meets mm year-1
    root = copy_of(region.msmtu, tmp_path / "published")
    (root / "ancillary" / "units.json").unlink()
    shutil.rmtree(root / ".msmtu_cache", ignore_errors=True)
    published = save_artifact(train(read_msmtu(root, "level2"), "level2", SMALL_MODEL).artifact,
                              tmp_path / "published.safetensors")
    assert load_artifact(published).ancillary_units[4] == "Andalusia-MSMTU table units"
    line = one_line_error(cli("run", "--cube", region.cube, "--model", published, "--out", tmp_path / "p.zarr"))
    assert line == (f"{region.cube}: variable 'precipitation' is in 'mm year-1' but the model's statistics are in "
                    "'Andalusia-MSMTU table units', which cannot be converted; declare the units of the "
                    "Andalusia-MSMTU table's 'precipitation' with --ancillary-units precipitation=UNITS (train and "
                    "evaluate; config key ancillary_units)")


def test_published_table_with_declared_units_maps_a_cube_in_those_units(region, scheduler, tmp_path):
    """The way through the refusal above: `train --msmtu` on the folder as published (no
    units.json) with the table's units declared (a flag, and the config key), then `run` on the
    mm year-1 cube gives the abundances `evaluate` computes from the files with the same declaration."""
    root = copy_of(region.msmtu, tmp_path / "published")
    declared = json.loads((root / "ancillary" / "units.json").read_text())
    (root / "ancillary" / "units.json").unlink()
    shutil.rmtree(root / ".msmtu_cache", ignore_errors=True)
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"train": SMALL_MODEL.model_dump(exclude={"ancillary_units"})
                                  | {"ancillary_units": {"evapotranspiration": declared["evapotranspiration"]}}}))
    model = tmp_path / "declared.safetensors"
    trained = cli("train", "--msmtu", root, "--level", "level2", "--out", model, "--config", config,
                  "--ancillary-units", f"precipitation={declared['precipitation']}")
    assert trained.returncode == 0, trained.stderr
    artifact = load_artifact(model)
    units = dict(zip(artifact.ancillary_names, artifact.ancillary_units))
    assert units["precipitation"] == units["evapotranspiration"] == "mm year-1"
    out = tmp_path / "out.zarr"
    run(region.cube, model, out, config=RunConfig(chunk=CHUNK), scheduler=scheduler)

    pixels = read_msmtu(root, "level2", ancillary_units={"precipitation": "mm year-1",
                                                         "evapotranspiration": "mm year-1"})
    test = pixels.split("test")
    from_files = predict(artifact.model, artifact.inputs(test))["abundance"]
    output = open_output(out)
    rows, cols = np.divmod(test.ids, SMALL.width)
    estimated = output["quality_flag"].values[rows, cols] == 0
    assert estimated.mean() > 0.9
    np.testing.assert_allclose(output["abundance"].values[:, rows, cols].T[estimated], from_files[estimated],
                               atol=2e-5)
    # evaluate on the files: the same declaration is needed, and its absence is named
    line = one_line_error(cli("evaluate", "--model", model, "--msmtu", root, "--level", "level2", "--out",
                              tmp_path / "report", "--no-baselines"))
    assert "declare the units of the Andalusia-MSMTU table's 'precipitation' with --ancillary-units" in line
    scored = cli("evaluate", "--model", model, "--msmtu", root, "--level", "level2", "--out", tmp_path / "report",
                 "--no-baselines", "--ancillary-units", "precipitation=mm year-1",
                 "--ancillary-units", "evapotranspiration=mm year-1")
    assert scored.returncode == 0, scored.stderr
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["methods"]["brits"]["rmse"] == pytest.approx(rmse(from_files, test.abundance), abs=1e-6)
    # declarations that cannot hold are refused by name
    assert one_line_error(cli("train", "--msmtu", root, "--level", "level2", "--out", tmp_path / "x.safetensors",
                              "--ancillary-units", "rainfall=mm year-1")) == (
        f"{root / 'ancillary' / 'topo_climatic.csv'}: no column 'rainfall' to declare units for (columns: "
        "longitude, latitude, altitude, slope, precipitation, evapotranspiration, temperature_ave, "
        "temperature_max, temperature_min)")
    assert one_line_error(cli("train", "--msmtu", root, "--level", "level2", "--out", tmp_path / "x.safetensors",
                              "--ancillary-units", "precipitation=furlongs per fortnightly")) == (
        "--ancillary-units precipitation: 'furlongs per fortnightly' is not a unit udunits/CF knows (e.g. "
        "'mm year-1', 'degC', 'kg m-2 year-1')")


# --- 14. second audit round: inputs that change under a run, flipped grids, full disks, signals ----

def edited_copy(cube: Path, target: Path) -> Path:
    """Another cube of the same shape and metadata: the region's with its reflectance 10 % lower
    (within the training data's range: the input guard lets it through)."""
    copy_of(cube, target)
    reflectance = zarr.open_array(target / "reflectance", mode="r+")
    values = reflectance[:]
    reflectance[:] = np.where(values == REFLECTANCE_FILL, values, values - values // 10)
    return target


def test_input_rewritten_during_a_run_is_refused_and_the_rerun_maps_it_as_it_is_now(region, model, scheduler,
                                                                                   tmp_path):
    cube = copy_of(region.cube, tmp_path / "cube.zarr")
    other = edited_copy(region.cube, tmp_path / "other.zarr")
    out = tmp_path / "out.zarr"
    config = RunConfig(chunk=8)  # 9 x 12 = 108 chunks

    def copy_over_at_the_30th_chunk(finished, total):
        for i, future in enumerate(finished):
            if i == 30:  # as `cp -r other/. cube/` would, while the other chunks are queued and running
                shutil.copytree(other, cube, dirs_exist_ok=True)
            yield future

    with pytest.raises(MsmtuError) as err:
        run(cube, model, out, config=config, scheduler=scheduler, progress=copy_over_at_the_30th_chunk)
    assert re.fullmatch(rf"{re.escape(str(cube))} changed while this run read it \(\d+ files, e\.g\. \S+\); nothing "
                        r"was published and its chunks are discarded: rerun the same command once the input is "
                        "final", str(err.value)), str(err.value)
    assert not out.exists() and (tmp_path / ".out.zarr.partial").is_dir()
    # the rerun maps the input as it is now, without --overwrite: every pixel from the new content
    summary = run(cube, model, out, config=config, scheduler=scheduler)
    assert summary.computed_chunks == 108
    expected = run(other, model, tmp_path / "expected.zarr", config=config, scheduler=scheduler)
    for name in ("abundance", "quality_flag", "valid_fraction"):
        np.testing.assert_array_equal(open_output(out)[name].values, open_output(expected.out)[name].values)


def test_cube_with_y_increasing_is_mapped_and_exported_north_up(region, model, clean_output, scheduler, tmp_path):
    import rasterio

    from msmtu_batch.products.export import export_cogs

    ds = xr.open_zarr(region.cube, mask_and_scale=False, decode_coords="all", consolidated=False)
    ds.attrs.pop(ALL_CHUNKS_ATTR)
    for var in ds.variables.values():
        var.encoding = {}
    flipped = tmp_path / "south-up.zarr"
    ds.isel(y=slice(None, None, -1)).load().to_zarr(flipped, consolidated=False)  # as a user's xarray writes it
    result = cli("run", "--cube", flipped, "--model", model, "--out", tmp_path / "out.zarr", "--chunk", CHUNK,
                 "--cog", tmp_path / "cogs", "--scheduler", scheduler)
    assert result.returncode == 0, result.stderr
    output = open_output(tmp_path / "out.zarr")
    assert output.y.values[0] < output.y.values[-1], "the Zarr keeps the input's order"
    np.testing.assert_array_equal(output["abundance"].isel(y=slice(None, None, -1)).values,
                                  open_output(clean_output)["abundance"].values)
    export_cogs(clean_output, tmp_path / "north-up-cogs")
    for name in ("abundance", "dominant_class", "quality_flag"):
        with rasterio.open(tmp_path / "cogs" / f"{name}_2013.tif") as got, \
                rasterio.open(tmp_path / "north-up-cogs" / f"{name}_2013.tif") as expected:
            assert got.transform == expected.transform and got.transform.e < 0 and got.crs == expected.crs
            np.testing.assert_array_equal(got.read(), expected.read())
    # GDAL's own reading of the file: the top-left corner is the cube's north-west corner
    info = json.loads(gdal("gdalinfo", "-json", str(tmp_path / "cogs" / "abundance_2013.tif"), stderr=False))
    west, north = info["cornerCoordinates"]["upperLeft"]
    pixel = float(ds.x[1] - ds.x[0])
    assert west == pytest.approx(float(ds.x.min()) - pixel / 2)
    assert north == pytest.approx(float(ds.y.max()) + pixel / 2)


def test_full_disk_while_the_store_is_created_leaves_a_run_the_rerun_resumes(region, model, clean_output,
                                                                             tmp_path):
    with tmpfs(tmp_path / "disk", "size=12k") as disk:
        args = ("run", "--cube", region.cube, "--model", model, "--out", disk / "out.zarr", "--chunk", CHUNK)
        line = one_line_error(cli_process(*args))
        assert "No space left on device" in line and str(disk) in line, line
        assert (disk / ".out.zarr.partial").is_dir() and not (disk / "out.zarr").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        result = cli_process(*args)
        assert result.returncode == 0, result.stderr
        assert zarr_files(disk / "out.zarr") == zarr_files(clean_output)


def leftovers(folder: Path) -> list[str]:
    """What a COG folder holds besides complete COGs and their sidecars."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "tmp")) or p.stat().st_size == 0)


def test_full_disk_during_export_ends_in_one_line_and_leaves_no_temporary_file(region, model, clean_output,
                                                                               tmp_path):
    out = copy_of(clean_output, tmp_path / "out.zarr")
    with tmpfs(tmp_path / "disk", "size=96k") as disk:
        line = one_line_error(cli_process("run", "--cube", region.cube, "--model", model, "--out", out,
                                          "--chunk", CHUNK, "--cog", disk / "cogs"))
        assert re.fullmatch(rf"{re.escape(str(disk / 'cogs'))}/\w+_2013\.tif: No space left on device", line), line
        assert leftovers(disk / "cogs") == []


def test_sigterm_during_export_ends_in_one_line_leaves_nothing_and_the_rerun_completes(region, model,
                                                                                      clean_output, tmp_path):
    out, cogs = copy_of(clean_output, tmp_path / "out.zarr"), tmp_path / "cogs"
    args = [str(BIN / "msmtu-batch"), "run", "--cube", str(region.cube), "--model", str(model), "--out", str(out),
            "--chunk", str(CHUNK), "--cog", str(cogs)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not list(cogs.glob(".msmtu-export-*/*.tif")):
        pass  # until the export has begun writing
    process.terminate()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + 15, stderr
    assert stderr.splitlines()[-1] == "msmtu-batch: interrupted; rerun the same command to resume", stderr
    assert leftovers(cogs) == []
    die_mid_write(cogs / "dominant_class_2013.qml")  # and one killed outright inside a sidecar's write
    stray = leftovers(cogs)
    assert len(stray) == 1 and stray[0].startswith(".dominant_class_2013.qml."), stray
    result = cli_process(*args[1:])
    assert result.returncode == 0, result.stderr
    assert len(list(cogs.glob("*.tif"))) == 6 and leftovers(cogs) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_chunks_are_computed_ends_in_one_line_and_the_rerun_resumes(region, model, clean_output,
                                                                                   signum, tmp_path):
    out = tmp_path / "out.zarr"
    args = [str(BIN / "msmtu-batch"), "run", "--cube", str(region.cube), "--model", str(model), "--out", str(out),
            "--chunk", "8"]
    # SIGINT as from a terminal: a process started in the background may inherit it ignored
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while process.poll() is None and len(list((tmp_path / ".out.zarr.partial" / "msmtu_done").glob("*"))) < 5:
        pass
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert stderr.splitlines()[-1] == "msmtu-batch: interrupted; rerun the same command to resume", stderr
    assert not out.exists() and not (tmp_path / ".out.zarr.lock").exists()
    result = cli_process(*args[1:])
    assert result.returncode == 0, result.stderr
    resumed = re.search(r"(\d+) of 108 chunks computed", result.stdout)
    assert resumed and 0 < int(resumed[1]) < 108, result.stdout
    np.testing.assert_allclose(open_output(out)["abundance"].values, open_output(clean_output)["abundance"].values,
                               atol=1e-6)


def test_reference_on_another_grid_is_refused(region, tmp_path):
    level2 = xr.open_zarr(region.reference, group="level2", decode_coords="all", consolidated=False)
    pixel = float(level2.x[1] - level2.x[0])
    cases = {
        "shifted": (level2.assign_coords(x=level2.x + 40.0),
                    f"grid differs from {region.cube} along x by up to 40 (pixel size {pixel:g}; reference and cube "
                    "must share one grid)"),
        "geographic": (level2.rio.write_crs("EPSG:4326"),
                       f"CRS EPSG:4326 differs from the cube's EPSG:25830 ({region.cube}); reproject the reference "
                       "onto the cube's grid"),
    }
    for name, (reference, message) in cases.items():
        store = tmp_path / f"{name}.zarr"
        reference.to_zarr(store, consolidated=False)
        line = one_line_error(cli("train", "--cube", region.cube, "--reference", store, "--level", "level2",
                                  "--epochs", "1", "--out", tmp_path / "m.safetensors"))
        assert line == f"{store}: {message}", name


def test_scheduler_bound_to_every_interface_is_warned(tmp_path):
    spec = tmp_path / "slurm.yaml"
    spec.write_text("cluster: slurm\nscheduler_host: 0.0.0.0\nshared_directory: " + str(tmp_path / "shared") + "\n")
    result = cli_process("cluster-script", spec)
    assert result.returncode == 0, result.stderr
    assert (f"msmtu-batch: warning: {spec}: scheduler_host 0.0.0.0 listens on every network interface of this "
            "host") in result.stderr, result.stderr


def with_header(path: Path, target: Path, edit) -> Path:
    """``path`` with its safetensors header JSON text passed through ``edit`` (tensors kept)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = edit(data[8:8 + length].decode())
    assert header != data[8:8 + length].decode(), "the edit changed the header"
    target.write_bytes(len(header.encode()).to_bytes(8, "little") + header.encode() + data[8 + length:])
    return target


def test_damaged_or_malformed_artifacts_are_refused_in_one_line(region, model, tmp_path):
    import torch
    from safetensors.torch import save_file

    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0x04  # one bit of the last tensor's weights
    flipped.write_bytes(bytes(data))
    edited = with_header(model, tmp_path / "edited.safetensors", lambda text: text.replace('level2', 'level9'))
    for path in (flipped, edited):
        line = one_line_error(cli("run", "--cube", region.cube, "--model", path, "--out", tmp_path / "o.zarr"))
        assert line == (f"{path}: content does not match its checksum: the file was damaged or edited after it was "
                        "written; use an intact copy")
    # headers that are JSON but not an artifact's (with their checksum: the values are read, and refused)
    cases = {
        "units": ({"band_statistics_units": ["reflectance"]}, "malformed metadata (TypeError: unhashable type"),
        "training": ({"training": "none"}, "training must be a JSON object of facts about the training, found 'none'"),
    }
    for name, (meta, message) in cases.items():
        path = rewritten(model, tmp_path / f"{name}.safetensors", meta)
        line = one_line_error(cli("run", "--cube", region.cube, "--model", path, "--out", tmp_path / "o.zarr"))
        assert line.startswith(f"{path}: {message}"), line
    nested = tmp_path / "nested.safetensors"
    save_file({"w": torch.zeros(1)}, nested, metadata={"msmtu_batch": "[" * 100_000 + "]" * 100_000})
    line = one_line_error(cli("run", "--cube", region.cube, "--model", nested, "--out", tmp_path / "o.zarr"))
    assert line == f"{nested}: metadata nested too deeply to be an artifact's"


def test_damaged_or_edited_checkpoint_is_refused_not_resumed(region, tmp_path):
    from msmtu_batch.inputs.training_data import read_cube_reference
    from msmtu_batch.model.train import Checkpointing

    pixels = read_cube_reference(region.cube, region.reference, "level2")
    checkpoint = tmp_path / "ckpt"
    train(pixels, "level2", TrainConfig(epochs=1, hidden=16, embed=8, head_hidden=16),
          checkpointing=Checkpointing(checkpoint))
    data = bytearray(checkpoint.read_bytes())
    data[-100] ^= 0x04
    (tmp_path / "flipped").write_bytes(bytes(data))
    with_header(checkpoint, tmp_path / "epoch99", lambda text: text.replace('\\"epoch\\": 1,', '\\"epoch\\": 9,'))
    for name in ("flipped", "epoch99"):
        with pytest.raises(MsmtuError) as err:
            train(pixels, "level2", TrainConfig(epochs=6, hidden=16, embed=8, head_hidden=16),
                  checkpointing=Checkpointing(tmp_path / name))
        assert str(err.value) == (f"{tmp_path / name}: not a readable training checkpoint (its content does not "
                                  "match its checksum: damaged or edited after it was written); delete it to start "
                                  "afresh"), name


def test_readers_of_an_archive_see_one_version_of_a_year_while_it_is_replaced(region, model, scheduler, tmp_path):
    """As the workflow publishes a year (``run(..., versioned=True)``): a dataset opened before
    the replacement reads the old year to the end, lazily too; reads in a loop during it are each
    all old or all new (one in 103 lazy reads mixed them when the store was replaced by renames)."""
    import threading

    out = tmp_path / "archive" / "2013" / "abundance.zarr"
    config = RunConfig(chunk=CHUNK)
    run(region.cube, model, out, config=config, scheduler=scheduler, versioned=True)
    old = open_output(out)["abundance"].values
    lazy = open_output(tmp_path / "archive")  # opened before the replacement, read after it
    other = edited_copy(region.cube, tmp_path / "other.zarr")
    reads, stop = [], threading.Event()

    def read_in_a_loop():  # in this thread: not through the run's Dask client, which goes when the run ends
        while not stop.is_set():
            reads.append(open_output(tmp_path / "archive")["abundance"].isel(time=0).compute(
                scheduler="synchronous").values)

    reader = threading.Thread(target=read_in_a_loop)
    reader.start()
    try:
        # the loop is reading before the replacement begins (a count of reads during the run
        # depended on the run's speed: 10 where the test asked for more than 10, once in CI)
        deadline = time.monotonic() + 60
        while len(reads) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        run(other, model, out, config=config, scheduler=scheduler, overwrite=True, versioned=True)
        for _ in range(3):  # some reads after the replacement too
            reads.append(open_output(tmp_path / "archive")["abundance"].isel(time=0).values)
    finally:
        stop.set()
        reader.join()
    new = open_output(out)["abundance"].values
    assert not np.array_equal(old, new, equal_nan=True)
    np.testing.assert_array_equal(lazy["abundance"].isel(time=0).values, old)
    versions = [("old" if np.array_equal(r, old, equal_nan=True) else
                 "new" if np.array_equal(r, new, equal_nan=True) else "mixed") for r in reads]
    assert "mixed" not in versions and versions[-1] == "new" and versions[0] == "old", versions
    assert versions.count("old") >= 5, "the loop read before the replacement"
    # the store a reader may still hold is kept until the next replacement; older ones go
    assert out.is_symlink() and len(list((out.parent / ".abundance.zarr.versions").iterdir())) == 2
    run(region.cube, model, out, config=config, scheduler=scheduler, overwrite=True, versioned=True)
    assert len(list((out.parent / ".abundance.zarr.versions").iterdir())) == 2
    np.testing.assert_array_equal(open_output(out)["abundance"].values, old)


def test_chunk_sizes_are_cut_to_the_region_and_checked_against_the_workers_memory(region, model, clean_output,
                                                                                  tmp_path):
    # larger than the region: one chunk of the region's size (it allocated 373 GiB, a MemoryError)
    result = cli("run", "--cube", region.cube, "--model", model, "--out", tmp_path / "one.zarr", "--chunk", 100_000)
    assert result.returncode == 0, result.stderr
    assert "1 of 1 chunks computed" in result.stdout
    assert zarr.open_array(tmp_path / "one.zarr" / "abundance", mode="r").chunks[1:] == (SMALL.height, SMALL.width)
    np.testing.assert_allclose(open_output(tmp_path / "one.zarr")["abundance"].values,
                               open_output(clean_output)["abundance"].values, atol=1e-6)
    # a task that cannot fit its share of a worker's memory: refused before any work, naming what fits
    spec = tmp_path / "small.yaml"
    spec.write_text("cluster: local\nprocesses: false\nthreads_per_worker: 2\nmemory_limit: 360MB\n")
    line = one_line_error(cli("run", "--cube", region.cube, "--model", model, "--out", tmp_path / "o.zarr",
                              "--chunk", 96, "--scheduler", spec))
    assert line == ("--chunk 96: a task of 72 x 96 pixels needs about 177.80 MiB, but a worker has 343.32 MiB for 2 "
                    "tasks at once (171.66 MiB each); use --chunk 64 or less, or workers with more memory")
    assert not (tmp_path / "o.zarr").exists()
