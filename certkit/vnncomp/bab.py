"""Branch and bound for one case of a property: input splitting and ReLU splitting.

Both loops keep a stack of open domains, each already bounded, pop a batch, split every
domain in two, bound all children in one batched pass, drop the children whose every
unsafe polytope is refuted, try the children's most suspicious points as
counterexamples, and push the rest. They stop on an answer, on the deadline, or when
the stack grows past ``max_domains``.

* Input splitting (networks with few inputs, e.g. ACAS Xu's 5): the box is halved along
  one dimension, the one with the largest smear (|coefficient of the CROWN bound| × width)
  among those at least ``min_relative_width`` (2%) as wide, relative to the root box, as
  the widest. Without that guard (pure smear) ACAS Xu 3_5 prop_1 timed out at 100 s after
  93,879 domains; with it, it takes 551 domains at 2%, 1,293 at 1%, 1,081 at 5%, 30,989 at
  25% (the earlier setting, under which 12 ACAS Xu instances timed out; 10 of them solve
  at 2%). With ``candidates`` = k > 1 the top k dimensions are each tried and the one
  whose worse child bounds best is kept; on ACAS Xu and reach_prob that bounds 3× the
  children per split for fewer splits, and k = 1 solved instances about 1.3–1.5× faster
  (robot_6: 80 s with k = 1 against 120 s with k = 3). A child is first bounded with IBP
  intersected with its parent's intervals plus one CROWN pass for the property; only the
  children left open get full CROWN intermediate bounds (1.7–1.8× faster on ACAS Xu #13
  and robot_6). The search is depth first, the child whose best candidate point (CROWN
  minimiser corners, centre) comes closest to the unsafe set on top: refuting costs the
  same in any order, and ACAS Xu #23 (violated in ~1% of one input's range) is found in
  443 domains (5953 at the 25% guard, where plain depth first timed out).
* ReLU splitting (the others): a domain is the input box plus the pre-activation
  intervals of every ReLU, with the split neurons clamped to l ≥ 0 (active) or u ≤ 0
  (inactive). Children are bounded by IBP intersected with the parent's intervals
  (so a split propagates to later layers) and then α-β-CROWN (:func:`_optimise`: ReLU
  slopes and Lagrange multipliers of the split constraints, a few Adam steps per batch,
  continuing from the parent's values); an empty domain (some l > u) is refuted. Only the
  (domain, polytope) pairs still open are bounded (:class:`_Pairs`). The neuron to split has the largest
  negative part of its output's coefficient × triangle intercept −l·u/(u−l) in the CROWN
  pass (BaBSR's intercept score; scoring |coefficient| instead took oval21 #0 from 1253 to
  20553 domains). The α-β steps run in float32, their outcome is evaluated in float64.
  Every domain's CROWN minimisers (box corners picked by the input coefficients) are
  tried as a counterexample.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from certkit.bounds import BoundedModel
from certkit.vnncomp.spec import Spec


class Confirm(Protocol):
    """Candidate points (N, *shape), with their violations (N,) when the caller has them already
    → a confirmed counterexample or None."""

    def __call__(self, points: Tensor, violation: Tensor | None = None) -> object | None: ...


Search = Callable[[Tensor, Tensor, Tensor], "object | None"]  # starts, box lo, box up (N, D) → same


@dataclass
class BabOutcome:
    stage: str  # "input-split" or "relu-split"
    status: str  # "unsat", "sat", "timeout" or "unknown"
    counterexample: object | None = None
    domains: int = 0  # domains bounded
    max_open: int = 0
    detail: str = ""


@dataclass
class _Stack:
    """Open domains as batched tensors (popped from the end: depth first)."""

    parts: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return 0 if not self.parts else next(iter(self.parts.values())).shape[0]

    def push(self, items: dict[str, Tensor]) -> None:
        if not self.parts:
            self.parts = dict(items)
        else:
            self.parts = {k: torch.cat([self.parts[k], items[k]]) for k in self.parts}

    def pop(self, n: int) -> dict[str, Tensor]:
        size = len(self)
        n = min(n, size)
        out = {k: v[size - n:] for k, v in self.parts.items()}
        self.parts = {k: v[:size - n] for k, v in self.parts.items()}
        return out


def margins(bm: BoundedModel, spec: Spec, bounds: dict[str, tuple[Tensor, Tensor]], lo: Tensor, up: Tensor,
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
    c = lb - torch.minimum(A * lo_f.unsqueeze(1), A * up_f.unsqueeze(1)).sum(-1)
    return spec.group_margins(A, c, lo_f, up_f), A, rec


def _open_score(m: Tensor, alive: Tensor) -> Tensor:
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


def input_split(bm: BoundedModel, spec: Spec, lower: Tensor, upper: Tensor, confirm: Confirm,
                expired: Callable[[], bool], batch: int = 512, candidates: int = 1,
                max_domains: int = 2_000_000, search: Search | None = None, search_every: int = 10,
                search_boxes: int = 64, reuse_parent: bool = True, min_relative_width: float = 0.02) -> BabOutcome:
    """Input-splitting branch and bound on the box [lower, upper] (shape (1, *input_shape)).

    Every ``search_every`` batches, ``search`` (a local attack) starts from the CROWN minimiser
    corners of the ``search_boxes`` open boxes with the worst bounds, each confined to its box: a
    violation too small for a search over the whole box is often easy inside a small one.
    Children are pushed so that the one whose best candidate is closest to the unsafe set is
    split first.

    With ``reuse_parent`` a child is first bounded cheaply: IBP intersected with its parent's
    pre-activation intervals (valid on the smaller box), then one CROWN pass for the
    specification. Only the children that pass leaves open get full CROWN intermediate bounds,
    the costly part (a backward pass per layer)."""
    shape = lower.shape[1:]
    D = math.prod(shape)
    pre = sorted(bm.pre_activation)

    def crown(lo: Tensor, up: Tensor, known: dict | None):
        bounds = bm.intervals(lo.reshape(-1, *shape), up.reshape(-1, *shape), "crown", known=known)
        m, A, _ = margins(bm, spec, bounds, lo, up)
        return bounds, m, A

    def bound(lo: Tensor, up: Tensor, alive: Tensor, parent: dict | None = None):
        with torch.no_grad():
            if parent is None:
                bounds, m, A = crown(lo, up, None)
            else:
                bounds = bm.intervals(lo.reshape(-1, *shape), up.reshape(-1, *shape), "ibp", known=parent)
                m, A, _ = margins(bm, spec, bounds, lo, up)
                redo = (alive & ~(m > 0)).any(1).nonzero().squeeze(1)
                if redo.numel():
                    known = {name: (lo_[redo], up_[redo]) for name, (lo_, up_) in parent.items()}
                    full, m_r, A_r = crown(lo[redo], up[redo], known)
                    m, A = m.index_copy(0, redo, m_r), A.index_copy(0, redo, A_r)
                    bounds = {name: (bounds[name][0].index_copy(0, redo, full[name][0]),
                                     bounds[name][1].index_copy(0, redo, full[name][1])) for name in pre}
        alive = alive & ~(m > 0)
        w = alive.gather(1, spec.group.expand(lo.shape[0], -1)).to(A.dtype)  # rows of live polytopes
        smear = (A.abs() * w.unsqueeze(-1)).sum(1) * (up - lo)
        kept = {name: bounds[name] for name in pre} if reuse_parent else {}
        return _open_score(m, alive), alive, smear, crown_corners(spec, A, m, alive, lo, up), kept

    def candidates_of(corners: Tensor, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each box's corners and centre (N·(c + 1), *shape), their violations and the least
        violation per box (N,)."""
        points = torch.cat([corners, ((lo + up) / 2).unsqueeze(1)], 1)
        n, c = points.shape[:2]
        with torch.no_grad():
            v = spec.violation(bm.forward(points.reshape(-1, *shape)).reshape(n * c, -1))
        return points.reshape(-1, *shape), v, v.reshape(n, c).min(1).values

    lower, upper = lower.reshape(1, D), upper.reshape(1, D)
    root_width = (upper - lower).clamp(min=1e-30)
    everything = torch.ones(1, spec.num_groups, dtype=torch.bool, device=lower.device)
    score, alive, smear, corners, kept = bound(lower, upper, everything)
    points, v, _ = candidates_of(corners, lower, upper)
    found = confirm(points, v)
    if found is not None:
        return BabOutcome("input-split", "sat", found, 1)
    if score.item() > 0:
        return BabOutcome("input-split", "unsat", None, 1)
    stack = _Stack()
    # intervals live in the stack as parts "lo:NODE" / "up:NODE"
    flat = {f"{side}:{name}": v[i] for name, v in kept.items() for i, side in enumerate(("lo", "up"))}
    stack.push({"lo": lower, "up": upper, "alive": alive, "smear": smear, "corner": corners[:, 0],
                "score": score, **flat})
    done, max_open, rounds = 1, 1, 0
    k = min(candidates, D)
    while len(stack):
        if expired():
            return BabOutcome("input-split", "timeout", None, done, max_open)
        if len(stack) > max_domains:
            return BabOutcome("input-split", "unknown", None, done, max_open, "too many open domains")
        rounds += 1
        if search is not None and rounds % search_every == 0:
            worst = stack.parts["score"].topk(min(search_boxes, len(stack)), largest=False).indices
            found = search(stack.parts["corner"][worst], stack.parts["lo"][worst], stack.parts["up"][worst])
            if found is not None:
                return BabOutcome("input-split", "sat", found, done, max_open)
        d = stack.pop(max(1, batch // (2 * k)))
        n = d["lo"].shape[0]
        # candidates: the largest smears among dimensions at least min_relative_width as wide (relative to the
        # root box) as the widest, so that no greedy choice keeps halving one dimension forever
        rel = (d["up"] - d["lo"]) / root_width
        eligible = rel >= min_relative_width * rel.amax(1, keepdim=True)
        cand = d["smear"].masked_fill(~eligible, -1.0).topk(k, dim=1).indices
        valid = eligible.gather(1, cand)  # (n, k)
        dims = cand.unsqueeze(2)  # (n, k, 1)
        lo = d["lo"].unsqueeze(1).expand(n, k, D)
        up = d["up"].unsqueeze(1).expand(n, k, D)
        mid = (lo.gather(2, dims) + up.gather(2, dims)) / 2
        up_l = up.clone().scatter_(2, dims, mid)
        lo_r = lo.clone().scatter_(2, dims, mid)
        lo_c = torch.stack([lo, lo_r], 2).reshape(-1, D)  # (n·k·2, D): domain, dimension, side
        up_c = torch.stack([up_l, up], 2).reshape(-1, D)
        parent = {name: (d[f"lo:{name}"].repeat_interleave(2 * k, 0), d[f"up:{name}"].repeat_interleave(2 * k, 0))
                  for name in pre} if reuse_parent else None
        s_c, alive_c, smear_c, corners_c, kept = bound(lo_c, up_c, d["alive"].repeat_interleave(2 * k, 0), parent)
        done += lo_c.shape[0]
        worse = s_c.reshape(n, k, 2).min(2).values.masked_fill(~valid, -math.inf)
        best = worse.argmax(1)  # the dimension whose worse child is best
        at = torch.arange(n, device=best.device).unsqueeze(1) * (2 * k)
        pick = (at + best.unsqueeze(1) * 2 + torch.arange(2, device=best.device)).reshape(-1)
        pick = pick[s_c[pick] <= 0]
        if pick.numel() == 0:
            continue
        points, v, hint = candidates_of(corners_c[pick], lo_c[pick], up_c[pick])
        found = confirm(points, v)
        if found is not None:
            return BabOutcome("input-split", "sat", found, done, max_open)
        # depth first, but the children whose best candidate point is closest to the unsafe set on top:
        # a violation in a tiny region (ACAS Xu #23: 2·10⁻⁴ deep, 1% of one input's range) is
        # reached long before the rest of the tree is refuted, and refuting costs the same in any order
        pick = pick[hint.argsort(descending=True)]
        flat = {f"{side}:{name}": v[i][pick] for name, v in kept.items() for i, side in enumerate(("lo", "up"))}
        stack.push({"lo": lo_c[pick], "up": up_c[pick], "alive": alive_c[pick], "smear": smear_c[pick],
                    "corner": corners_c[pick, 0], "score": s_c[pick], **flat})
        max_open = max(max_open, len(stack))
    return BabOutcome("input-split", "unsat", None, done, max_open)


def _slopes(relus: list, alphas: list[Tensor], shapes: list) -> dict[str, Tensor]:
    """Each ReLU's α (N, S, neurons) shaped (N, S, *node shape), keyed by the ReLU's name."""
    return {r.name: a.reshape(*a.shape[:2], *shape) for r, a, shape in zip(relus, alphas, shapes)}


def _extra(pre: list[str], signs: list[Tensor], betas: list[Tensor], shapes: list) -> dict[str, Tensor]:
    """The split terms β·σ added at each pre-activation node, shaped (N, S, *node shape)."""
    return {p: (b * sg.unsqueeze(1)).reshape(*b.shape[:2], *shape)
            for p, sg, b, shape in zip(pre, signs, betas, shapes) if bool((sg != 0).any())}


@dataclass
class _Pairs:
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
    def of(cls, spec: Spec, alive: Tensor) -> _Pairs:
        dom, group = alive.nonzero(as_tuple=True)
        table, real = spec.group_rows
        rows = table[group]
        return cls(dom, group, rows, real[group], spec.C[rows], spec.b[rows])

    def take(self, rows: Tensor, dtype: torch.dtype | None = None) -> _Pairs:
        """The pairs ``rows``, their C and b in ``dtype`` (kept when None)."""
        dtype = dtype or self.C.dtype
        return _Pairs(self.dom[rows], self.group[rows], self.rows[rows], self.real[rows],
                      self.C[rows].to(dtype), self.b[rows].to(dtype))


def pair_margins(bm: BoundedModel, pairs: _Pairs, bounds: dict[str, tuple[Tensor, Tensor]], lo: Tensor, up: Tensor,
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
    c = lb - torch.minimum(A * lo_f.unsqueeze(1), A * up_f.unsqueeze(1)).sum(-1) - pairs.b
    one = Spec(pairs.C.new_zeros(R, pairs.C.shape[2]), pairs.b.new_zeros(R),
               torch.zeros(R, dtype=torch.long, device=pairs.b.device), 1)
    return one.group_margins(A, c, lo_f, up_f)[:, 0], A, rec


def _per_domain(pairs: _Pairs, m: Tensor, live: Tensor, A: Tensor, n: int, lo: Tensor, up: Tensor
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


class _Adam:
    """Adam (PyTorch's defaults, a learning rate per tensor) whose rows can be dropped between
    steps, with their moments: :func:`_optimise` stops stepping the pairs it has refuted."""

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


def _optimise(bm: BoundedModel, pairs: _Pairs, bounds: dict, lo: Tensor, up: Tensor, relus: list, pre: list[str],
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
    if fast is not None:  # only the float64 check needs the α, β behind each kept margin
        kept_a, kept_b = [a.clone() for a in alphas], [b.clone() for b in betas]
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
    opt = _Adam(params, [lr_alpha] * len(a_s) + [lr_beta] * (len(params) - len(a_s)))
    for i in range(iterations):
        with torch.enable_grad():
            m, _, _ = pair_margins(work, w_pairs, w_bounds, w_lo, w_up, alphas=_slopes(relus, a_s, shapes),
                                   extra=_extra(pre, w_signs, b_s, shapes))
            objective = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).clamp(max=1.0).sum()
            grads = torch.autograd.grad(-objective, params, allow_unused=True)
        with torch.no_grad():
            old = kept_m[stepped]
            better = m > old  # NaN never counts as better
            kept_m[stepped] = torch.where(better, m, old)
            if fast is not None:
                rows = better.view(-1, 1, 1)
                for kept, x in zip(kept_a + kept_b, a_s + b_s):
                    kept[stepped] = torch.where(rows, x, kept[stepped])
        opt.step(params, grads)
        with torch.no_grad():
            for a in a_s:
                a.clamp_(0, 1)
            for b in b_s:
                b.clamp_(min=0)
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
                               alphas=_slopes(relus, [a.to(lo.dtype) for a in kept_a], shapes),
                               extra=_extra(pre, signs, [b.to(lo.dtype) for b in kept_b], shapes))
    return torch.maximum(best, m), final_a, final_b


def relu_split(bm: BoundedModel, spec: Spec, lower: Tensor, upper: Tensor, root: dict[str, tuple[Tensor, Tensor]],
               confirm: Confirm, expired: Callable[[], bool], batch: int = 256, max_domains: int = 200_000,
               memory: float = 4e9, iterations: int = 10, fixed_iterations: int = 50,
               fast_dtype: torch.dtype | None = torch.float32) -> BabOutcome:
    """ReLU-splitting branch and bound on the box [lower, upper] (shape (1, *input_shape)).

    ``root`` holds the intervals of every node on the whole box (e.g. CROWN's). A domain keeps
    its optimised α and β; its children start from them and get ``iterations`` more steps of
    α-β-CROWN (:func:`_optimise`), so the optimisation deepens along a branch instead of
    restarting (as β-CROWN does). A domain left open with every ReLU fixed cannot be split
    further; on it the network is affine and the bound with the best β is the exact minimum
    over the domain (LP duality), so it gets ``fixed_iterations`` more steps before it is given
    up. The open domains may take ``memory`` bytes at most (α and β dominate).

    With ``fast_dtype`` (and a network in a wider dtype), the α-β steps run on a copy of the
    network in that dtype and only each domain's kept α and β are evaluated in the network's
    own: on a CPU float32 steps cost about half as much as float64 ones."""
    relus = bm.graph.relus
    if not relus:
        return BabOutcome("relu-split", "unknown", None, 0, 0, "no ReLU to split")
    pre = [n.inputs[0] for n in relus]
    shapes = [bm.graph.by_name[p].shape for p in pre]
    sizes = [math.prod(s) for s in shapes]
    offsets = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
    shape = lower.shape[1:]
    L = range(len(pre))
    fast = None
    if fast_dtype is not None and fast_dtype != lower.dtype:
        fast = copy.deepcopy(bm).to(fast_dtype)

    def bound(d: dict[str, Tensor], iterations: int = iterations) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Bound the domains ``d`` (stack parts): (worst live margin, corners, updated parts)."""
        pairs = _Pairs.of(spec, d["alive"])
        n, P = d["alive"].shape[0], pairs.dom.shape[0]
        dom, at = pairs.dom, (pairs.dom.unsqueeze(1), pairs.rows)
        signs = [d[f"s{i}"] for i in L]
        with torch.no_grad():
            intervals = bm.intervals(lower.expand(n, *shape), upper.expand(n, *shape), "ibp",
                                      known={p: (d[f"l{i}"], d[f"u{i}"]) for i, p in zip(L, pre)})
            bounds = {k: (lo[dom], up[dom]) for k, (lo, up) in intervals.items()}
            lo_x, up_x = lower.expand(P, *shape), upper.expand(P, *shape)
            p_signs = [sg[dom] for sg in signs]
            alphas = [d[f"a{i}"][at].to(lower.dtype) for i in L]
            betas = [d[f"b{i}"][at].to(lower.dtype) for i in L]
            m, A, rec = pair_margins(bm, pairs, bounds, lo_x, up_x, alphas=_slopes(relus, alphas, shapes),
                                     extra=_extra(pre, p_signs, betas, shapes))
        if iterations > 0 and not bool((m > 0).all()):
            m, alphas, betas = _optimise(bm, pairs, bounds, lo_x, up_x, relus, pre, p_signs, m, iterations,
                                         alphas, betas, fast=fast)
        empty = torch.zeros(n, dtype=torch.bool, device=lower.device)
        for p in pre:  # a split that contradicts the others leaves an empty domain: refuted
            lo, up = intervals[p]
            empty |= ((lo - up).reshape(n, -1) > 1e-7 * (1 + up.abs().reshape(n, -1))).any(1)
        live = ~(m > 0) & ~empty[dom]  # (P,)
        alive = d["alive"].clone()
        alive[dom, pairs.group] = live
        # BaBSR: the upper line's intercept −l·u/(u − l) lowers the bound only through negative
        # coefficients of the ReLU's output (positive ones use the lower line, which has none)
        w = (pairs.real & live.unsqueeze(1)).to(A.dtype)  # (P, R): the genuine rows of live pairs
        scores = []
        for r, p in zip(relus, pre):
            lo, up = (t.reshape(n, -1) for t in intervals[p])
            unstable = (lo < 0) & (up > 0)
            intercept = torch.where(unstable, -lo * up / (up - lo).clamp(min=1e-30), torch.zeros_like(lo))
            coef = torch.zeros_like(lo)
            if r.name in rec:
                coef.index_add_(0, dom, (rec[r.name].reshape(P, pairs.rows.shape[1], -1).clamp(max=0).neg()
                                         * w.unsqueeze(-1)).sum(1))
            scores.append(torch.where(unstable, coef * intercept + 1e-12, torch.zeros_like(lo)))
        scores = torch.cat(scores, 1)
        out = {"alive": alive, "choice": scores.argmax(1), "has_split": scores.max(1).values > 0}
        for i, p in zip(L, pre):
            out[f"l{i}"], out[f"u{i}"] = intervals[p]
            out[f"s{i}"] = signs[i]
            for key, new in ((f"a{i}", alphas[i]), (f"b{i}", betas[i])):
                out[key] = d[key].clone()
                out[key][at] = new.to(out[key].dtype)
        score, corners = _per_domain(pairs, m, live, A, n, lower.reshape(1, 1, -1), upper.reshape(1, 1, -1))
        return score, corners, out

    S = spec.num_rows
    dev = lower.device
    d0 = {"alive": torch.ones(1, spec.num_groups, dtype=torch.bool, device=dev)}
    for i, (r, p) in enumerate(zip(relus, pre)):
        d0[f"l{i}"], d0[f"u{i}"] = root[p]
        d0[f"s{i}"] = torch.zeros(1, sizes[i], dtype=lower.dtype, device=dev)
        d0[f"a{i}"] = r.op.default_alpha(*root[p]).reshape(1, 1, -1).expand(1, S, -1).float()
        d0[f"b{i}"] = torch.zeros(1, S, sizes[i], device=dev)
    score, corners, d0 = bound(d0)
    found = confirm(corners.reshape(-1, *shape))
    if found is not None:
        return BabOutcome("relu-split", "sat", found, 1)
    if score.item() > 0:
        return BabOutcome("relu-split", "unsat", None, 1)
    per_domain = sum(v[0].numel() * v.element_size() for v in d0.values())
    max_domains = min(max_domains, int(memory // per_domain))
    stack = _Stack()
    stack.push(d0)
    done, max_open, stuck = 1, 1, 0
    while len(stack):
        if expired():
            return BabOutcome("relu-split", "timeout", None, done, max_open)
        if len(stack) > max_domains:
            return BabOutcome("relu-split", "unknown", None, done, max_open, "too many open domains")
        d = stack.pop(max(1, batch // 2))
        if not bool(d["has_split"].all()):  # every ReLU fixed and still open: optimise β longer
            f = {k: v[~d["has_split"]] for k, v in d.items()}
            # from β = 0: on the random networks of the tests the inherited β stalled where a fresh start did not
            f.update({f"b{i}": torch.zeros_like(f[f"b{i}"]) for i in L})
            score, corners, _ = bound(f, fixed_iterations)
            left = score <= 0
            found = confirm(corners[left].reshape(-1, *shape)) if bool(left.any()) else None
            if found is not None:
                return BabOutcome("relu-split", "sat", found, done, max_open)
            stuck += int(left.sum())
            d = {k: v[d["has_split"]] for k, v in d.items()}
            if d["alive"].shape[0] == 0:
                continue
        n = d["alive"].shape[0]
        choice = d["choice"]
        children = {k: torch.cat([v, v]) for k, v in d.items()}  # first n: active, last n: inactive
        for i in L:
            lo = children[f"l{i}"].view(2 * n, -1)  # views: the writes below land in the children
            up = children[f"u{i}"].view(2 * n, -1)
            sg = children[f"s{i}"]
            local = choice - offsets[i]
            mine = ((local >= 0) & (local < sizes[i])).nonzero().squeeze(1)
            lo[mine, local[mine]] = 0.0
            up[mine + n, local[mine]] = 0.0
            sg[mine, local[mine]] = -1.0
            sg[mine + n, local[mine]] = 1.0
        score, corners, children = bound(children)
        done += 2 * n
        open_ = score <= 0
        if bool(open_.any()):
            found = confirm(corners[open_].reshape(-1, *shape))
            if found is not None:
                return BabOutcome("relu-split", "sat", found, done, max_open)
            stack.push({k: v[open_] for k, v in children.items()})
        max_open = max(max_open, len(stack))
    if stuck:
        return BabOutcome("relu-split", "unknown", None, done, max_open,
                          f"{stuck} domain(s) with every ReLU fixed stayed open")
    return BabOutcome("relu-split", "unsat", None, done, max_open)
