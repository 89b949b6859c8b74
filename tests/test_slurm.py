"""Clusters from dask-jobqueue on a real one-node SLURM (tests/slurm.py): workers as SLURM
jobs, a worker job cancelled mid-run, the job scripts an operator checks; PBS directives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msmtu_batch.orchestration.pipeline import RunConfig, run
from msmtu_batch.runtime.clusters import LocalSpec, cluster_spec_from, job_script, load_cluster_spec
from msmtu_batch.runtime.errors import MsmtuError
from tests.conftest import zarr_files
from tests.test_faults import cli, one_line_error

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(small_model) -> Path:
    return small_model


@pytest.fixture(scope="module")
def local_output(region, model, tmp_path_factory) -> dict[str, bytes]:
    """The reference: the same run on a LocalCluster of single-threaded workers."""
    out = tmp_path_factory.mktemp("local") / "out.zarr"
    run(region.cube, model, out, config=RunConfig(chunk=16), scheduler=LocalSpec(n_workers=os.cpu_count()))
    return zarr_files(out)


def slurm_spec(tmp_path: Path, **extra) -> Path:
    spec = {"cluster": "slurm", "queue": "batch", "cores": 1, "memory": "2GB", "walltime": "00:10:00",
            "shared_directory": str(tmp_path / "tls"), "log_directory": str(tmp_path / "logs"), **extra}
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def worker_jobs(slurm) -> list[dict[str, str]]:
    return [job for job in slurm.jobs() if job.get("Name") == "msmtu-worker"]


def test_run_on_slurm_workers_is_byte_identical_to_a_local_run(slurm, region, model, local_output, tmp_path):
    before = {job["JobId"] for job in worker_jobs(slurm)}
    out = tmp_path / "out.zarr"
    done = subprocess.run([BIN / "msmtu-batch", "run", "--cube", str(region.cube), "--model", str(model),
                           "--out", str(out), "--chunk", "16", "--scheduler", str(slurm_spec(tmp_path, jobs=2))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert zarr_files(out) == local_output
    jobs = [job for job in worker_jobs(slurm) if job["JobId"] not in before]
    # both worker jobs ran on the node and were ended by the driver when the run finished
    assert len(jobs) == 2, slurm.jobs()
    assert all(job["NodeList"] == slurm.host and job["StartTime"] <= job["EndTime"] for job in jobs)
    assert {job["JobState"] for job in jobs} <= {"CANCELLED", "COMPLETED"}
    assert not slurm.queue()
    assert not list((tmp_path / "tls").iterdir())  # the run's credentials go with it


def test_a_worker_job_cancelled_mid_run_is_survived(slurm, region, model, local_output, tmp_path):
    cancelled: list[str] = []

    def cancel_one_job_after_the_first_chunk(items, total):
        for i, item in enumerate(items):
            if i == 0:
                job = slurm.queue()[0]
                subprocess.run(["scancel", job], check=True)
                cancelled.append(job)
            yield item

    out = tmp_path / "out.zarr"
    summary = run(region.cube, model, out, config=RunConfig(chunk=16),
                  scheduler=load_cluster_spec(str(slurm_spec(tmp_path, adapt={"minimum_jobs": 2,
                                                                               "maximum_jobs": 2}))),
                  progress=cancel_one_job_after_the_first_chunk)
    assert cancelled and summary.computed_chunks == summary.chunks
    assert zarr_files(out) == local_output
    states = {job["JobId"]: job["JobState"] for job in worker_jobs(slurm)}
    assert states[cancelled[0]] == "CANCELLED"


def test_cluster_script_prints_the_sbatch_directives(tmp_path):
    spec = slurm_spec(tmp_path, cores=8, memory="32GB", walltime="02:00:00", account="lulc", gpu=True,
                      job_directives=["--qos=normal"], job_script_prologue=["module load cuda"],
                      local_directory="$TMPDIR", interface="lo")
    done = subprocess.run([BIN / "msmtu-batch", "cluster-script", str(spec)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for directive in ("#SBATCH -J msmtu-worker", "#SBATCH -p batch", "#SBATCH -A lulc", "#SBATCH --cpus-per-task=8",
                      "#SBATCH --mem=30G", "#SBATCH -t 02:00:00", "#SBATCH --qos=normal", "#SBATCH --gres=gpu:1",
                      "module load cuda"):
        assert directive in lines, done.stdout
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tls://")
    for argument in ("--nthreads 8", "--resources GPU=1", "--local-directory $TMPDIR", "--interface lo",
                     "--tls-ca-file", "--tls-key"):
        assert argument in worker, worker


@pytest.mark.parametrize("shipped", ["cpu.yaml", "gpu.yaml"])
def test_cluster_script_on_a_host_without_the_spec_interface_says_so_in_one_line(region, model, tmp_path, shipped):
    """The operator's first command on a login node: the shipped specs name ib0; a host without
    it gets one line naming the key and this host's interfaces (exit 2), one with it the script."""
    import psutil

    path = ROOT / "deploy" / "slurm" / shipped
    interfaces = sorted(psutil.net_if_addrs())
    result = cli("cluster-script", path)
    if "ib0" in interfaces:
        assert result.returncode == 0 and "#SBATCH" in result.stdout, result.stderr
    else:
        assert one_line_error(result) == _no_such_interface(path, "ib0", interfaces)
    spec = yaml.safe_load(path.read_text()) | {"interface": "nosuch0", "shared_directory": str(tmp_path)}
    copy = tmp_path / shipped
    copy.write_text(yaml.safe_dump(spec))
    assert one_line_error(cli("cluster-script", copy)) == _no_such_interface(copy, "nosuch0", interfaces)
    # run with that spec: the same line, and no output
    assert one_line_error(cli("run", "--cube", region.cube, "--model", model, "--out", tmp_path / "out.zarr",
                              "--scheduler", copy)) == _no_such_interface(copy, "nosuch0", interfaces)
    assert not (tmp_path / "out.zarr").exists()


def _no_such_interface(path: Path, interface: str, interfaces: list[str]) -> str:
    import socket

    return (f"{path}: interface: '{interface}' is not a network interface of this host ({socket.gethostname()}: "
            f"{', '.join(interfaces)}); set interface to the one on which the compute nodes reach the node the driver "
            "runs on (`ip -brief address` there), or scheduler_host to its address")


def test_pbs_job_script_directives(tmp_path):
    cpu = cluster_spec_from({"cluster": "pbs", "queue": "workq", "account": "lulc", "cores": 4, "memory": "16GB",
                             "walltime": "04:00:00", "job_directives": ["-m abe"],
                             "shared_directory": str(tmp_path)}, "pbs.yaml")
    script = job_script(cpu).splitlines()
    for directive in ("#PBS -N msmtu-worker", "#PBS -q workq", "#PBS -A lulc", "#PBS -l select=1:ncpus=4:mem=15GB",
                      "#PBS -l walltime=04:00:00", "#PBS -m abe"):
        assert directive in script, script
    worker = next(line for line in script if "dask_worker" in line)
    assert "--nthreads 1" in worker and "--nworkers 4" in worker and "--resources" not in worker
    gpu = cpu.model_copy(update={"gpu": True, "cores": 8})
    script = job_script(gpu).splitlines()
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=15GB" in script
    worker = next(line for line in script if "dask_worker" in line)
    assert "--nthreads 8" in worker and "--resources GPU=1" in worker and "--nworkers" not in worker


@pytest.mark.parametrize("spec, message", [
    ({"cluster": "slurm", "partition": "gpu"}, "partition: Extra inputs are not permitted"),
    ({"cluster": "slurm", "memory": "lots"}, "memory: 'lots' is not an amount of memory (e.g. 16GB)"),
    ({"cluster": "pbs", "cores": 3, "processes": 2}, "spec: cores 3 is not a multiple of processes 2"),
    ({"cluster": "slurm", "gpu": True, "processes": 2}, "spec: a gpu job runs one worker (processes: 1)"),
    ({"cluster": "slurm", "jobs": 2, "adapt": {"maximum_jobs": 4}},
     "spec: give jobs (a fixed number) or adapt (bounds), not both"),
    ({"cluster": "slurm", "adapt": {"minimum_jobs": 5, "maximum_jobs": 4}},
     "adapt: minimum_jobs 5 is more than maximum_jobs 4"),
    ({"cluster": "slurm", "walltime": "two hours"}, "walltime: String should match pattern"),
    ({"cluster": "sge"}, "does not match any of the expected tags: 'local', 'address', 'slurm', 'pbs'"),
])
def test_bad_batch_specs_are_refused_in_one_line(tmp_path, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MsmtuError) as caught:
        load_cluster_spec(str(path))
    assert str(caught.value).startswith(f"{path}: invalid cluster spec: ") and message in str(caught.value)


def test_cluster_script_refuses_a_bad_spec_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"cluster": "slurm", "partition": "gpu"}))
    assert one_line_error(cli("cluster-script", path)) == (f"{path}: invalid cluster spec: partition: Extra inputs "
                                                          "are not permitted")
    assert one_line_error(cli("cluster-script", tmp_path / "local.yaml")) == f"{tmp_path / 'local.yaml'}: cluster " \
        "spec not found"
