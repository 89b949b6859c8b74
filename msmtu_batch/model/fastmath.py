"""Vectorisable float32 activations for the Numba passes of the CPU engines (inference and
training): tanh, sigmoid, the LSTM update and the temporal decay as rational functions."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# Numba's math.tanh / math.exp are scalar libm calls (2.2 ns per value on the development VM,
# 12x slower than this), so the pointwise pass uses a rational approximation of tanh that
# LLVM vectorises: the minimax fit of Eigen's fast tanh, clamped where float32 tanh is +-1.
# Its largest error is 3.1e-7 (absolute, measured over [-10, 10] in steps of 1e-5).
_TANH_CLAMP = np.float32(7.90531110763549805)
_P = tuple(np.float32(a) for a in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                   5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                   4.89352455891786e-03))
_Q = tuple(np.float32(b) for b in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                   4.89352518554385e-03))
HALF, TWO = np.float32(0.5), np.float32(2.0)


@numba.njit(inline="always", fastmath=True)
def tanh_fraction(x):
    """(p, q) with tanh(x) ~ p / q; callers combine fractions to save divisions."""
    x = min(max(x, -_TANH_CLAMP), _TANH_CLAMP)
    x2 = x * x
    p = _P[0]
    for a in _P[1:]:
        p = x2 * p + a
    q = _Q[0]
    for b in _Q[1:]:
        q = x2 * q + b
    return x * p, q


@numba.njit(inline="always", fastmath=True)
def lstm_update(i, f, g, o, c):
    """(new cell, new hidden) from the pre-activations; sigmoid(x) = (q + p) / 2q with
    tanh(x / 2) = p / q, so the cell takes one division and the hidden state another."""
    pi, qi = tanh_fraction(HALF * i)
    pf, qf = tanh_fraction(HALF * f)
    pg, qg = tanh_fraction(g)
    po, qo = tanh_fraction(HALF * o)
    cell = ((qf + pf) * c * qi * qg + (qi + pi) * pg * qf) / (TWO * qf * qi * qg)
    pc, qc = tanh_fraction(cell)
    return cell, (qo + po) * pc / (TWO * qo * qc)


# 2^f on [0, 1): a degree-5 fit of its relative error with 2^0 = 1 exactly (relative error
# 1.6e-7 in float32); exp(z) = 2^n 2^f with n = floor(z log2 e), 2^n put in the exponent bits
_EXP2 = tuple(np.float32(a) for a in (0.0018670554272830486, 0.009017188102006912, 0.05579980090260506,
                                      0.24016447365283966, 0.6931512951850891, 1.0))
_LOG2E = np.float32(1.4426950408889634)
_SMALLEST_EXPONENT = np.float32(-126.0)  # 2^-126, the smallest normal float32: exp(z) below it is 0 to us


@intrinsic
def _power_of_two(typingctx, n):
    """2^n as float32 for an integer n in [-126, 127], written into the exponent bits."""
    if n != types.int32:
        return None

    def codegen(context, builder, signature, args):
        int32 = ir.IntType(32)
        biased = builder.shl(builder.add(args[0], ir.Constant(int32, 127)), ir.Constant(int32, 23))
        return builder.bitcast(biased, ir.FloatType())
    return types.float32(types.int32), codegen


@numba.njit(inline="always", fastmath=True)
def decay_factor(z):
    """exp(min(z, 0)) (absolute error < 1.5e-7): 12 vector operations, the tanh fraction's form
    took 21 and the decays were half of the pass between two GEMMs."""
    t = max(min(z, np.float32(0.0)) * _LOG2E, _SMALLEST_EXPONENT)
    n = np.floor(t)
    f = t - n
    power = _EXP2[0]
    for a in _EXP2[1:]:
        power = power * f + a
    return power * _power_of_two(np.int32(n))


@numba.njit(inline="always", fastmath=True)
def fast_sigmoid(x):
    """sigmoid(x) = (q + p) / 2q with tanh(x / 2) = p / q."""
    p, q = tanh_fraction(HALF * x)
    return (q + p) / (TWO * q)


@numba.njit(inline="always", fastmath=True)
def fast_tanh(x):
    p, q = tanh_fraction(x)
    return p / q


@intrinsic
def wide_vectors(typingctx):
    """Called in a function (in a parallel loop's body: the function Numba makes of it), lets LLVM
    vectorise it with 512-bit vectors where the CPU has them. LLVM's tuning for Intel's AVX-512
    CPUs (Skylake-SP to Sapphire Rapids, and whatever a VM names them) prefers 256-bit vectors,
    and Numba takes that tuning: the engine's cell pass ran 1.4x faster with 512 (115 against
    158 us a call; Intel Xeon with AMX, benchmarks/NOTES.md, eleventh session). Nothing changes
    on CPUs without AVX-512 or whose tuning already prefers 512."""
    def codegen(context, builder, signature, args):
        # clang's -mprefer-vector-width=512 as the function's attribute; llvmlite's attribute set
        # takes only attributes without values, hence set.add
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's fma): a sum of these is added in the order written,
    whatever the fast-math flags. Written with ``+`` and ``*``, LLVM may reassociate the
    same sum differently in a loop's vector body and in its remainder, and a pixel's value
    would depend on where in its tile it lies."""
    if not a == b == c == types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen
