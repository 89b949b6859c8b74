"""Shared fixtures, one of each for the whole session: small simulated regions written to real
Zarr stores on disk, a small model trained on one, a real Dask cluster and a real SLURM."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import dask.config
import distributed  # noqa: F401  (registers the distributed.* config read below)
import pytest
import xarray as xr

from msmtu_batch.inputs.cube import open_input_cube
from msmtu_batch.synthetic.simulate import SimulationConfig, SimulationResult, simulate

# Outputs record their creation time; two runs of the same inputs compared byte for byte must
# be made "at the same time" (the reproducible-builds convention msmtu-batch follows).
os.environ.setdefault("SOURCE_DATE_EPOCH", "1764547200")

# What distributed's Nanny writes into the os.environ of the process that starts it, for good,
# before it spawns a worker (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ...), as this session began
NANNY_ENVIRON = {name: os.environ.get(name) for name in dask.config.get("distributed.nanny.pre-spawn-environ")}


@pytest.fixture(autouse=True)
def nanny_environment_stays_out_of_later_tests():
    """A test or module fixture that starts worker processes in this process (a LocalCluster
    with processes) would otherwise leave OMP_NUM_THREADS=1 to every later test's
    subprocesses: later trainings ran on one torch thread, so a test's outcome depended on
    which tests ran before."""
    yield
    for name, value in NANNY_ENVIRON.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


SMALL = SimulationConfig(height=72, width=96, seed=7, chunk=32, msmtu_pixels=300, split_block=12)


@pytest.fixture(scope="session")
def region(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    """A 72 x 96 region (three row blocks, 48 split blocks, 300 MSMTU pixels)."""
    return simulate(SMALL, tmp_path_factory.mktemp("region"))


@pytest.fixture(scope="session")
def cube(region: SimulationResult) -> xr.Dataset:
    return open_input_cube(region.cube).load()


@pytest.fixture(scope="session")
def tiny(region: SimulationResult) -> xr.Dataset:
    """A 24 x 32 corner of the simulated cube, loaded (raw int16) for corruption."""
    return open_input_cube(region.cube).isel(y=slice(0, 24), x=slice(0, 32)).load()


@pytest.fixture(scope="session")
def reference(region: SimulationResult) -> dict[str, xr.Dataset]:
    return {level: xr.open_zarr(region.reference, group=level, consolidated=False).load()
            for level in ("level1", "level2")}


def gdal(*args: str, stderr: bool = True) -> str:
    """Run one of Debian's GDAL command-line tools (required in CI: MSMTU_REQUIRE_GDAL=1); its
    output (with what it printed on stderr, unless ``stderr`` is False)."""
    import shutil
    import subprocess

    if shutil.which(args[0]) is None:
        if os.environ.get("MSMTU_REQUIRE_GDAL") == "1":
            pytest.fail(f"{args[0]} required (MSMTU_REQUIRE_GDAL=1) but not installed (apt-get install gdal-bin)")
        pytest.skip(f"{args[0]} not installed (apt-get install gdal-bin)")
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout + (result.stderr if stderr else "")


SMALL_TRAINING = {"epochs": 1, "hidden": 8, "embed": 4, "head_hidden": 8}  # seconds to train; maps the region


def train_small_model(region: SimulationResult, path: Path, seed: int = 0) -> Path:
    """A small level-2 model trained on the region's reference, saved at ``path``."""
    from msmtu_batch.inputs.training_data import read_cube_reference
    from msmtu_batch.model.artifact import save_artifact
    from msmtu_batch.model.train import TrainConfig, train

    pixels = read_cube_reference(region.cube, region.reference, "level2")
    return save_artifact(train(pixels, "level2", TrainConfig(**SMALL_TRAINING, seed=seed)).artifact, path)


@pytest.fixture(scope="session")
def small_model(region: SimulationResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model the run, fault, workflow and cluster tests map the region with."""
    return train_small_model(region, tmp_path_factory.mktemp("small-model") / "level2.safetensors")


@pytest.fixture(scope="session")
def local_scheduler() -> str:
    """The address of one real LocalCluster (2 worker processes on 127.0.0.1) that runs under
    test connect to, as to an operator's scheduler, rather than each starting one."""
    from distributed import LocalCluster

    # its dashboard on a free port: the default, 8787 (None means the default too), would push
    # the clusters of examples and notebooks under test aside with a warning
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address


# Killed inside its writes: the project's durable writer and, if given a second path, zarr's
# chunk writer each leave a temporary beside the file, named as they name it (so a test that
# expects it gone fails if either writer renames it)
_DIE_MID_WRITE = """
import contextlib, os, signal, sys
from pathlib import Path
from zarr.storage._local import _atomic_write
from msmtu_batch.runtime.outputs import durable_file
paths = [Path(p) for p in sys.argv[1:]]
for path in paths:
    path.parent.mkdir(parents=True, exist_ok=True)
with durable_file(paths[0]) as temporary, \\
        (_atomic_write(paths[1], "wb") if len(paths) > 1 else contextlib.nullcontext()) as chunk:
    temporary.write_bytes(b"half a file")
    if chunk is not None:
        chunk.write(b"half a chunk")
        chunk.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def die_mid_write(durable: Path, zarr_file: Path | None = None) -> None:
    """A process killed while it writes ``durable`` (through durable_file) and ``zarr_file``
    (through zarr's LocalStore), leaving what such a process leaves."""
    paths = [str(durable), *([str(zarr_file)] if zarr_file else [])]
    died = subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, *paths])
    assert died.returncode == -signal.SIGKILL, died


def zarr_files(store: Path) -> dict[str, str]:
    """Every file of a store (chunks and metadata) by relative path, as the SHA-256 of its
    bytes: equal for equal bytes, and a failed comparison names the files that differ in a
    line each (the bytes themselves filled CI's log and buried the names)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A real one-node SLURM on this machine (tests/slurm.py), for the whole session."""
    import os

    from tests.slurm import OneNodeSlurm, missing_requirements

    why = missing_requirements()
    if why:
        if os.environ.get("MSMTU_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM tests required (MSMTU_REQUIRE_SLURM=1) but {why}")
        pytest.skip(f"no SLURM here: {why}")
    cluster = OneNodeSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
