"""`import-checkpoint`: a research-code Lightning checkpoint, written here in its layout
(docs/research-checkpoint.md), becomes an artifact that gives the research formulation's
outputs, from raw reflectance x 1e4 standardised as the research datamodule does."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from msmtu_batch.inputs.units import MSMTU_TABLE_UNIT
from msmtu_batch.model.artifact import load_artifact
from msmtu_batch.model.brits import BritsConfig
from msmtu_batch.model.inference import predict
from msmtu_batch.model.preprocess import compute_deltas, prepare_inputs
from msmtu_batch.testing.research import ResearchBRITS
from tests.test_faults import cli, one_line_error

CLASSES = ("urban", "water", "crops", "forest", "shrubs", "bare")
# The research datamodule's constants, as the facts list them (not imported from the module under test)
BAND_MEAN = np.array([1778.0370, 2885.0557, 1256.2632, 1586.7336, 2817.6737, 2420.8652, 1763.7377])
BAND_STD = np.array([2067.9758, 1811.1213, 2146.4021, 2059.2303, 1454.7781, 1595.4735, 1487.7149])
ANCILLARY_MEAN = np.array([-4.5726, 37.4675, 526.9416, 9.0989, 5147.7449])  # lon, lat, altitude, slope, ET
ANCILLARY_STD = np.array([1.42003659, 0.54427359, 434.2056, 6.6360, 466.2150])
# research key (after rits_f. / rits_b.) -> ours (after forward_pass. / backward_pass.), from the facts' table
RESEARCH_KEYS = {
    "rnn_cell.weight_ih": "cell.weight_ih", "rnn_cell.weight_hh": "cell.weight_hh",
    "rnn_cell.bias_ih": "cell.bias_ih", "rnn_cell.bias_hh": "cell.bias_hh",
    "temp_decay_h.W": "decay_hidden.weight", "temp_decay_h.b": "decay_hidden.bias",
    "temp_decay_x.W": "decay_input.weight", "temp_decay_x.b": "decay_input.bias",
    "hist_reg.weight": "history_regression.weight", "hist_reg.bias": "history_regression.bias",
    "feat_reg.W": "feature_regression.weight", "feat_reg.b": "feature_regression.bias",
    "weight_combine.weight": "combine.weight", "weight_combine.bias": "combine.bias",
    "ancillary_embed.weight": "ancillary_embedding.0.weight", "ancillary_embed.bias": "ancillary_embedding.0.bias",
    "concat.weight": "head.1.weight", "concat.bias": "head.1.bias", "out.weight": "head.3.weight",
    "out.bias": "head.3.bias",
}
TOLERANCE = 2e-5


def research_model(seed: int = 0) -> ResearchBRITS:
    """The research formulation (alpha as is, no sigmoid) with random weights, scaled up so that
    the outputs depend on every part of the computation."""
    torch.manual_seed(seed)
    model = ResearchBRITS(BritsConfig(n_classes=len(CLASSES), n_ancillary=5, combine_activation="identity")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model


def research_state_dict(model: ResearchBRITS) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out = {}
    for direction, ours in (("rits_f", "forward_pass"), ("rits_b", "backward_pass")):
        for theirs, name in RESEARCH_KEYS.items():
            out[f"model.{direction}.{theirs}"] = state[f"{ours}.{name}"].clone()
        out[f"model.{direction}.temp_decay_x.m"] = torch.eye(7)
        out[f"model.{direction}.feat_reg.m"] = 1 - torch.eye(7)
    return out


def write_checkpoint(path: Path, model: ResearchBRITS, **changes) -> Path:
    """A Lightning checkpoint's top level as Lightning writes it (optimiser state included)."""
    content = {"epoch": 41, "global_step": 12_000, "pytorch-lightning_version": "2.1.3",
               "state_dict": research_state_dict(model),
               "hyper_parameters": {"rnn_hid_size": 100, "data_dim": 7, "seq_len": 12, "ancillary_dim": 5,
                                    "embedding_dim": 50, "idx_to_class": dict(enumerate(CLASSES))},
               "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                                     "param_groups": [{"lr": 1e-3, "params": [0]}]}],
               "lr_schedulers": [], "callbacks": {}, "loops": {}}
    content.update(changes)
    torch.save(content, path)
    return path


def raw_pixels(n: int = 400, seed: int = 0):
    """Reflectance x 1e4 with gaps (any value where masked), ancillary in the research table's units."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, 12, 7)) < 0.7).astype(np.float32)
    masks[: n // 5] = rng.random((n // 5, 12, 1)) < 0.6  # whole months lost to clouds
    values = np.where(masks > 0, rng.normal(BAND_MEAN, BAND_STD, (n, 12, 7)), rng.integers(-100, 100, (n, 12, 7)))
    ancillary = rng.normal(ANCILLARY_MEAN, ANCILLARY_STD, (n, 5))
    return values.astype(np.float32), masks, ancillary.astype(np.float32)


def research_abundance(model: ResearchBRITS, values, masks, ancillary, backward_deltas: str) -> np.ndarray:
    """As the research loaders feed the model: every value standardised (gaps too), and the
    backward pass given the forward-order deltas (or, for comparison, its own)."""
    standardised = ((values - BAND_MEAN) / BAND_STD).astype(np.float32)
    forward = compute_deltas(masks)
    backward = forward if backward_deltas == "research" else compute_deltas(masks[:, ::-1])
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in
               (standardised, masks, forward, backward, (ancillary - ANCILLARY_MEAN) / ANCILLARY_STD)]
    with torch.no_grad():
        return model(*tensors, with_loss=False).abundance.numpy()


def our_abundance(artifact_path: Path, values, masks, ancillary, **options) -> np.ndarray:
    artifact = load_artifact(artifact_path)
    inputs = prepare_inputs(values / np.float32(1e4), masks, ancillary, artifact.band_stats, artifact.ancillary_stats)
    return predict(artifact.model, inputs, imputed=False, **options)["abundance"]


@pytest.mark.parametrize("deltas", ["research", "reversed"])
def test_imported_checkpoint_gives_the_research_formulations_outputs(tmp_path, deltas):
    model = research_model()
    checkpoint = write_checkpoint(tmp_path / "litbrits.ckpt", model)
    out = tmp_path / "imported.safetensors"
    flag = [] if deltas == "research" else ["--no-research-backward-deltas"]
    done = cli("import-checkpoint", checkpoint, "--out", out, "--level", "level2", *flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"wrote {out}: 6 classes ({', '.join(CLASSES)}), ancillary longitude, latitude, "
                                   "altitude, slope, evapotranspiration, the research normalisation constants")
    values, masks, ancillary = raw_pixels()
    expected = research_abundance(model, values, masks, ancillary, deltas)
    for options in ({}, {"fused": False}):  # the CPU engine and the model itself
        np.testing.assert_allclose(our_abundance(out, values, masks, ancillary, **options), expected,
                                   atol=TOLERANCE, err_msg=str(options))
    other = research_abundance(model, values, masks, ancillary, "reversed" if deltas == "research" else "research")
    assert np.abs(other - expected).max() > 100 * TOLERANCE, "the backward deltas matter to this model"
    artifact = load_artifact(out)
    assert artifact.classes == CLASSES and artifact.level == "level2"
    assert artifact.config.combine_activation == "identity"
    assert artifact.config.backward_deltas == ("forward_order" if deltas == "research" else "reversed")
    source = artifact.training["imported_from"]
    assert source["epoch"] == 41 and source["global_step"] == 12_000 and source["hash"].startswith("sha256:")
    assert artifact.ancillary_units == ("degrees_east", "degrees_north", "m", "degree", MSMTU_TABLE_UNIT)


def test_lightning_attribute_dict_hyperparameters_are_read_without_lightning(tmp_path, monkeypatch):
    """Older Lightning versions save hyper_parameters as their AttributeDict: read as a plain dict."""
    module_names = ("lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data")
    modules = {name: types.ModuleType(name) for name in module_names}
    attribute_dict = type("AttributeDict", (dict,), {"__module__": module_names[-1]})
    modules[module_names[-1]].AttributeDict = attribute_dict
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    model = research_model(1)
    hyper = attribute_dict(idx_to_class={i: c for i, c in enumerate(CLASSES)}, seq_len=12)
    checkpoint = write_checkpoint(tmp_path / "old.ckpt", model, hyper_parameters=hyper)
    for name in module_names:  # the reading process has no Lightning
        monkeypatch.delitem(sys.modules, name)
    done = cli("import-checkpoint", checkpoint, "--out", tmp_path / "m.safetensors", "--level", "level2")
    assert done.returncode == 0, done.stderr
    assert load_artifact(tmp_path / "m.safetensors").classes == CLASSES


class Payload:
    """What a malicious checkpoint would carry: unpickling it runs code (here: makes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_refusals_name_the_file_and_the_reason(tmp_path):
    model = research_model(2)
    out = tmp_path / "m.safetensors"
    marker = tmp_path / "code-ran"
    evil = write_checkpoint(tmp_path / "evil.ckpt", model, hyper_parameters={"idx_to_class": Payload(marker)})
    message = one_line_error(cli("import-checkpoint", evil, "--out", out, "--level", "level2"))
    assert message.startswith(f"{evil}: refused, reading it would unpickle code (")
    assert message.endswith("); only tensors, numbers, strings and plain containers are read")
    assert not marker.exists() and not out.exists()

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    assert one_line_error(cli("import-checkpoint", text, "--out", out, "--level", "level2")) == (
        f"{text}: not a readable PyTorch checkpoint (neither torch.save's zip archive nor its older pickle)")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(evil.read_bytes()[:5000])  # a copy that stopped half-way
    assert one_line_error(cli("import-checkpoint", cut, "--out", out, "--level", "level2")).startswith(
        f"{cut}: not a readable PyTorch checkpoint (")

    state = research_state_dict(model)
    del state["model.rits_b.out.bias"]
    state["model.rits_b.hist_reg.weight"] = torch.zeros(7, 99)
    broken = write_checkpoint(tmp_path / "broken.ckpt", model, state_dict=state)
    assert one_line_error(cli("import-checkpoint", broken, "--out", out, "--level", "level2")) == (
        f"{broken}: not the LitBRITS layout (model.rits_b.hist_reg.weight (7, 99), expected (7, 100); "
        "model.rits_b.out.bias missing)")

    state = research_state_dict(model)
    state["model.rits_f.feat_reg.m"] = torch.ones(7, 7)
    odd = write_checkpoint(tmp_path / "odd.ckpt", model, state_dict=state)
    assert one_line_error(cli("import-checkpoint", odd, "--out", out, "--level", "level2")) == (
        f"{odd}: model.rits_f.feat_reg.m is not the ones minus identity the research layers use")

    good = write_checkpoint(tmp_path / "good.ckpt", model, hyper_parameters=["not", "a", "mapping"])
    assert one_line_error(cli("import-checkpoint", good, "--out", out, "--level", "level2")) == (
        f"{good}: no hyper_parameters['idx_to_class'] to give the class order; pass --classes")
    assert one_line_error(cli("import-checkpoint", good, "--out", out, "--level", "level2", "--classes", "a,b")) == (
        f"{good}: 2 class names for an output layer of 6 classes")
    assert one_line_error(cli("import-checkpoint", good, "--out", out, "--level", "level2", "--classes",
                              ",".join(CLASSES), "--ancillary", "longitude,latitude")) == (
        f"--ancillary names 2 variables, {good} takes 5")
    assert one_line_error(cli("import-checkpoint", good, "--out", out, "--level", "level2", "--classes",
                              ",".join(CLASSES), "--ancillary", "longitude,latitude,altitude,slope,rain")) == (
        "--ancillary: unknown variable(s) rain (known: longitude, latitude, altitude, slope, precipitation, "
        "evapotranspiration, temperature_ave, temperature_max, temperature_min)")
    assert one_line_error(cli("import-checkpoint", good, "--out", out, "--level", "../level2", "--classes",
                              ",".join(CLASSES))) == (
        f"{out}: level '../level2' is not a safe name (letters, digits, _ . -; at most 64 characters)")
    assert not out.exists() and not list(tmp_path.glob(".m.safetensors*")), "nothing half-written"
    out.write_text("someone's model")
    assert one_line_error(cli("import-checkpoint", good, "--out", out, "--level", "level2", "--classes",
                              ",".join(CLASSES))) == f"{out} exists; pass --overwrite to replace it"
    assert out.read_text() == "someone's model"
