"""Spatial chunking shared by the batch stages (ingest, run): the chunk windows of a grid
and the peak memory a worker process reports after a chunk."""

from __future__ import annotations

import ctypes
import functools
import math
import resource
from dataclasses import dataclass
from pathlib import Path

from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import from_bounds


@dataclass(frozen=True)
class ChunkWindow:
    iy: int
    ix: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def name(self) -> str:
        return f"{self.iy}-{self.ix}"

    @property
    def label(self) -> str:
        """How messages name the chunk."""
        return f"y {self.y0}:{self.y1}, x {self.x0}:{self.x1}"


def chunk_windows(height: int, width: int, chunk: int) -> list[ChunkWindow]:
    return [ChunkWindow(iy, ix, y0, min(y0 + chunk, height), x0, min(x0 + chunk, width))
            for iy, y0 in enumerate(range(0, height, chunk)) for ix, x0 in enumerate(range(0, width, chunk))]


# A chunk task's memory: its arrays per pixel (the chunk's values, masks, deltas, the model's
# states and the products) and, besides, the model, the kernels and a batch's buffers. Measured
# with the default architecture, a task alone, at chunks of 256 to 2048 pixels a side (2.4-4.3 KB
# per pixel over the worker's memory before it; benchmarks/NOTES.md, 2026-12-07), rounded up.
TASK_BYTES_PER_PIXEL = 2700
TASK_BASE_BYTES = 160 * 2**20


def task_memory_bytes(pixels: int) -> int:
    """About how much memory a chunk task of ``pixels`` pixels takes at its peak."""
    return TASK_BASE_BYTES + TASK_BYTES_PER_PIXEL * pixels


def largest_chunk_within(budget: float) -> int:
    """The largest chunk side, a power of two (whole input chunks of 128 from 128 up), whose task
    fits ``budget`` bytes; 0 if not even 8 does."""
    side = math.isqrt(max(0, int((budget - TASK_BASE_BYTES) // TASK_BYTES_PER_PIXEL)))
    return 1 << (side.bit_length() - 1) if side >= 8 else 0


def peak_memory_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image;
    ru_maxrss would also count the parent's memory when a worker was forked from a driver."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL("libc.so.6")
        return library if hasattr(library, "mallopt") and hasattr(library, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): their allocators are left as they are
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
HEAP_MAPPING_BYTES = 32 << 20  # glibc's own ceiling for its dynamic mmap threshold


def bound_heap_growth() -> None:
    """Give the arrays of 32 MiB and more (a chunk's inputs, the model's states) their own
    mappings, returned to the system when freed, and keep up to 32 MiB of the rest's free
    memory in each heap for the next chunk. glibc's default threshold moves with the sizes
    freed, and the chunks' arrays then fragment the heap: the peak of a 1024 x 1024 run went
    from 891-936 MiB to 817-843 MiB (benchmarks/NOTES.md, 2026-12-07). Fixing it also fixes
    the trim threshold at 128 KiB, and the threads' heaps then gave their free pages back and
    faulted them in again a million times a 2048 x 2048 run (6.0-8.3 s of system time); at
    32 MiB 0.2-0.36 million (3.8-4.8 s), reads a quarter faster, for 90-120 MiB more peak
    (benchmarks/NOTES.md, 2026-12-07, ninth session). For this process, from now on; idempotent."""
    if (libc := _glibc()) is not None:
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_MAPPING_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_MAPPING_BYTES)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``). The chunk
    tasks leave memory free in their threads' heaps, which the export's threads do not reuse."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def covering_window(crs: CRS, transform: Affine, height: int, width: int, src_crs: CRS, src_transform: Affine,
                    src_height: int, src_width: int, margin: int) -> tuple[int, int, int, int] | None:
    """Rows and columns ``(row0, row1, col0, col1)`` of a source grid that cover the grid
    ``transform (height, width)`` in ``crs``, plus ``margin`` pixels, cut to the source; None
    when they do not meet."""
    left, top = transform * (0, 0)
    right, bottom = transform * (width, height)
    bounds = transform_bounds(crs, src_crs, min(left, right), min(top, bottom), max(left, right),
                              max(top, bottom), densify_pts=21)
    area = from_bounds(*bounds, transform=src_transform)
    row0 = max(math.floor(area.row_off) - margin, 0)
    col0 = max(math.floor(area.col_off) - margin, 0)
    row1 = min(math.ceil(area.row_off + area.height) + margin, src_height)
    col1 = min(math.ceil(area.col_off + area.width) + margin, src_width)
    return (row0, row1, col0, col1) if row1 > row0 and col1 > col0 else None
