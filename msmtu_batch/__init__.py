"""msmtu-batch: LULC abundance mapping from MODIS monthly time series with BRITS.

The Python API (the command line is a thin layer over it)::

    import msmtu_batch as mb

    cube = mb.open_cube("cube.zarr")              # input cube, lazy, contract checked
    model = mb.load_model("model.safetensors")    # a model artifact (no pickle)
    maps = mb.unmix(cube.isel(y=slice(0, 64), x=slice(0, 64)), model)  # lazy products
    maps["abundance"].sel(lulc_class="olive_grove").plot()
    mb.run("cube.zarr", "model.safetensors", "out.zarr")  # distributed, resumable (uses your Client)
    archive = mb.open_output("products/")         # one store, or many years along `time`
"""

from importlib import import_module
from typing import TYPE_CHECKING

from msmtu_batch.runtime.provenance import __version__

# Public name -> module. Imported on first use, so that `import msmtu_batch` stays light (the
# CLI's --help, a Dask worker unpickling one function) and torch loads only when needed.
_API = {
    "open_cube": "msmtu_batch.products.blocks",
    "unmix": "msmtu_batch.products.blocks",
    "RunConfig": "msmtu_batch.products.blocks",
    "load_model": "msmtu_batch.model.artifact",
    "run": "msmtu_batch.orchestration.pipeline",
    "open_output": "msmtu_batch.products.archive",
    "open_archive": "msmtu_batch.products.archive",
    "write_catalog": "msmtu_batch.products.catalog",
    "export_cogs": "msmtu_batch.products.export",
}
_RENAMED = {"load_model": "load_artifact"}
__all__ = ["RunConfig", "__version__", "export_cogs", "load_model", "open_archive", "open_cube", "open_output", "run",
           "unmix", "write_catalog"]

if TYPE_CHECKING:
    from msmtu_batch.model.artifact import load_artifact as load_model
    from msmtu_batch.orchestration.pipeline import run
    from msmtu_batch.products.archive import open_archive, open_output
    from msmtu_batch.products.blocks import RunConfig, open_cube, unmix
    from msmtu_batch.products.catalog import write_catalog
    from msmtu_batch.products.export import export_cogs


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'msmtu_batch' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
