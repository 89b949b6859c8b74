"""Cloud-Optimized GeoTIFF export of an output cube: one multi-band file per product.

Tiled, deflate-compressed, with internal overviews and nodata, band descriptions set to
the class names, and checked with rio-cogeo's validator before it is moved into place.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rio_cogeo.cogeo import cog_translate, cog_validate
from rio_cogeo.profiles import cog_profiles

from msmtu_batch.errors import MsmtuError

# product -> (nodata, overview resampling)
PRODUCTS: dict[str, tuple[float | int | None, str]] = {
    "abundance": (np.nan, "average"),
    "dominant_class": (-1, "mode"),
    "uncertainty": (np.nan, "average"),
    "valid_fraction": (np.nan, "average"),
    "quality_flag": (None, "mode"),
}
BLOCK = 256


def _overview_levels(height: int, width: int) -> int:
    """Halvings until the smaller side is about 32 pixels (at least one; none for a raster
    one pixel wide or high, which cannot be halved)."""
    if min(height, width) < 2:
        return 0
    return max(1, int(math.log2(max(1, min(height, width) / 32))))


def export_cogs(store: str | Path, cog_dir: str | Path) -> list[Path]:
    """Write ``cog_dir/<product>.tif`` for every product of the output cube ``store``."""
    ds = xr.open_zarr(store, decode_coords="all", consolidated=False, mask_and_scale=False)
    cog_dir = Path(cog_dir)
    cog_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (nodata, resampling) in PRODUCTS.items():
        if name not in ds:
            continue
        data = ds[name].load()
        descriptions = [str(c) for c in ds["class"].values] if "class" in data.dims else [name]
        data = data.expand_dims("band", 0) if data.ndim == 2 else data.rename({"class": "band"})
        data = data.drop_vars([c for c in data.coords if c not in ("x", "y", "spatial_ref")])
        data.attrs = {}
        if nodata is not None:
            data = data.rio.write_nodata(nodata, encoded=False)
        final = cog_dir / f"{name}.tif"
        # temporary names of this process only: a COG appears at its final name complete or not at all
        plain = cog_dir / f".{name}.{os.getpid()}.plain.tif"
        partial = cog_dir / f".{name}.{os.getpid()}.partial.tif"
        data.rio.to_raster(plain, tiled=True, blockxsize=BLOCK, blockysize=BLOCK)
        with rasterio.open(plain, "r+") as raster:
            for band, description in enumerate(descriptions, start=1):
                raster.set_band_description(band, description)
        # deflate on every core (the workers are idle by now)
        profile = cog_profiles.get("deflate") | {"blockxsize": BLOCK, "blockysize": BLOCK, "num_threads": "ALL_CPUS"}
        cog_translate(plain, partial, profile, nodata=nodata, overview_level=_overview_levels(*data.shape[1:]),
                      overview_resampling=resampling, quiet=True, in_memory=False,
                      config={"GDAL_NUM_THREADS": "ALL_CPUS"})
        plain.unlink()
        valid, errors, _ = cog_validate(partial)
        if not valid:
            raise MsmtuError(f"{final}: not a valid COG ({'; '.join(errors)})")
        partial.replace(final)
        written.append(final)
    return written


def quicklook(store: str | Path, path: str | Path, reference: xr.DataArray | None = None, classes: int = 4) -> Path:
    """PNG of the most abundant classes' abundance maps (and the reference's, if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    abundance = xr.open_zarr(store, consolidated=False)["abundance"].load()
    top = abundance.mean(("y", "x")).argsort().values[::-1][:classes]
    rows = [("msmtu-batch", abundance)] + ([("reference", reference)] if reference is not None else [])
    fig, axes = plt.subplots(len(rows), len(top), figsize=(3.4 * len(top), 2.8 * len(rows)), squeeze=False)
    for r, (label, data) in enumerate(rows):
        for c, k in enumerate(top):
            image = axes[r, c].imshow(data.isel({"class": int(k)}).values, vmin=0, vmax=1, cmap="viridis")
            axes[r, c].set_title(f"{abundance['class'].values[k]} ({label})", fontsize=9)
            axes[r, c].set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.7, label="abundance")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
