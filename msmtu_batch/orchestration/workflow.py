"""``msmtu-batch workflow FILE.yaml``: the yearly production, declared in one file.

For every year of the definition: ingest (granules, DEM, climate -> input cube), run (cube +
model -> output cube) and export (COGs). Like ``make``, a stage runs only when its output is
out of date, but "out of date" is decided by content, not time stamps: the sources' BLAKE3
digests (remembered by stat in ``.msmtu-digests.json``, so unchanged granules are not read
again), the model's hash, the settings and the software version. A rerun with nothing new computes
nothing and starts no cluster; a changed granule reruns its year; a new model recomputes
every year into its own version folder and keeps the previous one.

Layout under ``output``::

    cubes/<year>.zarr                      input cube of the year (independent of the model)
    <model-id>/<year>/abundance.zarr       output cube (model-id = model file stem + hash): a link to
                                           .abundance.zarr.versions/<n>.zarr, replaced atomically
    <model-id>/<year>/cog/*.tif            COGs (+ QGIS styles), with export.json saying what they were made from
    <model-id>/collection.json             STAC Collection of the version; an Item per year in <year>/
    latest -> <model-id>                   moved atomically once every year of the definition is done
    records/<time>-<host>-<pid>.json       the record of each workflow run
    .msmtu-digests.json                    source-file digests by stat

Years run concurrently (``concurrent_years``) on one cluster, started only when some stage
has work. A year that fails is reported with its reason; the others still finish.
"""

from __future__ import annotations

import datetime as dt
import getpass
import glob
import json
import os
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from msmtu_batch.model.artifact import artifact_hash
from msmtu_batch.orchestration.ingest import IngestConfig, cube_status, ingest, planned_sources
from msmtu_batch.orchestration.pipeline import RunConfig, output_status, run
from msmtu_batch.products.blocks import software_versions
from msmtu_batch.products.catalog import write_catalog
from msmtu_batch.products.export import export_cogs
from msmtu_batch.runtime.clusters import AnySpec, LocalSpec, cluster_spec_from, connect, load_cluster_spec
from msmtu_batch.runtime.digests import DigestCache
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.outputs import replace_link, write_text_durably
from msmtu_batch.runtime.provenance import __version__
from msmtu_batch.runtime.reporting import Reporter
from msmtu_batch.runtime.stores import read_manifest

EXIT_OK, EXIT_BAD_DEFINITION, EXIT_YEARS_FAILED = 0, 2, 3
EXPORT_RECORD = "export.json"
GLOB_CHARACTERS = set("*?[")
UP_TO_DATE = {"ingest": "same source files (by BLAKE3 digest), settings and software version",
              "run": "same input cube content, model, settings and software version",
              "export": "COGs of the output as it is, by this software version"}


class WorkflowDefinition(BaseModel):
    """The ``workflow`` section of a definition file (see ``workflows/andalusia.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    years: list[int] = Field(min_length=1, description="years to produce")
    output: Path = Field(description="output root (cubes, model versions, records)")
    model: Path = Field(description="model artifact (.safetensors)")
    cluster: str | dict[str, Any] | None = Field(None, description="cluster spec: a YAML file or the mapping; "
                                                 "default a LocalCluster")
    concurrent_years: int = Field(2, ge=1, description="years in progress at once on the cluster")
    ingest: dict[str, Any] = Field(description="ingest settings (the keys of `msmtu-batch ingest`); "
                                   "'{year}' and '{previous_year}' in strings are replaced")
    year_overrides: dict[int, dict[str, Any]] = Field(default_factory=dict, description="per year: ingest "
                                                      "settings that replace the template's")
    run: RunConfig = Field(default_factory=RunConfig)
    cog: bool = Field(True, description="export COGs of every output")


def load_workflow(path: Path, years: list[int] | None = None) -> WorkflowDefinition:
    """Read and check a definition (every year's ingest settings included, and that ``years``
    are among its years); one line if wrong."""
    if not path.is_file():
        raise MsmtuError(f"{path}: workflow definition not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MsmtuError(f"{path}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    values = loaded.get("workflow", loaded) if isinstance(loaded, dict) else None
    if not isinstance(values, dict):
        raise MsmtuError(f"{path}: expected a mapping with a 'workflow' section")
    try:
        definition = WorkflowDefinition(**values)
        if years:
            unknown = sorted(set(years) - set(definition.years))
            if unknown:
                raise MsmtuError(f"{path}: --years {', '.join(map(str, unknown))} not among the definition's years "
                                 f"({', '.join(map(str, definition.years))})")
        for year in definition.years:
            year_ingest_config(definition, year, expand=False)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'workflow'}: {e['msg']}" for e in exc.errors())
        raise MsmtuError(f"{path}: invalid workflow definition: {problems}") from None
    cluster_spec(definition, path)
    return definition


def cluster_spec(definition: WorkflowDefinition, path: Path) -> AnySpec:
    if definition.cluster is None:
        return LocalSpec()
    if isinstance(definition.cluster, dict):
        return cluster_spec_from(definition.cluster, f"{path}: cluster")
    return load_cluster_spec(definition.cluster)


def _substitute(value: Any, year: int) -> Any:
    if isinstance(value, str):
        return value.replace("{year}", str(year)).replace("{previous_year}", str(year - 1))
    if isinstance(value, list):
        return [_substitute(v, year) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, year) for k, v in value.items()}
    return value


def year_ingest_config(definition: WorkflowDefinition, year: int, expand: bool = True) -> IngestConfig:
    """The ingest settings of ``year``: the template with ``{year}`` replaced, the year's
    overrides applied, and input patterns expanded (``expand``; none may match nothing)."""
    values = _substitute(definition.ingest | definition.year_overrides.get(year, {}), year)
    if expand:
        inputs = []
        for item in values.get("inputs", []):
            if GLOB_CHARACTERS & set(str(item)):
                matches = sorted(glob.glob(str(item)))
                if not matches:
                    raise MsmtuError(f"year {year}: inputs pattern {item} matches no file")
                inputs += matches
            else:
                inputs.append(item)
        values["inputs"] = inputs
    return IngestConfig(**values | {"year": year})


@dataclass
class Stage:
    stage: Literal["ingest", "run", "export"]
    status: Literal["ran", "up to date", "would run", "failed"]
    reason: str
    output: str
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass
class YearPaths:
    cube: Path
    out: Path
    cog: Path


class _Cluster:
    """The one cluster of a workflow run, started by the first stage that has work.

    Years run in threads, but the cluster is started (and stopped) by the main thread: some
    cluster code installs signal handlers, which only the main thread may do. A year's thread
    asks for it (:meth:`get`) and waits; the main thread serves the request while it waits
    for the years (:meth:`serve_until`)."""

    def __init__(self, spec: AnySpec, reporter: Reporter) -> None:
        self.spec, self.reporter = spec, reporter
        self._wanted, self._ready = threading.Event(), threading.Event()
        self._stack = ExitStack()
        self.client = None
        self._error: BaseException | None = None

    def get(self):
        self._wanted.set()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.client

    def serve_until(self, futures) -> None:
        pending = set(futures)
        while pending:
            if self._wanted.is_set() and not self._ready.is_set():
                self.reporter.say(f"starting the {self.spec.cluster} cluster")
                try:
                    self.client = self._stack.enter_context(connect(self.spec))
                except BaseException as exc:  # every year that needs the cluster fails with this
                    self._error = exc
                self._ready.set()
            pending = wait(pending, timeout=0.2)[1]

    @property
    def started(self) -> bool:
        return self.client is not None

    def close(self) -> None:
        self._stack.close()


def export_status(out: Path, cog: Path) -> str | None:
    """None when ``cog`` holds the COGs of ``out`` as it is now, else why not."""
    try:
        record = json.loads((cog / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return "no COGs yet"
    manifest = read_manifest(out) or {}
    if record.get("run_id") != manifest.get("run_id") or record.get("software_version") != __version__:
        return "the output changed since the COGs were written"
    if not all((cog / name).is_file() for name in record.get("files", [])):
        return "a COG is missing"
    return None


class Workflow:
    """One workflow run: plan and process the years, write the record."""

    def __init__(self, path: Path, definition: WorkflowDefinition, reporter: Reporter, dry_run: bool = False,
                 years: list[int] | None = None):
        self.path, self.definition, self.reporter, self.dry_run = path, definition, reporter, dry_run
        self.years = [y for y in definition.years if not years or y in years]
        self.root = definition.output.resolve()
        if not definition.model.is_file():
            raise MsmtuError(f"{path}: model {definition.model} not found")
        self.model_hash = artifact_hash(definition.model)
        self.model_id = f"{definition.model.stem}-{self.model_hash.removeprefix('sha256:')[:12]}"
        self.digests = DigestCache(None if dry_run else self.root / ".msmtu-digests.json")
        self.cluster = _Cluster(cluster_spec(definition, path), reporter)

    def paths(self, year: int) -> YearPaths:
        version = self.root / self.model_id / str(year)
        return YearPaths(self.root / "cubes" / f"{year}.zarr", version / "abundance.zarr", version / "cog")

    def process_year(self, year: int) -> dict:
        """Ingest, run and export one year (or, dry, say what would run and why)."""
        paths, stages, inputs = self.paths(year), [], []
        say = self.reporter.say
        current = "ingest"
        try:
            config = year_ingest_config(self.definition, year)
            planned = planned_sources(config, self.digests)
            inputs = planned["files"]
            why = cube_status(paths.cube, planned)
            stages.append(self._stage(year, "ingest", why, str(paths.cube), lambda: self._ingest(year, config, paths)))

            current = "run"
            rebuilt = stages[-1].status in ("ran", "would run")
            why = "its input cube is rebuilt" if rebuilt else output_status(
                paths.cube, self.model_hash, paths.out, self.definition.run)
            stages.append(self._stage(year, "run", why, str(paths.out), lambda: self._run(year, paths)))

            if self.definition.cog:
                current = "export"
                recomputed = stages[-1].status in ("ran", "would run")
                why = "its output is recomputed" if recomputed else export_status(paths.out, paths.cog)
                stages.append(self._stage(year, "export", why, str(paths.cog), lambda: self._export(year, paths)))
        except (MsmtuError, OSError) as exc:
            reason = str(exc) if isinstance(exc, MsmtuError) else f"{exc.filename or ''}: {exc.strerror or exc}"
            stages.append(Stage(current, "failed", reason, ""))
            say(f"{year}: {current} failed: {reason}")
        except Exception as exc:  # a bug, not bad input: the year fails with it, the others go on
            reason = f"{type(exc).__name__}: {exc}"
            stages.append(Stage(current, "failed", reason, "", details={"traceback": traceback.format_exc()}))
            say(f"{year}: {current} failed: {reason}")
        failed = any(s.status == "failed" for s in stages)
        status = "failed" if failed else ("up to date" if all(s.status == "up to date" for s in stages) else
                                          "would run" if self.dry_run else "done")
        return {"status": status, "stages": [asdict(s) for s in stages], "inputs": inputs,
                "cube": str(paths.cube), "output": str(paths.out)}

    def _stage(self, year: int, name: str, why: str | None, output: str, work) -> Stage:
        if why is None:
            self.reporter.say(f"{year}: {name} up to date ({output})")
            return Stage(name, "up to date", UP_TO_DATE[name], output)
        if self.dry_run:
            self.reporter.say(f"{year}: {name} would run: {why}")
            return Stage(name, "would run", why, output)
        self.reporter.say(f"{year}: {name} runs: {why}")
        start = time.perf_counter()
        details = work()
        stage = Stage(name, "ran", why, output, time.perf_counter() - start, details)
        rate = f", {details['pixels_per_second']:,.0f} pixels/s" if details.get("pixels_per_second") else ""
        warning = f"; WARNING: {details['warning']}" if details.get("warning") else ""
        self.reporter.say(f"{year}: {name} done in {stage.seconds:.1f} s{rate}{warning}")
        return stage

    def _ingest(self, year: int, config: IngestConfig, paths: YearPaths) -> dict:
        summary = ingest(config, paths.cube, model=self.definition.model, scheduler=self.cluster.get(),
                         overwrite=True, progress=self.reporter.progress(f"{year} ingest"), file_digest=self.digests)
        pixels = summary.height * summary.width
        return {"pixels": pixels, "pixels_per_second": pixels / summary.seconds if summary.seconds else None,
                "chunks": summary.chunks, "observations": summary.observations,
                "worker_peak_mib": max(summary.worker_peak_mib.values(), default=None)}

    def _run(self, year: int, paths: YearPaths) -> dict:
        summary = run(paths.cube, self.definition.model, paths.out, config=self.definition.run,
                      scheduler=self.cluster.get(), overwrite=True, progress=self.reporter.progress(f"{year} run"),
                      versioned=True)
        return {"pixels": summary.pixels, "valid_pixels": summary.valid_pixels,
                "pixels_per_second": summary.pixels_per_second, "chunks": summary.chunks,
                "computed_chunks": summary.computed_chunks, "flagged_pixels": summary.flagged_pixels,
                "flagged_chunks": summary.flagged_chunks,
                "worker_peak_mib": max(summary.worker_peak_mib.values(), default=None)} | (
                    {"warning": summary.flagged_line} if summary.flagged_pixels else {})

    def _export(self, year: int, paths: YearPaths) -> dict:
        files = export_cogs(paths.out, paths.cog)
        record = {"run_id": (read_manifest(paths.out) or {}).get("run_id"), "software_version": __version__,
                  "files": [f.name for f in files]}
        write_text_durably(paths.cog / EXPORT_RECORD, json.dumps(record, indent=2))
        return {"files": record["files"]}

    def execute(self) -> tuple[int, dict]:
        """Process every year; returns the exit status and the run record."""
        started = dt.datetime.now(dt.UTC)
        clock = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=self.definition.concurrent_years,
                                    thread_name_prefix="msmtu-year") as pool:
                futures = [pool.submit(self.process_year, year) for year in self.years]
                self.cluster.serve_until(futures)
                results = {year: future.result() for year, future in zip(self.years, futures)}
        finally:
            started_cluster = self.cluster.started
            self.cluster.close()
        failed = sorted(year for year, r in results.items() if r["status"] == "failed")
        latest = catalog = None
        if not failed and not self.dry_run and self._version_complete():
            latest = self._point_latest()
        if not self.dry_run and any(r["status"] != "failed" for r in results.values()):
            catalog = str(write_catalog(self.root / self.model_id, f"msmtu-{self.model_id}"))  # STAC of the version
        self.digests.save()
        record = {
            "workflow": str(self.path.resolve()), "dry_run": self.dry_run,
            "definition": self.definition.model_dump(mode="json"),
            "started": started.isoformat(), "ended": dt.datetime.now(dt.UTC).isoformat(),
            "seconds": time.perf_counter() - clock, "host": socket.gethostname(), "user": getpass.getuser(),
            "pid": os.getpid(), "command": sys.argv, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "software": software_versions(), "model": {"path": str(self.definition.model.resolve()),
                                                        "hash": self.model_hash, "id": self.model_id},
            "cluster": {"spec": self.cluster.spec.model_dump(mode="json"), "started": started_cluster},
            "source_files_hashed": self.digests.hashed, "latest": latest, "catalog": catalog,
            "years": {str(year): results[year] for year in self.years},
            "failed_years": failed, "exit_status": EXIT_YEARS_FAILED if failed else EXIT_OK,
        }
        if not self.dry_run:
            name = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{socket.gethostname()}-{os.getpid()}.json"
            record["record"] = str(self.root / "records" / name)
            (self.root / "records").mkdir(parents=True, exist_ok=True)
            write_text_durably(Path(record["record"]), json.dumps(record, indent=2, default=str))
        return record["exit_status"], record

    def _version_complete(self) -> bool:
        """Whether this model's version holds a complete output of every year of the
        definition (not only of the years this run was asked for)."""
        return all((read_manifest(self.paths(year).out) or {}).get("complete") for year in self.definition.years)

    def _point_latest(self) -> str:
        """Point ``latest`` at this model's version, atomically (a symlink renamed over the old)."""
        link = self.root / "latest"
        if link.is_symlink() and os.readlink(link) == self.model_id:
            return self.model_id
        if link.exists() and not link.is_symlink():
            raise MsmtuError(f"{link} exists and is not a symbolic link; move it away")
        replace_link(link, self.model_id)
        return self.model_id


def run_workflow(path: Path, reporter: Reporter, years: list[int] | None = None, dry_run: bool = False
                 ) -> tuple[int, dict]:
    """Load ``path`` and run it; returns the exit status (0 all done, 3 some years failed) and
    the record. A bad definition raises :class:`MsmtuError` (exit status 2 on the command line)."""
    definition = load_workflow(path, years)
    return Workflow(path, definition, reporter, dry_run, years).execute()
