"""Simulate time and peak memory at growing region sizes (each size in a fresh process).

    python benchmarks/simulate_scaling.py [--sizes 512 2048] [--out DIR]

Peak memory is the process's maximum resident set size, so it includes Python, NumPy,
xarray and zarr themselves; it should stay flat as the region grows because generation
works one block of rows at a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(size: int, out: Path) -> None:
    from msmtu_batch.synthetic.simulate import SimulationConfig, simulate

    start = time.perf_counter()
    simulate(SimulationConfig(height=size, width=size, seed=0), out, overwrite=True)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store_mib = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(json.dumps({"size": size, "seconds": seconds, "peak_rss_mib": peak_mib,
                      "output_mib": store_mib, "pixels_per_s": size * size / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out)
        return
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}")
    print("| region | seconds | pixels/s | peak RSS (MiB) | output (MiB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            out = (args.out or Path(tmp)) / f"sim{size}"
            line = subprocess.run([sys.executable, __file__, "--child", str(size), "--out", str(out)],
                                  check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            r = json.loads(line)
            print(f"| {size} x {size} | {r['seconds']:.1f} | {r['pixels_per_s']:,.0f} | "
                  f"{r['peak_rss_mib']:.0f} | {r['output_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
