"""Distributed batch unmixing: input cube + model artifact -> output cube (Zarr), resumable.

The driver plans spatial chunks (all months and bands each) and submits one task per chunk
that is not done yet. A task reads its window straight from the input store, prepares it
with the Numba kernel, runs BRITS (the artifact is loaded once per worker process), writes
its chunk-aligned region of the output store and then drops a marker. The output is built
at a hidden ``.NAME.partial`` sibling and renamed to ``NAME`` only when every chunk has its
marker, so nothing incomplete ever sits at the final path; rerunning the same command
after a crash computes only the missing chunks, and since each chunk's computation is the
same, the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import torch
import xarray as xr
import zarr
from dask.utils import format_bytes
from distributed import Client, default_client, get_worker
from distributed import performance_report as dask_performance_report
from threadpoolctl import ThreadpoolController

from msmtu_batch.inputs.cube import (
    chunk_problem,
    cube_encoding,
    cube_sensor,
    for_zarr_format,
    open_input_cube,
    project_store,
    read_windows,
    spatial_arrays,
    validate_input_cube,
    window_chunks,
    write_window,
)
from msmtu_batch.model.artifact import ModelArtifact, artifact_hash, load_artifact
from msmtu_batch.model.preprocess import ModelInputs, compute_deltas
from msmtu_batch.orchestration.driver import Driver, Progress, follow
from msmtu_batch.products.blocks import (
    FLAG_TOO_FEW_OBSERVATIONS,
    FLAG_UNLIKE_TRAINING,
    RunConfig,
    estimate_block,
    output_fills,
    output_template,
    prepare_block,
    provenance_attrs,
)
from msmtu_batch.products.export import export_cogs
from msmtu_batch.runtime.clusters import AnySpec, has_gpu_workers, threads_per_task
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.outputs import (
    check_output_path,
    check_replaceable,
    fsync_path,
    staging_path,
    take_back,
    write_text_durably,
)
from msmtu_batch.runtime.provenance import __version__
from msmtu_batch.runtime.stores import (
    DONE_GROUP,
    MANIFEST_ATTR,
    changed_input_files,
    input_content_digest,
    input_file_stats,
    read_manifest,
    write_manifest,
)
from msmtu_batch.runtime.tiling import (
    ChunkWindow,
    bound_heap_growth,
    chunk_windows,
    largest_chunk_within,
    peak_memory_mib,
    release_free_memory,
    task_memory_bytes,
)


@dataclass(frozen=True)
class RunSpec:
    """What every task needs: small and picklable (paths, not data or models)."""

    cube: str
    model: str
    model_hash: str
    store: str
    ancillary: tuple[str, ...]
    has_qa: bool
    config: RunConfig
    threads: int = 1
    ancillary_conversions: tuple[tuple[float, float], ...] = ()  # cube units -> the model's (scale, offset)


@dataclass
class RunSummary:
    out: Path
    pixels: int
    valid_pixels: int
    chunks: int
    computed_chunks: int
    seconds: float
    already_complete: bool = False
    workers: dict[str, int] = field(default_factory=dict)  # worker -> model loads in its process
    worker_peak_mib: dict[str, float] = field(default_factory=dict)  # worker -> its process's peak RSS
    prepared_by: dict[str, int] = field(default_factory=dict)  # worker -> chunks it read and prepared
    # seconds the chunk tasks spent per stage (read, prepare, model, write), summed over tasks
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # the driver's wall time per phase: plan, cluster (start or connect), chunks, finish, export
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # pixels mapped from inputs unlike the training data (quality_flag 2, --out-of-distribution
    # flag), and the chunks holding them: a map that is all flagged must not read as a success
    flagged_pixels: int = 0
    flagged_chunks: int = 0

    @property
    def flagged_line(self) -> str:
        """What a summary says of the flagged pixels ('' when there are none)."""
        if not self.flagged_pixels:
            return ""
        return (f"{self.flagged_pixels:,} pixels in {self.flagged_chunks} of {self.chunks} chunks mapped from "
                "inputs unlike the training data (quality_flag 2)")

    @property
    def pixels_per_second(self) -> float:
        return self.pixels / self.seconds if self.seconds > 0 else float("inf")


# --- worker side --------------------------------------------------------------------------

_WORKER_STATE: dict = {"models": {}, "inputs": {}, "model_loads": 0}
_WORKER_STATE_LOCK = threading.Lock()  # the tasks of a process's worker threads share its state


def worker_model(spec: RunSpec) -> ModelArtifact:
    """The artifact, loaded once per worker process (and per model hash)."""
    key = (spec.model, spec.model_hash)
    with _WORKER_STATE_LOCK:
        if key not in _WORKER_STATE["models"]:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            _WORKER_STATE["models"][key] = load_artifact(spec.model, device=device)
            _WORKER_STATE["model_loads"] += 1
        return _WORKER_STATE["models"][key]


def _input_group(path: str) -> zarr.Group:
    with _WORKER_STATE_LOCK:
        if path not in _WORKER_STATE["inputs"]:
            # the metadata as stored, not a consolidated copy that an edit of the store may have left stale
            _WORKER_STATE["inputs"][path] = zarr.open_group(path, mode="r", use_consolidated=False)
        return _WORKER_STATE["inputs"][path]


def model_loads() -> int:
    """How many times this process loaded an artifact (for tests and diagnostics)."""
    return _WORKER_STATE["model_loads"]


def _marker(store: str | Path, window: ChunkWindow) -> Path:
    """The file whose presence says a chunk is done: its marker group's attributes (Zarr v3's
    ``zarr.json``, or v2's ``.zattrs``, written after ``.zgroup``)."""
    folder = Path(store) / DONE_GROUP / window.name
    return folder / ("zarr.json" if (Path(store) / "zarr.json").exists() else ".zattrs")


def chunk_stats(store: str | Path, window: ChunkWindow) -> dict | None:
    """The stats of a finished chunk, or None if it is not (completely) written."""
    marker = _marker(store, window)
    try:
        stored = json.loads(marker.read_text())
        return stored["attributes"] if marker.name == "zarr.json" else dict(stored)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _flush_chunk(store: str | Path, arrays: Iterable[zarr.Array], window: ChunkWindow) -> None:
    """Force the chunk's files in ``arrays`` (and the folders naming them) to disk, so that
    after a power cut its marker never survives its data."""
    folders = set()
    for array in arrays:
        for coords in window_chunks(array, slice(window.y0, window.y1), slice(window.x0, window.x1)):
            path = Path(store) / array.path / array.metadata.encode_chunk_key(coords)
            fsync_path(path)
            folders.add(path.parent)
    for folder in folders:
        fsync_path(folder)


def _mark_done(store: str | Path, window: ChunkWindow, stats: dict) -> None:
    """Write the chunk's marker group atomically and durably, after its data."""
    marker = _marker(store, window)
    marker.parent.mkdir(exist_ok=True)
    if marker.name == "zarr.json":
        write_text_durably(marker, json.dumps({"zarr_format": 3, "node_type": "group", "attributes": stats}))
    else:
        write_text_durably(marker.with_name(".zgroup"), json.dumps({"zarr_format": 2}))
        write_text_durably(marker, json.dumps(stats))


def _where() -> dict:
    """Which worker ran a task, how often its process has loaded a model, and its peak memory."""
    try:
        address = get_worker().address
    except ValueError:
        address = "local"
    return {"worker": address, "model_loads": model_loads(), "peak_mib": peak_memory_mib()}


@dataclass
class PreparedChunk:
    """A chunk ready for the model, as sent from a CPU worker to a GPU worker: the
    standardised values and the masks (uint8; the deltas follow from them), the standardised
    ancillary values and each pixel's count of usable values."""

    values: np.ndarray  # (n, T, F) float32, 0 at gaps
    masks: np.ndarray  # (n, T, F) uint8
    ancillary: np.ndarray  # (n, A) float32
    observed: np.ndarray  # (n,) int32
    prepared_by: str
    unlike_training: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)  # reading and preparing it

    def inputs(self) -> ModelInputs:
        masks = self.masks.astype(np.float32)
        return ModelInputs(self.values, masks, compute_deltas(masks), compute_deltas(masks[:, ::-1]), self.ancillary)


def _use_threads(spec: RunSpec) -> None:
    """A task's threads for torch, Numba and NumPy's BLAS (its share of the worker's cores).
    BLAS too: its idle threads spin after each product (the chunk checks' column sums) and
    took a core from the other task's model (benchmarks/NOTES.md, 2026-12-03). In threads of
    the run's own process the driver has set BLAS's count already (see :func:`run`), and
    this call leaves it so. And the worker's large arrays mapped apart (:func:`bound_heap_growth`)."""
    bound_heap_growth()
    torch.set_num_threads(spec.threads)
    numba.set_num_threads(min(spec.threads, numba.config.NUMBA_NUM_THREADS))
    _blas_threads().limit(limits=spec.threads, user_api="blas")


@functools.cache
def _blas_threads() -> ThreadpoolController:
    return ThreadpoolController()  # finds the BLAS libraries loaded: once per process


class StageClock:
    """Seconds one task spends per stage (``with clock("read"): ...``); the driver sums them
    over the run (:attr:`RunSummary.stage_seconds`), so the next bottleneck is visible."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _read_and_prepare(spec: RunSpec, window: ChunkWindow, artifact: ModelArtifact, clock: StageClock
                      ) -> tuple[ModelInputs, np.ndarray, bool]:
    """Read a chunk's window from the input store and prepare it (:func:`prepare_block`)."""
    group = _input_group(spec.cube)
    ys, xs = slice(window.y0, window.y1), slice(window.x0, window.x1)
    names = ["reflectance", *(["state_qa"] if spec.has_qa else []), *spec.ancillary]
    with clock("read"):
        values = read_windows(spec.cube, group, names, ys, xs)
    with clock("prepare"):
        return prepare_block(values["reflectance"], values.get("state_qa"), [values[name] for name in spec.ancillary],
                             artifact, spec.config, source=spec.cube,
                             label=window.label, y0=window.y0, x0=window.x0,
                             conversions=spec.ancillary_conversions)


def _estimate_and_write(spec: RunSpec, window: ChunkWindow, artifact: ModelArtifact, inputs: ModelInputs,
                        observed: np.ndarray, unlike: bool, clock: StageClock) -> dict:
    """Run the model on a prepared chunk (:func:`estimate_block`), write its region of the
    output, then its marker."""
    shape = (window.y1 - window.y0, window.x1 - window.x0)
    with clock("model"):
        products = estimate_block(inputs, observed, artifact, spec.config, shape, unlike)
    with clock("write"):
        # the output's metadata read once a task, for the writes and the flush (not across tasks:
        # a store replaced between runs would be written through its predecessor's metadata)
        written = write_window(spec.store, products, slice(window.y0, window.y1), slice(window.x0, window.x1))
        valid = products["quality_flag"] != FLAG_TOO_FEW_OBSERVATIONS
        stats = {"pixels": shape[0] * shape[1], "valid_pixels": int(valid.sum()),
                 "flagged_pixels": int((products["quality_flag"] == FLAG_UNLIKE_TRAINING).sum())}
        _flush_chunk(spec.store, written, window)
        _mark_done(spec.store, window, stats)
    return stats


def _user_failure(spec: RunSpec, window: ChunkWindow, exc: Exception) -> dict:
    """What a task returns for a failure the user can cause (bad input, full or read-only
    disk): one line for the driver to print. Returned rather than raised, so Dask neither
    retries it nor buries it under its own logs."""
    message = str(exc) if isinstance(exc, MsmtuError) else \
        f"{spec.store}: cannot write chunk {window.label} ({type(exc).__name__}: {exc})"
    return {"error": message}


def process_chunk(spec: RunSpec, window: ChunkWindow) -> dict:
    """Compute and write one chunk of the output in one task (clusters without GPUs);
    idempotent (a done chunk is skipped).

    Returns the chunk's stats plus where it ran (the marker keeps only the stats, so the
    store's bytes do not depend on the cluster), or ``{"error": line}``.
    """
    if (done := chunk_stats(spec.store, window)) is not None:
        return done | _where()
    _use_threads(spec)
    clock = StageClock()
    try:
        artifact = worker_model(spec)
        inputs, observed, unlike = _read_and_prepare(spec, window, artifact, clock)
        stats = _estimate_and_write(spec, window, artifact, inputs, observed, unlike, clock)
    except (MsmtuError, OSError) as exc:
        return _user_failure(spec, window, exc)
    where = _where()  # after the work, so the peak memory includes this chunk's
    return stats | where | {"prepared_by": where["worker"], "stage_seconds": clock.seconds}


def prepare_task(spec: RunSpec, window: ChunkWindow) -> PreparedChunk | dict | None:
    """First stage on GPU clusters, on any worker's CPU: read, check and prepare a chunk
    (None when it is done already; ``{"error": line}`` for bad input)."""
    if chunk_stats(spec.store, window) is not None:
        return None
    _use_threads(spec)
    clock = StageClock()
    try:
        inputs, observed, unlike = _read_and_prepare(spec, window, worker_model(spec), clock)
    except (MsmtuError, OSError) as exc:
        return _user_failure(spec, window, exc)
    return PreparedChunk(inputs.values, inputs.masks.astype(np.uint8), inputs.ancillary, observed,
                         _where()["worker"], unlike, clock.seconds)


def estimate_task(spec: RunSpec, window: ChunkWindow, prepared: PreparedChunk | dict | None) -> dict:
    """Second stage on GPU clusters, on a worker holding ``GPU=1``: the model and the writes."""
    if isinstance(prepared, dict):  # the preparation's failure, passed on
        return prepared
    if (done := chunk_stats(spec.store, window)) is not None or prepared is None:
        return (done or {}) | _where()
    _use_threads(spec)
    clock = StageClock(prepared.stage_seconds)
    try:
        stats = _estimate_and_write(spec, window, worker_model(spec), prepared.inputs(), prepared.observed,
                                    prepared.unlike_training, clock)
    except (MsmtuError, OSError) as exc:
        return _user_failure(spec, window, exc)
    return stats | _where() | {"prepared_by": prepared.prepared_by, "stage_seconds": clock.seconds}


# --- driver side --------------------------------------------------------------------------

# What makes two runs the same: the content of the input and the model, the settings, the
# software. The input's path is recorded, not compared.
IDENTITY_KEYS = ("input_content", "model_hash", "settings", "software_version")


def _identity(cube: Path, model_hash: str, config: RunConfig) -> dict:
    return {"input": str(cube.resolve()), "input_content": input_content_digest(cube), "model_hash": model_hash,
            "settings": config.model_dump(), "software_version": __version__}


def _same_run(manifest: dict | None, identity: dict) -> bool:
    return manifest is not None and all(manifest.get(k) == identity[k] for k in IDENTITY_KEYS)


def damaged_chunks(store: Path, windows: list[ChunkWindow]) -> list[ChunkWindow]:
    """The chunks of ``windows`` whose data in ``store`` is absent or does not decode
    (checksums): what a marker cannot vouch for after a power cut or a damaged disk."""
    group = zarr.open_group(store, mode="r")
    return [w for w in windows if any(
        chunk_problem(store, group, name, slice(w.y0, w.y1), slice(w.x0, w.x1)) for name in spatial_arrays(group))]


def output_status(cube: Path, model_hash: str, out: Path, config: RunConfig) -> str | None:
    """None when ``out`` is a complete output of exactly this input content, model, settings
    and software version (by its manifest; chunks are not re-read), else why it is not."""
    if not out.exists():
        staging = staging_path(out)
        return "an interrupted run to resume" if staging.exists() else "no output yet"
    manifest = read_manifest(out)
    if manifest is None or not manifest.get("complete"):
        return "the existing output is not a complete msmtu-batch output"
    identity = _identity(cube, model_hash, config)
    for key, change in (("software_version", "software version"), ("model_hash", "model"),
                        ("settings", "run settings"), ("input_content", "input cube content")):
        if manifest.get(key) != identity[key]:
            return f"{change} changed"
    return None


def _create_store(store: Path, ds: xr.Dataset, artifact: ModelArtifact, identity: dict, run_id: str,
                  config: RunConfig, model_path: Path, command: str) -> None:
    """An empty output store carrying the grid, CRS, encodings and CF attributes
    (:func:`output_template`) and the run's provenance. Its manifest is the first thing
    written, marked ``created: false`` until every array exists: a rerun after a failure
    here (a full disk, a kill) knows the folder as its own and creates it again (as it does
    a store whose chunks were discarded: :func:`_check_input_unchanged`)."""
    manifest = {**identity, "run_id": run_id, "complete": False, "created": False}
    out = output_template(ds, artifact, config)
    out.attrs.update(run_id=run_id, **provenance_attrs(
        model_hash=identity["model_hash"], model=str(model_path), input_store=identity["input"],
        input_content=identity["input_content"], command=command))
    out.attrs[MANIFEST_ATTR] = json.dumps(manifest, sort_keys=True)
    # the input's encodings (another Zarr format's codecs) stay behind
    out = for_zarr_format(project_store(out), config.zarr_format)
    # chunks cut to the region (one of --chunk 100000 was allocated whole, 373 GiB, to write its part)
    encoding = cube_encoding(out, config.chunk, output_fills(out), config.zarr_format)
    try:
        zarr.open_group(store, mode="w", zarr_format=config.zarr_format,
                        attributes={MANIFEST_ATTR: out.attrs[MANIFEST_ATTR]})
        out.to_zarr(store, mode="a", compute=False, encoding=encoding, consolidated=False,
                    zarr_format=config.zarr_format)
        zarr.open_group(store, mode="r+").create_group(DONE_GROUP)
        write_manifest(store, {**manifest, "created": True})
    except OSError as exc:  # zarr's writes of metadata (a full disk, say) name no file: name the store
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(store)) from exc


def _reuse_or_clear(out: Path, staging: Path, identity: dict, windows: list[ChunkWindow], overwrite: bool) -> bool:
    """Decide what existing stores mean for this run: True when ``out`` is a complete, intact
    output of this very run (re-verified, not trusted blindly). Otherwise leave a staging store
    to resume (this run's, or the complete output moved back with its damaged chunks
    unmarked) or none, deleting only stores msmtu-batch wrote and, with work in them, only
    with ``overwrite``."""
    if out.exists():
        manifest = read_manifest(out)
        check_replaceable(out, manifest is not None)
        if _same_run(manifest, identity) and manifest.get("complete") and not overwrite:
            damaged = damaged_chunks(out, windows)
            if not damaged:
                return True
            # recompute only the damaged chunks: back to staging, their markers dropped
            if staging.exists():
                check_replaceable(staging, read_manifest(staging) is not None)
                shutil.rmtree(staging)
            take_back(out, staging)
            write_manifest(staging, {**manifest, "complete": False})
            for window in damaged:
                shutil.rmtree(_marker(staging, window).parent)
        elif not overwrite:
            raise MsmtuError(f"{out} exists and was made from another model, input or settings; "
                             "pass --overwrite to replace it")
    if staging.exists():
        manifest = read_manifest(staging)
        # an empty one is what a disk full before the manifest's first write leaves
        check_replaceable(staging, manifest is not None or not any(staging.iterdir()))
        # created false: a store whose creation did not end, or whose chunks were discarded
        discarded = manifest is not None and not manifest.get("created", True)
        if discarded or not _same_run(manifest, identity):
            finished = not discarded and any(p.is_dir() for p in (staging / DONE_GROUP).glob("*"))
            if finished and not overwrite:  # without a finished chunk there is nothing to lose
                raise MsmtuError(f"{staging} holds an interrupted run of another model, input or settings; "
                                 "pass --overwrite to discard it")
            shutil.rmtree(staging)
    return False


def _check_input_unchanged(cube: Path, before: dict, staging: Path) -> None:
    """Refuse to publish chunks read from an input that changed under the run (some would hold
    the old content, some the new): the staged store, provenance of the old input included, is
    marked as holding nothing to keep (``created: false``; tasks still running may write into
    it), and a rerun maps the input as it is then, without --overwrite."""
    changed = changed_input_files(cube, before)
    if not changed:
        return
    write_manifest(staging, {**(read_manifest(staging) or {}), "created": False})
    raise MsmtuError(f"{cube} changed while this run read it ({len(changed)} files, e.g. {changed[0]}); nothing was "
                     "published and its chunks are discarded: rerun the same command once the input is final")


def _check_task_memory(client: Client, chunk: int, height: int, width: int) -> None:
    """Refuse, before any work, a chunk size whose task would not fit in its share of a
    worker's memory (the worker's limit over the tasks it runs at once): a chunk of 4096 x 4096
    pixels grew to 14 GB with no word, and its worker was killed."""
    rows, columns = min(chunk, height), min(chunk, width)
    need = task_memory_bytes(rows * columns)
    for worker in client.scheduler_info()["workers"].values():
        limit, tasks = worker.get("memory_limit") or 0, max(1, worker.get("nthreads", 1))
        if limit and need > limit / tasks:
            fits = largest_chunk_within(limit / tasks)
            advice = f"use --chunk {fits} or less, or" if fits else "use"
            raise MsmtuError(f"--chunk {chunk}: a task of {rows} x {columns} pixels needs about {format_bytes(need)}, "
                             f"but a worker has {format_bytes(limit)} for {tasks} tasks at once "
                             f"({format_bytes(limit / tasks)} each); {advice} workers with more memory")


def _compute_chunks(client, spec: RunSpec, todo: list[ChunkWindow], run_id: str, progress: Progress | None
                    ) -> tuple[dict[str, int], dict[str, float], dict[str, int], dict[str, float]]:
    """Submit the chunks to the cluster and wait for them; stop at the first failure the user
    can cause, with its line. Returns per worker: model loads, peak memory, chunks prepared;
    and the tasks' seconds per stage."""
    if has_gpu_workers(client):  # prepare on any CPU, estimate on the workers holding GPU=1
        prepared = [client.submit(prepare_task, spec, w, key=f"msmtu-prepare-{run_id}-{w.name}", pure=False,
                                  retries=2) for w in todo]
        futures = [client.submit(estimate_task, spec, w, p, key=f"msmtu-chunk-{run_id}-{w.name}", pure=False,
                                 resources={"GPU": 1}, retries=2) for w, p in zip(todo, prepared)]
        del prepared  # each prepared chunk is freed once its estimate is written
    else:
        futures = [client.submit(process_chunk, spec, w, key=f"msmtu-chunk-{run_id}-{w.name}", pure=False,
                                 retries=2) for w in todo]
    workers: dict[str, int] = {}
    peaks: dict[str, float] = {}
    prepared_by: dict[str, int] = {}
    stage_seconds: dict[str, float] = {}
    for result in follow(futures, len(futures), progress, client):  # bad input or a full disk stops it
        workers[result["worker"]] = max(workers.get(result["worker"], 0), result["model_loads"])
        peaks[result["worker"]] = max(peaks.get(result["worker"], 0.0), result["peak_mib"])
        if "prepared_by" in result:
            prepared_by[result["prepared_by"]] = prepared_by.get(result["prepared_by"], 0) + 1
        for stage, seconds in result.get("stage_seconds", {}).items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
    return workers, peaks, prepared_by, stage_seconds


def run(cube: str | Path, model: str | Path, out: str | Path, *, config: RunConfig | None = None,
        scheduler: str | AnySpec | Client | None = None, overwrite: bool = False, cog_dir: str | Path | None = None,
        performance_report: str | Path | None = None,
        progress: Progress | None = None,
        on_client: Callable[[object], None] | None = None, client: Client | None = None,
        versioned: bool = False, allow_other_sensor: bool = False) -> RunSummary:
    """Unmix ``cube`` with ``model`` into the Zarr store ``out`` (see the module docstring).

    The work runs on ``client``, else on the cluster ``scheduler`` names (an address, a spec
    file or object), else on the current Dask client if there is one (a notebook's), else on
    threads of this process, one per core (a LocalCluster without worker processes).
    ``allow_other_sensor``: map a cube of a sensor other than the model's training data (same
    bands). ``versioned``: publish ``out`` as a link to the version of this run, so that readers of
    the store it replaces read that one to the end (:func:`replace_store`; the workflow's
    archive)."""
    # the link itself, not where it points: a versioned store is replaced through it
    cube, model, out = Path(cube), Path(model), Path(os.path.abspath(out))
    config = config or RunConfig()
    protected = [("input cube", cube), ("model", model)]
    driver = Driver.start(out, protected, client or scheduler or _current_client())
    clock = driver.clock
    if cog_dir is not None:
        check_output_path(Path(cog_dir), protected, option="--cog")
    artifact = load_artifact(model)
    ds = open_input_cube(cube, validate=False)
    artifact.check_sensor(cube_sensor(ds, cube).name, str(cube), allow_other_sensor)  # before its bands or variables
    validate_input_cube(ds, store=cube, ancillary=artifact.ancillary_names, read_values=False)  # tasks check values
    artifact.check_matches([str(b) for b in ds["band"].values], list(ds.data_vars), str(cube))
    conversions = artifact.unit_conversions({n: ds[n].attrs.get("units") for n in artifact.ancillary_names}, str(cube))
    with driver.locked():
        model_hash = artifact_hash(model)
        input_stats = input_file_stats(cube)  # before the digest: a write while it reads shows at the end
        identity = _identity(cube, model_hash, config)
        run_id = "run-" + hashlib.sha256(json.dumps({k: identity[k] for k in IDENTITY_KEYS},
                                                    sort_keys=True).encode()).hexdigest()[:16]
        height, width = ds.sizes["y"], ds.sizes["x"]
        windows = chunk_windows(height, width, config.chunk)

        staging = driver.staging
        if _reuse_or_clear(out, staging, identity, windows, overwrite):
            if cog_dir is not None:
                export_cogs(out, cog_dir)
            manifest = read_manifest(out)
            return RunSummary(out, height * width, int(manifest.get("valid_pixels", 0)), len(windows), 0,
                              clock.elapsed, already_complete=True,
                              flagged_pixels=int(manifest.get("flagged_pixels", 0)),
                              flagged_chunks=int(manifest.get("flagged_chunks", 0)))
        if not staging.exists():
            _create_store(staging, ds, artifact, identity, run_id, config, model,
                          f"msmtu-batch run --cube {cube.resolve()} --model {model.resolve()}")

        # chunks marked done by an earlier, interrupted process: their data must still be there
        # (a power cut can keep a marker and lose data that was not yet on disk)
        for window in damaged_chunks(staging, [w for w in windows if chunk_stats(staging, w) is not None]):
            shutil.rmtree(_marker(staging, window).parent)
        todo = [w for w in windows if chunk_stats(staging, w) is None]
        clock.mark("plan")
        report = dask_performance_report(filename=str(performance_report)) if performance_report else nullcontext()
        # Dask's profiler only where the report shows it: it slows the model's threads
        with driver.session(processes=False, profile=performance_report is not None) as client, report:
            if on_client:
                on_client(client)
            spec = RunSpec(str(cube), str(model), model_hash, str(staging), tuple(artifact.ancillary_names),
                           "state_qa" in ds.data_vars, config, threads_per_task(client), conversions)
            _check_task_memory(client, config.chunk, height, width)
            # BLAS has one thread count per process, and threadpoolctl lets only one thread set it:
            # the driver sets the tasks' share for tasks in threads of this process, and gives the
            # caller (a notebook) its own count back after
            with _blas_threads().limit(limits=spec.threads, user_api="blas"):
                try:
                    workers, peaks, prepared_by, stage_seconds = _compute_chunks(client, spec, todo, run_id, progress)
                except MsmtuError:  # a file read half-written says why in its own words: the input changed
                    _check_input_unchanged(cube, input_stats, staging)
                    raise
            clock.mark("chunks")
        _check_input_unchanged(cube, input_stats, staging)
        stats = {w.name: chunk_stats(staging, w) for w in windows}
        missing = [name for name, s in stats.items() if s is None]
        if missing:
            raise MsmtuError(f"{staging}: chunks {', '.join(missing[:5])} were not written; rerun to resume")
        valid = sum(s["valid_pixels"] for s in stats.values())
        flagged = [s.get("flagged_pixels", 0) for s in stats.values()]
        counts = {"valid_pixels": valid, "flagged_pixels": sum(flagged), "flagged_chunks": sum(n > 0 for n in flagged)}
        write_manifest(staging, {**identity, "run_id": run_id, "complete": True, **counts})
        driver.publish(versioned=versioned)  # the old output (ours, checked above) is superseded
        clock.mark("finish")  # with the cluster's stop
        if cog_dir is not None:
            release_free_memory()  # what the chunks left free, for the export's threads
            export_cogs(out, cog_dir)
            clock.mark("export")
        return RunSummary(out, height * width, valid, len(windows), len(todo), clock.elapsed,
                          workers=workers, worker_peak_mib=peaks, prepared_by=prepared_by,
                          stage_seconds=stage_seconds, phase_seconds=clock.seconds,
                          flagged_pixels=counts["flagged_pixels"], flagged_chunks=counts["flagged_chunks"])


def _current_client() -> Client | None:
    """The Dask client this process is using (a notebook's), if any."""
    try:
        return default_client()
    except ValueError:
        return None

