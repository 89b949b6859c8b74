"""The benchmark's research-code baseline feeds the model exactly what msmtu-batch does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msmtu_batch.bench import brits_flops_per_pixel, lstm_gemm_rate
from msmtu_batch.inputs.cube import ANCILLARY_SETS
from msmtu_batch.inputs.training_data import read_msmtu
from msmtu_batch.model.brits import BRITS, BritsConfig, LossWeights, brits_loss
from msmtu_batch.model.preprocess import Standardizer, prepare_inputs
from msmtu_batch.testing.research import JsonPixelDataset, ResearchBRITS, naive_training_throughput
from tests.test_model import synthetic_problem, tensors


def test_json_dataset_items_equal_the_array_store(region):
    pixels = read_msmtu(region.msmtu, "level2")
    train = pixels.split("train")
    bands, ancillary = Standardizer.fit(train.values, train.masks), Standardizer.fit(train.ancillary)
    dataset = JsonPixelDataset(region.msmtu, "level2", "train", ANCILLARY_SETS["all"], bands, ancillary)
    inputs = prepare_inputs(train.values, train.masks, train.ancillary, bands, ancillary)
    order = {int(s): i for i, s in enumerate(train.ids)}
    for i in (0, 5, len(dataset) - 1):
        item, j = dataset[i], order[int(dataset.ids[i])]
        np.testing.assert_allclose(item["values"].numpy(), inputs.values[j], atol=1e-5)
        for key in ("masks", "deltas_forward", "deltas_backward"):
            np.testing.assert_array_equal(item[key].numpy(), getattr(inputs, key)[j])
        np.testing.assert_allclose(item["ancillary"].numpy(), inputs.ancillary[j], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(item["label"].numpy(), train.abundance[j])
    model = BRITS(BritsConfig(n_classes=10, n_ancillary=9, hidden=8, embed=4, head_hidden=8))
    assert naive_training_throughput(region.msmtu, "level2", model, bands, ANCILLARY_SETS["all"], ancillary,
                                     batch_size=32, max_batches=2) > 0


def test_flop_count_and_gemm_rate():
    # the LSTM cell's (14 + 100) x 400 product dominates: 2 x 114 x 400 x 12 steps x 2 directions
    flops = brits_flops_per_pixel(BritsConfig(n_classes=10, n_ancillary=9))
    assert 2 * 114 * 400 * 12 * 2 < flops < 2.4e6 * 1.05
    assert flops == pytest.approx(2.33e6, rel=0.01)
    torch.manual_seed(0)
    assert lstm_gemm_rate(batch=256, seconds=0.05) > 1e8


def test_restructured_model_equals_the_research_formulation():
    torch.manual_seed(2)
    cfg = BritsConfig(n_classes=4, n_ancillary=3, hidden=24, embed=8, head_hidden=16, dropout=0.0)
    ours, research = BRITS(cfg), ResearchBRITS(cfg)
    research.load_state_dict(ours.state_dict())
    inputs, abundance = synthetic_problem(n=40, seed=4)
    series, ancillary = tensors(inputs)
    a, b = ours(*series, ancillary), research(*series, ancillary)
    for name in ("abundance", "forward_abundance", "backward_abundance", "imputed", "impute_loss",
                 "consistency_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6, msg=name)
    target = torch.from_numpy(abundance)
    loss_a, _ = brits_loss(a, target, LossWeights())
    loss_b, _ = brits_loss(b, target, LossWeights())
    loss_a.backward()
    loss_b.backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), research.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("script", "models"), [
    ("two_level.py", ["level 2 only", "level 1 only", "two-level"]),
    ("class_weights.py", ["soft, no weights (default)", "soft, balanced weights", "hard labels"])])
def test_the_model_comparison_benchmarks_run(tmp_path, script, models):
    """benchmarks/two_level.py and class_weights.py at toy sizes: every model is trained and
    scored, the table printed, the rows written, the simulated regions removed."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--out", str(tmp_path), "--seeds", "3",
                           "--epochs", "1", "--size", "24", "32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / script.replace(".py", ".json")).read_text())
    key = "model" if script == "two_level.py" else "options"
    assert [r[key] for r in rows] == models and all(r["seed"] == 3 for r in rows)
    assert all(0 < value < 1 for r in rows for name, value in r.items() if name.startswith("test_rmse"))
    assert sum(line.startswith("| 3 | ") for line in done.stdout.splitlines()) == 3
    assert not (tmp_path / "seed3").exists()
