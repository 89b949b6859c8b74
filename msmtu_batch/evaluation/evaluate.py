"""Evaluation of a model against classical baselines on one partition, with a report.

Baselines, fitted on the train partition of the same data and scored on the same pixels:

* ``train_mean``: the mean training abundance for every pixel;
* ``fcls``: fully constrained least squares (non-negative, sum-to-one) with per-class
  temporal endmembers (12 months x 7 bands) estimated from the training pixels by masked
  least squares, using only each pixel's observed values;
* ``random_forest`` / ``random_forest_ancillary``: scikit-learn random forest regression on
  gap-filled series (linear interpolation over time), without and with ancillary data.

Imputation is scored by hiding 10 % of the observed values and comparing BRITS's
reconstruction with per-band linear interpolation over time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import nnls
from sklearn.ensemble import RandomForestRegressor

from msmtu_batch.inputs.cube import ANCILLARY_SETS, BAND_NAMES
from msmtu_batch.inputs.training_data import PixelSet
from msmtu_batch.model.artifact import ModelArtifact, artifact_hash, save_artifact
from msmtu_batch.model.inference import predict
from msmtu_batch.model.metrics import (
    abundance_metrics,
    expected_error_reliability,
    masked_mae,
    uncertainty_reliability,
)
from msmtu_batch.model.preprocess import linear_interpolate_gaps
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.runtime.errors import TrainingDataError

HIDE_FRACTION = 0.10
FCLS_SUM_WEIGHT = 10.0  # weight of the sum-to-one row appended to each pixel's system


# --- Baselines -------------------------------------------------------------------------------

def temporal_endmembers(train: PixelSet, ridge: float = 1e-6) -> np.ndarray:
    """(K, T*F) class spectra: per feature, least squares of observed values on abundances."""
    a = train.abundance.astype(np.float64)
    x = train.values.reshape(len(train), -1).astype(np.float64)
    m = train.masks.reshape(len(train), -1).astype(np.float64)
    gram = np.einsum("nk,nf,nl->fkl", a, m, a) + ridge * np.eye(a.shape[1])
    rhs = np.einsum("nk,nf->fk", a, x * m)
    return np.linalg.solve(gram, rhs[..., None])[..., 0].T


def fcls_unmix(pixels: PixelSet, endmembers: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Fully constrained least squares per pixel on its observed values only."""
    x = pixels.values.reshape(len(pixels), -1).astype(np.float64)
    m = pixels.masks.reshape(len(pixels), -1) > 0
    out = np.empty((len(pixels), endmembers.shape[0]))
    sum_row = np.full((1, endmembers.shape[0]), FCLS_SUM_WEIGHT)
    for i in range(len(pixels)):  # scipy's NNLS solves one small system at a time
        if not m[i].any():
            out[i] = fallback
            continue
        system = np.vstack([endmembers[:, m[i]].T, sum_row])
        target = np.concatenate([x[i, m[i]], [FCLS_SUM_WEIGHT]])
        out[i] = nnls(system, target)[0]
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)


def gap_filled_features(pixels: PixelSet, band_fill: np.ndarray, with_ancillary: bool) -> np.ndarray:
    """Linearly interpolated series (never-observed bands: ``band_fill``), flattened."""
    filled = linear_interpolate_gaps(pixels.values, pixels.masks)
    filled = np.where(np.isnan(filled), band_fill, filled).reshape(len(pixels), -1)
    return np.hstack([filled, pixels.ancillary]) if with_ancillary else filled


def baseline_predictions(train: PixelSet, test: PixelSet, seed: int = 0, trees: int = 100
                         ) -> dict[str, np.ndarray]:
    mean = train.abundance.mean(axis=0)
    band_fill = (train.values * train.masks).sum(axis=(0, 1)) / np.maximum(train.masks.sum(axis=(0, 1)), 1)
    out = {"train_mean": np.tile(mean, (len(test), 1)),
           "fcls": fcls_unmix(test, temporal_endmembers(train), mean)}
    for name, with_ancillary in (("random_forest", False), ("random_forest_ancillary", True)):
        if with_ancillary and not train.ancillary.shape[1]:
            continue
        forest = RandomForestRegressor(n_estimators=trees, max_features=0.3, min_samples_leaf=2,
                                       n_jobs=-1, random_state=seed)
        forest.fit(gap_filled_features(train, band_fill, with_ancillary), train.abundance)
        out[name] = forest.predict(gap_filled_features(test, band_fill, with_ancillary))
    return out


# --- Imputation ------------------------------------------------------------------------------

def hide_observations(masks: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean array marking ``fraction`` of the observed entries, chosen at random."""
    observed = np.flatnonzero(masks > 0)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(observed, size=round(fraction * observed.size), replace=False)
    hidden = np.zeros(masks.size, bool)
    hidden[chosen] = True
    return hidden.reshape(masks.shape)


def imputation_scores(artifact: ModelArtifact, test: PixelSet, seed: int) -> dict:
    hidden = hide_observations(test.masks, HIDE_FRACTION, seed)
    masks = np.where(hidden, 0.0, test.masks).astype(np.float32)
    values = np.where(hidden, 0.0, test.values).astype(np.float32)
    inputs = artifact.inputs(replace(test, values=values, masks=masks))
    imputed = artifact.band_stats.invert(predict(artifact.model, inputs)["imputed"])
    interpolated = linear_interpolate_gaps(values, masks)
    band_mean = artifact.band_stats.mean
    interpolated = np.where(np.isnan(interpolated), band_mean, interpolated)
    return {"hidden_values": int(hidden.sum()), "hidden_fraction": HIDE_FRACTION,
            "brits_mae": masked_mae(imputed, test.values, hidden),
            "linear_interpolation_mae": masked_mae(interpolated, test.values, hidden),
            "units": "reflectance"}


# --- Whole evaluation -----------------------------------------------------------------------

def evaluate(artifact: ModelArtifact, pixels: PixelSet, out_dir: str | Path, *, split: str = "test",
             model_path: str | Path | None = None, baselines: bool = True, seed: int = 0,
             trees: int = 100, source: str = "") -> dict:
    """Score ``artifact`` on ``split`` of ``pixels``; write metrics.json, report.md and plots."""
    if tuple(pixels.classes) != tuple(artifact.classes):
        raise TrainingDataError(f"{source or 'evaluation data'}: classes {', '.join(pixels.classes)} "
                                f"differ from the model's {', '.join(artifact.classes)}")
    artifact.check_matches(BAND_NAMES, pixels.ancillary_names, source or "the evaluation data")
    test = pixels.split(split)
    if len(test) == 0:
        raise TrainingDataError(f"{source or 'evaluation data'}: no pixels in the {split} partition")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    inputs = artifact.inputs(test)
    start = time.perf_counter()
    prediction = predict(artifact.model, inputs)
    seconds = time.perf_counter() - start
    predictions = {"brits": prediction["abundance"]}
    if baselines:
        predictions |= baseline_predictions(pixels.split("train"), test, seed=seed, trees=trees)
    methods = {name: abundance_metrics(pred, test.abundance, artifact.classes)
               for name, pred in predictions.items()}
    report = {
        "level": artifact.level, "split": split, "pixels": len(test), "source": source,
        "model": {"path": str(model_path) if model_path else None,
                  "hash": artifact_hash(model_path) if model_path else None,
                  "ancillary": list(artifact.ancillary_names), "training": artifact.training,
                  "inference_pixels_per_second": len(test) / max(seconds, 1e-9),
                  "mean_uncertainty": float(prediction["uncertainty"].mean())},
        "methods": methods,
        "uncertainty": uncertainty_reliability(prediction["uncertainty"], prediction["abundance"], test.abundance,
                                               test.masks.mean(axis=(1, 2))),
        "imputation": imputation_scores(artifact, test, seed),
    }
    if artifact.error_head is not None:
        expected = artifact.error_head.expected_error(prediction["abundance"], prediction["uncertainty"],
                                                      test.masks.mean(axis=(1, 2)), inputs.ancillary)
        report["expected_error"] = expected_error_reliability(expected, prediction["abundance"], test.abundance)
    if (levels := artifact.hierarchy) is not None:  # a two-level model: its coarse level, the sums of its classes
        report["coarse_level"] = {"level": levels.level, "brits": abundance_metrics(
            levels.coarse(prediction["abundance"]), levels.coarse(test.abundance), levels.classes)}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    figures = [_scatter_plot(predictions["brits"], test.abundance, artifact.classes, out_dir)]
    if test.grid_shape is not None:
        figures.append(_map_plot(predictions["brits"], test, artifact.classes, out_dir))
    (out_dir / "report.md").write_text(_markdown(report, figures))
    return report


def _coarse_level_lines(coarse: dict | None) -> list[str]:
    """A two-level model's coarse level in the report (nothing for a one-level model)."""
    if coarse is None:
        return []
    return [f"## {coarse['level']} (sums of the model's classes)", "",
            comparison_table({"brits": coarse["brits"]}), ""]


def _expected_error_lines(expected: dict | None) -> list[str]:
    """The ``expected_error`` layer against the actual error (nothing for a model without one)."""
    if expected is None:
        return []
    return ["## Expected error: the model's estimate of each pixel's abundance RMSE", "",
            f"Spearman rank correlation with each pixel's abundance RMSE: "
            f"{expected['spearman_expected_error_vs_pixel_rmse']:.3f}; mean expected "
            f"{expected['mean_expected_error']:.4f}, mean actual {expected['mean_pixel_rmse']:.4f}. "
            "Reliability (ten equal groups by expected error):", "",
            "| decile | expected error | pixels | mean expected | mean pixel RMSE |", "|---|---|---|---|---|",
            *(f"| {r['decile']} | {r['expected_error_min']:.3f}-{r['expected_error_max']:.3f} | {r['pixels']} | "
              f"{r['mean_expected_error']:.4f} | {r['mean_pixel_rmse']:.4f} |" for r in expected["reliability"]), ""]


def comparison_table(methods: dict[str, dict]) -> str:
    rows = ["| method | RMSE | MAE | Pearson r (class mean) | R2 (class mean) | dominant accuracy "
            "| macro F1 |", "|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        c = m["class_average"]
        rows.append(f"| {name} | {m['rmse']:.4f} | {m['mae']:.4f} | {c['pearson_r']:.3f} | {c['r2']:.3f} | "
                    f"{m['dominant_accuracy']:.3f} | {m['dominant_macro_f1']:.3f} |")
    return "\n".join(rows)


def _markdown(report: dict, figures: Sequence[str]) -> str:
    brits = report["methods"]["brits"]
    imp, unc = report["imputation"], report["uncertainty"]
    lines = [
        f"# Evaluation: level {report['level']}, {report['split']} partition ({report['pixels']} pixels)",
        "", f"Data: {report['source']}  ",
        f"Model: {report['model']['path']} ({report['model']['hash']})  ",
        f"Ancillary: {', '.join(report['model']['ancillary']) or 'none'}", "",
        "## Abundances", "", comparison_table(report["methods"]), "",
        "## BRITS per class", "", "| class | RMSE | MAE | Pearson r | R2 |", "|---|---|---|---|---|",
        *(f"| {k} | {v['rmse']:.4f} | {v['mae']:.4f} | {v['pearson_r']:.3f} | {v['r2']:.3f} |"
          for k, v in brits["per_class"].items()),
        "", *_coarse_level_lines(report.get("coarse_level")),
        "## Uncertainty: does it say where the abundances are wrong?", "",
        f"Spearman rank correlation with each pixel's abundance RMSE: `uncertainty` "
        f"{unc['spearman_uncertainty_vs_pixel_rmse']:.3f}, `valid_fraction` "
        f"{unc['spearman_valid_fraction_vs_pixel_rmse']:.3f}. Reliability (pixels in ten equal groups by "
        "uncertainty):", "",
        "| decile | uncertainty | pixels | mean pixel RMSE |", "|---|---|---|---|",
        *(f"| {r['decile']} | {r['uncertainty_min']:.3f}-{r['uncertainty_max']:.3f} | {r['pixels']} | "
          f"{r['mean_pixel_rmse']:.4f} |" for r in unc["reliability"]),
        "", *_expected_error_lines(report.get("expected_error")),
        f"## Imputation ({imp['hidden_values']} observed values hidden, {imp['hidden_fraction']:.0%})", "",
        "| method | MAE (reflectance) |", "|---|---|",
        f"| BRITS | {imp['brits_mae']:.5f} |", f"| linear interpolation over time | "
        f"{imp['linear_interpolation_mae']:.5f} |", "",
        *(f"![{Path(f).stem}]({f})" for f in figures), "",
    ]
    return "\n".join(lines)


def _scatter_plot(pred: np.ndarray, true: np.ndarray, classes: Sequence[str], out_dir: Path) -> str:
    cols = min(5, len(classes))
    rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax, k in zip(axes.flat, range(len(classes))):
        ax.scatter(true[:, k], pred[:, k], s=2, alpha=0.3)
        ax.plot([0, 1], [0, 1], color="k", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=classes[k], xlabel="true", ylabel="predicted")
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "scatter.png", dpi=80)
    plt.close(fig)
    return "scatter.png"


def _map_plot(pred: np.ndarray, test: PixelSet, classes: Sequence[str], out_dir: Path) -> str:
    """True and predicted abundance maps of the most abundant classes over the test pixels."""
    height, width = test.grid_shape
    top = np.argsort(test.abundance.mean(axis=0))[::-1][:4]
    fig, axes = plt.subplots(2, len(top), figsize=(3.2 * len(top), 5.5), squeeze=False)
    for col, k in enumerate(top):
        for row, (label, values) in enumerate((("true", test.abundance[:, k]), ("BRITS", pred[:, k]))):
            grid = np.full(height * width, np.nan)
            grid[test.ids] = values
            image = axes[row, col].imshow(grid.reshape(height, width), vmin=0, vmax=1, cmap="viridis")
            axes[row, col].set_title(f"{classes[k]} ({label})", fontsize=9)
            axes[row, col].set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.6, label="abundance")
    fig.savefig(out_dir / "maps.png", dpi=80)
    plt.close(fig)
    return "maps.png"


def run_ablation(pixels: PixelSet, level: str, cfg: TrainConfig, out_dir: str | Path, *, trees: int = 100,
                 source: str = "", on_epoch: Callable[[str, dict], None] | None = None) -> dict:
    """Train and evaluate BRITS without ancillary data, with geo-topographic data, and with
    geo-topographic + climatic data (as the paper's experiment); baselines scored once."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods: dict[str, dict] = {}
    variants: dict[str, dict] = {}
    for variant in ANCILLARY_SETS:
        result = train(pixels, level, cfg.model_copy(update={"ancillary": variant}), source=source,
                       on_epoch=(lambda r, v=variant: on_epoch(v, r)) if on_epoch else None)
        path = save_artifact(result.artifact, out_dir / f"model_{variant}.safetensors")
        report = evaluate(result.artifact, pixels, out_dir / variant, model_path=path,
                          baselines=variant == "all", trees=trees, seed=cfg.seed, source=source)
        methods[f"brits_{variant}"] = report["methods"]["brits"]
        if variant == "all":
            methods |= {k: v for k, v in report["methods"].items() if k != "brits"}
        variants[variant] = {"epochs_run": len(result.history), "best_epoch": result.best_epoch,
                             "validation_rmse": result.validation_rmse,
                             "train_pixels_per_second": result.train_pixels_per_second,
                             "imputation": report["imputation"]}
    summary = {"level": level, "source": source, "methods": methods, "variants": variants}
    (out_dir / "ablation.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# Ablation: level {level}", "", f"Data: {source}", "",
             "brits_none: no ancillary data; brits_geotopo: longitude, latitude, altitude, slope; "
             "brits_all: geo-topographic + climatic. Baselines fitted on the same train partition.", "",
             comparison_table(methods), "", "| variant | epochs | best epoch | imputation MAE | "
             "linear interpolation MAE |", "|---|---|---|---|---|",
             *(f"| {k} | {v['epochs_run']} | {v['best_epoch']} | {v['imputation']['brits_mae']:.5f} | "
               f"{v['imputation']['linear_interpolation_mae']:.5f} |" for k, v in variants.items()), ""]
    (out_dir / "ablation.md").write_text("\n".join(lines))
    return summary
