"""Training checkpoints: all a training needs to go on where it stopped, in one safetensors
file (tensors: the weights, the best weights so far, Adam's moments, torch's RNG state;
JSON metadata: epoch, history, early-stopping state, the learning-rate schedule, NumPy's
RNG state). Nothing is pickled, so loading one never runs code. Written atomically (a
temporary file, fsync, rename): a training killed while writing keeps the previous one.

A checkpoint belongs to one training: :func:`training_identity` digests the settings, the
level, the training pixels themselves and the parent model; a rerun resumes only a
checkpoint of the same identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from msmtu_batch.model.tensorfile import read_safetensors
from msmtu_batch.runtime.digests import CHECKSUM_FIELD, checksum_mismatch, with_checksum
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.outputs import durable_file

CHECKPOINT_FORMAT = "msmtu-batch-training-checkpoint/1"
METADATA_KEY = "msmtu_checkpoint"


def checkpoint_path(artifact: str | os.PathLike) -> Path:
    """Where the training of ``artifact`` keeps its checkpoint: a hidden sibling."""
    artifact = Path(artifact)
    return artifact.with_name(f".{artifact.name}.checkpoint")


def training_identity(settings: dict, level: str, arrays: dict[str, np.ndarray], classes: tuple[str, ...],
                      parent_hash: str | None) -> str:
    """What makes two trainings the same: settings, level, the training pixels' arrays (values,
    masks, labels, partitions; not their path) and the parent model's hash."""
    digest = hashlib.sha256(json.dumps({"settings": settings, "level": level, "classes": list(classes),
                                        "parent": parent_hash}, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return "sha256:" + digest.hexdigest()


@dataclass
class TrainingState:
    """A training between two epochs."""

    identity: str
    epoch: int  # epochs finished
    history: list[dict]
    best_rmse: float
    best_epoch: int
    stale: int  # epochs since the best one
    train_seconds: float
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor] | None
    optimiser: dict
    scheduler: dict
    torch_rng: torch.Tensor
    numpy_rng: dict
    cuda_rng: list[torch.Tensor] | None = None


def save_checkpoint(state: TrainingState, path: str | os.PathLike) -> Path:
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    if state.best_model is not None:
        tensors |= {f"best.{k}": v for k, v in state.best_model.items()}
    for index, moments in state.optimiser["state"].items():
        tensors |= {f"optimiser.{index}.{k}": v for k, v in moments.items()}
    tensors["rng.torch"] = state.torch_rng
    for device, rng in enumerate(state.cuda_rng or []):
        tensors[f"rng.cuda.{device}"] = rng
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "identity": state.identity, "epoch": state.epoch,
                "history": state.history, "best_rmse": state.best_rmse, "best_epoch": state.best_epoch,
                "stale": state.stale, "train_seconds": state.train_seconds,
                "optimiser_groups": state.optimiser["param_groups"], "scheduler": state.scheduler,
                "numpy_rng": state.numpy_rng, "cuda_devices": len(state.cuda_rng or [])}
    with durable_file(path) as partial:
        save_file(tensors, partial, metadata={METADATA_KEY: json.dumps(with_checksum(metadata, tensors))})
    return path


def load_checkpoint(path: str | os.PathLike) -> TrainingState:
    """Read a checkpoint (tensors on the CPU); one line naming the file if it is not one."""
    path = Path(path)
    try:
        header, tensors = read_safetensors(path)
        meta = json.loads(header[METADATA_KEY])
        if not isinstance(meta, dict) or CHECKSUM_FIELD not in meta or checksum_mismatch(meta, tensors):
            raise ValueError("its content does not match its checksum: damaged or edited after it was written")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        return _state_from(meta, tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise MsmtuError(f"{path}: not a readable training checkpoint ({exc}); delete it to start afresh") from None


def _state_from(meta: dict, tensors: dict[str, torch.Tensor]) -> TrainingState:
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in part("optimiser.").items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    groups = [g | {"betas": tuple(g["betas"])} if "betas" in g else g for g in meta["optimiser_groups"]]
    best = part("best.")
    return TrainingState(
        identity=meta["identity"], epoch=int(meta["epoch"]), history=list(meta["history"]),
        best_rmse=float(meta["best_rmse"]), best_epoch=int(meta["best_epoch"]), stale=int(meta["stale"]),
        train_seconds=float(meta["train_seconds"]), model=part("model."), best_model=best or None,
        optimiser={"state": moments, "param_groups": groups}, scheduler=dict(meta["scheduler"]),
        torch_rng=tensors["rng.torch"], numpy_rng=dict(meta["numpy_rng"]),
        cuda_rng=[tensors[f"rng.cuda.{d}"] for d in range(int(meta["cuda_devices"]))] or None)
