"""BRITS for abundance estimation with ancillary data (Rodriguez-Ortega et al., JSTARS 2024).

Two RITS passes (forward and time-reversed). At every step each pass regresses the
current observation from its history (history regression) and from the other bands
(feature regression), combines both with a weight driven by the temporal decay of the time
since the last observation, feeds the gap-filled value plus the mask to an LSTM cell, and
decays its hidden state by that same time gap. The last hidden state is concatenated with
an embedding of the ancillary vector and projected to K classes; a softmax gives the
abundances. Output = mean of both passes; their disagreement is the uncertainty.

Everything is batched over pixels and both directions; the only Python loop is over the 12
time steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msmtu_batch.model.recurrence import FusedRecurrence


@dataclass(frozen=True)
class BritsConfig:
    """Architecture hyperparameters (stored in the model artifact)."""

    n_classes: int
    n_ancillary: int = 0
    n_features: int = 7
    n_steps: int = 12
    hidden: int = 100
    embed: int = 50
    head_hidden: int = 100
    dropout: float = 0.1
    # How an imported research-code model computes (msmtu_batch.model.research_checkpoint):
    # its combination weight alpha is the linear layer's output as is, and its loaders give the
    # backward pass the forward-order deltas. Models trained here use a sigmoid and each
    # direction's own deltas.
    combine_activation: str = "sigmoid"  # or "identity"
    backward_deltas: str = "reversed"  # or "forward_order"

    def __post_init__(self) -> None:
        for name, allowed in FORMULATION_OPTIONS.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: expected {' or '.join(allowed)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def formulation(self) -> dict[str, str]:
        """The settings a fine-tuned child keeps from its parent besides the sizes."""
        return {name: getattr(self, name) for name in FORMULATION_OPTIONS}


FORMULATION_OPTIONS: dict[str, tuple[str, ...]] = {"combine_activation": ("sigmoid", "identity"),
                                                   "backward_deltas": ("reversed", "forward_order")}


class TemporalDecay(nn.Module):
    """gamma = exp(-relu(W delta + b)); diagonal W for the input decay (per feature)."""

    def __init__(self, n_in: int, n_out: int, diagonal: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out))
        self.register_buffer("mask", torch.eye(n_in) if diagonal else torch.ones(n_out, n_in),
                             persistent=False)
        bound = 1.0 / math.sqrt(n_out)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.exp(-F.relu(F.linear(delta, self.weight * self.mask, self.bias)))


class FeatureRegression(nn.Module):
    """Each band regressed from the other bands at the same step (zero diagonal)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, n))
        self.bias = nn.Parameter(torch.empty(n))
        self.register_buffer("mask", 1.0 - torch.eye(n), persistent=False)
        bound = 1.0 / math.sqrt(n)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class RITS(nn.Module):
    """One direction's parameters: recurrent imputation plus the abundance head. :class:`BRITS`
    runs both directions' recurrences together."""

    def __init__(self, cfg: BritsConfig) -> None:
        super().__init__()
        f, h = cfg.n_features, cfg.hidden
        self.hidden = h
        self.decay_hidden = TemporalDecay(f, h, diagonal=False)
        self.decay_input = TemporalDecay(f, f, diagonal=True)
        self.history_regression = nn.Linear(h, f)
        self.feature_regression = FeatureRegression(f)
        self.combine = nn.Linear(2 * f, f)
        self.cell = nn.LSTMCell(2 * f, h)
        self.ancillary_embedding = (nn.Sequential(nn.Linear(cfg.n_ancillary, cfg.embed), nn.ReLU())
                                    if cfg.n_ancillary else None)
        head_in = h + (cfg.embed if cfg.n_ancillary else 0)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(head_in, cfg.head_hidden), nn.ReLU(),
                                  nn.Linear(cfg.head_hidden, cfg.n_classes))

    def logits(self, hidden: torch.Tensor, ancillary: torch.Tensor | None) -> torch.Tensor:
        """Class logits (B, K) from the last hidden state and the ancillary vector."""
        if self.ancillary_embedding is not None:
            hidden = torch.cat([hidden, self.ancillary_embedding(ancillary)], dim=1)
        return self.head(hidden)


@dataclass
class BritsOutput:
    abundance: torch.Tensor  # (B, K), mean of both directions
    forward_abundance: torch.Tensor
    backward_abundance: torch.Tensor
    imputed: torch.Tensor  # (B, T, F), standardised units, mean of both directions
    impute_loss: torch.Tensor
    consistency_loss: torch.Tensor

    @classmethod
    def of_directions(cls, logits_f: torch.Tensor, logits_b: torch.Tensor, imputed_f: torch.Tensor,
                      imputed_b: torch.Tensor, impute_loss: torch.Tensor, with_loss: bool) -> BritsOutput:
        """Both directions' results (the backward imputations back in time order) combined."""
        p_f, p_b = torch.softmax(logits_f, dim=1), torch.softmax(logits_b, dim=1)
        consistency = (imputed_f - imputed_b).abs().mean() if with_loss else imputed_f.new_zeros(())
        return cls(0.5 * (p_f + p_b), p_f, p_b, 0.5 * (imputed_f + imputed_b), impute_loss, consistency)

    @property
    def uncertainty(self) -> torch.Tensor:
        """Total-variation distance between the two directions' abundances, in [0, 1]."""
        return 0.5 * (self.forward_abundance - self.backward_abundance).abs().sum(dim=1)


class BRITS(nn.Module):
    def __init__(self, cfg: BritsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.forward_pass = RITS(cfg)
        self.backward_pass = RITS(cfg)
        # training on a CPU runs the recurrence with its hand-written backward (FusedRecurrence)
        self.fused_recurrence = True

    def _stacked(self, weight: Callable[[RITS], torch.Tensor]) -> torch.Tensor:
        """One weight of both directions, stacked (2, ...), for batched products over them."""
        return torch.stack([weight(self.forward_pass), weight(self.backward_pass)])

    def _weights(self, layer: Callable[[RITS], nn.Module], sign: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Both directions' ``layer`` (a linear map, masked where it has a mask) as a weight
        (2, N_in, N_out) and a bias (2, 1, N_out), times ``sign``."""
        return (self._stacked(lambda r: (layer(r).weight * getattr(layer(r), "mask", 1.0)).t() * sign),
                self._stacked(lambda r: layer(r).bias[None] * sign))

    def _linear(self, x: torch.Tensor, layer: Callable[[RITS], nn.Module], sign: float = 1.0) -> torch.Tensor:
        """Each direction's ``layer`` applied to its half of ``x`` (2, ..., N_in), in one batched
        product; times ``sign``."""
        weight, bias = self._weights(layer, sign)
        return torch.baddbmm(bias, x.flatten(1, -2), weight).view(*x.shape[:-1], -1)

    def _decay(self, deltas: torch.Tensor, decay: Callable[[RITS], TemporalDecay]) -> torch.Tensor:
        """:class:`TemporalDecay` of both directions: exp(-relu(z)) as exp(min(-z, 0)), the sign
        on the weights rather than on the (2, T, B, H) values."""
        return torch.exp(self._linear(deltas, decay, -1.0).clamp(max=0))

    @staticmethod
    def _recurrence(values_both: torch.Tensor, missing: torch.Tensor, decay_hidden: torch.Tensor,
                    alpha: torch.Tensor, mask_and_one: torch.Tensor, gate_weight: torch.Tensor,
                    history_weight: torch.Tensor, history_bias: torch.Tensor, feature_weight: torch.Tensor,
                    feature_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Both directions' recurrence in tensor operations (any device, under autograd): the
        history estimates, feature regressions, their combinations and the gap-filled series
        (each (2, T, B, F)), and the last hidden state (2, B, H); the same function as
        :class:`~msmtu_batch.model.recurrence.FusedRecurrence`."""
        hidden = gate_weight.shape[2] // 4
        h = values_both.new_zeros(2, values_both.shape[2], hidden)
        c = torch.zeros_like(h)
        hist, feat, comb, imputed = [], [], [], []
        # unbind, not [:, t]: indexing makes autograd zero-fill a gradient of the whole tensor per step
        for x, gap, decay, a, mask_one in zip(*(t.unbind(1) for t in (values_both, missing, decay_hidden, alpha,
                                                                      mask_and_one))):
            h = h * decay
            x_hist = torch.baddbmm(history_bias, h, history_weight)
            z_feat = torch.baddbmm(feature_bias, torch.addcmul(x, gap, x_hist), feature_weight)
            x_comb = torch.lerp(x_hist, z_feat, a)
            x_filled = torch.addcmul(x, gap, x_comb)
            gates = torch.bmm(torch.cat([x_filled, mask_one, h], dim=2), gate_weight)
            # split, not slices: a slice's gradient is a zero-filled copy of the whole
            sigmoid_gates, g = gates.split([3 * hidden, hidden], dim=2)
            i, f, o = torch.sigmoid(sigmoid_gates).chunk(3, dim=2)
            c = torch.addcmul(f * c, i, torch.tanh(g))
            h = o * torch.tanh(c)
            hist.append(x_hist)
            feat.append(z_feat)
            comb.append(x_comb)
            imputed.append(x_filled)
        return (*(torch.stack(estimate, dim=1) for estimate in (hist, feat, comb, imputed)), h)

    def forward(self, values: torch.Tensor, masks: torch.Tensor, deltas_forward: torch.Tensor,
                deltas_backward: torch.Tensor, ancillary: torch.Tensor | None = None,
                with_loss: bool = True) -> BritsOutput:
        """``values``/``masks``: (B, T, F) standardised with 0 at gaps; deltas per direction
        (the backward ones computed on the time-reversed masks); ``ancillary`` (B, A).

        Both directions run in one recurrence, their tensors stacked time-major (2, T, B, ...)
        and their products batched, and what does not depend on the hidden state (decays,
        combination weight, the mask's part of the gates) is computed for all steps at once: a
        training step is per-operation costs far more than arithmetic, so fewer, larger
        operations make it faster (the research code's formulation, one direction and one small
        operation after another: ``msmtu_batch.bench.ResearchBRITS``). Training on a CPU goes
        further: the recurrence, the hidden state's decay included, runs as
        :class:`~msmtu_batch.model.recurrence.FusedRecurrence` (Numba passes between GEMMs, a
        hand-written backward), unless ``fused_recurrence`` is set False."""
        hidden = self.forward_pass.hidden
        if self.cfg.backward_deltas == "forward_order":
            deltas_backward = deltas_forward
        both = lambda series, reversed_series: torch.stack([series.transpose(0, 1),  # noqa: E731
                                                            reversed_series.transpose(0, 1)])
        masks_both = both(masks, masks.flip(1))  # (2, T, B, F), each in its direction's time order
        values_both = both(values, values.flip(1)) * masks_both
        deltas_both = both(deltas_forward, deltas_backward)
        decay_input = self._decay(deltas_both, lambda r: r.decay_input)
        alpha = self._linear(torch.cat([decay_input, masks_both], dim=3), lambda r: r.combine)
        if self.cfg.combine_activation == "sigmoid":
            alpha = torch.sigmoid(alpha)
        # gates = [x_filled, mask, 1, h] @ W, the biases in W's row for the 1 (as in the fused
        # engine): one product per step, no bias to copy in; the gates in the order i, f, o, g,
        # so that one sigmoid covers three of them
        def gate_rows(r: RITS) -> torch.Tensor:
            rows = torch.cat([r.cell.weight_ih, (r.cell.bias_ih + r.cell.bias_hh)[:, None], r.cell.weight_hh], 1)
            return torch.cat([rows[:2 * hidden], rows[3 * hidden:], rows[2 * hidden:3 * hidden]]).t()

        gate_weight = self._stacked(gate_rows)
        history_weight = self._stacked(lambda r: r.history_regression.weight.t())
        history_bias = self._stacked(lambda r: r.history_regression.bias[None])
        feature_weight = self._stacked(lambda r: (r.feature_regression.weight * r.feature_regression.mask).t())
        feature_bias = self._stacked(lambda r: r.feature_regression.bias[None])
        missing = 1 - masks_both

        if self.fused_recurrence and with_loss and torch.is_grad_enabled() and values.device.type == "cpu" \
                and values.dtype in (torch.float32, torch.float64):
            hist, feat, comb, filled, h = FusedRecurrence.apply(
                values_both, missing, deltas_both, alpha, *self._weights(lambda r: r.decay_hidden, -1.0), gate_weight,
                history_weight, history_bias, feature_weight, feature_bias)
        else:
            decay_hidden = self._decay(deltas_both, lambda r: r.decay_hidden)
            mask_and_one = torch.cat([masks_both, masks_both.new_ones(*masks_both.shape[:3], 1)], dim=3)
            hist, feat, comb, filled, h = self._recurrence(values_both, missing, decay_hidden, alpha, mask_and_one,
                                                           gate_weight, history_weight, history_bias, feature_weight,
                                                           feature_bias)
        loss = values.new_zeros(())
        if with_loss:  # masked L1 of the three estimates, normalised per step as in BRITS, mean of directions
            observed = masks_both.sum(dim=(2, 3)) + 1e-5  # (2, T)
            for estimate in (hist, feat, comb):
                error = ((estimate - values_both).abs() * masks_both).sum(dim=(2, 3))
                loss = loss + (error / observed).sum()
            loss = loss / (2 * 3 * values.shape[1])
        return BritsOutput.of_directions(self.forward_pass.logits(h[0], ancillary),
                                         self.backward_pass.logits(h[1], ancillary),
                                         filled[0].transpose(0, 1), filled[1].flip(0).transpose(0, 1), loss,
                                         with_loss)


@dataclass(frozen=True)
class LossWeights:
    label: float = 0.75
    impute: float = 0.25
    consistency: float = 0.1


def brits_loss(out: BritsOutput, target: torch.Tensor, weights: LossWeights = LossWeights(),
               hierarchy: torch.Tensor | None = None, class_weights: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """label x squared error of abundances (summed over classes, mean over pixels, both
    directions) + impute x masked L1 + consistency x |forward - backward imputations|; the
    parts detached, left on the device (reading them waits for a GPU's queue). With a
    ``hierarchy`` matrix (fine, coarse) the label term also holds the same error of the
    coarse level's abundances (sums of the fine ones) against the sums of the target; with
    ``class_weights`` (K,) each class's squared error is weighted (the fine level's only)."""
    def squared_error(matrix: torch.Tensor | None, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        project = (lambda a: a) if matrix is None else (lambda a: a @ matrix)
        wanted = project(target)
        return 0.5 * ((weight * (project(out.forward_abundance) - wanted) ** 2).sum(dim=1).mean()
                      + (weight * (project(out.backward_abundance) - wanted) ** 2).sum(dim=1).mean())

    label = squared_error(None, 1.0 if class_weights is None else class_weights)
    parts = {"label": label.detach()}
    if hierarchy is not None:
        coarse = squared_error(hierarchy)
        parts["label_coarse"] = coarse.detach()
        label = label + coarse
    total = weights.label * label + weights.impute * out.impute_loss \
        + weights.consistency * out.consistency_loss
    return total, parts | {"impute": out.impute_loss.detach(), "consistency": out.consistency_loss.detach()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def as_tensor(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
