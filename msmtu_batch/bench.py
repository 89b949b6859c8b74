"""``msmtu-batch bench`` and the measurements the benchmarks share: the machine's FLOP ceiling
for BRITS, the engines and the pipeline against the research code's way of running the model
(:mod:`msmtu_batch.testing.research`)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from msmtu_batch.model.brits import BRITS, BritsConfig
from msmtu_batch.model.gemm import cpuinfo
from msmtu_batch.model.preprocess import Standardizer
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.tiling import peak_memory_mib
from msmtu_batch.testing.research import research_inference_throughput

PIPELINE_PHASES = ("plan", "cluster", "chunks", "finish", "export")  # RunSummary.phase_seconds
PIPELINE_STAGES = ("read", "prepare", "model", "write")  # RunSummary.stage_seconds
PRECISION_RMSE_TOLERANCE = 1e-3  # a reduced precision keeps the map if the test RMSE moves less (issue 14)
BRITS_FLOPS_PER_PIXEL = 2.4e6  # forward pass, both directions (docs/design.md section 5)
TRAINING_FLOPS_FACTOR = 3.0  # forward + backward is about three forward passes


# the instruction sets the engines' speed depends on (bf16 GEMMs at 4x fp32 need AVX512-BF16 or AMX)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description() -> dict:
    """The CPU every figure of a bench comes from: its model name, cores and which of
    :data:`CPU_FLAGS` it has (Linux's /proc/cpuinfo, as ``lscpu`` reads it; elsewhere the
    platform's name and no flags)."""
    fields = cpuinfo()
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return {"model": model, "cores": os.cpu_count(), "flags": {flag: flag in flags for flag in CPU_FLAGS}}


def cpu_line(cpu: dict) -> str:
    return (f"CPU: {cpu['model']}, {cpu['cores']} cores; "
            + ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in cpu["flags"].items()))


def brits_flops_per_pixel(cfg: BritsConfig) -> float:
    """Multiply-adds x 2 of one forward pass over both directions (matrix products only)."""
    f, h, t = cfg.n_features, cfg.hidden, cfg.n_steps
    per_step = (2 * f + h) * 4 * h + f * h + h * f + f * f + 2 * f * f + f * f
    head = (h + (cfg.embed if cfg.n_ancillary else 0)) * cfg.head_hidden + cfg.head_hidden * cfg.n_classes
    embed = cfg.n_ancillary * cfg.embed
    return 2.0 * 2 * (t * per_step + head + embed)


def lstm_gemm_rate(batch: int = 4096, hidden: int = 100, features: int = 14, seconds: float = 1.0,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of the LSTM cell's matrix product (400 x 114 @ 114 x batch, as the
    engine multiplies its gates) in ``dtype`` on ``device`` (fp32 by default; a GPU waits for
    its queue before each reading). On a CPU the engine's own GEMM
    (:func:`~msmtu_batch.model.inference.gate_product`: oneDNN's, which on AMD CPUs is twice
    MKL's), so that the ceiling is the fastest product the engine could run at."""
    from msmtu_batch.model.inference import gate_product

    w = torch.randn(4 * hidden, features + hidden, device=device).to(dtype)
    a = torch.randn(features + hidden, batch, device=device).to(dtype)
    out = torch.empty(4 * hidden, batch, device=device, dtype=dtype)
    on_cpu = torch.device(device).type == "cpu"
    product = gate_product if on_cpu else (lambda w, a, out: torch.mm(w, a, out=out))
    synchronize = (lambda: None) if on_cpu else torch.cuda.synchronize
    repeats = 10 if on_cpu else 200
    for _ in range(5):
        product(w, a, out)
    synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(repeats):
            product(w, a, out)
        synchronize()
        count += repeats
    return 2.0 * batch * (features + hidden) * 4 * hidden * count / (time.perf_counter() - start)


def model_only_throughput(artifact, inputs, fused: bool, pixels: int = 65_536, batch_size: int = 1024,
                          device: str | torch.device = "cpu", precision: str = "fp32",
                          error_head: bool = False) -> float:
    """Pixels/s of the model alone on prepared inputs in memory (the pipeline's settings:
    no imputed series), repeating ``inputs`` up to ``pixels``. The straightforward model gets
    batches of ``batch_size`` (1024 is its fastest on the development VM; 8192 is 40 % slower),
    copied to ``device`` one by one as the pipeline does (the model must be there already).
    With ``error_head``, also the artifact's error head on the model's outputs (the
    pipeline's ``expected_error``): all the per-pixel modelling a run does."""
    from msmtu_batch.model.inference import predict
    from msmtu_batch.model.preprocess import ModelInputs

    repeats = max(1, -(-pixels // max(1, len(inputs))))
    many = ModelInputs(*(np.concatenate([a] * repeats) for a in
                         (inputs.values, inputs.masks, inputs.deltas_forward, inputs.deltas_backward,
                          inputs.ancillary)))
    common = dict(fused=fused, imputed=False, device=device, precision=precision)

    def model(pixels: ModelInputs, valid_fraction: np.ndarray) -> None:
        out = predict(artifact.model, pixels, batch_size, **common)  # its results on the host: the device is done
        if error_head:
            artifact.error_head.expected_error(out["abundance"], out["uncertainty"], valid_fraction, pixels.ancillary)

    model(inputs, inputs.masks.mean(axis=(1, 2)))  # warm up (Numba's cache, CUDA kernels)
    valid_fraction = many.masks.mean(axis=(1, 2))  # the pipeline's preparation counts it
    start = time.perf_counter()
    model(many, valid_fraction)
    return len(many) / (time.perf_counter() - start)


def _bench_region(out: Path, size: tuple[int, int], research_pixels: int, artifact_path: Path | None = None, *,
                  chunk: int = 256):
    """Simulate a region, its cube in spatial chunks of ``chunk`` (as ``ingest`` writes a cube
    for runs of that chunk: simulate's default of 128 had each task of 256 read four times the
    files); return its folder and the model artifact (an untrained model of the default size
    with statistics fitted to the region, and an error head fitted to its errors, as a trained
    model has: speed does not depend on the weights)."""
    from msmtu_batch.inputs.cube import ANCILLARY_NAMES
    from msmtu_batch.inputs.training_data import read_msmtu
    from msmtu_batch.model.artifact import ModelArtifact, save_artifact
    from msmtu_batch.model.train import fit_error_head
    from msmtu_batch.synthetic.simulate import LEVEL2_CLASSES, SimulationConfig, simulate

    # in a process of its own: the heap simulating a large region leaves behind (0.35 GB at 2048 x
    # 2048) would otherwise count in the memory measured for the run on it
    child = multiprocessing.get_context("spawn").Process(target=simulate, args=(SimulationConfig(
        height=size[0], width=size[1], msmtu_pixels=research_pixels, chunk=chunk), out), kwargs={"overwrite": True})
    child.start()
    child.join()
    if child.exitcode != 0:
        raise MsmtuError(f"{out}: simulating the {size[0]} x {size[1]} bench region failed (exit {child.exitcode})")
    if artifact_path is not None:
        return out, artifact_path
    pixels = read_msmtu(out / "msmtu", "level2")
    torch.manual_seed(0)
    cfg = BritsConfig(n_classes=len(LEVEL2_CLASSES), n_ancillary=len(ANCILLARY_NAMES))
    artifact = ModelArtifact(model=BRITS(cfg).eval(), level="level2", classes=LEVEL2_CLASSES,
                             ancillary_names=ANCILLARY_NAMES, band_stats=Standardizer.fit(pixels.values, pixels.masks),
                             ancillary_stats=Standardizer.fit(pixels.ancillary))
    subsets = tuple((artifact.inputs(part), part) for part in (pixels.split("train"), pixels.split("validation")))
    artifact.error_head = fit_error_head(artifact.model, subsets, torch.device("cpu"), seed=0)
    return out, save_artifact(artifact, out / "bench-model.safetensors")


def precision_table(out: Path, epochs: int, size: tuple[int, int], seeds: tuple[int, ...] = (0, 1),
                    precisions: tuple[str, ...] = ("bf16", "fp16")) -> list[dict]:
    """Does reduced precision keep the map? Per simulated region (one per seed, the demo's
    size by default): a model trained ``epochs`` epochs in fp32, its test pixels' abundances
    in fp32 (the CPU engine) and in each of ``precisions`` (bf16: the engine's bf16 GEMMs; fp16:
    the model under autocast): the largest
    abundance difference to fp32, the test RMSE against the simulated truth and its change,
    and pixels/s on this machine's CPU."""
    from msmtu_batch.inputs.training_data import read_cube_reference
    from msmtu_batch.model.inference import predict
    from msmtu_batch.model.metrics import rmse
    from msmtu_batch.model.train import TrainConfig, train
    from msmtu_batch.synthetic.simulate import SimulationConfig, simulate

    rows = []
    for seed in seeds:
        folder = out / f"precision-seed{seed}"
        simulate(SimulationConfig(height=size[0], width=size[1], seed=seed), folder, overwrite=True)
        pixels = read_cube_reference(folder / "cube.zarr", folder / "reference.zarr", "level2")
        artifact = train(pixels, "level2", TrainConfig(epochs=epochs, patience=3, seed=seed)).artifact
        test = pixels.split("test")
        inputs = artifact.inputs(test)
        reference = None
        for precision in ("fp32", *precisions):
            predict(artifact.model, inputs, precision=precision, imputed=False)  # warm up (Numba's cache, oneDNN)
            start = time.perf_counter()
            abundance = predict(artifact.model, inputs, precision=precision, imputed=False)["abundance"]
            rate = len(inputs) / (time.perf_counter() - start)
            error = rmse(abundance, test.abundance)
            if reference is None:  # fp32, first
                reference = abundance, error
            rows.append({"seed": seed, "precision": precision, "test_pixels": len(inputs),
                         "max_abs_difference": float(np.abs(abundance - reference[0]).max()), "test_rmse": error,
                         "rmse_change": error - reference[1], "pixels_per_second": rate})
        shutil.rmtree(folder)
    for row in rows:
        row["keeps_the_map"] = abs(row["rmse_change"]) < PRECISION_RMSE_TOLERANCE
    return rows


def over_seeded_regions(description: str, measure: Callable[[Path, int, int, tuple[int, int] | None], list[dict]],
                        argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[dict]]:
    """The command line of a benchmark that measures models on simulated regions of several
    seeds (``--out``, ``--seeds``, ``--epochs``, ``--size``): ``measure(folder, seed, epochs,
    size)`` per seed, each region deleted after; returns the arguments and every row."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, nargs=2, default=None, help="rows and columns (default: simulate's)")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        rows += measure(folder, seed, args.epochs, args.size)
        shutil.rmtree(folder)
    return args, rows


def pipeline_run(cube: Path, model: Path, out: Path, chunk: int, cog_dir: Path) -> dict:
    """``run`` with COG export in this process, as ``msmtu-batch run`` runs it: the bench starts
    one fresh process per run, so that the peak memory is the run's alone (the bench's own
    process holds the model-only measurements and what earlier runs left on its heap)."""
    from msmtu_batch.orchestration.pipeline import RunConfig, run

    before = resource.getrusage(resource.RUSAGE_SELF)
    summary = run(cube, model, out, config=RunConfig(chunk=chunk, out_of_distribution="flag"), overwrite=True,
                  cog_dir=cog_dir)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"pixels": summary.pixels, "pixels_per_second": summary.pixels_per_second, "seconds": summary.seconds,
            "worker_peak_mib": sorted(summary.worker_peak_mib.values()),
            # the process's resident peak: its imports, the chunks on its threads, then the export
            "run_peak_mib": peak_memory_mib(),
            "stage_seconds": summary.stage_seconds, "phase_seconds": summary.phase_seconds,
            # the run's workers are threads of this process: its CPU time is the run's; system
            # time is the kernel's share (page faults, huge-page compaction: benchmarks/NOTES.md)
            "process_cpu_seconds": {"user": after.ru_utime - before.ru_utime,
                                    "system": after.ru_stime - before.ru_stime}}


def run_bench(out: Path, height: int, width: int, research_pixels: int, chunk: int = 256,
              memory_sizes: tuple[int, ...] = (), say=print, precision_epochs: int = 10,
              precision_size: tuple[int, int] = (200, 300), model_pixels: int = 65_536) -> dict:
    """One run: the pipeline end to end, the model alone (fused and straightforward) and the
    research-code way on the same region, against the FLOP ceiling measured in the run; then,
    for each of ``memory_sizes``, the pipeline on a square region of that side, recording
    its throughput and peak memory (each run in a process of its own). Results also go to ``out/bench.json``."""
    from msmtu_batch.inputs.training_data import read_msmtu
    from msmtu_batch.model.amx import amx_available, tile_product_rate
    from msmtu_batch.model.artifact import load_artifact
    from msmtu_batch.model.inference import FP32_IN_BLOCKS, TILE_BLOCK
    from msmtu_batch.model.vector_gemm import vector_product_rate

    out.mkdir(parents=True, exist_ok=True)
    region, model_path = _bench_region(out / "region", (height, width), research_pixels, chunk=chunk)
    artifact = load_artifact(model_path)
    cfg = artifact.config
    torch_gemm_rate = lstm_gemm_rate()
    # where the fp32 engine runs in blocks, its product is the vectors' (vector_gemm): the ceiling is the faster
    vector_gemm_rate = vector_product_rate(block=TILE_BLOCK) if FP32_IN_BLOCKS else None
    gemm_rate = max(torch_gemm_rate, vector_gemm_rate or 0.0)
    ceiling = gemm_rate / brits_flops_per_pixel(cfg)

    inputs = artifact.inputs(read_msmtu(region / "msmtu", "level2"))
    fused = model_only_throughput(artifact, inputs, fused=True, pixels=model_pixels)
    fused_with_head = model_only_throughput(artifact, inputs, fused=True, error_head=True, pixels=model_pixels)
    bf16_gemm_rate = lstm_gemm_rate(dtype=torch.bfloat16)
    # with AMX the bf16 engine multiplies with tiles inside its pass, faster than torch's bf16 GEMM:
    # its ceiling is then the tiles' rate
    tile_gemm_rate = tile_product_rate(block=TILE_BLOCK) if amx_available() else None
    fused_bf16 = model_only_throughput(artifact, inputs, fused=True, precision="bf16", pixels=model_pixels)
    straightforward = model_only_throughput(artifact, inputs, fused=False, pixels=model_pixels)
    csv = out / "research_predictions.csv"
    csv.unlink(missing_ok=True)
    research = research_inference_throughput(region / "msmtu", "level2", artifact, csv)

    def pipeline(cube_folder: Path) -> dict:
        # the model's statistics come from the first region: a larger one reaches beyond its
        # longitudes, which the input guard would stop; flagged pixels cost the same to compute
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as process:
            result = process.submit(pipeline_run, cube_folder / "cube.zarr", model_path, out / "bench-output.zarr",
                                    chunk, out / "bench-cogs").result()
        # the model alone again right after the run, and the ratios against the mean of before and
        # after: a machine's speed can move by tens of percent within minutes (benchmarks/NOTES.md)
        around = {"model_fused": [fused, model_only_throughput(artifact, inputs, fused=True, pixels=model_pixels)],
                  "model_fused_error_head": [fused_with_head, model_only_throughput(
                      artifact, inputs, fused=True, error_head=True, pixels=model_pixels)]}
        return result | {
            "model_only_before_and_after": around,
            # the run's own account, free of the model-only measurements' timing: the model stage's
            # task seconds over the run's task slots (one per core) and its wall time
            "model_share": result["stage_seconds"].get("model", 0.0) / ((os.cpu_count() or 1) * result["seconds"]),
            "vs_model_only": result["pixels_per_second"] / statistics.mean(around["model_fused"]),
            "vs_model_with_error_head": result["pixels_per_second"] / statistics.mean(
                around["model_fused_error_head"])}

    end_to_end = pipeline(region)
    rates = {"end_to_end": end_to_end["pixels_per_second"], "model_fused": fused,
             "model_fused_error_head": fused_with_head, "model_fused_bf16": fused_bf16,
             "model_straightforward": straightforward, "research_code": research}
    processor = cpu_description()
    say(cpu_line(processor))
    say(f"region {height} x {width} ({height * width:,} pixels), chunk {chunk}; ceiling {ceiling:,.0f} pixels/s "
        f"(LSTM GEMM {gemm_rate / 1e9:.0f} GFLOP/s fp32 / {brits_flops_per_pixel(cfg) / 1e6:.2f} MFLOP per pixel"
        + (f"; torch's GEMM {torch_gemm_rate / 1e9:.0f}, the engine's vectors {vector_gemm_rate / 1e9:.0f}"
           if vector_gemm_rate else "") + ")")
    say("| method | pixels/s | vs research-code way | fraction of ceiling |")
    say("|---|---|---|---|")
    labels = {"end_to_end": "msmtu-batch run (Zarr in, Zarr + COG out, threads of one process)",
              "model_fused": "model only, fused CPU engine (prepared inputs in memory)",
              "model_fused_error_head": "model only, fused CPU engine + error head (all a run's per-pixel modelling)",
              "model_fused_bf16": "model only, fused CPU engine with bf16 GEMMs (`--precision bf16`)",
              "model_straightforward": "model only, straightforward PyTorch BRITS (same inputs)",
              "research_code": "research-code way (JSON per pixel, DataLoader, per-step model, CSV)"}
    for name, label in labels.items():
        say(f"| {label} | {rates[name]:,.0f} | {rates[name] / research:.1f}x | {rates[name] / ceiling:.1%} |")
    bf16_ceiling = max(bf16_gemm_rate, tile_gemm_rate or 0.0) / brits_flops_per_pixel(cfg)
    say(f"pipeline / model only (fused; the model measured before and after the run): "
        f"{end_to_end['vs_model_only']:.1%} at {height} x {width}; / model + error head: "
        f"{end_to_end['vs_model_with_error_head']:.1%}")
    tiles = (f"; the engine's AMX tiles {tile_gemm_rate / 1e9:.0f} GFLOP/s, against torch's bf16 GEMM alone "
             f"{fused_bf16 * brits_flops_per_pixel(cfg) / bf16_gemm_rate:.1%}" if tile_gemm_rate else "")
    say(f"bf16 engine: {fused_bf16 / fused:.2f}x the fp32 engine, {fused_bf16 / bf16_ceiling:.1%} of the bf16 "
        f"ceiling ({bf16_ceiling:,.0f} pixels/s; torch's bf16 GEMM {bf16_gemm_rate / 1e9:.0f} GFLOP/s, "
        f"{bf16_gemm_rate / gemm_rate:.2f}x the fp32 one{tiles})")

    scaling = {}
    for side in memory_sizes:
        if (side, side) == (height, width):
            scaling[side] = end_to_end
            continue
        folder, _ = _bench_region(out / f"region-{side}", (side, side), 200, model_path, chunk=chunk)
        scaling[side] = pipeline(folder)
        shutil.rmtree(folder)
    if scaling:
        say("Peak memory: each run in a process of its own, as `msmtu-batch run` (chunks on its threads, then "
            "the COG export): the process's resident peak, and what its workers reported after their chunks")
        say("| region | pixels | seconds | pixels/s | vs model only | vs model + error head | "
            "peak memory of the run (MiB) | peak memory per worker (MiB) |")
        say("|---|---|---|---|---|---|---|---|")
        for side, result in scaling.items():
            peaks = ", ".join(f"{p:,.0f}" for p in result["worker_peak_mib"])
            run_peak = f"{result['run_peak_mib']:,.0f}" if result["run_peak_mib"] is not None else "n/a"
            say(f"| {side} x {side} | {result['pixels']:,} | {result['seconds']:.1f} | "
                f"{result['pixels_per_second']:,.0f} | {result['vs_model_only']:.0%} | "
                f"{result['vs_model_with_error_head']:.0%} | {run_peak} | {peaks} |")
    say("Where the pipeline's time goes: the driver's wall seconds per phase; the chunk tasks' "
        "seconds per stage, summed over workers; the process's CPU seconds in user space and in the kernel; "
        "the model stage's share of the run (its task seconds / (cores x the run's seconds))")
    say("| region | plan | cluster | chunks | finish | export | read | prepare | model | write | user | system | "
        "model share |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for side, result in {f"{height} x {width}": end_to_end,
                         **{f"{k} x {k}": v for k, v in scaling.items() if (k, k) != (height, width)}}.items():
        phases, stages, cpu = result["phase_seconds"], result["stage_seconds"], result["process_cpu_seconds"]
        say(f"| {side} | " + " | ".join(f"{phases.get(k, 0.0):.2f}" for k in PIPELINE_PHASES) + " | "
            + " | ".join(f"{stages.get(k, 0.0):.2f}" for k in PIPELINE_STAGES) + f" | {cpu['user']:.2f} | "
            f"{cpu['system']:.2f} | {result['model_share']:.1%} |")
    precision_rows = precision_table(out, precision_epochs, precision_size) if precision_epochs else []
    if precision_rows:
        ceilings = {"fp32": ceiling, "bf16": bf16_ceiling,
                    "fp16": lstm_gemm_rate(dtype=torch.float16) / brits_flops_per_pixel(cfg)}
        say(f"Reduced precision against fp32 ({precision_epochs}-epoch level-2 models on two simulated "
            f"{precision_size[0]} x {precision_size[1]} regions, their test pixels; kept where the test RMSE "
            f"moves < {PRECISION_RMSE_TOLERANCE:g}); fp32 and bf16 in the fused engine, fp16 under autocast; "
            "each rate against the ceiling of its precision's GEMM")
        say("| seed | precision | max abs difference | test RMSE | RMSE change | pixels/s (this CPU) | "
            "fraction of its ceiling | keeps the map |")
        say("|---|---|---|---|---|---|---|---|")
        for r in precision_rows:
            r["fraction_of_ceiling"] = r["pixels_per_second"] / ceilings[r["precision"]]
            say(f"| {r['seed']} | {r['precision']} | {r['max_abs_difference']:.2e} | {r['test_rmse']:.4f} | "
                f"{r['rmse_change']:+.5f} | {r['pixels_per_second']:,.0f} | {r['fraction_of_ceiling']:.1%} | "
                f"{'yes' if r['keeps_the_map'] else 'no'} |")
    record = {"cpu": processor, "ceiling": ceiling, "gemm_flops": gemm_rate, "torch_gemm_flops": torch_gemm_rate,
              "vector_gemm_flops": vector_gemm_rate, "bf16_ceiling": bf16_ceiling,
              "bf16_gemm_flops": bf16_gemm_rate, "tile_gemm_flops": tile_gemm_rate, "rates": rates,
              "end_to_end": end_to_end,
              "memory_scaling": {str(k): v for k, v in scaling.items()}, "precision": precision_rows}
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    return record
