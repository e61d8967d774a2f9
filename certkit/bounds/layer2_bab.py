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

Why: MILP (:mod:`certkit.bounds.milp`) with HiGHS stays at its root node for most of these
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
        self.slope = self.uu / (self.uu - self.lu)  # the triangle's upper line: slope·(z − l)
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
    scale = (incumbent - lb).abs().clamp(min=1e-6)
    tol = 1e-3 * scale

    def close(obj, lb, keep):
        """Record the closed leaves' bounds; the rows to keep open."""
        shut = ~keep
        if bool(shut.any()):
            closed_min.scatter_reduce_(0, obj[shut], lb[shut], "amin")
        return keep

    def splittable(obj, sig):
        return ((sig == 0) & (p.Cu[obj] < 0)).any(1)

    target = torch.minimum(incumbent - tol, torch.zeros_like(incumbent))
    # leaves with nothing left to split are exact LPs at the optimum: closed as they are
    keep = close(obj, lb, (lb < target[obj]) & splittable(obj, sig))
    leaves = {"obj": obj[keep], "sig": sig[keep], "alpha": alpha[keep], "beta": beta[keep], "lb": lb[keep],
              "z": z[keep]}
    while leaves["obj"].numel() and not expired() and leaves["obj"].numel() < max_leaves:
        n = leaves["obj"].numel()
        # best first within each objective, objectives side by side: the r-th worst leaf of every
        # objective before the (r+1)-th of any
        order = torch.argsort(leaves["lb"], stable=True)
        order = order[torch.argsort(leaves["obj"][order], stable=True)]
        sorted_obj = leaves["obj"][order]
        first = torch.searchsorted(sorted_obj, sorted_obj, side="left")
        rank = torch.arange(n) - first
        pick = order[torch.argsort(rank, stable=True)[:batch]]
        rest = torch.ones(n, dtype=torch.bool)
        rest[pick] = False
        d = {key: v[pick] for key, v in leaves.items()}
        leaves = {key: v[rest] for key, v in leaves.items()}
        # split the concave neuron whose triangle gap, weighted by |c|, is largest at the minimising corner
        z, c = d["z"], p.Cu[d["obj"]]
        gap = -c * (p.slope * (z - p.lu) - z.clamp(min=0)) + 1e-9 * (-c) * (-p.lu * p.slope)
        gap = torch.where((d["sig"] == 0) & (c < 0), gap.clamp(min=0) + 1e-12, torch.full_like(gap, -1.0))
        choice = gap.argmax(1)
        b = choice.numel()
        rows = torch.arange(b)
        sig_c = torch.cat([d["sig"], d["sig"]])
        sig_c[rows, choice] = -1.0
        sig_c[rows + b, choice] = 1.0
        beta_c = torch.cat([d["beta"], d["beta"]])
        beta_c[rows, choice] = 0.0
        beta_c[rows + b, choice] = 0.0
        obj_c, parent = torch.cat([d["obj"], d["obj"]]), torch.cat([d["lb"], d["lb"]])
        lb_c, alpha_c, beta_c, g_c = _optimise(p, obj_c, sig_c, torch.cat([d["alpha"], d["alpha"]]), beta_c,
                                               parent, steps, lr)
        stats.domains += 2 * b
        value, z_c = p.corner_value(obj_c, g_c)
        incumbent.scatter_reduce_(0, obj_c, value, "amin")
        target = torch.minimum(incumbent - tol, torch.zeros_like(incumbent))
        open_, more = lb_c < target[obj_c], splittable(obj_c, sig_c)
        fixed = (open_ & ~more).nonzero().squeeze(1)
        if fixed.numel():  # every concave term split: an LP, whose optimum more steps approach
            lb_f, _, _, _ = _optimise(p, obj_c[fixed], sig_c[fixed], alpha_c[fixed], beta_c[fixed], lb_c[fixed],
                                      fixed_steps, lr)
            lb_c = lb_c.index_copy(0, fixed, lb_f)
        keep = close(obj_c, lb_c, open_ & more)
        # earlier leaves that the better incumbent now closes
        still = leaves["lb"] < target[leaves["obj"]]
        close(leaves["obj"], leaves["lb"], still)
        leaves = {key: v[still] for key, v in leaves.items()}
        new = {"obj": obj_c, "sig": sig_c, "alpha": alpha_c, "beta": beta_c, "lb": lb_c, "z": z_c}
        leaves = {key: torch.cat([leaves[key], new[key][keep]]) for key in leaves}
    result = closed_min.clone()
    if leaves["obj"].numel():
        result.scatter_reduce_(0, leaves["obj"], leaves["lb"], "amin")
        open_objs = torch.zeros(n_obj, dtype=torch.bool)
        open_objs[leaves["obj"]] = True
        stats.closed += int((~open_objs).sum())
    else:
        stats.closed += n_obj
    result = torch.maximum(torch.minimum(result, incumbent), root)  # never below the root's bound
    stats.seconds += time.monotonic() - start
    return result
