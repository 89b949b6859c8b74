"""Write a year of small MOD09A1-layout granules (two tiles), ingest them with the Python API
onto ETRS89 / UTM 30N inside a boundary, and look at the monthly composites with xarray.

    python examples/ingest_granules.py --out /tmp/ingest-example [--pixels 24]

Real granules have 2400 x 2400 pixels; any size works for trying the path end to end. The
granules are written through the HDF-EOS2 library, as MODAPS writes them: Debian's
``libhdfeos0`` (``make system-packages``); without it the example says so in one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from msmtu_batch.inputs.cube import open_input_cube
from msmtu_batch.orchestration.ingest import IngestConfig, ingest
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.testing.granules import write_granule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pixels", type=int, default=24)
    args = parser.parse_args()
    n, rng = args.pixels, np.random.default_rng(0)
    granules = args.out / "granules"
    granules.mkdir(parents=True, exist_ok=True)
    for i in range(46):
        start = dt.date(2013, 1, 1) + dt.timedelta(days=8 * i)
        doy = start.timetuple().tm_yday
        for h in (17, 18):
            reflectance = (rng.normal(1500, 300, (7, n, n)) + 800 * np.sin(2 * np.pi * doy / 365)).astype(np.int16)
            cloudy = rng.random((n, n)) < 0.4  # StateQA cloud state 01 (cloudy), else clear land
            write_granule(granules / f"MOD09A1.A2013{doy:03d}.h{h}v05.061.hdf", start, (h, 5), reflectance,
                          np.where(cloudy, 0b01001, 0b01000).astype(np.uint16),
                          np.full((n, n), min(doy + 3, 365), np.int16))
    ring = [[-4.0, 37.0], [3.0, 37.0], [3.0, 39.5], [-4.0, 39.5], [-4.0, 37.0]]
    (args.out / "region.geojson").write_text(json.dumps({"type": "Feature", "properties": {},
                                                         "geometry": {"type": "Polygon", "coordinates": [ring]}}))

    config = IngestConfig(inputs=[granules], region=args.out / "region.geojson", crs="EPSG:25830",
                          resolution=20000, chunk=16)
    summary = ingest(config, args.out / "cube.zarr", overwrite=True)
    cube = open_input_cube(summary.out, ancillary=summary.ancillary)  # validated against the contract
    counts = xr.open_zarr(summary.out)["clear_count"]
    inside = counts.sum("time") > 0
    print(f"{summary.out}: {summary.height} x {summary.width} pixels, {int(inside.sum())} inside the region")
    print("mean clear observations per month:", np.round(counts.where(inside).mean(("y", "x")).values, 2))
    red = cube["reflectance"].sel(band="sur_refl_b01").where(lambda v: v != -28672) * 1e-4
    print("mean red reflectance per month:", np.round(red.mean(("y", "x")).values, 3))


if __name__ == "__main__":
    try:
        main()
    except MsmtuError as exc:  # what this machine lacks, or bad input: one line, as the command says it
        print(f"{Path(__file__).name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
