"""The BRITS recurrence for CPU training, with a hand-written backward (a ``torch.autograd.Function``).

Under autograd the recurrence is about twenty small tensor operations per time step forward
and as many backward; on a CPU their dispatch and their passes over memory cost more than the
LSTM's matrix products, the only real work. Here, as in the inference engine
(:mod:`msmtu_batch.model.inference`), each step forward is one Numba pass (the hidden state's
decay, the decayed state, the history and feature regressions, their combination and the gap
filling), one batched GEMM for both directions' gates and one Numba pass for the cell; each
step backward one Numba pass back through the cell, one GEMM for the gradient of the GEMM's
input, one for the gate weights' gradient, and one Numba pass back through the imputation.
The fp32 GEMMs go through oneDNN (:mod:`msmtu_batch.model.gemm`): on the development VM's AMD
EPYC, training took 10,271 pixels/s against 8,265 with torch.bmm's MKL (medians of four
alternating one-epoch trainings, benchmarks/NOTES.md, 2026-12-07, eighth session).
The batch is split into one tile of pixels per thread, each with one core for torch and
Numba, and during training steps torch's own operations stay on the calling thread
(:func:`steps_on_tiles`), so that no two thread pools hand the cores back and forth.

What stays under autograd in :meth:`msmtu_batch.model.brits.BRITS.forward`: the input decay
and the combination weight (F values per step, computed for all steps at once), the stacking
of the weights, the losses and the head. The tests hold this function to the model's own
recurrence: in float64 with exact activations to 1e-10, and compiled in float32 on outputs
and every parameter's gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import torch

from msmtu_batch.model.fastmath import decay_factor, fast_sigmoid, fast_tanh
from msmtu_batch.model.gemm import add_batched_product, batched_product

MIN_TILE = 64  # pixels: below this a thread's GEMMs are too small to be worth a thread
# The GEMM input's rows padded with zeros to a multiple of 8 (115 -> 120 at hidden 100): the
# three products per step ran 15-20 % faster (one core of the AMD EPYC VM, torch 2.13)
GEMM_ROWS_MULTIPLE = 8


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def _affine(bias, weights, vector):
    """bias + weights . vector"""
    total = bias
    for j in range(weights.shape[0]):
        total += weights[j] * vector[j]
    return total


@numba.njit(nogil=True, fastmath=True, error_model="numpy", cache=True)
def _step_input(t, p0, p1, values, missing, deltas, alpha, decay_weight, decay_bias, history_weight, history_bias,
                feature_weight, feature_bias, hidden, decay, gemm_input, history, feature, combined, filled,
                history_filled):
    """Step ``t``'s GEMM input for pixels p0:p1: [x_filled, mask, 1, decayed h] from the hidden
    state after step t - 1 (zero at t = 0) and its decay exp(min(W delta + b, 0)) (W and b
    stored negated), keeping the decay, the history estimate, the feature regression, their
    combination, the gap-filled series and the regression's input.

    Pixel-major: every array is (direction, step, pixel, feature), weights (direction, out, in)."""
    n_features, n_hidden = values.shape[3], decay.shape[3]
    offset = 2 * n_features + 1
    one, zero = np.float32(1.0), np.float32(0.0)
    for d in range(2):
        w_decay, b_decay = decay_weight[d], decay_bias[d]
        w_history, b_history = history_weight[d], history_bias[d]
        w_feature, b_feature = feature_weight[d], feature_bias[d]
        for p in range(p0, p1):
            row = gemm_input[d, t, p]
            state = row[offset:offset + n_hidden]  # the padding after it stays zero
            if t == 0:
                state[:] = zero
            else:
                h, gamma, delta = hidden[d, t - 1, p], decay[d, t, p], deltas[d, t, p]
                for j in range(n_hidden):
                    gamma[j] = b_decay[j]
                for k in range(n_features):
                    w, dk = w_decay[k], delta[k]
                    for j in range(n_hidden):
                        gamma[j] += w[j] * dk
                for j in range(n_hidden):
                    gamma[j] = decay_factor(gamma[j])
                    state[j] = h[j] * gamma[j]
            x, gap, a = values[d, t, p], missing[d, t, p], alpha[d, t, p]
            x_hist, x_c = history[d, t, p], history_filled[d, t, p]
            for k in range(n_features):
                x_hist[k] = _affine(b_history[k], w_history[k], state)
                x_c[k] = x[k] + gap[k] * x_hist[k]
            z, x_comb, x_filled = feature[d, t, p], combined[d, t, p], filled[d, t, p]
            for k in range(n_features):
                z[k] = _affine(b_feature[k], w_feature[k], x_c)
                x_comb[k] = x_hist[k] + a[k] * (z[k] - x_hist[k])
                x_filled[k] = x[k] + gap[k] * x_comb[k]
                row[k] = x_filled[k]
                row[n_features + k] = one - gap[k]
            row[2 * n_features] = one


@numba.njit(nogil=True, fastmath=True, error_model="numpy", cache=True)
def _cell(t, p0, p1, gates, activations, cell, hidden, zeros):
    """The LSTM update of step ``t`` from the pre-activations ``gates`` (direction, pixel, 4H;
    order i, f, o, g), keeping the activations, the cell and the hidden state. ``zeros``: the
    cell before the first step (H,)."""
    n_hidden = cell.shape[3]
    for d in range(2):
        for p in range(p0, p1):
            z, act = gates[d, p - p0], activations[d, t, p]
            c, h = cell[d, t, p], hidden[d, t, p]
            previous = cell[d, t - 1, p] if t > 0 else zeros
            for j in range(3 * n_hidden):
                act[j] = fast_sigmoid(z[j])
            for j in range(n_hidden):
                g = fast_tanh(z[3 * n_hidden + j])
                act[3 * n_hidden + j] = g
                c[j] = act[n_hidden + j] * previous[j] + act[j] * g
                h[j] = act[2 * n_hidden + j] * fast_tanh(c[j])


@numba.njit(nogil=True, fastmath=True, error_model="numpy", cache=True)
def _cell_backward(t, p0, p1, activations, cell, grad_hidden, grad_cell, grad_gates, zeros):
    """Gradients of step ``t``'s gate pre-activations from those of its hidden state and cell;
    ``grad_cell`` becomes the previous cell's."""
    n_hidden = cell.shape[3]
    one = np.float32(1.0)
    for d in range(2):
        for p in range(p0, p1):
            act, c, dz = activations[d, t, p], cell[d, t, p], grad_gates[d, t, p]
            previous = cell[d, t - 1, p] if t > 0 else zeros
            dh, dc = grad_hidden[d, p], grad_cell[d, p]
            for j in range(n_hidden):
                i, f, o, g = act[j], act[n_hidden + j], act[2 * n_hidden + j], act[3 * n_hidden + j]
                tanh_c = fast_tanh(c[j])
                total = dc[j] + dh[j] * o * (one - tanh_c * tanh_c)
                dz[j] = total * g * i * (one - i)
                dz[n_hidden + j] = total * previous[j] * f * (one - f)
                dz[2 * n_hidden + j] = dh[j] * tanh_c * o * (one - o)
                dz[3 * n_hidden + j] = total * i * (one - g * g)
                dc[j] = total * f


@numba.njit(nogil=True, fastmath=True, error_model="numpy", cache=True)
def _step_input_backward(t, p0, p1, grad_input, grad_history_out, grad_feature_out, grad_combined_out,
                         grad_filled_out, missing, alpha, decay, history, feature, history_weight, feature_weight,
                         hidden, grad_alpha, grad_decay, grad_history, grad_feature, grad_hidden, scratch):
    """Back through :func:`_step_input` for step ``t``: from the gradient of its GEMM input
    (direction, pixel, 2F + 1 + H) and those of its kept estimates (``grad_*_out``), the
    gradients of alpha, of the decay's pre-activation, of the history estimate and of the
    feature regression (for the weights' gradients), and ``grad_hidden``, that of the hidden
    state after step t - 1."""
    n_features, n_hidden = missing.shape[3], decay.shape[3]
    offset = 2 * n_features + 1
    one, zero = np.float32(1.0), np.float32(0.0)
    d_history_part, d_regression_input = scratch[0], scratch[1]
    for d in range(2):
        w_history, w_feature = history_weight[d], feature_weight[d]
        for p in range(p0, p1):
            d_in = grad_input[d, p - p0]
            gap, a, x_hist, z = missing[d, t, p], alpha[d, t, p], history[d, t, p], feature[d, t, p]
            d_alpha, d_hist, d_z = grad_alpha[d, t, p], grad_history[d, t, p], grad_feature[d, t, p]
            for k in range(n_features):
                d_filled = d_in[k] + grad_filled_out[d, t, p, k]
                d_comb = grad_combined_out[d, t, p, k] + gap[k] * d_filled
                d_alpha[k] = d_comb * (z[k] - x_hist[k])
                d_z[k] = grad_feature_out[d, t, p, k] + a[k] * d_comb
                d_history_part[k] = grad_history_out[d, t, p, k] + (one - a[k]) * d_comb
            for m in range(n_features):
                total = zero
                for k in range(n_features):
                    total += w_feature[k, m] * d_z[k]
                d_regression_input[m] = total
            for k in range(n_features):
                d_hist[k] = d_history_part[k] + gap[k] * d_regression_input[k]
            dh, gamma, d_gamma = grad_hidden[d, p], decay[d, t, p], grad_decay[d, t, p]
            for j in range(n_hidden):
                dh[j] = d_in[offset + j]
            for k in range(n_features):
                w, dk = w_history[k], d_hist[k]
                for j in range(n_hidden):
                    dh[j] += w[j] * dk
            if t == 0:  # the state before the first step is zero, and so its decay's gradient
                d_gamma[:] = zero
            else:
                h = hidden[d, t - 1, p]
                for j in range(n_hidden):  # exp(min(z, 0)): its derivative is itself below 1, else 0
                    d_gamma[j] = dh[j] * h[j] * gamma[j] if gamma[j] < one else zero
                    dh[j] *= gamma[j]


def warm_up() -> None:
    """Load the compiled kernels (about a second once per process, from Numba's disk cache) by
    one step of a one-pixel recurrence, so that a training's first step does not pay for it."""
    one = lambda *shape: torch.full(shape, 0.5, requires_grad=True)  # noqa: E731
    series = [torch.full((2, 1, 1, 1), 0.5) for _ in range(3)]
    outputs = FusedRecurrence.apply(*series, one(2, 1, 1, 1), one(2, 1, 1), one(2, 1, 1), one(2, 4, 4),
                                    one(2, 1, 1), one(2, 1, 1), one(2, 1, 1), one(2, 1, 1))
    sum(output.sum() for output in outputs).backward()


def _tiles(n: int, threads: int) -> list[tuple[int, int]]:
    """One contiguous range of pixels per thread (fewer when the batch is small)."""
    count = max(1, min(threads, n // MIN_TILE))
    bounds = np.linspace(0, n, count + 1).astype(int)
    return list(itertools.pairwise(bounds.tolist()))


_STEP_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("msmtu_step_threads", default=None)


@contextlib.contextmanager
def steps_on_tiles(enabled: bool) -> Iterator[None]:
    """Training steps on a CPU with :class:`FusedRecurrence` (when ``enabled``): torch's own
    operations on the calling thread alone, the recurrence's tiles on as many threads as torch
    had. After each parallel operation torch's OpenMP threads spin for milliseconds, taking a
    core from the tiles' threads; with the decays inside the recurrence what is left outside
    is small (a step of batch 512: 65 against 75 ms)."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    token = _STEP_THREADS.set(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _STEP_THREADS.reset(token)


def _one_core() -> None:
    torch.set_num_threads(1)
    numba.set_num_threads(1)


@functools.cache
def _tile_threads(count: int) -> ThreadPoolExecutor:
    """Threads kept for the whole process: a new thread's first GEMM sets up the BLAS library's
    per-thread buffers again (a fifth of the forward pass when every step made new threads)."""
    return ThreadPoolExecutor(count, thread_name_prefix="msmtu-recurrence", initializer=_one_core)


def _on_tiles(work, tiles: list[tuple[int, int]]) -> None:
    """``work(p0, p1)`` for every tile: each in its own thread with one core for torch and
    Numba, or on the calling thread when there is one tile."""
    if len(tiles) == 1:
        work(*tiles[0])
    else:
        list(_tile_threads(len(tiles)).map(lambda tile: work(*tile), tiles))


@dataclass
class _Workspace:
    """The recurrence's largest arrays (2, T, B, ...), kept from one training step to the next:
    fresh multi-MB buffers come from the kernel as new pages, and faulting them in cost as much
    as a fifth of a step."""

    gemm_input: torch.Tensor  # (2, T, B, 2F + 1 + H + zeros), each step's GEMM input
    activations: np.ndarray  # (2, T, B, 4H) the gates after their activations
    cell: np.ndarray  # (2, T, B, H)
    hidden: np.ndarray  # (2, T, B, H)
    decay: np.ndarray  # (2, T, B, H), the hidden state's
    grad_gates: torch.Tensor  # (2, T, B, 4H), of the gates' pre-activations
    grad_decay: torch.Tensor  # (2, T, B, H), of the decay's pre-activation
    key: tuple

    @classmethod
    def take(cls, steps: int, batch: int, n_features: int, n_hidden: int, dtype: torch.dtype) -> _Workspace:
        """A free workspace of this size, or a new one."""
        key = (steps, batch, n_features, n_hidden, dtype)
        free = _FREE_WORKSPACES.pop(key, None)  # one step (two trainings in threads may share the dict)
        if free is not None:
            return free
        rows = 2 * n_features + 1 + n_hidden
        new = lambda width: torch.empty(2, steps, batch, width, dtype=dtype)  # noqa: E731
        return cls(new(rows + -rows % GEMM_ROWS_MULTIPLE).zero_(), new(4 * n_hidden).numpy(),
                   new(n_hidden).numpy(), new(n_hidden).numpy(), new(n_hidden).numpy(), new(4 * n_hidden),
                   new(n_hidden), key)

    def give_back(self) -> None:
        """Free for the next step of this size; one per size, of the two sizes used last (an
        epoch's full batches and its last, smaller one)."""
        _FREE_WORKSPACES.pop(self.key, None)
        _FREE_WORKSPACES[self.key] = self
        while len(_FREE_WORKSPACES) > 2:
            _FREE_WORKSPACES.pop(next(iter(_FREE_WORKSPACES)))


_FREE_WORKSPACES: dict[tuple, _Workspace] = {}


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().numpy()


class FusedRecurrence(torch.autograd.Function):
    """Both directions' recurrence over all steps (CPU; float32, or float64 for the tests).

    Inputs (time-major, both directions stacked): ``values`` and ``missing`` (2, T, B, F) (values
    0 at gaps), ``deltas`` (2, T, B, F) and ``alpha`` (2, T, B, F) for every step; the weights as
    :meth:`BRITS.forward` lays them out: the hidden state's decay ``decay_weight`` (2, F, H) and
    ``decay_bias`` (2, 1, H), both negated; ``gate_weight`` (2, 2F + 1 + H, 4H) (rows x_filled,
    mask, 1, h; columns i, f, o, g), ``history_weight`` (2, H, F), ``history_bias`` (2, 1, F),
    ``feature_weight`` (2, F, F) (input, output) and ``feature_bias`` (2, 1, F). Returns the
    history estimates, feature regressions, their combinations and the gap-filled series (each
    (2, T, B, F)) and the last hidden state (2, B, H)."""

    @staticmethod
    def forward(ctx, values, missing, deltas, alpha, decay_weight, decay_bias, gate_weight, history_weight,
                history_bias, feature_weight, feature_bias):
        _, steps, batch, n_features = values.shape
        n_hidden = decay_weight.shape[2]
        x, gap, delta, a, w_decay = (_array(t) for t in (values, missing, deltas, alpha, decay_weight))
        w_history = _array(history_weight.transpose(1, 2))  # (2, F, H): one contiguous row per estimate
        w_feature = _array(feature_weight.transpose(1, 2))  # (2, F out, F in)
        b_decay, b_history, b_feature = (_array(b[:, 0]) for b in (decay_bias, history_bias, feature_bias))
        shape = (2, steps, batch)
        dtype = values.dtype
        space = _Workspace.take(steps, batch, n_features, n_hidden, dtype)
        weight = torch.zeros(2, space.gemm_input.shape[3], 4 * n_hidden, dtype=dtype)  # padded as the input
        weight[:, :gate_weight.shape[1]] = gate_weight.detach()
        # the history estimates, feature regressions, combinations, gap-filled series, regression inputs
        estimates = [torch.empty(*shape, n_features, dtype=dtype) for _ in range(5)]
        history, feature, combined, filled, history_filled = (e.numpy() for e in estimates)
        inputs = space.gemm_input.numpy()
        zeros = np.zeros(n_hidden, space.cell.dtype)

        def run(p0: int, p1: int) -> None:
            gates = torch.empty(2, p1 - p0, 4 * n_hidden, dtype=dtype)
            gates_np = gates.numpy()
            for t in range(steps):
                _step_input(t, p0, p1, x, gap, delta, a, w_decay, b_decay, w_history, b_history, w_feature,
                            b_feature, space.hidden, space.decay, inputs, history, feature, combined, filled,
                            history_filled)
                batched_product(space.gemm_input[:, t, p0:p1], weight, gates)
                _cell(t, p0, p1, gates_np, space.activations, space.cell, space.hidden, zeros)

        ctx.tiles = _tiles(batch, _STEP_THREADS.get() or torch.get_num_threads())
        _on_tiles(run, ctx.tiles)
        ctx.kept = (gap, delta, a, w_history, w_feature, history, feature)
        ctx.tensors = (estimates[4], weight)
        ctx.workspace = space
        ctx.gate_rows = gate_weight.shape[1]
        return (*estimates[:4], torch.from_numpy(space.hidden[:, -1].copy()))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_history_out, grad_feature_out, grad_combined_out, grad_filled_out, grad_last_hidden):
        gap, delta, a, w_history, w_feature, history, feature = ctx.kept
        history_filled_t, weight = ctx.tensors
        space = ctx.workspace
        if space is None:
            raise RuntimeError("FusedRecurrence: a second backward through the same graph (retain_graph) is not "
                               "supported; set model.fused_recurrence = False for that")
        _, steps, batch, n_features = gap.shape
        n_hidden = space.cell.shape[3]
        outer = [_array(g) for g in (grad_history_out, grad_feature_out, grad_combined_out, grad_filled_out)]
        weight_t = weight.transpose(1, 2).contiguous()
        shape = (2, steps, batch)
        grad_alpha_t, grad_history_t, grad_feature_t = (torch.empty(*shape, n_features, dtype=weight.dtype)
                                                        for _ in range(3))
        grad_alpha, grad_history, grad_feature = (t.numpy() for t in (grad_alpha_t, grad_history_t, grad_feature_t))
        grad_gates, grad_decay = space.grad_gates.numpy(), space.grad_decay.numpy()
        grad_hidden = np.array(_array(grad_last_hidden))  # a copy: it becomes each earlier state's
        grad_cell = np.zeros_like(grad_hidden)
        zeros = np.zeros(n_hidden, grad_hidden.dtype)

        grad_gate_weights = {tile: torch.zeros_like(weight) for tile in ctx.tiles}  # summed in tile order

        def run(p0: int, p1: int) -> None:
            grad_input_t = torch.empty(2, p1 - p0, space.gemm_input.shape[3], dtype=weight.dtype)
            grad_input = grad_input_t.numpy()
            grad_weight = grad_gate_weights[p0, p1]
            scratch = np.empty((2, n_features), grad_hidden.dtype)
            for t in range(steps - 1, -1, -1):
                _cell_backward(t, p0, p1, space.activations, space.cell, grad_hidden, grad_cell, grad_gates, zeros)
                step_grad_gates = space.grad_gates[:, t, p0:p1]
                batched_product(step_grad_gates, weight_t, grad_input_t)
                # the weight's gradient while this step's operands are in cache
                add_batched_product(grad_weight, space.gemm_input[:, t, p0:p1].transpose(1, 2), step_grad_gates)
                _step_input_backward(t, p0, p1, grad_input, *outer, gap, a, space.decay, history, feature, w_history,
                                     w_feature, space.hidden, grad_alpha, grad_decay, grad_history, grad_feature,
                                     grad_hidden, scratch)

        _on_tiles(run, ctx.tiles)
        grad_gate_weight = functools.reduce(torch.add, grad_gate_weights.values())[:, :ctx.gate_rows]
        rows = 2, steps * batch

        def product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            """sum over steps and pixels of left^T right, for (2, T, B, .) tensors; the smaller
            result dimension first (measured 4x faster for the history weight's)."""
            left, right = left.reshape(*rows, left.shape[3]), right.reshape(*rows, right.shape[3])
            if left.shape[2] <= right.shape[2]:
                return torch.bmm(left.transpose(1, 2), right)
            return torch.bmm(right.transpose(1, 2), left).transpose(1, 2)

        sums = lambda g: g.sum(dim=(1, 2))[:, None]  # noqa: E731  a bias's gradient (2, 1, N)
        grads = (product(torch.from_numpy(delta), space.grad_decay), sums(space.grad_decay),
                 grad_gate_weight,
                 product(space.gemm_input[..., 2 * n_features + 1:ctx.gate_rows], grad_history_t), sums(grad_history_t),
                 product(history_filled_t, grad_feature_t), sums(grad_feature_t))
        space.give_back()
        ctx.workspace = None  # another step's now: a second backward through this graph would read it
        return (None, None, None, grad_alpha_t, *grads)
