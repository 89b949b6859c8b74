"""One model for both levels against two separate models (issue 15, part 3).

Per seed: a simulated region (``msmtu-batch simulate`` defaults), a level-2 model, a level-1
model and a two-level model (level-2 head, loss on both levels, level 1 as the sums), all with
the same settings; their test RMSE at each level against the reference's own level-1 and
level-2 abundances (not sums computed here). The level-2 model's sums are reported too: they
are consistent as well, without the level-1 loss.

    python benchmarks/two_level.py --out /tmp/two-level [--seeds 0 1] [--epochs 20]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from msmtu_batch.bench import over_seeded_regions
from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.hierarchy import hierarchy_in_training_data
from msmtu_batch.model.inference import predict
from msmtu_batch.model.metrics import rmse
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate


def measure(folder: Path, seed: int, epochs: int, size: tuple[int, int] | None) -> list[dict]:
    shape = {} if size is None else {"height": size[0], "width": size[1]}
    simulate(SimulationConfig(seed=seed, **shape), folder, overwrite=True)
    cube, reference = folder / "cube.zarr", folder / "reference.zarr"
    pixels = {level: read_cube_reference(cube, reference, level) for level in ("level1", "level2")}
    test = {level: p.split("test") for level, p in pixels.items()}
    hierarchy = hierarchy_in_training_data(None, reference, pixels["level2"].classes, "level2")
    cfg = TrainConfig(epochs=epochs, patience=epochs, seed=seed)
    rows = []
    for name, level, levels in (("level 2 only", "level2", None), ("level 1 only", "level1", None),
                                ("two-level", "level2", hierarchy)):
        start = time.perf_counter()
        result = train(pixels[level], level, cfg, hierarchy=levels)
        abundance = predict(result.artifact.model, result.artifact.inputs(test[level]), imputed=False)["abundance"]
        row = {"seed": seed, "model": name, "epochs": len(result.history), "best_epoch": result.best_epoch,
               "seconds": time.perf_counter() - start}
        if level == "level2":
            row["test_rmse_level2"] = rmse(abundance, test["level2"].abundance)
            row["test_rmse_level1"] = rmse(hierarchy.coarse(abundance), test["level1"].abundance)
        else:
            row["test_rmse_level1"] = rmse(abundance, test["level1"].abundance)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    args, rows = over_seeded_regions(__doc__.splitlines()[0], measure)
    print("| seed | model | epochs (best) | test RMSE level 2 | test RMSE level 1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        level2 = f"{r['test_rmse_level2']:.5f}" if "test_rmse_level2" in r else "-"
        print(f"| {r['seed']} | {r['model']} | {r['epochs']} ({r['best_epoch']}) | {level2} | "
              f"{r['test_rmse_level1']:.5f} |")
    (args.out / "two_level.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
