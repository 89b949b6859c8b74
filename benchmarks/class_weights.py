"""Class weights and soft labels (the research code's options) on rare classes (issue 15, part 6).

Per seed: a simulated region (``msmtu-batch simulate`` defaults), three level-2 models with the
same settings but the label options: soft labels without weights (the default), soft labels
with balanced class weights, hard labels (one-hot dominant class). Prints each class's mean
training abundance and test RMSE per model, and the overall test RMSE.

    python benchmarks/class_weights.py --out /tmp/class-weights [--seeds 0 1] [--epochs 20]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from msmtu_batch.bench import over_seeded_regions
from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.inference import predict
from msmtu_batch.model.metrics import rmse
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate

OPTIONS = {"soft, no weights (default)": {}, "soft, balanced weights": {"class_weight": "balanced"},
           "hard labels": {"soft_labels": False}}
RARE = ("urban", "water", "bare_soil")


def measure(folder: Path, seed: int, epochs: int, size: tuple[int, int] | None) -> list[dict]:
    shape = {} if size is None else {"height": size[0], "width": size[1]}
    simulate(SimulationConfig(seed=seed, **shape), folder, overwrite=True)
    pixels = read_cube_reference(folder / "cube.zarr", folder / "reference.zarr", "level2")
    test = pixels.split("test")
    share = dict(zip(pixels.classes, pixels.split("train").abundance.mean(axis=0).tolist()))
    rows = []
    for name, options in OPTIONS.items():
        artifact = train(pixels, "level2", TrainConfig(epochs=epochs, patience=epochs, seed=seed, **options)).artifact
        abundance = predict(artifact.model, artifact.inputs(test), imputed=False)["abundance"]
        per_class = np.sqrt(((abundance - test.abundance) ** 2).mean(axis=0))
        row = {"seed": seed, "options": name, "test_rmse": rmse(abundance, test.abundance),
               "per_class_rmse": dict(zip(pixels.classes, per_class.tolist())), "train_share": share}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    args, rows = over_seeded_regions(__doc__.splitlines()[0], measure)
    print("| seed | labels | test RMSE | " + " | ".join(f"{c} RMSE (share)" for c in RARE) + " |")
    print("|---|---|---|" + "---|" * len(RARE))
    for r in rows:
        print(f"| {r['seed']} | {r['options']} | {r['test_rmse']:.5f} | " + " | ".join(
            f"{r['per_class_rmse'][c]:.4f} ({r['train_share'][c]:.3f})" for c in RARE) + " |")
    (args.out / "class_weights.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
