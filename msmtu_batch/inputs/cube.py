"""Input-cube contract (docs/design.md section 4): names, encodings, opening and validation.

Every other module reads input cubes through :func:`open_input_cube`, so the rules below
are the single definition of what a valid cube is.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from numcodecs import Zstd
from zarr.codecs import Crc32cCodec, ZstdCodec

from msmtu_batch.inputs.layers import (  # noqa: F401  (the contract's names, defined there)
    ALL_CHUNKS_ATTR,
    ANCILLARY_NAMES,
    ANCILLARY_SETS,
    ANCILLARY_UNITS,
    BAND_COMMON_NAMES,
    BAND_NAMES,
    CLASS_DIM,
    CLIMATIC_NAMES,
    GEOTOPO_NAMES,
    INGEST_STATUS_ATTR,
    LEGACY_CLASS_DIM,
    N_MONTHS,
    QA_ADJACENT_CLOUD,
    QA_AEROSOL_LOW,
    QA_CLOUD_SHADOW,
    QA_CLOUD_STATE_MASK,
    QA_CLOUDY,
    QA_INTERNAL_CLOUD,
    QA_INTERNAL_SNOW,
    QA_LAND,
    QA_MIXED_CLOUD,
    QA_MOD35_SNOW,
    QA_REJECT_BITS,
    QA_SHALLOW_INLAND_WATER,
    QC_BAND_BITS,
    QC_BAND_SHIFT,
    QC_MODLAND_MASK,
    QC_NOT_PRODUCED,
    REFLECTANCE_FILL,
    REFLECTANCE_SCALE,
    REFLECTANCE_VALID_RANGE,
    band_quality_rejected,
    observed_mask,
    qa_rejected,
    write_window,
    zarr_together,
)
from msmtu_batch.inputs.sensors import SENSOR_ATTR, Sensor, sensor_named
from msmtu_batch.runtime.errors import CubeValidationError, MsmtuError


@contextmanager
def rioxarray_quietly() -> Iterator[None]:
    """rioxarray 0.19 (and rasterio 1.4's warped reads) build transforms with affine's ``*``, which affine 3
    deprecates (PendingDeprecationWarning): not ours to fix, and it must not fail a caller who
    runs with ``-W error`` or pytest's filterwarnings=error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Use `@` matmul", category=PendingDeprecationWarning)
        yield


def grid_transform(ds: xr.Dataset | xr.DataArray):
    """The grid's affine transform (``ds.rio.transform()``, quietly)."""
    with rioxarray_quietly():
        return ds.rio.transform()


def grid_bounds(ds: xr.Dataset | xr.DataArray) -> tuple[float, float, float, float]:
    """The grid's (left, bottom, right, top) (``ds.rio.bounds()``, quietly)."""
    with rioxarray_quietly():
        return ds.rio.bounds()


def open_input_cube(path: str | os.PathLike, *, validate: bool = True,
                    ancillary: Sequence[str] = ANCILLARY_NAMES, read_values: bool = True) -> xr.Dataset:
    """Open an input cube lazily (dask-backed, raw int16 reflectance) and validate it.

    ``read_values=False`` checks the metadata only; the pipeline checks the values chunk by
    chunk in its tasks (:func:`check_ancillary_finite`) instead of reading the cube twice."""
    store = Path(path)
    if not store.exists():
        raise CubeValidationError(f"{store}: input cube not found")
    try:
        ds = xr.open_zarr(store, mask_and_scale=False, decode_coords="all",
                          consolidated=False, chunks={})
    except Exception as exc:
        raise CubeValidationError(f"{store}: {_explain_open_failure(store, exc)}") from exc
    if validate:
        validate_input_cube(ds, store=store, ancillary=ancillary, read_values=read_values)
    return ds


def _explain_open_failure(store: Path, exc: Exception) -> str:
    """Turn xarray's opening error into one line that names the offending variable."""
    for metadata in sorted([*store.glob("*/zarr.json"), *store.glob("*/.zarray"), *store.glob("*/.zattrs")]):
        try:
            json.loads(metadata.read_bytes())
        except (OSError, ValueError) as problem:
            return (f"variable '{metadata.parent.name}': unreadable metadata {metadata} "
                    f"({type(problem).__name__}: {problem})")
    try:
        group = zarr.open_group(store, mode="r", use_consolidated=False)
    except Exception:
        return f"not a readable Zarr store ({type(exc).__name__}: {exc})".replace("\n", " ")
    shapes: dict[str, dict[str, int]] = {}  # dim -> {variable: size}
    for name, array in group.arrays():
        dims = array.metadata.dimension_names if array.metadata.zarr_format == 3 \
            else array.attrs.get("_ARRAY_DIMENSIONS")
        for dim, size in zip(dims or (), array.shape):
            shapes.setdefault(dim, {})[name] = size
    for dim, sizes in shapes.items():
        expected = Counter(sizes.values()).most_common(1)[0][0]
        for name, size in sorted(sizes.items()):
            if size != expected:
                return (f"variable '{name}' has {dim}={size}, expected {dim}={expected} like the "
                        "other variables (all variables must share one grid)")
    return f"cannot be opened as an xarray dataset ({type(exc).__name__}: {exc})".replace("\n", " ")


# zstd's level 1 against its default (3), a 256 x 256 chunk: abundance 2.5 ms against 9.0 for
# 0.5 % more bytes, reflectance 22 ms against 48 for 1.6 % more (benchmarks/NOTES.md, 2026-12-07)
ZSTD_LEVEL = 1


def cube_encoding(ds: xr.Dataset, chunk: int | None = None, fill_values: Mapping[str, int | float] | None = None,
                  zarr_format: int = 3) -> dict[str, dict]:
    """Zarr encoding that stores ``ds`` as the project writes every store: grid mapping on
    every spatial variable; spatial chunks holding all months and bands; the declared fill value
    (``fill_values``: the reflectance fill by default, NaN for floats) also as Zarr's own
    ``fill_value``, so an absent chunk never decodes as valid data; a checksum per chunk, so a
    damaged chunk is detected (v3: zstd then crc32c; v2: zstd with its frame checksum, which
    zarr-python 2 and GDAL decode); and every chunk written, even an empty one."""
    fill_values = {"reflectance": REFLECTANCE_FILL} if fill_values is None else fill_values
    compressors = (ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()) if zarr_format == 3 else \
        (Zstd(level=ZSTD_LEVEL, checksum=True),)
    encoding: dict[str, dict] = {}
    for name, var in ds.data_vars.items():
        if "x" not in var.dims:
            continue
        encoding[name] = {"compressors": compressors, "write_empty_chunks": True}
        if "spatial_ref" in ds.variables:
            encoding[name]["grid_mapping"] = "spatial_ref"
        if chunk is not None:
            encoding[name]["chunks"] = tuple(
                min(chunk, var.sizes[d]) if d in ("y", "x") else var.sizes[d] for d in var.dims)
        # (v2 has one fill value, Zarr's, which xarray also reads as _FillValue)
        fill = fill_values.get(name, np.nan if var.dtype.kind == "f" else None)
        if fill is not None:
            encoding[name]["_FillValue"] = fill
            if zarr_format == 3:
                encoding[name]["fill_value"] = fill
    return encoding


def consolidate(store: str | os.PathLike) -> None:
    """Consolidate a finished store's metadata, so that a plain ``xr.open_zarr`` opens it at once
    and without a warning (zarr-python warns, when writing it, that v3 consolidation is not in
    the v3 specification yet; every reader we know follows zarr-python's convention).

    The filter stays in place for the process, for that one message only: a ``catch_warnings``
    around the call is not thread-safe (Python 3.11's filters are global), and a workflow
    publishes several years from threads at once, where one year's exit from the block dropped
    the filter while another year consolidated (seen once in four CI runs)."""
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)
    zarr.consolidate_metadata(str(store))


def project_store(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` ready for :func:`cube_encoding`: no encodings inherited from the store it was read
    from (another Zarr format's codecs must not leak in) and the all-chunks-written mark."""
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {}
    return ds.assign_attrs({ALL_CHUNKS_ATTR: True})


def for_zarr_format(ds: xr.Dataset, zarr_format: int) -> xr.Dataset:
    """``ds`` as GDAL's Zarr driver (3.6, Debian's) can read it in Zarr v2: string coordinates
    as fixed-width unicode (it cannot read v2's variable-length strings) and the CRS also as
    GDAL's ``_CRS`` attribute (it does not read the CF grid mapping). Unchanged for v3."""
    if zarr_format != 2:
        return ds
    ds = ds.copy()
    for name, coord in ds.coords.items():
        if coord.dtype.kind in "OUT" and coord.ndim == 1:
            ds[name] = coord.astype(str)
    if ds.rio.crs is not None:
        for var in ds.data_vars.values():
            if "x" in var.dims:
                var.attrs["_CRS"] = {"wkt": ds.rio.crs.to_wkt()}
    return ds


def write_input_cube(ds: xr.Dataset, store: str | os.PathLike, chunk: int = 128, zarr_format: int = 3) -> None:
    """Write ``ds`` (raw int16 reflectance with a ``scale_factor`` attribute) as a Zarr cube."""
    # spatial chunks of `chunk` pixels holding every month and band, as the contract asks
    ds = project_store(ds.chunk({dim: (chunk if dim in ("y", "x") else -1) for dim in ds.dims}))
    for var in ds.variables.values():
        var.attrs = {k: v for k, v in var.attrs.items() if k != "_FillValue"}
    ds = for_zarr_format(ds, zarr_format)
    ds.to_zarr(store, mode="w", encoding=cube_encoding(ds, chunk, zarr_format=zarr_format), consolidated=False,
               zarr_format=zarr_format)
    consolidate(store)


def cube_sensor(ds: xr.Dataset, store: Path | str = "<dataset>") -> Sensor:
    """The sensor spec a cube records in its ``sensor`` attribute (none: MOD09A1, the published
    layout); one line naming the store when it names no known sensor."""
    try:
        return sensor_named(ds.attrs.get(SENSOR_ATTR), f"{store}: attribute {SENSOR_ATTR}")
    except MsmtuError as exc:
        raise CubeValidationError(str(exc)) from None


def _expect(condition: bool, store: Path | str, variable: str, expected: str, found: object) -> None:
    if not condition:
        raise CubeValidationError(
            f"{store}: variable '{variable}': expected {expected}, found {found}")


def validate_input_cube(ds: xr.Dataset, *, store: Path | str = "<dataset>",
                        ancillary: Sequence[str] = ANCILLARY_NAMES, read_values: bool = True) -> None:
    """Check ``ds`` against the input-cube contract; raise one clear error on the first breach.

    ``ds`` must be opened with ``mask_and_scale=False`` (as :func:`open_input_cube` does) so
    the stored dtypes and fill values are visible. ``ancillary`` lists the ancillary
    variables required (a model without ancillary data needs none). ``read_values`` also
    reads the data: every chunk must decode and ancillary values must be finite.
    """
    status = ds.attrs.get(INGEST_STATUS_ATTR)
    if status not in (None, "complete"):
        raise CubeValidationError(f"{store}: attribute {INGEST_STATUS_ATTR} is {status!r}: an interrupted "
                                  "ingest, not a complete cube; run msmtu-batch ingest again")
    _expect("reflectance" in ds.data_vars, store, "reflectance", "a data variable",
            "none (data variables: " + ", ".join(sorted(map(str, ds.data_vars))) + ")")
    refl = ds["reflectance"]
    _expect(refl.dims == ("time", "band", "y", "x"), store, "reflectance",
            "dims (time, band, y, x)", "(" + ", ".join(map(str, refl.dims)) + ")")
    _expect(refl.dtype == np.int16, store, "reflectance", "dtype int16", f"dtype {refl.dtype}")
    fill = refl.attrs.get("_FillValue", refl.encoding.get("_FillValue"))
    _expect(fill is not None and int(fill) == REFLECTANCE_FILL, store, "reflectance",
            f"_FillValue {REFLECTANCE_FILL}", f"_FillValue {fill}")
    scale = refl.attrs.get("scale_factor", refl.encoding.get("scale_factor", REFLECTANCE_SCALE))
    _expect(np.isclose(float(scale), REFLECTANCE_SCALE, rtol=1e-6, atol=0), store, "reflectance",
            f"scale_factor {REFLECTANCE_SCALE:g}", f"scale_factor {scale}")

    sensor = cube_sensor(ds, store)
    bands = [str(b) for b in ds["band"].values]
    _expect(len(bands) == len(sensor.bands), store, "band",
            f"{len(sensor.bands)} bands ({sensor.name})", f"{len(bands)} bands")
    _expect(bands == list(sensor.bands), store, "band",
            "labels " + ", ".join(sensor.bands), "labels " + ", ".join(bands))

    _validate_time(ds, store)
    _validate_grid(ds, store)

    if "state_qa" in ds.data_vars:
        qa = ds["state_qa"]
        _expect(qa.dims == ("time", "y", "x"), store, "state_qa", "dims (time, y, x)",
                "(" + ", ".join(map(str, qa.dims)) + ")")
        _expect(qa.dtype == np.uint16, store, "state_qa", "dtype uint16", f"dtype {qa.dtype}")

    for name in ancillary:
        _expect(name in ds.data_vars, store, name, "an ancillary data variable (y, x)", "nothing")
        var = ds[name]
        _expect(var.dims == ("y", "x"), store, name, "dims (y, x)",
                "(" + ", ".join(map(str, var.dims)) + ")")
        _expect(var.dtype == np.float32, store, name, "dtype float32", f"dtype {var.dtype}")
        _expect(bool(var.attrs.get("units")), store, name, f"a CF units attribute (e.g. {ANCILLARY_UNITS[name]!r})",
                "none")
    if read_values:
        _validate_chunks(ds, store, ancillary)


def _validate_chunks(ds: xr.Dataset, store: Path | str, ancillary: Sequence[str]) -> None:
    """Every chunk of the dense variables is present (where absence would read as data) and
    decodes; ancillary values are finite where reflectance was observed."""
    dense = ["reflectance", *(["state_qa"] if "state_qa" in ds.data_vars else []), *ancillary]
    group = zarr.open_group(store, mode="r", use_consolidated=False) if Path(store).is_dir() else None
    for name in dense if group is not None else ():
        if problem := chunk_problem(store, group, name, decode=False):
            raise CubeValidationError(f"{store}: variable '{name}': {problem}")
    try:
        if ancillary:
            _validate_ancillary_finite(ds, store, ancillary)
        else:
            ds["reflectance"].data.sum().compute()
    except CubeValidationError:
        raise
    except Exception as exc:
        for name in dense if group is not None else ():  # name the chunk that failed to decode
            if problem := chunk_problem(store, group, name):
                raise CubeValidationError(f"{store}: variable '{name}': {problem}") from None
        raise CubeValidationError(f"{store}: cannot read the data ({type(exc).__name__}: {exc})") from None


def _validate_time(ds: xr.Dataset, store: Path | str) -> None:
    times = pd.DatetimeIndex(ds["time"].values) if np.issubdtype(ds["time"].dtype, np.datetime64) \
        else None
    _expect(times is not None, store, "time", "datetime64 timestamps", f"dtype {ds['time'].dtype}")
    _expect(len(times) == N_MONTHS, store, "time", f"{N_MONTHS} monthly steps", f"{len(times)} steps")
    expected = pd.date_range(times[0].to_period("M").to_timestamp(), periods=N_MONTHS, freq="MS")
    _expect(bool((times == expected).all()), store, "time",
            f"first-of-month timestamps {expected[0].date()} .. {expected[-1].date()}",
            ", ".join(str(t.date()) for t in times))


def _validate_grid(ds: xr.Dataset, store: Path | str) -> None:
    for dim in ("y", "x"):
        _expect(dim in ds.coords and ds[dim].ndim == 1, store, dim, "a 1-D coordinate", "none")
        coord = ds[dim].values.astype(np.float64)
        if coord.size > 1:
            step = np.diff(coord)
            regular = bool(np.all(step != 0) and np.allclose(step, step[0], rtol=1e-6, atol=0))
            _expect(regular, store, dim, "regularly spaced pixel centres",
                    f"spacings from {step.min():g} to {step.max():g}")
    crs = ds.rio.crs
    _expect(crs is not None, store, "spatial_ref",
            "a CRS (rioxarray convention: 'spatial_ref' coordinate with crs_wkt)", "no CRS")


def _reads_as_missing(array: zarr.Array) -> bool:
    """Whether Zarr's ``fill_value`` (what an absent chunk decodes to) is the variable's
    declared missing value (``_FillValue``, or NaN for floats) rather than valid data."""
    fill = array.fill_value
    if array.dtype.kind == "f":
        return bool(np.isnan(fill))
    declared = array.attrs.get("_FillValue", fill if array.metadata.zarr_format == 2 else None)
    return declared is not None and fill is not None and int(fill) == int(declared)


def spatial_arrays(group: zarr.Group) -> list[str]:
    """The arrays of a store with (y, x) as their last axes (not the 1-D coordinates)."""
    return [name for name, array in group.arrays() if array.ndim >= 2]


def window_chunks(array: zarr.Array, ys: slice = slice(None), xs: slice = slice(None)) -> Iterator[tuple[int, ...]]:
    """Chunk coordinates of ``array`` overlapping rows ``ys`` and columns ``xs`` of its last two
    axes (all chunks of the other axes)."""
    ranges = [range(array.cdata_shape[axis]) for axis in range(array.ndim - 2)]
    for axis, window in ((-2, ys), (-1, xs)):
        start, stop, _ = window.indices(array.shape[axis])
        ranges.append(range(start // array.chunks[axis], -(-stop // array.chunks[axis])))
    return itertools.product(*ranges)


def chunk_problem(store: Path | str, group: zarr.Group, name: str, ys: slice = slice(None),
                  xs: slice = slice(None), decode: bool = True) -> str | None:
    """Describe the first damaged chunk of ``name`` that overlaps rows ``ys`` and columns ``xs``
    (its last two axes), or return None.

    A chunk is damaged when it is absent and Zarr would read it as valid data (its
    ``fill_value`` is not the declared missing value; or the store is one of ours, where every
    chunk is written), or, with ``decode``, when it does not decode (checksum, codec, bytes)."""
    return array_chunk_problem(store, group, group[name], ys, xs, decode)


def array_chunk_problem(store: Path | str, group: zarr.Group, array: zarr.Array, ys: slice = slice(None),
                        xs: slice = slice(None), decode: bool = True) -> str | None:
    """:func:`chunk_problem` for an array of ``group`` already opened (its metadata read once)."""
    dims = (array.metadata.dimension_names if array.metadata.zarr_format == 3
            else array.attrs.get("_ARRAY_DIMENSIONS")) or tuple(f"dim_{i}" for i in range(array.ndim))
    absent_ok = _reads_as_missing(array) and not group.attrs.get(ALL_CHUNKS_ATTR, False)
    folder = Path(store) / array.path
    for coords in window_chunks(array, ys, xs):
        key = array.metadata.encode_chunk_key(coords)
        label = ", ".join(f"{d} {i * c}:{min((i + 1) * c, n)}" for d, i, c, n in
                          zip(dims, coords, array.chunks, array.shape) if d in ("y", "x"))
        if not absent_ok and folder.is_dir() and not (folder / key).is_file():
            reason = ("the store was written with every chunk" if group.attrs.get(ALL_CHUNKS_ATTR, False)
                      else f"Zarr would read it as {array.fill_value}, not as missing data")
            return f"chunk {label} ({key}) is absent ({reason})"
        if decode:
            try:
                array.blocks[coords]
            except Exception as exc:
                return f"chunk {label} ({key}) is unreadable ({type(exc).__name__}: {exc})"
    return None


def read_windows(store: Path | str, group: zarr.Group, names: Sequence[str], ys: slice, xs: slice
                 ) -> dict[str, np.ndarray]:
    """Rows ``ys`` and columns ``xs`` of the variables ``names`` (all their other axes),
    refusing absent or damaged chunks by name rather than reading them as data; a failure is
    raised for the first variable of ``names`` that fails.

    The reads go to zarr together (:func:`zarr_together`)."""
    arrays = {name: group[name] for name in names}
    for name, array in arrays.items():
        if problem := array_chunk_problem(store, group, array, ys, xs, decode=False):
            raise CubeValidationError(f"{store}: variable '{name}': {problem}")

    values = zarr_together([array.async_array.getitem((slice(None),) * (array.ndim - 2) + (ys, xs))
                            for array in arrays.values()])
    for (name, array), value in zip(arrays.items(), values):
        if isinstance(value, Exception):
            problem = array_chunk_problem(store, group, array, ys, xs) or \
                f"cannot be read ({type(value).__name__}: {value})"
            raise CubeValidationError(f"{store}: variable '{name}': {problem}") from None
        if isinstance(value, BaseException):  # KeyboardInterrupt and the like: not the data's fault
            raise value
    return dict(zip(arrays, values))


def _validate_ancillary_finite(ds: xr.Dataset, store: Path | str, names: Sequence[str]) -> None:
    """Ancillary values must be finite wherever any reflectance was observed."""
    has_obs = (ds["reflectance"] != REFLECTANCE_FILL).any(("time", "band"))
    bad_counts = [(~np.isfinite(ds[name]) & has_obs).sum() for name in names]
    counts = xr.concat(bad_counts, dim="variable").compute().values
    for name, count in zip(names, counts):
        if count:
            check_ancillary_finite(store, [name], ds[name].values[None], has_obs.values)


def check_ancillary_finite(store: Path | str, names: Sequence[str], ancillary: np.ndarray, observed: np.ndarray,
                           y0: int = 0, x0: int = 0, window: str = "") -> None:
    """Refuse non-finite ``ancillary`` (A, y, x) values where ``observed`` (y, x) says some
    reflectance was observed; ``y0``/``x0`` place the block in the cube, ``window`` names it."""
    bad = ~np.isfinite(ancillary) & observed[None]
    for name, bad_pixels in zip(names, bad):
        if bad_pixels.any():
            row, col = (int(i[0]) for i in np.nonzero(bad_pixels))
            raise CubeValidationError(
                f"{store}: variable '{name}': expected finite values where reflectance is "
                f"observed, found {int(bad_pixels.sum())} non-finite pixel(s){window}, first at "
                f"y index {y0 + row}, x index {x0 + col}")
