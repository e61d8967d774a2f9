"""One CROWN pass over many domains, turned into per-polytope margins and counterexample corners.

A margin > 0 refutes a polytope of the property on a domain (see :meth:`Spec.group_margins`).
:func:`margins` bounds every polytope of N domains (input splitting); :func:`pair_margins`
bounds only the (domain, polytope) pairs still open (ReLU splitting, where α and β are per
specification row, so pairs are independent problems). Both read CROWN's input coefficients
to pick the box corners where the relaxation sees the unsafe set: cheap candidates for a
counterexample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from certkit.bounds import BoundedModel
from certkit.complete.spec import Spec, box_minimum

Intervals = dict[str, tuple[Tensor, Tensor]]


def margins(bm: BoundedModel, spec: Spec, bounds: Intervals, lo: Tensor, up: Tensor,
            alphas: dict[str, Tensor] | None = None, extra: dict[str, Tensor] | None = None
            ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One CROWN pass over N domains (node intervals ``bounds``, input box [lo, up]).

    Returns the polytope margins (N, G) of :meth:`Spec.group_margins` (> 0: refuted), the
    input coefficients A (N, S, D) and the coefficients recorded at every node."""
    n = lo.shape[0]
    rec: dict[str, Tensor] = {}
    lb, _ = bm.spec_bounds(bounds, spec.batch_C(n), "crown", bound_upper=False, intersect=False,
                           alphas=alphas, record=rec, extra=extra)
    lo_f, up_f = lo.reshape(n, -1), up.reshape(n, -1)
    A = rec[bm.graph.input.name].reshape(n, spec.num_rows, -1)
    c = lb - box_minimum(A, lo_f.unsqueeze(1), up_f.unsqueeze(1))
    return spec.group_margins(A, c, lo_f, up_f), A, rec


def open_score(m: Tensor, alive: Tensor) -> Tensor:
    """Per domain, the worst margin over polytopes still alive (+inf when all are refuted)."""
    return torch.where(alive, m, torch.full_like(m, math.inf)).min(1).values


def _corners(rows: Tensor, real: Tensor, lo: Tensor, up: Tensor) -> Tensor:
    """Box corners minimising the CROWN bound of one polytope's rows (n, R, D) per domain
    (``real`` (n, R) marks the genuine rows among repeats): the corner of their sum, then, when
    R > 1, the corner of each row (see :func:`crown_corners`): (n, 1 or 1 + R, D)."""
    first = torch.where((rows * real.unsqueeze(-1).to(rows.dtype)).sum(1, keepdim=True) > 0, lo, up)
    if rows.shape[1] == 1:
        return first
    return torch.cat([first, torch.where(rows > 0, lo, up)], 1)


def crown_corners(spec: Spec, A: Tensor, m: Tensor, alive: Tensor, lo: Tensor, up: Tensor) -> Tensor:
    """Per domain, box corners that are cheap counterexample candidates: (N, 1 or 1 + R, D).

    Column 0 minimises the CROWN bound of the summed rows of the worst live polytope. When
    some polytope has several rows (R at most), the next columns minimise each row of the
    worst polytope on its own: summed rows can cancel, e.g. the two sides of ``l ≤ y ≤ u``,
    where the corner minimising one side is what a search needs."""
    n = A.shape[0]
    worst = torch.where(alive, m, torch.full_like(m, math.inf)).argmin(1)
    table, real = spec.group_rows
    rows = A.gather(1, table[worst].unsqueeze(-1).expand(-1, -1, A.shape[2]))  # (N, R, D)
    return _corners(rows, real[worst], lo.reshape(n, 1, -1), up.reshape(n, 1, -1))


@dataclass
class Pairs:
    """The (domain, polytope) pairs of a batch that are still open, each bounded on its own.

    α and β are per specification row, so the rows of different polytopes are independent
    CROWN problems: bounding only the open pairs instead of every polytope open anywhere in
    the batch cuts the work by the share of refuted pairs (on mnist_fc #56 about 600–1,000
    open pairs of 256 domains × 9 polytopes). A pair carries its polytope's R rows (R the
    largest polytope's row count; a smaller polytope repeats its first row, ``real`` marks
    the genuine ones)."""

    dom: Tensor  # (P,): the domain
    group: Tensor  # (P,): the polytope
    rows: Tensor  # (P, R): its rows in the spec
    real: Tensor  # (P, R): False on repeated rows
    C: Tensor  # (P, R, K)
    b: Tensor  # (P, R)

    @classmethod
    def of(cls, spec: Spec, alive: Tensor) -> Pairs:
        dom, group = alive.nonzero(as_tuple=True)
        table, real = spec.group_rows
        rows = table[group]
        return cls(dom, group, rows, real[group], spec.C[rows], spec.b[rows])

    def take(self, rows: Tensor, dtype: torch.dtype | None = None) -> Pairs:
        """The pairs ``rows``, their C and b in ``dtype`` (kept when None)."""
        dtype = dtype or self.C.dtype
        return Pairs(self.dom[rows], self.group[rows], self.rows[rows], self.real[rows],
                     self.C[rows].to(dtype), self.b[rows].to(dtype))


def pair_margins(bm: BoundedModel, pairs: Pairs, bounds: Intervals, lo: Tensor, up: Tensor,
                 alphas: dict[str, Tensor] | None = None, extra: dict[str, Tensor] | None = None
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One CROWN pass over P pairs (``bounds`` and the box [lo, up] given per pair): each pair's
    polytope margin (P,) (> 0: refuted; see :meth:`Spec.group_margins`), the input
    coefficients A (P, R, D) and the coefficients recorded at every node."""
    P, R = pairs.rows.shape
    rec: dict[str, Tensor] = {}
    lb, _ = bm.spec_bounds(bounds, pairs.C, "crown", bound_upper=False, intersect=False,
                           alphas=alphas, record=rec, extra=extra)
    A = rec[bm.graph.input.name].reshape(P, R, -1)
    if R == 1:
        m = lb[:, 0] - pairs.b[:, 0]
        return torch.where(torch.isfinite(m), m, torch.full_like(m, -math.inf)), A, rec
    lo_f, up_f = lo.reshape(P, -1), up.reshape(P, -1)
    c = lb - box_minimum(A, lo_f.unsqueeze(1), up_f.unsqueeze(1)) - pairs.b
    one = Spec(pairs.C.new_zeros(R, pairs.C.shape[2]), pairs.b.new_zeros(R),
               torch.zeros(R, dtype=torch.long, device=pairs.b.device), 1)
    return one.group_margins(A, c, lo_f, up_f)[:, 0], A, rec


def per_domain(pairs: Pairs, m: Tensor, live: Tensor, A: Tensor, n: int, lo: Tensor, up: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Per domain of ``n``, from its pairs' margins ``m`` and input coefficients ``A``: the worst
    margin over its live pairs (+inf when all are refuted) and the corners (:func:`_corners`) of its
    worst live pair (n, 1 or 1 + R, D), for the box [lo, up] (1, 1, D)."""
    key = torch.where(live, m, torch.full_like(m, math.inf))
    score = torch.full((n,), math.inf, dtype=m.dtype, device=m.device).scatter_reduce(0, pairs.dom, key, "amin")
    index = torch.where(key == score[pairs.dom], torch.arange(key.shape[0], device=m.device), -1)
    worst = torch.full((n,), -1, dtype=torch.long, device=m.device).scatter_reduce(0, pairs.dom, index, "amax")
    worst = worst.clamp(min=0)
    return score, _corners(A[worst], pairs.real[worst], lo, up)
