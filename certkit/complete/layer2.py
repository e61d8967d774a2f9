"""Second-layer intervals by branch and bound over the first layer's ReLU phases.

A network's second pre-activation z₂ = W₂·relu(z₁) + b₂, with z₁ = W₁·x + b₁ affine in the
input box, is where every later layer's relaxation error starts. Bounding one of its
neurons, min over the box of c·relu(z₁) (c = ±W₂[j]), is a problem over the phases of the
first layer's unstable ReLUs, and only of some of them: a term cᵢ·relu(z₁ᵢ) with cᵢ ≥ 0 is
convex, and the LP relaxation (relu ≥ 0, relu ≥ z) is exact for it; only the concave terms
(cᵢ < 0, relaxed by the triangle's upper line) lose anything. So the exact bound is a branch
and bound over those neurons alone, where every leaf, once its concave terms are all split,
is an LP whose optimum α-β-CROWN reaches (for one hidden layer its dual is exactly the
optimisation over the lower slopes α ∈ [0, 1] and the split multipliers β ≥ 0).

Every objective (a neuron and a side) keeps its own tree; a batch takes the worst leaves of
every objective still open (best first), splits each on the concave neuron whose triangle
gap is largest at the leaf's minimising corner, and gives the children a few Adam steps on
α and β from their parent's values. A child's bound is at least its parent's (it is a
subset). A leaf whose bound reaches the best value found at any corner so far (or 0, where
the neuron becomes stable) is closed. The objective's bound is the least bound over all its
leaves, closed ones included: valid whenever the search stops.

Why: MILP (:mod:`certkit.complete.milp`) with HiGHS stays at its root node for most of these
neurons within a second, and solved to optimality takes 5–15 s each on mnist_fc's 256×4
network, where the exact bounds move far (#50, neuron 40: −6.59 → −2.94).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from certkit.bounds.ops.activation import triangle_upper
from certkit.complete.domains import Batch


@dataclass
class BranchStats:
    objectives: int = 0  # bounds searched (neurons × sides)
    closed: int = 0  # of which the search finished (no open leaf left)
    tightened: int = 0  # bounds improved
    stabilised: int = 0  # neurons that became stable
    domains: int = 0  # leaves bounded
    seconds: float = 0.0


class _Problem:
    """The fixed data of every objective: min over the box of c·relu(W₁x + b₁) + k."""

    def __init__(self, W1: Tensor, b1: Tensor, l1: Tensor, u1: Tensor, lo: Tensor, up: Tensor,
                 C: Tensor, k: Tensor):
        W1, b1, l1, u1, lo, up, C, k = (t.detach() for t in (W1, b1, l1, u1, lo, up, C, k))
        self.cx, self.rx = (up + lo) / 2, (up - lo) / 2
        unstable = (l1 < 0) & (u1 > 0)
        active = l1 >= 0
        U = unstable.nonzero().squeeze(1)
        self.W1, self.b1 = W1, b1
        self.W1u, self.b1u, self.lu, self.uu = W1[U], b1[U], l1[U], u1[U]
        self.slope, _ = triangle_upper(self.lu, self.uu)  # the triangle's upper line: slope·(z − l)
        self.Cu = C[:, U]  # (O, m) coefficients of the unstable neurons
        # stable active neurons are linear: their part of the objective is one affine function of x
        Ca = C * active.to(C.dtype)
        self.g0 = Ca @ W1  # (O, D)
        self.k0 = Ca @ b1 + k  # (n_obj,)
        self.C, self.k = C, k
        self.m = U.numel()

    def bound(self, obj: Tensor, sig: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        """Lower bounds (B,) of the leaves (objective index, split signs σ: −1 active, +1
        inactive, 0 unsplit; α, β per unstable neuron) and their input coefficients (B, D)."""
        c = self.Cu[obj]
        unsplit = sig == 0
        convex = c >= 0
        lam = torch.where(unsplit, torch.where(convex, c * alpha, c * self.slope), torch.where(sig < 0, c - beta, beta))
        kappa = torch.where(unsplit & ~convex, -c * self.slope * self.lu, torch.zeros_like(c)).sum(1)
        g = self.g0[obj] + lam @ self.W1u
        value = self.k0[obj] + kappa + lam @ self.b1u + g @ self.cx - g.abs() @ self.rx
        return value, g

    def corner_value(self, obj: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The objective at each leaf's minimising corner (an achieved value: an upper bound of
        the minimum) and the first layer's unstable pre-activations there."""
        x = self.cx - self.rx * g.sign()
        z = x @ self.W1.T + self.b1
        return (self.C[obj] * z.clamp(min=0)).sum(1) + self.k[obj], x @ self.W1u.T + self.b1u


def _optimise(p: _Problem, obj: Tensor, sig: Tensor, alpha: Tensor, beta: Tensor, best: Tensor, steps: int,
              lr: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``steps`` Adam steps on α ∈ [0, 1] and β ≥ 0 of every leaf (rows are independent):
    (best bound per leaf, at least ``best``; final α, β; coefficients of the last pass)."""
    alpha, beta = alpha.clone().requires_grad_(True), beta.clone().requires_grad_(True)
    opt = torch.optim.Adam([alpha, beta], lr=lr)
    g = None
    for _ in range(steps):
        with torch.enable_grad():
            value, g = p.bound(obj, sig, alpha, beta)
            opt.zero_grad()
            (-value.sum()).backward()
        best = torch.maximum(best, value.detach())
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)
            beta.clamp_(min=0)
    with torch.no_grad():
        value, g = p.bound(obj, sig, alpha, beta)
    return torch.maximum(best, value), alpha.detach(), beta.detach(), g


@dataclass
class _Leaves(Batch):
    """Open leaves of every objective's tree."""

    obj: Tensor  # (n,): the objective
    sig: Tensor  # (n, m): split signs σ per unstable neuron (−1 active, +1 inactive, 0 unsplit)
    alpha: Tensor  # (n, m)
    beta: Tensor  # (n, m)
    lb: Tensor  # (n,): the leaf's lower bound
    z: Tensor  # (n, m): the unstable pre-activations at the leaf's minimising corner


def _worst_first(leaves: _Leaves, batch: int) -> tuple[_Leaves, _Leaves]:
    """(the batch to split, the rest): best first within each objective, objectives side by side,
    the r-th worst leaf of every objective before the (r+1)-th of any."""
    n = len(leaves)
    order = torch.argsort(leaves.lb, stable=True)
    order = order[torch.argsort(leaves.obj[order], stable=True)]
    sorted_obj = leaves.obj[order]
    first = torch.searchsorted(sorted_obj, sorted_obj, side="left")
    rank = torch.arange(n) - first
    pick = order[torch.argsort(rank, stable=True)[:batch]]
    rest = torch.ones(n, dtype=torch.bool)
    rest[pick] = False
    return leaves.rows(pick), leaves.rows(rest)


def _split(p: _Problem, d: _Leaves) -> _Leaves:
    """Both children of every leaf, on the concave neuron whose triangle gap, weighted by |c|, is
    largest at the leaf's minimising corner: first all the active ones, then the inactive (β of
    the split neuron restarts at 0; ``lb`` is the parent's, ``z`` not yet known)."""
    z, c = d.z, p.Cu[d.obj]
    gap = -c * (p.slope * (z - p.lu) - z.clamp(min=0)) + 1e-9 * (-c) * (-p.lu * p.slope)
    gap = torch.where((d.sig == 0) & (c < 0), gap.clamp(min=0) + 1e-12, torch.full_like(gap, -1.0))
    choice = gap.argmax(1)
    b = choice.numel()
    rows = torch.arange(b)
    children = d.twice()
    children.sig[rows, choice] = -1.0
    children.sig[rows + b, choice] = 1.0
    children.beta[rows, choice] = 0.0
    children.beta[rows + b, choice] = 0.0
    return children


def branch_bounds(W1: Tensor, b1: Tensor, l1: Tensor, u1: Tensor, lo: Tensor, up: Tensor, C: Tensor, k: Tensor,
                  expired: Callable[[], bool], batch: int = 512, steps: int = 10, root_steps: int = 40,
                  fixed_steps: int = 100,
                  lr: float = 0.1, max_leaves: int = 400_000, stats: BranchStats | None = None) -> Tensor:
    """Lower bounds (n_obj,) of min over the box [lo, up] of C[o]·relu(W₁x + b₁) + k[o], one per row
    of C, by branch and bound over the concave terms until ``expired()`` or every search
    closes (float64 throughout; ``l1``, ``u1``: valid intervals of W₁x + b₁ on the box)."""
    stats = stats if stats is not None else BranchStats()
    start = time.monotonic()
    p = _Problem(W1, b1, l1, u1, lo, up, C, k)
    n_obj, m, dt = C.shape[0], p.m, C.dtype
    stats.objectives += n_obj
    obj = torch.arange(n_obj)
    sig = torch.zeros(n_obj, m, dtype=dt)
    alpha = (p.uu > -p.lu).to(dt).expand(n_obj, m).clone()
    beta = torch.zeros(n_obj, m, dtype=dt)
    lb, alpha, beta, g = _optimise(p, obj, sig, alpha, beta, torch.full((n_obj,), -math.inf, dtype=dt),
                                   root_steps, lr)
    root = lb.clone()
    incumbent, z = p.corner_value(obj, g)
    closed_min = torch.full((n_obj,), math.inf, dtype=dt)  # least bound among the closed leaves
    tol = 1e-3 * (incumbent - lb).abs().clamp(min=1e-6)

    def close(leaves: _Leaves, keep: Tensor) -> _Leaves:
        """Record the bounds of the leaves not kept as closed; the kept ones."""
        shut = ~keep
        if bool(shut.any()):
            closed_min.scatter_reduce_(0, leaves.obj[shut], leaves.lb[shut], "amin")
        return leaves.rows(keep)

    def splittable(d: _Leaves) -> Tensor:
        return ((d.sig == 0) & (p.Cu[d.obj] < 0)).any(1)

    target = torch.minimum(incumbent - tol, torch.zeros_like(incumbent))
    # leaves with nothing left to split are exact LPs at the optimum: closed as they are
    leaves = _Leaves(obj, sig, alpha, beta, lb, z)
    leaves = close(leaves, (lb < target[obj]) & splittable(leaves))
    while len(leaves) and not expired() and len(leaves) < max_leaves:
        d, leaves = _worst_first(leaves, batch)
        kids = _split(p, d)
        kids.lb, kids.alpha, kids.beta, g_c = _optimise(p, kids.obj, kids.sig, kids.alpha, kids.beta, kids.lb,
                                                        steps, lr)
        stats.domains += len(kids)
        value, kids.z = p.corner_value(kids.obj, g_c)
        incumbent.scatter_reduce_(0, kids.obj, value, "amin")
        target = torch.minimum(incumbent - tol, torch.zeros_like(incumbent))
        open_, more = kids.lb < target[kids.obj], splittable(kids)
        fixed = (open_ & ~more).nonzero().squeeze(1)
        if fixed.numel():  # every concave term split: an LP, whose optimum more steps approach
            f = kids.rows(fixed)
            lb_f, _, _, _ = _optimise(p, f.obj, f.sig, f.alpha, f.beta, f.lb, fixed_steps, lr)
            kids.lb = kids.lb.index_copy(0, fixed, lb_f)
        kids = close(kids, open_ & more)
        # earlier leaves that the better incumbent now closes
        leaves = _Leaves.cat([close(leaves, leaves.lb < target[leaves.obj]), kids])
    result = closed_min.clone()
    if len(leaves):
        result.scatter_reduce_(0, leaves.obj, leaves.lb, "amin")
        open_objs = torch.zeros(n_obj, dtype=torch.bool)
        open_objs[leaves.obj] = True
        stats.closed += int((~open_objs).sum())
    else:
        stats.closed += n_obj
    result = torch.maximum(torch.minimum(result, incumbent), root)  # never below the root's bound
    stats.seconds += time.monotonic() - start
    return result
