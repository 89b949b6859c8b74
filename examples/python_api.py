"""A scientist's first session with the Python API, as one would type it in a notebook.

    python examples/python_api.py --out /tmp/api-example [--size 96] [--epochs 4]

Simulates a small region (an input cube with its true abundances), trains a small model,
then: opens the cube, unmixes a subset and a single pixel lazily, runs the whole cube on the
notebook's own Dask client, opens the output, writes the GIS products (COGs with QGIS styles,
a STAC catalogue) and a dominant-class quicklook.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distributed import Client, LocalCluster

import msmtu_batch as mb
from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.artifact import save_artifact
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.products.export import dominant_quicklook
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate


def main(out: Path, size: int, epochs: int) -> dict:
    # --- data and a model (a real user has these already) ----------------------------------
    region = simulate(SimulationConfig(height=size, width=size, seed=3, chunk=32, msmtu_pixels=0), out / "region")
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    trained = train(pixels, "level2", TrainConfig(epochs=epochs, hidden=32, embed=8, head_hidden=32))
    model_path = save_artifact(trained.artifact, out / "model.safetensors")

    # --- the API ---------------------------------------------------------------------------
    cube = mb.open_cube(region.cube)  # lazy; the contract is checked from the metadata
    model = mb.load_model(model_path)
    print(f"model: {model.level}, {len(model.classes)} classes: {', '.join(model.classes)}")

    corner = mb.unmix(cube.isel(y=slice(0, 32), x=slice(0, 32)), model)  # lazy: nothing computed yet
    olive = corner["abundance"].sel(lulc_class="olive_grove").mean().compute()
    print(f"mean olive-grove abundance in the 32 x 32 corner: {float(olive):.3f}")
    pixel = mb.unmix(cube.isel(y=[10], x=[20]), model).compute()  # one pixel
    print("pixel (10, 20):", {str(c): round(float(v), 3) for c, v in
                              zip(pixel["lulc_class"].values, pixel["abundance"].values[:, 0, 0])})

    # the whole cube, distributed and resumable, on the notebook's own cluster
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        summary = mb.run(region.cube, model_path, out / "products" / "2013" / "abundance.zarr")
    print(f"run: {summary.valid_pixels:,} of {summary.pixels:,} pixels estimated in {summary.seconds:.1f} s")

    maps = mb.open_output(out / "products" / "2013" / "abundance.zarr")
    print(maps["abundance"].attrs["standard_name"], maps.attrs["time_coverage_start"], maps.attrs["model_hash"][:19])
    cogs = mb.export_cogs(out / "products" / "2013" / "abundance.zarr", out / "products" / "2013" / "cog")
    catalog = mb.write_catalog(out / "products")
    figure = dominant_quicklook(out / "products" / "2013" / "abundance.zarr", out / "dominant_class.png")
    print(f"GIS: {len(cogs)} files in {cogs[0].parent}; STAC: {catalog}; quicklook: {figure}")
    return {"corner": corner, "pixel": pixel, "maps": maps, "catalog": catalog, "figure": figure}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=96, help="side of the simulated region (pixels)")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    main(args.out, args.size, args.epochs)
