"""Where the work runs: a LocalCluster sized to the machine, a running scheduler, or a spec.

``--scheduler`` takes nothing (LocalCluster on 127.0.0.1, one single-threaded worker per
core, dashboard on loopback, TLS with temporary credentials), a scheduler address
(``tcp://host:port`` or ``tls://host:port``), or a YAML file::

    cluster: local          # or: address
    n_workers: 4            # local only (at least 1)
    threads_per_worker: 1   # local only (at least 1)
    address: tls://...      # address only (required)
    tls:                    # address only: the credentials a TLS scheduler asks of its clients
      ca_file: ca.pem
      cert: client-cert.pem
      key: client-key.pem

Unknown keys and wrong types are refused with one line naming the file and the key.
dask-jobqueue SLURM/PBS specs plug in here (``cluster: slurm``) in a later issue.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import yaml
from distributed import Client, LocalCluster
from distributed.security import Security
from pydantic import BaseModel, ConfigDict, Field, FilePath, TypeAdapter, ValidationError

from msmtu_batch.errors import MsmtuError


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalSpec(_Spec):
    """A LocalCluster on this machine; its scheduler binds to loopback and requires TLS with
    credentials made for this run only, so no other user of a shared node can connect."""

    cluster: Literal["local"] = "local"
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)


class TlsFiles(_Spec):
    ca_file: FilePath
    cert: FilePath
    key: FilePath


class AddressSpec(_Spec):
    """A running scheduler (started by the operator, e.g. ``dask scheduler --tls-...``)."""

    cluster: Literal["address"]
    address: str = Field(min_length=1)
    tls: TlsFiles | None = None


ClusterSpec = Annotated[LocalSpec | AddressSpec, Field(discriminator="cluster")]
_SPEC = TypeAdapter(ClusterSpec)


def load_cluster_spec(scheduler: str | None) -> LocalSpec | AddressSpec:
    """Parse ``--scheduler`` (nothing, an address or a YAML file); one clear line if it is wrong."""
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
    if not isinstance(loaded, dict) or "cluster" not in loaded:
        raise MsmtuError(f"{scheduler}: expected a mapping with a 'cluster' key (local or address)")
    try:
        return _SPEC.validate_python(loaded)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'cluster'}: {e['msg']}"
                             for e in exc.errors())
        raise MsmtuError(f"{scheduler}: invalid cluster spec: {problems}") from None


@contextmanager
def connect(scheduler: str | LocalSpec | AddressSpec | None = None) -> Iterator[Client]:
    """A client for ``scheduler``; a cluster it starts is stopped on exit."""
    spec = scheduler if isinstance(scheduler, LocalSpec | AddressSpec) else load_cluster_spec(scheduler)
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
    threads = spec.threads_per_worker
    workers = spec.n_workers or max(1, (os.cpu_count() or 1) // threads)
    # workers log errors only: a task's warnings on shutdown would otherwise follow the one line
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", security=Security.temporary(),
                      silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield client


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
