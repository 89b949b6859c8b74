"""The end-to-end demo behind `make demo`: simulate, train, unmix on this machine, report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr

from msmtu_batch.inputs.cube import CLASS_DIM, open_input_cube
from msmtu_batch.inputs.training_data import PARTITIONS, read_cube_reference
from msmtu_batch.model.artifact import save_artifact
from msmtu_batch.model.metrics import abundance_metrics
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.orchestration.pipeline import RunConfig, run
from msmtu_batch.products.export import dominant_quicklook, quicklook
from msmtu_batch.synthetic.simulate import SimulationConfig, describe_region, simulate


def run_demo(out: Path, height: int = 200, width: int = 300, seed: int = 0, epochs: int = 10,
             say: Callable[[str], None] = print, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Simulate a region, train a level-2 model, unmix the whole cube, score it on the test blocks."""
    start = time.perf_counter()
    simulate(SimulationConfig(height=height, width=width, seed=seed), out, overwrite=True)
    open_input_cube(out / "cube.zarr")
    say(f"simulated and validated {out / 'cube.zarr'} in {time.perf_counter() - start:.1f} s")
    say(describe_region(out))

    pixels = read_cube_reference(out / "cube.zarr", out / "reference.zarr", "level2")
    trained = train(pixels, "level2", TrainConfig(epochs=epochs, patience=3, seed=seed), on_epoch=on_epoch,
                    source=str(out))
    model = save_artifact(trained.artifact, out / "model.safetensors")
    say(f"trained {model} in {trained.seconds:.0f} s: best validation RMSE {trained.validation_rmse:.4f} "
        f"(epoch {trained.best_epoch})")

    summary = run(out / "cube.zarr", model, out / "abundance.zarr", config=RunConfig(chunk=128), overwrite=True,
                  cog_dir=out / "cogs")
    say(f"unmixed {summary.pixels:,} pixels ({summary.valid_pixels:,} estimated) on this machine in "
        f"{summary.seconds:.1f} s -> {out / 'abundance.zarr'} and {out / 'cogs'}/*.tif")

    reference = xr.open_zarr(out / "reference.zarr", group="level2")["abundance"].load()
    partition = xr.open_zarr(out / "reference.zarr")["partition"].values
    estimated = xr.open_zarr(out / "abundance.zarr")
    predicted = estimated["abundance"].values
    test = (partition == PARTITIONS.index("test")) & (estimated["quality_flag"].values == 0)
    metrics = abundance_metrics(predicted[:, test].T, reference.values[:, test].T,
                                [str(c) for c in reference[CLASS_DIM].values])
    say(f"accuracy on {int(test.sum()):,} test-block pixels against the simulated truth: RMSE "
        f"{metrics['rmse']:.4f}, MAE {metrics['mae']:.4f}, mean R2 {metrics['class_average']['r2']:.3f}, "
        f"dominant class {metrics['dominant_accuracy']:.1%}")
    figure = quicklook(out / "abundance.zarr", out / "abundance_map.png", reference)
    classes = dominant_quicklook(out / "abundance.zarr", out / "dominant_class.png")
    say(f"maps: {figure}, {classes}")
    say(f"demo finished in {time.perf_counter() - start:.0f} s")
    return {"metrics": metrics, "summary": summary, "seconds": time.perf_counter() - start,
            "test_pixels": int(np.sum(test))}
