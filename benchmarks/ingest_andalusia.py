"""Ingest time and memory for an Andalusia-sized input: 46 full-size MOD09A1 granules of two
tiles (h17v05 + h18v05, 2400 x 2400 pixels, deflate-compressed like the product), a 3-arcsecond
geographic DEM and five 30-arcsecond climate rasters, cut to a 1200 x 800-pixel region that
straddles the tile seam (so every date reads both granules).

    python benchmarks/ingest_andalusia.py [--out DIR] [--chunk 256] [--crs EPSG:25830 --resolution 460]
                                          [--years 2] [--repeat 3]

Writes DIR/inputs/ once (2-3.5 minutes a year) and reuses it. Reports the ingest's wall time
(with its phases), each worker's and the driver's peak memory, and, as the baseline of the same
run, the time one process takes only to read, once, every window the cube needs: the region's
window of every granule layer (the decompression floor) and of the DEM and climate rasters.
``--years 2`` ingests 2013 and 2014 at once on one cluster, against the sum of both floors;
``--hdf-chunks 480 --dates 12`` writes granules stored in HDF4 chunks and ingests them by chunk
(each task reads its window) and by date (the default), against their floor. ``--repeat N``
measures the floor and the ingest N times, alternately (a shared VM's speed drifts by a
quarter within minutes: each ingest is held to the floor measured just before it), and
reports every pair's ratio and their median.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TILE = 2400
YEARS = (2013, 2014)
REGION_PIXELS = (800, 1200)  # rows, columns


def granule_folder(folder: Path, year: int) -> Path:
    return folder / ("granules" if year == YEARS[0] else f"granules-{year}")


def write_granules(granules: Path, year: int, seed: int, chunks: int | None = None, dates: int = 46) -> None:
    """The year's granules of h17v05 and h18v05 (the first ``dates`` composites), deflate-compressed,
    stored whole as MODAPS does or in ``chunks`` x ``chunks`` HDF4 chunks."""
    from msmtu_batch.testing.granules import write_granule

    granules.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    base = [(1500 + 800 * np.sin(rows / 170 + b) * np.cos(cols / 230)).astype(np.int16) for b in range(7)]
    for i, h in ((i, h) for i in range(dates) for h in (17, 18)):
        start = dt.date(year, 1, 1) + dt.timedelta(days=8 * i)
        doy0 = start.timetuple().tm_yday
        path = granules / f"MOD09A1.A{year}{doy0:03d}.h{h}v05.061.2021000000000.hdf"
        if path.exists():
            continue
        season = int(400 * np.sin(2 * np.pi * doy0 / 365))
        clouds = rng.random((TILE // 60, TILE // 60)) < 0.3  # 28 km cloud cells
        qa = np.where(np.kron(clouds, np.ones((60, 60), bool)), 0b01001, 0b01000).astype(np.uint16)
        doy = (doy0 + (np.arange(TILE)[:, None] // 300 + np.arange(TILE)[None] // 300) % 8).astype(np.int16)
        doy = np.minimum(doy, 365).astype(np.int16)
        write_granule(path, start, (h, 5), np.stack([b + season for b in base]), qa, doy,
                      chunks=None if chunks is None else (chunks, chunks))


def write_inputs(folder: Path, years: int = 1) -> None:
    import geopandas as gpd
    import rasterio
    from rasterio.transform import from_origin
    from shapely.geometry import box

    from msmtu_batch.inputs.cube import CLIMATIC_NAMES
    from msmtu_batch.inputs.modis import SINUSOIDAL_CRS, TILE_SIZE
    from msmtu_batch.testing.granules import tile_upper_left

    for k, year in enumerate(YEARS[:years]):
        write_granules(granule_folder(folder, year), year, seed=k)
    top = tile_upper_left(18, 5)[1]  # the region is centred on the seam x = 0
    pixel = TILE_SIZE / TILE
    region = box(-REGION_PIXELS[1] / 2 * pixel, top - 300 * pixel - REGION_PIXELS[0] * pixel,
                 REGION_PIXELS[1] / 2 * pixel, top - 300 * pixel)
    gpd.GeoDataFrame(geometry=[region], crs=SINUSOIDAL_CRS.to_wkt()).to_file(folder / "region.gpkg")
    # DEM: 3 arc-seconds over lon -3.4..3.4, lat 35.2..38.9 (about 34 M pixels, SRTM-like)
    step = 1 / 1200
    width, height = round(6.8 / step), round(3.7 / step)
    dem_path = folder / "dem_3arcsec.tif"
    if not dem_path.exists():
        profile = dict(driver="GTiff", width=width, height=height, count=1, dtype="float32", crs="EPSG:4326",
                       transform=from_origin(-3.4, 38.9, step, step), tiled=True, blockxsize=512, blockysize=512,
                       compress="deflate", nodata=-9999.0)
        with rasterio.open(dem_path, "w", **profile) as dst:
            for _, window in dst.block_windows(1):
                r, c = np.mgrid[window.row_off:window.row_off + window.height,
                                window.col_off:window.col_off + window.width].astype(np.float32)
                dst.write((600 + 500 * np.sin(r / 900) * np.cos(c / 700) + 0.5 * r).astype(np.float32), 1,
                          window=window)
    step = 1 / 120  # climate: 30 arc-seconds (about 1 km)
    for i, name in enumerate(CLIMATIC_NAMES):
        path = folder / f"{name}.tif"
        if not path.exists():
            values = (10 * (i + 1) + np.random.default_rng(i).random((round(3.7 / step), round(6.8 / step))))
            with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                               dtype="float32", crs="EPSG:4326", transform=from_origin(-3.4, 38.9, step, step)) as dst:
                dst.write(values.astype(np.float32), 1)


def read_floor(folder: Path, granules: Path) -> dict[str, float]:
    """Seconds one process needs only to read, once, every window the cube needs: the region's
    window of every granule layer, and the DEM's and climate rasters' windows covering it."""
    import rasterio

    from msmtu_batch.inputs.ancillary import MARGIN
    from msmtu_batch.inputs.cube import CLIMATIC_NAMES
    from msmtu_batch.inputs.modis import open_reflectance
    from msmtu_batch.orchestration.ingest import IngestConfig, _read_region, plan_grid
    from msmtu_batch.runtime.tiling import covering_window

    source = open_reflectance([granules])
    grid = plan_grid(source.grid, IngestConfig(region=folder / "region.gpkg"), _read_region(folder / "region.gpkg"))
    row0, col0 = grid.native_offset
    start = time.perf_counter()
    for observation in source.observations:
        observation.read(row0, row0 + grid.height, col0, col0 + grid.width)
    granules = time.perf_counter() - start
    start = time.perf_counter()
    for path in [folder / "dem_3arcsec.tif", *(folder / f"{name}.tif" for name in CLIMATIC_NAMES)]:
        with rasterio.open(path) as src:
            r0, r1, c0, c1 = covering_window(grid.crs, grid.transform, grid.height, grid.width, src.crs,
                                             src.transform, src.height, src.width, MARGIN)
            src.read(1, window=((r0, r1), (c0, c1)))
    return {"granules": granules, "ancillary": time.perf_counter() - start}


def ingest_child(folder: Path, out: Path, chunk: int, crs: str | None, resolution: float | None,
                 years: int, granules: Path | None, read_order: str) -> None:
    from msmtu_batch.inputs.cube import CLIMATIC_NAMES
    from msmtu_batch.orchestration.ingest import IngestConfig, ingest, ingest_years
    from msmtu_batch.runtime.tiling import peak_memory_mib

    config = IngestConfig(inputs=[granules] if granules else [granule_folder(folder, y) for y in YEARS[:years]],
                          region=folder / "region.gpkg", dem=folder / "dem_3arcsec.tif",
                          climate={n: folder / f"{n}.tif" for n in CLIMATIC_NAMES}, chunk=chunk, crs=crs,
                          resolution=resolution, read_order=read_order)
    start = time.perf_counter()
    if years == 1:
        summaries = [ingest(config, out, overwrite=True)]
    else:  # every year at once on one cluster
        summaries = ingest_years(config, YEARS[:years], str(out).replace(".zarr", "-{year}.zarr"), overwrite=True)
    summary = summaries[0]
    print(json.dumps({"seconds": time.perf_counter() - start, "height": summary.height, "width": summary.width,
                      "chunks": summary.chunks, "observations": sum(s.observations for s in summaries),
                      "observed_pixels": sum(s.observed_pixels for s in summaries),
                      "worker_peak_mib": {w: max(s.worker_peak_mib.get(w, 0) for s in summaries)
                                          for w in summary.worker_peak_mib},
                      "phase_seconds": {f"{YEARS[i]} {k}": round(v, 2) for i, s in enumerate(summaries)
                                        for k, v in s.phase_seconds.items()},
                      "driver_peak_mib": peak_memory_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-output/ingest"))
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--crs")
    parser.add_argument("--resolution", type=float)
    parser.add_argument("--years", type=int, choices=(1, 2), default=1, help="ingest 2013 (and 2014) at once")
    parser.add_argument("--hdf-chunks", type=int, help="granules in HDF4 chunks of this side: both reading "
                        "orders against each other (with --dates)")
    parser.add_argument("--dates", type=int, default=46, help="composites of the --hdf-chunks granules")
    parser.add_argument("--repeat", type=int, default=1, help="floor and ingest measured this many times, "
                        "alternately; the median ratio is reported")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--granules", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--read-order", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    inputs, cube = args.out / "inputs", args.out / "cube.zarr"
    if args.child:
        ingest_child(inputs, cube, args.chunk, args.crs, args.resolution, args.years, args.granules, args.read_order)
        return
    start = time.perf_counter()
    write_inputs(inputs, args.years)
    granule_sets = [(None, granule_folder(inputs, year)) for year in YEARS[:args.years]]
    orders = ["auto"]
    if args.hdf_chunks:
        chunked = inputs / f"granules-chunked{args.hdf_chunks}-{args.dates}"
        write_granules(chunked, YEARS[0], seed=0, chunks=args.hdf_chunks, dates=args.dates)
        granule_sets, orders = [(chunked, chunked)], ["by-chunk", "by-date"]
    print(f"inputs ready in {time.perf_counter() - start:.0f} s "
          f"({sum(p.stat().st_size for p in inputs.rglob('*') if p.is_file()) / 2**30:.2f} GiB)")
    for order in orders:
        runs = [measure_once(args, granule_sets, order) for _ in range(args.repeat)]
        result = sorted(runs, key=lambda r: r["seconds"] / r["read_floor_seconds"])[len(runs) // 2]  # median
        if args.repeat > 1:
            result["repeats"] = [{"seconds": r["seconds"], "read_floor_seconds": r["read_floor_seconds"],
                                  "ratio": r["seconds"] / r["read_floor_seconds"],
                                  "phase_seconds": r["phase_seconds"], "worker_peak_mib": r["worker_peak_mib"]}
                                 for r in runs]
        print(json.dumps(result, indent=2))
        name = f"ingest-{args.chunk}-{(args.crs or 'native').replace(':', '')}-{args.years}y"
        if args.hdf_chunks:
            name += f"-hdf{args.hdf_chunks}-{order}"
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))


def measure_once(args: argparse.Namespace, granule_sets: list[tuple[Path | None, Path]], order: str) -> dict:
    """The floor, then the ingest in a fresh process, with their ratio."""
    inputs = args.out / "inputs"
    floors = {f"{folder.name} {part}": seconds for _, folder in granule_sets
              for part, seconds in read_floor(inputs, folder).items()}
    floor = sum(floors.values())
    command = [sys.executable, __file__, "--child", "--out", str(args.out), "--chunk", str(args.chunk),
               "--years", str(args.years), "--read-order", order]
    if args.crs:
        command += ["--crs", args.crs, "--resolution", str(args.resolution)]
    if granule_sets[0][0]:
        command += ["--granules", str(granule_sets[0][0])]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    for store in args.out.glob("cube*.zarr"):
        shutil.rmtree(store, ignore_errors=True)
    pixels = result["height"] * result["width"] * args.years
    print(f"ingest {result['seconds']:.2f} s, floor {floor:.2f} s: {result['seconds'] / floor:.2f}x", flush=True)
    return result | {"read_floor_seconds": floor, "read_floor_parts": floors,
                     "pixels_per_second": pixels / result["seconds"], "vs_read_floor": floor / result["seconds"],
                     "date": dt.date.today().isoformat(),
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "chunk": args.chunk, "grid": args.crs or "native sinusoidal", "years": args.years,
                     "hdf_chunks": args.hdf_chunks, "read_order": order}


if __name__ == "__main__":
    main()
