"""Spatial chunking shared by the batch stages (ingest, run): the chunk windows of a grid
and the peak memory a worker process reports after a chunk."""

from __future__ import annotations

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
