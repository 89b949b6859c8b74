"""BRITS: shapes and invariants, both directions, training reduces the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msmtu_batch.model.brits import BRITS, BritsConfig, LossWeights, brits_loss
from msmtu_batch.model.inference import predict
from msmtu_batch.model.preprocess import Standardizer, compute_deltas, prepare_inputs
from msmtu_batch.testing.research import ResearchBRITS


def synthetic_problem(n: int = 96, seed: int = 0, n_ancillary: int = 3):
    """Abundances that drive both the spectra and the ancillary values, with gaps."""
    rng = np.random.default_rng(seed)
    abundance = rng.dirichlet(np.ones(4), size=n).astype(np.float32)
    spectra = rng.uniform(0.05, 0.5, size=(4, 12, 7)).astype(np.float32)
    values = np.einsum("nk,ktf->ntf", abundance, spectra) + rng.normal(0, 0.01, (n, 12, 7)).astype(np.float32)
    masks = (rng.random((n, 12, 1)) > 0.3).repeat(7, axis=2).astype(np.float32)
    ancillary = (abundance[:, :n_ancillary] + rng.normal(0, 0.05, (n, n_ancillary))).astype(np.float32)
    ancillary_stats = Standardizer.fit(ancillary) if n_ancillary else None
    inputs = prepare_inputs(np.where(masks > 0, values, 0), masks, ancillary,
                            Standardizer.fit(values, masks), ancillary_stats)
    return inputs, abundance


def tensors(inputs):
    series = [torch.from_numpy(a) for a in (inputs.values, inputs.masks, inputs.deltas_forward,
                                            inputs.deltas_backward)]
    return series, (torch.from_numpy(inputs.ancillary) if inputs.ancillary.shape[1] else None)


@pytest.mark.parametrize("n_ancillary", [0, 3])
def test_outputs_are_abundances_and_imputations(n_ancillary):
    torch.manual_seed(0)
    inputs, _ = synthetic_problem(n_ancillary=n_ancillary)
    cfg = BritsConfig(n_classes=4, n_ancillary=n_ancillary, hidden=16, embed=8, head_hidden=16)
    model = BRITS(cfg).eval()
    series, ancillary = tensors(inputs)
    out = model(*series, ancillary)
    assert out.abundance.shape == (96, 4) and out.imputed.shape == (96, 12, 7)
    assert torch.allclose(out.abundance.sum(dim=1), torch.ones(96), atol=1e-5)
    assert (out.abundance >= 0).all()
    assert ((out.uncertainty >= 0) & (out.uncertainty <= 1)).all()
    # observed values pass through the imputation unchanged
    observed = series[1] > 0
    assert torch.allclose(out.imputed[observed], series[0][observed])
    assert out.impute_loss > 0 and out.consistency_loss >= 0


def test_backward_pass_reads_time_reversed():
    torch.manual_seed(0)
    inputs, _ = synthetic_problem(n=8, n_ancillary=0)
    model = BRITS(BritsConfig(n_classes=4, hidden=8, head_hidden=8)).eval()
    values, masks, d_fwd, d_bwd = tensors(inputs)[0]
    out = model(values, masks, d_fwd, d_bwd)
    research = ResearchBRITS(model.cfg).eval()  # one direction at a time, each on its own
    research.load_state_dict(model.state_dict())
    logits, _, _ = research.backward_pass(values.flip(1), masks.flip(1), d_bwd, None)
    assert torch.allclose(out.backward_abundance, torch.softmax(logits, dim=1))
    np.testing.assert_array_equal(inputs.deltas_backward, compute_deltas(inputs.masks[:, ::-1]))


def test_loss_goes_down_on_a_small_problem():
    torch.manual_seed(1)
    inputs, abundance = synthetic_problem(n=128, seed=1)
    model = BRITS(BritsConfig(n_classes=4, n_ancillary=3, hidden=32, embed=8, head_hidden=32, dropout=0.0))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    series, ancillary = tensors(inputs)
    target = torch.from_numpy(abundance)
    losses = []
    for _ in range(60):
        loss, parts = brits_loss(model(*series, ancillary), target, LossWeights())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append((loss.item(), parts["label"].item()))
    assert losses[-1][0] < 0.5 * losses[0][0]
    assert losses[-1][1] < 0.3 * losses[0][1], "the abundance error itself falls"


def test_unfused_predict_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    inputs, _ = synthetic_problem(n=50)
    model = BRITS(BritsConfig(n_classes=4, n_ancillary=3, hidden=16, embed=8, head_hidden=16))
    whole = predict(model, inputs, batch_size=1000, fused=False)
    pieces = predict(model, inputs, batch_size=7, fused=False)
    for key in whole:
        np.testing.assert_allclose(whole[key], pieces[key], atol=1e-6)
