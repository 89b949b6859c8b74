"""GPU check in one command: is CUDA seen and used, how fast is the model on it against the
GPU's own GEMM rate, does the pipeline route to a GPU worker and give the CPU's abundances,
and how fast does training run there.

    python benchmarks/gpu_check.py [--out gpu-check] [--size 2048] [--cpu-workers N]

Sections (each timed; under 5 minutes on one H100/H200-class GPU):

1. the device: CUDA visible (name, memory, torch and CUDA versions), or "no GPU" (everything
   below then runs on the CPU, as CI does, to keep this script working);
2. the GEMM rate at the LSTM cell's shape (batch x 114 @ 114 x 400) in fp32, TF32, bf16 and
   fp16 (fp32 and bf16 on a CPU);
3. the model alone (an untrained model of the default size; speed does not depend on the
   weights) on prepared inputs in host memory, copied to the device batch by batch as the
   pipeline does, at several batch sizes and precisions, against that GEMM rate (the
   ceiling of the precision used / the model's FLOPs per pixel);
4. equality: the device's abundances in fp32 against the CPU engine's on the same pixels,
   and each reduced precision against fp32 (maximum absolute difference);
5. the pipeline end to end on a simulated ``--size`` x ``--size`` region: one worker
   advertising ``GPU=1`` plus ``--cpu-workers`` CPU workers on 127.0.0.1, the cluster's
   start included; which workers ran the model;
6. training: one epoch on the demo data (a 200 x 300 simulated region) on the device, against
   one epoch on 2 CPU threads (the development machines' cores) in the same run.

Prints a table per section and writes everything to ``OUT/gpu_check.json``. Targets (issue
14, one H100/H200-class GPU): model alone at least 5 M pixels/s; the 2048 x 2048 region end
to end in under 20 s including the cluster's start; training at least 20x the 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

TARGETS = {"model_pixels_per_second": 5e6, "pipeline_seconds": 20.0, "training_speedup": 20.0}
EQUALITY_TOLERANCE = 1e-4  # fp32 on the device against the CPU engine, abundance units


@contextlib.contextmanager
def precision_mode(precision: str) -> Iterator[str]:
    """TF32 is fp32 with TensorFloat-32 matrix products (a backend switch); the others are
    the model's own precisions. Yields the precision ``predict`` takes."""
    if precision != "tf32":
        yield precision
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def device_facts() -> dict:
    facts = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
             "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts |= {"device": "cuda", "name": props.name, "memory_gib": props.total_memory / 2**30,
                  "cuda": torch.version.cuda, "devices": torch.cuda.device_count()}
    else:
        facts |= {"device": "cpu", "name": "no GPU"}
    return facts


def gemm_rates(device: str, seconds: float) -> dict[str, float]:
    from msmtu_batch.bench import lstm_gemm_rate

    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    precisions = ("fp32", "tf32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16")
    rates = {}
    for precision in precisions:
        with precision_mode(precision):
            rates[precision] = lstm_gemm_rate(batch=65_536 if device == "cuda" else 4096, seconds=seconds,
                                              device=device, dtype=dtypes[precision])
    return rates


def model_rates(artifact, inputs, device: str, pixels: int, batch_sizes: list[int], precisions: list[str],
                gemm: dict[str, float]) -> list[dict]:
    from msmtu_batch.bench import brits_flops_per_pixel, model_only_throughput

    flops = brits_flops_per_pixel(artifact.config)
    rows = []
    for precision in precisions:
        for batch_size in batch_sizes:
            with precision_mode(precision) as mode:
                rate = model_only_throughput(artifact, inputs, fused=device == "cpu", pixels=pixels,
                                             batch_size=batch_size, device=device, precision=mode)
            rows.append({"precision": precision, "batch_size": batch_size, "pixels_per_second": rate,
                         "fraction_of_ceiling": rate * flops / gemm[precision]})
            if device == "cpu":
                break  # the fused engine (fp32 and bf16) tiles by itself: one batch size
    return rows


def equality(artifact, inputs, device: str, precisions: list[str]) -> list[dict]:
    from msmtu_batch.model.inference import predict

    reference = predict(artifact.model.cpu(), inputs, imputed=False)["abundance"]  # the CPU engine
    artifact.model.to(device)
    rows = []
    for precision in ["fp32", *(p for p in precisions if p != "fp32")]:
        with precision_mode(precision) as mode:
            got = predict(artifact.model, inputs, 8192, device=device, imputed=False, fused=False,
                          precision=mode)["abundance"]
        rows.append({"precision": precision, "against": "CPU engine, fp32",
                     "max_abs_difference": float(np.abs(got - reference).max())})
    artifact.model.cpu()
    return rows


def gpu_cluster(cpu_workers: int):
    """A scheduler and worker processes on 127.0.0.1: one advertising ``GPU=1`` (the model's
    stage goes there), ``cpu_workers`` without (reading and preparing chunks)."""
    from distributed import Nanny, Scheduler, SpecCluster

    common = {"nthreads": 1, "host": "127.0.0.1", "silence_logs": logging.ERROR}
    workers = {f"cpu-{i}": {"cls": Nanny, "options": common} for i in range(cpu_workers)}
    workers["gpu"] = {"cls": Nanny, "options": common | {"resources": {"GPU": 1}}}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}, silence_logs=logging.ERROR)


def pipeline_check(region: Path, model_path: Path, out: Path, cpu_workers: int) -> dict:
    from distributed import Client

    from msmtu_batch.orchestration.pipeline import RunConfig, run

    start = time.perf_counter()
    with gpu_cluster(cpu_workers) as cluster, Client(cluster) as client:
        started = time.perf_counter() - start
        summary = run(region / "cube.zarr", model_path, out / "gpu-check-output.zarr", config=RunConfig(),
                      scheduler=client, overwrite=True)
        gpu_address = next(a for a, w in client.scheduler_info()["workers"].items()
                           if w.get("resources", {}).get("GPU"))
    seconds = time.perf_counter() - start
    return {"pixels": summary.pixels, "seconds_with_cluster_start": seconds, "cluster_start_seconds": started,
            "run_seconds": summary.seconds, "pixels_per_second": summary.pixels / seconds,
            "model_ran_on": sorted(summary.workers), "model_only_on_the_gpu_worker": set(summary.workers) == {
                gpu_address}, "prepared_by": summary.prepared_by}


def training_check(demo: Path, device: str, epochs: int, baseline_threads: int) -> dict:
    from msmtu_batch.inputs.training_data import read_cube_reference
    from msmtu_batch.model.train import TrainConfig, train

    pixels = read_cube_reference(demo / "cube.zarr", demo / "reference.zarr", "level2")
    cfg = TrainConfig(epochs=epochs, patience=epochs)
    if device == "cuda":  # CUDA's context and kernels load on first use: not part of the rate
        train(pixels, "level2", cfg.model_copy(update={"epochs": 1, "patience": 1}), device=device)
    on_device = train(pixels, "level2", cfg, device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(baseline_threads)
    try:
        on_cpu = train(pixels, "level2", cfg, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return {"train_pixels": on_device.artifact.training["train_pixels"], "epochs": epochs,
            "device_pixels_per_second": on_device.train_pixels_per_second,
            "cpu_threads": baseline_threads, "cpu_pixels_per_second": on_cpu.train_pixels_per_second,
            "speedup": on_device.train_pixels_per_second / on_cpu.train_pixels_per_second,
            "device_validation_rmse": on_device.validation_rmse, "cpu_validation_rmse": on_cpu.validation_rmse}


def table(say: Callable[[str], None], header: list[str], rows: list[list[str]]) -> None:
    say("| " + " | ".join(header) + " |")
    say("|" + "---|" * len(header))
    for row in rows:
        say("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--size", type=int, default=2048, help="side of the pipeline's simulated region")
    parser.add_argument("--cpu-workers", type=int, help="CPU workers beside the GPU one (default: cores - 2)")
    parser.add_argument("--model-pixels", type=int, help="pixels per model-only measurement "
                        "(default: 4 M on a GPU, 65,536 on a CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="model-only batch sizes "
                        "(default: 8192 32768 131072 on a GPU)")
    parser.add_argument("--demo-size", type=int, nargs=2, default=(200, 300), metavar=("HEIGHT", "WIDTH"),
                        help="the training data's simulated region")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs on each side")
    parser.add_argument("--gemm-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    say = print
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"date": dt.date.today().isoformat(), "seconds": {}}
    started = time.perf_counter()

    def timed(name: str, work: Callable[[], object]):
        start = time.perf_counter()
        result = work()
        record["seconds"][name] = time.perf_counter() - start
        return result

    facts = record["device"] = device_facts()
    device = facts["device"]
    say(f"# gpu_check {record['date']}: {facts['name']}" + (
        f", {facts['memory_gib']:.0f} GiB, CUDA {facts['cuda']}" if device == "cuda" else
        " (CUDA not visible to torch: everything below ran on the CPU)")
        + f"; torch {facts['torch']}; host {facts['cpu']}, {facts['cores']} cores")

    from msmtu_batch.bench import _bench_region, brits_flops_per_pixel
    from msmtu_batch.inputs.training_data import read_msmtu
    from msmtu_batch.model.artifact import load_artifact
    from msmtu_batch.synthetic.simulate import SimulationConfig, simulate

    gemm = record["gemm_flops"] = timed("gemm", lambda: gemm_rates(device, args.gemm_seconds))
    region, model_path = timed("simulate", lambda: _bench_region(out / "region", (args.size, args.size), 2000))
    artifact = load_artifact(model_path)
    flops = brits_flops_per_pixel(artifact.config)
    inputs = artifact.inputs(read_msmtu(region / "msmtu", "level2"))
    precisions = list(gemm)
    batch_sizes = args.batch_sizes or ([8192, 32_768, 131_072] if device == "cuda" else [1024])
    pixels = args.model_pixels or (4_000_000 if device == "cuda" else 65_536)
    if device == "cuda":
        artifact.model.to(device)
    rates = record["model"] = timed("model", lambda: model_rates(artifact, inputs, device, pixels, batch_sizes,
                                                                 precisions, gemm))
    artifact.model.cpu()
    same = record["equality"] = timed("equality", lambda: equality(artifact, inputs, device, precisions))
    workers = args.cpu_workers if args.cpu_workers is not None else max(1, (os.cpu_count() or 2) - 2)
    end_to_end = record["pipeline"] = timed("pipeline", lambda: pipeline_check(region, model_path, out, workers))
    demo = out / "demo"
    timed("simulate_demo", lambda: simulate(SimulationConfig(height=args.demo_size[0], width=args.demo_size[1]),
                                            demo, overwrite=True))
    training = record["training"] = timed("training", lambda: training_check(demo, device, args.epochs, 2))

    say(f"\nGEMM at the LSTM shape on {device} ({flops / 1e6:.2f} MFLOP per pixel)")
    table(say, ["precision", "TFLOP/s", "ceiling (pixels/s)"],
          [[p, f"{r / 1e12:.2f}", f"{r / flops:,.0f}"] for p, r in gemm.items()])
    best = max(rates, key=lambda r: r["pixels_per_second"])
    say(f"\nModel alone on {device} (inputs in host memory, {pixels:,} pixels; target >= "
        f"{TARGETS['model_pixels_per_second']:,.0f} pixels/s on one GPU)")
    table(say, ["precision", "batch", "pixels/s", "fraction of its ceiling"],
          [[r["precision"], f"{r['batch_size']:,}", f"{r['pixels_per_second']:,.0f}",
            f"{r['fraction_of_ceiling']:.1%}"] for r in rates])
    say(f"\nEquality on {len(inputs):,} pixels (abundance; fp32 tolerance {EQUALITY_TOLERANCE:g})")
    table(say, ["on " + device, "against", "max abs difference", "within fp32 tolerance"],
          [[r["precision"], r["against"], f"{r['max_abs_difference']:.2e}",
            ("yes" if r["max_abs_difference"] <= EQUALITY_TOLERANCE else "NO") if r["precision"] == "fp32"
            else "(reduced)"] for r in same])
    say(f"\nPipeline end to end, {args.size} x {args.size} (one GPU=1 worker + {workers} CPU workers; target "
        f"< {TARGETS['pipeline_seconds']:g} s with the cluster's start on one GPU)")
    table(say, ["pixels", "seconds (with cluster start)", "cluster start", "pixels/s", "model only on the GPU worker"],
          [[f"{end_to_end['pixels']:,}", f"{end_to_end['seconds_with_cluster_start']:.1f}",
            f"{end_to_end['cluster_start_seconds']:.1f}", f"{end_to_end['pixels_per_second']:,.0f}",
            "yes" if end_to_end["model_only_on_the_gpu_worker"] else "NO"]])
    say(f"\nTraining, {training['epochs']} epoch(s) on the demo data ({training['train_pixels']:,} pixels; target "
        f">= {TARGETS['training_speedup']:g}x the 2-core CPU on one GPU)")
    table(say, ["where", "pixels/s", "validation RMSE"],
          [[device, f"{training['device_pixels_per_second']:,.0f}", f"{training['device_validation_rmse']:.4f}"],
           [f"cpu, {training['cpu_threads']} threads", f"{training['cpu_pixels_per_second']:,.0f}",
            f"{training['cpu_validation_rmse']:.4f}"],
           ["ratio", f"{training['speedup']:.1f}x", ""]])
    record["summary"] = {
        "cuda_used": device == "cuda", "best_model": best,
        "equal_within_tolerance": same[0]["max_abs_difference"] <= EQUALITY_TOLERANCE,
        "targets_met": {"model": best["pixels_per_second"] >= TARGETS["model_pixels_per_second"],
                        "pipeline": end_to_end["seconds_with_cluster_start"] < TARGETS["pipeline_seconds"],
                        "training": training["speedup"] >= TARGETS["training_speedup"]}}
    record["seconds"]["total"] = time.perf_counter() - started
    say("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items()))
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out / "gpu-check-output.zarr", ignore_errors=True)
    say(f"wrote {out / 'gpu_check.json'}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
