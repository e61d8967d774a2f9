"""CROWN-IBP with loss fusion: one backward row per sample bounds the cross-entropy.

Unfused CROWN-IBP bounds the K−1 margins z_y − z_j from below, one backward row each, and
feeds them to the robust loss. Loss fusion (auto_LiRPA's default for CROWN-IBP training,
there through a ``CrossEntropyWrapper`` bounded with ``bound_upper=True``) bounds the
cross-entropy itself from above:

    CE(x, y) = log Σ_j exp(d_j),   d_j = z_j − z_y   (d_y = 0).

With IBP bounds l_j ≤ d_j ≤ u_j (cheap: the margins' rows are folded into the last linear
layer only) exp is convex, so on [l_j, u_j] it lies below its chord:

    exp(d_j) ≤ exp(l_j) + s_j (d_j − l_j),   s_j = (exp(u_j) − exp(l_j)) / (u_j − l_j).

Summed, the cross-entropy's exponent sum is at most const + a·z with the single row
a = Σ_j s_j (e_j − e_y) of the logits, whose upper bound one CROWN-IBP backward pass gives:
one row per sample through the network instead of K−1. For numerical stability every
exponent is shifted by m = max(0, max_j u_j) (detached) and m is added back after the log.
The result upper-bounds the worst-case cross-entropy over the box.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from certkit.bounds import BoundedModel
    from certkit.bounds.engine import Interval


def exp_chord_slope(lo: Tensor, up: Tensor) -> Tensor:
    """The slope of exp's chord on [lo, up], (exp(up) − exp(lo)) / (up − lo), without
    cancellation or overflow: exp(up) · (1 − exp(−w)) / w with w = up − lo, whose second factor
    is ``-expm1(-w) / w`` (→ 1 as w → 0: the tangent, exact on a single point). With ``up`` ≤ 0
    (the shifted exponents) nothing overflows; a width of 0 keeps finite gradients."""
    w = (up - lo).clamp(min=0)
    positive = w > 0
    w_safe = torch.where(positive, w, torch.ones_like(w))
    ratio = torch.where(positive, -torch.expm1(-w_safe) / w_safe, torch.ones_like(w))
    return torch.exp(up) * ratio


def fused_ce_bound(bm: BoundedModel, bounds: dict[str, Interval], C: Tensor, margin_lb: Tensor,
                   margin_ub: Tensor, crown_weight: Tensor | float) -> Tensor:
    """Per-sample upper bounds (B,) of the cross-entropy over the box that ``bounds`` (the
    IBP intervals of every node, :meth:`BoundedModel.intervals`) were computed on.

    ``C`` (B, K−1, K) holds the margin rows e_y − e_j (:func:`certkit.bounds.margin_matrix`),
    ``margin_lb``/``margin_ub`` their IBP bounds. The bound is the mix f·CROWN-IBP + (1 − f)·IBP
    of the two bounds of the cross-entropy (the logs of the exponent sums' bounds), f =
    ``crown_weight`` in [0, 1], as unfused CROWN-IBP mixes its margins: both are upper bounds,
    so every mix is one. Mixed before the log, the far larger IBP sum would swamp the CROWN-IBP
    one for most of the ramp (log(f·a + (1 − f)·b) ≥ f·log a + (1 − f)·log b); mixed after it,
    as the margins are, the weights mean what they say. The CROWN-IBP part is one backward row
    per sample (see the module's docstring)."""
    d_lo, d_up = -margin_ub, -margin_lb  # bounds of d_j = z_j − z_y, j ≠ y
    m = d_up.max(1, keepdim=True).values.clamp(min=0).detach()
    lo, up = d_lo - m, d_up - m
    own = torch.exp(-m).squeeze(1)  # the j = y term, exp(0 − m)
    ibp_ce = torch.log(own + torch.exp(up).sum(1))
    if isinstance(crown_weight, float) and crown_weight == 0:
        return ibp_ce + m.squeeze(1)
    slope = exp_chord_slope(lo, up)
    # Σ_j s_j d_j = a·z with a = Σ_j s_j (e_j − e_y) = −row, row = Σ_j s_j C_j
    row = (slope.unsqueeze(2) * C.to(slope)).sum(1, keepdim=True)
    row_lb, _ = bm.spec_bounds(bounds, row, "crown-ibp", bound_upper=False, intersect=False)
    crown_sum = own + (torch.exp(lo) - slope * d_lo).sum(1) - row_lb.squeeze(1)
    # the sum is at least its j = y term: raising a bound to it keeps a bound and guards the log
    crown_ce = torch.log(torch.maximum(crown_sum, own))
    return crown_weight * crown_ce + (1 - crown_weight) * ibp_ce + m.squeeze(1)
