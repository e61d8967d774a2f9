"""ReLU-splitting branch and bound, for networks with many inputs.

A domain is the input box plus the pre-activation intervals of every ReLU, with the split
neurons clamped to l ≥ 0 (active) or u ≤ 0 (inactive). The loop keeps a stack of open
domains, each already bounded, pops a batch, splits every domain in two on one neuron
(:func:`certkit.complete.branching.babsr_scores`), bounds all children in one batched pass,
drops the refuted ones, tries the children's CROWN minimiser corners as counterexamples, and
pushes the rest.

Children are bounded by IBP intersected with the parent's intervals (so a split propagates
to later layers) and then α-β-CROWN (:func:`certkit.complete.alpha_beta.optimise`: ReLU slopes
and Lagrange multipliers of the split constraints, a few Adam steps per batch, continuing
from the parent's values); an empty domain (some l > u) is refuted. Only the (domain,
polytope) pairs still open are bounded (:class:`certkit.complete.margins.Pairs`). The α-β
steps run in float32, their outcome is evaluated in float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from certkit.bounds import BoundedModel
from certkit.complete.alpha_beta import optimise, slopes, split_terms
from certkit.complete.branching import babsr_scores
from certkit.complete.domains import BabOutcome, Batch, Stack
from certkit.complete.margins import Intervals, Pairs, pair_margins, per_domain
from certkit.complete.spec import Spec
from certkit.confirm import Confirm
from certkit.status import Status


@dataclass
class ReluDomains(Batch):
    """Open ReLU-splitting domains; the lists hold one tensor per ReLU layer."""

    alive: Tensor  # (N, G): polytopes not yet refuted
    lower: list[Tensor]  # (N, *layer shape): the layer's pre-activation intervals
    upper: list[Tensor]
    signs: list[Tensor]  # (N, neurons): −1 split active, +1 split inactive, 0 not split
    alphas: list[Tensor]  # (N, S, neurons) float32: each row's ReLU lower slopes
    betas: list[Tensor]  # (N, S, neurons) float32: each row's split multipliers
    choice: Tensor  # (N,): the neuron to split next, indexed over all layers
    has_split: Tensor  # (N,): whether any unstable neuron is left to split


class _ReluSplit:
    """The fixed parts of one search: the network (and its fast copy), the property, the box."""

    def __init__(self, bm: BoundedModel, spec: Spec, lower: Tensor, upper: Tensor, fast_dtype: torch.dtype | None):
        self.bm, self.spec, self.lower, self.upper = bm, spec, lower, upper
        self.relus = bm.graph.relus
        self.pre = [n.inputs[0] for n in self.relus]
        self.shapes = [bm.graph.by_name[p].shape for p in self.pre]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [0] + list(torch.tensor(self.sizes).cumsum(0).tolist())
        self.shape = lower.shape[1:]
        self.fast = copy.deepcopy(bm).to(fast_dtype) if fast_dtype is not None and fast_dtype != lower.dtype else None

    def root(self, root: Intervals) -> ReluDomains:
        """The whole box as one domain, from the intervals ``root`` (not yet bounded)."""
        dev, S = self.lower.device, self.spec.num_rows
        layers = range(len(self.pre))
        return ReluDomains(
            alive=torch.ones(1, self.spec.num_groups, dtype=torch.bool, device=dev),
            lower=[root[p][0] for p in self.pre], upper=[root[p][1] for p in self.pre],
            signs=[torch.zeros(1, self.sizes[i], dtype=self.lower.dtype, device=dev) for i in layers],
            alphas=[r.op.default_alpha(*root[p]).reshape(1, 1, -1).expand(1, S, -1).float()
                    for r, p in zip(self.relus, self.pre)],
            betas=[torch.zeros(1, S, self.sizes[i], device=dev) for i in layers],
            choice=torch.zeros(1, dtype=torch.long, device=dev), has_split=torch.ones(1, dtype=torch.bool, device=dev))

    def bound(self, d: ReluDomains, iterations: int) -> tuple[Tensor, Tensor, ReluDomains]:
        """Bound the domains ``d``: (worst live margin, corners, the domains updated)."""
        pairs = Pairs.of(self.spec, d.alive)
        n, P = len(d), pairs.dom.shape[0]
        dom, at = pairs.dom, (pairs.dom.unsqueeze(1), pairs.rows)
        lower, upper, shape = self.lower, self.upper, self.shape
        with torch.no_grad():
            intervals = self.bm.intervals(lower.expand(n, *shape), upper.expand(n, *shape), "ibp",
                                          known={p: (lo, up) for p, lo, up in zip(self.pre, d.lower, d.upper)})
            bounds = {k: (lo[dom], up[dom]) for k, (lo, up) in intervals.items()}
            lo_x, up_x = lower.expand(P, *shape), upper.expand(P, *shape)
            p_signs = [sg[dom] for sg in d.signs]
            alphas = [a[at].to(lower.dtype) for a in d.alphas]
            betas = [b[at].to(lower.dtype) for b in d.betas]
            m, A, rec = pair_margins(self.bm, pairs, bounds, lo_x, up_x, alphas=slopes(self.relus, alphas, self.shapes),
                                     extra=split_terms(self.pre, p_signs, betas, self.shapes))
        if iterations > 0 and not bool((m > 0).all()):
            m, alphas, betas = optimise(self.bm, pairs, bounds, lo_x, up_x, self.relus, self.pre, p_signs, m,
                                        iterations, alphas, betas, fast=self.fast)
        live = ~(m > 0) & ~self._empty(intervals, n)[dom]  # (P,)
        alive = d.alive.clone()
        alive[dom, pairs.group] = live
        choice, has_split = self._branch(intervals, rec, pairs, live, A.dtype, n)
        out = ReluDomains(alive, [intervals[p][0] for p in self.pre], [intervals[p][1] for p in self.pre],
                          d.signs, _scatter(d.alphas, at, alphas), _scatter(d.betas, at, betas), choice, has_split)
        score, corners = per_domain(pairs, m, live, A, n, lower.reshape(1, 1, -1), upper.reshape(1, 1, -1))
        return score, corners, out

    def _empty(self, intervals: Intervals, n: int) -> Tensor:
        """Domains where a split contradicts the others (some l > u): refuted. (n,)"""
        empty = torch.zeros(n, dtype=torch.bool, device=self.lower.device)
        for p in self.pre:
            lo, up = intervals[p]
            empty |= ((lo - up).reshape(n, -1) > 1e-7 * (1 + up.abs().reshape(n, -1))).any(1)
        return empty

    def _branch(self, intervals: Intervals, rec: dict[str, Tensor], pairs: Pairs, live: Tensor, dtype: torch.dtype,
                n: int) -> tuple[Tensor, Tensor]:
        """BaBSR's neuron per domain (indexed over all layers) and whether any is unstable."""
        P, R = pairs.rows.shape
        w = (pairs.real & live.unsqueeze(1)).to(dtype)  # (P, R): the genuine rows of live pairs
        scores = []
        for r, p in zip(self.relus, self.pre):
            lo, up = (t.reshape(n, -1) for t in intervals[p])
            coef = torch.zeros_like(lo)
            if r.name in rec:
                negative = rec[r.name].reshape(P, R, -1).clamp(max=0).neg()
                coef.index_add_(0, pairs.dom, (negative * w.unsqueeze(-1)).sum(1))
            scores.append(babsr_scores(lo, up, coef))
        scores = torch.cat(scores, 1)
        return scores.argmax(1), scores.max(1).values > 0

    def branch(self, d: ReluDomains, iterations: int, confirm: Confirm, stack: Stack[ReluDomains]
               ) -> tuple[tuple | None, int]:
        """Split every domain of ``d``, bound the children, try the open ones' corners as
        counterexamples and push them: (a confirmed counterexample or None, children bounded)."""
        score, corners, children = self.bound(self.split(d), iterations)
        open_ = score <= 0
        if bool(open_.any()):
            found = confirm(corners[open_].reshape(-1, *self.shape))
            if found is not None:
                return found, len(children)
            stack.push(children.rows(open_))
        return None, len(children)

    def settle_fixed(self, d: ReluDomains, iterations: int, confirm: Confirm) -> tuple[tuple | None, int, ReluDomains]:
        """The domains of ``d`` with every ReLU fixed and still open cannot be split: on them the
        network is affine, so they get ``iterations`` more β steps (from β = 0: on the random
        networks of the tests the inherited β stalled where a fresh start did not). Returns a
        confirmed counterexample among them or None, how many stay open (given up), and the
        other domains of ``d``."""
        f = d.rows(~d.has_split)
        f.betas = [torch.zeros_like(b) for b in f.betas]
        score, corners, _ = self.bound(f, iterations)
        left = score <= 0
        found = confirm(corners[left].reshape(-1, *self.shape)) if bool(left.any()) else None
        return found, int(left.sum()), d.rows(d.has_split)

    def split(self, d: ReluDomains) -> ReluDomains:
        """Both children of every domain on its chosen neuron: first the n with it active, then
        the n with it inactive."""
        n = len(d)
        children = d.twice()
        for i in range(len(self.pre)):
            lo = children.lower[i].view(2 * n, -1)  # views: the writes below land in the children
            up = children.upper[i].view(2 * n, -1)
            sg = children.signs[i]
            local = d.choice - self.offsets[i]
            mine = ((local >= 0) & (local < self.sizes[i])).nonzero().squeeze(1)
            lo[mine, local[mine]] = 0.0
            up[mine + n, local[mine]] = 0.0
            sg[mine, local[mine]] = -1.0
            sg[mine + n, local[mine]] = 1.0
        return children


def _scatter(stored: list[Tensor], at: tuple[Tensor, Tensor], new: list[Tensor]) -> list[Tensor]:
    """Copies of the per-domain tensors ``stored`` with the pairs' rows ``at`` set to ``new``."""
    out = []
    for old, value in zip(stored, new):
        old = old.clone()
        old[at] = value.to(old.dtype)
        out.append(old)
    return out


def relu_split(bm: BoundedModel, spec: Spec, lower: Tensor, upper: Tensor, root: Intervals,
               confirm: Confirm, expired: Callable[[], bool], batch: int = 256, max_domains: int = 200_000,
               memory: float = 4e9, iterations: int = 10, fixed_iterations: int = 50,
               fast_dtype: torch.dtype | None = torch.float32) -> BabOutcome:
    """ReLU-splitting branch and bound on the box [lower, upper] (shape (1, *input_shape)).

    ``root`` holds the intervals of every node on the whole box (e.g. CROWN's). A domain keeps
    its optimised α and β; its children start from them and get ``iterations`` more steps of
    α-β-CROWN, so the optimisation deepens along a branch instead of restarting (as β-CROWN
    does). A domain left open with every ReLU fixed cannot be split further; on it the network
    is affine and the bound with the best β is the exact minimum over the domain (LP duality),
    so it gets ``fixed_iterations`` more steps before it is given up. The open domains may take
    ``memory`` bytes at most (α and β dominate).

    With ``fast_dtype`` (and a network in a wider dtype), the α-β steps run on a copy of the
    network in that dtype and only each domain's kept α and β are evaluated in the network's
    own: on a CPU float32 steps cost about half as much as float64 ones."""
    if not bm.graph.relus:
        return BabOutcome("relu-split", Status.UNKNOWN, None, 0, 0, "no ReLU to split")
    search = _ReluSplit(bm, spec, lower, upper, fast_dtype)
    shape = search.shape
    score, corners, d0 = search.bound(search.root(root), iterations)
    found = confirm(corners.reshape(-1, *shape))
    if found is not None:
        return BabOutcome("relu-split", Status.FALSIFIED, found, 1)
    if score.item() > 0:
        return BabOutcome("relu-split", Status.VERIFIED, None, 1)
    per_domain_bytes = sum(t[0].numel() * t.element_size() for t in _tensors(d0))
    max_domains = min(max_domains, int(memory // per_domain_bytes))
    stack: Stack[ReluDomains] = Stack()
    stack.push(d0)
    done, max_open, stuck = 1, 1, 0
    while len(stack):
        if expired():
            return BabOutcome("relu-split", Status.TIMEOUT, None, done, max_open)
        if len(stack) > max_domains:
            return BabOutcome("relu-split", Status.UNKNOWN, None, done, max_open, "too many open domains")
        d = stack.pop(max(1, batch // 2))
        if not bool(d.has_split.all()):
            found, left, d = search.settle_fixed(d, fixed_iterations, confirm)
            if found is not None:
                return BabOutcome("relu-split", Status.FALSIFIED, found, done, max_open)
            stuck += left
            if len(d) == 0:
                continue
        found, children = search.branch(d, iterations, confirm, stack)
        done += children
        if found is not None:
            return BabOutcome("relu-split", Status.FALSIFIED, found, done, max_open)
        max_open = max(max_open, len(stack))
    if stuck:
        return BabOutcome("relu-split", Status.UNKNOWN, None, done, max_open,
                          f"{stuck} domain(s) with every ReLU fixed stayed open")
    return BabOutcome("relu-split", Status.VERIFIED, None, done, max_open)


def _tensors(d: ReluDomains) -> list[Tensor]:
    """Every tensor a domain batch holds."""
    return [d.alive, d.choice, d.has_split, *d.lower, *d.upper, *d.signs, *d.alphas, *d.betas]
