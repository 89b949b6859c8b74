"""The AMX tile product of the bf16 engine against NumPy, on random shapes and values (where the
CPU has AMX; elsewhere the engine multiplies through oneDNN and these tests skip), and the
engine's refusal of tiles where Linux does not grant them."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msmtu_batch.model.amx import (
    aligned_zeros,
    amx_available,
    configure_tiles,
    release_tiles,
    tile_configuration,
    tile_product,
)
from msmtu_batch.model.inference import _interleave_bfloat16

needs_amx = pytest.mark.skipif(not amx_available(), reason="this CPU has no AMX tiles (or Linux did not grant them)")


@numba.njit
def _product(weight, rows, k_tiles, configuration):
    """``weight`` (bfloat16 bits) times ``rows`` (float32, rounded to bfloat16) as the engine makes it."""
    operand = aligned_zeros((rows.shape[0] // 2, rows.shape[1]), np.uint32)
    _interleave_bfloat16(rows, operand, k_tiles * 16, rows.shape[1])
    product = aligned_zeros((weight.shape[0], rows.shape[1]), np.float32)
    configure_tiles(configuration.ctypes.data)
    tile_product(weight, operand, product, k_tiles)
    release_tiles()
    return product


def bfloat16(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values).to(torch.bfloat16)


@needs_amx
@settings(max_examples=40, deadline=None)
@given(gate_tiles=st.integers(1, 4), k_tiles=st.integers(1, 4), used_k_tiles=st.integers(1, 4),
       pixel_tiles=st.integers(1, 4), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_the_tile_product_is_the_product_of_the_bfloat16_factors(gate_tiles, k_tiles, used_k_tiles, pixel_tiles,
                                                                  scale, seed):
    """Every shape the kernel takes (gates, K and pixels in multiples of 32, any number of K's tiles
    used): the product of the bfloat16-rounded factors, summed in float32 (float64 reference)."""
    used_k_tiles = min(used_k_tiles, k_tiles)
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((32 * gate_tiles, 32 * k_tiles)) * scale).astype(np.float32)
    rows = rng.standard_normal((32 * k_tiles, 32 * pixel_tiles)).astype(np.float32)
    weight_bits = torch.zeros(weight.shape, dtype=torch.bfloat16)  # 64-byte aligned, as the engine's
    weight_bits.copy_(bfloat16(weight))
    got = _product(weight_bits.view(torch.int16).numpy().view(np.uint16), rows, used_k_tiles, tile_configuration())
    k = 32 * used_k_tiles
    exact = bfloat16(weight)[:, :k].double().numpy() @ bfloat16(rows)[:k].double().numpy()
    magnitude = np.abs(bfloat16(weight)[:, :k].double().numpy()) @ np.abs(bfloat16(rows)[:k].double().numpy())
    assert got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - exact), k * 2.0**-23 * magnitude + 1e-30)


def test_the_operand_interleaves_row_pairs_rounded_as_torch_rounds():
    """operand[r, p]: row 2r's bfloat16 in the low half, row 2r + 1's in the high, rounded to nearest even."""
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((64, 32)).astype(np.float32)
    operand = np.zeros((32, 32), np.uint32)
    _interleave_bfloat16(rows, operand, 32, 32)
    bits = bfloat16(rows).view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    np.testing.assert_array_equal(operand, bits[0::2] | (bits[1::2] << 16))


def test_asking_for_tiles_where_linux_does_not_grant_them_is_refused(monkeypatch):
    """Without the permission Linux gives a process, a tile instruction is illegal and kills it:
    the engine refuses bf16 ``blocks`` instead (any CPU: the check is made as if this one had none)."""
    from msmtu_batch.model import inference
    from msmtu_batch.model.brits import BRITS, BritsConfig

    monkeypatch.setattr(inference, "amx_available", lambda: False)
    model = BRITS(BritsConfig(n_classes=3))
    with pytest.raises(ValueError,
                       match=r"^blocks in bf16: this CPU has no AMX tiles \(or Linux did not grant them\)$"):
        inference.FusedBrits(model, "bf16", blocks=True)
    assert not inference.FusedBrits(model, "bf16").blocks
