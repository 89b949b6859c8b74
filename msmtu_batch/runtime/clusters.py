"""Where the work runs: a LocalCluster sized to the machine, a running scheduler, or a batch
system (SLURM or PBS through dask-jobqueue).

``--scheduler`` takes nothing (this machine's cores: see :class:`LocalSpec`), a scheduler
address (``tcp://host:port`` or ``tls://host:port``), or a YAML file::

    cluster: local          # or: address, slurm, pbs
    processes: true         # local only: worker processes, or false: threads of this process
    n_workers: 4            # local only (at least 1)
    threads_per_worker: 1   # local only (at least 1)
    address: tls://...      # address only (required)
    tls:                    # address only: the credentials a TLS scheduler asks of its clients
      ca_file: ca.pem
      cert: client-cert.pem
      key: client-key.pem

SLURM and PBS (:class:`SlurmSpec`, :class:`PbsSpec`): each batch job runs ``processes``
Dask workers on ``cores`` cores; ``jobs`` fixes how many jobs run, ``adapt`` lets their
number follow the work. The scheduler runs in the driver process and requires TLS with
credentials made for the run (written, readable by you only, to ``shared_directory`` for
the jobs to read); it binds to 127.0.0.1 unless ``interface`` or ``scheduler_host`` says
where the compute nodes can reach it. ``gpu: true`` asks one GPU per job (``--gres=gpu:1``
or PBS ``ngpus=1``) and runs its one worker with the resource ``GPU=1``.

Unknown keys and wrong types are refused with one line naming the file and the key.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import dask
import yaml
from dask.utils import parse_bytes
from distributed import Client, LocalCluster, Worker, WorkerPlugin
from distributed.core import Status
from distributed.security import Security
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from msmtu_batch.runtime.errors import MsmtuError, MsmtuWarning


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _memory_amount(value: str) -> str:
    try:
        parse_bytes(value)
    except (ValueError, TypeError):
        raise ValueError(f"{value!r} is not an amount of memory (e.g. 16GB)") from None
    return value


class LocalSpec(_Spec):
    """A LocalCluster on this machine. With worker processes (by default one single-threaded
    worker per core), its scheduler binds to loopback and requires TLS with credentials made
    for this run only, so no other user of a shared node can connect. Without (by default one
    worker with a thread per core), the workers are threads of this process and talk to the
    scheduler in memory: nothing starts, nothing is imported twice, no port but their HTTP
    servers' (health, metrics) on loopback, no dashboard. ``processes`` left out means the
    command's choice: ``run`` takes threads (the model's kernels release the GIL; measured
    1.3-2x the pixels/s of worker processes on 2 cores, benchmarks/NOTES.md), ``ingest`` and
    workflows take processes."""

    cluster: Literal["local"] = "local"
    processes: bool | None = None
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    memory_limit: str | None = Field(None, description="memory of each worker, e.g. 8GB (default: this machine's "
                                                       "memory shared among the workers)")

    @field_validator("memory_limit")
    @classmethod
    def _limit_bytes(cls, value: str | None) -> str | None:
        return None if value is None else _memory_amount(value)

    def cluster_shape(self, processes: bool) -> tuple[int, int]:
        """(workers, Dask threads per worker): as given, else one per core, as processes of
        one thread or as threads of one worker."""
        cores = os.cpu_count() or 1
        if processes:
            threads = self.threads_per_worker or 1
            return self.n_workers or max(1, cores // threads), threads
        workers = self.n_workers or 1
        return workers, self.threads_per_worker or max(1, cores // workers)


class TlsFiles(_Spec):
    ca_file: FilePath
    cert: FilePath
    key: FilePath


class AddressSpec(_Spec):
    """A running scheduler (started by the operator, e.g. ``dask scheduler --tls-...``)."""

    cluster: Literal["address"]
    address: str = Field(min_length=1)
    tls: TlsFiles | None = None


class Adapt(_Spec):
    """Jobs follow the work between these bounds (dask-jobqueue's ``adapt``)."""

    minimum_jobs: int = Field(0, ge=0)
    maximum_jobs: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Adapt:
        if self.minimum_jobs > self.maximum_jobs:
            raise ValueError(f"minimum_jobs {self.minimum_jobs} is more than maximum_jobs {self.maximum_jobs}")
        return self


class _BatchSpec(_Spec):
    """What SLURM and PBS jobs have in common (dask-jobqueue's keywords, named for operators)."""

    queue: str | None = Field(None, description="SLURM partition or PBS queue")
    account: str | None = None
    cores: int = Field(1, ge=1, description="cores per job")
    processes: int | None = Field(None, ge=1, description="Dask worker processes per job (default: one per "
                                                         "core, one thread each; 1 with gpu)")
    memory: str = Field("4GB", description="memory per job, e.g. 16GB")
    walltime: str = Field("01:00:00", pattern=r"^(\d+-)?\d{1,3}(:\d\d){0,2}$")
    local_directory: str | None = Field(None, description="fast node-local scratch for the workers, e.g. $TMPDIR")
    log_directory: str | None = Field(None, description="where the jobs' stdout/stderr go")
    job_directives: list[str] = Field(default_factory=list, description="extra #SBATCH / #PBS lines")
    job_script_prologue: list[str] = Field(default_factory=list, description="shell lines before the worker "
                                           "starts (module load, conda activate)")
    python: str = Field(default_factory=lambda: sys.executable, description="the workers' Python")
    interface: str | None = Field(None, description="network interface of scheduler and workers, e.g. ib0")
    scheduler_host: str | None = Field(None, description="address the scheduler binds to")
    shared_directory: str = Field("~/.msmtu-batch/dask", description="folder the compute nodes see, for the "
                                  "run's TLS credentials")
    jobs: int | None = Field(None, ge=1, description="a fixed number of jobs (default 1 unless adapt)")
    adapt: Adapt | None = None
    gpu: bool = Field(False, description="one GPU per job, one worker per GPU, resource GPU=1")
    worker_start_timeout: float = Field(3600, gt=0, description="seconds to wait for the first worker")

    @field_validator("memory")
    @classmethod
    def _bytes(cls, value: str) -> str:
        return _memory_amount(value)

    @model_validator(mode="after")
    def _consistent(self) -> _BatchSpec:
        if self.jobs is not None and self.adapt is not None:
            raise ValueError("give jobs (a fixed number) or adapt (bounds), not both")
        if self.gpu and self.processes not in (None, 1):
            raise ValueError("a gpu job runs one worker (processes: 1)")
        if self.cores % self.worker_processes:
            raise ValueError(f"cores {self.cores} is not a multiple of processes {self.processes}")
        if self.interface is not None and self.scheduler_host is not None:
            raise ValueError("give interface or scheduler_host, not both")
        return self

    _source: str = PrivateAttr("cluster spec")  # the file the spec came from, for messages

    @property
    def worker_processes(self) -> int:
        return 1 if self.gpu else (self.processes or self.cores)

    def _check_interface(self) -> None:
        """The scheduler binds to ``interface`` on this host: refuse one this host lacks in one line
        (dask-jobqueue would fail deep inside the cluster's start)."""
        import socket

        import psutil

        present = sorted(psutil.net_if_addrs())
        if self.interface is not None and self.interface not in present:
            raise MsmtuError(
                f"{self._source}: interface: '{self.interface}' is not a network interface of this host "
                f"({socket.gethostname()}: {', '.join(present)}); set interface to the one on which the compute "
                "nodes reach the node the driver runs on (`ip -brief address` there), or scheduler_host to its "
                "address")

    def _common(self) -> dict:
        """dask-jobqueue keywords shared by both batch systems."""
        self._check_interface()
        host = None if self.interface else (self.scheduler_host or "127.0.0.1")
        if host in ALL_INTERFACES:
            warnings.warn(f"{self._source}: scheduler_host {host} listens on every network interface of this host: "
                          "anyone who reaches it can try the scheduler (TLS keeps them out); prefer the address "
                          "of the interface the compute nodes use", MsmtuWarning, stacklevel=2)
        shared = Path(os.path.expandvars(self.shared_directory)).expanduser()
        shared.mkdir(parents=True, exist_ok=True, mode=0o700)
        return dict(
            job_name="msmtu-worker", cores=self.cores, processes=self.worker_processes, memory=self.memory,
            walltime=self.walltime, queue=self.queue, account=self.account, local_directory=self.local_directory,
            log_directory=self.log_directory, job_script_prologue=list(self.job_script_prologue),
            python=self.python, interface=self.interface, security=Security.temporary(),
            shared_temp_directory=str(shared), silence_logs=logging.ERROR,
            worker_extra_args=["--resources", "GPU=1"] if self.gpu else [],
            # the dashboard stays on loopback: reach it through an SSH tunnel
            scheduler_options={"dashboard_address": "127.0.0.1:0"} | ({"host": host} if host else {}))


ALL_INTERFACES = ("0.0.0.0", "::", "")  # a scheduler bound to these listens on every interface


class SlurmSpec(_BatchSpec):
    """Workers as SLURM jobs (dask-jobqueue's SLURMCluster)."""

    cluster: Literal["slurm"]

    def make_cluster(self):
        from dask_jobqueue import SLURMCluster

        directives = [*self.job_directives, *(["--gres=gpu:1"] if self.gpu else [])]
        return SLURMCluster(**self._common(), job_extra_directives=directives)


class PbsSpec(_BatchSpec):
    """Workers as PBS jobs (dask-jobqueue's PBSCluster)."""

    cluster: Literal["pbs"]

    def make_cluster(self):
        from dask_jobqueue import PBSCluster
        from dask_jobqueue.pbs import pbs_format_bytes_ceil

        resources = f"select=1:ncpus={self.cores}" + (":ngpus=1" if self.gpu else "") + \
            f":mem={pbs_format_bytes_ceil(parse_bytes(self.memory))}"
        return PBSCluster(**self._common(), resource_spec=resources, job_extra_directives=list(self.job_directives))


BatchSpec = SlurmSpec | PbsSpec
AnySpec = LocalSpec | AddressSpec | SlurmSpec | PbsSpec
ClusterSpec = Annotated[AnySpec, Field(discriminator="cluster")]
_SPEC = TypeAdapter(ClusterSpec)
KINDS = "local, address, slurm or pbs"


def load_cluster_spec(scheduler: str | AnySpec | Client | None) -> AnySpec | Client:
    """Parse ``--scheduler`` (nothing, an address or a YAML file); one clear line if it is wrong.
    A spec or a connected Client is returned as it is."""
    if isinstance(scheduler, AnySpec | Client):
        return scheduler
    if not scheduler:
        return LocalSpec()
    if not scheduler.endswith((".yaml", ".yml")):
        return AddressSpec(cluster="address", address=scheduler)
    path = Path(scheduler)
    if not path.is_file():
        raise MsmtuError(f"{scheduler}: cluster spec not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise MsmtuError(f"{scheduler}: not valid YAML{line} ({getattr(exc, 'problem', None) or exc})") from None
    return cluster_spec_from(loaded, scheduler)


def cluster_spec_from(values: object, where: str) -> AnySpec:
    """A cluster spec from a parsed mapping (a YAML file's or a workflow's ``cluster`` section)."""
    if not isinstance(values, dict) or "cluster" not in values:
        raise MsmtuError(f"{where}: expected a mapping with a 'cluster' key ({KINDS})")
    try:
        spec = _SPEC.validate_python(values)
    except ValidationError as exc:
        def field(error: dict) -> str:
            return ".".join(map(str, error["loc"][1:])) or ("cluster" if error["type"].startswith("union_tag")
                                                            else "spec")
        problems = "; ".join(f"{field(e)}: " + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise MsmtuError(f"{where}: invalid cluster spec: {problems}") from None
    if isinstance(spec, _BatchSpec):
        spec._source = where
    return spec


def job_script(spec: BatchSpec) -> str:
    """The job script dask-jobqueue would submit for one batch of workers (for an operator to
    check); the scheduler address in it is this process's and changes with every run."""
    with spec.make_cluster() as cluster:
        return cluster.job_script()


@contextmanager
def connect(scheduler: str | AnySpec | Client | None = None, *, processes: bool = True,
            profile: bool = True) -> Iterator[Client]:
    """A client for ``scheduler``; a cluster it starts is stopped on exit, a Client given is
    used as it is (and left open). ``processes``: whether a local spec that does not say
    runs worker processes or threads of this process. ``profile``: whether workers that are
    threads of this process run Dask's statistical profiler (every 10 ms it walks the stack of
    every running task; it slowed the model by 10-20 % there, and not measurably in worker
    processes: benchmarks/NOTES.md, 2026-12-03)."""
    spec = load_cluster_spec(scheduler)
    if isinstance(spec, Client):
        yield spec
        return
    if isinstance(spec, AddressSpec):
        security = (Security(tls_ca_file=str(spec.tls.ca_file), tls_client_cert=str(spec.tls.cert),
                             tls_client_key=str(spec.tls.key), require_encryption=True) if spec.tls else None)
        try:
            client = Client(spec.address, timeout="20s", security=security)
        except (OSError, TimeoutError, ValueError) as exc:
            raise MsmtuError(f"cannot reach the Dask scheduler at {spec.address}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
        return
    if isinstance(spec, SlurmSpec | PbsSpec):
        with spec.make_cluster() as cluster, _client_of(cluster) as client:
            if spec.adapt is not None:
                cluster.adapt(minimum_jobs=spec.adapt.minimum_jobs, maximum_jobs=spec.adapt.maximum_jobs)
            else:
                cluster.scale(jobs=spec.jobs or 1)
            try:  # a GPU cluster is told by its workers' resources: wait for the first one
                client.wait_for_workers(1, timeout=spec.worker_start_timeout)
            except TimeoutError:
                raise MsmtuError(f"no {spec.cluster.upper()} worker joined within {spec.worker_start_timeout:g} s; "
                                 "check the jobs (squeue / qstat) and their logs") from None
            yield client
        return
    processes = processes if spec.processes is None else spec.processes
    workers, threads = spec.cluster_shape(processes)
    if not processes:  # in-memory transport: no port, so no credentials to make; no dashboard
        # either (bokeh's import cost 0.5-0.65 s of a 7 s run; the progress bar and
        # --performance-report remain). Scheduler and worker still serve HTTP (health, metrics):
        # on loopback, where Dask's default would be every interface.
        with dask.config.set({"distributed.worker.profile.enabled": profile, **QUIET_EVENT_LOOP}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=False,
                                   memory_limit=spec.memory_limit or "auto",
                                   scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                                   worker_class=_LoopbackWorker, silence_logs=logging.ERROR)
        with cluster, _client_of(cluster) as client:
            yield client
        return
    # workers log errors only: a task's warnings on shutdown would otherwise follow the one line
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                      memory_limit=spec.memory_limit or "auto",
                      dashboard_address="127.0.0.1:0", security=Security.temporary(),
                      silence_logs=logging.ERROR) as cluster, _client_of(cluster) as client:
        client.register_plugin(QuietWhileClosing())
        yield client


# Dask's periodic callbacks on the in-process scheduler and worker, read as each starts: the
# event loop's tick every 20 ms, the memory monitor every 100 ms, the system monitor every
# 500 ms, work stealing (one worker: nothing to steal). Each takes the GIL that the model's
# threads take back some 50 times a tile, which then wait: at these intervals the model took
# 19.4-19.8 us a pixel and thread against 21.3-22.4, a 2048 x 2048 run 45-46 s against 50-53
# (benchmarks/NOTES.md, 2026-12-07, ninth session). Memory is still checked every second.
QUIET_EVENT_LOOP = {"distributed.admin.tick.interval": "1s", "distributed.admin.system-monitor.interval": "2s",
                    "distributed.worker.memory.monitor-interval": "1s", "distributed.scheduler.work-stealing": False}


class _LoopbackWorker(Worker):
    """A worker thread whose HTTP server (health, metrics) listens on loopback only, without
    the dashboard pages: LocalCluster ties both to one argument."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs | {"dashboard_address": "127.0.0.1:0", "dashboard": False})


class QuietWhileClosing(WorkerPlugin):
    """Drops what a local worker logs once it is closing. Its terminal is the user's, and a
    worker closed while a heartbeat is on the wire logs that failure with a traceback
    (dask/distributed#7105), which would follow a refused run's one line."""

    name = "msmtu-quiet-while-closing"

    def setup(self, worker) -> None:
        # on the handlers, not a logger: a logger's filter does not see its children's records
        quiet = _RunningWorkerFilter(worker)
        loggers = [logging.root, *logging.root.manager.loggerDict.values()]
        for handler in {h for lg in loggers for h in getattr(lg, "handlers", ())}:
            handler.addFilter(quiet)


class _RunningWorkerFilter(logging.Filter):
    def __init__(self, worker) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        return self.worker.status not in (Status.closing, Status.closing_gracefully, Status.closed)


@contextmanager
def _client_of(cluster) -> Iterator[Client]:
    """A client of ``cluster``, closed on exit. Not Client's own context manager: that one sets
    a context variable which must be reset in the same thread, and a workflow starts its
    cluster in whichever year's thread first has work."""
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()


def has_gpu_workers(client: Client) -> bool:
    """True when some worker advertises the resource ``GPU``."""
    workers = client.scheduler_info()["workers"].values()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)


def threads_per_task(client: Client) -> int:
    """Cores left to one task's torch/numba threads so Dask threads x their threads <= cores
    (on this machine; workers elsewhere run one thread per core already)."""
    info = client.scheduler_info()["workers"]
    workers = list(info.values())
    if not workers:
        return 1
    if any(w.get("host") not in ("127.0.0.1", "localhost") and not address.startswith("inproc://")
           for address, w in info.items()):
        return 1
    cores = os.cpu_count() or 1
    total_threads = sum(w.get("nthreads", 1) for w in workers)
    return max(1, cores // max(1, total_threads))
