"""Input-splitting branch and bound, for networks with few inputs (ACAS Xu's 5, reach_prob's 3).

The loop keeps a stack of open boxes, each already bounded, pops a batch, halves every box
along one dimension, bounds all children in one batched pass, drops the children whose
every unsafe polytope is refuted, tries the children's most suspicious points as
counterexamples, and pushes the rest. It stops on an answer, on the deadline, or when the
stack grows past ``max_domains``.

* Which dimension: the one with the largest smear (|coefficient of the CROWN bound| × width)
  among those at least ``min_relative_width`` (2%) as wide, relative to the root box, as
  the widest (:func:`certkit.complete.branching.input_candidates`). Without that guard
  (pure smear) ACAS Xu 3_5 prop_1 timed out at 100 s after 93,879 domains; with it, it
  takes 551 domains at 2%, 1,293 at 1%, 1,081 at 5%, 30,989 at 25% (the earlier setting,
  under which 12 ACAS Xu instances timed out; 10 of them solve at 2%). With ``candidates``
  = k > 1 the top k dimensions are each tried and the one whose worse child bounds best is
  kept; on ACAS Xu and reach_prob that bounds 3× the children per split for fewer splits,
  and k = 1 solved instances about 1.3–1.5× faster (robot_6: 80 s with k = 1 against 120 s
  with k = 3).
* How a child is bounded: first with IBP intersected with its parent's intervals plus one
  CROWN pass for the property; only the children left open get full CROWN intermediate
  bounds (1.7–1.8× faster on ACAS Xu #13 and robot_6).
* Which box next: depth first, the child whose best candidate point (CROWN minimiser
  corners, centre) comes closest to the unsafe set on top: refuting costs the same in any
  order, and ACAS Xu #23 (violated in ~1% of one input's range) is found in 443 domains
  (5953 at the 25% guard, where plain depth first timed out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from certkit.bounds import BoundedModel
from certkit.complete.branching import input_candidates
from certkit.complete.domains import BabOutcome, Batch, Stack
from certkit.complete.margins import Intervals, crown_corners, margins, open_score
from certkit.complete.spec import Spec
from certkit.confirm import Confirm
from certkit.status import Status

Search = Callable[[Tensor, Tensor, Tensor], "tuple | None"]  # starts, box lo, box up (N, D) → a counterexample


@dataclass
class Boxes(Batch):
    """Open input boxes, flat (N, D), with what their bounding found."""

    lo: Tensor
    up: Tensor
    alive: Tensor  # (N, G): polytopes not yet refuted on the box
    smear: Tensor  # (N, D): |CROWN input coefficient| × width, summed over live rows
    corner: Tensor  # (N, D): the CROWN minimiser corner of the worst live polytope
    score: Tensor  # (N,): the worst live margin
    pre_lo: dict[str, Tensor]  # intervals of every pre-activation node (empty without reuse)
    pre_up: dict[str, Tensor]


@dataclass
class _Bounded:
    """One bounding pass's verdict on a set of boxes (before any is kept)."""

    score: Tensor
    alive: Tensor
    smear: Tensor
    corners: Tensor  # (N, c, D)
    intervals: Intervals  # pre-activation intervals, for the children (empty without reuse)

    def keep(self, lo: Tensor, up: Tensor, rows: Tensor) -> Boxes:
        return Boxes(lo[rows], up[rows], self.alive[rows], self.smear[rows], self.corners[rows, 0], self.score[rows],
                     {k: v[0][rows] for k, v in self.intervals.items()},
                     {k: v[1][rows] for k, v in self.intervals.items()})


class _InputSplit:
    """The fixed parts of one search: the network, the property, the root box's shape."""

    def __init__(self, bm: BoundedModel, spec: Spec, shape: torch.Size, reuse_parent: bool):
        self.bm, self.spec, self.shape, self.reuse_parent = bm, spec, shape, reuse_parent
        self.pre = sorted(bm.pre_activation)

    def crown(self, lo: Tensor, up: Tensor, known: Intervals | None) -> tuple[Intervals, Tensor, Tensor]:
        bounds = self.bm.intervals(lo.reshape(-1, *self.shape), up.reshape(-1, *self.shape), "crown", known=known)
        m, A, _ = margins(self.bm, self.spec, bounds, lo, up)
        return bounds, m, A

    @torch.no_grad()
    def bound(self, lo: Tensor, up: Tensor, alive: Tensor, parent: Intervals | None = None) -> _Bounded:
        """Bound the boxes [lo, up] (N, D); with ``parent`` intervals, IBP within them first and
        full CROWN intermediate bounds only for the boxes that leaves open."""
        if parent is None:
            bounds, m, A = self.crown(lo, up, None)
        else:
            bounds = self.bm.intervals(lo.reshape(-1, *self.shape), up.reshape(-1, *self.shape), "ibp", known=parent)
            m, A, _ = margins(self.bm, self.spec, bounds, lo, up)
            redo = (alive & ~(m > 0)).any(1).nonzero().squeeze(1)
            if redo.numel():
                known = {name: (lo_[redo], up_[redo]) for name, (lo_, up_) in parent.items()}
                full, m_r, A_r = self.crown(lo[redo], up[redo], known)
                m, A = m.index_copy(0, redo, m_r), A.index_copy(0, redo, A_r)
                bounds = {name: (bounds[name][0].index_copy(0, redo, full[name][0]),
                                 bounds[name][1].index_copy(0, redo, full[name][1])) for name in self.pre}
        alive = alive & ~(m > 0)
        w = alive.gather(1, self.spec.group.expand(lo.shape[0], -1)).to(A.dtype)  # rows of live polytopes
        smear = (A.abs() * w.unsqueeze(-1)).sum(1) * (up - lo)
        kept = {name: bounds[name] for name in self.pre} if self.reuse_parent else {}
        return _Bounded(open_score(m, alive), alive, smear, crown_corners(self.spec, A, m, alive, lo, up), kept)

    @torch.no_grad()
    def candidates(self, corners: Tensor, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each box's corners and centre (N·(c + 1), *shape), their violations and the least
        violation per box (N,)."""
        points = torch.cat([corners, ((lo + up) / 2).unsqueeze(1)], 1)
        n, c = points.shape[:2]
        v = self.spec.violation(self.bm.forward(points.reshape(-1, *self.shape)).reshape(n * c, -1))
        return points.reshape(-1, *self.shape), v, v.reshape(n, c).min(1).values

    def children(self, d: Boxes, root_width: Tensor, k: int, min_relative_width: float
                 ) -> tuple[Tensor, Tensor, Tensor, Intervals | None]:
        """Both halves of every box of ``d`` along each of its k candidate dimensions:
        (lo, up) of the n·k·2 children (ordered domain, dimension, side), which candidates
        are valid (n, k), and the parents' intervals repeated for the children."""
        n, D = d.lo.shape
        cand, valid = input_candidates(d.lo, d.up, d.smear, root_width, k, min_relative_width)
        dims = cand.unsqueeze(2)  # (n, k, 1)
        lo = d.lo.unsqueeze(1).expand(n, k, D)
        up = d.up.unsqueeze(1).expand(n, k, D)
        mid = (lo.gather(2, dims) + up.gather(2, dims)) / 2
        up_l = up.clone().scatter_(2, dims, mid)
        lo_r = lo.clone().scatter_(2, dims, mid)
        lo_c = torch.stack([lo, lo_r], 2).reshape(-1, D)
        up_c = torch.stack([up_l, up], 2).reshape(-1, D)
        parent = {name: (d.pre_lo[name].repeat_interleave(2 * k, 0), d.pre_up[name].repeat_interleave(2 * k, 0))
                  for name in self.pre} if self.reuse_parent else None
        return lo_c, up_c, valid, parent


def _best_dimension(score: Tensor, valid: Tensor) -> Tensor:
    """Per parent (n of them, k candidate dimensions, two children each), the indices of the
    two children along the dimension whose worse child bounds best (n·2,)."""
    n, k = valid.shape
    worse = score.reshape(n, k, 2).min(2).values.masked_fill(~valid, -math.inf)
    best = worse.argmax(1)
    at = torch.arange(n, device=best.device).unsqueeze(1) * (2 * k)
    return (at + best.unsqueeze(1) * 2 + torch.arange(2, device=best.device)).reshape(-1)


def input_split(bm: BoundedModel, spec: Spec, lower: Tensor, upper: Tensor, confirm: Confirm,
                expired: Callable[[], bool], batch: int = 512, candidates: int = 1,
                max_domains: int = 2_000_000, search: Search | None = None, search_every: int = 10,
                search_boxes: int = 64, reuse_parent: bool = True, min_relative_width: float = 0.02) -> BabOutcome:
    """Input-splitting branch and bound on the box [lower, upper] (shape (1, *input_shape)).

    Every ``search_every`` batches, ``search`` (a local attack) starts from the CROWN minimiser
    corners of the ``search_boxes`` open boxes with the worst bounds, each confined to its box: a
    violation too small for a search over the whole box is often easy inside a small one.

    With ``reuse_parent`` a child is first bounded cheaply: IBP intersected with its parent's
    pre-activation intervals (valid on the smaller box), then one CROWN pass for the
    specification. Only the children that pass leaves open get full CROWN intermediate bounds,
    the costly part (a backward pass per layer)."""
    splitter = _InputSplit(bm, spec, lower.shape[1:], reuse_parent)
    D = math.prod(splitter.shape)
    lower, upper = lower.reshape(1, D), upper.reshape(1, D)
    root_width = (upper - lower).clamp(min=1e-30)
    everything = torch.ones(1, spec.num_groups, dtype=torch.bool, device=lower.device)
    root = splitter.bound(lower, upper, everything)
    points, v, _ = splitter.candidates(root.corners, lower, upper)
    found = confirm(points, v)
    if found is not None:
        return BabOutcome("input-split", Status.FALSIFIED, found, 1)
    if root.score.item() > 0:
        return BabOutcome("input-split", Status.VERIFIED, None, 1)
    stack: Stack[Boxes] = Stack()
    stack.push(root.keep(lower, upper, torch.arange(1, device=lower.device)))
    done, max_open, rounds = 1, 1, 0
    k = min(candidates, D)
    while len(stack):
        if expired():
            return BabOutcome("input-split", Status.TIMEOUT, None, done, max_open)
        if len(stack) > max_domains:
            return BabOutcome("input-split", Status.UNKNOWN, None, done, max_open, "too many open domains")
        rounds += 1
        if search is not None and rounds % search_every == 0:
            open_ = stack.batch
            worst = open_.score.topk(min(search_boxes, len(stack)), largest=False).indices
            found = search(open_.corner[worst], open_.lo[worst], open_.up[worst])
            if found is not None:
                return BabOutcome("input-split", Status.FALSIFIED, found, done, max_open)
        d = stack.pop(max(1, batch // (2 * k)))
        lo_c, up_c, valid, parent = splitter.children(d, root_width, k, min_relative_width)
        kids = splitter.bound(lo_c, up_c, d.alive.repeat_interleave(2 * k, 0), parent)
        done += lo_c.shape[0]
        pick = _best_dimension(kids.score, valid)
        pick = pick[kids.score[pick] <= 0]
        if pick.numel() == 0:
            continue
        points, v, hint = splitter.candidates(kids.corners[pick], lo_c[pick], up_c[pick])
        found = confirm(points, v)
        if found is not None:
            return BabOutcome("input-split", Status.FALSIFIED, found, done, max_open)
        # depth first, but the children whose best candidate point is closest to the unsafe set on top:
        # a violation in a tiny region (ACAS Xu #23: 2·10⁻⁴ deep, 1% of one input's range) is
        # reached long before the rest of the tree is refuted, and refuting costs the same in any order
        stack.push(kids.keep(lo_c, up_c, pick[hint.argsort(descending=True)]))
        max_open = max(max_open, len(stack))
    return BabOutcome("input-split", Status.VERIFIED, None, done, max_open)
