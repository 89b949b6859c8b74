"""Training throughput of msmtu-batch versus the research-code way, in the same run.

    python benchmarks/train_speed.py [--pixels 4000] [--epochs 3]

Both train BRITS (hidden 100, all ancillary) with the same batch size on the same training
pixels of a simulated Andalusia-MSMTU folder: msmtu-batch from the compact array store in
memory with its restructured model, the baseline as research code does it: one JSON file
per pixel through a torch DataLoader into the straightforward per-step model.
Throughputs are also given as a fraction of the machine's training ceiling: the measured
fp32 rate of the LSTM cell's matrix product divided by ~3 x the forward FLOPs per pixel.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from msmtu_batch.bench import TRAINING_FLOPS_FACTOR, brits_flops_per_pixel, lstm_gemm_rate
from msmtu_batch.inputs.cube import ANCILLARY_SETS
from msmtu_batch.inputs.training_data import read_msmtu
from msmtu_batch.model.brits import BritsConfig
from msmtu_batch.model.preprocess import Standardizer
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate
from msmtu_batch.testing.research import ResearchBRITS, naive_training_throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=4000, help="pixels in the MSMTU sample")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        simulate(SimulationConfig(height=200, width=300, msmtu_pixels=args.pixels), tmp)
        root = Path(tmp) / "msmtu"
        start = time.perf_counter()
        pixels = read_msmtu(root, "level2")
        convert = time.perf_counter() - start
        start = time.perf_counter()
        read_msmtu(root, "level2")
        cached = time.perf_counter() - start

        cfg = TrainConfig(epochs=args.epochs, patience=args.epochs, batch_size=args.batch_size)
        ours = train(pixels, "level2", cfg).train_pixels_per_second

        names = ANCILLARY_SETS["all"]
        train_set = pixels.split("train")
        model = ResearchBRITS(BritsConfig(n_classes=len(pixels.classes), n_ancillary=len(names)))
        naive = naive_training_throughput(root, "level2", model, Standardizer.fit(train_set.values, train_set.masks),
                                          names, Standardizer.fit(train_set.ancillary), args.batch_size)
        flops = brits_flops_per_pixel(model.cfg) * TRAINING_FLOPS_FACTOR
        ceiling = lstm_gemm_rate() / flops

    print(f"train pixels: {len(train_set)}; JSON -> array store once: {convert:.2f} s, then {cached:.3f} s")
    print(f"LSTM GEMM ceiling: {ceiling * flops / 1e9:.1f} GFLOP/s fp32 -> {ceiling:,.0f} training pixels/s "
          f"({flops / 1e6:.1f} MFLOP per training pixel)")
    print("| method | training pixels/s | vs research-code way | fraction of ceiling |")
    print("|---|---|---|---|")
    rows = (("msmtu-batch (array store in memory)", ours),
            ("research-code way (JSON per pixel, DataLoader, per-step model)", naive))
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / naive:.2f}x | {rate / ceiling:.1%} |")


if __name__ == "__main__":
    main()
