"""fp32 matrix products through oneDNN on CPUs other than Intel's, where torch has it.

torch's ``mm``, ``bmm`` and ``baddbmm`` multiply fp32 through MKL, whose sgemm takes its AVX2
code on AMD CPUs; oneDNN's linear layer (``torch.ops.mkldnn._linear_pointwise``) runs its
AVX-512 code there: at the LSTM's shapes 212 GFLOP/s a core of the development VM's EPYC
against MKL's 102, with the same bits (benchmarks/NOTES.md, 2026-12-07, seventh and eighth
sessions). On Intel's CPUs MKL is the faster: the engine in fp32 ran 87,000-90,000 pixels/s
with it against 74,000-77,000 through oneDNN (a 2-core Xeon with AMX, NOTES, eleventh
session). Other types (bf16, which torch already sends to oneDNN; float64, the tests'), Intel's
CPUs and a torch without oneDNN take torch's own products.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def _onednn_linear():
    """oneDNN's linear layer as torch exposes it, or None where torch was built without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in Linux's /proc/cpuinfo (``vendor_id``, ``model name``,
    ``flags``, ...), as ``lscpu`` reads them; empty where there is no such file."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def intel_cpu() -> bool:
    """Whether this is an Intel CPU (False where it cannot tell)."""
    return cpuinfo().get("vendor_id") == "GenuineIntel"


ONEDNN_LINEAR = _onednn_linear()
FP32_THROUGH_ONEDNN = not intel_cpu()  # else MKL's sgemm, through torch


def through_onednn(dtype: torch.dtype) -> bool:
    """Whether this module multiplies ``dtype`` through oneDNN (its products are then new tensors)."""
    return dtype == torch.float32 and FP32_THROUGH_ONEDNN and ONEDNN_LINEAR is not None


def times_transposed(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right.T`` as a new tensor, by oneDNN (where :func:`through_onednn`); a linear
    layer's weight is (out_features, in_features), so ``right`` is the product's transpose."""
    return ONEDNN_LINEAR(left, right, None, "none", [], "")


def batched_product(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = left @ right`` for batches of matrices (b, m, k) @ (b, k, n)."""
    if not through_onednn(left.dtype):
        return torch.bmm(left, right, out=out)
    for i in range(left.shape[0]):
        out[i].copy_(times_transposed(left[i], right[i].t()))
    return out


def add_batched_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``out += left @ right`` for batches of matrices (b, m, k) @ (b, k, n)."""
    if not through_onednn(left.dtype):
        return out.baddbmm_(left, right)
    for i in range(left.shape[0]):
        out[i].add_(times_transposed(left[i], right[i].t()))
    return out
