"""Forward-mode linear bounds: every node bounded by two linear functions of the input.

For networks with few inputs (ACAS Xu: 5) this is far cheaper than backward CROWN for the
intermediate bounds: a backward pass per layer costs (neurons × layers) rows of
coefficients, the forward pass carries D + 1 coefficients per neuron through the network
once. The bounds are looser than backward CROWN's, so they are intersected with IBP's.

A node's bounds are ``(L, U)``, each (B, D + 1, *shape): L[:, k] is the coefficient of the
normalised input x̂_k ∈ [−1, 1] (x = centre + radius · x̂, per domain) and L[:, D] the
constant, with L(x̂) ≤ node(x) ≤ U(x̂) for every x in the box. No operator needs a rule of
its own:

* an affine operator's IBP rule is linear in (lo, up), even where lo > up (centre ± |M|·radius,
  or the map applied to both ends), so applying it to each coefficient column (L_k, U_k)
  bounds the node: with c = (L + U)/2 and r = (U − L)/2 ≥ 0 on the box, M·z ∈
  [M·c − |M|·r, M·c + |M|·r]; the op's own offset b (its rule applied to zero) belongs to the
  constant column only, so it is taken back out of the others;
* an activation's relaxation a_l·z + b_l ≤ f(z) ≤ a_u·z + b_u on the node's interval maps
  (L, U) to a_l·L + b_l (a_l·U where a_l < 0) and a_u·U + b_u (a_u·L where a_u < 0).

Operators with neither (MaxPool) have no forward bounds; :func:`supported` says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from certkit.bounds.ops import Activation, Op

Linear = tuple[Tensor, Tensor]


def supported(op: Op) -> bool:
    """Whether ``op`` maps forward linear bounds (affine operators and activations)."""
    return op.affine or isinstance(op, Activation)


def from_box(lower: Tensor, upper: Tensor) -> Linear:
    """The input node's bounds: x = centre + radius · x̂, exactly (L = U)."""
    B = lower.shape[0]
    c, r = ((lower + upper) / 2).reshape(B, -1), ((upper - lower) / 2).reshape(B, -1)
    coef = torch.cat([torch.diag_embed(r), c.unsqueeze(1)], 1)  # (B, D + 1, D)
    coef = coef.reshape(B, coef.shape[1], *lower.shape[1:])
    return coef, coef


def concretize(lin: Linear) -> tuple[Tensor, Tensor]:
    """The interval (B, *shape) the linear bounds give over x̂ ∈ [−1, 1]^D."""
    L, U = lin
    return L[:, -1] - L[:, :-1].abs().sum(1), U[:, -1] + U[:, :-1].abs().sum(1)


def propagate(op: Op, ins: list[Linear], in_bounds: list[tuple[Tensor, Tensor]]) -> Linear:
    """The node's linear bounds from its inputs' (``in_bounds``: the inputs' intervals, for
    the activations' relaxations)."""
    if op.affine:
        B, K = ins[0][0].shape[:2]
        flat = [(L.reshape(B * K, *L.shape[2:]), U.reshape(B * K, *U.shape[2:])) for L, U in ins]
        lo, up = op.interval(*flat)
        zeros = [(z, z) for z in (L.new_zeros(1, *L.shape[2:]) for L, _ in ins)]
        offset, _ = op.interval(*zeros)  # (1, *shape): the op's constant term
        lo, up = lo.reshape(B, K, *lo.shape[1:]), up.reshape(B, K, *up.shape[1:])
        keep = torch.zeros(K, *([1] * (lo.dim() - 2)), dtype=lo.dtype, device=lo.device)
        keep[-1] = 1  # the offset stays in the constant column only
        shift = (keep - 1) * offset
        return lo + shift, up + shift
    (L, U), (lo, up) = ins[0], in_bounds[0]
    a_l, b_l, a_u, b_u = op.relax(lo.unsqueeze(1), up.unsqueeze(1))
    L2 = torch.where(a_l >= 0, a_l * L, a_l * U)
    U2 = torch.where(a_u >= 0, a_u * U, a_u * L)
    if b_l is not None:
        L2 = torch.cat([L2[:, :-1], L2[:, -1:] + b_l], 1)
    return L2, torch.cat([U2[:, :-1], U2[:, -1:] + b_u], 1)
