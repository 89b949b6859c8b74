"""Import a research-code checkpoint (PyTorch Lightning, ``LitBRITS``) as a model artifact.

What is read, as facts about the research code (docs/research-checkpoint.md): the
``state_dict`` under the prefix ``model.`` (``rits_f`` forward, ``rits_b`` backward), the
class order from ``hyper_parameters['idx_to_class']``, and the research datamodule's fixed
normalisation constants, which the artifact takes instead of fitted statistics. Two things
the research code computes differently from models trained here are recorded in the
artifact's hyperparameters (:class:`~msmtu_batch.model.brits.BritsConfig`): the combination
weight alpha without a sigmoid, and the backward pass fed the forward-order deltas (its
loaders reverse the already reversed backward masks once more). The file is read with
``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers only;
anything that would need code unpickled is refused.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from msmtu_batch.inputs.cube import ANCILLARY_NAMES, ANCILLARY_UNITS
from msmtu_batch.inputs.training_data import MSMTU_VALUE_SCALE
from msmtu_batch.inputs.units import MSMTU_TABLE_UNITS
from msmtu_batch.model.artifact import ModelArtifact
from msmtu_batch.model.brits import BRITS, BritsConfig
from msmtu_batch.model.preprocess import Standardizer
from msmtu_batch.runtime.errors import MsmtuError

# The research datamodule's constants, reflectance x 1e4, bands b01..b07 (MOD09A1 order)
RESEARCH_BAND_MEAN = (1778.0370, 2885.0557, 1256.2632, 1586.7336, 2817.6737, 2420.8652, 1763.7377)
RESEARCH_BAND_STD = (2067.9758, 1811.1213, 2146.4021, 2059.2303, 1454.7781, 1595.4735, 1487.7149)
# (mean, std) in the published ancillary table's units (msmtu_batch.inputs.units.MSMTU_TABLE_UNITS)
RESEARCH_ANCILLARY_STATS: dict[str, tuple[float, float]] = {
    "longitude": (-4.5726, 1.42003659), "latitude": (37.4675, 0.54427359), "altitude": (526.9416, 434.2056),
    "slope": (9.0989, 6.6360), "precipitation": (3398.9592, 1157.0351), "evapotranspiration": (5147.7449, 466.2150),
    "temperature_ave": (15.5937, 1.9789), "temperature_max": (21.6061, 2.0763), "temperature_min": (10.0474, 2.0128),
}
# the research train.py's default ancillary list, in its order (A = 5)
RESEARCH_DEFAULT_ANCILLARY = ("longitude", "latitude", "altitude", "slope", "evapotranspiration")
PREFIX = "model."
DIRECTIONS = {"forward_pass": "rits_f", "backward_pass": "rits_b"}
# our parameter (after the direction) <- the research one (after rits_f. / rits_b.)
PARAMETERS = {
    "cell.weight_ih": "rnn_cell.weight_ih", "cell.weight_hh": "rnn_cell.weight_hh",
    "cell.bias_ih": "rnn_cell.bias_ih", "cell.bias_hh": "rnn_cell.bias_hh",
    "decay_hidden.weight": "temp_decay_h.W", "decay_hidden.bias": "temp_decay_h.b",
    "decay_input.weight": "temp_decay_x.W", "decay_input.bias": "temp_decay_x.b",
    "history_regression.weight": "hist_reg.weight", "history_regression.bias": "hist_reg.bias",
    "feature_regression.weight": "feat_reg.W", "feature_regression.bias": "feat_reg.b",
    "combine.weight": "weight_combine.weight", "combine.bias": "weight_combine.bias",
    "ancillary_embedding.0.weight": "ancillary_embed.weight", "ancillary_embedding.0.bias": "ancillary_embed.bias",
    "head.1.weight": "concat.weight", "head.1.bias": "concat.bias",
    "head.3.weight": "out.weight", "head.3.bias": "out.bias",
}
# fixed masks the research layers keep as buffers: what they must hold for the import to mean the same
MASKS = {"temp_decay_x.m": "identity", "feat_reg.m": "ones minus identity"}


class ResearchCheckpointError(MsmtuError, ValueError):
    """A research checkpoint that cannot be imported; the message names the file and why."""


# Lightning's AttributeDict (hyper_parameters of some versions) read as the plain dict it is:
# the weights-only unpickler makes a dict where the file names that class; no Lightning code runs
_SAFE_NAMES = [(dict, "lightning.fabric.utilities.data.AttributeDict"),
               (dict, "pytorch_lightning.utilities.parsing.AttributeDict")]


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents through the weights-only unpickler; refusals in one line."""
    if not path.is_file():
        raise ResearchCheckpointError(f"{path}: checkpoint not found")
    with path.open("rb") as file:
        legacy = file.read(1) == b"\x80"  # torch.save before 1.6: a bare pickle (protocol 2 and up)
    if not (legacy or zipfile.is_zipfile(path)):
        raise ResearchCheckpointError(f"{path}: not a readable PyTorch checkpoint (neither torch.save's zip "
                                      "archive nor its older pickle)")
    try:
        with torch.serialization.safe_globals(_SAFE_NAMES):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("\n")
        needed = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
        raise ResearchCheckpointError(f"{path}: refused, reading it would unpickle code ({needed}); only tensors, "
                                      "numbers, strings and plain containers are read") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ResearchCheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})"
                                      ) from None
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise ResearchCheckpointError(f"{path}: no 'state_dict' in the checkpoint (expected a Lightning "
                                      "checkpoint of LitBRITS)")
    return content


def _research_state(path: Path, content: dict) -> dict[str, torch.Tensor]:
    """The research parameters and buffers by their names after ``model.``."""
    state = {k[len(PREFIX):]: v for k, v in content["state_dict"].items()
             if isinstance(k, str) and k.startswith(PREFIX)}
    if not state:
        raise ResearchCheckpointError(f"{path}: its state_dict has no '{PREFIX}' keys (expected LitBRITS)")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ResearchCheckpointError(f"{path}: its state_dict holds values that are not tensors")
    return state


def _hyper_parameters(content: dict) -> dict:
    """The checkpoint's hyper_parameters, or nothing when it has none (or not as a mapping)."""
    hyper = content.get("hyper_parameters")
    return hyper if isinstance(hyper, dict) else {}


def _classes(path: Path, content: dict, n_classes: int, given: Sequence[str] | None) -> tuple[str, ...]:
    if given:
        classes = tuple(given)
    else:
        mapping = _hyper_parameters(content).get("idx_to_class")
        if not isinstance(mapping, dict) or not mapping:
            raise ResearchCheckpointError(f"{path}: no hyper_parameters['idx_to_class'] to give the class "
                                          "order; pass --classes")
        try:
            order = sorted((int(k), str(v)) for k, v in mapping.items())
        except (TypeError, ValueError):
            raise ResearchCheckpointError(f"{path}: idx_to_class keys are not class indices: "
                                          f"{sorted(map(str, mapping))[:5]}") from None
        if [i for i, _ in order] != list(range(len(order))):
            raise ResearchCheckpointError(f"{path}: idx_to_class indices {[i for i, _ in order]} are not "
                                          f"0..{len(order) - 1}")
        classes = tuple(name for _, name in order)
    if len(classes) != n_classes:
        raise ResearchCheckpointError(f"{path}: {len(classes)} class names for an output layer of {n_classes} "
                                      "classes")
    if len(set(classes)) != len(classes):
        raise ResearchCheckpointError(f"{path}: class names {', '.join(classes)} repeat a name")
    return classes


def _ancillary_names(path: Path, n_ancillary: int, given: Sequence[str] | None) -> tuple[str, ...]:
    if given is None:
        if n_ancillary not in (0, len(RESEARCH_DEFAULT_ANCILLARY)):
            raise ResearchCheckpointError(
                f"{path}: the model takes {n_ancillary} ancillary variables, not the research default "
                f"{len(RESEARCH_DEFAULT_ANCILLARY)} ({', '.join(RESEARCH_DEFAULT_ANCILLARY)}); pass --ancillary "
                "with its variables in their order")
        return RESEARCH_DEFAULT_ANCILLARY if n_ancillary else ()
    names = tuple(given)
    if unknown := [n for n in names if n not in ANCILLARY_NAMES]:
        raise ResearchCheckpointError(f"--ancillary: unknown variable(s) {', '.join(unknown)} "
                                      f"(known: {', '.join(ANCILLARY_NAMES)})")
    if len(names) != n_ancillary:
        raise ResearchCheckpointError(f"--ancillary names {len(names)} variables, {path} takes {n_ancillary}")
    return names


def _whole_number(value) -> int | None:
    """An epoch or step count for the artifact's JSON metadata (None if it is not one)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, int | np.integer) and not isinstance(value, bool) else None


def import_checkpoint(path: str | Path, *, level: str, classes: Sequence[str] | None = None,
                      ancillary: Sequence[str] | None = None, research_backward_deltas: bool = True
                      ) -> ModelArtifact:
    """A model artifact computing what the research code computes with this checkpoint.

    ``research_backward_deltas`` (default) reproduces its loaders' backward deltas (the
    model learnt with them); False gives the backward pass its own, as models trained here."""
    path = Path(path)
    content = read_checkpoint(path)
    state = _research_state(path, content)
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    def shape(name: str) -> tuple[int, ...]:
        key = f"rits_f.{name}"
        if key not in shapes:
            raise ResearchCheckpointError(f"{path}: state_dict lacks {PREFIX}{key} (expected LitBRITS)")
        return shapes[key]

    gates, features_and_masks = shape("rnn_cell.weight_ih")
    hidden, n_features = gates // 4, features_and_masks // 2
    head_hidden, n_classes = shape("concat.weight")[0], shape("out.weight")[0]
    embed, n_ancillary = shapes.get("rits_f.ancillary_embed.weight", (0, 0))
    hyper = _hyper_parameters(content)
    steps = hyper.get("seq_len", 12)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ResearchCheckpointError(f"{path}: hyper_parameters seq_len {steps!r} is not a number of steps")
    cfg = BritsConfig(n_classes=n_classes, n_ancillary=n_ancillary, n_features=n_features, n_steps=steps,
                      hidden=hidden, embed=max(embed, 1) if n_ancillary else BritsConfig.embed,
                      head_hidden=head_hidden, dropout=0.0, combine_activation="identity",
                      backward_deltas="forward_order" if research_backward_deltas else "reversed")
    model = BRITS(cfg)
    expected = model.state_dict()
    mapped, problems = {}, []
    for ours, theirs in ((f"{d}.{p}", f"{r}.{q}") for d, r in DIRECTIONS.items() for p, q in PARAMETERS.items()):
        if ours not in expected:  # the ancillary embedding of a model without ancillary data
            continue
        if theirs not in state:
            problems.append(f"{PREFIX}{theirs} missing")
        elif tuple(state[theirs].shape) != tuple(expected[ours].shape):
            problems.append(f"{PREFIX}{theirs} {tuple(state[theirs].shape)}, expected {tuple(expected[ours].shape)}")
        else:
            mapped[ours] = state[theirs].detach().float()
    if problems:
        raise ResearchCheckpointError(f"{path}: not the LitBRITS layout ({'; '.join(problems[:4])})")
    eye = torch.eye(n_features)
    for direction in DIRECTIONS.values():
        for name, meaning in MASKS.items():
            buffer = state.get(f"{direction}.{name}")
            wanted = eye if meaning == "identity" else 1 - eye
            if buffer is not None and not torch.equal(buffer.float(), wanted):
                raise ResearchCheckpointError(f"{path}: {PREFIX}{direction}.{name} is not the {meaning} the "
                                              "research layers use")
    if any(not torch.isfinite(v).all() for v in mapped.values()):
        raise ResearchCheckpointError(f"{path}: weights contain non-finite values")
    model.load_state_dict(mapped)
    model.eval()
    if n_features != len(RESEARCH_BAND_MEAN):
        raise ResearchCheckpointError(f"{path}: the model takes {n_features} bands; the research constants are "
                                      f"for {len(RESEARCH_BAND_MEAN)}")
    names = _ancillary_names(path, n_ancillary, ancillary)
    scale = np.float32(1 / MSMTU_VALUE_SCALE)  # the artifact's band statistics are in reflectance
    band_stats = Standardizer(np.asarray(RESEARCH_BAND_MEAN, np.float32) * scale,
                              np.asarray(RESEARCH_BAND_STD, np.float32) * scale)
    ancillary_stats = Standardizer(np.asarray([RESEARCH_ANCILLARY_STATS[n][0] for n in names], np.float32),
                                   np.asarray([RESEARCH_ANCILLARY_STATS[n][1] for n in names], np.float32)
                                   ) if names else None
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return ModelArtifact(
        model=model, level=level, classes=_classes(path, content, n_classes, classes), ancillary_names=names,
        band_stats=band_stats, ancillary_stats=ancillary_stats,
        ancillary_units=tuple(MSMTU_TABLE_UNITS.get(n, ANCILLARY_UNITS[n]) for n in names),
        training={"source": f"imported research checkpoint {path.name}", "imported_from": {
            "file": path.name, "hash": digest, "format": "LitBRITS (PyTorch Lightning)",
            "epoch": _whole_number(content.get("epoch")), "global_step": _whole_number(content.get("global_step")),
            "backward_deltas": cfg.backward_deltas, "statistics": "the research datamodule's fixed constants"}})
