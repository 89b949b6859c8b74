"""Overviews of the averaged COG products (abundance, uncertainty, expected error, valid
fraction), computed here rather than by GDAL's COG driver.

GDAL's driver builds a product's overviews into a temporary GeoTIFF that it compresses with
ZSTD, then reads back, decompresses and deflates again: its copy of a 2048 x 2048 abundance
(10 bands) took 1.45-1.77 s with its own overviews and takes 0.8-1.05 with these, which cost
0.2 s more to write (benchmarks/NOTES.md, 2026-12-07, seventh session). Here each level is the
NaN-aware mean of 2 x 2 pixels of the level before it (GDAL's AVERAGE with NaN as nodata: NaN
only where all of them are NaN), written
uncompressed window by window, so memory follows the window, not the region; a VRT then
gives the driver the full resolution and these levels as its overviews, which it copies
(``OVERVIEWS=FORCE_USE_EXISTING``). A level's side is half the one before, rounded down, as
the driver sizes the overviews it makes, so that every product of an output has the same.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numba
import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.shutil import copy as gdal_copy
from rasterio.windows import Window

# rows and columns of a level written at once (one TIFF block), from 2 x 2 blocks of the level
# before it: 10 MB of a 10-class abundance read at a time
WINDOW = 256


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _block_mean(values, b, first_row, last_row, first_column, last_column):
    """The mean of the non-NaN values of one block of band ``b`` (NaN where there are none)."""
    total = np.float32(0.0)
    count = np.float32(0.0)
    for row in range(first_row, last_row):
        for column in range(first_column, last_column):
            value = values[b, row, column]
            if value == value:  # not NaN
                total += value
                count += 1
    return total / count  # 0 / 0: NaN


@numba.njit(nogil=True, cache=True, error_model="numpy")
def halve(values, out):
    """``out[b, i, j]``: the mean of the non-NaN values among ``values[b, 2i:2i+2, 2j:2j+2]``
    (NaN where there are none). ``out`` has :func:`halved_side` rows and columns: the last row
    or column of an odd side joins the block before it."""
    bands, height, width = values.shape
    rows, columns = out.shape[1], out.shape[2]
    for b in range(bands):
        for i in range(rows):
            top, last_row = 2 * i, (2 * i + 2 if i < rows - 1 else height)
            if last_row - top == 2:  # whole 2 x 2 blocks, branch-free (the loop vectorises)
                for j in range(columns - 1):
                    left = 2 * j
                    total = np.float32(0.0)
                    count = np.float32(0.0)
                    for value in (values[b, top, left], values[b, top, left + 1],
                                  values[b, top + 1, left], values[b, top + 1, left + 1]):
                        finite = value == value
                        total += value if finite else np.float32(0.0)
                        count += np.float32(1.0) if finite else np.float32(0.0)
                    out[b, i, j] = total / count
            else:
                for j in range(columns - 1):
                    out[b, i, j] = _block_mean(values, b, top, last_row, 2 * j, 2 * j + 2)
            out[b, i, columns - 1] = _block_mean(values, b, top, last_row, 2 * (columns - 1), width)


def halved_side(side: int) -> int:
    """An overview's side from the side of the level before it, as GDAL's COG driver sizes the
    overviews it makes (the categorical products'): halved, rounded down, at least 1."""
    return max(1, side // 2)


def write_levels(full: Path, levels: int, folder: Path) -> list[Path]:
    """Write ``levels`` overviews of the GeoTIFF ``full`` into ``folder`` (uncompressed, tiled
    like ``full``), each from the one before it; returns their paths, largest first."""
    paths: list[Path] = []
    source = full
    for level in range(1, levels + 1):
        path = folder / f"{full.stem}.level{level}.tif"
        with rasterio.open(source) as larger:
            height, width = halved_side(larger.height), halved_side(larger.width)
            with rasterio.open(path, "w", **larger.profile | {"height": height, "width": width}) as smaller:
                for row in range(0, height, WINDOW):
                    for column in range(0, width, WINDOW):
                        target = Window(column, row, min(WINDOW, width - column), min(WINDOW, height - row))
                        # the pixels its blocks cover: to the source's edge where the window reaches its own
                        last_row = larger.height if row + target.height == height else 2 * (row + target.height)
                        last_column = larger.width if column + target.width == width else 2 * (column + target.width)
                        values = larger.read(window=Window(2 * column, 2 * row, last_column - 2 * column,
                                                           last_row - 2 * row))
                        out = np.empty((values.shape[0], target.height, target.width), values.dtype)
                        halve(values, out)
                        smaller.write(out, window=target)
        paths.append(path)
        source = path
    return paths


@contextmanager
def with_overviews(full: Path, overviews: list[Path]) -> Iterator[str]:
    """The name of a VRT of ``full`` (its georeferencing, nodata, descriptions, tags and
    colours, as GDAL writes them) whose bands have ``overviews`` as their overviews. Its text
    stays in GDAL's memory (``/vsimem``), so every write on the way to the COG is GDAL's, and
    a full disk is reported as the export reports GDAL's failures; GDAL's own VRT of ``full``
    is written beside it."""
    base = full.with_suffix(".vrt")
    gdal_copy(full, base, driver="VRT")
    root = ET.parse(base).getroot()
    for source in root.iter("SourceFilename"):  # absolute: the VRT read from memory has no folder
        if source.get("relativeToVRT") == "1":
            source.text, source.attrib["relativeToVRT"] = str(base.parent / str(source.text)), "0"
    for band in root.iter("VRTRasterBand"):
        for path in overviews:
            overview = ET.SubElement(band, "Overview")
            ET.SubElement(overview, "SourceFilename", relativeToVRT="0").text = str(path)
            ET.SubElement(overview, "SourceBand").text = band.get("band")
    with MemoryFile(ET.tostring(root), ext=".vrt") as vrt:
        yield vrt.name
