"""The fp32 engine's gate product inside its Numba kernel: a block of 12 gate rows times 32 pixels
kept in 24 vector registers over the whole sum, written as LLVM IR with 16-float vectors (one
AVX-512 register; two AVX2 ones on CPUs without AVX-512).

Numba's loops cannot keep such a block in registers (LLVM vectorises only the innermost loop,
and the accumulators would live in memory), and a BLAS called from inside the kernel packs the
weights on every call: OpenBLAS's sgemm through NumPy's ``np.dot`` in the kernel left the fp32
engine where MKL's ``torch.mm`` between passes had it (91,000-94,000 against 93,000-103,000
pixels/s). This product runs at MKL's rate (172-186 GFLOP/s a core against 148-166; the weights
packed so that each step of the sum reads 12 consecutive floats), and with it the whole
recurrence of a block stays in cache (Intel Xeon with AMX, benchmarks/NOTES.md, twelfth session).
"""

from __future__ import annotations

import time

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

ROWS = 12  # gate rows of a block (the weights are packed in groups of this many)
LANES = 16  # floats of a vector
VECTORS = 2  # vectors of pixels of a block: 32 pixels
PIXELS = LANES * VECTORS

_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
_VECTOR = ir.VectorType(_F32, LANES)


def _splat(builder: ir.IRBuilder, scalar):
    single = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(single, ir.Constant(_VECTOR, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


@intrinsic
def _block_times_rows(typingctx, weight_address, x_address, x_stride, product_address, product_stride, k_count):
    """product[r, :32] = sum over k < ``k_count`` of weight[k, r] x[k, :32] for r < 12, the terms
    added in order of k with one rounding each (fused multiply-adds). ``weight``: k_count x 12
    floats in a row; ``x`` and ``product``: rows of floats, strides in floats."""
    def codegen(context, builder, signature, args):
        weight_address, x_address, x_stride, product_address, product_stride, k_count = args
        floats, vectors = ir.PointerType(_F32), ir.PointerType(_VECTOR)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3),
                                             "llvm.fma.v16f32")
        weight = builder.inttoptr(weight_address, floats)
        x = builder.inttoptr(x_address, floats)
        product = builder.inttoptr(product_address, floats)
        entry = builder.block
        loop, done = builder.append_basic_block("block.sum"), builder.append_basic_block("block.done")
        zero = ir.Constant(_VECTOR, [0.0] * LANES)
        builder.cbranch(builder.icmp_signed(">", k_count, ir.Constant(_I64, 0)), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(_I64)
        sums = [[builder.phi(_VECTOR) for _ in range(VECTORS)] for _ in range(ROWS)]
        x_row = builder.gep(x, [builder.mul(k, x_stride)])
        pixels = [builder.load(builder.bitcast(builder.gep(x_row, [ir.Constant(_I64, LANES * v)]), vectors), align=4)
                  for v in range(VECTORS)]
        weights = builder.gep(weight, [builder.mul(k, ir.Constant(_I64, ROWS))])
        added = []
        for r in range(ROWS):
            w = _splat(builder, builder.load(builder.gep(weights, [ir.Constant(_I64, r)]), align=4))
            added.append([builder.call(fma, [w, pixels[v], sums[r][v]]) for v in range(VECTORS)])
        following = builder.add(k, ir.Constant(_I64, 1))
        end_of_sum = builder.block
        k.add_incoming(ir.Constant(_I64, 0), entry)
        k.add_incoming(following, end_of_sum)
        for r in range(ROWS):
            for v in range(VECTORS):
                sums[r][v].add_incoming(zero, entry)
                sums[r][v].add_incoming(added[r][v], end_of_sum)
        builder.cbranch(builder.icmp_signed("<", following, k_count), loop, done)

        builder.position_at_end(done)
        results = [[builder.phi(_VECTOR) for _ in range(VECTORS)] for _ in range(ROWS)]
        for r in range(ROWS):
            row = builder.gep(product, [builder.mul(ir.Constant(_I64, r), product_stride)])
            for v in range(VECTORS):
                results[r][v].add_incoming(zero, entry)
                results[r][v].add_incoming(added[r][v], end_of_sum)
                builder.store(results[r][v], builder.bitcast(builder.gep(row, [ir.Constant(_I64, LANES * v)]),
                                                             vectors), align=4)
        return context.get_dummy_value()
    return types.none(*[types.intp] * 6), codegen


def pack_weight(weight: np.ndarray) -> np.ndarray:
    """A (G, K) float32 weight as :func:`vector_product` reads it: (G / 12, K, 12), groups of 12
    rows with each step of the sum's 12 weights in a row (rows past G zero), 64-byte aligned."""
    import torch  # torch's buffers are 64-byte aligned

    n_rows, k = weight.shape
    groups = -(-n_rows // ROWS)
    padded = torch.zeros(groups * ROWS, k)
    padded[:n_rows] = torch.from_numpy(np.ascontiguousarray(weight, np.float32))
    return padded.reshape(groups, ROWS, k).transpose(1, 2).contiguous().numpy()


@numba.njit(inline="always")
def vector_product(packed, k_count, x, product):
    """``product`` (12 G', W) = the packed weight's first ``k_count`` columns times ``x[:k_count]``
    (x: (K', W)); W a multiple of 32; ``product``'s rows past the weight's are left as they were."""
    groups, k_total, _ = packed.shape
    width = product.shape[1]
    w0, x0, p0 = packed.ctypes.data, x.ctypes.data, product.ctypes.data
    for group in range(groups):
        for p in range(0, width, PIXELS):
            _block_times_rows(w0 + group * k_total * ROWS * 4, x0 + p * 4, x.shape[1],
                              p0 + (group * ROWS * width + p) * 4, width, k_count)


@numba.njit(parallel=True, nogil=True, cache=True)
def _repeated_vector_products(packed, xs, products, k_count, blocks, repeats):
    threads = xs.shape[0]
    for worker in numba.prange(threads):
        for _ in range(repeats):
            for _block in range(worker, blocks, threads):
                vector_product(packed, k_count, xs[worker], products[worker])


def vector_product_rate(batch: int = 4096, hidden: int = 100, features: int = 14, block: int = 128,
                        seconds: float = 1.0) -> float:
    """Measured FLOP/s of :func:`vector_product` on the LSTM's product (4 ``hidden`` x ``features``
    + 1 + ``hidden`` times ``batch`` pixels in blocks of ``block``, as the fp32 engine multiplies;
    the padding not counted), on Numba's threads."""
    import torch

    threads = numba.get_num_threads()
    n_gates, k = 4 * hidden, features + 1 + hidden
    packed = pack_weight(torch.randn(n_gates, k).numpy())
    xs = torch.randn(threads, k, block).numpy()
    products = torch.empty(threads, packed.shape[0] * ROWS, block).numpy()
    blocks = -(-batch // block)
    _repeated_vector_products(packed, xs, products, k, blocks, 5)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _repeated_vector_products(packed, xs, products, k, blocks, 10)
        count += 10
    return 2.0 * batch * (features + hidden) * n_gates * count / (time.perf_counter() - start)
