"""The distributed pipeline with real Dask processes: contract, values, resume, failures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

from msmtu_batch.inputs.cube import REFLECTANCE_FILL, observed_mask, write_input_cube
from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.artifact import save_artifact
from msmtu_batch.model.inference import predict
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.orchestration.pipeline import RunConfig, model_loads, run
from msmtu_batch.products.archive import open_output
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.stores import DONE_GROUP
from tests.conftest import die_mid_write, zarr_files
from tests.test_cube_validation import CORRUPTIONS

CHUNK = 8  # 9 x 12 = 108 chunks on the 72 x 96 test region: long enough to interrupt
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def model(small_model) -> Path:
    return small_model


def finished_chunks(staging: Path) -> int:
    """Chunks whose marker is complete, which a resumed run skips: its attributes file, written
    last and atomically (a marker's folder alone is a chunk being marked when the run died)."""
    return sum(1 for marker in (staging / DONE_GROUP).glob("*/*") if marker.name in ("zarr.json", ".zattrs"))


CLEAN_RUN_LOADS: list[int] = []  # this process's model loads before and after the clean run


@pytest.fixture(scope="module")
def clean_run(region, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out.zarr"
    CLEAN_RUN_LOADS.append(model_loads())
    summary = run(region.cube, model, out, config=RunConfig(chunk=CHUNK, imputed=True))
    CLEAN_RUN_LOADS.append(model_loads())
    return out, summary


def test_output_contract(region, cube, clean_run):
    out, summary = clean_run
    ds = open_output(out).load()
    assert ds.rio.crs == cube.rio.crs
    np.testing.assert_array_equal(ds["x"].values, cube["x"].values)
    np.testing.assert_array_equal(ds["y"].values, cube["y"].values)
    plain = xr.open_zarr(out)
    assert plain["abundance"].dims == ("lulc_class", "y", "x") and plain["abundance"].dtype == np.float32
    a, flag = ds["abundance"].values, ds["quality_flag"].values
    estimated = flag == 0
    np.testing.assert_allclose(a[:, estimated].sum(axis=0), 1.0, atol=1e-5)
    assert (a[:, estimated] >= 0).all() and (a[:, estimated] <= 1).all()
    assert np.isnan(a[:, ~estimated]).all() and np.isnan(ds["uncertainty"].values[~estimated]).all()
    expected_error = ds["expected_error"].values
    assert np.isnan(expected_error[~estimated]).all() and (expected_error[estimated] > 0).all()
    np.testing.assert_array_equal(ds["dominant_class"].values[estimated], a[:, estimated].argmax(axis=0))
    usable = observed_mask(cube["reflectance"].values, cube["state_qa"].values)
    np.testing.assert_allclose(ds["valid_fraction"].values, usable.mean(axis=(0, 1)), atol=1e-6)
    months = usable.any(axis=1).sum(axis=0)
    np.testing.assert_array_equal(estimated, months >= 3)
    assert (~estimated).any(), "the region has pixels with too few observations"
    assert summary.valid_pixels == int(estimated.sum()) and summary.chunks == 108
    assert ds.attrs["model_hash"].startswith("sha256:") and ds.attrs["run_id"].startswith("run-")
    assert ds.attrs["input_store"] == str(region.cube.resolve())
    assert list(ds["lulc_class"].values) == list(xr.open_zarr(region.reference, group="level2")["lulc_class"].values)
    assert ds["imputed_reflectance"].dims == ("time", "band", "y", "x")
    assert not any(p.name.endswith(".partial") for p in out.parent.iterdir())


def test_values_equal_the_numpy_path(region, model, clean_run):
    from msmtu_batch.model.artifact import load_artifact

    out, _ = clean_run
    artifact = load_artifact(model)
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    inputs = artifact.inputs(pixels)
    prediction = predict(artifact.model, inputs)
    expected = prediction["abundance"]  # (n, K), row-major pixels
    output = open_output(out)
    got = output["abundance"].values.reshape(len(artifact.classes), -1).T
    estimated = output["quality_flag"].values.ravel() == 0
    np.testing.assert_allclose(got[estimated], expected[estimated], atol=2e-5)
    # the expected error from the training data's masks, not the chunk kernel's counts
    expected_error = artifact.error_head.expected_error(expected, prediction["uncertainty"],
                                                        pixels.masks.mean(axis=(1, 2)), inputs.ancillary)
    np.testing.assert_allclose(output["expected_error"].values.ravel()[estimated], expected_error[estimated],
                               rtol=1e-4)


def test_model_is_loaded_once_per_process(clean_run):
    _, summary = clean_run  # by default the tasks run in threads of one process: they share one copy
    assert len(summary.workers) == 1 and CLEAN_RUN_LOADS[1] - CLEAN_RUN_LOADS[0] == 1


def start(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dask"), *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture
def dask_cluster(tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1; one says GPU=1."""
    scheduler_file = tmp_path / "scheduler.json"
    common = ("--host", "127.0.0.1", "--no-dashboard")
    scheduler = start("scheduler", *common, "--port", "0", "--scheduler-file", str(scheduler_file),
                      log=tmp_path / "scheduler.log")
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    address = __import__("json").loads(scheduler_file.read_text())["address"]
    workers = {
        "gpu": start("worker", address, *common, "--nthreads", "1", "--resources", "GPU=1", "--name", "gpu",
                     log=tmp_path / "gpu.log"),
        "cpu": start("worker", address, *common, "--nthreads", "1", "--name", "cpu", log=tmp_path / "cpu.log"),
    }
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
    try:
        yield address, workers, names
    finally:
        for process in [*workers.values(), scheduler]:
            stop(process)


def test_real_scheduler_routes_inference_to_gpu_workers(region, model, clean_run, dask_cluster, tmp_path):
    address, _, names = dask_cluster
    out = tmp_path / "out.zarr"
    summary = run(region.cube, model, out, config=RunConfig(chunk=CHUNK, imputed=True), scheduler=address)
    assert set(summary.workers) == {names["gpu"]}, "only the worker advertising GPU=1 ran inference"
    assert sum(summary.prepared_by.values()) == 108 and summary.prepared_by.get(names["cpu"], 0) > 0, \
        "chunks were read and prepared on the CPU-only worker too"
    assert set(summary.stage_seconds) == {"read", "prepare", "model", "write"}, "both tasks' stages are counted"
    assert zarr_files(out) == zarr_files(clean_run[0]), "same bytes as in threads of one process"


def test_killed_worker_is_survived(region, model, clean_run, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    common = ("--host", "127.0.0.1", "--no-dashboard")
    scheduler = start("scheduler", *common, "--port", "0", "--scheduler-file", str(scheduler_file),
                      log=tmp_path / "scheduler.log")
    workers = []
    try:
        while not scheduler_file.exists():
            time.sleep(0.2)
        workers = [start("worker", "--scheduler-file", str(scheduler_file), *common, "--nthreads", "1",
                         log=tmp_path / f"worker{i}.log") for i in range(2)]
        out = tmp_path / "out.zarr"
        staging = tmp_path / ".out.zarr.partial"
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(summary=run(
            region.cube, model, out, config=RunConfig(chunk=CHUNK, imputed=True),
            scheduler=str(scheduler_file.with_suffix(".yaml")))))
        scheduler_file.with_suffix(".yaml").write_text(
            f"cluster: address\naddress: {__import__('json').loads(scheduler_file.read_text())['address']}\n")
        thread.start()
        while finished_chunks(staging) < 3:
            assert thread.is_alive(), "the run ended before a worker could be killed"
            time.sleep(0.02)
        stop(workers[0])
        thread.join(timeout=240)
        assert "summary" in result, "the run did not survive the killed worker"
        assert set(result["summary"].workers.values()) == {1}, "each worker process loaded the model once"
        assert zarr_files(out) == zarr_files(clean_run[0])
    finally:
        for process in [*workers, scheduler]:
            stop(process)


def test_driver_killed_then_resumed_gives_identical_bytes(region, model, clean_run, tmp_path):
    """Also when writers died inside a file (a SIGKILLed run left a temporary in 4 of 30
    trials): the published store holds none of what they left."""
    out = tmp_path / "out.zarr"
    staging = tmp_path / ".out.zarr.partial"
    args = [str(BIN / "msmtu-batch"), "run", "--cube", str(region.cube), "--model", str(model), "--out", str(out),
            "--chunk", str(CHUNK), "--imputed"]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    while finished_chunks(staging) < 2:
        assert driver.poll() is None, driver.stdout.read().decode()
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = finished_chunks(staging)
    assert not out.exists() and done_before < 108, "interrupted: nothing at the final path yet"
    die_mid_write(staging / DONE_GROUP / "8-11" / "zarr.json", staging / "valid_fraction" / "c" / "8" / "11")
    assert len(list(staging.rglob("*.partial"))) >= 2, "the dead writers' temporaries are there (and the driver's?)"
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    computed = int(resumed.stdout.split(" chunks computed")[0].split()[-3])
    assert computed == 108 - done_before, "only the missing chunks were computed"
    assert zarr_files(out) == zarr_files(clean_run[0])  # no temporary among them


def test_refusals_and_bad_chunks(region, model, clean_run, tmp_path):
    out, _ = clean_run
    other = tmp_path / "other.safetensors"
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    save_artifact(train(pixels, "level2", TrainConfig(epochs=1, hidden=8, embed=4, head_hidden=8,
                                                      ancillary="none")).artifact, other)
    with pytest.raises(MsmtuError) as err:
        run(region.cube, other, out, config=RunConfig(chunk=CHUNK, imputed=True))
    assert str(err.value) == (f"{out} exists and was made from another model, input or settings; "
                              "pass --overwrite to replace it")
    # an unreadable input chunk is named by the task that reads it, and nothing looks complete
    broken = tmp_path / "broken.zarr"
    shutil.copytree(region.cube, broken)
    (broken / "reflectance" / "c" / "0" / "0" / "1" / "2").write_bytes(b"not zstd")
    for artifact, name in ((model, "b.zarr"), (other, "c.zarr")):  # with and without ancillary data
        with pytest.raises(MsmtuError) as err:
            run(broken, artifact, tmp_path / name, config=RunConfig(chunk=CHUNK))
        assert str(err.value).startswith(f"{broken}: variable 'reflectance': chunk y 32:64, x 64:96 (c/0/0/1/2) "
                                         "is unreadable ("), str(err.value)
        assert not (tmp_path / name).exists()
    # a NaN ancillary value where reflectance was observed: the task of its chunk names it
    nan_cube = tmp_path / "nan.zarr"
    shutil.copytree(region.cube, nan_cube)
    observed = (zarr.open_array(nan_cube / "reflectance", mode="r")[:, :, 40, 50] != REFLECTANCE_FILL).any()
    assert observed
    zarr.open_array(nan_cube / "altitude", mode="r+")[40, 50] = np.nan
    with pytest.raises(MsmtuError) as err:
        run(nan_cube, model, tmp_path / "n.zarr", config=RunConfig(chunk=CHUNK))
    y0, x0 = 40 // CHUNK * CHUNK, 50 // CHUNK * CHUNK
    window = f"y {y0}:{y0 + CHUNK}, x {x0}:{x0 + CHUNK}"
    assert str(err.value) == (f"{nan_cube}: variable 'altitude': expected finite values where reflectance is "
                              f"observed, found 1 non-finite pixel(s) in chunk {window}, first at y index 40, "
                              "x index 50")
    assert not (tmp_path / "n.zarr").exists()
    assert not (tmp_path / "b.zarr").exists()


def test_reduced_precision_needs_this_cpus_kernels_for_it(region, model, clean_run, tmp_path, monkeypatch):
    """precision bf16 on a CPU whose oneDNN has no bf16 kernels (where torch multiplies bf16
    30-60x slower than fp32) ends with one line naming the setting and leaves nothing that
    looks complete; where it has them, the run goes ahead and changes the map only a little."""
    from msmtu_batch.model import inference

    for has_kernels in (False, True):
        monkeypatch.setattr(inference, "cpu_has_kernels", lambda precision, has=has_kernels: has)
        out = tmp_path / f"bf16-{has_kernels}.zarr"
        if not has_kernels:
            with pytest.raises(MsmtuError) as err:
                run(region.cube, model, out, config=RunConfig(chunk=4 * CHUNK, precision="bf16"))
            assert str(err.value) == (
                f"precision bf16: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 matrix kernels, "
                "so the model would run 30-60x slower than in fp32; use precision fp32 here, or reduced precision "
                "on CPUs with AVX512 or AMX, or on GPUs")
            assert not out.exists()
            continue
        run(region.cube, model, out, config=RunConfig(chunk=4 * CHUNK, precision="bf16"))
        reduced, full = (open_output(path)["abundance"].values for path in (out, clean_run[0]))
        assert np.array_equal(np.isnan(reduced), np.isnan(full))
        assert 0 < np.nanmax(np.abs(reduced - full)) < 0.05


def test_cogs_are_valid_and_match_the_zarr_output(region, model, clean_run, tmp_path):
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    out, _ = clean_run
    with warnings.catch_warnings():  # such a warning in any export thread would reach the user's terminal
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("error", RuntimeWarning)
        summary = run(region.cube, model, out, config=RunConfig(chunk=CHUNK, imputed=True),
                      cog_dir=tmp_path / "cogs")
    assert summary.already_complete, "an existing complete output is only exported"
    ds = open_output(out).load()
    classes = [str(c) for c in ds["lulc_class"].values]
    for name in ("abundance", "dominant_class", "uncertainty", "expected_error", "valid_fraction", "quality_flag"):
        path = tmp_path / "cogs" / f"{name}_2013.tif"
        valid, errors, _ = cog_validate(path)
        assert valid, errors
        with rasterio.open(path) as raster:
            assert raster.crs == ds.rio.crs and raster.transform == ds.rio.transform()
            assert raster.overviews(1), "internal overviews"
            assert raster.descriptions == (tuple(classes) if name == "abundance" else (name,))
            assert raster.compression.name == "deflate"
            # the floating-point predictor where it makes files smaller (benchmarks/NOTES.md)
            assert raster.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR", "1") == \
                ("3" if name in ("abundance", "uncertainty", "expected_error") else "1")
            values = raster.read()
        expected = ds[name].values if name == "abundance" else ds[name].values[None]
        if name == "dominant_class":
            assert raster.nodata == 255 and values.dtype == np.uint8
            expected = np.where(np.isnan(expected), 255, expected)
        np.testing.assert_array_equal(values, expected.astype(values.dtype))
    assert not list((tmp_path / "cogs").glob(".*"))


def test_run_command_with_cog_and_performance_report(region, model, tmp_path):
    result = subprocess.run(
        [str(BIN / "msmtu-batch"), "run", "--cube", str(region.cube), "--model", str(model), "--out",
         str(tmp_path / "o.zarr"), "--chunk", "36", "--cog", str(tmp_path / "cogs"), "--performance-report",
         str(tmp_path / "report.html")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'o.zarr'}: 6,912 pixels, ")
    assert "6 of 6 chunks computed" in result.stdout and f"COGs in {tmp_path / 'cogs'}" in result.stdout
    assert "Dask dashboard" not in result.stderr, "threads of this process: no dashboard to point at"
    assert (tmp_path / "cogs" / "abundance_2013.tif").is_file()
    assert "<html" in (tmp_path / "report.html").read_text()[:2000].lower()


@pytest.mark.parametrize("report", [False, True])
def test_workers_run_dasks_profiler_only_for_a_performance_report(region, model, tmp_path, report):
    """The profiler walks every running task's stack every 10 ms, which slowed the model's
    threads by 10-20 % (benchmarks/NOTES.md); a performance report shows what it gathers."""
    profiling: list[bool] = []

    def look(client) -> None:
        profiling.extend(client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks).values())

    run(region.cube, model, tmp_path / "o.zarr", config=RunConfig(chunk=36), on_client=look,
        performance_report=tmp_path / "report.html" if report else None)
    assert profiling and set(profiling) == {report}


def test_chunk_tasks_keep_numpys_blas_to_their_share_of_the_cores_and_give_it_back(region, model, tmp_path):
    """Like torch's and Numba's: BLAS threads left idle spin and take the other task's core.
    OpenBLAS has one count per process, so the caller (a notebook) gets its own back."""
    def blas_threads() -> set[int]:
        return {library["num_threads"] for library in threadpool_info() if library["user_api"] == "blas"}

    during: list[set[int]] = []

    def watch(finished, total):
        for future in finished:
            during.append(blas_threads())  # the driver's view while tasks run in threads of this process
            yield future

    before = threadpool_info()
    try:
        ThreadpoolController().limit(limits=3, user_api="blas")  # the caller's own setting, not the cores'
        run(region.cube, model, tmp_path / "o.zarr", config=RunConfig(chunk=36), progress=watch)
        after = blas_threads()
    finally:
        threadpool_limits(limits=before)  # as it was, for the later tests
    assert during and all(seen == {1} for seen in during)  # one task per core: a thread each
    assert after == {3}


HEAP_REUSE_SCRIPT = """
import ctypes, resource, sys, threading
from msmtu_batch.runtime.tiling import M_MMAP_THRESHOLD, bound_heap_growth
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the machine's huge-page setting
if sys.argv[1] == "ours":
    bound_heap_growth()
else:  # the mmap threshold alone, as before: it fixes the trim threshold at 128 KiB
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
size, faults = 16 << 20, []

def chunks():  # a worker thread (its own heap) allocating, using and freeing a chunk's array twice
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        libc.free(block)

worker = threading.Thread(target=chunks)
worker.start()
worker.join()
print(faults[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_tasks_freed_heap_memory_serves_the_next_chunk_without_page_faults():
    """bound_heap_growth keeps up to 32 MiB free in a thread's heap: the next chunk's arrays
    reuse those pages, where the fixed mmap threshold alone gave them back and faulted them in
    again (a million times a 2048 x 2048 run)."""
    pages = (16 << 20) // os.sysconf("SC_PAGE_SIZE")
    faults = {setting: int(subprocess.run([sys.executable, "-c", HEAP_REUSE_SCRIPT, setting], capture_output=True,
                                          text=True, check=True).stdout)
              for setting in ("ours", "threshold alone")}
    assert faults["threshold alone"] > pages / 2, faults  # the second 16 MiB faulted in again
    assert faults["ours"] < pages / 20, faults

@pytest.mark.parametrize("case", [c for c in CORRUPTIONS if c != "nan altitude"])  # that one: chunk test above
def test_bad_cubes_stop_the_run_before_anything_is_written(case, tiny, model, tmp_path):
    corrupt, message = CORRUPTIONS[case]
    store = tmp_path / "bad.zarr"
    write_input_cube(corrupt(tiny), store)
    out = tmp_path / "out.zarr"
    with pytest.raises(MsmtuError) as err:
        run(store, model, out, config=RunConfig(chunk=CHUNK))
    assert str(err.value) == f"{store}: {message}"
    assert not out.exists() and not (tmp_path / ".out.zarr.partial").exists()
