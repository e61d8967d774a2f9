"""α-β-CROWN on (domain, polytope) pairs: ReLU slopes α and split multipliers β by Adam.

A domain of ReLU splitting fixes some neurons' phases. Its bound adds β·σ·z at each split
neuron's input (σ = −1 for a neuron split active, z ≥ 0; +1 for one split inactive, z ≤ 0),
a term ≤ 0 on the domain, so any β ≥ 0 and α ∈ [0, 1] give a sound bound; :func:`optimise`
steps both to tighten it (β-CROWN's formulation, continued from the parent's values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from certkit.bounds import BoundedModel
from certkit.complete.margins import Pairs, pair_margins


def slopes(relus: list, alphas: list[Tensor], shapes: list) -> dict[str, Tensor]:
    """Each ReLU's α (N, S, neurons) shaped (N, S, *node shape), keyed by the ReLU's name."""
    return {r.name: a.reshape(*a.shape[:2], *shape) for r, a, shape in zip(relus, alphas, shapes)}


def split_terms(pre: list[str], signs: list[Tensor], betas: list[Tensor], shapes: list) -> dict[str, Tensor]:
    """The split terms β·σ added at each pre-activation node, shaped (N, S, *node shape)."""
    return {p: (b * sg.unsqueeze(1)).reshape(*b.shape[:2], *shape)
            for p, sg, b, shape in zip(pre, signs, betas, shapes) if bool((sg != 0).any())}


class Adam:
    """Adam (PyTorch's defaults, a learning rate per tensor) whose rows can be dropped between
    steps, with their moments: :func:`optimise` stops stepping the pairs it has refuted."""

    def __init__(self, params: list[Tensor], lrs: list[float], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.lrs, (self.b1, self.b2), self.eps, self.t = lrs, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, params: list[Tensor], grads: list[Tensor | None]) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v, lr in zip(params, grads, self.m, self.v, self.lrs):
            if g is None:
                continue
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.sub_(lr / c1 * m / ((v / c2).sqrt() + self.eps))

    def keep(self, rows: Tensor) -> None:
        self.m = [m[rows] for m in self.m]
        self.v = [v[rows] for v in self.v]


@torch.no_grad()
def _keep_better(kept_m: Tensor, stepped: Tensor, m: Tensor, kept: list[Tensor], current: list[Tensor]) -> None:
    """Record, per stepped pair, the margin ``m`` where it beats the kept one (NaN never
    does), and in ``kept`` the α, β behind it (empty: not needed)."""
    old = kept_m[stepped]
    better = m > old
    kept_m[stepped] = torch.where(better, m, old)
    rows = better.view(-1, 1, 1)
    for k, x in zip(kept, current):
        k[stepped] = torch.where(rows, x, k[stepped])


@torch.no_grad()
def _project(alphas: list[Tensor], betas: list[Tensor]) -> None:
    """Back into the feasible set after a step: α ∈ [0, 1], β ≥ 0."""
    for a in alphas:
        a.clamp_(0, 1)
    for b in betas:
        b.clamp_(min=0)


def optimise(bm: BoundedModel, pairs: Pairs, bounds: dict, lo: Tensor, up: Tensor, relus: list, pre: list[str],
              signs: list[Tensor], best: Tensor, iterations: int, alphas: list[Tensor], betas: list[Tensor],
              lr_alpha: float = 0.3, lr_beta: float = 0.1, fast: BoundedModel | None = None, compact: float = 0.9
              ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """α-β-CROWN on P pairs: optimise the ReLU lower slopes α ∈ [0, 1] and one multiplier β ≥ 0
    per split neuron and specification row, bounding C·y + Σ β·σ·z where σ = −1 for a neuron
    split active (z ≥ 0) and +1 for one split inactive (z ≤ 0), so every added term is ≤ 0 on
    the domain and any α, β give a sound bound.

    ``alphas`` and ``betas`` (per ReLU, (P, R, neurons)) are the starting values, e.g. the
    parent's optimised ones; ``best`` (P,) holds the margins they give. Each pair keeps the α
    and β of its best margin. With ``fast`` (the network in a cheaper dtype, e.g. float32)
    the steps run there and only the kept α and β are evaluated in ``bm``'s dtype, so the
    returned margins are as sound as one pass of ``bm``. Returns those margins and the final
    α, β, from which children continue (continuing from the kept ones instead took mnist_fc
    #67 from 607 to over 180,000 domains: Adam's last steps are progress the best-so-far
    point has not made yet).

    A refuted pair needs no more steps (it has no children), and pairs are independent
    problems: once fewer than ``compact`` of the pairs being stepped are open, the refuted
    ones leave the batch (on mnist_fc #56, 28% of 20 steps' work went to refuted pairs). The
    others' steps are unchanged.

    Adam's step sizes: ``lr_alpha`` 0.3 for α, ``lr_beta`` 0.1 for β. With 0.1 for both, mnist_fc
    #56 (ReLU splitting from α-CROWN's intervals, no MILP) needed 33,885 domains (61 s); with 0.3
    for α, 1,391 (11 s); oval21 #8 36 → 31 s, eran #9 and mnist_fc #67 about the same. β at
    0.3 or 1.0 (α at 0.1): 29,101 and 46,405 domains on #56; at 0.03, 87,035."""
    shapes = [bounds[p][0].shape[1:] for p in pre]
    work = fast if fast is not None else bm
    dt = work.dtype
    split = [bool((sg != 0).any()) for sg in signs]  # layers without a split keep β = 0
    alphas = [a.detach().to(dt, copy=True) for a in alphas]  # all P pairs; the stepped rows are copied back
    betas = [b.detach().to(dt, copy=True) for b in betas]
    # only the float64 check (with ``fast``) needs the α, β behind each kept margin
    kept_a, kept_b = ([a.clone() for a in alphas], [b.clone() for b in betas]) if fast is not None else ([], [])
    kept_m = torch.nan_to_num(best, nan=-math.inf).to(dt)
    stepped = torch.arange(best.shape[0], device=best.device)  # the pairs being stepped

    def select(rows: Tensor):
        """The stepped pairs' problem in the working dtype and their α, β as leaves to step."""
        a = [x[rows].requires_grad_(True) for x in alphas]
        b = [x[rows].requires_grad_(s) for x, s in zip(betas, split)]
        problem = ({k: (l_[rows].to(dt), u_[rows].to(dt)) for k, (l_, u_) in bounds.items()},
                   lo[rows].to(dt), up[rows].to(dt), [sg[rows].to(dt) for sg in signs], pairs.take(rows, dt))
        return a, b, a + [x for x, s in zip(b, split) if s], problem

    def put_back(a: list[Tensor], b: list[Tensor]) -> None:
        for full, x in zip(alphas + betas, a + b):
            full[stepped] = x.detach()

    a_s, b_s, params, (w_bounds, w_lo, w_up, w_signs, w_pairs) = select(stepped)
    opt = Adam(params, [lr_alpha] * len(a_s) + [lr_beta] * (len(params) - len(a_s)))
    for i in range(iterations):
        with torch.enable_grad():
            m, _, _ = pair_margins(work, w_pairs, w_bounds, w_lo, w_up, alphas=slopes(relus, a_s, shapes),
                                   extra=split_terms(pre, w_signs, b_s, shapes))
            objective = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).clamp(max=1.0).sum()
            grads = torch.autograd.grad(-objective, params, allow_unused=True)
        _keep_better(kept_m, stepped, m, kept_a + kept_b if fast is not None else [], a_s + b_s)
        opt.step(params, grads)
        _project(a_s, b_s)
        with torch.no_grad():
            open_ = ~(kept_m[stepped] > 0)
            if i + 1 < iterations and int(open_.sum()) < compact * stepped.shape[0]:
                put_back(a_s, b_s)
                stepped = stepped[open_]
                if stepped.numel() == 0:
                    break
                a_s, b_s, params, (w_bounds, w_lo, w_up, w_signs, w_pairs) = select(stepped)
                opt.keep(open_)
    if stepped.numel():
        put_back(a_s, b_s)
    final_a, final_b = [a.to(lo.dtype) for a in alphas], [b.to(lo.dtype) for b in betas]
    if fast is None:
        return kept_m, final_a, final_b
    with torch.no_grad():  # the kept α, β in full precision: these margins are the sound ones
        m, _, _ = pair_margins(bm, pairs, bounds, lo, up,
                               alphas=slopes(relus, [a.to(lo.dtype) for a in kept_a], shapes),
                               extra=split_terms(pre, signs, [b.to(lo.dtype) for b in kept_b], shapes))
    return torch.maximum(best, m), final_a, final_b
