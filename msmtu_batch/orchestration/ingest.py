"""``msmtu-batch ingest``: satellite granules (MODIS MOD09A1/MYD09A1, VIIRS VNP09A1/VJ109A1:
:mod:`msmtu_batch.inputs.sensors`) or GeoTIFF exports + ancillary rasters -> input cube.

The driver scans the inputs (metadata only), plans the output grid -- the native MODIS
sinusoidal grid or a target CRS and resolution, cut to the region's bounding box -- and
rasterises the region boundary. MOD09A1 granules are first read date by date (one Dask task
per date, top to bottom in full-width strips) into a scratch store beside the output (one
LZ4-compressed file per date and block). MODAPS writes every layer deflate-compressed and
unchunked, and HDF4 can only inflate such a layer from its first row, so a task per chunk
would inflate each layer's top rows once per chunk row, whereas a date read in strips
inflates each layer once. One Dask task per spatial chunk of the cube then reads the window
of every observation that covers the chunk (from the scratch store, or straight from GeoTIFF
exports and VIIRS's chunked HDF5 layers, which are read by window at no such cost), composites the months
(:mod:`msmtu_batch.inputs.composite`) on the source grid, warps them onto the chunk with
rasterio/GDAL when the grid is not the native one, blanks pixels outside the region, adds
the ancillary variables (:mod:`msmtu_batch.inputs.ancillary`) and writes its chunk of the
Zarr store. The tasks live in :mod:`msmtu_batch.inputs.ingest_tasks`, which workers import
without xarray, pandas or dask.array. A task's memory follows the chunk size (about 46 dates
x 9 layers x chunk^2 x 2 bytes), never the region size; a date task holds one strip (9
layers x chunk rows x region width x 2 bytes). The scratch store holds the region's window
of every date (about 4x the cube's reflectance, compressed) and is removed at the end.

The cube is built at a hidden ``.NAME.partial`` sibling whose ``ingest_status`` attribute
says ``incomplete`` (such a store fails cube validation), marked complete and renamed to
``NAME`` only when every chunk is written; an interrupted ingest is started over.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from affine import Affine
from distributed import Client, as_completed
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import geometry_mask
from rasterio.warp import transform_bounds
from rasterio.windows import from_bounds

from msmtu_batch.inputs.ancillary import AncillarySources
from msmtu_batch.inputs.composite import CompositeRule
from msmtu_batch.inputs.cube import (
    ALL_CHUNKS_ATTR,
    ANCILLARY_UNITS,
    INGEST_STATUS_ATTR,
    N_MONTHS,
    cube_encoding,
    for_zarr_format,
    open_input_cube,
    project_store,
)
from msmtu_batch.inputs.ingest_tasks import (
    SOURCE_MARGIN,
    IngestSpec,
    ScratchStore,
    TargetGrid,
    ingest_chunk,
    stage_date,
)
from msmtu_batch.inputs.layers import COUNT_VARIABLE
from msmtu_batch.inputs.modis import (
    COMPOSITE_DAYS,
    ReflectanceSource,
    SourceGrid,
    open_reflectance,
)
from msmtu_batch.inputs.sensors import SENSOR_ATTR, SENSORS, sensor_named
from msmtu_batch.orchestration.driver import Driver, Progress, follow
from msmtu_batch.runtime.clusters import AnySpec, connect, load_cluster_spec, threads_per_task
from msmtu_batch.runtime.digests import file_blake3, lower_thread_priority
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.outputs import check_replaceable
from msmtu_batch.runtime.provenance import __version__
from msmtu_batch.runtime.tiling import chunk_windows, covering_window


class IngestConfig(BaseModel):
    """What to ingest and how; the ``ingest`` section of a workflow YAML has these keys."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Path] = Field(default_factory=list, description="granules, GeoTIFF exports or folders of them")
    manifest: Path | None = Field(None, description="CSV path,date of GeoTIFF exports")
    sensor: Literal[tuple(SENSORS)] | None = Field(  # type: ignore[valid-type]
        None, description="the sensor the granules must be of: MOD09A1 (Terra), MYD09A1 (Aqua) or MOD09A1+MYD09A1 "
        "(both, composited together); default: the one that reads the granules given")
    year: int | None = Field(None, ge=2000, le=2100, description="default: the year most composites start in")
    region: Path | None = Field(None, description="boundary (GeoJSON, GeoPackage...); outside is fill")
    crs: str | None = Field(None, description="target CRS (e.g. EPSG:25830); default: native sinusoidal")
    resolution: float | None = Field(None, gt=0, description="target pixel size in CRS units (with crs)")
    resampling: Literal["nearest", "average", "bilinear", "cubic"] = "nearest"
    composite: CompositeRule = CompositeRule.median
    dem: Path | None = None
    climate: dict[str, Path] = Field(default_factory=dict, description="climatic variable -> raster")
    climate_units: dict[str, str] = Field(default_factory=dict, description="climatic variable -> units of its "
                                          "raster (e.g. 'mm month-1', 'K'); converted to the cube's")
    chunk: int = Field(256, ge=8, le=4096, description="spatial chunk of the cube and of the tasks")
    band_quality: bool = Field(False, description="also reject a band's value that sur_refl_qc_500m flags as not "
                               "of the highest quality (MOD09A1 granules)")
    zarr_format: Literal[2, 3] = Field(3, description="Zarr format of the cube: 3, or 2 for zarr-python 2 and "
                                       "GDAL before 3.8")
    read_order: Literal["auto", "by-date", "by-chunk"] = Field(
        "auto", description="by-date: read each date's region once, top to bottom, into a scratch store beside "
        "the output, then composite by chunk (the fast order for deflate-compressed granules); by-chunk: each "
        "chunk task reads its window of every date (no scratch disk); auto: by-date for MOD09A1 granules, "
        "by-chunk for GeoTIFF exports")

    @model_validator(mode="after")
    def _crs_with_resolution(self) -> IngestConfig:
        if (self.crs is None) != (self.resolution is None):
            raise ValueError("crs and resolution go together (e.g. crs EPSG:25830, resolution 460)")
        return self

    def ancillary_sources(self) -> AncillarySources:
        return AncillarySources(str(self.dem) if self.dem else None, {k: str(v) for k, v in self.climate.items()},
                                dict(self.climate_units))


@dataclass
class IngestSummary:
    out: Path
    height: int
    width: int
    observations: int
    observed_pixels: int
    chunks: int
    seconds: float
    ancillary: tuple[str, ...]
    worker_peak_mib: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # plan, cluster, dates, chunks, finish


def _read_region(path: Path) -> object:
    import geopandas as gpd

    try:
        region = gpd.read_file(path)
    except Exception as exc:
        raise MsmtuError(f"{path}: not a readable vector file ({type(exc).__name__}: {exc})") from None
    if region.crs is None:
        raise MsmtuError(f"{path}: boundary has no CRS; expected a georeferenced vector file")
    if region.empty or region.geometry.is_empty.all():
        raise MsmtuError(f"{path}: boundary holds no geometry")
    return region


def _no_overlap(region: Path, bounds: tuple, data: tuple, crs: CRS) -> MsmtuError:
    fmt = lambda b: "(" + ", ".join(f"{v:.0f}" for v in b) + ")"  # noqa: E731
    return MsmtuError(f"{region}: boundary does not intersect the reflectance data (boundary bounds "
                      f"{fmt(bounds)}, data bounds {fmt(data)} in {crs.to_string() or 'the source CRS'})")


def plan_grid(source: SourceGrid, config: IngestConfig, region=None) -> TargetGrid:
    """The cube's grid: native (a window of the source grid) or a target CRS and resolution,
    aligned on multiples of the resolution; cut to the region's bounding box."""
    if config.crs is None:
        if region is None:
            return TargetGrid(source.crs, source.transform, source.width, source.height, (0, 0))
        bounds = tuple(region.to_crs(source.crs).total_bounds)
        area = from_bounds(*bounds, transform=source.transform)
        row0, col0 = max(math.floor(area.row_off), 0), max(math.floor(area.col_off), 0)
        row1 = min(math.ceil(area.row_off + area.height), source.height)
        col1 = min(math.ceil(area.col_off + area.width), source.width)
        if row1 <= row0 or col1 <= col0:
            raise _no_overlap(config.region, bounds, source.bounds, source.crs)
        return TargetGrid(source.crs, source.transform * Affine.translation(col0, row0), col1 - col0,
                          row1 - row0, (row0, col0))
    try:
        crs = CRS.from_user_input(config.crs)
    except Exception as exc:
        raise MsmtuError(f"target CRS {config.crs!r} is not a CRS ({exc})") from None
    data = transform_bounds(source.crs, crs, *source.bounds, densify_pts=21)
    if region is not None:
        bounds = tuple(region.to_crs(crs).total_bounds)
        left, bottom = max(bounds[0], data[0]), max(bounds[1], data[1])
        right, top = min(bounds[2], data[2]), min(bounds[3], data[3])
        if right <= left or top <= bottom:
            raise _no_overlap(config.region, bounds, data, crs)
    else:
        left, bottom, right, top = data
    res = float(config.resolution)
    left, bottom = math.floor(left / res) * res, math.floor(bottom / res) * res
    right, top = math.ceil(right / res) * res, math.ceil(top / res) * res
    return TargetGrid(crs, Affine(res, 0, left, 0, -res, top), round((right - left) / res),
                      round((top - bottom) / res), None)


def _composite_end(observation) -> dt.date:
    return observation.start + dt.timedelta(days=COMPOSITE_DAYS - 1)


def source_of_year(source: ReflectanceSource, year: int | None) -> tuple[ReflectanceSource, int]:
    """The observations that reach into ``year`` and their files; without a year, the year
    most composites start in, where every observation reaches into it."""
    def reaches(observation, y: int) -> bool:
        return observation.start <= dt.date(y, 12, 31) and _composite_end(observation) >= dt.date(y, 1, 1)

    if year is None:
        year = int(pd.Series([o.start.year for o in source.observations]).mode().max())
        for observation in source.observations:
            if not reaches(observation, year):
                first, last = source.observations[0].start.year, source.observations[-1].start.year
                raise MsmtuError(f"{observation.label}: the composite of {observation.start} is outside {year}; the "
                                 f"inputs span {first}-{last}: set the year (repeat --year for several years)")
        return source, year
    observations = tuple(o for o in source.observations if reaches(o, year))
    if not observations:
        raise MsmtuError(f"no composite of the inputs reaches into {year} (they span "
                         f"{source.observations[0].start} to {_composite_end(source.observations[-1])})")
    used = {path for o in observations for path in o.files}
    return replace(source, observations=observations, files=tuple(f for f in source.files if f in used)), year


def _scratch_store(path: Path, source: ReflectanceSource, grid: TargetGrid, chunk: int) -> ScratchStore | None:
    """Where the date tasks stage the source pixels the cube needs: the cube's window of the
    source grid, or, warped, the source window covering the whole grid with a wider margin
    than any chunk's (so each chunk's window lies inside it)."""
    if grid.native_offset is not None:
        row0, col0 = grid.native_offset
        return ScratchStore(str(path), row0, col0, grid.height, grid.width, chunk, len(source.observations))
    src = source.grid
    rows = covering_window(grid.crs, grid.transform, grid.height, grid.width, src.crs, src.transform, src.height,
                           src.width, 4 * SOURCE_MARGIN)
    if rows is None:
        return None
    row0, row1, col0, col1 = rows
    return ScratchStore(str(path), row0, col0, row1 - row0, col1 - col0, chunk, len(source.observations))


def _create_store(store: Path, grid: TargetGrid, year: int, names: tuple[str, ...], chunk: int,
                  attrs: dict, source_units: dict[str, str], zarr_format: int = 3) -> None:
    sensor = sensor_named(attrs[SENSOR_ATTR])
    height, width = grid.height, grid.width
    cols, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
    ds = xr.Dataset(coords={
        "time": pd.date_range(f"{year}-01-01", periods=N_MONTHS, freq="MS"),
        "band": np.array(sensor.bands, dtype=object),
        "y": (grid.transform * (np.zeros(height), rows))[1], "x": (grid.transform * (cols, np.zeros(width)))[0]})

    def lazy(shape: tuple[int, ...], dtype: type, fill: float) -> da.Array:
        return da.full(shape, fill, dtype=dtype, chunks=(*shape[:-2], chunk, chunk))

    ds["reflectance"] = (("time", "band", "y", "x"),
                         lazy((N_MONTHS, len(sensor.bands), height, width), np.int16, sensor.fill))
    ds["reflectance"].attrs.update(long_name=f"monthly composite of {sensor.name} surface reflectance", units="1",
                                   scale_factor=sensor.scale, valid_range=list(sensor.valid_range))
    ds[COUNT_VARIABLE] = (("time", "y", "x"), lazy((N_MONTHS, height, width), np.uint8, 0))
    ds[COUNT_VARIABLE].attrs.update(long_name="clear observations composited into the month", units="1")
    for name in names:
        ds[name] = (("y", "x"), lazy((height, width), np.float32, np.nan))
        ds[name].attrs.update(units=ANCILLARY_UNITS[name])
        if name in source_units:
            ds[name].attrs.update(source_units=source_units[name])
    ds = ds.rio.write_crs(grid.crs).rio.write_transform(grid.transform)
    ds = for_zarr_format(project_store(ds.assign_attrs(attrs)), zarr_format)
    ds.to_zarr(store, mode="w", compute=False, encoding=cube_encoding(ds, chunk, zarr_format=zarr_format),
               consolidated=False, zarr_format=zarr_format)


def _check_model_needs(model: Path, available: tuple[str, ...]) -> None:
    from msmtu_batch.model.artifact import load_artifact

    missing = [n for n in load_artifact(model).ancillary_names if n not in available]
    if missing:
        hints = {"altitude": "--dem", "slope": "--dem"}
        how = ", ".join(sorted({hints.get(n, f"--climate {n}=RASTER") for n in missing}))
        raise MsmtuError(f"{model}: the model needs ancillary variable(s) {', '.join(missing)} that the "
                         f"given sources do not provide (add {how})")


def _source_record(config: IngestConfig, source: ReflectanceSource,
                   file_digest: Callable[[Path], str] = file_blake3) -> dict:
    """What the cube is made from: every source file's path, size, modification time and
    BLAKE3 digest, and a content id over those digests and the settings, so that a cube re-ingested
    from changed sources never passes for the old one."""
    files = [*source.files, *(str(p) for p in (config.dem, config.region, config.manifest, *config.climate.values())
                             if p is not None)]
    paths = list(map(Path, files))
    # one thread per core (BLAKE3 lets go of the GIL): 92 granules of a year, 1.9 GiB, 0.8-2.3 s of
    # one core; at the lowest priority, as it runs beside the ingest's workers
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), initializer=lower_thread_priority) as pool:
        digests = list(pool.map(file_digest, paths))
    record = []
    for path, digest in zip(paths, digests, strict=True):
        stat = path.stat()
        record.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake3": digest})
    settings = config.model_dump_json(exclude={"inputs", "manifest", "region", "dem", "climate", "read_order"})
    content = hashlib.sha256(json.dumps([[r["blake3"] for r in record], settings]).encode()).hexdigest()
    return {"files": record, "content_id": f"sha256:{content}"}


def planned_sources(config: IngestConfig, file_digest: Callable[[Path], str] = file_blake3) -> dict:
    """The sources an ingest of ``config`` would read, with digests, and the content id of the
    cube it would make (granule metadata and file bytes are read; nothing is written)."""
    return _source_record(config, open_reflectance(config.inputs, config.manifest, config.sensor), file_digest)


def cube_status(out: Path, planned: dict) -> str | None:
    """None when the cube at ``out`` was made from exactly the ``planned`` sources and settings
    by this software version (its content id), else why it is not."""
    if not out.exists():
        return "no cube yet"
    try:
        attrs = dict(zarr.open_group(out, mode="r").attrs)
    except Exception:
        return "the existing cube is unreadable"
    if attrs.get(INGEST_STATUS_ATTR) != "complete":
        return "the existing cube is incomplete"
    if attrs.get("software_version") != __version__:
        return f"software version changed ({attrs.get('software_version')} -> {__version__})"
    if attrs.get("content_id") == planned["content_id"]:
        return None
    try:
        before = {r["path"]: r.get("blake3") for r in json.loads(attrs.get("source_files_record", "[]"))}
    except (ValueError, TypeError, KeyError):
        before = {}
    now = {r["path"]: r["blake3"] for r in planned["files"]}
    changed = sorted(p for p in before.keys() | now.keys() if before.get(p) != now.get(p))
    if not changed:
        return "ingest settings changed"
    return (f"{len(changed)} source file(s) changed, added or removed (first: {Path(changed[0]).name})")


def _record_attrs(record: dict) -> dict[str, str]:
    return {"source_files_record": json.dumps(record["files"]), "content_id": record["content_id"]}


def _written_by_us(store: Path) -> bool:
    try:
        attrs = zarr.open_group(store, mode="r").attrs
    except Exception:
        return False
    return bool(attrs.get(ALL_CHUNKS_ATTR)) or "msmtu-batch" in str(attrs.get("title", ""))


def ingest(config: IngestConfig, out: str | Path, *, model: str | Path | None = None,
           scheduler: str | AnySpec | Client | None = None, overwrite: bool = False,
           progress: Progress | None = None,
           file_digest: Callable[[Path], str] = file_blake3) -> IngestSummary:
    """Build the input cube ``out`` (see the module docstring). ``file_digest`` gives a source
    file's digest (a :class:`~msmtu_batch.runtime.digests.DigestCache` skips files read before)."""
    out = Path(out).resolve()
    driver = Driver.start(out, [*(("input", path) for path in config.inputs), ("manifest", config.manifest),
                                ("region", config.region), ("DEM", config.dem), ("model", model),
                                *((f"{name} raster", path) for name, path in config.climate.items())], scheduler)
    clock = driver.clock
    if out.exists():
        if not overwrite:
            raise MsmtuError(f"{out} exists; pass --overwrite to replace it")
        check_replaceable(out, _written_by_us(out), "msmtu-batch cube")
    with driver.locked():
        source = open_reflectance(config.inputs, config.manifest, config.sensor)
        if config.band_quality and (source.kind == "GeoTIFF" or source.sensor.band_quality_layer is None):
            raise MsmtuError(f"band_quality needs the sur_refl_qc_500m layer of MODIS granules; {source.kind} "
                             "inputs do not carry it")
        if config.read_order == "by-date" and source.kind == "GeoTIFF":
            raise MsmtuError("read_order by-date is for MOD09A1 granules (unchunked deflate layers); GeoTIFF exports "
                             "are read by chunk (read_order auto or by-chunk)")
        source, year = source_of_year(source, config.year)
        sources = config.ancillary_sources().check()
        names = sources.names()
        if model is not None:
            _check_model_needs(Path(model), names)
        region = _read_region(config.region) if config.region else None
        grid = plan_grid(source.grid, config, region)
        inside = None
        if region is not None:
            # rasterio hides this warning of its in-memory raster in a catch_warnings block, which is
            # not thread-safe: a workflow ingesting years in threads let it through (2 of 3 CI runs on
            # 2026-12-07); a filter for the process, for warnings of rasterio.features only, as consolidate()
            warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module=r"rasterio\.features")
            inside = geometry_mask(region.to_crs(grid.crs).geometry, (grid.height, grid.width), grid.transform,
                                   invert=True)
            if not inside.any():
                raise MsmtuError(f"{config.region}: boundary covers no pixel centre of the {grid.width} x "
                                 f"{grid.height} grid")

        staging = driver.staging
        if staging.exists():
            shutil.rmtree(staging)  # an interrupted ingest: start over
        attrs = {
            "title": "MODIS monthly surface reflectance cube (msmtu-batch ingest)",
            "Conventions": "CF-1.8", "software_version": __version__, "year": year,
            SENSOR_ATTR: source.sensor.name, "platform": " and ".join(source.sensor.platforms),
            "source_kind": source.kind, "source_files": len(source.files),
            "observations": len(source.observations), "composite_rule": str(config.composite),
            "qa_rejected": "StateQA cloud state 01 (cloudy) or 10 (mixed), bit 2 cloud shadow, bit 12 MOD35 "
                           "snow/ice, bit 15 internal snow; any band outside -100..16000"
                           + ("; any band whose sur_refl_qc_500m quality is not 0000 (highest), or MODLAND QA "
                              "10/11 (not produced)" if config.band_quality else ""),
            "resampling": "none (native grid)" if grid.native_offset is not None else config.resampling,
            "region": str(config.region) if config.region else "none",
            "ancillary_variables": ", ".join(names), INGEST_STATUS_ATTR: "incomplete",
        }
        _create_store(staging, grid, year, names, config.chunk, attrs, sources.climate_units, config.zarr_format)
        scratch_path = out.with_name(f".{out.name}.scratch")
        shutil.rmtree(scratch_path, ignore_errors=True)  # left by an interrupted ingest
        # auto: by date where layers are unchunked deflate (MODAPS's HDF4), by chunk where windows read cheaply
        by_date = config.read_order == "by-date" or (config.read_order == "auto" and source.kind.endswith("HDF4"))
        spec = IngestSpec(source, grid, year, config.composite, config.resampling, sources, str(staging),
                          config.band_quality, _scratch_store(scratch_path, source, grid, config.chunk) if by_date
                          else None)
        windows = chunk_windows(grid.height, grid.width, config.chunk)
        peaks: dict[str, float] = {}
        observed = 0
        task_prefix = uuid.uuid4().hex[:12]  # several ingests (years) may share one cluster
        clock.mark("plan")
        # the sources' digests are only written at the end: hashing runs while the cluster starts
        # and the dates are read
        hasher = ThreadPoolExecutor(max_workers=1)
        record = hasher.submit(_source_record, config, source, file_digest)
        try:
            with driver.session() as client:
                spec = replace(spec, threads=threads_per_task(client))
                dates = []
                if spec.scratch is not None:
                    spec.scratch.create()
                    dates = [client.submit(stage_date, spec, i, key=f"msmtu-ingest-{task_prefix}-date-{i}",
                                           pure=False, retries=1) for i in range(len(source.observations))]

                def finished() -> Iterator:  # the dates, then the chunks: one progress bar over both
                    yield from as_completed(dates)
                    clock.mark("dates")
                    chunks = [client.submit(ingest_chunk, spec, w,
                                            None if inside is None else inside[w.y0:w.y1, w.x0:w.x1],
                                            key=f"msmtu-ingest-{task_prefix}-{w.name}", pure=False, retries=1)
                              for w in windows]
                    yield from as_completed(chunks)
                    clock.mark("chunks")

                for result in follow(finished(), len(dates) + len(windows), progress):
                    observed += result["observed"]
                    peaks[result["worker"]] = max(peaks.get(result["worker"], 0.0), result["peak_mib"])
            record_attrs = _record_attrs(record.result())
        finally:
            hasher.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(scratch_path, ignore_errors=True)
        zarr.open_group(staging, mode="r+").attrs.update({**record_attrs, INGEST_STATUS_ATTR: "complete"})
        open_input_cube(staging, ancillary=names, read_values=False)  # the contract, before it is published
        driver.publish()
        clock.mark("finish")
        return IngestSummary(out, grid.height, grid.width, len(source.observations), observed, len(windows),
                             clock.elapsed, names, peaks, clock.seconds)


def ingest_years(config: IngestConfig, years: Sequence[int], out: str | Path, *, model: str | Path | None = None,
                 scheduler: str | AnySpec | Client | None = None, overwrite: bool = False,
                 progress: Callable[[int], Callable[[Iterator, int], Iterator] | None] | None = None,
                 file_digest: Callable[[Path], str] = file_blake3) -> list[IngestSummary]:
    """One cube per year of ``years`` from the same inputs (each year takes the composites that
    reach into it), all years at once on one cluster: ``out`` names the cubes with ``{year}``
    (``cubes/{year}.zarr``). ``progress(year)`` gives a year's progress callback. The first
    year that fails raises once every year has ended; the others' cubes are complete."""
    years = sorted(set(years))
    if len(years) > 1 and "{year}" not in str(out):
        raise MsmtuError(f"--out {out}: several years need {{year}} in the output path (e.g. cubes/{{year}}.zarr)")
    outs = {year: Path(str(out).replace("{year}", str(year))) for year in years}
    cluster = load_cluster_spec(scheduler)  # a wrong spec stops before any work
    # the cluster starts in this thread (some cluster code installs signal handlers); the years
    # run in threads of their own, their tasks side by side on it
    with connect(cluster) as client, ThreadPoolExecutor(max_workers=len(years)) as pool:
        futures = [pool.submit(ingest, config.model_copy(update={"year": year}), outs[year], model=model,
                               scheduler=client, overwrite=overwrite, progress=progress(year) if progress else None,
                               file_digest=file_digest) for year in years]
        wait(futures)
    return [future.result() for future in futures]
