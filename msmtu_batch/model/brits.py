"""BRITS for abundance estimation with ancillary data (Rodriguez-Ortega et al., JSTARS 2024).

Two RITS passes (forward and time-reversed). At every step each pass regresses the
current observation from its history (history regression) and from the other bands
(feature regression), combines both with a weight driven by the temporal decay of the time
since the last observation, feeds the gap-filled value plus the mask to an LSTM cell, and
decays its hidden state by that same time gap. The last hidden state is concatenated with
an embedding of the ancillary vector and projected to K classes; a softmax gives the
abundances. Output = mean of both passes; their disagreement is the uncertainty.

Everything is batched over pixels; the only Python loop is over the 12 time steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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

    def to_dict(self) -> dict:
        return asdict(self)


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
    """One direction: recurrent imputation plus the abundance head."""

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

    def forward(self, values: torch.Tensor, masks: torch.Tensor, deltas: torch.Tensor,
                ancillary: torch.Tensor | None, with_loss: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (class logits (B, K), imputed series (B, T, F), masked L1 imputation loss)."""
        batch, steps, _ = values.shape
        # What does not depend on the hidden state is computed for all steps at once: the
        # decays and the combination weight come from the deltas and masks alone.
        decay_hidden = self.decay_hidden(deltas)
        alpha = torch.sigmoid(self.combine(torch.cat([self.decay_input(deltas), masks], dim=2)))
        h = values.new_zeros(batch, self.hidden)
        c = values.new_zeros(batch, self.hidden)
        hist, feat, comb, imputed = [], [], [], []
        for t in range(steps):
            x, m = values[:, t], masks[:, t]
            h = h * decay_hidden[:, t]
            x_hist = self.history_regression(h)
            z_feat = self.feature_regression(m * x + (1 - m) * x_hist)
            x_comb = alpha[:, t] * z_feat + (1 - alpha[:, t]) * x_hist
            x_filled = m * x + (1 - m) * x_comb
            h, c = self.cell(torch.cat([x_filled, m], dim=1), (h, c))
            hist.append(x_hist)
            feat.append(z_feat)
            comb.append(x_comb)
            imputed.append(x_filled)
        loss = values.new_zeros(())
        if with_loss:  # masked L1 of the three estimates, normalised per step as in BRITS
            observed = masks.sum(dim=(0, 2)) + 1e-5
            for estimate in (hist, feat, comb):
                error = ((torch.stack(estimate, dim=1) - values).abs() * masks).sum(dim=(0, 2))
                loss = loss + (error / observed).sum()
        features = h
        if self.ancillary_embedding is not None:
            features = torch.cat([h, self.ancillary_embedding(ancillary)], dim=1)
        return self.head(features), torch.stack(imputed, dim=1), loss / (3 * steps)


@dataclass
class BritsOutput:
    abundance: torch.Tensor  # (B, K), mean of both directions
    forward_abundance: torch.Tensor
    backward_abundance: torch.Tensor
    imputed: torch.Tensor  # (B, T, F), standardised units, mean of both directions
    impute_loss: torch.Tensor
    consistency_loss: torch.Tensor

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

    def forward(self, values: torch.Tensor, masks: torch.Tensor, deltas_forward: torch.Tensor,
                deltas_backward: torch.Tensor, ancillary: torch.Tensor | None = None,
                with_loss: bool = True) -> BritsOutput:
        """``values``/``masks``: (B, T, F) standardised with 0 at gaps; deltas per direction
        (the backward ones computed on the time-reversed masks); ``ancillary`` (B, A)."""
        logits_f, imputed_f, loss_f = self.forward_pass(values, masks, deltas_forward, ancillary, with_loss)
        logits_b, imputed_b, loss_b = self.backward_pass(
            values.flip(1), masks.flip(1), deltas_backward, ancillary, with_loss)
        imputed_b = imputed_b.flip(1)
        p_f, p_b = torch.softmax(logits_f, dim=1), torch.softmax(logits_b, dim=1)
        consistency = (imputed_f - imputed_b).abs().mean() if with_loss else values.new_zeros(())
        return BritsOutput(0.5 * (p_f + p_b), p_f, p_b, 0.5 * (imputed_f + imputed_b),
                           0.5 * (loss_f + loss_b), consistency)


@dataclass(frozen=True)
class LossWeights:
    label: float = 0.75
    impute: float = 0.25
    consistency: float = 0.1


def brits_loss(out: BritsOutput, target: torch.Tensor, weights: LossWeights = LossWeights()
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """label x squared error of abundances (summed over classes, mean over pixels, both
    directions) + impute x masked L1 + consistency x |forward - backward imputations|; the
    parts detached, left on the device (reading them waits for a GPU's queue)."""
    label = 0.5 * (((out.forward_abundance - target) ** 2).sum(dim=1).mean()
                   + ((out.backward_abundance - target) ** 2).sum(dim=1).mean())
    total = weights.label * label + weights.impute * out.impute_loss \
        + weights.consistency * out.consistency_loss
    return total, {"label": label.detach(), "impute": out.impute_loss.detach(),
                   "consistency": out.consistency_loss.detach()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def as_tensor(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
