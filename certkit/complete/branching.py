"""Where to split next: the input dimension of a box, the ReLU neuron of a domain.

* Input splitting halves the dimension with the largest smear (|coefficient of the CROWN
  bound| × width) among those at least ``min_relative_width`` as wide, relative to the
  root box, as the widest, so that no greedy choice keeps halving one dimension forever.
* ReLU splitting takes BaBSR's intercept score: the triangle relaxation's upper line adds
  its intercept −l·u/(u − l) to the bound only through negative coefficients of the ReLU's
  output (positive ones use the lower line, which has none), so the score of an unstable
  neuron is that intercept times the negative part of the coefficient, summed over the
  specification rows still open (scoring |coefficient| instead took oval21 #0 from 1253 to
  20553 domains).
"""

from __future__ import annotations

import torch
from torch import Tensor

from certkit.bounds.ops.activation import triangle_upper


def input_candidates(lo: Tensor, up: Tensor, smear: Tensor, root_width: Tensor, k: int, min_relative_width: float
                     ) -> tuple[Tensor, Tensor]:
    """The k dimensions with the largest smear among those wide enough, per box (n, k), and
    whether each is wide enough (n, k) (false only when fewer than k are)."""
    rel = (up - lo) / root_width
    eligible = rel >= min_relative_width * rel.amax(1, keepdim=True)
    cand = smear.masked_fill(~eligible, -1.0).topk(k, dim=1).indices
    return cand, eligible.gather(1, cand)


def babsr_scores(lo: Tensor, up: Tensor, negative_coef: Tensor) -> Tensor:
    """BaBSR's score per neuron of one ReLU layer, (n, neurons) from its input intervals
    (flat) and the summed negative parts of the coefficients reaching its output (≥ 0);
    0 for stable neurons, a little above 0 for unstable ones (so any of them beats none)."""
    unstable = (lo < 0) & (up > 0)
    _, intercept = triangle_upper(lo, up)
    return torch.where(unstable, negative_coef * intercept + 1e-12, torch.zeros_like(lo))
