"""Warmup regularisers L_tightness and L_relu (ALGORITHMS.md §6) and the robust loss (§4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Interval = tuple[Tensor, Tensor]


def robust_loss(lb: Tensor) -> Tensor:
    """mean over the batch of log(1 + Σ_j exp(−lb_j)) for margin lower bounds lb (B, K−1)."""
    logits = torch.cat([torch.zeros_like(lb[:, :1]), -lb], 1)
    return F.cross_entropy(logits, torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device))


def _balance(r: Tensor) -> Tensor:
    return torch.minimum(r, 1 / torch.clamp(r, min=1e-12))


@dataclass
class RegularizerTerms:
    tightness: Tensor
    relu: Tensor
    active: list[float]  # per ReLU layer: fractions of batch × neurons
    inactive: list[float]
    unstable: list[float]


def warmup_regularizers(input_box: Interval, relu_inputs: list[Interval], tau: float = 0.5) -> RegularizerTerms:
    """L_tightness and L_relu from the IBP bounds of the input and of every ReLU's input.

    L_tightness = (1/m) Σ_i ReLU(τ − Δ̂_0/Δ̂_i)/τ with Δ̂ the mean half-width; L_relu averages
    per layer [ReLU(τ − α') + ReLU(τ − β')]/τ, α and β the active/inactive balance of the
    centres' sums and spreads, r' = min(r, 1/r); layers whose term is NaN/Inf are skipped.
    """
    m = len(relu_inputs)
    delta0 = ((input_box[1] - input_box[0]) / 2).mean()
    tight = input_box[0].new_zeros(())
    relu = input_box[0].new_zeros(())
    fractions: tuple[list[float], list[float], list[float]] = ([], [], [])
    counts = []
    for lo, up in relu_inputs:
        c, d = (up + lo) / 2, (up - lo) / 2
        tight = tight + F.relu(tau - delta0 / torch.clamp(d.mean(), min=1e-12)) / tau
        active, inactive = lo > 0, up < 0
        zero = c.new_zeros(())
        alpha = torch.where(active, c, zero).sum() / torch.where(inactive, -c, zero).sum()
        spread = (c - c.mean()) ** 2
        beta = torch.where(active, spread, zero).sum() / torch.where(inactive, spread, zero).sum()
        term = (F.relu(tau - _balance(alpha)) + F.relu(tau - _balance(beta))) / tau
        if torch.isfinite(term):  # NaN/Inf layers are skipped (a masked sum would leak NaN gradients)
            relu = relu + term
        counts.append(torch.stack([active.sum(), inactive.sum()]) / lo.numel())
    if counts:
        frac = torch.stack(counts).tolist()  # one synchronisation for all layers
        for act, inact in frac:
            fractions[0].append(act)
            fractions[1].append(inact)
            fractions[2].append(1.0 - act - inact)
    return RegularizerTerms(tight / max(m, 1), relu / max(m, 1), *fractions)
