"""GIS export of an output cube: one Cloud-Optimized GeoTIFF per product, ready for QGIS.

Each COG is tiled, deflate-compressed, with internal overviews and nodata, band
descriptions set to the class names, the output's provenance as GDAL metadata tags; GDAL's
COG driver writes it and rio-cogeo's validator checks it before it is moved into place.
``dominant_class`` is a byte raster with the model's class colours as its colour table and
the class names as GDAL category names (in its ``.aux.xml``, where GDAL keeps them for
GeoTIFF). Beside every COG a QGIS style (``.qml`` of the same name, which QGIS applies when it
opens the file): the class palette for ``dominant_class`` and ``quality_flag``, a 0-1 ramp for
the others, on the most abundant class's band for ``abundance`` (its mean over the region
highest). File names carry the year: ``abundance_2013.tif``.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import math
import os
import shutil
import socket
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import wurlitzer
import xarray as xr
from rasterio._err import CPLE_BaseError
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError
from rasterio.shutil import copy as gdal_copy
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from msmtu_batch.inputs.cube import CLASS_DIM, grid_transform, rioxarray_quietly
from msmtu_batch.model.palette import rgb
from msmtu_batch.products.blocks import DOMINANT_FILL
from msmtu_batch.products.overviews import with_overviews, write_levels
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.outputs import publish_file, remove_temporaries_of, write_text_durably


class CogSettings(NamedTuple):
    nodata: float | int | None
    overview_resampling: str
    predictor: str  # GDAL's COG driver's PREDICTOR: NO, or FLOATING_POINT (TIFF predictor 3)


# The floating-point predictor makes a trained model's abundances 9 % smaller (uncertainty 5 %)
# but valid fractions (k / 84) twice as large; deflate level 1 costs the same bytes as 6 on
# these floats and about half the time (benchmarks/NOTES.md, 2026-12-02).
PRODUCTS: dict[str, CogSettings] = {
    "abundance": CogSettings(np.nan, "average", "FLOATING_POINT"),
    "dominant_class": CogSettings(DOMINANT_FILL, "mode", "NO"),
    "uncertainty": CogSettings(np.nan, "average", "FLOATING_POINT"),
    "expected_error": CogSettings(np.nan, "average", "FLOATING_POINT"),
    "valid_fraction": CogSettings(np.nan, "average", "NO"),
    "quality_flag": CogSettings(None, "mode", "NO"),
}
DEFLATE_LEVEL = 1
BLOCK = 256
# GDAL's block cache while a COG is written and its overviews built: GDAL's default is 5 % of
# the machine's memory (1.2 GB on 24 GB), which a large product would fill; the writes go block
# by block in order, so they need few blocks cached. With GDAL's COG driver the overviews of a
# 2048 x 2048 abundance took 1.3 s with 64 MiB and 2.4 s with 16 (benchmarks/NOTES.md, 2026-12-07)
GDAL_CACHE_BYTES = 64 * 2**20
QUALITY_COLORS = ("#1a9850", "#bdbdbd", "#fc8d59")  # estimated, too few observations, unlike training
# viridis at 0, 0.25, 0.5, 0.75, 1: the 0-1 ramp of abundance, uncertainty, valid fraction
RAMP = ((0.0, "#440154"), (0.25, "#3b528b"), (0.5, "#21918c"), (0.75, "#5ec962"), (1.0, "#fde725"))
# the top of the ramp where 1 would leave a map dark: pixel errors are a few hundredths
RAMP_TOP = {"expected_error": 0.2}
# the output's global attributes that travel into every COG as GDAL metadata
PROVENANCE_TAGS = ("title", "level", "time_coverage_start", "time_coverage_end", "date_created", "history",
                   "references", "software_version", "model", "model_hash", "input_store", "input_content", "run_id")


def output_products(ds: xr.Dataset) -> dict[str, tuple[str, str]]:
    """The products of an output, each with its kind (a key of :data:`PRODUCTS`) and its level's
    suffix: ``""`` for the model's level, ``"_level1"`` for a two-level model's coarse level
    (``abundance_level1``, ``dominant_class_level1`` over ``lulc_class_level1``)."""
    found = {name: (name, "") for name in PRODUCTS if name in ds}
    for name in ds.data_vars:
        for kind in ("abundance", "dominant_class"):
            suffix = str(name).removeprefix(kind)
            if name != kind and suffix.startswith("_") and f"{CLASS_DIM}{suffix}" in ds.coords:
                found[str(name)] = (kind, suffix)
    return found


def _overview_levels(height: int, width: int) -> int:
    """Halvings until the smaller side is about 32 pixels (at least one; none for a raster
    one pixel wide or high, which cannot be halved)."""
    if min(height, width) < 2:
        return 0
    return max(1, int(math.log2(max(1, min(height, width) / 32))))


def _windows(product: xr.DataArray) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """Row and column ranges covering ``product`` in windows of whole Zarr chunks, at least
    :data:`BLOCK` pixels a side (whole TIFF blocks where the chunks divide them)."""
    chunks = product.encoding.get("preferred_chunks") or {}
    steps = {dim: chunks.get(dim, BLOCK) * max(1, math.ceil(BLOCK / chunks.get(dim, BLOCK))) for dim in ("y", "x")}
    rows, columns = ([(start, min(start + steps[dim], product.sizes[dim]))
                      for start in range(0, product.sizes[dim], steps[dim])] for dim in ("y", "x"))
    return itertools.product(rows, columns)


def north_up(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with its rows from north to south and its columns from west to east, as a GeoTIFF
    lays them out: a store may keep y increasing (a user's xarray cube, and so its output), which
    written row by row would put the raster upside down and a whole height off (lazy: flips
    only the order in which windows are read)."""
    flips = {dim: slice(None, None, -1) for dim, reverse in (("y", False), ("x", True))
             if ds.sizes.get(dim, 0) > 1 and bool(ds[dim][0] > ds[dim][-1]) == reverse}
    return ds.isel(flips) if flips else ds


def product_stem(name: str, attrs: dict) -> str:
    """``abundance_2013``: the product and the year its output covers (none if unknown)."""
    start = str(attrs.get("time_coverage_start", ""))
    return f"{name}_{start[:4]}" if start[:4].isdigit() else name


def export_cogs(store: str | Path, cog_dir: str | Path, parallel: int = 2) -> list[Path]:
    """Write ``cog_dir/<product>_<year>.tif`` (and its ``.qml``) for every product of the
    output cube ``store``; returns the files written. ``parallel`` products at once (GDAL
    releases the GIL; each COG's deflate also runs on every core)."""
    # lazily indexed arrays, not dask: each window is one read (dask's graph per window took 0.37-0.52 s
    # of a 2048 x 2048 abundance where plain reads take 0.22)
    ds = north_up(xr.open_dataset(store, engine="zarr", decode_coords="all", mask_and_scale=False, chunks=None,
                                   cache=False))
    cog_dir = Path(cog_dir)
    cog_dir.mkdir(parents=True, exist_ok=True)
    products = output_products(ds)
    _remove_abandoned_work(cog_dir)
    # every temporary file of this export, GDAL's too, in a hidden folder of this process:
    # removed on every exit path (SIGTERM included: the command line turns it into an exception)
    work = cog_dir / f"{WORK_PREFIX}{socket.gethostname()}-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        # rioxarray's transform uses affine's deprecated `*` (in these threads)
        with rioxarray_quietly(), _gdal_messages() as said:
            pool = ThreadPoolExecutor(max_workers=max(1, parallel))
            try:
                futures = [pool.submit(_export_or_fail, ds, name, *products[name], cog_dir, work) for name in products]
                return [path for future in futures for path in future.result()]
            finally:  # on a failure or an interruption the products not begun are dropped, those begun end
                pool.shutdown(wait=True, cancel_futures=True)
    except _CogWriteError as failure:
        raise failure.explained(said) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


WORK_PREFIX = ".msmtu-export-"


def _remove_abandoned_work(cog_dir: Path) -> None:
    """The temporary folders of exports on this host whose process is gone (killed outright)."""
    host = socket.gethostname()
    for folder in cog_dir.glob(f"{WORK_PREFIX}{host}-*"):
        pid = folder.name.removeprefix(f"{WORK_PREFIX}{host}-")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _gdal_messages() -> Iterator[list[str]]:
    """What GDAL and libtiff say during the export, kept rather than printed: rasterio logs
    GDAL's messages, libtiff writes its own to the process's stderr (ten lines on a full disk,
    before rasterio's "Write failed. See previous exception"). A failure is explained in one
    line from them; after a success they are printed as they would have been."""
    handler = _Messages()
    logger = logging.getLogger("rasterio")
    logger.addHandler(handler)
    native = io.StringIO()
    try:
        with wurlitzer.pipes(stdout=None, stderr=native):
            yield handler.lines
    except BaseException:
        handler.lines.extend(native.getvalue().splitlines())
        raise
    else:
        sys.stderr.write(native.getvalue())
    finally:
        logger.removeHandler(handler)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _CogWriteError(Exception):
    def __init__(self, final: Path, error: Exception) -> None:
        super().__init__(str(error))
        self.final, self.error = final, error

    def explained(self, said: list[str]) -> Exception:
        """One line naming the COG: a full disk as the operating system's ENOSPC (the command
        line's one line for a full disk), else what GDAL said."""
        reasons = [*said, str(self.error), str(self.error.__cause__ or "")]
        if any("No space left on device" in reason for reason in reasons):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.final))
        return MsmtuError(f"{self.final}: GDAL could not write it ({'; '.join(r for r in reasons if r)})")


def _export_or_fail(ds: xr.Dataset, name: str, kind: str, suffix: str, cog_dir: Path, work: Path) -> list[Path]:
    """:func:`_export_product`, its GDAL failures naming the COG (explained once GDAL's
    messages are all in: :func:`export_cogs`)."""
    try:
        return _export_product(ds, name, kind, suffix, cog_dir, work)
    except (RasterioError, CPLE_BaseError) as exc:
        raise _CogWriteError(cog_dir / f"{product_stem(name, ds.attrs)}.tif", exc) from exc


def _export_product(ds: xr.Dataset, name: str, kind: str, suffix: str, cog_dir: Path, work: Path) -> list[Path]:
    """One product's COG (written aside, validated, renamed), its QGIS style and, for the
    categorical ones, its category names; ``kind`` and ``suffix`` as :func:`output_products` gives."""
    nodata, resampling, predictor = PRODUCTS[kind]
    class_dim = f"{CLASS_DIM}{suffix}"
    classes = [str(c) for c in ds[class_dim].values]
    colors = str(ds[f"dominant_class{suffix}"].attrs.get("flag_colors", "")).split()
    tags = {k: str(ds.attrs[k]) for k in PROVENANCE_TAGS if k in ds.attrs}
    stem = product_stem(name, ds.attrs)
    descriptions = classes if class_dim in ds[name].dims else [name]
    product = ds[name].transpose(..., "y", "x")  # (classes,) y, x; lazy: read window by window
    height, width = product.sizes["y"], product.sizes["x"]
    final = cog_dir / f"{stem}.tif"
    # written in this process's work folder: a COG appears at its final name complete or not at all
    plain, partial = work / f"{stem}.plain.tif", work / f"{stem}.tif"
    colormap = None
    if kind == "dominant_class" and len(colors) == len(classes):
        colormap = {i: (*rgb(c), 255) for i, c in enumerate(colors)} | {DOMINANT_FILL: (0, 0, 0, 0)}
    elif kind == "quality_flag":
        colormap = {i: (*rgb(c), 255) for i, c in enumerate(QUALITY_COLORS)}
    # through rasterio: rioxarray's to_raster copies the array twice, 1.2 of the 6.5 s that the
    # abundance of a 2048 x 2048 output took (benchmarks/NOTES.md, 2026-12-03)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(
            plain, "w", driver="GTiff", width=width, height=height, count=len(descriptions), dtype=product.dtype,
            crs=ds.rio.crs, transform=grid_transform(ds), nodata=nodata, tiled=True, blockxsize=BLOCK,
            blockysize=BLOCK) as raster:
        # window by window, so that memory follows the window, not the region (a 10,000 x 10,000
        # abundance product is 4 GB): windows of whole Zarr chunks and whole TIFF blocks
        totals = np.zeros(len(descriptions))  # per band, for the style's default band
        for (y0, y1), (x0, x1) in _windows(product):
            values = product[..., y0:y1, x0:x1].values.reshape(-1, y1 - y0, x1 - x0)
            raster.write(values, window=Window(x0, y0, x1 - x0, y1 - y0))
            if kind == "abundance":
                totals += np.nansum(values, axis=(1, 2), dtype=np.float64)
        for band, description in enumerate(descriptions, start=1):
            raster.set_band_description(band, description)
        raster.update_tags(**tags, product=name)
        if colormap:
            raster.write_colormap(1, colormap)
            raster.colorinterp = [ColorInterp.palette]
    # GDAL's COG driver copies the tags, descriptions, nodata and colour table, builds the
    # overviews and deflates on every core (the workers are idle by now). rio-cogeo's
    # cog_translate, which copies the raster once more before its overviews, took 2.3-2.5 s for
    # a 2048 x 2048 abundance where this takes 1.4 (benchmarks/NOTES.md, 2026-12-07)
    levels = _overview_levels(height, width)
    ours = bool(levels) and resampling == "average"  # GDAL's averages go through a ZSTD temporary (products.overviews)
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", GDAL_CACHEMAX=GDAL_CACHE_BYTES), \
            with_overviews(plain, write_levels(plain, levels, work)) if ours else nullcontext(plain) as source:
        gdal_copy(source, partial, driver="COG", COMPRESS="DEFLATE", LEVEL=DEFLATE_LEVEL, PREDICTOR=predictor,
                  BLOCKSIZE=BLOCK, NUM_THREADS="ALL_CPUS",
                  OVERVIEWS="FORCE_USE_EXISTING" if ours else "AUTO" if levels else "NONE",
                  OVERVIEW_COUNT=max(1, levels), OVERVIEW_RESAMPLING=resampling.upper())
    for written in work.glob(f"{stem}.*"):  # the plain copy, its overviews and their VRT
        if written != partial:
            written.unlink()
    valid, errors, _ = cog_validate(partial)
    if not valid:
        raise MsmtuError(f"{final}: not a valid COG ({'; '.join(errors)})")
    # an abundance COG opens on its most abundant class: band 1 (often a rare class) looks uniform
    sidecars = {cog_dir / f"{stem}.qml": _qml(kind, classes, colors, band=int(np.argmax(totals)) + 1)}
    if kind in ("dominant_class", "quality_flag"):
        names = classes if kind == "dominant_class" else str(ds["quality_flag"].attrs.get("flag_meanings", "")).split()
        sidecars[cog_dir / f"{stem}.tif.aux.xml"] = _category_names(names)
    for path, text in sidecars.items():
        write_text_durably(path, text)
        remove_temporaries_of(path)  # an export killed inside this write left its own
    publish_file(partial, final)
    return [final, cog_dir / f"{stem}.qml"]


def _category_names(names: list[str]) -> str:
    """A GDAL PAM sidecar giving band 1's category names (value i -> names[i])."""
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    categories = ET.SubElement(band, "CategoryNames")
    for name in names:
        ET.SubElement(categories, "Category").text = name
    return ET.tostring(root, encoding="unicode") + "\n"


def _qml(kind: str, classes: list[str], colors: list[str], band: int = 1) -> str:
    """A QGIS layer style: a palette for the categorical products, a 0-1 ramp on ``band`` for the
    others."""
    root = ET.Element("qgis", version="3.28", styleCategories="Symbology")
    pipe = ET.SubElement(root, "pipe")
    if kind in ("dominant_class", "quality_flag"):
        entries = list(zip(classes, colors)) if kind == "dominant_class" else \
            list(zip(("estimated", "too few observations", "input unlike training data"), QUALITY_COLORS))
        renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1")
        palette = ET.SubElement(renderer, "colorPalette")
        for value, (label, color) in enumerate(entries):
            ET.SubElement(palette, "paletteEntry", value=str(value), color=color, label=label, alpha="255")
    else:
        top = RAMP_TOP.get(kind, 1.0)
        renderer = ET.SubElement(pipe, "rasterrenderer", type="singlebandpseudocolor", band=str(band), opacity="1",
                                 alphaBand="-1", classificationMin="0", classificationMax=f"{top:g}")
        shader = ET.SubElement(ET.SubElement(renderer, "rastershader"), "colorrampshader", colorRampType="INTERPOLATED",
                               classificationMode="1", clip="0", minimumValue="0", maximumValue=f"{top:g}")
        for value, color in RAMP:
            ET.SubElement(shader, "item", value=f"{value * top:g}", color=color, label=f"{value * top:g}", alpha="255")
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def quicklook(store: str | Path, path: str | Path, reference: xr.DataArray | None = None, classes: int = 4) -> Path:
    """PNG of the most abundant classes' abundance maps (and the reference's, if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    abundance = xr.open_zarr(store)["abundance"].load()
    top = abundance.mean(("y", "x")).argsort().values[::-1][:classes]
    rows = [("msmtu-batch", abundance)] + ([("reference", reference)] if reference is not None else [])
    fig, axes = plt.subplots(len(rows), len(top), figsize=(3.4 * len(top), 2.8 * len(rows)), squeeze=False)
    for r, (label, data) in enumerate(rows):
        for c, k in enumerate(top):
            image = axes[r, c].imshow(data.isel({CLASS_DIM: int(k)}).values, vmin=0, vmax=1, cmap="viridis")
            axes[r, c].set_title(f"{abundance[CLASS_DIM].values[k]} ({label})", fontsize=9)
            axes[r, c].set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.7, label="abundance")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def dominant_quicklook(store: str | Path, path: str | Path) -> Path:
    """PNG of the dominant-class map in the model's class colours, with its legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ds = xr.open_zarr(store)
    classes = [str(c) for c in ds[CLASS_DIM].values]
    colors = str(ds["dominant_class"].attrs["flag_colors"]).split()
    dominant = ds["dominant_class"].values  # NaN where no estimate
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.imshow(np.ma.masked_invalid(dominant), cmap=ListedColormap(colors), vmin=-0.5, vmax=len(classes) - 0.5,
              interpolation="nearest")
    ax.set_title(f"dominant class, {ds.attrs.get('level', '')} {ds.attrs.get('time_coverage_start', '')[:4]}",
                 fontsize=10)
    ax.set_axis_off()
    ax.legend(handles=[Patch(color=c, label=n) for n, c in zip(classes, colors)], loc="center left",
              bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
