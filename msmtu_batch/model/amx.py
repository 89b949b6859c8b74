"""Intel AMX tile instructions for the bf16 engine's Numba kernel: the LSTM gates' product inside
the pass, so a block of pixels runs its whole recurrence in cache with no call out per step.

oneDNN's bf16 ``torch.mm`` costs 18-20 us a call before any work (it reorders the weights and
the operand each time), starts with a cold cache after the pass, and multiplies the engine's
feature-major product at 620-720 GFLOP/s a core; the same product with tiles here, on rows
aligned to 64 bytes, ran at 1,850-2,140 (Intel Xeon with AMX, benchmarks/NOTES.md, twelfth
session). Rows that are not 64-byte aligned made every tile load cross cache lines and the
product 2.5x slower, so the kernel's buffers come from :func:`aligned_zeros`.

The instructions are LLVM's intrinsics (``llvm.x86.tileloadd64`` and the rest) with the tile
numbers as constants. Linux hands a process the tiles' 8 KB of state only when asked
(``arch_prctl(ARCH_REQ_XCOMP_PERM)``); :func:`amx_available` asks, once.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import time

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from msmtu_batch.model.gemm import cpuinfo

_I8, _I64 = ir.IntType(8), ir.IntType(64)
_BYTES = ir.PointerType(_I8)

_SYS_ARCH_PRCTL = 158  # x86-64 Linux
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

TILE_ROWS = 16  # every tile here: 16 rows of 64 bytes (16 float32, or 32 bfloat16)
TILE_BYTES = 64
PIXELS_PER_TILE = 16  # a product tile's columns: 16 pixels (float32)
K_PER_TILE = 32  # a weight tile's columns: 32 bfloat16, the operand tile's 16 rows of pairs


@functools.cache
def amx_available() -> bool:
    """Whether this process can run the AMX kernel: a Linux x86-64 CPU with AMX-BF16 (its
    /proc/cpuinfo and LLVM's view of the host agree), Numba compiling for this host, and the
    kernel's permission to the tile state granted."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    flags = set(cpuinfo().get("flags", "").split())
    features = llvm.get_host_cpu_features()
    if not {"amx_tile", "amx_bf16"} <= flags or not (features.get("amx-tile") and features.get("amx-bf16")):
        return False
    if numba.config.CPU_NAME not in (None, "host"):  # a cache built for another CPU may lack the tiles
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


def tile_configuration() -> np.ndarray:
    """The 64-byte configuration :func:`configure_tiles` loads: palette 1, all eight tiles of
    16 rows of 64 bytes."""
    config = np.zeros(64, np.uint8)
    config[0] = 1
    config[16:32].view(np.uint16)[:] = TILE_BYTES  # bytes a row, tiles 0-7
    config[48:56] = TILE_ROWS
    return config


def _call(builder: ir.IRBuilder, name: str, argument_types: list, arguments: list) -> None:
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), argument_types), name)
    builder.call(function, arguments)


def _tile_numbers(*tiles) -> list[int] | None:
    """The tile numbers of literal integer arguments (the instructions take constants)."""
    if not all(isinstance(tile, types.IntegerLiteral) for tile in tiles):
        return None
    return [tile.literal_value for tile in tiles]


@intrinsic
def configure_tiles(typingctx, address):
    """LDTILECFG from the 64 bytes at ``address`` (per thread; before any other tile instruction)."""
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.ldtilecfg", [_BYTES], [builder.inttoptr(args[0], _BYTES)])
        return context.get_dummy_value()
    return types.none(types.intp), codegen


@intrinsic
def release_tiles(typingctx):
    """TILERELEASE: the tile state back to its initial, empty state."""
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def zero_tile(typingctx, tile):
    numbers = _tile_numbers(tile)
    if numbers is None:
        return None

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilezero", [_I8], [ir.Constant(_I8, numbers[0])])
        return context.get_dummy_value()
    return types.none(tile), codegen


def _memory_intrinsic(name: str):
    @intrinsic
    def tile_memory(typingctx, tile, address, stride):
        numbers = _tile_numbers(tile)
        if numbers is None:
            return None

        def codegen(context, builder, signature, args):
            _call(builder, name, [_I8, _BYTES, _I64],
                  [ir.Constant(_I8, numbers[0]), builder.inttoptr(args[1], _BYTES), args[2]])
            return context.get_dummy_value()
        return types.none(tile, types.intp, types.intp), codegen
    return tile_memory


load_tile = _memory_intrinsic("llvm.x86.tileloadd64")  # 16 rows of 64 bytes, ``stride`` bytes apart
store_tile = _memory_intrinsic("llvm.x86.tilestored64")


@intrinsic
def dot_bfloat16(typingctx, product, left, right):
    """TDPBF16PS: ``product`` (16 x 16 float32) += ``left`` (16 x 32 bfloat16) times ``right``
    (16 rows of 16 column pairs: the 32 x 16 bfloat16 factor with row pairs interleaved)."""
    numbers = _tile_numbers(product, left, right)
    if numbers is None:
        return None

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tdpbf16ps", [_I8, _I8, _I8], [ir.Constant(_I8, n) for n in numbers])
        return context.get_dummy_value()
    return types.none(product, left, right), codegen


@numba.njit(inline="always")
def aligned_zeros(shape, dtype):
    """Zeros of a 4-byte ``dtype`` whose first element is 64-byte aligned (Numba's arrays are
    32-byte aligned, NumPy's 16)."""
    size = 1
    for extent in shape:
        size *= extent
    n_bytes = size * 4
    memory = np.zeros(n_bytes + 64, np.uint8)
    start = (-memory.ctypes.data) % 64
    return memory[start:start + n_bytes].view(dtype).reshape(shape)


@numba.njit(inline="always")
def tile_product(weight, operand, product, k_tiles):
    """``product`` (G, W) float32 = ``weight`` (G, K) bfloat16 bits times the (K, W) bfloat16 factor
    that ``operand`` (K / 2, W) uint32 holds with its row pairs interleaved (row 2r in the low
    half of operand[r], row 2r + 1 in the high), over the first ``k_tiles`` * 32 of K. G and W
    are multiples of 32, K of 32; every array 64-byte aligned and C-ordered; the tiles configured.

    Four products of 16 x 16 at a time from two weight and two operand tiles: one tile load per
    product; with fewer (2 x 1, loads double-buffered) it ran 1.3x slower."""
    n_rows, k_padded = weight.shape
    width = product.shape[1]
    w0, o0, p0 = weight.ctypes.data, operand.ctypes.data, product.ctypes.data
    w_stride, o_stride, p_stride = k_padded * 2, width * 4, width * 4
    for m in range(0, n_rows, 2 * TILE_ROWS):
        for n in range(0, width, 2 * PIXELS_PER_TILE):
            zero_tile(0)
            zero_tile(1)
            zero_tile(2)
            zero_tile(3)
            for k in range(k_tiles):
                load_tile(4, w0 + m * w_stride + k * TILE_BYTES, w_stride)
                load_tile(5, w0 + (m + TILE_ROWS) * w_stride + k * TILE_BYTES, w_stride)
                load_tile(6, o0 + k * TILE_ROWS * o_stride + n * 4, o_stride)
                load_tile(7, o0 + k * TILE_ROWS * o_stride + (n + PIXELS_PER_TILE) * 4, o_stride)
                dot_bfloat16(0, 4, 6)
                dot_bfloat16(1, 4, 7)
                dot_bfloat16(2, 5, 6)
                dot_bfloat16(3, 5, 7)
            store_tile(0, p0 + m * p_stride + n * 4, p_stride)
            store_tile(1, p0 + m * p_stride + (n + PIXELS_PER_TILE) * 4, p_stride)
            store_tile(2, p0 + (m + TILE_ROWS) * p_stride + n * 4, p_stride)
            store_tile(3, p0 + (m + TILE_ROWS) * p_stride + (n + PIXELS_PER_TILE) * 4, p_stride)


@numba.njit(parallel=True, nogil=True, cache=True)
def _repeated_tile_products(weight, operands, products, configuration, k_tiles, blocks, repeats):
    threads = operands.shape[0]
    for worker in numba.prange(threads):
        configure_tiles(configuration.ctypes.data)
        for _ in range(repeats):
            for _block in range(worker, blocks, threads):
                tile_product(weight, operands[worker], products[worker], k_tiles)
        release_tiles()


def tile_product_rate(batch: int = 4096, hidden: int = 100, features: int = 14, block: int = 128,
                      seconds: float = 1.0) -> float:
    """Measured FLOP/s of :func:`tile_product` on the LSTM's product (4 ``hidden`` x ``features`` +
    1 + ``hidden`` times ``batch`` pixels in blocks of ``block``, as the bf16 engine multiplies;
    the padding to tiles not counted), on Numba's threads; call only where :func:`amx_available`."""
    import torch  # the buffers: torch's are 64-byte aligned

    threads = numba.get_num_threads()
    n_gates, k = 4 * hidden, features + 1 + hidden
    padded = lambda extent: -(-extent // K_PER_TILE) * K_PER_TILE  # noqa: E731
    weight = torch.randn(padded(n_gates), padded(k)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    operands = torch.randn(threads, padded(k) // 2, block, 2).to(torch.bfloat16).view(torch.int32).numpy()
    operands = operands.reshape(threads, padded(k) // 2, block).view(np.uint32)
    products = torch.empty(threads, padded(n_gates), block).numpy()
    configuration, blocks, k_tiles = tile_configuration(), -(-batch // block), padded(k) // K_PER_TILE
    _repeated_tile_products(weight, operands, products, configuration, k_tiles, blocks, 5)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _repeated_tile_products(weight, operands, products, configuration, k_tiles, blocks, 10)
        count += 10
    return 2.0 * batch * (features + hidden) * n_gates * count / (time.perf_counter() - start)
