"""Abundance and imputation metrics (per class and averaged), on plain arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import f1_score


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    """Root mean squared error over every pixel and class."""
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2)))


def per_class_metrics(pred: np.ndarray, true: np.ndarray, classes: Sequence[str]) -> dict[str, dict]:
    """RMSE, MAE, Pearson r and R2 for each class column of (n, K) abundances."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    out = {}
    for k, name in enumerate(classes):
        p, t = pred[:, k], true[:, k]
        err = p - t
        ss_tot = np.sum((t - t.mean()) ** 2)
        r = np.corrcoef(p, t)[0, 1] if p.std() > 0 and t.std() > 0 else float("nan")
        out[name] = {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
                     "pearson_r": float(r),
                     "r2": float(1 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan")}
    return out


def abundance_metrics(pred: np.ndarray, true: np.ndarray, classes: Sequence[str]) -> dict:
    """Per-class metrics, their (nan-aware) average, global RMSE/MAE and dominant-class scores."""
    per_class = per_class_metrics(pred, true, classes)
    names = ("rmse", "mae", "pearson_r", "r2")
    average = {}
    for name in names:  # classes with no variance have no r or R2; average over the others
        scores = np.array([c[name] for c in per_class.values()])
        average[name] = float(scores[~np.isnan(scores)].mean()) if (~np.isnan(scores)).any() else float("nan")
    dominant_true, dominant_pred = np.argmax(true, axis=1), np.argmax(pred, axis=1)
    return {
        "rmse": rmse(pred, true), "mae": float(np.mean(np.abs(np.asarray(pred, np.float64) - true))),
        "class_average": average, "per_class": per_class,
        "dominant_accuracy": float(np.mean(dominant_true == dominant_pred)),
        "dominant_macro_f1": float(f1_score(dominant_true, dominant_pred, average="macro",
                                            labels=np.arange(len(classes)), zero_division=0)),
        "pixels": len(true),
    }


def masked_mae(pred: np.ndarray, true: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error over the entries where ``mask`` is true."""
    mask = np.asarray(mask, bool)
    return float(np.mean(np.abs(np.asarray(pred, np.float64)[mask] - np.asarray(true, np.float64)[mask])))


def pixel_rmse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Each pixel's abundance RMSE over its classes (n,)."""
    return np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2, axis=1))


def reliability_table(estimate: np.ndarray, errors: np.ndarray, name: str, bins: int = 10) -> list[dict]:
    """The pixels in ``bins`` groups of equal size by ``estimate`` (a per-pixel error estimate
    called ``name``): each group's range and mean of it, and its mean pixel RMSE (``errors``)."""
    estimate = np.asarray(estimate, np.float64)
    groups = np.array_split(np.argsort(estimate, kind="stable"), bins)
    return [{"decile": i + 1, "pixels": len(g), f"{name}_min": float(estimate[g].min()),
             f"{name}_max": float(estimate[g].max()), f"mean_{name}": float(estimate[g].mean()),
             "mean_pixel_rmse": float(errors[g].mean())} for i, g in enumerate(groups) if len(g)]


def uncertainty_reliability(uncertainty: np.ndarray, pred: np.ndarray, true: np.ndarray,
                            valid_fraction: np.ndarray, bins: int = 10) -> dict:
    """Does a per-pixel ``uncertainty`` say where the abundances are wrong? The Spearman rank
    correlation between it and each pixel's abundance RMSE (and the same for the pixel's
    ``valid_fraction``), and the reliability table (:func:`reliability_table`): the expected
    error a user can read off a map's uncertainty."""
    errors = pixel_rmse(pred, true)
    return {"spearman_uncertainty_vs_pixel_rmse": float(spearmanr(uncertainty, errors).statistic),
            "spearman_valid_fraction_vs_pixel_rmse": float(spearmanr(valid_fraction, errors).statistic),
            "reliability": reliability_table(uncertainty, errors, "uncertainty", bins)}


def expected_error_reliability(expected: np.ndarray, pred: np.ndarray, true: np.ndarray, bins: int = 10) -> dict:
    """The ``expected_error`` layer against each pixel's actual abundance RMSE: their Spearman
    rank correlation, both means and the reliability table (expected against actual per group)."""
    errors = pixel_rmse(pred, true)
    return {"spearman_expected_error_vs_pixel_rmse": float(spearmanr(expected, errors).statistic),
            "mean_expected_error": float(np.mean(expected)), "mean_pixel_rmse": float(errors.mean()),
            "reliability": reliability_table(expected, errors, "expected_error", bins)}
