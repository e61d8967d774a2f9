"""One case of a VNN-LIB property as tensors: the rows of all its output polytopes, stacked.

A case is refuted on a domain when every polytope ``A·y ≤ b`` has some row whose lower
bound of ``a·y − b`` is above 0 over the domain. A point is a counterexample candidate
when all rows of some polytope are below 0 there (strictly: strict and non-strict
comparisons are both met, whatever the file said).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from certkit.vnnlib import Case


def box_minimum(A: Tensor, lo: Tensor, up: Tensor) -> Tensor:
    """min over the box [lo, up] of each row of A·x: A (N, R, D), lo and up (N, 1, D) → (N, R).

    The one concretisation of the complete solver: a CROWN lower bound minus it is the
    constant of the linear bound, which :meth:`Spec.group_margins` recombines."""
    return torch.minimum(A * lo, A * up).sum(-1)


@dataclass
class Spec:
    C: Tensor  # (S, K): every row of every polytope
    b: Tensor  # (S,)
    group: Tensor  # (S,): the polytope each row belongs to
    num_groups: int

    @classmethod
    def from_case(cls, case: Case, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Spec:
        C = torch.as_tensor(np.concatenate([A for A, _ in case.polytopes]), dtype=dtype, device=device)
        b = torch.as_tensor(np.concatenate([b for _, b in case.polytopes]), dtype=dtype, device=device)
        group = torch.cat([torch.full((len(bb),), g, dtype=torch.long, device=device)
                           for g, (_, bb) in enumerate(case.polytopes)])
        return cls(C, b, group, len(case.polytopes))

    @property
    def num_rows(self) -> int:
        return self.C.shape[0]

    def batch_C(self, n: int) -> Tensor:
        """C expanded for ``n`` domains: (n, S, K)."""
        return self.C.expand(n, *self.C.shape)

    @functools.cached_property
    def group_rows(self) -> tuple[Tensor, Tensor]:
        """(G, R): the rows of each polytope, R the largest polytope's row count (a smaller
        polytope repeats its first row), and (G, R): False on those repeats."""
        rows = [(self.group == g).nonzero().squeeze(1) for g in range(self.num_groups)]
        R = max(r.numel() for r in rows)
        table = torch.stack([torch.cat([r, r[:1].expand(R - r.numel())]) for r in rows])
        device = self.group.device
        real = (torch.arange(R, device=device).unsqueeze(0)
                < torch.tensor([r.numel() for r in rows], device=device).unsqueeze(1))
        return table, real

    def values(self, y: Tensor) -> Tensor:
        """a·y − b for every row: (N, S)."""
        return y.reshape(y.shape[0], -1).to(self.C) @ self.C.T - self.b

    def group_max(self, v: Tensor) -> Tensor:
        """Per polytope, the largest row value: (N, G)."""
        out = torch.full((v.shape[0], self.num_groups), -torch.inf, dtype=v.dtype, device=v.device)
        return out.scatter_reduce(1, self.group.expand_as(v), v, reduce="amax", include_self=True)

    def violation(self, y: Tensor) -> Tensor:
        """min over polytopes of the largest row value: below 0 means y is in the unsafe set."""
        return self.group_max(self.values(y)).min(1).values

    def refuted(self, lb: Tensor) -> Tensor:
        """(N, G): polytopes shown empty on each domain by lower bounds ``lb`` (N, S) of C·y.

        A NaN or infinite bound is no evidence: it never refutes anything."""
        margin = lb - self.b
        margin = torch.where(torch.isfinite(margin), margin, torch.full_like(margin, -torch.inf))
        return self.group_max(margin) > 0

    def group_margins(self, A: Tensor, c: Tensor, lower: Tensor, upper: Tensor, iterations: int = 25) -> Tensor:
        """(N, G): for each polytope a certified lower bound whose sign says whether it is empty.

        ``A`` (N, S, D) and ``c`` (N, S) give linear lower bounds ``A_r·x + c_r`` of the rows
        C_r·y over the input box [lower, upper] (N, D) (a CROWN pass's input coefficients).
        A polytope is empty on the box when some λ ≥ 0 makes Σ_r λ_r (A_r·x + c_r − b_r) > 0
        for every x in the box (the LP certificate of infeasibility of the relaxation). For
        one row that is its lower bound; for several, the concave function
        g(λ) = min over the box of that sum is maximised over the simplex by exponentiated
        gradient ascent, batched over domains; the best value seen (and every single row's
        bound) is returned. Non-finite values never count as evidence (−∞)."""
        N = A.shape[0]
        lo, up = lower.reshape(N, 1, -1), upper.reshape(N, 1, -1)
        rows = c - self.b + box_minimum(A, lo, up)  # each row's own lower bound
        rows = torch.where(torch.isfinite(rows), rows, torch.full_like(rows, -torch.inf))
        cols = list(self.group_max(rows).unbind(1))  # no in-place writes: α-β-CROWN differentiates this
        for g in range(self.num_groups):
            idx = (self.group == g).nonzero().squeeze(1)
            if idx.numel() < 2:
                continue
            Ag, cg = A[:, idx], (c - self.b)[:, idx]  # (N, R, D), (N, R)
            if not (torch.isfinite(Ag).all() and torch.isfinite(cg).all()):
                continue
            lam = torch.full(cg.shape, 1.0 / idx.numel(), dtype=A.dtype, device=A.device)
            for _ in range(iterations):
                M = torch.einsum("nr,nrd->nd", lam, Ag).unsqueeze(1)
                corner = torch.where(M > 0, lo, up)  # the box point minimising λᵀ(A x)
                value = (lam * cg).sum(1) + (M * corner).sum(-1).squeeze(1)
                cols[g] = torch.maximum(cols[g], value)
                grad = cg + (Ag * corner).sum(-1)  # ∂g/∂λ_r at that corner
                scale = grad.abs().amax(1, keepdim=True).clamp(min=1e-30)
                lam = lam * torch.exp(grad / scale)
                lam = (lam / lam.sum(1, keepdim=True)).detach()
        return torch.stack(cols, 1)
