"""Writing HDF-EOS2 grids the way MODAPS writes MODIS land products: through the HDF-EOS2
library itself (``libhdfeos``, Debian's ``libhdfeos0``), called with ctypes.

Only what a MOD09A1-shaped granule needs: a grid defined on its corner coordinates with
``GDcreate``, the sinusoidal projection (``GDdefproj``, sphere code -1 so that the radius in
``ProjParams[0]`` counts), fields under "Data Fields" with their types, fill values and
deflate compression. The library writes ``StructMetadata.0`` itself; the ECS metadata and
the fields' CF-style attributes are HDF4 attributes, set afterwards with pyhdf.

Pitfalls (docs/hdfeos.md): ``GDdefcomp`` applies to the fields defined after it;
``GDsetfillvalue`` goes between ``GDdeffield`` and ``GDwritefield``; sphere code -1.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from msmtu_batch.runtime.errors import MsmtuError

DFACC_CREATE = 4
GCTP_SNSOID = 16
HDFE_NOMERGE = 0
HDFE_COMP_DEFLATE = 4
HDFE_TILE = 1
HDFE_GD_UL = 0
HDFE_CENTER = 0
# HDF4 number types
NUMBER_TYPES = {np.dtype(np.int16): 22, np.dtype(np.uint16): 23, np.dtype(np.int32): 24, np.dtype(np.uint32): 25,
                np.dtype(np.uint8): 21, np.dtype(np.int8): 20}
_LIBRARY: ctypes.CDLL | None = None
LIBRARY_VARIABLE = "MSMTU_HDFEOS_LIBRARY"


def library() -> ctypes.CDLL:
    """``libhdfeos``, loaded once; a clear message where it is not installed."""
    global _LIBRARY
    if _LIBRARY is None:
        # MSMTU_HDFEOS_LIBRARY: a build outside the loader's path (an HPC module), or none at all
        name = os.environ.get(LIBRARY_VARIABLE) or ctypes.util.find_library("hdfeos") or "libhdfeos.so.0"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise MsmtuError(f"the HDF-EOS2 library ({name}) is not installed: apt-get install libhdfeos0 (Debian, "
                             f"Ubuntu; `make system-packages`), or set {LIBRARY_VARIABLE} to its path; it writes "
                             "MOD09A1-shaped granules") from None
        i32, f64p, vp, cp = ctypes.c_int32, ctypes.POINTER(ctypes.c_double), ctypes.c_void_p, ctypes.c_char_p
        signatures = {
            "GDopen": ([cp, ctypes.c_int], i32), "GDcreate": ([i32, cp, i32, i32, f64p, f64p], i32),
            "GDdefproj": ([i32, i32, i32, i32, f64p], ctypes.c_int), "GDdeforigin": ([i32, i32], ctypes.c_int),
            "GDdefpixreg": ([i32, i32], ctypes.c_int),
            "GDdefcomp": ([i32, i32, ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
            "GDdeftile": ([i32, i32, i32, ctypes.POINTER(i32)], ctypes.c_int),
            "GDdeffield": ([i32, cp, cp, i32, i32], ctypes.c_int), "GDsetfillvalue": ([i32, cp, vp], ctypes.c_int),
            "GDwritefield": ([i32, cp, vp, vp, vp, vp], ctypes.c_int), "GDdetach": ([i32], ctypes.c_int),
            "GDclose": ([i32], ctypes.c_int)}
        for function, (arguments, result) in signatures.items():
            getattr(lib, function).argtypes = arguments
            getattr(lib, function).restype = result
        _LIBRARY = lib
    return _LIBRARY


def _check(result: int, call: str, path: Path) -> int:
    if result < 0:
        raise MsmtuError(f"{path}: HDF-EOS2 {call} failed")
    return result


def write_sinusoidal_grid(path: str | Path, grid: str, upper_left: tuple[float, float],
                          lower_right: tuple[float, float], sphere_radius: float,
                          fields: Sequence[tuple[str, np.ndarray, int | float]], deflate: int | None = 1,
                          tile: tuple[int, int] | None = None) -> Path:
    """Create ``path`` holding one HDF-EOS2 grid named ``grid`` on the MODIS sinusoidal
    projection, with ``fields`` (name, 2-D values (YDim, XDim), fill value) under "Data Fields",
    deflate-compressed at level ``deflate`` (None: uncompressed), stored whole as MODAPS does or,
    with ``tile`` (rows, columns), in HDF4 chunks of that size (``GDdeftile``), as some
    reprocessing tools write them."""
    lib, path = library(), Path(path)
    rows, columns = fields[0][1].shape
    double2 = ctypes.c_double * 2
    params = (ctypes.c_double * 16)(sphere_radius)
    file_id = _check(lib.GDopen(str(path).encode(), DFACC_CREATE), "GDopen", path)
    try:
        grid_id = _check(lib.GDcreate(file_id, grid.encode(), columns, rows, double2(*upper_left),
                                      double2(*lower_right)), "GDcreate", path)
        try:
            _check(lib.GDdefproj(grid_id, GCTP_SNSOID, 0, -1, params), "GDdefproj", path)
            _check(lib.GDdeforigin(grid_id, HDFE_GD_UL), "GDdeforigin", path)
            _check(lib.GDdefpixreg(grid_id, HDFE_CENTER), "GDdefpixreg", path)
            if tile is not None:
                _check(lib.GDdeftile(grid_id, HDFE_TILE, 2, (ctypes.c_int32 * 2)(*tile)), "GDdeftile", path)
            if deflate is not None:
                _check(lib.GDdefcomp(grid_id, HDFE_COMP_DEFLATE, (ctypes.c_int * 5)(deflate)), "GDdefcomp", path)
            for name, values, fill in fields:
                values = np.ascontiguousarray(values)
                if values.shape != (rows, columns):
                    raise MsmtuError(f"{path}: field {name} is {values.shape}, expected {(rows, columns)}")
                _check(lib.GDdeffield(grid_id, name.encode(), b"YDim,XDim", NUMBER_TYPES[values.dtype],
                                      HDFE_NOMERGE), f"GDdeffield({name})", path)
                fill_value = np.array(fill, values.dtype)
                _check(lib.GDsetfillvalue(grid_id, name.encode(), fill_value.ctypes.data), f"GDsetfillvalue({name})",
                       path)
                _check(lib.GDwritefield(grid_id, name.encode(), None, None, None, values.ctypes.data),
                       f"GDwritefield({name})", path)
        finally:
            lib.GDdetach(grid_id)
    finally:
        _check(lib.GDclose(file_id), "GDclose", path)
    return path
