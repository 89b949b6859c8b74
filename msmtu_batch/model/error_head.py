"""The expected-error head: each pixel's expected abundance RMSE, learnt from the model's errors.

The forward/backward disagreement (``uncertainty``) ranks pixels by their actual error with a
Spearman correlation of about 0.48-0.60 on simulated regions; the entropy of the abundances
alone 0.62-0.74. After training, gradient-boosted trees (scikit-learn's
``HistGradientBoostingRegressor``) learn the logarithm of each training and validation pixel's
abundance RMSE from what the model says about the pixel (:data:`FEATURES`): 0.70-0.80 on test
pixels (benchmarks/NOTES.md, 2026-12-02). Their score is calibrated on the validation pixels
alone into an expected RMSE in abundance units (``log rmse = offset + scale x score`` by least
squares, the mean of that log-normal), so that a map's ``expected_error`` reads as "the
abundances here are off by about this much, as a root mean square over the classes".

The trees are stored in the model artifact as plain arrays (safetensors: nothing unpickled)
and evaluated by a Numba kernel, QuickScorer's bit vectors for eight pixels at a time rather
than a walk down every tree (the tests hold both to scikit-learn's own ``predict``); the
artifact's loader checks that every tree's children come after their parent, so a damaged
or crafted file cannot make the kernel loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from msmtu_batch.runtime.errors import MsmtuError

# per pixel, in this order, then the abundance of each class and each standardised ancillary value
FEATURES = ("uncertainty", "entropy", "largest_abundance", "valid_fraction")
TREES, LEARNING_RATE = 100, 0.1  # 100 x 0.1 and 300 x 0.05 rank the test pixels the same (NOTES)
_ARRAYS = {"feature": np.int32, "threshold": np.float64, "missing_left": np.uint8, "left": np.int32,
           "right": np.int32, "is_leaf": np.uint8, "value": np.float64, "roots": np.int32}
TENSOR_PREFIX = "error_head."


def error_features(abundance: np.ndarray, uncertainty: np.ndarray, valid_fraction: np.ndarray,
                   ancillary: np.ndarray) -> np.ndarray:
    """The head's inputs (n, 4 + K + A), float64: :data:`FEATURES`, the abundances (n, K) and the
    model's standardised ancillary inputs (n, A)."""
    abundance = np.asarray(abundance, np.float64)
    entropy = -(abundance * np.log(np.clip(abundance, 1e-12, 1.0))).sum(axis=1)
    return np.column_stack([np.asarray(uncertainty, np.float64), entropy, abundance.max(axis=1),
                            np.asarray(valid_fraction, np.float64), abundance, np.asarray(ancillary, np.float64)])


@numba.njit(nogil=True, cache=True)
def _walk(features, i, feature, threshold, missing_left, left, right, is_leaf, value, roots, baseline):
    """baseline + each tree's leaf value for pixel ``i``, walking every tree from its root:
    scikit-learn's rule (a missing value goes where the split sends missing values, else left
    when ``x <= threshold``)."""
    total = baseline
    for root in roots:
        node = root
        while not is_leaf[node]:
            x = features[i, feature[node]]
            go_left = missing_left[node] != 0 if np.isnan(x) else x <= threshold[node]
            node = left[node] if go_left else right[node]
        total += value[node]
    return total


@numba.njit(parallel=True, nogil=True, cache=True)
def _tree_sum(features, feature, threshold, missing_left, left, right, is_leaf, value, roots, baseline):
    """:func:`_walk` for every pixel."""
    n = features.shape[0]
    out = np.empty(n, np.float64)
    for i in numba.prange(n):
        out[i] = _walk(features, i, feature, threshold, missing_left, left, right, is_leaf, value, roots, baseline)
    return out


# the index of a 64-bit word's lowest set bit: that bit times a de Bruijn sequence, top 6 bits
_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
_LOWEST_BIT = np.zeros(64, np.int64)
for _bit in range(64):
    _LOWEST_BIT[((1 << _bit) * 0x03F79D71B4CB0A89 % 2 ** 64) >> 58] = _bit
PIXELS_PER_TASK = 256


LANES = 8  # pixels scored together: eight 64-bit leaf sets fill one AVX-512 register


@intrinsic
def _remove_leaves(typingctx, row, mask, split, x):
    """A split's ``mask`` applied to the leaf sets ``row`` (LANES uint64) of the lanes whose
    value (``x``, a tuple of LANES float64) is above its threshold ``split``: ``row &= mask``
    where ``split < x``, as one vector compare and one vector AND. Written in LLVM's vectors
    because from a Numba loop over the lanes LLVM kept eight scalar compares: the head's trees
    took 1.65 us a pixel that way, 0.99 this way and 1.80 one pixel at a time (AMD EPYC, one
    core)."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint64 and row.layout == "C"
            and x == types.UniTuple(types.float64, LANES)):
        return None

    def codegen(context, builder, signature, args):
        row_value, mask_value, split_value, x_value = args
        words_type, values_type = ir.VectorType(ir.IntType(64), LANES), ir.VectorType(ir.DoubleType(), LANES)
        data = context.make_array(signature.args[0])(context, builder, row_value).data
        pointer = builder.bitcast(data, words_type.as_pointer())
        values, splits, masks = (ir.Constant(t, None) for t in (values_type, values_type, words_type))
        for lane in range(LANES):
            index = ir.Constant(ir.IntType(32), lane)
            values = builder.insert_element(values, builder.extract_value(x_value, lane), index)
            splits = builder.insert_element(splits, split_value, index)
            masks = builder.insert_element(masks, mask_value, index)
        above = builder.fcmp_ordered("<", splits, values)
        kept = builder.select(above, masks, ir.Constant(words_type, [2 ** 64 - 1] * LANES))
        words = builder.load(pointer, align=8)
        builder.store(builder.and_(words, kept), pointer, align=8)
        return context.get_dummy_value()
    return types.none(row, mask, split, x), codegen


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _tree_sum_by_bitvectors(features, starts, thresholds, trees, masks, all_leaves, leaf_offsets, leaf_values,
                            lowest_bit, feature, threshold, missing_left, left, right, is_leaf, value, roots,
                            baseline):
    """:func:`_tree_sum` by QuickScorer (Lucchese et al., SIGIR 2015): per feature, the splits
    on it by increasing threshold (``starts`` delimit each feature's run); a pixel's value
    above a split's threshold sends it right, which removes the leaves left of that split from
    the tree's candidates (``masks``); the leftmost leaf that remains is where the walk ends.
    Pixels with a missing value are walked (their splits' direction is per node).

    :data:`LANES` pixels at a time (the vectorised QuickScorer, Lucchese et al., SIGIR 2016):
    each split up to the largest of their values is applied to the lanes whose value is above
    its threshold (:func:`_remove_leaves`, one vector operation), and the branch that ends a
    feature's run is taken once for the eight: 0.99 us a pixel against 1.80 one pixel at a
    time (the bench's error head, AMD EPYC, one core; benchmarks/NOTES.md)."""
    n, n_features = features.shape
    n_trees = len(leaf_offsets)
    out = np.empty(n, np.float64)
    for task in numba.prange((n + PIXELS_PER_TASK - 1) // PIXELS_PER_TASK):
        candidates = np.empty((n_trees, LANES), np.uint64)
        lanes = np.empty((n_features, LANES), np.float64)  # -inf: an empty or walked lane, never sent right
        walked = np.zeros(LANES, np.bool_)
        task_end = min(n, (task + 1) * PIXELS_PER_TASK)
        for first in range(task * PIXELS_PER_TASK, task_end, LANES):
            count = min(LANES, task_end - first)
            for lane in range(LANES):
                missing = lane >= count
                if not missing:
                    for f in range(n_features):
                        missing |= np.isnan(features[first + lane, f])
                    walked[lane] = missing
                for f in range(n_features):
                    lanes[f, lane] = -np.inf if missing else features[first + lane, f]
            for t in range(n_trees):
                for lane in range(LANES):
                    candidates[t, lane] = all_leaves[t]
            for f in range(n_features):
                # the lanes' values as a tuple of LANES: in registers, where no update can change them
                x = (lanes[f, 0], lanes[f, 1], lanes[f, 2], lanes[f, 3], lanes[f, 4], lanes[f, 5], lanes[f, 6],
                     lanes[f, 7])
                largest = lanes[f].max()
                for j in range(starts[f], starts[f + 1]):
                    split = thresholds[j]
                    if not split < largest:
                        break
                    _remove_leaves(candidates[trees[j]], masks[j], split, x)
            for lane in range(count):
                i = first + lane
                if walked[lane]:
                    out[i] = _walk(features, i, feature, threshold, missing_left, left, right, is_leaf, value, roots,
                                   baseline)
                    continue
                total = baseline
                for t in range(n_trees):
                    word = candidates[t, lane]
                    leftmost = lowest_bit[((word & (~word + np.uint64(1))) * _DE_BRUIJN) >> np.uint64(58)]
                    total += leaf_values[leaf_offsets[t] + leftmost]
                out[i] = total
    return out


def tree_arrays(trees) -> dict:
    """A fitted ``HistGradientBoostingRegressor``'s trees as the head's arrays (the nodes of
    each tree, its children's indices shifted to the whole array) and its baseline."""
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS if name != "roots"}
    roots, start = [], 0
    for (predictor,) in trees._predictors:  # one tree per iteration of a regression
        nodes = predictor.nodes
        roots.append(start)
        arrays["feature"].append(nodes["feature_idx"])
        arrays["threshold"].append(nodes["num_threshold"])
        arrays["missing_left"].append(nodes["missing_go_to_left"])
        arrays["left"].append(nodes["left"].astype(np.int64) + start)
        arrays["right"].append(nodes["right"].astype(np.int64) + start)
        arrays["is_leaf"].append(nodes["is_leaf"])
        arrays["value"].append(nodes["value"])
        start += len(nodes)
    parts = {name: np.concatenate(values).astype(_ARRAYS[name]) for name, values in arrays.items()}
    return parts | {"roots": np.array(roots, np.int32), "baseline": float(np.ravel(trees._baseline_prediction)[0])}


@dataclass(frozen=True)
class ErrorHead:
    """Trees (one node per array element, trees one after another from ``roots``) and the
    calibration of their score into an expected RMSE."""

    feature: np.ndarray
    threshold: np.ndarray
    missing_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    is_leaf: np.ndarray
    value: np.ndarray
    roots: np.ndarray
    baseline: float
    n_features: int
    offset: float  # log rmse = offset + scale x score (+ residual_variance / 2 for the mean)
    scale: float
    residual_variance: float

    @classmethod
    def fit(cls, features: np.ndarray, errors: np.ndarray, calibration: np.ndarray, seed: int = 0) -> ErrorHead:
        """Trees learning log ``errors`` (each pixel's abundance RMSE) from ``features``
        (:func:`error_features`) of all pixels; the calibration from the pixels where
        ``calibration`` is True (the validation pixels: the training pixels' errors are smaller)."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        log_errors = np.log(np.maximum(np.asarray(errors, np.float64), 1e-6))
        trees = HistGradientBoostingRegressor(max_iter=TREES, learning_rate=LEARNING_RATE, early_stopping=False,
                                              random_state=seed).fit(features, log_errors)
        head = cls(**tree_arrays(trees), n_features=features.shape[1], offset=0.0, scale=1.0, residual_variance=0.0)
        score, wanted = head.score(features[calibration]), log_errors[calibration]
        scale, offset = np.polyfit(score, wanted, 1) if len(wanted) > 1 and np.ptp(score) > 0 else (1.0, 0.0)
        if not scale > 0:  # a calibration that would reverse or flatten the ranking: keep the trees' own
            scale, offset = 1.0, float(np.mean(wanted - score))
        residual = wanted - (offset + scale * score)
        return replace(head, offset=float(offset), scale=float(scale),
                       residual_variance=float(np.mean(residual ** 2)) if len(residual) else 0.0)

    def score(self, features: np.ndarray, by_bitvectors: bool = True) -> np.ndarray:
        """The trees' estimate of log RMSE (n,): by :func:`_tree_sum_by_bitvectors` where every
        tree has at most 64 leaves (the same numbers, 3.3x as fast as walking the trees on the
        development VM: benchmarks/NOTES.md, 2026-12-07, tenth session), else (or without
        ``by_bitvectors``) by walking them."""
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"the error head takes {self.n_features} features per pixel, got {features.shape}")
        features = np.ascontiguousarray(features, np.float64)
        walk = (self.feature, self.threshold, self.missing_left, self.left, self.right, self.is_leaf, self.value,
                self.roots, self.baseline)
        if by_bitvectors and self._bitvectors is not None:
            return _tree_sum_by_bitvectors(features, *self._bitvectors, _LOWEST_BIT, *walk)
        return _tree_sum(features, *walk)

    @cached_property
    def _bitvectors(self) -> tuple[np.ndarray, ...] | None:
        """The splits ordered for :func:`_tree_sum_by_bitvectors` (starts, thresholds, trees,
        masks, each tree's full leaf set, leaf offsets, leaf values), or None where a tree has
        more than 64 leaves or a node that two parents share (a damaged file: walked instead)."""
        splits, all_leaves, leaf_offsets, leaf_values = [], [], [], []
        for tree, root in enumerate(self.roots):
            leaf_order, stack, visited = [], [int(root)], set()
            while stack:  # depth first, left before right: the leaves from left to right
                node = stack.pop()
                if node in visited:
                    return None
                visited.add(node)
                if self.is_leaf[node]:
                    leaf_order.append(node)
                else:
                    stack += [int(self.right[node]), int(self.left[node])]
            if len(leaf_order) > 64:
                return None
            first_leaf = {node: rank for rank, node in enumerate(leaf_order)}
            leaves_under = dict.fromkeys(leaf_order, 1)
            for node in sorted(visited - set(leaf_order), reverse=True):  # children come after their parent
                left, right = int(self.left[node]), int(self.right[node])
                first_leaf[node] = first_leaf[left]
                leaves_under[node] = leaves_under[left] + leaves_under[right]
                left_leaves = ((1 << leaves_under[left]) - 1) << first_leaf[left]
                splits.append((self.feature[node], self.threshold[node], tree, ~left_leaves % 2 ** 64))
            all_leaves.append((1 << len(leaf_order)) - 1)
            leaf_offsets.append(len(leaf_values))
            leaf_values += [self.value[node] for node in leaf_order]
        splits.sort(key=lambda split: (split[0], split[1]))
        features, thresholds, trees, masks = zip(*splits) if splits else ((), (), (), ())
        return (np.searchsorted(np.array(features, np.int64), np.arange(self.n_features + 1)),
                np.array(thresholds, np.float64), np.array(trees, np.int64), np.array(masks, np.uint64),
                np.array(all_leaves, np.uint64), np.array(leaf_offsets, np.int64), np.array(leaf_values, np.float64))

    def expected_error(self, abundance: np.ndarray, uncertainty: np.ndarray, valid_fraction: np.ndarray,
                       ancillary: np.ndarray) -> np.ndarray:
        """Each pixel's expected abundance RMSE (n,) float32, from the model's outputs for it."""
        score = self.score(error_features(abundance, uncertainty, valid_fraction, ancillary))
        return np.exp(self.offset + self.scale * score + 0.5 * self.residual_variance).astype(np.float32)

    # --- in the model artifact ---------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {TENSOR_PREFIX + name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))) for name in _ARRAYS}

    def metadata(self) -> dict:
        return {"features": [*FEATURES, "abundance of each class", "standardised ancillary values"],
                "n_features": self.n_features, "trees": len(self.roots), "baseline": self.baseline,
                "calibration": {"offset": self.offset, "scale": self.scale,
                                "residual_variance": self.residual_variance},
                "target": "log of the pixel's abundance RMSE over its classes"}

    @classmethod
    def from_artifact(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping, n_features: int,
                      where: str) -> ErrorHead:
        """The head stored in an artifact (``where`` names it in errors), checked so that the
        kernel can only read inside its arrays and always reaches a leaf."""
        def refuse(what: str) -> MsmtuError:
            return MsmtuError(f"{where}: error head {what}")

        try:
            arrays = {name: tensors[TENSOR_PREFIX + name].numpy() for name in _ARRAYS}
            calibration = meta["calibration"]
            numbers = {"baseline": float(meta["baseline"]), "offset": float(calibration["offset"]),
                       "scale": float(calibration["scale"]),
                       "residual_variance": float(calibration["residual_variance"])}
        except (KeyError, TypeError, ValueError) as exc:
            raise refuse(f"incomplete ({exc})") from None
        if meta.get("n_features") != n_features:
            raise refuse(f"takes {meta.get('n_features')!r} features per pixel; the model gives {n_features}")
        if not all(np.isfinite(v) for v in numbers.values()) or not numbers["scale"] > 0:
            raise refuse(f"calibration must be finite with a positive scale, found {numbers}")
        for name, dtype in _ARRAYS.items():
            if arrays[name].dtype != dtype or arrays[name].ndim != 1:
                raise refuse(f"array {name} must be 1-D {np.dtype(dtype).name}")
        nodes, roots = len(arrays["value"]), arrays["roots"]
        if any(len(arrays[name]) != nodes for name in _ARRAYS if name != "roots") or nodes == 0 or len(roots) == 0:
            raise refuse("arrays differ in length or are empty")
        ends = np.append(roots[1:], nodes)
        if roots[0] != 0 or np.any(ends <= roots):
            raise refuse("roots must start at 0 and increase")
        tree_end = np.repeat(ends, ends - roots)  # each node's tree's end
        inner = arrays["is_leaf"] == 0
        index = np.arange(nodes)
        for side in ("left", "right"):  # children after their parent, inside its tree: every walk ends
            child = arrays[side][inner]
            if np.any(child <= index[inner]) or np.any(child >= tree_end[inner]):
                raise refuse(f"has a {side} child outside its tree or before its parent")
        if np.any((arrays["feature"][inner] < 0) | (arrays["feature"][inner] >= n_features)):
            raise refuse(f"splits on a feature outside 0..{n_features - 1}")
        if not np.isfinite(arrays["value"]).all():
            raise refuse("has non-finite leaf values")
        return cls(**arrays, n_features=n_features, **numbers)
