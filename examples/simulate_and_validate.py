"""Simulate a small region with the Python API, validate it and look at it with xarray.

    python examples/simulate_and_validate.py --out /tmp/example --height 64 --width 96
"""

from __future__ import annotations

import argparse
from pathlib import Path

import xarray as xr

from msmtu_batch.inputs.cube import BAND_COMMON_NAMES, observed_mask, open_input_cube
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    result = simulate(SimulationConfig(height=args.height, width=args.width, seed=args.seed,
                                       msmtu_pixels=200), args.out, overwrite=True)
    cube = open_input_cube(result.cube)  # lazy, validated against the contract
    level2 = xr.open_zarr(result.reference, group="level2")["abundance"]

    # Mean July NDVI where the pixel is mostly irrigated crop versus mostly winter cereal.
    usable = observed_mask(cube["reflectance"].values, cube["state_qa"].values)
    refl = cube["reflectance"].where(usable) * cube["reflectance"].attrs["scale_factor"]
    red, nir = (refl.sel(band=cube["band"][BAND_COMMON_NAMES.index(b)]) for b in ("red", "nir1"))
    ndvi_july = ((nir - red) / (nir + red)).sel(time=f"{cube['time'].dt.year[0].item()}-07")
    for name in ("irrigated_crop", "winter_cereal"):
        mostly = level2.sel(lulc_class=name) > 0.5
        print(f"July NDVI where {name} > 50 %: {float(ndvi_july.where(mostly).mean()):.2f} "
              f"({int(mostly.sum())} pixels)")
    print(f"valid input cube {result.cube} with CRS {cube.rio.crs}")


if __name__ == "__main__":
    main()
