"""Metric functions against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from msmtu_batch.evaluation.metrics import abundance_metrics, masked_mae, rmse

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
