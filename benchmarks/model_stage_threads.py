"""Does running two chunks' model stages as threads of one process (a local `run`) cost more
than running them in two processes (the GIL)? Times `estimate_block` (engine + error head, one
torch/Numba/BLAS thread each) on two prepared chunks: one at a time, two threads at once, two
processes at once; task-microseconds per pixel.

    python benchmarks/model_stage_threads.py --cube BENCH/region/cube.zarr \
        --model BENCH/region/bench-model.safetensors   # a `msmtu-batch bench --out BENCH` region
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time


def prepared_task(cube: str, model: str, chunk: int = 256):
    """Prepare the cube's first two chunks; return a function timing the model stage on one."""
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    from msmtu_batch.model.artifact import load_artifact
    from msmtu_batch.orchestration.pipeline import RunSpec, StageClock, _read_and_prepare
    from msmtu_batch.products.blocks import RunConfig, estimate_block
    from msmtu_batch.runtime.tiling import chunk_windows

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    threadpool_limits(1)
    artifact = load_artifact(model)
    spec = RunSpec(cube, model, "-", "-", tuple(artifact.ancillary_names), True, RunConfig(chunk=chunk))
    prepared = []
    for window in chunk_windows(2 * chunk, 2 * chunk, chunk)[:2]:
        inputs, observed, unlike = _read_and_prepare(spec, window, artifact, StageClock())
        prepared.append((inputs, observed, unlike, (window.y1 - window.y0, window.x1 - window.x0)))

    def task(i: int, repeats: int = 3) -> float:
        inputs, observed, unlike, shape = prepared[i]
        start = time.perf_counter()
        for _ in range(repeats):
            estimate_block(inputs, observed, artifact, spec.config, shape, unlike)
        return (time.perf_counter() - start) / repeats / (shape[0] * shape[1]) * 1e6

    task(0, 1), task(1, 1)  # compiled and warm
    return task


def _in_process(cube: str, model: str, i: int, ready, go, results) -> None:
    task = prepared_task(cube, model)
    ready.wait()
    go.wait()
    results.put(task(i))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cube", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    task = prepared_task(args.cube, args.model)
    for round_ in range(args.rounds):
        alone = [task(0), task(1)]
        threaded = [0.0, 0.0]

        def timed(k: int, into: list[float] = threaded) -> None:
            into[k] = task(k)

        threads = [threading.Thread(target=timed, args=(k,)) for k in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        context = mp.get_context("spawn")
        ready, go, results = context.Barrier(3), context.Barrier(3), context.Queue()
        processes = [context.Process(target=_in_process, args=(args.cube, args.model, k, ready, go, results))
                     for k in (0, 1)]
        for process in processes:
            process.start()
        ready.wait()  # both prepared: they start timing together
        go.wait()
        separate = [results.get(), results.get()]
        for process in processes:
            process.join()
        print(f"round {round_}: one at a time {sum(alone) / 2:.1f}, two threads {sum(threaded) / 2:.1f}, "
              f"two processes {sum(separate) / 2:.1f} task-us/px", flush=True)


if __name__ == "__main__":
    main()
