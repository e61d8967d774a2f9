"""MILP refinement of a ReLU network's intermediate bounds on one input box (HiGHS).

CROWN and α-CROWN bound each pre-activation through the triangle relaxation of every earlier
unstable ReLU; the exact bound needs each such ReLU's phase as a binary variable. This module
writes the network up to a layer as a mixed-integer program (the big-M encoding with the
current intervals as constants: for an unstable ReLU a = max(z, 0) with l < 0 < u,
``a ≥ 0, a ≥ z, a ≤ u·δ, a ≤ z − l·(1 − δ)``, δ ∈ {0, 1}) and lets HiGHS minimise and
maximise each unstable neuron of that layer within a time limit. Only the solver's proven
bound is used (its dual bound, valid when it stops early too), widened by a margin for the
solver's floating-point tolerances, and intersected with the interval already known, so a
refined interval is never looser.

Why: on mnist_fc's 256×4 network at ε = 0.05 (#56), 30 s of these programs (58 bounds of the
second layer's 70 unstable neurons, two programs at a time) took ReLU splitting from 33,885
domains (169 s) to 1,259 (8 s); the intervals moved by a few percent, but every later layer
and every domain of branch and bound inherits them.

Applies when every pre-activation is an affine function of the input and of earlier ReLU
outputs (fully connected and convolutional ReLU networks, residual ones included);
:func:`relu_layers` returns None otherwise.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from certkit.bounds.engine import BoundedModel, Interval, concretize
from certkit.complete.layer2 import BranchStats, branch_bounds

MARGIN = 1e-4  # relative widening of every solver bound: HiGHS works to tolerances of ~1e-7 per constraint
BRANCH_MARGIN = 1e-9  # the same for branch_second_layer's float64 bounds (sums of a few thousand products)


@dataclass
class ReluLayer:
    """One ReLU layer: its pre-activation z = Σ_s W_s·s + b over source nodes s (the network's
    input or earlier ReLUs' outputs), flattened. With ``relu`` empty, rows no ReLU follows
    (a property's rows over the output, as :func:`affine_layer` gives them)."""

    pre: str
    relu: str
    sources: dict[str, np.ndarray]  # source node → W (neurons, source size)
    bias: np.ndarray


@dataclass
class RefineStats:
    layers: int = 0  # layers refined (fully or in part)
    bounds: int = 0  # lower or upper bounds solved for
    tightened: int = 0  # of which the solver improved
    stabilised: int = 0  # neurons that became stable
    seconds: float = 0.0
    branch: BranchStats | None = None  # the second layer's branch and bound, where it ran
    done: bool = False  # refine's ``done`` callback stopped it


def relu_layers(bm: BoundedModel, bounds: dict[str, Interval]) -> list[ReluLayer] | None:
    """The network's ReLU layers as affine maps of earlier ones, in order; None when some
    pre-activation depends on a nonlinearity other than ReLU (or there is no ReLU)."""
    relus = bm.graph.relus
    if not relus:
        return None
    layers = []
    for r in relus:
        ref = bounds[r.inputs[0]][0]
        layer = affine_layer(bm, bounds, r.inputs[0], torch.eye(ref[0].numel(), dtype=ref.dtype, device=ref.device),
                             r.name)
        if layer is None:
            return None
        layers.append(layer)
    return layers


def affine_layer(bm: BoundedModel, bounds: dict[str, Interval], node: str, C: Tensor,
                 relu: str = "") -> ReluLayer | None:
    """The rows of C·node (C: (S, node size)) as an affine map of the input and of ReLU outputs,
    named as the ReLU layer ``relu`` (empty for a map no ReLU follows, e.g. a property's rows
    over the output); None when it depends on a nonlinearity other than ReLU."""
    graph = bm.graph
    names = {r.name for r in graph.relus} | {graph.input.name}
    first = {k: (a[:1], b[:1]) for k, (a, b) in bounds.items()}
    S = C.shape[0]
    with torch.no_grad():
        A0 = C.to(first[node][0]).reshape(1, S, *first[node][0].shape[1:])
        record: dict[str, Tensor] = {}
        bias, sources = bm._backward(node, A0, first, stop_at_nonlinear=True, record=record)[0], {}
        for s, A in record.items():
            op = graph.by_name[s].op
            if op is not None and op.affine:
                continue
            if s not in names:
                return None
            sources[s] = A.reshape(S, -1).double().cpu().numpy()
            bias = bias - concretize(A, first[s])[0]
    return ReluLayer(node, relu, sources, bias.double().cpu().numpy())


def layer_intervals(bounds: dict[str, Interval], layers: list[ReluLayer]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The intervals of the layers' pre-activations on the first box, flattened float64 arrays
    (the form :class:`_Program` and :func:`refine_layer` take)."""
    return {L.pre: tuple(t[:1].detach().reshape(-1).double().cpu().numpy() for t in bounds[L.pre]) for L in layers}


_banner_shown = False


def _highs():
    """A silent HiGHS instance. The first one made in a process prints a banner on stdout, which
    would land in the middle of command output: that one is made with stdout pointing nowhere."""
    global _banner_shown
    import highspy

    if _banner_shown:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
        _banner_shown = True
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    # presolve spends the first part of a second-long solve on a program that changes only its
    # objective between solves: without it, 1 s per bound closes 2–4× more of the gap to the LP
    # bound (mnist_fc #69's third layer, 10 neurons after the second's branch and bound: widths
    # 115.6 → 105.6 with it, → 99.6 without; eran #1's: 9.66 → 9.48 with, → 8.90 without)
    h.setOptionValue("presolve", "off")
    return h


class _Program:
    """The big-M program of the layers before ``k``, ready for one objective after another."""

    def __init__(self, layers: list[ReluLayer], k: int, input_name: str, lower: np.ndarray, upper: np.ndarray,
                 intervals: dict[str, tuple[np.ndarray, np.ndarray]]):
        import highspy

        self.highspy = highspy
        h = self.h = _highs()
        inf = highspy.kHighsInf
        self.columns = {input_name: np.arange(lower.size)}
        h.addVars(lower.size, lower, upper)
        ncol = lower.size
        for layer in layers[:k]:
            lo, up = intervals[layer.pre]
            n = lo.size
            active, inactive = lo >= 0, up <= 0
            unstable = ~active & ~inactive
            live = np.nonzero(~inactive)[0]  # neurons with a variable: z (active) or z and a (unstable)
            z = np.full(n, -1)
            z[live] = ncol + np.arange(live.size)
            h.addVars(live.size, lo[live], up[live])
            ncol += live.size
            # z − Σ W·source = b, over the sources' live columns
            idx, val = [z[live, None]], [np.ones((live.size, 1))]
            for s, W in layer.sources.items():
                cols = self.columns[s]
                keep = cols >= 0
                idx.append(np.broadcast_to(cols[keep], (live.size, int(keep.sum()))))
                val.append(-W[live][:, keep])
            idx, val = np.concatenate(idx, 1), np.concatenate(val, 1)
            width = idx.shape[1]
            b = layer.bias[live]
            h.addRows(live.size, b, b, idx.size, np.arange(live.size) * width, idx.reshape(-1).astype(np.int32),
                      val.reshape(-1))
            post = np.where(active, z, -1)
            u_idx = np.nonzero(unstable)[0]
            m = u_idx.size
            if m:
                a = ncol + np.arange(m)
                d = ncol + m + np.arange(m)
                h.addVars(m, np.zeros(m), up[u_idx])
                h.addVars(m, np.zeros(m), np.ones(m))
                ncol += 2 * m
                h.changeColsIntegrality(m, d.astype(np.int32), np.full(m, highspy.HighsVarType.kInteger))
                l_u, u_u, z_u = lo[u_idx], up[u_idx], z[u_idx]
                two, three = np.arange(m) * 2, np.arange(m) * 3
                h.addRows(m, np.zeros(m), np.full(m, inf), 2 * m, two,  # a − z ≥ 0
                          np.stack([a, z_u], 1).reshape(-1).astype(np.int32), np.tile([1.0, -1.0], m))
                h.addRows(m, np.full(m, -inf), np.zeros(m), 2 * m, two,  # a − u·δ ≤ 0
                          np.stack([a, d], 1).reshape(-1).astype(np.int32),
                          np.stack([np.ones(m), -u_u], 1).reshape(-1))
                h.addRows(m, np.full(m, -inf), -l_u, 3 * m, three,  # a − z − l·δ ≤ −l
                          np.stack([a, z_u, d], 1).reshape(-1).astype(np.int32),
                          np.stack([np.ones(m), -np.ones(m), -l_u], 1).reshape(-1))
                post[u_idx] = a
            self.columns[layer.relu] = post
        self.ncol = ncol

    def minimum(self, layer: ReluLayer, neuron: int, sign: float, seconds: float) -> float:
        """A proven lower bound of sign·z[neuron] − sign·b (−inf when the solver proved nothing)."""
        cost = np.zeros(self.ncol)
        for s, W in layer.sources.items():
            cols = self.columns[s]
            keep = cols >= 0
            np.add.at(cost, cols[keep], sign * W[neuron, keep])
        h = self.h
        h.changeColsCost(self.ncol, np.arange(self.ncol, dtype=np.int32), cost)
        h.setOptionValue("time_limit", max(seconds, 1e-3))
        h.run()
        status = h.getModelStatus()
        ok = (self.highspy.HighsModelStatus.kOptimal, self.highspy.HighsModelStatus.kTimeLimit,
              self.highspy.HighsModelStatus.kInterrupt, self.highspy.HighsModelStatus.kSolutionLimit)
        if status not in ok:
            return -math.inf
        value = h.getInfo().mip_dual_bound
        return value if math.isfinite(value) else -math.inf

    def bound(self, layer: ReluLayer, neuron: int, sign: float, seconds: float) -> float:
        """A proven bound of z[neuron] itself: a lower bound for sign 1, an upper one for sign −1
        (−inf or +inf respectively when the solver proved nothing); no tolerance margin yet."""
        return sign * (self.minimum(layer, neuron, sign, seconds) + sign * layer.bias[neuron])


def refine_layer(layers: list[ReluLayer], k: int, input_name: str, lower: np.ndarray, upper: np.ndarray,
                 intervals: dict[str, tuple[np.ndarray, np.ndarray]], expired: Callable[[], bool],
                 seconds_per_bound: float = 1.0, workers: int = 2, stats: RefineStats | None = None,
                 priority: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tighter intervals (flattened lower, upper) of layer ``k``'s pre-activations on the box
    [lower, upper] (flattened, float64), given the intervals of the earlier layers and of this
    one (``intervals``: name → (lower, upper)). Unstable neurons are taken highest ``priority``
    first (a score per neuron; without one, or on ties, most balanced first: largest
    min(−l, u)), each bound with at most ``seconds_per_bound`` of solver time, until
    ``expired()``; ``workers`` programs are solved at a time (HiGHS releases the GIL)."""
    layer = layers[k]
    lo, up = (v.copy() for v in intervals[layer.pre])
    unstable = np.nonzero((lo < 0) & (up > 0))[0]
    balance = np.minimum(-lo[unstable], up[unstable])
    keys = (-balance,) if priority is None else (-balance, -priority[unstable])
    order = unstable[np.lexsort(keys)]
    stats = stats if stats is not None else RefineStats()
    if order.size == 0:
        return lo, up
    start = time.monotonic()
    programs = [_Program(layers, k, input_name, lower, upper, intervals) for _ in range(max(1, workers))]
    jobs = [(int(i), sign) for i in order for sign in (1.0, -1.0)]

    def work(w: int) -> None:
        program = programs[w]
        for j in range(w, len(jobs), len(programs)):
            if expired():
                return
            i, sign = jobs[j]
            bound = program.bound(layer, i, sign, seconds_per_bound)
            stats.bounds += 1
            if not math.isfinite(bound):
                continue
            bound -= sign * MARGIN * (1 + abs(bound))
            if sign > 0 and bound > lo[i]:
                lo[i], stats.tightened = bound, stats.tightened + 1
            elif sign < 0 and bound < up[i]:
                up[i], stats.tightened = bound, stats.tightened + 1

    with ThreadPoolExecutor(len(programs)) as pool:
        list(pool.map(work, range(len(programs))))
    stats.layers += 1
    stats.stabilised += int(((lo[order] >= 0) | (up[order] <= 0)).sum())
    stats.seconds += time.monotonic() - start
    return lo, up


def branch_second_layer(layers: list[ReluLayer], input_name: str, lower: np.ndarray, upper: np.ndarray,
                        intervals: dict[str, tuple[np.ndarray, np.ndarray]], expired: Callable[[], bool],
                        stats: RefineStats) -> tuple[np.ndarray, np.ndarray] | None:
    """The second layer's intervals by branch and bound over the first layer's ReLU phases
    (:func:`certkit.complete.layer2.branch_bounds`), for its unstable neurons, until
    ``expired()``; None unless the first layer is affine in the input alone and the second in
    the first's ReLU outputs alone (a plain fully connected or convolutional start)."""
    first, second = layers[0], layers[1]
    if set(first.sources) != {input_name} or set(second.sources) != {first.relu}:
        return None
    lo, up = (v.copy() for v in intervals[second.pre])
    unstable = np.nonzero((lo < 0) & (up > 0))[0]
    stats.branch = stats.branch or BranchStats()
    if unstable.size == 0:
        return lo, up
    t = torch.as_tensor
    W2, b2 = second.sources[first.relu][unstable], second.bias[unstable]
    C, k = t(np.concatenate([W2, -W2])), t(np.concatenate([b2, -b2]))
    l1, u1 = intervals[first.pre]
    with torch.no_grad():
        value = branch_bounds(t(first.sources[input_name]), t(first.bias), t(l1), t(u1), t(lower), t(upper), C, k,
                              expired, stats=stats.branch).numpy()
    value = value - BRANCH_MARGIN * (1 + np.abs(value))
    n = unstable.size
    new_lo, new_up = np.maximum(lo[unstable], value[:n]), np.minimum(up[unstable], -value[n:])
    stats.tightened += int((new_lo > lo[unstable]).sum() + (new_up < up[unstable]).sum())
    stats.stabilised += int(((new_lo >= 0) | (new_up <= 0)).sum())
    stats.bounds += 2 * n
    lo[unstable], up[unstable] = new_lo, new_up
    return lo, up


def refine(bm: BoundedModel, lower: Tensor, upper: Tensor, bounds: dict[str, Interval],
           expired: Callable[[], bool], repropagate: Callable[[dict[str, Interval]], dict[str, Interval]],
           seconds_per_bound: float = 1.0, workers: int = 2, branch_expired: Callable[[], bool] | None = None,
           priority: Callable[[dict[str, Interval]], dict[str, np.ndarray]] | None = None,
           done: Callable[[dict[str, Interval]], bool] | None = None) -> tuple[dict[str, Interval], RefineStats]:
    """Refine the intervals ``bounds`` of one box (batch of 1) layer by layer, from the first
    layer with an unstable ReLU before it, until ``expired()``. After each layer
    ``repropagate(known)`` recomputes every node's interval from the refined ones (e.g. CROWN
    with them as known intervals), so the next layer's program and its unstable neurons see
    them. Returns the new intervals (``bounds`` itself when nothing applies) and statistics.

    With ``branch_expired``, the second layer is bounded by :func:`branch_second_layer` until
    it says time is up (or ``expired()`` does), where that applies, instead of by MILP: on
    mnist_fc #50 (256×4, 55 unstable first-layer ReLUs), 30 s of it closed 118 of the 256
    searches and stabilised 54 of 128 neurons, where 73 s of MILP stabilised at most a few.

    ``priority(bounds)`` scores the neurons of each ReLU's input (name → flat scores):
    MILP takes the highest first. ``done(bounds)``, asked after each layer, stops the
    refinement early (e.g. the property is proven from the intervals so far);
    ``stats.done`` says whether it did."""
    stats = RefineStats()
    layers = relu_layers(bm, bounds)
    if layers is None:
        return bounds, stats
    name = bm.graph.input.name
    lo_x = lower.reshape(-1).double().cpu().numpy()
    up_x = upper.reshape(-1).double().cpu().numpy()
    todo = [k for k in range(1, len(layers)) if set(layers[k].sources) != {name}]  # affine in x: CROWN is exact
    for k in todo:
        if expired():
            break
        intervals = layer_intervals(bounds, layers[:k + 1])
        branched = None
        if k == 1 and branch_expired is not None:
            start = time.monotonic()
            branched = branch_second_layer(layers, name, lo_x, up_x, intervals,
                                           lambda: branch_expired() or expired(), stats)
            if branched is not None:
                stats.layers += 1
                stats.seconds += time.monotonic() - start
        if branched is not None:
            lo, up = branched
        else:
            scores = priority(bounds).get(layers[k].pre) if priority is not None else None
            lo, up = refine_layer(layers, k, name, lo_x, up_x, intervals, expired, seconds_per_bound,
                                  workers, stats, scores)
        old = bounds[layers[k].pre]
        known = dict(bounds)  # every interval still holds: the recomputed ones can only be tighter
        known[layers[k].pre] = (torch.as_tensor(lo, dtype=old[0].dtype, device=old[0].device).reshape(old[0].shape),
                                torch.as_tensor(up, dtype=old[1].dtype, device=old[1].device).reshape(old[1].shape))
        bounds = repropagate(known)
        if done is not None and done(bounds):
            stats.done = True
            break
    return bounds, stats
