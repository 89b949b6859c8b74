"""Fast CPU inference for a trained BRITS: the same function as :class:`msmtu_batch.model.brits.BRITS`
(held to it at float tolerance by the tests), arranged for a CPU.

The straightforward model makes about twenty small tensor operations per direction and
time step; each is a pass over memory and a dispatch, so together they cost more than the
LSTM's matrix product, which is the only real work. Here each step is:

1. one GEMM (:func:`gate_product`, oneDNN's): the stacked LSTM weights with the bias as a column times
   ``[x_filled; mask; 1; decayed h]`` (2F+1+H x B), so the input, mask, bias and recurrent
   terms come out of one call and nothing is copied into the output first (at the first
   step the state is zero and only its first 2F+1 rows are multiplied);
2. one Numba pass that does everything between two GEMMs: the gates, cell and hidden
   state, the temporal decays and the combination weight of the next step, the history and
   feature regressions, their combination and the gap filling, writing the next GEMM's
   input in place.

Where the engine runs in blocks (:class:`FusedBrits`' ``blocks``: fp32 on Intel's CPUs, bf16 with
AMX), the GEMM moves inside the Numba pass: a block of 128 pixels runs all its steps in one call,
its product made by 16-float vectors (:mod:`msmtu_batch.model.vector_gemm`) or AMX tiles
(:mod:`msmtu_batch.model.amx`), its buffers in L2 and nothing called per step; 1.2-1.3x the
fp32 engine and 1.5-1.7x the bf16 one with torch's GEMM between passes (Intel Xeon with AMX,
benchmarks/NOTES.md, twelfth session).

Before the first step a Numba pass embeds the ancillary data; after the last, the head's first
layer is one more GEMM over ``[h; embedded ancillary data; 1]`` and a last Numba pass computes
the logits and the softmax. Every pass releases the GIL: a tile runs on one thread, and per step
and direction it returns to Python twice (the GEMM's call and the pass's).

Arrays are feature-major (feature, pixel), so every inner loop runs over contiguous pixels
and vectorises; a tile of 1024 pixels per MiB of a core's L2 keeps the state in cache. A pixel's result
does not depend on its tile: the GEMM's tiles are padded to 16 pixels, and the passes add
their terms in a fixed order (:func:`msmtu_batch.model.fastmath.fma`). Measured on the
2-core development VM: 2.7x the straightforward model at its best batch size, 53 % of the
FLOP ceiling (benchmarks/NOTES.md; 86-93 % since, against MKL's GEMM rate; with oneDNN's
GEMM, 1.3-1.7x faster again, and the ceiling measured with it). Training on a CPU runs the same
arrangement with a hand-written backward (:mod:`msmtu_batch.model.recurrence`); GPUs run the
model itself.

``precision="bf16"`` multiplies in bfloat16 (the Numba pass keeps a bf16 copy of the GEMM
input and reads bf16 gates), everything else in fp32: 1.5x the fp32 engine on a CPU with
AVX512-BF16 at first, 2.3-2.5x since (AMD EPYC, benchmarks/NOTES.md 2026-12-07), the test
RMSE within 1e-5 of fp32.
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from msmtu_batch.model.amx import (
    K_PER_TILE,
    aligned_zeros,
    amx_available,
    configure_tiles,
    release_tiles,
    tile_configuration,
    tile_product,
)
from msmtu_batch.model.brits import BRITS, RITS, BritsConfig, as_tensor
from msmtu_batch.model.fastmath import decay_factor, fast_sigmoid, fma, lstm_update, wide_vectors
from msmtu_batch.model.gemm import cpuinfo, intel_cpu, through_onednn, times_transposed
from msmtu_batch.model.preprocess import ModelInputs
from msmtu_batch.model.vector_gemm import pack_weight, vector_product
from msmtu_batch.runtime.errors import MsmtuError


def gate_product(weight: torch.Tensor, operand: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``weight @ operand``, the LSTM gates' GEMM (the engine's, and the bench's ceiling). In
    fp32 through oneDNN where torch has it (:mod:`msmtu_batch.model.gemm`: the engine 15.5 us
    a pixel against 25.7 with MKL's, benchmarks/NOTES.md, 2026-12-07, seventh session), whose
    new tensor is used as it is: copying it into ``out`` took 2-8 % of the engine's time
    (NOTES, eighth session). Otherwise (bf16, which goes to oneDNN through torch.mm, or torch
    without oneDNN) the product is written into ``out`` and returned."""
    if through_onednn(weight.dtype):
        return times_transposed(weight, operand.t())
    return torch.mm(weight, operand, out=out)


def l2_bytes_per_core(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """A core's L2 cache in bytes (Linux's sysfs: ``caches``), None where unknown."""
    units = {"K": 2**10, "M": 2**20}
    for index in sorted(caches.glob("index*")):
        with contextlib.suppress(OSError, ValueError):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                return int(size.rstrip("KM")) * units.get(size[-1], 1)
    return None


# Pixels a tile: 1024 per MiB of a core's L2, 1024 to 2048. With 1 MiB (the AMD EPYC VM) tiles
# of 2048 were 1-10 % slower than 1024; with 2 MiB (the Xeon with AMX) 6 % faster in fp32 and
# 10-15 % in bf16, the per-call costs of the GEMMs and passes (20 and 5.5 us) spread over twice the
# pixels (benchmarks/NOTES.md, fifth and eleventh sessions).
PIXELS_PER_THREAD = 1024 * min(2, max(1, (l2_bytes_per_core() or 0) // 2**20))
# Tiles are padded to a multiple of this many pixels: the GEMM libraries compute the last,
# partial vector of columns with other kernels, whose sums differ in the last bit (AMD EPYC,
# torch 2.13: one pixel unmixed alone differed from the same pixel in a chunk by 7e-9).
PIXEL_MULTIPLE = 16


# bf16 engine: the GEMM takes and gives bfloat16 (this CPU's oneDNN kernels; torch 2.13 has no
# CPU product of bf16 inputs into fp32), everything between two GEMMs stays fp32. Numba has no
# bfloat16, so the pointwise pass reads and writes its bits (uint16 views of torch's tensors).
_I16, _I32 = ir.IntType(16), ir.IntType(32)


@intrinsic
def widen_bfloat16(typingctx, bits):
    """float32 of a bfloat16's bits: its 16 bits become the high half (exact)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16)), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def round_to_bfloat16(typingctx, x):
    """The bits of the bfloat16 nearest a float32 (ties to even, as torch rounds; finite inputs)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], _I32)
        odd = builder.and_(builder.lshr(bits, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        bits = builder.add(builder.add(bits, ir.Constant(_I32, 0x7FFF)), odd)
        return builder.trunc(builder.lshr(bits, ir.Constant(_I32, 16)), _I16)
    return types.uint16(types.float32), codegen


def as_float32(x):
    """A gate pre-activation as float32, whether stored as float32 or as bfloat16 bits."""


@overload(as_float32, inline="always")
def _as_float32(x):
    if x == types.uint16:
        return lambda x: widen_bfloat16(x)
    return lambda x: x


@numba.njit(inline="always", fastmath=True)
def _affine(outputs, biases, weights, rows, p0, p1, accumulate=False):
    """outputs[k, p0:p1] = biases[k] + sum_j weights[k, j] * rows[j, p0:p1] for every k (or
    ``+=`` the sum when ``accumulate``; ``biases`` then unused), the terms added in order.

    Four input rows at a time, the outputs inside: each pass reads four rows once from L2 and
    writes each output once per four products (one product per load and store, row by row,
    made the regressions bound by memory: 30 against 12 ns per pixel and step for the history
    regression, AMD EPYC, one core). A group past the last row repeats it with weight 0."""
    n_outputs, n_inputs = weights.shape
    last, zero = n_inputs - 1, np.float32(0.0)
    for j in range(0, n_inputs, 4):
        j1, j2, j3 = min(j + 1, last), min(j + 2, last), min(j + 3, last)
        r0, r1, r2, r3 = rows[j, p0:p1], rows[j1, p0:p1], rows[j2, p0:p1], rows[j3, p0:p1]
        for k in range(n_outputs):
            w0 = weights[k, j]
            w1 = weights[k, j1] if j + 1 <= last else zero
            w2 = weights[k, j2] if j + 2 <= last else zero
            w3 = weights[k, j3] if j + 3 <= last else zero
            out = outputs[k, p0:p1]
            if j == 0 and not accumulate:
                b = biases[k]
                for p in range(p1 - p0):
                    out[p] = fma(w3, r3[p], fma(w2, r2[p], fma(w1, r1[p], fma(w0, r0[p], b))))
            else:
                for p in range(p1 - p0):
                    out[p] = fma(w3, r3[p], fma(w2, r2[p], fma(w1, r1[p], fma(w0, r0[p], out[p]))))


@numba.njit(inline="always", fastmath=True)
def _next_input(p0, p1, hidden, deltas, values, masks, weights, gemm_input, scratch, gemm_operand, sigmoid_alpha):
    """Fill ``gemm_input[:, p0:p1]`` for the coming step: gap-filled values, mask, 1, decayed h;
    and its bfloat16 copy ``gemm_operand`` unless that is empty (the fp32 engine multiplies
    ``gemm_input`` itself).

    Feature-major: every array is (feature, pixel) and every inner loop runs over a
    zero-based slice of contiguous pixels, the form LLVM vectorises."""
    (decay_hidden_weight, decay_hidden_bias, decay_input_weight, decay_input_bias, combine_weight, combine_bias,
     history_weight, history_bias, feature_weight, feature_bias) = weights
    n_features, n_hidden = values.shape[0], hidden.shape[0]
    offset, width = 2 * n_features + 1, p1 - p0
    one = np.float32(1.0)
    decayed_state = gemm_input[offset:offset + n_hidden]
    # decayed hidden state: h * exp(-relu(W d + b)), with W and b stored negated
    _affine(decayed_state, decay_hidden_bias, decay_hidden_weight, deltas, p0, p1)
    for j in range(n_hidden):
        state, h = decayed_state[j, p0:p1], hidden[j, p0:p1]
        for p in range(width):
            state[p] = h[p] * decay_factor(state[p])
    # combination weight alpha = sigmoid(W [input decay, mask] + b); the input decay is diagonal
    for k in range(n_features):
        decay, d = scratch[0, k, p0:p1], deltas[k, p0:p1]
        for p in range(width):
            decay[p] = decay_factor(decay_input_weight[k] * d[p] + decay_input_bias[k])
    alpha, history, filled = scratch[1], scratch[2], scratch[0]
    _affine(alpha, combine_bias, combine_weight[:, :n_features], scratch[0], p0, p1)
    _affine(alpha, combine_bias, combine_weight[:, n_features:], masks, p0, p1, True)
    if sigmoid_alpha:  # else the research code's alpha: the linear layer as is
        for k in range(n_features):
            a = alpha[k, p0:p1]
            for p in range(width):
                a[p] = fast_sigmoid(a[p])
    # history regression from the decayed state; its gap-filled series feeds the feature regression
    _affine(history, history_bias, history_weight, decayed_state, p0, p1)
    for k in range(n_features):
        x, m, estimate, x_history = values[k, p0:p1], masks[k, p0:p1], gemm_input[k, p0:p1], history[k, p0:p1]
        for p in range(width):
            estimate[p] = x[p] + (one - m[p]) * x_history[p]
    _affine(filled, feature_bias, feature_weight, gemm_input, p0, p1)
    for k in range(n_features):
        z, a, x_history = filled[k, p0:p1], alpha[k, p0:p1], history[k, p0:p1]
        x, m = values[k, p0:p1], masks[k, p0:p1]
        for p in range(width):
            z[p] = x[p] + (one - m[p]) * (x_history[p] + a[p] * (z[p] - x_history[p]))
    for k in range(n_features):
        gemm_input[k, p0:p1] = filled[k, p0:p1]
        gemm_input[n_features + k, p0:p1] = masks[k, p0:p1]
    if gemm_operand.shape[0]:
        for r in range(gemm_input.shape[0]):
            source, target = gemm_input[r, p0:p1], gemm_operand[r, p0:p1]
            for p in range(width):
                target[p] = round_to_bfloat16(source[p])


BLOCK = 512  # pixels per block of a pass (a multiple of the vector width)
HEAD_BLOCK = PIXELS_PER_THREAD

# Parallel Numba functions, though each tile runs on one thread (FusedBrits.__call__): Numba
# compiles a parallel loop's body with its arrays marked as not aliasing each other, and LLVM
# vectorises it better. Serial, the cell's pass took 52.7 us a call against 49.7 at 1024 pixels
# (minimum of 30, AMD EPYC), launch of 3-4 us included.


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _first_input(hidden, deltas, values, masks, weights, gemm_input, scratch, gemm_operand, sigmoid_alpha):
    n = hidden.shape[1]
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        wide_vectors()
        p0 = block * BLOCK
        _next_input(p0, min(p0 + BLOCK, n), hidden, deltas, values, masks, weights, gemm_input, scratch,
                    gemm_operand, sigmoid_alpha)


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _cell_then_next_input(gates, cell, hidden, last, deltas, values, masks, weights, gemm_input, scratch,
                          gemm_operand, sigmoid_alpha):
    """LSTM cell update from the pre-activation ``gates`` (4H, B; PyTorch order i, f, g, o;
    float32 or bfloat16 bits), then, unless this was the ``last`` step, the next step's GEMM input."""
    n_hidden, n = hidden.shape
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        wide_vectors()
        p0 = block * BLOCK
        p1 = min(p0 + BLOCK, n)
        for j in range(n_hidden):
            gi, gf, gg, go = (gates[j, p0:p1], gates[n_hidden + j, p0:p1], gates[2 * n_hidden + j, p0:p1],
                              gates[3 * n_hidden + j, p0:p1])
            c, h = cell[j, p0:p1], hidden[j, p0:p1]
            for p in range(p1 - p0):
                c[p], h[p] = lstm_update(as_float32(gi[p]), as_float32(gf[p]), as_float32(gg[p]),
                                         as_float32(go[p]), c[p])
        if not last:
            _next_input(p0, p1, hidden, deltas, values, masks, weights, gemm_input, scratch, gemm_operand,
                        sigmoid_alpha)


# The engine in blocks: a block of pixels runs its whole recurrence in one Numba call, the gates'
# product made inside the pass (AMX tiles in bf16, msmtu_batch.model.amx; 16-float vectors in
# fp32, msmtu_batch.model.vector_gemm), every buffer 64-byte aligned and in L2, and no call out
# per step. On the Intel Xeon with AMX (one core, 2048 pixels) a bf16 direction took 3.8-3.9 us a
# pixel against 5.8-6.3 through oneDNN's torch.mm (4.1-4.3 in blocks of 64 or 256); the fp32 engine
# ran 105,000-108,000 pixels/s against 85,000-93,000 with MKL's torch.mm between passes
# (benchmarks/NOTES.md, twelfth session).
TILE_BLOCK = 128
_TILE_CONFIGURATION = tile_configuration()


@numba.njit(inline="always", fastmath=True)
def _interleave_bfloat16(rows, operand, pairs, width):
    """The GEMM's right factor as the tiles take it: ``operand[r, p]`` holds ``rows[2r, p]`` in its low
    16 bits and ``rows[2r + 1, p]`` in its high, both rounded to bfloat16, for the first ``pairs`` r."""
    high = np.uint32(16)
    for r in range(pairs):
        even, odd, target = rows[2 * r, :width], rows[2 * r + 1, :width], operand[r, :width]
        for p in range(width):
            target[p] = np.uint32(round_to_bfloat16(even[p])) | (np.uint32(round_to_bfloat16(odd[p])) << high)


def _block_product(weight, k_rows, gemm_input, operand, gates):
    """``gates`` = ``weight`` times the first ``k_rows`` rows of ``gemm_input``, by AMX tiles where
    ``weight`` holds bfloat16 bits (``operand`` their interleaved right factor), else by vectors."""


@overload(_block_product, inline="always")
def _block_product_of(weight, k_rows, gemm_input, operand, gates):
    # chosen by the weight's type as Numba compiles: the tile instructions exist only in the
    # bf16 kernel, which runs only where the CPU has them
    if weight.dtype == types.uint16:
        def product(weight, k_rows, gemm_input, operand, gates):
            k_tiles = (k_rows + K_PER_TILE - 1) // K_PER_TILE
            _interleave_bfloat16(gemm_input, operand, k_tiles * K_PER_TILE // 2, gates.shape[1])
            tile_product(weight, operand, gates, k_tiles)
        return product
    return lambda weight, k_rows, gemm_input, operand, gates: vector_product(weight, k_rows, gemm_input, gates)


def _block_product_shape(weight):
    """(gate rows, rows of the GEMM's input) that :func:`_block_product` takes with ``weight``."""


@overload(_block_product_shape, inline="always")
def _block_product_shape_of(weight):
    if weight.dtype == types.uint16:
        return lambda weight: weight.shape
    # the vectors' packed (G / 12, K, 12): the input's rows padded as the tiles' are
    return lambda weight: (weight.shape[0] * weight.shape[2], (weight.shape[1] + K_PER_TILE - 1) // K_PER_TILE
                           * K_PER_TILE)


def _begin_products(weight, configuration):
    """Configure this thread's tiles for the bf16 kernel."""


@overload(_begin_products, inline="always")
def _begin_products_of(weight, configuration):
    if weight.dtype == types.uint16:
        return lambda weight, configuration: configure_tiles(configuration.ctypes.data)
    return lambda weight, configuration: None


def _end_products(weight):
    """Release this thread's tiles after the bf16 kernel."""


@overload(_end_products, inline="always")
def _end_products_of(weight):
    if weight.dtype == types.uint16:
        return lambda weight: release_tiles()
    return lambda weight: None


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _recurrence_in_blocks(block_weight, configuration, values, masks, deltas, weights, sigmoid_alpha, hidden_out,
                          filled, threads):
    """One direction's recurrence over (T, F, B) ``values``/``masks``/``deltas``: the last hidden
    state into ``hidden_out`` (H, B), the gap-filled series into ``filled`` (T, F, B) unless it
    is empty. ``block_weight`` is the gate weight as :func:`_block_product` takes it: bfloat16
    bits for the tiles, whose gates come out float32 (AMX adds in float32 and does not round
    them to bfloat16, as oneDNN's torch.mm does), or fp32 packed for the vectors.
    ``threads``: Numba's threads for this call."""
    steps, n_features, n = values.shape
    n_hidden = hidden_out.shape[0]
    n_gate_rows, k_padded = _block_product_shape(block_weight)
    no_copy = np.empty((0, 0), np.uint16)  # _next_input's bfloat16 copy; the operand is interleaved here
    n_blocks = (n + TILE_BLOCK - 1) // TILE_BLOCK
    workers = min(threads, n_blocks)
    # a worker's buffers serve all its blocks: made for each block, with the inputs copied as 3-D
    # slices (gathers), they took 0.36 us a pixel and direction of 3.4
    for worker in numba.prange(workers):
        wide_vectors()
        _begin_products(block_weight, configuration)  # per thread
        x = aligned_zeros((steps, n_features, TILE_BLOCK), np.float32)
        m = aligned_zeros((steps, n_features, TILE_BLOCK), np.float32)
        d = aligned_zeros((steps, n_features, TILE_BLOCK), np.float32)
        gemm_input = aligned_zeros((k_padded, TILE_BLOCK), np.float32)  # rows past 2F + 1 + H stay 0
        gemm_input[2 * n_features] = 1.0
        operand = aligned_zeros((k_padded // 2, TILE_BLOCK), np.uint32)
        gates = aligned_zeros((n_gate_rows, TILE_BLOCK), np.float32)
        hidden = aligned_zeros((n_hidden, TILE_BLOCK), np.float32)
        cell = aligned_zeros((n_hidden, TILE_BLOCK), np.float32)
        scratch = aligned_zeros((3, n_features, TILE_BLOCK), np.float32)
        for block in range(worker, n_blocks, workers):
            p0 = block * TILE_BLOCK
            width = min(TILE_BLOCK, n - p0)  # a last, narrower block: its extra columns are zero pixels
            for t in range(steps):
                for k in range(n_features):
                    x[t, k, :width] = values[t, k, p0:p0 + width]
                    m[t, k, :width] = masks[t, k, p0:p0 + width]
                    d[t, k, :width] = deltas[t, k, p0:p0 + width]
                    x[t, k, width:] = 0.0
                    m[t, k, width:] = 0.0
                    d[t, k, width:] = 0.0
            hidden[:] = 0.0
            cell[:] = 0.0
            for t in range(steps):
                # one call site: a second inlined copy of the pass took the compilation from 31 to 60 s
                _next_input(0, TILE_BLOCK, hidden, d[t], x[t], m[t], weights, gemm_input, scratch, no_copy,
                            sigmoid_alpha)
                if filled.shape[0]:
                    for k in range(n_features):
                        filled[t, k, p0:p0 + width] = gemm_input[k, :width]
                # the first step's state is zero: only x, the mask and 1 add anything
                _block_product(block_weight, 2 * n_features + 1 if t == 0 else 2 * n_features + 1 + n_hidden,
                               gemm_input, operand, gates)
                for j in range(n_hidden):
                    gi, gf, gg, go = gates[j], gates[n_hidden + j], gates[2 * n_hidden + j], gates[3 * n_hidden + j]
                    c, h = cell[j], hidden[j]
                    for p in range(TILE_BLOCK):
                        c[p], h[p] = lstm_update(gi[p], gf[p], gg[p], go[p], c[p])
            for j in range(n_hidden):
                hidden_out[j, p0:p0 + width] = hidden[j, :width]
        _end_products(block_weight)


@numba.njit(inline="always", fastmath=True)
def _relu(rows, p0, p1):
    zero = np.float32(0.0)
    for k in range(rows.shape[0]):
        row = rows[k, p0:p1]
        for p in range(p1 - p0):
            row[p] = max(row[p], zero)


@numba.njit(inline="always", fastmath=True)
def _softmax(logits, largest, total, probabilities, p0, p1):
    """Class probabilities ``probabilities[p0:p1]`` (pixel, class) of ``logits`` (class, pixel),
    which become exp(logit - the pixel's largest); each operation runs along the pixels, and
    the classes are summed one row after another, an order that cannot depend on the tile.
    exp of a value <= 0 is the decay's (:func:`decay_factor`, relative error < 2e-7): LLVM
    vectorises it, where NumPy's softmax over a tile held the GIL for 0.2 ms (py-spy)."""
    n_classes, width = logits.shape[0], p1 - p0
    top, sums = largest[p0:p1], total[p0:p1]
    top[:] = logits[0, p0:p1]
    for k in range(1, n_classes):
        row = logits[k, p0:p1]
        for p in range(width):
            top[p] = max(top[p], row[p])
    for k in range(n_classes):
        row = logits[k, p0:p1]
        for p in range(width):
            row[p] = decay_factor(row[p] - top[p])
        if k == 0:
            sums[:] = row
        else:
            for p in range(width):
                sums[p] += row[p]
    for p in range(width):
        for k in range(n_classes):
            probabilities[p0 + p, k] = logits[k, p0 + p] / sums[p]


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _embed(ancillary, weight, bias, embedded):
    """The ancillary data's embedding relu(W_e a + b_e) (E, B) from ``ancillary`` (A, B)."""
    n = ancillary.shape[1]
    for block in numba.prange((n + HEAD_BLOCK - 1) // HEAD_BLOCK):
        wide_vectors()
        p0 = block * HEAD_BLOCK
        p1 = min(p0 + HEAD_BLOCK, n)
        _affine(embedded, bias, weight, ancillary, p0, p1)
        _relu(embedded, p0, p1)


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _classify(layer, weight, bias, logits, softmax_scratch, probabilities):
    """The class probabilities (B, K) from the head's first layer before its relu (head hidden,
    B): softmax of the output layer's logits (K, B, in ``logits``)."""
    n = layer.shape[1]
    for block in numba.prange((n + HEAD_BLOCK - 1) // HEAD_BLOCK):
        wide_vectors()
        p0 = block * HEAD_BLOCK
        p1 = min(p0 + HEAD_BLOCK, n)
        _relu(layer, p0, p1)
        _affine(logits, bias, weight, layer, p0, p1)
        _softmax(logits, softmax_scratch[0], softmax_scratch[1], probabilities, p0, p1)


def _bfloat16_bits(tensor: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's memory as uint16 for the Numba pass; an empty array for other types
    (the pass then skips its bfloat16 copy)."""
    if tensor.dtype != torch.bfloat16:
        return np.empty((0, 0), np.uint16)
    return tensor.view(torch.int16).numpy().view(np.uint16)


def _gate_values(gates: torch.Tensor) -> np.ndarray:
    """The GEMM's gates as the Numba pass reads them: float32, or a bfloat16 tensor's bits."""
    return gates.numpy() if gates.dtype == torch.float32 else _bfloat16_bits(gates)


@dataclass(frozen=True)
class _Direction:
    """One RITS pass's weights, laid out for the fused step."""

    gate_weight: torch.Tensor  # (4H, 2F + 1 + H): columns for x_filled, mask, bias, decayed hidden state
    first_gate_weight: torch.Tensor  # its first 2F + 1 columns (the first step's state is zero), contiguous
    step_weights: tuple[np.ndarray, ...]  # for _next_input; decay weights negated
    sigmoid_alpha: bool  # the combination weight through a sigmoid (models trained here) or as is
    # the abundance head's first layer, its columns for the hidden state, the embedded ancillary
    # data and its bias (head hidden, H + E + 1): one GEMM, where in Numba it took 0.45-0.6 us a
    # pixel and direction, 8 % of the bf16 engine (Intel Xeon with AMX, benchmarks/NOTES.md,
    # eleventh session)
    head_weight: torch.Tensor
    # for _embed and _classify: the embedding's weight and bias (empty without ancillary data),
    # the output layer's
    head_weights: tuple[np.ndarray, ...]
    # the gate weight for _recurrence_in_blocks (bfloat16 bits for the tiles, fp32 packed for the
    # vectors; 64-byte aligned), or None where the GEMM is torch's, a call per step
    block_weight: np.ndarray | None = None

    @classmethod
    def of(cls, rits: RITS, cfg: BritsConfig, gemm_dtype: torch.dtype = torch.float32, blocks: bool = False
           ) -> _Direction:
        cell = rits.cell
        gate_weight = torch.cat([cell.weight_ih, (cell.bias_ih + cell.bias_hh)[:, None], cell.weight_hh], dim=1)
        tensor = lambda p: p.detach().float().cpu().contiguous()  # noqa: E731
        array = lambda p: np.ascontiguousarray(tensor(p).numpy())  # noqa: E731
        step_weights = (
            array(-(rits.decay_hidden.weight * rits.decay_hidden.mask)), array(-rits.decay_hidden.bias),
            array(-torch.diagonal(rits.decay_input.weight)), array(-rits.decay_input.bias),
            array(rits.combine.weight), array(rits.combine.bias),
            array(rits.history_regression.weight), array(rits.history_regression.bias),
            array(rits.feature_regression.weight * rits.feature_regression.mask),
            array(rits.feature_regression.bias))
        embedding = rits.ancillary_embedding
        hidden_layer, output_layer = rits.head[1], rits.head[3]
        embedding_weights = ((array(embedding[0].weight), array(embedding[0].bias)) if embedding is not None
                             else (np.zeros((0, 0), np.float32), np.zeros(0, np.float32)))
        head_weight = tensor(torch.cat([hidden_layer.weight, hidden_layer.bias[:, None]], dim=1))
        head_weights = (*embedding_weights, array(output_layer.weight), array(output_layer.bias))
        gate_weight = tensor(gate_weight).to(gemm_dtype)
        first_gate_weight = gate_weight[:, :2 * cfg.n_features + 1].contiguous()
        block_weight = None
        if blocks and gemm_dtype == torch.bfloat16:  # torch's buffers are 64-byte aligned, as the tile loads want
            padded = torch.zeros(*(-(-extent // K_PER_TILE) * K_PER_TILE for extent in gate_weight.shape),
                                 dtype=torch.bfloat16)
            padded[:gate_weight.shape[0], :gate_weight.shape[1]] = gate_weight
            block_weight = _bfloat16_bits(padded)
        elif blocks:
            block_weight = pack_weight(gate_weight.numpy())
        return cls(gate_weight, first_gate_weight, step_weights, cfg.combine_activation == "sigmoid", head_weight,
                   head_weights, block_weight)

    def probabilities(self, values: np.ndarray, masks: np.ndarray, deltas: np.ndarray, ancillary: np.ndarray,
                      filled: np.ndarray | None) -> np.ndarray:
        """Class probabilities (B, K) of one direction over a tile; ``values``/``masks``/``deltas`` are
        (T, F, B) in this direction's time order, ``ancillary`` (A, B). Writes the gap-filled
        series into ``filled`` (T, F, B) when given."""
        batch = values.shape[2]
        n_hidden = self.gate_weight.shape[0] // 4
        embedding_weight, embedding_bias, output_weight, output_bias = self.head_weights
        n_embedded = embedding_weight.shape[0]
        # the head's GEMM input [h; embedded ancillary data; 1]: the recurrence's state is its first rows
        head_input_t = torch.zeros(n_hidden + n_embedded + 1, batch)
        head_input = head_input_t.numpy()
        head_input[-1] = 1.0
        if n_embedded:
            _embed(ancillary, embedding_weight, embedding_bias, head_input[n_hidden:-1])
        if self.block_weight is not None:
            _recurrence_in_blocks(self.block_weight, _TILE_CONFIGURATION, values, masks, deltas, self.step_weights,
                                  self.sigmoid_alpha, head_input[:n_hidden],
                                  np.empty((0, 0, 0), np.float32) if filled is None else filled,
                                  numba.get_num_threads())
        else:
            self._recurrence(values, masks, deltas, head_input[:n_hidden], filled)
        layer = gate_product(self.head_weight, head_input_t, None)
        logits = np.empty((output_bias.shape[0], batch), np.float32)
        probabilities = np.empty((batch, output_bias.shape[0]), np.float32)
        _classify(layer.numpy(), output_weight, output_bias, logits, np.empty((2, batch), np.float32), probabilities)
        return probabilities

    def _recurrence(self, values: np.ndarray, masks: np.ndarray, deltas: np.ndarray, hidden: np.ndarray,
                    filled: np.ndarray | None) -> None:
        """The recurrence with torch's GEMM, one call a step: the last state into ``hidden``."""
        steps, n_features, batch = values.shape
        gemm_dtype = self.gate_weight.dtype
        # torch allocates 64-byte aligned buffers; MKL's results can depend on alignment, and a
        # resumed run must reproduce an uninterrupted one bit for bit
        gemm_input_t = torch.zeros(self.gate_weight.shape[1], batch)
        gemm_input = gemm_input_t.numpy()
        gemm_input[2 * n_features] = 1.0
        # what the GEMM multiplies: the fp32 input itself, or the bf16 copy the Numba pass keeps
        gemm_operand_t = gemm_input_t if gemm_dtype == torch.float32 else gemm_input_t.to(gemm_dtype)
        gemm_operand = _bfloat16_bits(gemm_operand_t)
        gates = None if through_onednn(gemm_dtype) else torch.empty(self.gate_weight.shape[0], batch,
                                                                        dtype=gemm_dtype)
        # the pass's view of the gates, made once where every product is written into ``gates``: made
        # after each GEMM it took 20 us a step, torch's code being out of the cache by then (Intel
        # Xeon with AMX, benchmarks/NOTES.md, eleventh session)
        gate_values = None if gates is None else _gate_values(gates)
        cell = np.zeros_like(hidden)
        scratch = np.empty((3, n_features, batch), np.float32)
        _first_input(hidden, deltas[0], values[0], masks[0], self.step_weights, gemm_input, scratch, gemm_operand,
                     self.sigmoid_alpha)
        recurrent_rows = 2 * n_features + 1
        for t in range(steps):
            if filled is not None:
                filled[t] = gemm_input[:n_features]
            if t == 0:  # the state starts at zero: its part of the product would only add zeros
                product = gate_product(self.first_gate_weight, gemm_operand_t[:recurrent_rows], gates)
            else:
                product = gate_product(self.gate_weight, gemm_operand_t, gates)
            following = min(t + 1, steps - 1)
            _cell_then_next_input(_gate_values(product) if gate_values is None else gate_values, cell, hidden,
                                  t == steps - 1, deltas[following], values[following], masks[following],
                                  self.step_weights, gemm_input, scratch, gemm_operand, self.sigmoid_alpha)


def _feature_major(series: np.ndarray, padded: int) -> np.ndarray:
    """A tile's (B, T, F) series as float32 (T, F, padded), zero past its pixels, in one copy."""
    pixels, steps, n_features = series.shape
    out = np.empty((steps, n_features, padded), np.float32)
    out[..., :pixels] = series.transpose(1, 2, 0)
    out[..., pixels:] = 0.0
    return out


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FUSED_PRECISIONS = ("fp32", "bf16")  # fp16 has no fast CPU matrix product (measured: 20x slower than fp32)
# fp32 in blocks (the vectors' product inside the kernel) on Intel's CPUs with AVX-512, where it measured
# 1.2-1.3x MKL's torch.mm between passes with the same bits (NOTES, twelfth session; its 24 sums of 16
# floats need AVX-512's 32 registers); elsewhere torch's GEMM: oneDNN's linear layer, twice MKL's rate on
# the AMD EPYC VM, where the blocks have not been measured
FP32_IN_BLOCKS = intel_cpu() and "avx512f" in cpuinfo().get("flags", "").split()


@functools.cache
def cpu_has_kernels(precision: str) -> bool:
    """Whether this CPU has matrix kernels for ``precision`` (oneDNN's: bf16 from AVX512 or
    AMX on, fp16 with AVX512-FP16 or AMX-FP16); without them torch multiplies that type
    30-60x slower than fp32 (benchmarks/NOTES.md, 2026-12-03)."""
    probes = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return precision not in probes or bool(probes[precision]())


def require_cpu_kernels(precision: str) -> None:
    """Refuse a reduced ``precision`` on a CPU without kernels for it (:func:`cpu_has_kernels`):
    one line, rather than a run many times slower than asked for."""
    if not cpu_has_kernels(precision):
        raise MsmtuError(f"precision {precision}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
                         f"{precision} matrix kernels, so the model would run 30-60x slower than in fp32; use "
                         "precision fp32 here, or reduced precision on CPUs with AVX512 or AMX, or on GPUs")


class FusedBrits:
    """A trained :class:`BRITS` for CPU inference (weights copied; the model is not changed).

    ``precision`` bf16 multiplies in bfloat16 (weights and each step's GEMM input rounded,
    gates returned in bfloat16); the state, the decays, the regressions and the head stay
    float32. Fast only on CPUs with bf16 instructions (AVX512-BF16, AMX).

    ``blocks``: each block of pixels runs its whole recurrence in one Numba call with the gates'
    product inside it (:func:`_recurrence_in_blocks`), rather than torch's GEMM between passes.
    By default: in bf16 where the CPU has AMX (:func:`~msmtu_batch.model.amx.amx_available`; the
    gates then stay float32), in fp32 where :data:`FP32_IN_BLOCKS`."""

    def __init__(self, model: BRITS, precision: str = "fp32", *, blocks: bool | None = None) -> None:
        if precision not in FUSED_PRECISIONS:
            raise ValueError(f"precision {precision!r}: the CPU engine runs {' or '.join(FUSED_PRECISIONS)}")
        self.config = model.cfg
        self.precision = precision
        # amx_available also asks Linux for the tiles, without which their first instruction is illegal
        if blocks and precision == "bf16" and not amx_available():
            raise ValueError("blocks in bf16: this CPU has no AMX tiles (or Linux did not grant them)")
        if blocks is None:
            blocks = amx_available() if precision == "bf16" else FP32_IN_BLOCKS
        self.blocks = blocks
        gemm_dtype = PRECISIONS[precision] or torch.float32
        self.forward_pass = _Direction.of(model.forward_pass, model.cfg, gemm_dtype, blocks)
        self.backward_pass = _Direction.of(model.backward_pass, model.cfg, gemm_dtype, blocks)

    def __call__(self, values: np.ndarray, masks: np.ndarray, deltas_forward: np.ndarray,
                 deltas_backward: np.ndarray, ancillary: np.ndarray | None = None, *, imputed: bool = True,
                 tile: int = PIXELS_PER_THREAD, threads: int | None = None) -> dict[str, np.ndarray]:
        """Inputs as :class:`~msmtu_batch.model.preprocess.ModelInputs` (pixel-major, standardised,
        0 at gaps). Returns abundance (n, K), forward/backward abundances, uncertainty (n,)
        and, if ``imputed``, the gap-filled series (n, T, F) in standardised units.

        ``threads`` (default: torch's intra-op threads) each take whole tiles with one core
        (tiles made smaller where there are fewer than threads): on two cores that is 10 %
        faster than splitting every tile's GEMM and Numba pass (two OpenMP runtimes hand the
        cores back and forth 48 times per tile)."""
        n, steps, n_features = values.shape
        if self.config.backward_deltas == "forward_order":  # an imported research model's input (BritsConfig)
            deltas_backward = deltas_forward
        if ancillary is None:
            ancillary = np.zeros((n, 0), np.float32)
        # the Numba passes index without bounds checks: shapes the model does not take are refused here
        if n_features != self.config.n_features or ancillary.shape[1] != self.config.n_ancillary:
            raise ValueError(f"inputs with {n_features} bands and {ancillary.shape[1]} ancillary values; the model "
                             f"takes {self.config.n_features} and {self.config.n_ancillary}")
        threads = threads or torch.get_num_threads()
        if threads > 1:  # a tile for every thread, down to tiles of PIXEL_MULTIPLE pixels
            tile = min(tile, max(PIXEL_MULTIPLE, -(-n // threads)))
        starts = range(0, n, tile)

        def run_tile(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
            window = slice(start, start + tile)
            pixels = min(tile, n - start)
            padded = pixels + -pixels % PIXEL_MULTIPLE  # zero pixels after the tile's own
            x, m, d_forward, d_backward = (_feature_major(a[window], padded)
                                           for a in (values, masks, deltas_forward, deltas_backward))
            anc = np.zeros((ancillary.shape[1], padded), np.float32)
            anc[:, :pixels] = ancillary[window].T
            filled_f = np.empty_like(x) if imputed else None
            filled_b = np.empty_like(x) if imputed else None
            with torch.inference_mode():
                p_f = self.forward_pass.probabilities(x, m, d_forward, anc, filled_f)
                p_b = self.backward_pass.probabilities(np.ascontiguousarray(x[::-1]), np.ascontiguousarray(m[::-1]),
                                                       d_backward, anc, filled_b)
            filled = (0.5 * (filled_f + filled_b[::-1])).transpose(2, 0, 1)[:pixels] if imputed else None
            return p_f[:pixels], p_b[:pixels], filled

        if threads > 1 and len(starts) > 1:
            previous = torch.get_num_threads()

            def one_core_tile(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
                torch.set_num_threads(1)
                numba.set_num_threads(1)  # per calling thread
                return run_tile(start)

            try:
                with ThreadPoolExecutor(threads) as pool:
                    results = list(pool.map(one_core_tile, starts))
            finally:
                torch.set_num_threads(previous)
        else:  # one thread (or a tile too small to share): Numba's too, for an idle OpenMP thread
            # spins, and a process kept to one core beside another ran 8x slower for it
            previous = numba.get_num_threads()
            numba.set_num_threads(1)
            try:
                results = [run_tile(start) for start in starts]
            finally:
                numba.set_num_threads(previous)
        k = self.config.n_classes
        forward = np.concatenate([r[0] for r in results]) if results else np.zeros((0, k), np.float32)
        backward = np.concatenate([r[1] for r in results]) if results else np.zeros((0, k), np.float32)
        out = {"forward_abundance": forward, "backward_abundance": backward,
               "abundance": 0.5 * (forward + backward),
               "uncertainty": 0.5 * np.abs(forward - backward).sum(axis=1)}
        if imputed:
            out["imputed"] = (np.concatenate([r[2] for r in results]) if results
                              else np.zeros((0, steps, n_features), np.float32))
        return out


def predict(model: BRITS, inputs: ModelInputs, batch_size: int = 8192, device: torch.device | str = "cpu", *,
            imputed: bool = True, fused: bool = True, precision: str = "fp32") -> dict[str, np.ndarray]:
    """Abundances (n, K), uncertainty (n,) and, if ``imputed``, the imputed series (n, T, F;
    standardised units). On a CPU the :class:`FusedBrits` engine runs (unless ``fused`` is
    False); elsewhere, or unfused, the model itself in batches of ``batch_size``.
    ``precision`` bf16 on a CPU runs the engine's bfloat16 GEMMs; elsewhere, and fp16, the model
    under ``torch.autocast`` (its matrix products in that type); results are float32."""
    model.eval()
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if fused and device.type == "cpu" and precision in FUSED_PRECISIONS:
        out = FusedBrits(model, precision)(inputs.values, inputs.masks, inputs.deltas_forward, inputs.deltas_backward,
                                inputs.ancillary, imputed=imputed)
        return {name: out[name] for name in ("abundance", "uncertainty", "imputed") if name in out}
    parts: dict[str, list[np.ndarray]] = {"abundance": [], "uncertainty": [], "imputed": []}
    reduced = PRECISIONS[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=reduced or torch.float32,
                                                enabled=reduced is not None):
        for start in range(0, len(inputs), batch_size):
            window = slice(start, start + batch_size)
            series = [as_tensor(a[window], device) for a in
                      (inputs.values, inputs.masks, inputs.deltas_forward, inputs.deltas_backward)]
            ancillary = as_tensor(inputs.ancillary[window], device) if inputs.ancillary.shape[1] else None
            out = model(*series, ancillary, with_loss=False)
            parts["abundance"].append(out.abundance.float().cpu().numpy())
            parts["uncertainty"].append(out.uncertainty.float().cpu().numpy())
            if imputed:
                parts["imputed"].append(out.imputed.float().cpu().numpy())
    n_classes, steps, n_features = model.cfg.n_classes, model.cfg.n_steps, model.cfg.n_features
    empty = {"abundance": (0, n_classes), "uncertainty": (0,), "imputed": (0, steps, n_features)}
    return {k: np.concatenate(v) if v else np.zeros(empty[k], np.float32) for k, v in parts.items()
            if imputed or k != "imputed"}


@numba.njit(fastmath=True, cache=True)
def bfloat16_round_trip(values, bits, widened):
    """The engine's conversions over an array (for the tests): float32 -> bfloat16 bits -> float32."""
    for i in range(values.shape[0]):
        bits[i] = round_to_bfloat16(values[i])
        widened[i] = widen_bfloat16(bits[i])
