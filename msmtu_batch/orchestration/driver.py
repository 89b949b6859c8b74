"""The driver skeleton that ``run`` and ``ingest`` share: every command that builds a store
on a cluster goes through the same steps, in the same order.

1. :meth:`Driver.start`: the output path checked against the command's inputs, and the
   cluster spec parsed -- a wrong one stops before any work.
2. :meth:`Driver.locked`: the output's lock (one writer at a time), held to the end.
3. The store built at :attr:`Driver.staging`, a hidden sibling of the output.
4. :meth:`Driver.session`: the cluster started or reached; :func:`follow` follows the tasks
   with the caller's progress callback and stops at the first failure the user can cause.
5. :meth:`Driver.publish`: the staged store cleared of what killed writers left, consolidated
   and put in place (atomically).

:class:`PhaseClock` times the phases between, so a summary shows where the wall time went.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client, as_completed

from msmtu_batch.inputs.cube import consolidate
from msmtu_batch.runtime.clusters import AnySpec, connect, load_cluster_spec
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.outputs import (
    check_output_path,
    output_lock,
    remove_stray_temporaries,
    replace_store,
    staging_path,
)

Progress = Callable[[Iterator, int], Iterator]  # (finished futures, their count) -> the same, shown


@dataclass
class PhaseClock:
    """The driver's wall time per phase, in the order the phases ended."""

    start: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    def mark(self, phase: str) -> None:
        """``phase`` ends now: it took the time since the previous phase ended."""
        self.seconds[phase] = self.elapsed - sum(self.seconds.values())

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class Driver:
    """One command's build of the store ``out`` on ``cluster``."""

    out: Path
    cluster: AnySpec | Client | None
    clock: PhaseClock

    @classmethod
    def start(cls, out: Path, inputs: Iterable[tuple[str, Path | str | None]],
              scheduler: str | AnySpec | Client | None, clock: PhaseClock | None = None) -> Driver:
        """Check ``out`` against the command's ``inputs`` ((role, path) pairs) and parse
        ``scheduler``; one line and no work when either is wrong."""
        check_output_path(out, inputs)
        return cls(out, load_cluster_spec(scheduler), clock or PhaseClock())

    @property
    def staging(self) -> Path:
        return staging_path(self.out)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the output's lock (its folder made first)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(self.out):
            yield

    @contextmanager
    def session(self, **connect_options) -> Iterator[Client]:
        """A client of the cluster (started here, or reached); the ``cluster`` phase ends once
        it is there."""
        with connect(self.cluster, **connect_options) as client:
            self.clock.mark("cluster")
            yield client

    def publish(self, *, versioned: bool = False) -> None:
        """Put the finished staged store at the output path (replacing one that the caller
        checked is ours), without what writers killed mid-file left in it; ``versioned`` as
        :func:`~msmtu_batch.runtime.outputs.replace_store`."""
        remove_stray_temporaries(self.staging)
        consolidate(self.staging)
        replace_store(self.staging, self.out, versioned=versioned)


def follow(futures: Iterable, total: int, progress: Progress | None, client: Client | None = None
           ) -> Iterator[object]:
    """The tasks' results as they finish (``futures``: a list, or an iterator of finished ones),
    through ``progress``. A task's failure the user can cause -- a raised
    :class:`MsmtuError`, or a returned ``{"error": line}`` -- stops it: the other tasks are
    cancelled (with ``client``) and the line raised. Results are fetched one at a time (small
    dicts), so nothing is in flight when a failure stops the loop, and closing the cluster
    then logs no broken transfers over the line."""
    pending = list(futures) if isinstance(futures, list | tuple) else None
    finished = as_completed(pending) if pending is not None else futures
    for future in (progress(finished, total) if progress else finished):
        result = future.result()
        if isinstance(result, dict) and "error" in result:
            if client is not None and pending is not None:
                client.cancel(pending)
            raise MsmtuError(result["error"])
        yield result
