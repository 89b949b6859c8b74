"""Baselines against exact answers, and a full evaluation report on a real small region."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from msmtu_batch.evaluation.evaluate import evaluate, fcls_unmix, hide_observations, temporal_endmembers
from msmtu_batch.inputs.training_data import PixelSet, read_cube_reference
from msmtu_batch.model.artifact import load_artifact, save_artifact
from msmtu_batch.model.inference import predict
from msmtu_batch.model.metrics import rmse
from msmtu_batch.model.train import TrainConfig, train


def linear_mixtures(n: int, seed: int) -> tuple[PixelSet, np.ndarray]:
    rng = np.random.default_rng(seed)
    endmembers = rng.uniform(0.02, 0.6, size=(3, 12 * 7))
    abundance = rng.dirichlet(np.full(3, 0.7), size=n)
    masks = (rng.random((n, 12, 1)) > 0.25).repeat(7, axis=2).astype(np.float32)
    values = (abundance @ endmembers).reshape(n, 12, 7) * masks
    pixels = PixelSet(values=values.astype(np.float32), masks=masks, ancillary=np.zeros((n, 0), np.float32),
                      abundance=abundance.astype(np.float32), ids=np.arange(n), partition=np.zeros(n, np.int8),
                      ancillary_names=(), classes=("a", "b", "c"))
    return pixels, endmembers


def test_fcls_recovers_noiseless_linear_mixtures():
    pixels, endmembers = linear_mixtures(400, seed=0)
    estimated = temporal_endmembers(pixels)
    np.testing.assert_allclose(estimated, endmembers, atol=1e-4)
    unmixed = fcls_unmix(pixels, estimated, fallback=np.full(3, 1 / 3))
    np.testing.assert_allclose(unmixed.sum(axis=1), 1.0, atol=1e-9)
    assert unmixed.min() >= 0
    np.testing.assert_allclose(unmixed, pixels.abundance, atol=2e-3)


def test_fcls_falls_back_when_nothing_is_observed():
    pixels, endmembers = linear_mixtures(5, seed=1)
    empty = PixelSet(**{**pixels.__dict__, "masks": np.zeros_like(pixels.masks)})
    np.testing.assert_allclose(fcls_unmix(empty, endmembers, np.array([0.2, 0.3, 0.5])),
                               np.tile([0.2, 0.3, 0.5], (5, 1)))


def test_hidden_values_are_a_tenth_of_the_observed_ones():
    masks = (np.random.default_rng(0).random((50, 12, 7)) > 0.4).astype(np.float32)
    hidden = hide_observations(masks, 0.1, seed=3)
    assert hidden.sum() == round(0.1 * masks.sum())
    assert (masks[hidden] == 1).all()
    np.testing.assert_array_equal(hidden, hide_observations(masks, 0.1, seed=3))


@pytest.fixture(scope="module")
def trained(region, tmp_path_factory):
    pixels = read_cube_reference(region.cube, region.reference, "level1")
    result = train(pixels, "level1", TrainConfig(epochs=3, hidden=24, embed=8, head_hidden=24, batch_size=128))
    path = save_artifact(result.artifact, tmp_path_factory.mktemp("model") / "m.safetensors")
    return pixels, path, result


def test_training_records_history_and_keeps_the_best_epoch(trained):
    pixels, path, result = trained
    assert len(result.history) == 3 and result.best_epoch in (1, 2, 3)
    best = min(r["validation_rmse"] for r in result.history)
    assert result.validation_rmse == pytest.approx(best)
    artifact = load_artifact(path)
    val = pixels.split("validation")
    again = rmse(predict(artifact.model, artifact.inputs(val))["abundance"], val.abundance)
    assert again == pytest.approx(best, rel=1e-5), "the saved model is the best epoch's"
    assert artifact.training["best_epoch"] == result.best_epoch


def test_evaluation_report(trained, tmp_path):
    pixels, path, _ = trained
    artifact = load_artifact(path)
    report = evaluate(artifact, pixels, tmp_path, model_path=path, trees=10, source="small region")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.png", "metrics.json", "report.md", "scatter.png"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["methods"]) == {"brits", "train_mean", "fcls", "random_forest", "random_forest_ancillary"}
    test = pixels.split("test")
    expected = rmse(predict(artifact.model, artifact.inputs(test))["abundance"], test.abundance)
    assert saved["methods"]["brits"]["rmse"] == pytest.approx(expected)
    assert saved["pixels"] == len(test) and saved["model"]["hash"].startswith("sha256:")
    assert saved["imputation"]["hidden_values"] == round(0.1 * test.masks.sum())
    # even three short epochs beat guessing the training mean
    assert report["methods"]["brits"]["rmse"] < report["methods"]["train_mean"]["rmse"]
    text = (tmp_path / "report.md").read_text()
    assert "| brits |" in text and "| fcls |" in text and "![maps](maps.png)" in text
    # the uncertainty layer against each test pixel's error: the figures and the reliability table
    reliability = saved["uncertainty"]["reliability"]
    assert sum(r["pixels"] for r in reliability) == len(test) and len(reliability) == 10
    assert -1 <= saved["uncertainty"]["spearman_uncertainty_vs_pixel_rmse"] <= 1
    assert f"`uncertainty` {saved['uncertainty']['spearman_uncertainty_vs_pixel_rmse']:.3f}" in text
    assert f"| 10 | {reliability[-1]['uncertainty_min']:.3f}-" in text
    # the expected-error layer against the same errors: its own correlation and table
    expected = saved["expected_error"]
    assert expected["mean_pixel_rmse"] == pytest.approx(np.mean(np.sqrt(np.mean(
        (predict(artifact.model, artifact.inputs(test))["abundance"] - test.abundance) ** 2, axis=1))), rel=1e-5)
    assert [r["pixels"] for r in expected["reliability"]] == [r["pixels"] for r in reliability]
    means = [r["mean_expected_error"] for r in expected["reliability"]]
    assert means == sorted(means) and expected["mean_expected_error"] == pytest.approx(
        sum(r["mean_expected_error"] * r["pixels"] for r in expected["reliability"]) / len(test))
    assert f"Spearman rank correlation with each pixel's abundance RMSE: " \
           f"{expected['spearman_expected_error_vs_pixel_rmse']:.3f}; mean expected" in text


def test_training_is_reproducible_by_seed(region):
    pixels = read_cube_reference(region.cube, region.reference, "level1").subset(np.arange(0, 6912, 5))
    cfg = TrainConfig(epochs=1, hidden=8, embed=4, head_hidden=8, batch_size=64, seed=5)
    first, second = (train(pixels, "level1", cfg).artifact.model.state_dict() for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name
    other = train(pixels, "level1", cfg.model_copy(update={"seed": 6})).artifact.model.state_dict()
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_divergence_stops_with_a_clear_message(region):
    from msmtu_batch.runtime.errors import MsmtuError

    pixels = read_cube_reference(region.cube, region.reference, "level1").subset(np.arange(0, 6912, 9))
    with pytest.raises(MsmtuError, match=r"training diverged at epoch 1 \(validation RMSE nan\); lower the"):
        train(pixels, "level1", TrainConfig(epochs=2, hidden=8, embed=4, head_hidden=8, learning_rate=1e30))
