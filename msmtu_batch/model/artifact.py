"""The model artifact: one safetensors file, loadable without executing code.

Tensors hold the weights and the normalisation statistics; the safetensors header's
string metadata holds, as JSON, the architecture hyperparameters, the class names and
hierarchy level, the band and ancillary variable lists, training facts and the software
version. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from msmtu_batch.inputs.cube import ANCILLARY_NAMES, ANCILLARY_UNITS, BAND_NAMES
from msmtu_batch.inputs.sensors import DEFAULT_SENSOR, SENSORS
from msmtu_batch.inputs.training_data import PixelSet
from msmtu_batch.inputs.units import apply_conversions, conversions_to_model
from msmtu_batch.model.brits import BRITS, FORMULATION_OPTIONS, BritsConfig
from msmtu_batch.model.error_head import FEATURES, ErrorHead
from msmtu_batch.model.hierarchy import ClassHierarchy, hierarchy_from_metadata
from msmtu_batch.model.palette import class_colors, default_class_colors
from msmtu_batch.model.preprocess import ModelInputs, Standardizer, prepare_inputs
from msmtu_batch.model.tensorfile import read_safetensors
from msmtu_batch.runtime.digests import checksum_mismatch, with_checksum
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.outputs import durable_file
from msmtu_batch.runtime.provenance import __version__

ARTIFACT_FORMAT = "msmtu-batch-model/1"
METADATA_KEY = "msmtu_batch"
_STATS = ("band_mean", "band_std", "ancillary_mean", "ancillary_std")
# The unit of the band statistics, recorded in every artifact, and how to reach the unit the
# model meets at run time (physical reflectance: the cube's integers x its 1e-4 scale factor).
BAND_STATISTICS_UNITS = "reflectance"
_BAND_UNIT_FACTORS = {"reflectance": 1.0, "reflectance x 1e4": 1e-4}


class ArtifactError(MsmtuError, ValueError):
    """A model artifact is unreadable, corrupted, or does not match the data."""


@dataclass
class ModelArtifact:
    model: BRITS
    level: str
    classes: tuple[str, ...]
    ancillary_names: tuple[str, ...]
    band_stats: Standardizer
    ancillary_stats: Standardizer | None
    band_names: tuple[str, ...] = BAND_NAMES
    software_version: str = __version__
    training: dict = field(default_factory=dict)
    ancillary_units: tuple[str, ...] = ()  # units of the ancillary statistics; default: the cube contract's
    class_colors: tuple[str, ...] = ()  # '#rrggbb' per class for maps; default: msmtu_batch.model.palette's
    hierarchy: ClassHierarchy | None = None  # a two-level model's parent classes (msmtu_batch.model.hierarchy)
    error_head: ErrorHead | None = None  # expected abundance RMSE per pixel (msmtu_batch.model.error_head)
    sensor: str = DEFAULT_SENSOR.name  # the sensor of the training data (msmtu_batch.inputs.sensors)

    def __post_init__(self) -> None:
        if not self.ancillary_units:
            self.ancillary_units = tuple(ANCILLARY_UNITS[n] for n in self.ancillary_names)
        if not self.class_colors:
            self.class_colors = default_class_colors(self.classes)

    @property
    def config(self) -> BritsConfig:
        return self.model.cfg

    def inputs(self, pixels: PixelSet, source: str = "the data") -> ModelInputs:
        """Model inputs for ``pixels``, prepared with the statistics stored in the artifact (their
        ancillary values converted to the units of those statistics, or refused)."""
        subset = pixels.with_ancillary(self.ancillary_names)
        ancillary = self.to_model_units(subset.ancillary.T, dict(zip(subset.ancillary_names, subset.ancillary_units)),
                                        source).T
        return prepare_inputs(subset.values, subset.masks, ancillary, self.band_stats, self.ancillary_stats)

    def unit_conversions(self, data_units: Mapping[str, str | None], source: str) -> tuple[tuple[float, float], ...]:
        """Per ancillary variable, (scale, offset) from the data's units to the statistics' units."""
        return conversions_to_model(self.ancillary_names, data_units, dict(zip(self.ancillary_names,
                                                                               self.ancillary_units)), source)

    def to_model_units(self, ancillary: np.ndarray, data_units: Mapping[str, str | None], source: str) -> np.ndarray:
        """``ancillary`` (A, ...) in the model's variable order, converted to the statistics' units."""
        return apply_conversions(ancillary, self.unit_conversions(data_units, source))

    def check_sensor(self, sensor: str, source: str, allow_other: bool = False) -> None:
        """Refuse data of a sensor other than the training data's, unless ``allow_other`` (the
        bands must match all the same: :meth:`check_matches`)."""
        if sensor != self.sensor and not allow_other:
            raise ArtifactError(f"{source}: sensor {sensor}, but the model was trained on {self.sensor} data; "
                                "pass --allow-other-sensor to map it all the same")

    def check_matches(self, band_names: Sequence[str], ancillary_available: Sequence[str],
                      source: str) -> None:
        """Refuse data whose bands or ancillary variables differ from the training data's."""
        if tuple(band_names) != self.band_names:
            raise ArtifactError(f"model bands {', '.join(self.band_names)} do not match {source} "
                                f"bands {', '.join(band_names)}")
        missing = [n for n in self.ancillary_names if n not in ancillary_available]
        if missing:
            raise ArtifactError(f"model needs ancillary variable(s) {', '.join(missing)} that "
                                f"{source} lacks")


def save_artifact(artifact: ModelArtifact, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, then rename) so a crash never leaves half a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in artifact.model.state_dict().items()}
    tensors["band_mean"] = torch.from_numpy(artifact.band_stats.mean)
    tensors["band_std"] = torch.from_numpy(artifact.band_stats.std)
    if artifact.ancillary_stats is not None:
        tensors["ancillary_mean"] = torch.from_numpy(artifact.ancillary_stats.mean)
        tensors["ancillary_std"] = torch.from_numpy(artifact.ancillary_stats.std)
    metadata = {
        "format": ARTIFACT_FORMAT, "software_version": artifact.software_version,
        "architecture": "BRITS", "hyperparameters": artifact.config.to_dict(),
        "level": artifact.level, "classes": list(artifact.classes),
        "band_names": list(artifact.band_names), "band_statistics_units": BAND_STATISTICS_UNITS,
        "ancillary_names": list(artifact.ancillary_names), "ancillary_units": list(artifact.ancillary_units),
        "training": artifact.training, "class_colors": list(artifact.class_colors), "sensor": artifact.sensor,
    }
    if artifact.hierarchy is not None:
        metadata["hierarchy"] = artifact.hierarchy.to_dict()
    if artifact.error_head is not None:
        tensors |= artifact.error_head.tensors()
        metadata["error_head"] = artifact.error_head.metadata()
    _check_metadata_meaning(path, metadata)  # what load_artifact would refuse is never written
    with durable_file(path) as partial:
        save_file(tensors, partial, metadata={METADATA_KEY: json.dumps(with_checksum(metadata, tensors))})
    return path


def load_artifact(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelArtifact:
    """Read an artifact; every inconsistency is an :class:`ArtifactError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: model artifact not found")
    try:
        header, tensors = read_safetensors(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors model artifact ({exc})") from None
    try:
        meta = json.loads(header[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: no msmtu-batch metadata in the safetensors header") from None
    except RecursionError:
        raise ArtifactError(f"{path}: metadata nested too deeply to be an artifact's") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: metadata is a JSON {type(meta).__name__}, expected an object")
    if checksum_mismatch(meta, tensors):  # artifacts written before checksums carry none: they load as before
        raise ArtifactError(f"{path}: content does not match its checksum: the file was damaged or edited after "
                            "it was written; use an intact copy")
    try:
        return _artifact_from(path, meta, tensors, device)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # values of the wrong kind
        raise ArtifactError(f"{path}: malformed metadata ({type(exc).__name__}: {exc})") from None


def _artifact_from(path: Path, meta: dict, tensors: dict[str, torch.Tensor], device: str | torch.device
                   ) -> ModelArtifact:
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: artifact format {meta.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
    _check_metadata_meaning(path, meta)
    try:
        cfg = BritsConfig(**meta["hyperparameters"])
        classes, ancillary = tuple(meta["classes"]), tuple(meta["ancillary_names"])
        if cfg.n_classes != len(classes) or cfg.n_ancillary != len(ancillary):
            raise ArtifactError(f"{path}: metadata lists {len(classes)} classes and {len(ancillary)} "
                                f"ancillary variables but the architecture has {cfg.n_classes} and "
                                f"{cfg.n_ancillary}")
        model = BRITS(cfg)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: incomplete metadata ({exc})") from None
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(state)) + [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
        if k in state and state[k].shape != v.shape]
    if problems:
        raise ArtifactError(f"{path}: weights do not match the architecture in its metadata "
                            f"({', '.join(problems[:4])})")
    if any(not torch.isfinite(v).all() for v in state.values()):
        raise ArtifactError(f"{path}: weights contain non-finite values")
    model.load_state_dict(state)
    model.to(device).eval()
    stats = {k: tensors[k].numpy() for k in _STATS if k in tensors}
    n_bands = len(meta["band_names"])
    if stats.get("band_mean", np.empty(0)).shape != (n_bands,) or \
            stats.get("band_std", np.empty(0)).shape != (n_bands,):
        raise ArtifactError(f"{path}: band normalisation statistics missing or not of length {n_bands}")
    for name, values in stats.items():
        if not np.isfinite(values).all() or (name.endswith("_std") and not (values > 0).all()):
            raise ArtifactError(f"{path}: normalisation statistic {name} must be finite"
                                + (" and positive" if name.endswith("_std") else "") + f", found {values.tolist()}")
    band_factor = _band_unit_factor(path, meta)
    units = meta.get("ancillary_units")
    if not isinstance(units, list) or len(units) != len(ancillary) or not all(isinstance(u, str) and u for u in units):
        raise ArtifactError(f"{path}: ancillary_units must give the units of each of the {len(ancillary)} ancillary "
                            f"statistics, found {units!r}")
    units = tuple(units)
    colors = meta.get("class_colors")  # absent in artifacts of msmtu-batch before 0.3: the default palette
    if colors is not None and (not isinstance(colors, list) or len(colors) != len(classes)):
        raise ArtifactError(f"{path}: class_colors must give one '#rrggbb' colour per class ({len(classes)}), "
                            f"found {colors!r}")
    try:
        colors = class_colors(classes, dict(zip(classes, colors or ())), str(path))
    except MsmtuError as exc:
        raise ArtifactError(str(exc)) from None
    hierarchy = None
    if "hierarchy" in meta:
        try:
            hierarchy = hierarchy_from_metadata(meta["hierarchy"], classes, str(path))
        except MsmtuError as exc:
            raise ArtifactError(str(exc)) from None
    error_head = None
    if "error_head" in meta:
        n_features = len(FEATURES) + len(classes) + len(ancillary)
        try:
            error_head = ErrorHead.from_artifact(tensors, meta["error_head"], n_features, str(path))
        except MsmtuError as exc:
            raise ArtifactError(str(exc)) from None
    training = meta.get("training", {})
    if not isinstance(training, dict):
        raise ArtifactError(f"{path}: training must be a JSON object of facts about the training, found {training!r}")
    ancillary_stats = None
    if ancillary:
        if stats.get("ancillary_mean", np.empty(0)).shape != (len(ancillary),):
            raise ArtifactError(f"{path}: ancillary normalisation statistics missing or not of "
                                f"length {len(ancillary)}")
        ancillary_stats = Standardizer(stats["ancillary_mean"], stats["ancillary_std"])
    return ModelArtifact(model=model, level=meta["level"], classes=classes, ancillary_names=ancillary,
                         band_stats=Standardizer(stats["band_mean"] * np.float32(band_factor),
                                                 stats["band_std"] * np.float32(band_factor)),
                         ancillary_stats=ancillary_stats, band_names=tuple(meta["band_names"]),
                         software_version=str(meta["software_version"]), training=training,
                         ancillary_units=units, class_colors=colors, hierarchy=hierarchy, error_head=error_head,
                         sensor=meta.get("sensor", DEFAULT_SENSOR.name))


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_metadata_meaning(path: Path, meta: dict) -> None:
    """The header's lists must mean something: distinct string class names, a level that is a
    safe file and group name, known band and ancillary variables, whole-number sizes."""
    def refuse(what: str) -> None:
        raise ArtifactError(f"{path}: {what}")

    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        refuse(f"classes must be a non-empty list of names, found {classes!r}")
    if duplicated := sorted({c for c in classes if classes.count(c) > 1}):
        refuse(f"class name(s) {', '.join(duplicated)} appear more than once")
    level = meta.get("level")
    if not isinstance(level, str) or not _SAFE_NAME.fullmatch(level):
        refuse(f"level {level!r} is not a safe name (letters, digits, _ . -; at most 64 characters)")
    sensor = meta.get("sensor", DEFAULT_SENSOR.name)  # artifacts before sensors were recorded: MOD09A1
    if not isinstance(sensor, str) or sensor not in SENSORS:
        refuse(f"sensor {sensor!r} is not one this software reads (known: {', '.join(SENSORS)})")
    bands = meta.get("band_names")
    if not isinstance(bands, list) or bands != list(SENSORS[sensor].bands):
        refuse(f"band_names {bands!r}, expected {', '.join(SENSORS[sensor].bands)} in that order ({sensor})")
    ancillary = meta.get("ancillary_names")
    if not isinstance(ancillary, list) or not all(isinstance(a, str) for a in ancillary):
        refuse(f"ancillary_names must be a list of names, found {ancillary!r}")
    if unknown := [a for a in ancillary if a not in ANCILLARY_NAMES]:
        refuse(f"unknown ancillary variable(s) {', '.join(unknown)} (known: {', '.join(ANCILLARY_NAMES)})")
    if len(set(ancillary)) != len(ancillary):
        refuse("ancillary_names lists a variable more than once")
    sizes = meta.get("hyperparameters")
    if not isinstance(sizes, dict):
        refuse("no hyperparameters")
    for key, value in sizes.items():
        if key in FORMULATION_OPTIONS:
            if value not in FORMULATION_OPTIONS[key]:
                refuse(f"hyperparameter {key} = {value!r}: expected {' or '.join(FORMULATION_OPTIONS[key])}")
            continue
        kind, least = (int | float, 0) if key == "dropout" else (int, 0 if key == "n_ancillary" else 1)
        if isinstance(value, bool) or not isinstance(value, kind) or value < least:
            refuse(f"hyperparameter {key} = {value!r} is not a valid size")


def _band_unit_factor(path: Path, meta: dict) -> float:
    """Factor taking the stored band statistics to physical reflectance; refuse unknown units."""
    units = meta.get("band_statistics_units")
    if units not in _BAND_UNIT_FACTORS:
        known = " or ".join(repr(u) for u in _BAND_UNIT_FACTORS)
        found = "none recorded (an artifact from before msmtu-batch 0.2: retrain it)" if units is None else repr(units)
        raise ArtifactError(f"{path}: unit of the band statistics is {found}; expected {known}")
    return _BAND_UNIT_FACTORS[units]


def artifact_hash(path: str | os.PathLike) -> str:
    """sha256 of the artifact file, recorded in outputs for provenance."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
