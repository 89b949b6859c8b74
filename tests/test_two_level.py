"""One model for both levels: the hierarchy read and validated, the loss on both levels, the
coarse level the sums of the fine one, recorded in the artifact and scored by `evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from msmtu_batch.inputs.training_data import read_cube_reference, read_msmtu
from msmtu_batch.model.artifact import ArtifactError, load_artifact, save_artifact
from msmtu_batch.model.brits import brits_loss
from msmtu_batch.model.hierarchy import ClassHierarchy, HierarchyError, read_hierarchy_file
from msmtu_batch.model.inference import predict
from msmtu_batch.model.metrics import rmse
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.synthetic.simulate import CLASS_HIERARCHY, LEVEL1_CLASSES, LEVEL2_CLASSES
from tests.test_faults import cli, one_line_error

SMALL_MODEL = dict(hidden=16, embed=8, head_hidden=16)


@pytest.fixture(scope="module")
def two_level(region, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-level") / "two-level.safetensors"
    done = cli("train", "--cube", region.cube, "--reference", region.reference, "--level", "level2", "--out", out,
               "--hidden", "16", "--epochs", "3", "--device", "cpu", "--two-level")
    assert done.returncode == 0, done.stderr
    return out


def test_the_coarse_level_is_the_sum_of_each_parents_children(region, two_level):
    artifact = load_artifact(two_level)
    levels = artifact.hierarchy
    assert levels is not None and levels.level == "level1" and levels.classes == LEVEL1_CLASSES
    assert levels.parents == tuple(dict(CLASS_HIERARCHY)[c] for c in artifact.classes)
    pixels = read_cube_reference(region.cube, region.reference, "level2").split("test")
    abundance = predict(artifact.model, artifact.inputs(pixels), imputed=False)["abundance"]
    # the sums computed another way: pandas groups the columns by parent name
    by_parent = pd.DataFrame(abundance, columns=list(artifact.classes)).T.groupby(list(levels.parents)).sum().T
    np.testing.assert_allclose(levels.coarse(abundance), by_parent[list(levels.classes)].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(levels.coarse(abundance).sum(axis=1), 1.0, atol=1e-5)
    # and against the reference's own level-1 abundances for the same pixels
    truth = read_cube_reference(region.cube, region.reference, "level1").split("test")
    assert np.array_equal(truth.ids, pixels.ids)
    np.testing.assert_allclose(levels.coarse(pixels.abundance), truth.abundance, atol=1e-5)
    history = json.loads(two_level.with_suffix(".metrics.json").read_text())["history"]
    for record in history:  # early stopping on the mean of both levels' validation RMSE
        assert record["validation_rmse"] == pytest.approx(
            0.5 * (record["validation_rmse_level2"] + record["validation_rmse_level1"]), abs=1e-12)
        assert record["label_coarse"] > 0


def test_evaluate_scores_both_levels(region, two_level, tmp_path):
    done = cli("evaluate", "--model", two_level, "--cube", region.cube, "--reference", region.reference,
               "--level", "level2", "--out", tmp_path / "report", "--no-baselines")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    artifact = load_artifact(two_level)
    truth = read_cube_reference(region.cube, region.reference, "level1").split("test")
    pixels = read_cube_reference(region.cube, region.reference, "level2").split("test")
    coarse = artifact.hierarchy.coarse(predict(artifact.model, artifact.inputs(pixels), imputed=False)["abundance"])
    assert report["coarse_level"]["level"] == "level1"
    assert report["coarse_level"]["brits"]["rmse"] == pytest.approx(rmse(coarse, truth.abundance), rel=1e-5)
    assert "## level1 (sums of the model's classes)" in (tmp_path / "report" / "report.md").read_text()


def test_the_coarse_loss_is_the_squared_error_of_the_sums():
    torch.manual_seed(0)
    from msmtu_batch.model.brits import BritsOutput

    p_f, p_b = torch.softmax(torch.randn(5, 4), 1), torch.softmax(torch.randn(5, 4), 1)
    target = torch.softmax(torch.randn(5, 4), 1)
    out = BritsOutput(0.5 * (p_f + p_b), p_f, p_b, torch.zeros(5, 1, 1), torch.zeros(()), torch.zeros(()))
    matrix = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    _, parts = brits_loss(out, target, hierarchy=matrix)
    pairs = lambda a: torch.stack([a[:, 0] + a[:, 1], a[:, 2] + a[:, 3]], 1)  # noqa: E731
    expected = 0.5 * (((pairs(p_f) - pairs(target)) ** 2).sum(1).mean() + ((pairs(p_b) - pairs(target)) ** 2
                                                                            ).sum(1).mean())
    assert parts["label_coarse"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "label_coarse" not in brits_loss(out, target)[1]


def test_an_msmtu_folder_carries_its_hierarchy(region):
    pixels = read_msmtu(region.msmtu, "level2")
    hierarchy_file = region.msmtu / "labels" / "hierarchy.json"
    assert json.loads(hierarchy_file.read_text()) == dict(CLASS_HIERARCHY)
    result = train(pixels, "level2", TrainConfig(epochs=1, **SMALL_MODEL),
                   hierarchy=read_hierarchy_file(hierarchy_file, pixels.classes, "level2"))
    assert result.artifact.hierarchy.classes == LEVEL1_CLASSES


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2]", "{path}: expected a JSON object mapping each level2 class to its parent class, e.g. "
               '{{"urban": "artificial"}}'),
    ("{not json", "{path}: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (json.dumps({c: "all" for c in LEVEL2_CLASSES}), "{path}: every class has the parent all: a level of one class "
                                                     "says nothing"),
    (json.dumps({c: p for c, p in CLASS_HIERARCHY if c not in ("water", "urban")}),
     "{path}: no parent class for urban, water (classes of the training data at level2)"),
    (json.dumps(dict(CLASS_HIERARCHY) | {"vineyard": "agricultural"}),
     "{path}: names class(es) vineyard that the training data at level2 does not have"),
    (json.dumps(dict(CLASS_HIERARCHY) | {"urban": " "}), "{path}: expected a JSON object mapping each level2 class "
                                                         'to its parent class, e.g. {{"urban": "artificial"}}'),
])
def test_a_bad_hierarchy_file_is_refused_in_one_line(region, tmp_path, content, message):
    path = tmp_path / "hierarchy.json"
    path.write_text(content)
    out = tmp_path / "m.safetensors"
    refused = cli("train", "--cube", region.cube, "--reference", region.reference, "--level", "level2", "--out", out,
                  "--epochs", "1", "--hierarchy", path)
    assert one_line_error(refused) == message.format(path=path)
    assert not out.exists()


def test_no_hierarchy_in_the_data_is_named(region, tmp_path):
    """A reference store without the attribute: the one line says where it looked."""
    import shutil

    import zarr

    reference = tmp_path / "reference.zarr"
    shutil.copytree(region.reference, reference)
    group = zarr.open_group(str(reference), mode="r+")
    del group.attrs["hierarchy"]
    refused = cli("train", "--cube", region.cube, "--reference", reference, "--level", "level2", "--out",
                  tmp_path / "m.safetensors", "--epochs", "1", "--two-level")
    assert one_line_error(refused) == (f"no class hierarchy in the training data (looked for {reference} "
                                       "(attribute 'hierarchy')); pass --hierarchy FILE")
    with pytest.raises(HierarchyError, match="class hierarchy file not found"):
        read_hierarchy_file(tmp_path / "absent.json", LEVEL2_CLASSES, "level2")


def test_an_artifact_whose_hierarchy_does_not_fit_is_refused(two_level, tmp_path):
    artifact = load_artifact(two_level)
    artifact.hierarchy = ClassHierarchy("level1", ("a", "b"), ("a",) * 8 + ("b",))  # one parent short
    broken = save_artifact(artifact, tmp_path / "broken.safetensors")
    with pytest.raises(ArtifactError, match=r"broken.safetensors: hierarchy must give a level and one parent per "
                                            r"class \(10\)"):
        load_artifact(broken)
    artifact.hierarchy = ClassHierarchy("level1", ("b", "a"), ("a",) * 9 + ("b",))  # classes not in parent order
    with pytest.raises(ArtifactError, match=r"hierarchy classes \['b', 'a'\] are not the parents in order"):
        load_artifact(save_artifact(artifact, tmp_path / "order.safetensors"))


def test_run_writes_both_levels_consistent_by_construction(region, two_level, tmp_path):
    import warnings

    import xarray as xr

    out = tmp_path / "map.zarr"
    done = cli("run", "--cube", region.cube, "--model", two_level, "--out", out, "--chunk", "32", "--cog",
               tmp_path / "cog")
    assert done.returncode == 0, done.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(out)
    fine, coarse = ds["abundance"].load(), ds["abundance_level1"].load()
    assert coarse.dims == ("lulc_class_level1", "y", "x")
    assert list(ds["lulc_class_level1"].values) == list(LEVEL1_CLASSES)
    # the stored level-1 abundances are the sums of the stored level-2 ones, summed here by class name
    parents = dict(CLASS_HIERARCHY)
    sums = fine.groupby(xr.DataArray([parents[c] for c in fine["lulc_class"].values], dims="lulc_class",
                                     name="lulc_class_level1")).sum(skipna=False)
    np.testing.assert_allclose(coarse.values, sums.sel(lulc_class_level1=list(LEVEL1_CLASSES)).values, atol=1e-6)
    estimated = ds["quality_flag"].values != 1
    assert estimated.any() and np.isnan(coarse.values[:, ~estimated]).all()
    dominant = ds["dominant_class_level1"].values
    np.testing.assert_array_equal(dominant[estimated], coarse.values.argmax(axis=0)[estimated])
    assert np.isnan(dominant[~estimated]).all(), "no estimate: the fill value, decoded as NaN"
    assert ds["dominant_class_level1"].attrs["flag_meanings"] == " ".join(LEVEL1_CLASSES)
    # the COGs of the coarse level, read back with rasterio: band names, palette, the same values
    import rasterio

    year = ds.attrs["time_coverage_start"][:4]
    with rasterio.open(tmp_path / "cog" / f"abundance_level1_{year}.tif") as cog:
        assert cog.descriptions == LEVEL1_CLASSES
        np.testing.assert_array_equal(cog.read(), coarse.values)
    with rasterio.open(tmp_path / "cog" / f"dominant_class_level1_{year}.tif") as cog:
        assert cog.count == 1 and len(cog.colormap(1)) >= len(LEVEL1_CLASSES)
        np.testing.assert_array_equal(cog.read(1)[estimated], dominant[estimated])
    assert (tmp_path / "cog" / f"dominant_class_level1_{year}.tif.aux.xml").read_text().count("<Category>") == 5


# --- the research code's label options: class weights and hard labels (issue 15, part 6) ---------

def test_balanced_class_weights_are_inverse_shares_capped_at_ten_times_the_smallest():
    from msmtu_batch.model.train import balanced_class_weights

    target = np.array([[0.6, 0.3, 0.1, 0.0], [0.4, 0.5, 0.05, 0.05]], np.float32)  # shares .5 .4 .075 .025
    # by hand: 1/share = 2, 2.5, 13.33, 40 -> capped at 10 x 2 = 20 -> 2, 2.5, 13.33, 20; mean 9.4583
    expected = np.array([2.0, 2.5, 40 / 3, 20.0]) / np.mean([2.0, 2.5, 40 / 3, 20.0])
    np.testing.assert_allclose(balanced_class_weights(target), expected, rtol=1e-6)


def test_hard_labels_are_the_dominant_class_one_hot():
    from msmtu_batch.model.train import label_targets

    abundance = np.random.default_rng(0).dirichlet(np.ones(5), size=50).astype(np.float32)
    hard = label_targets(abundance, soft=False)
    frame = pd.DataFrame(abundance, columns=list("abcde"))
    expected = pd.get_dummies(frame.idxmax(axis=1)).reindex(columns=list("abcde"), fill_value=False)
    np.testing.assert_array_equal(hard, expected.to_numpy(np.float32))
    assert label_targets(abundance, soft=True) is not abundance and np.array_equal(
        label_targets(abundance, soft=True), abundance)


def test_class_weights_weight_each_classes_squared_error():
    from msmtu_batch.model.brits import BritsOutput

    torch.manual_seed(1)
    p_f, p_b = torch.softmax(torch.randn(6, 3), 1), torch.softmax(torch.randn(6, 3), 1)
    target = torch.softmax(torch.randn(6, 3), 1)
    out = BritsOutput(0.5 * (p_f + p_b), p_f, p_b, torch.zeros(6, 1, 1), torch.zeros(()), torch.zeros(()))
    weights = torch.tensor([0.5, 1.0, 1.5])
    _, parts = brits_loss(out, target, class_weights=weights)
    by_hand = sum(0.5 * float(((p[:, k] - target[:, k]) ** 2).mean()) * float(weights[k])
                  for p in (p_f, p_b) for k in range(3))
    assert parts["label"].item() == pytest.approx(by_hand, rel=1e-6)


def test_a_training_with_the_research_label_options_records_them(region, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("train:\n  class_weight: balanced\n  soft_labels: false\n")
    out = tmp_path / "m.safetensors"
    done = cli("train", "--cube", region.cube, "--reference", region.reference, "--level", "level2", "--out", out,
               "--hidden", "16", "--epochs", "1", "--device", "cpu", "--config", config)
    assert done.returncode == 0, done.stderr
    recorded = load_artifact(out).training["config"]
    assert recorded["class_weight"] == "balanced" and recorded["soft_labels"] is False
    config.write_text("train:\n  class_weight: heavy\n")
    message = one_line_error(cli("train", "--cube", region.cube, "--reference", region.reference, "--level",
                                 "level2", "--out", tmp_path / "n.safetensors", "--config", config))
    assert message.startswith("invalid configuration: class_weight: Input should be 'none' or 'balanced'")
