"""``msmtu-batch ingest``: MOD09A1 granules or GeoTIFF exports + ancillary rasters -> input cube.

The driver scans the inputs (metadata only), plans the output grid -- the native MODIS
sinusoidal grid or a target CRS and resolution, cut to the region's bounding box -- and
rasterises the region boundary. One Dask task per spatial chunk of the cube then reads the
window of every observation that covers the chunk, composites the months
(:mod:`msmtu_batch.inputs.composite`) on the source grid, warps them onto the chunk with
rasterio/GDAL when the grid is not the native one, blanks pixels outside the region, adds
the ancillary variables (:mod:`msmtu_batch.inputs.ancillary`) and writes its chunk of the Zarr
store. A task's memory follows the chunk size (about 46 dates x 9 layers x chunk^2 x 2
bytes), never the region size.

The cube is built at a hidden ``.NAME.partial`` sibling whose ``ingest_status`` attribute
says ``incomplete`` (such a store fails cube validation), marked complete and renamed to
``NAME`` only when every chunk is written; an interrupted ingest is started over.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from affine import Affine
from distributed import Client, as_completed, get_worker
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import geometry_mask
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import from_bounds

from msmtu_batch import __version__
from msmtu_batch.batch.clusters import AnySpec, connect, load_cluster_spec
from msmtu_batch.batch.digests import file_sha256
from msmtu_batch.batch.outputs import check_output_path, check_replaceable, output_lock, replace_store
from msmtu_batch.batch.tiling import ChunkWindow, chunk_windows, covering_window, peak_memory_mib
from msmtu_batch.errors import MsmtuError
from msmtu_batch.inputs.ancillary import AncillarySources, chunk_ancillary, source_of
from msmtu_batch.inputs.composite import CompositeRule, composite_months
from msmtu_batch.inputs.cube import (
    ALL_CHUNKS_ATTR,
    ANCILLARY_UNITS,
    BAND_NAMES,
    INGEST_STATUS_ATTR,
    N_MONTHS,
    REFLECTANCE_FILL,
    REFLECTANCE_SCALE,
    REFLECTANCE_VALID_RANGE,
    band_quality_rejected,
    consolidate,
    cube_encoding,
    for_zarr_format,
    open_input_cube,
    project_store,
    write_window,
)
from msmtu_batch.inputs.modis import COMPOSITE_DAYS, ReflectanceSource, SourceGrid, open_reflectance

COUNT_VARIABLE = "clear_count"
SOURCE_MARGIN = 2  # source pixels read around a chunk before warping it


class IngestConfig(BaseModel):
    """What to ingest and how; the ``ingest`` section of a workflow YAML has these keys."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Path] = Field(default_factory=list, description="granules, GeoTIFF exports or folders of them")
    manifest: Path | None = Field(None, description="CSV path,date of GeoTIFF exports")
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

    @model_validator(mode="after")
    def _crs_with_resolution(self) -> IngestConfig:
        if (self.crs is None) != (self.resolution is None):
            raise ValueError("crs and resolution go together (e.g. crs EPSG:25830, resolution 460)")
        return self

    def ancillary_sources(self) -> AncillarySources:
        return AncillarySources(str(self.dem) if self.dem else None, {k: str(v) for k, v in self.climate.items()},
                                dict(self.climate_units))


@dataclass(frozen=True)
class TargetGrid:
    crs: CRS
    transform: Affine
    width: int
    height: int
    native_offset: tuple[int, int] | None  # (row, column) in the source grid when not warped

    def chunk_transform(self, window: ChunkWindow) -> Affine:
        return self.transform * Affine.translation(window.x0, window.y0)


@dataclass(frozen=True)
class IngestSpec:
    """What every chunk task needs (picklable: paths and metadata, no data)."""

    source: ReflectanceSource
    grid: TargetGrid
    year: int
    composite: CompositeRule
    resampling: str
    ancillary: AncillarySources
    store: str
    band_quality: bool = False


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


# --- worker side --------------------------------------------------------------------------

def read_observations(source: ReflectanceSource, row0: int, row1: int, col0: int, col1: int,
                      band_quality: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Every observation's window of the source grid: reflectance (D, 7, h, w), StateQA
    (D, h, w) or None, and day of year (D, h, w) (the file's date where there is no such layer).
    With ``band_quality``, a band's value that ``sur_refl_qc_500m`` flags as not of the highest
    quality is read as fill (:func:`band_quality_rejected`)."""
    n, height, width = len(source.observations), row1 - row0, col1 - col0
    reflectance = np.empty((n, len(BAND_NAMES), height, width), np.int16)
    state_qa = np.zeros((n, height, width), np.uint16)  # no QA layer: every observation passes
    doy = np.empty((n, height, width), np.int16)
    any_qa = False
    for i, observation in enumerate(source.observations):
        window = observation.read(row0, row1, col0, col1, band_quality)
        reflectance[i] = window.reflectance
        if band_quality:
            reflectance[i][band_quality_rejected(window.band_quality)] = REFLECTANCE_FILL
        if window.state_qa is not None:
            state_qa[i], any_qa = window.state_qa, True
        doy[i] = window.day_of_year if window.day_of_year is not None \
            else observation.start.timetuple().tm_yday
    return reflectance, (state_qa if any_qa else None), doy


def _composite_window(spec: IngestSpec, row0: int, row1: int, col0: int, col1: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    reflectance, state_qa, doy = read_observations(spec.source, row0, row1, col0, col1, spec.band_quality)
    return composite_months(reflectance, state_qa, doy, [o.start for o in spec.source.observations],
                            spec.year, spec.composite)


def _warped_composite(spec: IngestSpec, window: ChunkWindow) -> tuple[np.ndarray, np.ndarray]:
    """Composite on the source pixels under the chunk, then warp onto the chunk (GDAL)."""
    grid, src = spec.grid, spec.source.grid
    height, width = window.y1 - window.y0, window.x1 - window.x0
    transform = grid.chunk_transform(window)
    composite = np.full((N_MONTHS, len(BAND_NAMES), height, width), REFLECTANCE_FILL, np.int16)
    counts = np.zeros((N_MONTHS, height, width), np.uint8)
    rows = covering_window(grid.crs, transform, height, width, src.crs, src.transform, src.height, src.width,
                           SOURCE_MARGIN)
    if rows is None:
        return composite, counts
    row0, row1, col0, col1 = rows
    monthly, clear = _composite_window(spec, row0, row1, col0, col1)
    src_transform = src.transform * Affine.translation(col0, row0)
    common = dict(src_transform=src_transform, src_crs=src.crs, dst_transform=transform, dst_crs=grid.crs,
                  tolerance=0)
    planes = composite.reshape(-1, height, width)
    reproject(monthly.reshape(-1, *monthly.shape[2:]), planes, src_nodata=REFLECTANCE_FILL,
              dst_nodata=REFLECTANCE_FILL, resampling=Resampling[spec.resampling], **common)
    reproject(clear, counts, resampling=Resampling.nearest, **common)
    return composite, counts


def ingest_chunk(spec: IngestSpec, window: ChunkWindow, inside: np.ndarray | None) -> dict:
    """Composite, warp, clip, add ancillary data to and write one chunk of the cube."""
    if spec.grid.native_offset is not None:
        row_off, col_off = spec.grid.native_offset
        composite, counts = _composite_window(spec, row_off + window.y0, row_off + window.y1,
                                              col_off + window.x0, col_off + window.x1)
    else:
        composite, counts = _warped_composite(spec, window)
    if inside is not None:
        composite[:, :, ~inside] = REFLECTANCE_FILL
        counts[:, ~inside] = 0
    height, width = counts.shape[1:]
    ancillary = chunk_ancillary(spec.ancillary, spec.grid.crs, spec.grid.chunk_transform(window), height, width)
    observed = (composite != REFLECTANCE_FILL).any(axis=(0, 1))
    for name, values in ancillary.items():
        if inside is not None:
            values[~inside] = np.nan
        bad = observed & ~np.isfinite(values)
        if bad.any():
            raise MsmtuError(f"{source_of(spec.ancillary, name)}: no {name} value for {int(bad.sum())} pixel(s) "
                             f"with observed reflectance in chunk {window.label} of the cube; does the raster "
                             "cover the region, and is its nodata value right?")
    write_window(spec.store, {"reflectance": composite, COUNT_VARIABLE: counts, **ancillary},
                 slice(window.y0, window.y1), slice(window.x0, window.x1))
    try:
        worker = get_worker().address
    except ValueError:
        worker = "local"
    return {"observed": int(observed.sum()), "worker": worker, "peak_mib": peak_memory_mib()}


# --- driver side --------------------------------------------------------------------------

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


def _infer_year(source: ReflectanceSource) -> int:
    years = pd.Series([o.start.year for o in source.observations])
    return int(years.mode().max())


def _check_year(source: ReflectanceSource, year: int) -> None:
    first, last = dt.date(year, 1, 1), dt.date(year, 12, 31)
    for observation in source.observations:
        end = observation.start + dt.timedelta(days=COMPOSITE_DAYS - 1)
        if end < first or observation.start > last:
            raise MsmtuError(f"{observation.label}: the composite of {observation.start} is outside {year}; "
                             f"give the inputs of one year (or set the year)")


def _create_store(store: Path, grid: TargetGrid, year: int, names: tuple[str, ...], chunk: int,
                  attrs: dict, source_units: dict[str, str], zarr_format: int = 3) -> None:
    height, width = grid.height, grid.width
    cols, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
    ds = xr.Dataset(coords={
        "time": pd.date_range(f"{year}-01-01", periods=N_MONTHS, freq="MS"),
        "band": np.array(BAND_NAMES, dtype=object),
        "y": (grid.transform * (np.zeros(height), rows))[1], "x": (grid.transform * (cols, np.zeros(width)))[0]})

    def lazy(shape: tuple[int, ...], dtype: type, fill: float) -> da.Array:
        return da.full(shape, fill, dtype=dtype, chunks=(*shape[:-2], chunk, chunk))

    ds["reflectance"] = (("time", "band", "y", "x"),
                         lazy((N_MONTHS, len(BAND_NAMES), height, width), np.int16, REFLECTANCE_FILL))
    ds["reflectance"].attrs.update(long_name="monthly composite of MOD09A1 surface reflectance", units="1",
                                   scale_factor=REFLECTANCE_SCALE, valid_range=list(REFLECTANCE_VALID_RANGE))
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
                   file_digest: Callable[[Path], str] = file_sha256) -> dict:
    """What the cube is made from: every source file's path, size, modification time and
    sha256, and a content id over those digests and the settings, so that a cube re-ingested
    from changed sources never passes for the old one."""
    files = [*source.files, *(str(p) for p in (config.dem, config.region, config.manifest, *config.climate.values())
                             if p is not None)]
    record = []
    for path in map(Path, files):
        stat = path.stat()
        record.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "sha256": file_digest(path)})
    settings = config.model_dump_json(exclude={"inputs", "manifest", "region", "dem", "climate"})
    content = hashlib.sha256(json.dumps([[r["sha256"] for r in record], settings]).encode()).hexdigest()
    return {"files": record, "content_id": f"sha256:{content}"}


def planned_sources(config: IngestConfig, file_digest: Callable[[Path], str] = file_sha256) -> dict:
    """The sources an ingest of ``config`` would read, with digests, and the content id of the
    cube it would make (granule metadata and file bytes are read; nothing is written)."""
    return _source_record(config, open_reflectance(config.inputs, config.manifest), file_digest)


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
        before = {r["path"]: r["sha256"] for r in json.loads(attrs.get("source_files_record", "[]"))}
    except (ValueError, TypeError, KeyError):
        before = {}
    now = {r["path"]: r["sha256"] for r in planned["files"]}
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
           progress: Callable[[Iterator, int], Iterator] | None = None,
           file_digest: Callable[[Path], str] = file_sha256) -> IngestSummary:
    """Build the input cube ``out`` (see the module docstring). ``file_digest`` gives a source
    file's sha256 (a :class:`~msmtu_batch.batch.digests.DigestCache` skips files read before)."""
    start_time = time.perf_counter()
    out = Path(out).resolve()
    check_output_path(out, [*(("input", path) for path in config.inputs), ("manifest", config.manifest),
                            ("region", config.region), ("DEM", config.dem), ("model", model),
                            *((f"{name} raster", path) for name, path in config.climate.items())])
    cluster = load_cluster_spec(scheduler)  # a wrong spec stops before any work
    if out.exists():
        if not overwrite:
            raise MsmtuError(f"{out} exists; pass --overwrite to replace it")
        check_replaceable(out, _written_by_us(out), "msmtu-batch cube")
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        source = open_reflectance(config.inputs, config.manifest)
        if config.band_quality and source.kind == "GeoTIFF":
            raise MsmtuError("band_quality needs the sur_refl_qc_500m layer of MOD09A1 granules; GeoTIFF exports "
                             "do not carry it")
        year = config.year or _infer_year(source)
        _check_year(source, year)
        sources = config.ancillary_sources().check()
        names = sources.names()
        if model is not None:
            _check_model_needs(Path(model), names)
        region = _read_region(config.region) if config.region else None
        grid = plan_grid(source.grid, config, region)
        inside = None
        if region is not None:
            inside = geometry_mask(region.to_crs(grid.crs).geometry, (grid.height, grid.width), grid.transform,
                                   invert=True)
            if not inside.any():
                raise MsmtuError(f"{config.region}: boundary covers no pixel centre of the {grid.width} x "
                                 f"{grid.height} grid")

        staging = out.with_name(f".{out.name}.partial")
        if staging.exists():
            shutil.rmtree(staging)  # an interrupted ingest: start over
        attrs = {
            "title": "MODIS monthly surface reflectance cube (msmtu-batch ingest)",
            "Conventions": "CF-1.8", "software_version": __version__, "year": year,
            "source_kind": source.kind, "source_files": len(source.files),
            "observations": len(source.observations), "composite_rule": str(config.composite),
            "qa_rejected": "StateQA cloud state 01 (cloudy) or 10 (mixed), bit 2 cloud shadow, bit 12 MOD35 "
                           "snow/ice, bit 15 internal snow; any band outside -100..16000"
                           + ("; any band whose sur_refl_qc_500m quality is not 0000 (highest), or MODLAND QA "
                              "10/11 (not produced)" if config.band_quality else ""),
            "resampling": "none (native grid)" if grid.native_offset is not None else config.resampling,
            "region": str(config.region) if config.region else "none",
            "ancillary_variables": ", ".join(names), INGEST_STATUS_ATTR: "incomplete",
            **_record_attrs(_source_record(config, source, file_digest)),
        }
        _create_store(staging, grid, year, names, config.chunk, attrs, sources.climate_units, config.zarr_format)
        spec = IngestSpec(source, grid, year, config.composite, config.resampling, sources, str(staging),
                          config.band_quality)
        windows = chunk_windows(grid.height, grid.width, config.chunk)
        peaks: dict[str, float] = {}
        observed = 0
        task_prefix = uuid.uuid4().hex[:12]  # several ingests (years) may share one cluster
        with connect(cluster) as client:
            futures = [client.submit(ingest_chunk, spec, w,
                                     None if inside is None else inside[w.y0:w.y1, w.x0:w.x1],
                                     key=f"msmtu-ingest-{task_prefix}-{w.name}", pure=False, retries=1)
                       for w in windows]
            finished = as_completed(futures, with_results=True)
            for _future, result in (progress(finished, len(futures)) if progress else finished):
                observed += result["observed"]
                peaks[result["worker"]] = max(peaks.get(result["worker"], 0.0), result["peak_mib"])
        zarr.open_group(staging, mode="r+").attrs[INGEST_STATUS_ATTR] = "complete"
        open_input_cube(staging, ancillary=names, read_values=False)  # the contract, before it is published
        consolidate(staging)
        replace_store(staging, out)
        return IngestSummary(out, grid.height, grid.width, len(source.observations), observed, len(windows),
                             time.perf_counter() - start_time, names, peaks)
