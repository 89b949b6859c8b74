"""STAC metadata for an archive of products, written with pystac: one Item per year (its COGs,
its Zarr store, QGIS styles and run record as assets; projection, raster and classification
extensions) in one Collection whose extent covers every year.

Layout (beside the archive's years)::

    collection.json
    <year>/<collection-id>-<year>.json     the year's Item
    <year>/run-record.json                 what made the year's output (its manifest and provenance)
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pystac
import xarray as xr
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.warp import transform_bounds

from msmtu_batch.inputs.cube import CLASS_DIM, grid_bounds, grid_transform
from msmtu_batch.products.archive import OUTPUT_NAME, archive_stores, check_one_store_per_year
from msmtu_batch.products.export import PRODUCTS, output_products, product_stem
from msmtu_batch.runtime.outputs import write_text_durably
from msmtu_batch.runtime.stores import read_manifest

ZARR_MEDIA_TYPE = "application/vnd+zarr"
QML_MEDIA_TYPE = "application/xml"
_DATA_TYPES = {"float32": DataType.FLOAT32, "uint8": DataType.UINT8, "int16": DataType.INT16}
_EXTENSIONS = (ProjectionExtension, RasterExtension, ClassificationExtension)


def _when(day: str, end: bool = False) -> dt.datetime:
    moment = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
    return moment + dt.timedelta(days=1, seconds=-1) if end else moment


def _footprint(ds: xr.Dataset) -> tuple[list[float], dict]:
    """WGS84 bounding box and polygon of the store's grid."""
    left, bottom, right, top = grid_bounds(ds)
    west, south, east, north = transform_bounds(ds.rio.crs, "EPSG:4326", left, bottom, right, top, densify_pts=21)
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return [west, south, east, north], {"type": "Polygon", "coordinates": [ring]}


def _run_record(store: Path, ds: xr.Dataset) -> dict:
    keys = ("date_created", "history", "software_versions", "model", "model_hash", "input_store", "input_content",
            "run_id", "time_coverage_start", "time_coverage_end")
    return {"output": store.name, "manifest": read_manifest(store), **{k: ds.attrs[k] for k in keys if k in ds.attrs}}


def run_record_path(store: Path) -> Path:
    """``<year>/run-record.json`` beside a workflow's ``abundance.zarr``; ``<stem>.run-record.json``
    beside a store in a folder of stores (which would otherwise share one)."""
    return store.parent / ("run-record.json" if store.name == OUTPUT_NAME else f"{store.stem}.run-record.json")


def _item(store: Path, collection_id: str) -> pystac.Item:
    ds = xr.open_zarr(store, decode_coords="all", mask_and_scale=False)
    manifest = read_manifest(store) or {}
    year = ds.attrs["time_coverage_start"][:4]
    bbox, geometry = _footprint(ds)
    item = pystac.Item(
        id=f"{collection_id}-{year}", geometry=geometry, bbox=bbox, datetime=None,
        start_datetime=_when(ds.attrs["time_coverage_start"]), end_datetime=_when(ds.attrs["time_coverage_end"], True),
        properties={"title": f"{ds.attrs.get('title', 'LULC abundances')} {year}",
                    "created": ds.attrs.get("date_created"), "msmtu:level": ds.attrs.get("level"),
                    "msmtu:model_hash": ds.attrs.get("model_hash"), "msmtu:run_id": ds.attrs.get("run_id"),
                    # pixels estimated, and those mapped from inputs unlike the training data (quality_flag 2)
                    **{f"msmtu:{key}": manifest[key] for key in ("valid_pixels", "flagged_pixels", "flagged_chunks")
                       if key in manifest}})
    epsg = ds.rio.crs.to_epsg()
    transform = grid_transform(ds)
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=f"EPSG:{epsg}" if epsg else None, wkt2=None if epsg else ds.rio.crs.to_wkt(),
        shape=[ds.sizes["y"], ds.sizes["x"]], transform=list(transform)[:6], bbox=list(grid_bounds(ds)))
    folder = store.parent
    item.add_asset("zarr", pystac.Asset(href=str(store), media_type=ZARR_MEDIA_TYPE, roles=["data"],
                                        title="every product (Zarr)"))
    resolution = abs(transform.a)
    for name, (kind, suffix) in output_products(ds).items():
        nodata = PRODUCTS[kind].nodata
        classes = [str(c) for c in ds[f"{CLASS_DIM}{suffix}"].values]
        colors = str(ds[f"dominant_class{suffix}"].attrs.get("flag_colors", "")).split()
        cog = folder / "cog" / f"{product_stem(name, ds.attrs)}.tif"
        if not cog.is_file():
            continue
        asset = pystac.Asset(href=str(cog), media_type=pystac.MediaType.COG, roles=["data"],
                             title=f"{name} ({', '.join(classes)})" if kind == "abundance" else name,
                             description=ds[name].attrs.get("long_name"))
        item.add_asset(name, asset)
        band = RasterBand.create(nodata=None if nodata is None else ("nan" if np.isnan(nodata) else nodata),
                                 data_type=_DATA_TYPES[str(ds[name].dtype)], spatial_resolution=resolution,
                                 unit=ds[name].attrs.get("units"))
        RasterExtension.ext(asset, add_if_missing=True).apply(
            bands=[band] * (len(classes) if f"{CLASS_DIM}{suffix}" in ds[name].dims else 1))
        if kind == "dominant_class":
            ClassificationExtension.ext(asset, add_if_missing=True).apply(classes=[
                Classification.create(value=i, name=n, description=n, color_hint=c.lstrip("#").upper())
                for i, (n, c) in enumerate(zip(classes, colors))])
        style = cog.with_suffix(".qml")
        if style.is_file():
            item.add_asset(f"{name}_style", pystac.Asset(href=str(style), media_type=QML_MEDIA_TYPE, roles=["style"],
                                                         title=f"QGIS style of {name}"))
    record = run_record_path(store)
    write_text_durably(record, json.dumps(_run_record(store, ds), indent=2, sort_keys=True))
    item.add_asset("run_record", pystac.Asset(href=str(record), media_type=pystac.MediaType.JSON,
                                              roles=["metadata"], title="what made this output"))
    return item


def write_catalog(root: str | os.PathLike, collection_id: str | None = None, description: str | None = None) -> Path:
    """Write the STAC Collection (and an Item per year) of the archive at ``root`` (see
    :func:`msmtu_batch.products.archive.archive_stores`); returns the path of ``collection.json``."""
    root = Path(root).resolve()
    stores = archive_stores(root)
    collection_id = collection_id or f"msmtu-{root.name}"
    # the rule open_output follows, checked before anything is written
    check_one_store_per_year([(xr.open_zarr(store).attrs.get("time_coverage_start", "")[:4], store)
                              for store in stores])
    items = [_item(store, collection_id) for store in stores]
    extent = pystac.Extent(
        pystac.SpatialExtent([[min(i.bbox[0] for i in items), min(i.bbox[1] for i in items),
                               max(i.bbox[2] for i in items), max(i.bbox[3] for i in items)]]),
        pystac.TemporalExtent([[min(i.common_metadata.start_datetime for i in items),
                                max(i.common_metadata.end_datetime for i in items)]]))
    collection = pystac.Collection(
        id=collection_id, extent=extent, license="other", title=f"LULC abundances ({root.name})",
        description=description or "Yearly LULC abundance maps from MODIS monthly time series (msmtu-batch, BRITS)",
        stac_extensions=[e.get_schema_uri() for e in _EXTENSIONS])
    for store, item in zip(stores, items):
        collection.add_item(item)
        item.set_self_href(str(store.parent / f"{item.id}.json"))
    collection.set_self_href(str(root / "collection.json"))
    collection.make_all_asset_hrefs_relative()
    stale = _previous_items(root / "collection.json") - {Path(item.get_self_href()).resolve() for item in items}
    collection.save(pystac.CatalogType.SELF_CONTAINED)
    for path in stale:  # Items of an earlier catalogue (another --collection-id, a year gone)
        path.unlink(missing_ok=True)
    return root / "collection.json"


def _previous_items(collection: Path) -> set[Path]:
    """The Item files the catalogue at ``collection`` links to (none when there is none)."""
    try:
        links = json.loads(collection.read_text()).get("links", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {(collection.parent / link["href"]).resolve() for link in links
            if isinstance(link, dict) and link.get("rel") == "item" and isinstance(link.get("href"), str)}
