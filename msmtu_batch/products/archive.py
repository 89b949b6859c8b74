"""Opening products: one output store, or a multi-year archive as one dataset with a time
dimension.

The archive is one store per year (as the workflow lays it out: ``<version>/<year>/abundance.zarr``)
and this opener concatenates them lazily along ``time``. One store per year, rather than one
store that years are written into, because a year rerun must replace that year only and
atomically: the pipeline builds the year's store at a hidden staging path and publishes it
as a new version, ``abundance.zarr`` being a link to the current one replaced atomically
(:func:`msmtu_batch.runtime.outputs.replace_store`). The openers here resolve the links once, so
a dataset opened before a replacement reads the old year to the end and one opened after reads
the new one, never half of each; the other years' bytes are never touched. A single
store would need region writes that a reader can observe half-done, or a transactional
layer (Icechunk) as a new dependency for what two renames give.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from msmtu_batch.inputs.cube import CLASS_DIM
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.stores import read_manifest

OUTPUT_NAME = "abundance.zarr"  # a year's output store in the workflow layout


def is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def archive_stores(root: str | os.PathLike) -> list[Path]:
    """The complete yearly output stores of an archive folder: the workflow's output root (its
    ``latest`` version), a version folder (``<year>/abundance.zarr``), or a folder of stores."""
    root = Path(root)
    if (root / "latest").is_dir():
        root = root / "latest"
    candidates = sorted(root.glob(f"*/{OUTPUT_NAME}")) or sorted(p for p in root.glob("*.zarr") if is_store(p))
    stores = [p for p in candidates if (read_manifest(p) or {}).get("complete")]
    if not stores:
        raise MsmtuError(f"{root}: no complete output stores (looked for */{OUTPUT_NAME} and *.zarr)")
    return stores


def check_one_store_per_year(years: Sequence[tuple[str, Path]]) -> None:
    """Refuse an archive in which two stores cover one year (``(year, store)`` pairs): its
    dataset would hold the year twice, its STAC catalogue two Items of one id."""
    seen: dict[str, Path] = {}
    for year, store in years:
        if year in seen:
            raise MsmtuError(f"two stores cover the year {year}: {seen[year]} and {store} (an archive holds one "
                             "store per year: move one of them out)")
        seen[year] = store


def _year_dataset(store: Path) -> xr.Dataset:
    ds = xr.open_zarr(store, decode_coords="all")
    start, end = ds.attrs.get("time_coverage_start"), ds.attrs.get("time_coverage_end")
    if not start or not end:
        raise MsmtuError(f"{store}: no time_coverage_start/end attributes (an output of msmtu-batch before 0.3: "
                         "rerun it to add it to an archive)")
    if "imputed_reflectance" in ds:  # the archive's time is the year; the months become their own dimension
        ds = ds.rename({"time": "month"}).assign_coords(month=np.arange(1, ds.sizes["time"] + 1))
    bounds = np.array([[pd.Timestamp(start), pd.Timestamp(end) + pd.Timedelta(days=1)]], dtype="datetime64[ns]")
    ds = ds.expand_dims(time=[pd.Timestamp(start)])
    ds = ds.assign_coords(time_bounds=(("time", "bounds"), bounds))
    ds["time"].attrs.update(bounds="time_bounds", long_name="start of the year the products cover")
    ds.attrs["source_store"] = str(store)
    return ds


def open_archive(stores: str | os.PathLike | Sequence[str | os.PathLike]) -> xr.Dataset:
    """Products of several years as one lazy dataset: ``abundance(time, lulc_class, y, x)``,
    ``dominant_class(time, y, x)`` and so on, ``time`` being the start of each year (with
    ``time_bounds``). ``stores`` is an archive folder (see :func:`archive_stores`) or a list
    of output stores; they must share the grid and the classes."""
    paths = archive_stores(stores) if isinstance(stores, str | os.PathLike) else [Path(p) for p in stores]
    # each store's current version, resolved once: its chunks are read from there to the end
    years = sorted((_year_dataset(p.resolve()) for p in paths), key=lambda d: d["time"].values[0])
    first = years[0]
    for ds in years[1:]:
        for coord in ("y", "x", CLASS_DIM):
            if not np.array_equal(ds[coord].values, first[coord].values):
                raise MsmtuError(f"{ds.attrs['source_store']}: its {coord} differs from that of "
                                 f"{first.attrs['source_store']} (an archive's years share one grid and classes)")
    check_one_store_per_year([(ds.attrs["time_coverage_start"][:4], Path(ds.attrs["source_store"])) for ds in years])
    archive = xr.concat(years, dim="time", data_vars="minimal", coords="minimal", compat="override",
                        join="exact", combine_attrs="drop_conflicts")
    archive.attrs.pop("source_store", None)
    archive.attrs["time_coverage_start"] = years[0].attrs["time_coverage_start"]
    archive.attrs["time_coverage_end"] = years[-1].attrs["time_coverage_end"]
    return archive


def open_output(path: str | os.PathLike | Sequence[str | os.PathLike]) -> xr.Dataset:
    """An output store (its CRS decoded; a plain ``xr.open_zarr`` works too), or an archive
    folder or a list of stores as one dataset across years (:func:`open_archive`)."""
    if isinstance(path, str | os.PathLike) and is_store(Path(path)):
        return xr.open_zarr(Path(path).resolve(), decode_coords="all")  # the version current now (see above)
    if isinstance(path, str | os.PathLike) and not Path(path).exists():
        raise MsmtuError(f"{path}: no such output store or archive")
    return open_archive(path)
