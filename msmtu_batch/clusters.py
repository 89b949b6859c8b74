"""Where the work runs: a LocalCluster sized to the machine, a running scheduler, or a spec.

``--scheduler`` takes nothing (LocalCluster on 127.0.0.1, one single-threaded worker per
core, dashboard on loopback), a scheduler address (``tcp://host:port``), or a YAML file::

    cluster: local          # or: address
    n_workers: 4            # local only
    threads_per_worker: 1   # local only
    address: tcp://...      # address only

dask-jobqueue SLURM/PBS specs plug in here (``cluster: slurm``) in a later issue.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from distributed import Client, LocalCluster

from msmtu_batch.errors import MsmtuError


@contextmanager
def connect(scheduler: str | None = None) -> Iterator[Client]:
    """A client for ``scheduler``; a cluster it starts is stopped on exit."""
    spec: dict = {"cluster": "local"}
    if scheduler:
        path = Path(scheduler)
        if scheduler.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise MsmtuError(f"{scheduler}: cluster spec not found")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise MsmtuError(f"{scheduler}: expected a mapping with a 'cluster' key")
            spec = loaded
        else:
            spec = {"cluster": "address", "address": scheduler}
    kind = spec.get("cluster")
    if kind == "address":
        try:
            client = Client(spec["address"], timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise MsmtuError(f"cannot reach the Dask scheduler at {spec['address']}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
    elif kind == "local":
        threads = int(spec.get("threads_per_worker", 1))
        workers = int(spec.get("n_workers", max(1, (os.cpu_count() or 1) // threads)))
        with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            yield client
    else:
        raise MsmtuError(f"{scheduler}: unknown cluster kind {kind!r} (expected local or address)")


def has_gpu_workers(client: Client) -> bool:
    """True when some worker advertises the resource ``GPU``."""
    workers = client.scheduler_info()["workers"].values()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)


def threads_per_task(client: Client) -> int:
    """Cores left to one task's torch/numba threads so Dask threads x their threads <= cores."""
    workers = list(client.scheduler_info()["workers"].values())
    if not workers:
        return 1
    cores = os.cpu_count() or 1
    total_threads = sum(w.get("nthreads", 1) for w in workers)
    return max(1, cores // max(1, total_threads))
