"""What a scheduled rerun costs: the workflow's first run, a rerun with nothing new, a rerun
after one granule of one year was reprocessed, and a rerun with a new model.

    python benchmarks/workflow_rerun.py --out bench-output/workflow [--pixels 240] [--years 2]

Writes a year of MOD09A1-shaped granules (tile h17v05, 46 composites, ``--pixels`` per side)
per year, a DEM, five climate rasters and a boundary, trains a small model on a simulated
region, and runs ``msmtu-batch workflow`` on a LocalCluster four times; prints each run's
seconds and which stages ran, and writes the last run record to OUT/record.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import yaml
from rasterio.transform import from_origin

from msmtu_batch.inputs.cube import CLIMATIC_NAMES
from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.artifact import save_artifact
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate
from msmtu_batch.testing.granules import write_granule

BIN = Path(sys.executable).parent


def write_year(folder: Path, year: int, pixels: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(46):
        start = dt.date(year, 1, 1) + dt.timedelta(days=8 * i)
        doy = start.timetuple().tm_yday
        values = (rng.normal(1500, 300, (7, pixels, pixels)) + 800 * np.sin(2 * np.pi * doy / 365)).astype(np.int16)
        cloudy = rng.random((pixels, pixels)) < 0.3
        write_granule(folder / f"MOD09A1.A{year}{doy:03d}.h17v05.061.hdf", start, (17, 5), values,
                      np.where(cloudy, 0b01001, 0b01000).astype(np.uint16),
                      np.full((pixels, pixels), min(doy + 3, 365), np.int16))


def raster(path: Path, values: np.ndarray) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype="float32", crs="EPSG:4326", transform=from_origin(-10.0, 42.0, 0.05, 0.05)) as dst:
        dst.write(values.astype(np.float32), 1)


def model(folder: Path, seed: int) -> Path:
    region = simulate(SimulationConfig(height=48, width=48, seed=seed, chunk=48, msmtu_pixels=50, split_block=8),
                      folder / f"region-{seed}")
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    result = train(pixels, "level2", TrainConfig(epochs=1, hidden=16, embed=8, head_hidden=16, seed=seed))
    return save_artifact(result.artifact, folder / f"model-{seed}.safetensors")


def workflow(definition: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([BIN / "msmtu-batch", "workflow", str(definition)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    record_path = done.stdout.strip().splitlines()[-1].rsplit("record ", 1)[1]
    return seconds, json.loads(Path(record_path).read_text())


def ran(record: dict) -> str:
    return "; ".join(f"{year}: " + ", ".join(f"{s['stage']} {s['status']}" for s in r["stages"])
                     for year, r in record["years"].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pixels", type=int, default=240)
    parser.add_argument("--years", type=int, default=2)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    downloads, rng = args.out / "downloads", np.random.default_rng(0)
    years = list(range(2013, 2013 + args.years))
    for year in years:
        write_year(downloads / "MOD09A1" / str(year), year, args.pixels, rng)
    raster(downloads / "dem.tif", np.linspace(0, 900, 200 * 300).reshape(200, 300))
    for i, name in enumerate(CLIMATIC_NAMES):
        raster(downloads / f"{name}.tif", np.full((200, 300), 10.0 * (i + 1)))
    ring = [[-4.0, 37.0], [-0.5, 37.0], [-0.5, 39.5], [-4.0, 39.5], [-4.0, 37.0]]
    (downloads / "region.geojson").write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [ring]}}))
    models = [model(args.out, 0), model(args.out, 1)]

    def define(model_path: Path) -> Path:
        path = args.out / "workflow.yaml"
        path.write_text(yaml.safe_dump({"workflow": {
            "years": years, "output": str(args.out / "production"), "model": str(model_path),
            "ingest": {"inputs": [str(downloads / "MOD09A1" / "{year}" / "*.hdf")],
                       "region": str(downloads / "region.geojson"), "crs": "EPSG:25830",
                       "resolution": 1000 * 2400 / args.pixels / 2, "dem": str(downloads / "dem.tif"),
                       "climate": {n: str(downloads / f"{n}.tif") for n in CLIMATIC_NAMES}, "chunk": 128},
            "run": {"chunk": 128, "out_of_distribution": "flag"}}}))
        return path

    rows = []
    seconds, record = workflow(define(models[0]))
    rows.append(("first run", seconds, record))
    seconds, record = workflow(define(models[0]))
    rows.append(("rerun, nothing new", seconds, record))
    changed = sorted((downloads / "MOD09A1" / str(years[-1])).glob("*.hdf"))[10]
    write_year(args.out / "reprocessed", years[-1], args.pixels, np.random.default_rng(1))
    shutil.copy(sorted((args.out / "reprocessed").glob("*.hdf"))[10], changed)
    seconds, record = workflow(define(models[0]))
    rows.append((f"rerun, one granule of {years[-1]} reprocessed", seconds, record))
    seconds, record = workflow(define(models[1]))
    rows.append(("rerun, new model", seconds, record))
    print("| run | seconds | stages |\n|---|---|---|")
    for name, seconds, record in rows:
        print(f"| {name} | {seconds:.1f} | {ran(record)} |")
    (args.out / "record.json").write_text(json.dumps(rows[2][2], indent=2))
    print(f"record of the third run: {args.out / 'record.json'}")


if __name__ == "__main__":
    main()
