"""What the reliability work costs the pipeline: this tree against an earlier commit, same run.

    python benchmarks/safety_overhead.py [--base a9a9c65] [--size 2048] [--repeats 2]

Simulates one square region and one untrained default-size model (speed does not depend on
the weights), then runs ``msmtu-batch run`` (Zarr in, Zarr + COG out, LocalCluster) with the
code of ``--base`` (checked out with ``git worktree`` in a temporary folder) and with this
tree, alternately, ``--repeats`` times each, on the same files. Also measures, alone, the
pieces the reliability work added: the input-content digest (sha256 of the store's bytes),
the crc32c checksum of the chunks the run writes, the fsync of a chunk's files before its
marker, the input-distribution guard on a chunk, the re-verification of a complete output
(done on a rerun, not by a first run), the input files' stats taken before the chunks and
compared after them, and the model's checksum on load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import json, sys, time
from msmtu_batch.orchestration.pipeline import RunConfig, run
summary = run(sys.argv[1], sys.argv[2], sys.argv[3], config=RunConfig(chunk=256), overwrite=True, cog_dir=sys.argv[4])
print(json.dumps({"seconds": summary.seconds, "pixels_per_second": summary.pixels_per_second}))
"""


def timed_run(code: Path, region: Path, model: Path, out: Path) -> dict:
    for path in (out, out.with_name(out.name + "-cogs")):
        shutil.rmtree(path, ignore_errors=True)
    env = os.environ | {"PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", RUN, str(region / "cube.zarr"), str(model), str(out),
                           str(out.with_name(out.name + "-cogs"))], env=env, capture_output=True, text=True,
                          cwd=code, check=False)
    if done.returncode != 0:
        raise SystemExit(f"run with {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(seconds_of, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        seconds_of()
        times.append(time.perf_counter() - start)
    return min(times)


def pieces(region: Path, model: Path, output: Path) -> dict[str, float]:
    """Seconds of each added piece on the whole region (per chunk x chunks where per chunk)."""
    import zarr
    from crc32c import crc32c
    from safetensors import safe_open

    from msmtu_batch.model.artifact import load_artifact
    from msmtu_batch.model.kernels import prepare_chunk
    from msmtu_batch.orchestration.pipeline import _flush_chunk, damaged_chunks
    from msmtu_batch.products.blocks import RunConfig, unlike_training
    from msmtu_batch.runtime.digests import tensors_checksum
    from msmtu_batch.runtime.stores import changed_input_files, input_content_digest, input_file_stats
    from msmtu_batch.runtime.tiling import chunk_windows

    cube = region / "cube.zarr"
    group = zarr.open_group(cube, mode="r")
    height, width = group["reflectance"].shape[-2:]
    windows = chunk_windows(height, width, 256)
    artifact = load_artifact(model)
    window = windows[0]
    ys, xs = slice(window.y0, window.y1), slice(window.x0, window.x1)
    reflectance, qa = group["reflectance"][:, :, ys, xs], group["state_qa"][:, ys, xs]
    ancillary = np.stack([group[n][ys, xs] for n in artifact.ancillary_names])
    inputs, observed = prepare_chunk(reflectance, qa, ancillary, artifact.band_stats, artifact.ancillary_stats)
    with safe_open(model, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        metadata = json.loads(f.metadata()["msmtu_batch"])
    written = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    chunk_bytes = [p.read_bytes() for p in output.rglob("c/*/*") if p.is_file()][:64]
    per_chunk_crc = best_of(lambda: [crc32c(b) for b in chunk_bytes]) / max(1, len(chunk_bytes))
    return {
        "input digest (sha256 of the store)": best_of(lambda: input_content_digest(cube), 2),
        "guard (all chunks)": best_of(lambda: unlike_training(RunConfig(), artifact, inputs, observed, str(cube),
                                                                      window.label)) * len(windows),
        "fsync before markers (all chunks)": best_of(lambda: _flush_chunk(output, window)) * len(windows),
        "crc32c of the written chunks (estimate)": per_chunk_crc * written / max(1, np.mean([len(b) for b in
                                                                                          chunk_bytes])),
        "re-verification of a complete output (rerun only)": best_of(lambda: damaged_chunks(output, windows), 1),
        "input files' stats, before and after the chunks": best_of(
            lambda: changed_input_files(cube, input_file_stats(cube))),
        "model checksum on load (once per worker process)": best_of(lambda: tensors_checksum(tensors, metadata)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="a9a9c65", help="commit to compare with")
    parser.add_argument("--size", type=int, default=2048, help="side of the square region")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-output/safety"))
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.machine()}, {os.cpu_count()} cores")
    from msmtu_batch.bench import _bench_region

    args.out.mkdir(parents=True, exist_ok=True)
    region, model = _bench_region(args.out / "region", (args.size, args.size), 200)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            rates: dict[str, list[float]] = {args.base: [], "this tree": []}
            for _ in range(args.repeats):
                for label, code in ((args.base, base), ("this tree", ROOT)):
                    result = timed_run(code, region, model, args.out / f"out-{label.replace(' ', '-')}.zarr")
                    rates[label].append(result["pixels_per_second"])
                    print(f"{label}: {result['seconds']:.1f} s, {result['pixels_per_second']:,.0f} pixels/s",
                          flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    base_rate, new_rate = (statistics.median(r) for r in rates.values())
    print(f"\n| code | pixels/s (median of {args.repeats}) | ratio to {args.base} |")
    print("|---|---|---|")
    print(f"| {args.base} | {base_rate:,.0f} | 1.00 |")
    print(f"| this tree | {new_rate:,.0f} | {new_rate / base_rate:.2f} |")
    added = pieces(region, model, args.out / "out-this-tree.zarr")
    pixels = args.size * args.size
    print(f"\n| piece, {args.size} x {args.size} | seconds | share of this tree's run |")
    print("|---|---|---|")
    for name, seconds in added.items():
        print(f"| {name} | {seconds:.2f} | {seconds / (pixels / new_rate):.1%} |")


if __name__ == "__main__":
    main()
