"""Training BRITS on labelled pixels: Adam + cosine schedule, clipping, early stopping."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from msmtu_batch.inputs.cube import ANCILLARY_SETS
from msmtu_batch.inputs.sensors import SENSORS
from msmtu_batch.inputs.training_data import PixelSet
from msmtu_batch.model.artifact import ModelArtifact
from msmtu_batch.model.brits import BRITS, BritsConfig, LossWeights, brits_loss
from msmtu_batch.model.checkpoint import TrainingState, load_checkpoint, save_checkpoint, training_identity
from msmtu_batch.model.error_head import ErrorHead, error_features
from msmtu_batch.model.hierarchy import ClassHierarchy
from msmtu_batch.model.inference import predict
from msmtu_batch.model.metrics import pixel_rmse, rmse
from msmtu_batch.model.preprocess import ModelInputs, Standardizer, prepare_inputs
from msmtu_batch.model.recurrence import steps_on_tiles, warm_up
from msmtu_batch.runtime.errors import MsmtuError, TrainingDataError

AncillarySet = Literal["none", "geotopo", "all"]


class TrainConfig(BaseModel):
    """Training settings (recorded in the artifact)."""

    model_config = ConfigDict(extra="forbid")

    ancillary: AncillarySet = "all"
    hidden: int = Field(100, ge=1)
    embed: int = Field(50, ge=1)
    head_hidden: int = Field(100, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(60, ge=1)
    # 512 pixels at 6e-3 (the learning rate scaled with the batch): the test RMSE of 256 at 3e-3
    # on two simulated regions, 1.2x the training pixels/s on CPU (benchmarks/NOTES.md, 2026-12-02)
    batch_size: int = Field(512, ge=1)
    learning_rate: float = Field(6e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    patience: int = Field(8, ge=1, description="epochs without validation improvement before stopping")
    seed: int = 0
    label_weight: float = 0.75
    impute_weight: float = 0.25
    consistency_weight: float = 0.1
    # The research code's options (measured on rare classes: benchmarks/NOTES.md, 2026-12-02)
    class_weight: Literal["none", "balanced"] = Field(
        "none", description="per-class weights of the label loss: none, or balanced (each class's weight the "
                            "inverse of its mean training abundance, at most 10 times the smallest, mean 1)")
    soft_labels: bool = Field(True, description="learn the abundances (soft labels), or one-hot dominant classes")
    ancillary_units: dict[str, str] = Field(
        default_factory=dict, description="units of an Andalusia-MSMTU folder's ancillary columns (CF/udunits "
                                          "strings), e.g. {precipitation: 'mm year-1'}: the published table "
                                          "declares none")
    error_head: bool = Field(True, description="after training, learn each pixel's expected abundance RMSE from "
                                               "the model's outputs (the run's expected_error layer)")


@dataclass
class TrainResult:
    artifact: ModelArtifact
    history: list[dict]
    best_epoch: int
    validation_rmse: float
    seconds: float
    train_pixels_per_second: float
    resumed_after: int = 0  # epochs a checkpoint held when this training started


@dataclass
class FineTuning:
    """Start from a trained artifact's weights (``train --init-from``). Its architecture and
    ancillary variables are kept; with the same classes the whole network goes on learning,
    with other classes both directions' last head layer starts afresh. The normalisation
    statistics are the parent's unless ``refit_statistics``: its weights learnt inputs
    standardised with them, and a small new dataset fits noisier ones."""

    parent: ModelArtifact
    path: str
    parent_hash: str
    refit_statistics: bool = False


@dataclass
class Checkpointing:
    """Write a checkpoint (:mod:`msmtu_batch.model.checkpoint`) at the end of an epoch once
    ``every_epochs`` epochs or ``every_minutes`` minutes have passed since the last one, and
    resume from ``path`` when it holds a checkpoint of the same training."""

    path: Path
    every_epochs: int = 1
    every_minutes: float | None = None


ARCHITECTURE = ("ancillary", "hidden", "embed", "head_hidden")


def inherit_architecture(cfg: TrainConfig, tuning: FineTuning) -> TrainConfig:
    """``cfg`` with the parent's architecture; a setting given explicitly that differs is refused."""
    parent = tuning.parent
    sets = [name for name, names in ANCILLARY_SETS.items() if tuple(names) == tuple(parent.ancillary_names)]
    if not sets:
        raise MsmtuError(f"--init-from {tuning.path}: its ancillary variables {', '.join(parent.ancillary_names)} "
                         f"are none of the sets {', '.join(ANCILLARY_SETS)}")
    inherited = {"ancillary": sets[0], "hidden": parent.config.hidden, "embed": parent.config.embed,
                 "head_hidden": parent.config.head_hidden}
    for name in ARCHITECTURE:
        if name in cfg.model_fields_set and getattr(cfg, name) != inherited[name]:
            raise MsmtuError(f"--init-from {tuning.path}: {name} {getattr(cfg, name)} differs from the parent "
                             f"model's {inherited[name]}; leave it out to keep the parent's")
    return cfg.model_copy(update=inherited)


def _load_parent_weights(model: BRITS, tuning: FineTuning, classes: tuple[str, ...]) -> list[str]:
    """Copy the parent's weights into ``model``; returns the parameters that start afresh
    (the last head layer of both directions when the classes differ)."""
    parent = tuning.parent.model.state_dict()
    if tuple(tuning.parent.classes) == tuple(classes):
        model.load_state_dict(parent)
        return []
    last = len(model.forward_pass.head) - 1
    fresh = [k for k in model.state_dict() if f".head.{last}." in k]
    model.load_state_dict({k: v for k, v in parent.items() if k not in fresh}, strict=False)
    return fresh


def label_targets(abundance: np.ndarray, soft: bool) -> np.ndarray:
    """What the label loss compares with: the abundances, or (``soft`` False, as the research
    code can) a one-hot vector of each pixel's dominant class."""
    if soft:
        return abundance.astype(np.float32)
    return np.eye(abundance.shape[1], dtype=np.float32)[abundance.argmax(axis=1)]


MAX_CLASS_WEIGHT_RATIO = 10.0


def balanced_class_weights(target: np.ndarray) -> np.ndarray:
    """Per-class weights inverse to each class's mean training target, the largest at most
    :data:`MAX_CLASS_WEIGHT_RATIO` times the smallest (a class almost absent would otherwise
    dominate the loss), scaled to mean 1."""
    share = np.maximum(target.mean(axis=0, dtype=np.float64), 1e-12)
    weights = 1.0 / share
    weights = np.minimum(weights, weights.min() * MAX_CLASS_WEIGHT_RATIO)
    return (weights / weights.mean()).astype(np.float32)


def validation_rmse(model: BRITS, inputs: ModelInputs, truth: np.ndarray, level: str,
                    hierarchy: ClassHierarchy | None, device: torch.device) -> tuple[float, dict[str, float]]:
    """The early-stopping criterion: the abundance RMSE, or with a hierarchy the mean of both
    levels' (each level's also returned, by name, for the history)."""
    abundance = predict(model, inputs, device=device, imputed=False)["abundance"]
    fine = rmse(abundance, truth)
    if hierarchy is None:
        return fine, {}
    coarse = rmse(hierarchy.coarse(abundance), hierarchy.coarse(truth))
    return 0.5 * (fine + coarse), {f"validation_rmse_{level}": fine, f"validation_rmse_{hierarchy.level}": coarse}


def fit_error_head(model: BRITS, subsets: tuple[tuple[ModelInputs, PixelSet], ...], device: torch.device,
                   seed: int) -> ErrorHead:
    """The expected-error head (:mod:`msmtu_batch.model.error_head`) of a trained ``model``, from
    its outputs and errors on ``subsets`` (the training pixels, then the validation pixels, on
    which alone the head is calibrated)."""
    features, errors, calibration = [], [], []
    for number, (inputs, pixels) in enumerate(subsets):
        out = predict(model, inputs, device=device, imputed=False)
        features.append(error_features(out["abundance"], out["uncertainty"], pixels.masks.mean(axis=(1, 2)),
                                       inputs.ancillary))
        errors.append(pixel_rmse(out["abundance"], pixels.abundance))
        calibration.append(np.full(len(pixels), number == len(subsets) - 1))
    return ErrorHead.fit(np.concatenate(features), np.concatenate(errors), np.concatenate(calibration), seed)


def _batch(inputs: ModelInputs, target: np.ndarray, index: np.ndarray, device: torch.device
           ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    series = [torch.from_numpy(a[index]).to(device) for a in
              (inputs.values, inputs.masks, inputs.deltas_forward, inputs.deltas_backward)]
    ancillary = torch.from_numpy(inputs.ancillary[index]).to(device) if inputs.ancillary.shape[1] else None
    return [*series, ancillary], torch.from_numpy(target[index]).to(device)


def training_device(name: str) -> torch.device:
    """``auto`` (the first CUDA GPU torch sees, else the CPU), ``cpu`` or ``cuda[:N]``; one
    line when the device cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MsmtuError(f"--device {name}: expected auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise MsmtuError(f"--device {name}: expected auto, cpu or cuda[:N]")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise MsmtuError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    return device


def train(pixels: PixelSet, level: str, cfg: TrainConfig, *,
          on_epoch: Callable[[dict], None] | None = None, source: str = "",
          device: str | torch.device = "cpu", init_from: FineTuning | None = None,
          checkpointing: Checkpointing | None = None, hierarchy: ClassHierarchy | None = None) -> TrainResult:
    """Train on ``pixels``' train partition, stop early on its validation partition, on
    ``device`` (a GPU: ``"cuda"``); the artifact's model is on the CPU either way. With
    ``init_from``, start from a trained model (:class:`FineTuning`); with ``checkpointing``,
    write checkpoints and resume from one of this same training (:class:`Checkpointing`):
    on the CPU a resumed training ends with the same weights, bit for bit (with two or more
    torch threads: on one, a difference of about 1e-8 has been seen, benchmarks/NOTES.md).
    With ``hierarchy``, one model for two levels: the loss and the validation RMSE (early stopping) on both, the
    coarse level's abundances the sums of the fine level's (:mod:`msmtu_batch.model.hierarchy`)."""
    device = torch.device(device)
    if init_from is not None:
        cfg = inherit_architecture(cfg, init_from)
    names = ANCILLARY_SETS[cfg.ancillary]
    pixels = pixels.with_ancillary(names)
    train_set, val_set = pixels.split("train"), pixels.split("validation")
    for name, subset in (("train", train_set), ("validation", val_set)):
        if len(subset) == 0:
            raise TrainingDataError(f"{source or 'training data'}: no pixels in the {name} partition")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    if init_from is not None and not init_from.refit_statistics:  # the data converted to the parent's units
        parent = init_from.parent
        band_stats, ancillary_stats, units = parent.band_stats, parent.ancillary_stats, parent.ancillary_units
        where = source or "the training data"
        train_inputs, val_inputs = parent.inputs(train_set, where), parent.inputs(val_set, where)
    else:
        band_stats = Standardizer.fit(train_set.values, train_set.masks)
        ancillary_stats = Standardizer.fit(train_set.ancillary) if names else None
        units = pixels.ancillary_units
        train_inputs = prepare_inputs(train_set.values, train_set.masks, train_set.ancillary, band_stats,
                                      ancillary_stats)
        val_inputs = prepare_inputs(val_set.values, val_set.masks, val_set.ancillary, band_stats,
                                    ancillary_stats)
    model = BRITS(BritsConfig(n_classes=len(pixels.classes), n_ancillary=len(names),
                              n_features=len(SENSORS[pixels.sensor].bands), hidden=cfg.hidden,
                              embed=cfg.embed, head_hidden=cfg.head_hidden, dropout=cfg.dropout,
                              **(init_from.parent.config.formulation if init_from is not None else {})))
    fresh = _load_parent_weights(model, init_from, pixels.classes) if init_from is not None else []
    model = model.to(device)
    # fused: one kernel for all parameters' updates (10 % of a CPU training step before)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=cfg.epochs * steps_per_epoch, eta_min=cfg.learning_rate * 0.01)
    weights = LossWeights(cfg.label_weight, cfg.impute_weight, cfg.consistency_weight)
    target = label_targets(train_set.abundance, cfg.soft_labels)
    class_weights = (torch.from_numpy(balanced_class_weights(target)).to(device) if cfg.class_weight == "balanced"
                     else None)

    parent_hash = init_from.parent_hash if init_from is not None else None
    settings = cfg.model_dump() | {"refit_statistics": init_from.refit_statistics if init_from else None}
    if hierarchy is not None:  # added only when set: checkpoints of one-level trainings keep their identity
        settings["hierarchy"] = hierarchy.to_dict()
    hierarchy_matrix = torch.from_numpy(hierarchy.matrix()).to(device) if hierarchy is not None else None
    identity = training_identity(settings, level, {
        "values": pixels.values, "masks": pixels.masks, "ancillary": pixels.ancillary,
        "abundance": pixels.abundance, "partition": pixels.partition}, pixels.classes, parent_hash)
    history: list[dict] = []
    best_rmse, best_epoch, best_state, stale = math.inf, 0, None, 0
    train_seconds = 0.0
    resumed_after = 0
    if checkpointing is not None and checkpointing.path.exists():
        state = load_checkpoint(checkpointing.path)
        if state.identity != identity:
            raise MsmtuError(f"{checkpointing.path}: a checkpoint of another training (settings, training data or "
                             "parent model differ); delete it to start afresh")
        model.load_state_dict(state.model)
        optimiser.load_state_dict(state.optimiser)
        schedule.load_state_dict(state.scheduler)
        torch.set_rng_state(state.torch_rng)
        if state.cuda_rng and device.type == "cuda":
            torch.cuda.set_rng_state_all(state.cuda_rng)
        rng.bit_generator.state = state.numpy_rng
        history, best_rmse, best_epoch, stale = state.history, state.best_rmse, state.best_epoch, state.stale
        best_state = {k: v.to(device) for k, v in state.best_model.items()} if state.best_model else None
        train_seconds, resumed_after = state.train_seconds, state.epoch
    fused = device.type == "cpu" and model.fused_recurrence
    if fused:
        warm_up()  # its kernels' first load (about a second) is not a cost per pixel
    start = time.perf_counter()
    last_checkpoint = (resumed_after, time.perf_counter())
    for epoch in range(resumed_after + 1, cfg.epochs + 1):
        if stale >= cfg.patience:  # a checkpoint written when early stopping had already decided
            break
        model.train()
        epoch_start = time.perf_counter()
        totals = {name: torch.zeros((), dtype=torch.float64, device=device)
                  for name in ("loss", "label", "impute", "consistency", *(("label_coarse",) if hierarchy else ()))}
        order = rng.permutation(len(train_set))
        with steps_on_tiles(fused):
            for step in range(steps_per_epoch):
                inputs, y = _batch(train_inputs, target, order[step * cfg.batch_size:(step + 1) * cfg.batch_size],
                                   device)
                loss, parts = brits_loss(model(*inputs), y, weights, hierarchy_matrix, class_weights)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimiser.step()
                schedule.step()
                totals["loss"] += loss.detach()
                for k, v in parts.items():
                    totals[k] += v
        means = {k: v.item() / steps_per_epoch for k, v in totals.items()}  # waits for a GPU's queue
        train_seconds += time.perf_counter() - epoch_start
        val_rmse, by_level = validation_rmse(model, val_inputs, val_set.abundance, level, hierarchy, device)
        if not math.isfinite(val_rmse):
            raise MsmtuError(f"training diverged at epoch {epoch} (validation RMSE {val_rmse}); "
                             "lower the learning rate")
        record = {"epoch": epoch, **means, "validation_rmse": val_rmse, **by_level,
                  "learning_rate": schedule.get_last_lr()[0]}
        history.append(record)
        if val_rmse < best_rmse - 1e-6:
            best_rmse, best_epoch, stale = val_rmse, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if checkpointing is not None and (
                epoch - last_checkpoint[0] >= checkpointing.every_epochs or
                (checkpointing.every_minutes is not None and
                 time.perf_counter() - last_checkpoint[1] >= 60 * checkpointing.every_minutes)):
            save_checkpoint(TrainingState(
                identity, epoch, history, best_rmse, best_epoch, stale, train_seconds, model.state_dict(),
                best_state, optimiser.state_dict(), schedule.state_dict(), torch.get_rng_state(),
                rng.bit_generator.state, torch.cuda.get_rng_state_all() if device.type == "cuda" else None),
                checkpointing.path)
            last_checkpoint = (epoch, time.perf_counter())
        if on_epoch:
            on_epoch({**record, "best_validation_rmse": best_rmse})
        if stale >= cfg.patience:
            break
    model.load_state_dict(best_state)
    error_head = (fit_error_head(model, ((train_inputs, train_set), (val_inputs, val_set)), device, cfg.seed)
                  if cfg.error_head else None)
    model.cpu().eval()
    seconds = time.perf_counter() - start
    lineage = {} if init_from is None else {
        "parent_model_hash": parent_hash, "parent_model": init_from.path,
        "statistics": "refitted" if init_from.refit_statistics else "parent's", "fresh_parameters": fresh}
    artifact = ModelArtifact(
        model=model, level=level, classes=pixels.classes, ancillary_names=names, band_stats=band_stats,
        ancillary_units=units, ancillary_stats=ancillary_stats, hierarchy=hierarchy, error_head=error_head,
        sensor=pixels.sensor, band_names=SENSORS[pixels.sensor].bands,
        training={"source": source, "config": cfg.model_dump(), "train_pixels": len(train_set),
                  "validation_pixels": len(val_set), "epochs_run": len(history), "best_epoch": best_epoch,
                  "validation_rmse": best_rmse, **lineage})
    return TrainResult(artifact, history, best_epoch, best_rmse, seconds,
                       len(train_set) * len(history) / max(train_seconds, 1e-9), resumed_after)
