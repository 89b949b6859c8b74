"""Model artifacts: exact round trip, no code execution, clear refusals."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from msmtu_batch.inputs.cube import BAND_NAMES, GEOTOPO_NAMES
from msmtu_batch.model.artifact import ArtifactError, ModelArtifact, load_artifact, save_artifact
from msmtu_batch.model.brits import BRITS, BritsConfig
from msmtu_batch.model.inference import predict
from msmtu_batch.model.preprocess import Standardizer
from msmtu_batch.runtime.digests import with_checksum
from msmtu_batch.runtime.errors import MsmtuError
from tests.test_model import synthetic_problem


@pytest.fixture
def artifact() -> ModelArtifact:
    torch.manual_seed(3)
    model = BRITS(BritsConfig(n_classes=4, n_ancillary=4, hidden=16, embed=8, head_hidden=16)).eval()
    rng = np.random.default_rng(0)
    return ModelArtifact(
        model=model, level="level2", classes=("a", "b", "c", "d"), ancillary_names=GEOTOPO_NAMES,
        band_stats=Standardizer(rng.random(7).astype(np.float32), rng.random(7).astype(np.float32) + 0.1),
        ancillary_stats=Standardizer(rng.random(4).astype(np.float32), rng.random(4).astype(np.float32) + 1),
        training={"seed": 3})


def test_round_trip_is_exact(artifact, tmp_path):
    path = save_artifact(artifact, tmp_path / "m.safetensors")
    loaded = load_artifact(path)
    for (name, a), (_, b) in zip(artifact.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config == artifact.config
    assert (loaded.level, loaded.classes, loaded.ancillary_names) == ("level2", ("a", "b", "c", "d"),
                                                                     GEOTOPO_NAMES)
    assert loaded.band_names == BAND_NAMES and loaded.training == {"seed": 3}
    np.testing.assert_array_equal(loaded.band_stats.mean, artifact.band_stats.mean)
    np.testing.assert_array_equal(loaded.ancillary_stats.std, artifact.ancillary_stats.std)
    inputs, _ = synthetic_problem(n=20, n_ancillary=4)
    np.testing.assert_array_equal(predict(loaded.model, inputs)["abundance"],
                                  predict(artifact.model, inputs)["abundance"])
    assert not list(tmp_path.glob(".*partial")), "no temporary file left"


class Exploit:
    def __reduce__(self):
        return (open, ("pwned.txt", "w"))  # would create a file if ever unpickled


def test_a_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": Exploit()}))
    with pytest.raises(ArtifactError, match=r"evil\.safetensors: not a readable safetensors model artifact"):
        load_artifact(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_truncated_file_is_refused(artifact, tmp_path):
    path = save_artifact(artifact, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="not a readable safetensors model artifact"):
        load_artifact(path)


def _rewrite(path, tensors=None, meta_update=None):
    tensors = tensors if tensors is not None else load_file(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["msmtu_batch"])
    meta.update(meta_update or {})
    save_file(tensors, path, metadata={"msmtu_batch": json.dumps(with_checksum(meta, tensors))})


def test_inconsistent_artifacts_are_refused(artifact, tmp_path):
    path = save_artifact(artifact, tmp_path / "m.safetensors")
    _rewrite(path, meta_update={"classes": ["a", "b", "c"]})
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    assert str(err.value) == (f"{path}: metadata lists 3 classes and 4 ancillary variables but the "
                              "architecture has 4 and 4")

    path = save_artifact(artifact, tmp_path / "m2.safetensors")
    tensors = load_file(path)
    tensors["model.forward_pass.history_regression.weight"] = torch.zeros(7, 15)
    _rewrite(path, tensors=tensors)
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    assert str(err.value) == (f"{path}: weights do not match the architecture in its metadata "
                              "(forward_pass.history_regression.weight (7, 15) != (7, 16))")

    path = save_artifact(artifact, tmp_path / "m3.safetensors")
    save_file(load_file(path), path, metadata={"other": "x"})
    with pytest.raises(ArtifactError, match="no msmtu-batch metadata in the safetensors header"):
        load_artifact(path)

    with pytest.raises(ArtifactError, match="model artifact not found"):
        load_artifact(tmp_path / "absent.safetensors")


def test_artifact_refuses_data_it_does_not_match(artifact):
    with pytest.raises(ArtifactError) as err:
        artifact.check_matches(BAND_NAMES, ("longitude", "latitude"), "cube.zarr")
    assert str(err.value) == "model needs ancillary variable(s) altitude, slope that cube.zarr lacks"
    with pytest.raises(ArtifactError, match=r"do not match cube\.zarr bands"):
        artifact.check_matches(BAND_NAMES[:6], GEOTOPO_NAMES, "cube.zarr")


def test_class_colours_default_override_round_trip_and_refusals(artifact, tmp_path):
    from msmtu_batch.model.palette import class_colors, default_class_colors, read_class_colors

    assert default_class_colors(("olive_grove", "water", "mystery")) == ("#e6a600", "#00ccf2", "#2ca02c")
    assert artifact.class_colors == ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"), "tab20 for unknown names"
    artifact.class_colors = class_colors(artifact.classes, {"b": "#ABCDEF"})
    assert load_artifact(save_artifact(artifact, tmp_path / "m.safetensors")).class_colors[1] == "#abcdef"

    path = save_artifact(artifact, tmp_path / "old.safetensors")
    _rewrite(path, meta_update={"class_colors": None})  # an artifact from before class colours
    assert load_artifact(path).class_colors == ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
    _rewrite(path, meta_update={"class_colors": ["#000000"]})
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    assert str(err.value) == f"{path}: class_colors must give one '#rrggbb' colour per class (4), found ['#000000']"
    _rewrite(path, meta_update={"class_colors": ["#000000", "red", "#000000", "#000000"]})
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    assert str(err.value) == f"{path}: colours must be '#rrggbb', found b: 'red'"

    palette = tmp_path / "colors.json"
    palette.write_text(json.dumps({"e": "#000000"}))
    with pytest.raises(MsmtuError) as err:
        read_class_colors(palette, artifact.classes)
    assert str(err.value) == f"{palette}: unknown class(es) e (classes: a, b, c, d)"
