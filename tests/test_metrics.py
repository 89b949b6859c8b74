"""Metric functions against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from msmtu_batch.model.metrics import abundance_metrics, masked_mae, rmse, uncertainty_reliability

TRUE = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75]])
PRED = np.array([[0.8, 0.2], [0.5, 0.5], [0.2, 0.8], [0.75, 0.25]])


def test_rmse_and_mae_by_hand():
    # squared errors per pixel and class: 0.04, 0.04 | 0, 0 | 0.04, 0.04 | 0.25, 0.25
    assert rmse(PRED, TRUE) == pytest.approx(np.sqrt(0.66 / 8))
    m = abundance_metrics(PRED, TRUE, ["a", "b"])
    assert m["mae"] == pytest.approx((0.2 * 4 + 0.5 * 2) / 8)
    assert m["per_class"]["a"]["rmse"] == pytest.approx(np.sqrt(0.33 / 4))
    assert m["per_class"]["a"]["mae"] == pytest.approx(0.9 / 4)


def test_r2_and_pearson_by_hand():
    m = abundance_metrics(PRED, TRUE, ["a", "b"])["per_class"]["a"]
    t, p = TRUE[:, 0], PRED[:, 0]
    ss_res, ss_tot = 0.33, np.sum((t - t.mean()) ** 2)  # t.mean() = 0.4375
    assert m["r2"] == pytest.approx(1 - ss_res / ss_tot)
    cov = np.mean((t - t.mean()) * (p - p.mean()))
    assert m["pearson_r"] == pytest.approx(cov / (t.std() * p.std()))


def test_dominant_class_accuracy_and_macro_f1_by_hand():
    # dominant true: a, a (tie -> first), b, b; predicted: a, a, b, a
    m = abundance_metrics(PRED, TRUE, ["a", "b"])
    assert m["dominant_accuracy"] == pytest.approx(0.75)
    f1_a = 2 * (2 / 3) * 1 / (2 / 3 + 1)  # precision 2/3, recall 1
    f1_b = 2 * 1 * 0.5 / (1 + 0.5)  # precision 1, recall 1/2
    assert m["dominant_macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


def test_constant_class_has_no_correlation_but_others_average():
    true = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    m = abundance_metrics(true, true, ["a", "b"])
    assert np.isnan(m["per_class"]["a"]["pearson_r"]) and np.isnan(m["class_average"]["r2"])
    assert m["rmse"] == 0


def test_masked_mae():
    assert masked_mae(np.array([1.0, 2.0, 3.0]), np.array([1.5, 0.0, 0.0]), np.array([1, 0, 1])) == 1.75


def test_uncertainty_reliability_against_pandas_and_ranks():
    """Spearman as the Pearson correlation of ranks; the deciles as pandas' qcut groups them."""
    import pandas as pd

    rng = np.random.default_rng(3)
    true = rng.dirichlet(np.ones(5), 1000)
    noise = rng.uniform(0, 0.3, 1000)
    pred = np.clip(true + noise[:, None] * rng.normal(size=(1000, 5)), 0, None)
    uncertainty = noise + rng.normal(0, 0.05, 1000)  # related to the error, not equal to it
    valid = rng.uniform(0, 1, 1000)
    got = uncertainty_reliability(uncertainty, pred, true, valid)
    errors = np.sqrt(((pred - true) ** 2).mean(axis=1))

    def ranks(x):
        return np.argsort(np.argsort(x))

    assert got["spearman_uncertainty_vs_pixel_rmse"] == pytest.approx(np.corrcoef(ranks(uncertainty),
                                                                                  ranks(errors))[0, 1])
    assert got["spearman_valid_fraction_vs_pixel_rmse"] == pytest.approx(np.corrcoef(ranks(valid),
                                                                                     ranks(errors))[0, 1])
    groups = pd.Series(errors).groupby(pd.qcut(uncertainty, 10, labels=False))
    table = got["reliability"]
    assert [r["pixels"] for r in table] == list(groups.size()) == [100] * 10
    np.testing.assert_allclose([r["mean_pixel_rmse"] for r in table], groups.mean().to_numpy())
    assert table[0]["uncertainty_max"] <= table[1]["uncertainty_min"]
    assert table[-1]["mean_pixel_rmse"] > table[0]["mean_pixel_rmse"]
