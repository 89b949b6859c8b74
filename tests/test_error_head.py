"""The expected-error head: its kernel against scikit-learn, its calibration, its checks on load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingRegressor

from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.artifact import ArtifactError, load_artifact, save_artifact
from msmtu_batch.model.error_head import ErrorHead, error_features, tree_arrays
from msmtu_batch.model.inference import predict
from msmtu_batch.model.train import TrainConfig, train
from msmtu_batch.runtime.digests import with_checksum


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(30, 400), n_features=st.integers(1, 12),
       missing=st.sampled_from([0.0, 0.1, 0.5]), trees=st.integers(1, 20), leaves=st.sampled_from([31, 64, 65, 90]))
def test_kernel_equals_scikit_learn(seed, n, n_features, missing, trees, leaves):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, n_features)).round(1)  # values on the thresholds too
    target = np.nan_to_num(features[:, 0]) ** 2 + rng.normal(size=n)
    features[rng.random(features.shape) < missing] = np.nan
    fitted = HistGradientBoostingRegressor(max_iter=trees, max_leaf_nodes=leaves, min_samples_leaf=2,
                                           early_stopping=False, random_state=0).fit(features, target)
    head = ErrorHead(**tree_arrays(fitted), n_features=n_features, offset=0.0, scale=1.0, residual_variance=0.0)
    unseen = rng.normal(scale=2, size=(97, n_features))
    unseen[rng.random(unseen.shape) < missing] = np.nan
    unseen[::7] = np.array([-np.inf, np.inf] * n_features)[:n_features]
    split = head.is_leaf == 0  # each split's own threshold in its feature: where <= and < differ
    on_thresholds = rng.normal(size=(split.sum(), n_features))
    on_thresholds[np.arange(split.sum()), head.feature[split]] = head.threshold[split]
    for x in (features, unseen, on_thresholds):
        np.testing.assert_allclose(head.score(x), fitted.predict(x), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(head.score(x), head.score(x, by_bitvectors=False))  # the same sums
    assert (head._bitvectors is not None) == (np.add.reduceat(head.is_leaf, head.roots).max() <= 64)


def test_bitvectors_cover_every_tree_up_to_64_leaves_and_no_damaged_one():
    # root 0 splits feature 0 at 0.5: left node 1, right leaf 2; node 1 splits feature 1 at 0: leaves 3 and 4
    tree = {"feature": np.array([0, 1, 0, 0, 0], np.int32), "threshold": np.array([0.5, 0.0, 0, 0, 0]),
            "missing_left": np.zeros(5, np.uint8), "left": np.array([1, 3, 0, 0, 0], np.int32),
            "right": np.array([2, 4, 0, 0, 0], np.int32), "is_leaf": np.array([0, 0, 1, 1, 1], np.uint8),
            "value": np.array([0, 0, 2.0, 3.0, 4.0]), "roots": np.array([0], np.int32)}
    head = ErrorHead(**tree, baseline=0.5, n_features=2, offset=0.0, scale=1.0, residual_variance=0.0)
    x = np.array([[0.5, 0.0], [0.5, 0.1], [0.6, -9], [np.nan, 1]])
    starts, thresholds, trees, masks, all_leaves, offsets, values = head._bitvectors
    assert starts.tolist() == [0, 1, 2] and thresholds.tolist() == [0.5, 0.0] and all_leaves.tolist() == [0b111]
    assert trees.tolist() == [0, 0] and offsets.tolist() == [0]
    assert masks.tolist() == [2 ** 64 - 1 - 0b011, 2 ** 64 - 1 - 0b001] and values.tolist() == [3.0, 4.0, 2.0]
    assert head.score(x).tolist() == [3.5, 4.5, 2.5, 2.5]  # a missing value goes right here (missing_left 0)
    shared = ErrorHead(**tree | {"right": np.array([3, 4, 0, 0, 0], np.int32)}, baseline=0.5, n_features=2,
                       offset=0.0, scale=1.0, residual_variance=0.0)  # leaf 3 under both splits: walked
    assert shared._bitvectors is None and shared.score(x).tolist() == [3.5, 4.5, 3.5, 3.5]


def test_calibration_gives_the_mean_error_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6000, 5))
    errors = np.exp(-3 + 0.8 * features[:, 0] + 0.3 * rng.normal(size=6000))  # log-normal around a trend
    calibration = np.arange(6000) >= 4000
    head = ErrorHead.fit(features, errors, calibration)
    score = head.score(features)
    expected = np.exp(head.offset + head.scale * score + 0.5 * head.residual_variance)
    assert head.scale > 0 and spearmanr(expected, score).statistic == pytest.approx(1.0)
    fresh = rng.normal(size=(6000, 5))
    fresh_errors = np.exp(-3 + 0.8 * fresh[:, 0] + 0.3 * rng.normal(size=6000))
    fresh_expected = np.exp(head.offset + head.scale * head.score(fresh) + 0.5 * head.residual_variance)
    assert spearmanr(fresh_expected, fresh_errors).statistic > 0.85
    assert fresh_expected.mean() == pytest.approx(fresh_errors.mean(), rel=0.05)


def test_error_features():
    abundance = np.array([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]], np.float32)
    got = error_features(abundance, np.array([0.1, 0.2]), np.array([1.0, 0.5]), np.array([[3.0], [4.0]]))
    entropy = [0.0, -(0.5 * np.log(0.5) + 0.5 * np.log(0.25))]
    np.testing.assert_allclose(got, np.column_stack([[0.1, 0.2], entropy, [1.0, 0.5], [1.0, 0.5], abundance,
                                                     [3.0, 4.0]]), atol=1e-9)


@pytest.fixture(scope="module")
def trained(region, tmp_path_factory):
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    result = train(pixels, "level2", TrainConfig(epochs=2, hidden=16, embed=8, head_hidden=16, batch_size=256))
    return pixels, save_artifact(result.artifact, tmp_path_factory.mktemp("model") / "m.safetensors")


def test_training_fits_a_head_that_survives_the_artifact(trained):
    pixels, path = trained
    artifact = load_artifact(path)
    head = artifact.error_head
    assert head is not None and len(head.roots) == 100 and head.scale > 0
    test = pixels.split("test")
    inputs = artifact.inputs(test)
    out = predict(artifact.model, inputs, imputed=False)
    expected = head.expected_error(out["abundance"], out["uncertainty"], test.masks.mean(axis=(1, 2)),
                                   inputs.ancillary)
    assert expected.dtype == np.float32 and (expected > 0).all()
    errors = np.sqrt(((out["abundance"] - test.abundance) ** 2).mean(axis=1))
    # a two-epoch model on a small region: the estimate still ranks the errors, at their scale
    assert spearmanr(expected, errors).statistic > 0.3
    assert 0.5 < expected.mean() / errors.mean() < 2
    no_head = train(pixels.subset(np.arange(0, len(pixels), 7)), "level2",
                    TrainConfig(epochs=1, hidden=8, embed=4, head_hidden=8, error_head=False))
    assert no_head.artifact.error_head is None


@pytest.mark.parametrize(("name", "change", "message"), [
    ("left", lambda a: np.concatenate([[0], a[1:]]).astype(a.dtype),  # the first root, a split, its own child
     "error head has a left child outside its tree or before its parent"),
    ("feature", lambda a: np.full_like(a, 999), "error head splits on a feature outside 0..22"),
    ("value", lambda a: np.full_like(a, np.nan), "error head has non-finite leaf values"),
    ("roots", lambda a: a[::-1].copy(), "error head roots must start at 0 and increase"),
])
def test_a_damaged_head_is_refused(trained, tmp_path, name, change, message):
    _, path = trained
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["msmtu_batch"])
    key = f"error_head.{name}"
    tensors[key] = torch.from_numpy(change(tensors[key].numpy()))
    damaged = tmp_path / "damaged.safetensors"  # damaged before it was written: its checksum agrees
    save_file(tensors, damaged, metadata={"msmtu_batch": json.dumps(with_checksum(meta, tensors))})
    with pytest.raises(ArtifactError) as caught:
        load_artifact(damaged)
    assert str(caught.value) == f"{damaged}: {message}"
