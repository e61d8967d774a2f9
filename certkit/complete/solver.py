"""Solve one VNN-COMP instance: attack, incomplete bounds, then branch and bound.

For every case of the property (an input box and its unsafe polytopes):

1. PGD with restarts towards the unsafe set (minimising, over polytopes, the largest
   row of a·y − b); any point onnxruntime confirms is a ``sat`` answer;
2. CROWN, then α-CROWN on the whole box; a polytope is refuted when some row's lower
   bound of a·y − b is above 0; where one is left, PGD again, from the box corners that
   minimise CROWN's bounds (where the relaxation sees the unsafe set);
3. branch and bound until the deadline: input splitting when the network has at most
   ``input_split_max`` inputs (with PGD inside the open sub-boxes whose bounds are worst,
   every few batches), ReLU splitting otherwise.

``unsat`` needs every case refuted; a confirmed counterexample in any case is ``sat``.
Bounds are computed in float64 (the network is copied to double precision), so float32
rounding in the bound arithmetic cannot turn a tiny violation into a proof.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from certkit.attack import pgd as run_pgd
from certkit.bounds.engine import no_tf32
from certkit.bounds.ops.activation import triangle_upper
from certkit.complete import milp
from certkit.complete.config import SolverConfig
from certkit.complete.domains import BabOutcome
from certkit.complete.input_split import input_split
from certkit.complete.margins import crown_corners, margins
from certkit.complete.relu_split import relu_split
from certkit.complete.spec import Spec
from certkit.confirm import Confirm, Oracle
from certkit.errors import InvalidInput
from certkit.graph_cache import load_bounded
from certkit.status import Status
from certkit.vnnlib import Case, Property


class Deadline:
    """A wall-clock limit measured with the monotonic clock."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


@contextmanager
def timed(timings: dict[str, float] | None, stage: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]`` (nothing when ``timings`` is None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class SolveResult:
    status: Status  # VERIFIED (unsat), FALSIFIED (sat), UNKNOWN or TIMEOUT
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    stage: str = ""  # what decided it: crown-ibp, attack, crown, alpha-crown, milp-alpha-crown, input-split, relu-split
    log: list[str] = field(default_factory=list)
    # seconds per stage run: crown-ibp, attack (both rounds), crown, alpha-crown (with the intermediate
    # α-CROWN intervals), pgd-corners (PGD from CROWN's minimisers), bab (branch and bound with MILP)
    timings: dict[str, float] = field(default_factory=dict)


class Solver:
    """One ONNX network, ready to answer properties about it, its bounds computed on ``device``
    (a CUDA device with TF32 off; the MILP refinement and onnxruntime's checks run on the CPU
    whatever it is)."""

    def __init__(self, onnx_path: str | Path, config: SolverConfig | None = None, device: str | torch.device = "cpu"):
        start = time.perf_counter()
        self.config = config or SolverConfig()
        self.device = torch.device(device)
        loaded = load_bounded(onnx_path, torch.float64)  # from the graph cache when this file was converted before
        self.bm = loaded.model.to(self.device)
        self.from_cache = loaded.cached
        self.input_shape = self.bm.graph.input_shape
        self.oracle = Oracle(onnx_path, self.input_shape, checked=True)
        self.nonfinite = loaded.nonfinite  # '' when every weight is finite
        self.load_seconds = time.perf_counter() - start  # reading, converting and checking the network

    def forward(self, x: Tensor) -> Tensor:
        return self.bm.forward(x.to(self.device, torch.float64)).reshape(x.shape[0], -1)

    def check_shapes(self, prop: Property) -> None:
        D = math.prod(self.input_shape)
        if prop.num_inputs != D:
            raise InvalidInput(f"the property declares {prop.num_inputs} inputs X_i; the network takes {D} "
                               f"(shape {'×'.join(map(str, self.input_shape))})")
        K = math.prod(self.bm.graph.output_shape)
        if prop.num_outputs != K:
            raise InvalidInput(f"the property declares {prop.num_outputs} outputs Y_j; the network has {K}")

    # ---------------------------------------------------------------- stages

    def _box(self, case: Case) -> tuple[Tensor, Tensor]:
        lo = torch.as_tensor(case.lower, dtype=torch.float64, device=self.device).reshape(1, *self.input_shape)
        up = torch.as_tensor(case.upper, dtype=torch.float64, device=self.device).reshape(1, *self.input_shape)
        return lo, up

    def _confirm(self, case: Case, spec: Spec) -> Confirm:
        """Check candidates cheaply in PyTorch first (unless their violations are given);
        onnxruntime decides on the promising ones."""

        def confirm(points: Tensor, violation: Tensor | None = None):
            if violation is not None:
                v = violation
            else:
                with torch.no_grad():
                    v = spec.violation(self.forward(points))
            order = v.argsort()
            close = order[v[order] < 1e-6 * (1 + v[order].abs())][:32]
            if close.numel() == 0:
                return None
            return self.oracle.confirm(case, points[close].reshape(close.numel(), -1).double().cpu().numpy())

        return confirm

    def pgd(self, x: Tensor, lo: Tensor, up: Tensor, spec: Spec, steps: int,
            confirm: Confirm, expired: Callable[[], bool]) -> tuple | None:
        """PGD (:func:`certkit.attack.pgd`, steps decaying to a hundredth of the box width) from
        the points ``x``, each kept inside its own box [lo, up] (broadcast against x), towards
        the unsafe set; candidates are confirmed every 10 steps and at the end."""
        def violation(x: Tensor) -> Tensor:
            return spec.violation(self.forward(x))

        for i, x_i, v in run_pgd(violation, x, lo, up, steps, floor=0.01):
            if i > 0 and (i % 10 == 0 or i == steps):
                found = confirm(x_i, v)
                if found is not None:
                    return found
            if i > 0 and expired():
                return None
        return None

    def attack(self, case: Case, spec: Spec, deadline: Deadline, budget: float,
               gen: torch.Generator | None = None, centre: bool = True) -> tuple | None:
        """PGD rounds from random points (the first round also from the box's centre, with
        ``centre``) until ``budget`` s are spent, at least one round. ``gen`` draws the starting
        points (default: seeded afresh); passing the same one again continues with new points."""
        lo, up = self._box(case)
        confirm = self._confirm(case, spec)
        gen = torch.Generator().manual_seed(self.config.seed) if gen is None else gen
        stop = time.monotonic() + budget
        R, steps = self.config.attack_restarts, self.config.attack_steps
        first = True
        while first or (time.monotonic() < stop and not deadline.expired()):
            # drawn on the CPU: the same starting points on every device
            x = lo + (up - lo) * torch.rand((R, *self.input_shape), generator=gen, dtype=torch.float64).to(lo.device)
            if first and centre:
                x[0] = ((lo + up) / 2)[0]
            first = False
            found = self.pgd(x, lo, up, spec, steps, confirm, deadline.expired)
            if found is not None or deadline.expired():
                return found
        return None

    def splits_inputs(self) -> bool:
        return math.prod(self.input_shape) <= self.config.input_split_max

    def root_bounds(self, case: Case, spec: Spec, deadline: Deadline,
                    timings: dict[str, float] | None = None) -> tuple[bool, str, dict, Tensor]:
        """CROWN, then α-CROWN on the whole box: (refuted, method, node intervals, CROWN's
        minimiser corners of the polytopes left (c, *input shape), starting points for a search).

        Where ReLU splitting follows, the intermediate bounds are first tightened by α-CROWN
        too: every subdomain starts from them (on mnist_fc's 256×4 network at ε = 0.05, half
        of the unstable neurons become stable). The seconds of each go to ``timings``' crown
        and alpha-crown when it is given."""
        lo, up = self._box(case)
        cfg = self.config
        with torch.no_grad(), timed(timings, "crown"):
            bounds = self.bm.intervals(lo, up, "crown")
            m, A, _ = margins(self.bm, spec, bounds, lo, up)
            refuted = m > 0
            starts = crown_corners(spec, A, m, ~refuted, lo, up).reshape(-1, *self.input_shape)
        if bool(refuted.all()):
            return True, "crown", bounds, starts
        if deadline.expired() or cfg.alpha_iterations <= 0:
            return False, "", bounds, starts
        with timed(timings, "alpha-crown"):
            if not self.splits_inputs() and cfg.intermediate_alpha_iterations > 0:
                bounds = self._alpha_intervals(lo, up, bounds, deadline)
            lb, _ = self.bm.alpha_crown(bounds, spec.batch_C(1), bound_upper=False, iterations=cfg.alpha_iterations)
        return bool((refuted | spec.refuted(lb)).all()), "alpha-crown", bounds, starts

    def milp_applies(self) -> bool:
        """Whether ReLU splitting may start again from MILP-refined intervals: ReLU networks
        (every other operator affine) of at most ``milp_max_neurons`` ReLU neurons."""
        cfg = self.config
        piecewise_affine = all(n.op.affine or n.op.kind == "relu" for n in self.bm.graph.nodes[1:])
        return (cfg.milp_time > 0 and not self.splits_inputs() and piecewise_affine
                and 0 < self.relu_neurons() <= cfg.milp_max_neurons)

    def milp_bounds(self, case: Case, spec: Spec, bounds: dict, deadline: Deadline, seconds: float,
                    note: Callable[[str], None]) -> tuple[bool, dict]:
        """The root's intervals refined by MILP (:mod:`certkit.complete.milp`) within ``seconds``,
        later layers re-propagated by α-CROWN: (refuted by α-CROWN from them, the intervals).
        α-CROWN tries the property after every layer, so the refinement stops as soon as
        the intervals suffice."""
        lo, up = self._box(case)
        cfg = self.config
        now = time.monotonic()
        stop, branch_stop = now + seconds, now + cfg.milp_branch * seconds

        def refutes(known: dict) -> bool:
            lb, _ = self.bm.alpha_crown(known, spec.batch_C(1), bound_upper=False, iterations=cfg.alpha_iterations)
            return bool(spec.refuted(lb).all())

        with torch.no_grad():
            bounds, stats = milp.refine(self.bm, lo, up, bounds, lambda: time.monotonic() > stop,
                                        lambda known: self._alpha_intervals(lo, up, known, deadline),
                                        cfg.milp_seconds_per_bound, cfg.milp_workers,
                                        branch_expired=(lambda: time.monotonic() > branch_stop)
                                        if cfg.milp_branch > 0 else None,
                                        priority=(lambda known: self.relaxation_costs(spec, known))
                                        if cfg.milp_priority else None,
                                        done=refutes)
        if stats.bounds:
            b = stats.branch
            branched = (f" (the second layer's by branch and bound: {b.domains} domains, {b.closed} of {b.objectives}"
                        f" searches closed in {b.seconds:.1f} s)" if b is not None else "")
            note(f"MILP refinement: {stats.bounds} bounds of {stats.layers} layer(s) solved in {stats.seconds:.1f} s"
                 f"{branched}, {stats.tightened} tightened, {stats.stabilised} neuron(s) stabilised"
                 f"{'; α-CROWN refutes the property from them' if stats.done else ''}")
        return stats.done, bounds

    def relaxation_costs(self, spec: Spec, bounds: dict) -> dict[str, np.ndarray]:
        """Per ReLU input (flat): what its triangle relaxation can cost CROWN's bound of the
        property, |λ|·(−l·u/(u − l)) summed over the property's rows, with λ the coefficient
        reaching the ReLU's output (0 where the neuron is stable)."""
        record: dict[str, Tensor] = {}
        self.bm.spec_bounds(bounds, spec.batch_C(1), "crown", bound_upper=False, intersect=False, record=record)
        costs = {}
        for relu in self.bm.graph.relus:
            lam = record.get(relu.name)
            if lam is None:
                continue
            _, gap = triangle_upper(*bounds[relu.inputs[0]])
            costs[relu.inputs[0]] = (lam.abs().sum(1) * gap).reshape(-1).double().cpu().numpy()
        return costs

    def _alpha_intervals(self, lo: Tensor, up: Tensor, known: dict, deadline: Deadline) -> dict:
        """Every node's interval by α-CROWN (CROWN once the time share for it is spent),
        intersected with the ``known`` intervals."""
        cfg = self.config
        stop = time.monotonic() + cfg.intermediate_alpha_time * deadline.left()
        return self.bm.intervals(lo, up, "crown", known=known, alpha_iterations=cfg.intermediate_alpha_iterations,
                                 expired=lambda: time.monotonic() > stop)

    def relu_neurons(self) -> int:
        """How many neurons feed a ReLU, over the whole network (the MILP refinement's size guard)."""
        graph = self.bm.graph
        return sum(math.prod(graph.by_name[n.inputs[0]].shape) for n in graph.relus)

    # ---------------------------------------------------------------- driver

    def solve(self, prop: Property, timeout: float, log: Callable[[str], None] | None = None) -> SolveResult:
        with no_tf32():
            return self._solve(prop, timeout, log)

    def _solve(self, prop: Property, timeout: float, log: Callable[[str], None] | None) -> SolveResult:
        deadline = Deadline(timeout)
        torch.manual_seed(self.config.seed)
        self.check_shapes(prop)
        result = SolveResult(Status.UNKNOWN)

        def note(msg: str) -> None:
            result.log.append(msg)
            if log is not None:
                log(msg)

        if self.nonfinite:  # NaN arithmetic proves nothing and finds nothing: never sat or unsat from it
            note(f"unknown: {self.nonfinite}")
            return result
        cases = [(i, case, Spec.from_case(case, device=self.device)) for i, case in enumerate(prop.cases)]
        timings = result.timings
        decided = self._decide(cases, timeout, deadline, note, timings)
        decided.log = result.log
        decided.timings = timings
        return decided

    def _decide(self, cases: list[tuple[int, Case, Spec]], timeout: float, deadline: Deadline,
                note: Callable[[str], None], timings: dict[str, float]) -> SolveResult:
        """The stages in order of expected cost: CROWN-IBP (IBP's intervals, one CROWN pass from
        the property's rows: a few forward passes' cost) drops the cases it refutes; one round
        of PGD per case left (most counterexamples fall to it); the bounds at the root (CROWN,
        α-CROWN, PGD from CROWN's minimisers); the rest of the attack budget on the cases the
        root leaves open (the starting points the attack would have drawn next); then branch
        and bound. An unsat instance decided at the root so pays one round of PGD, not the
        whole attack budget."""
        budget = min(self.config.attack_time_max, self.config.attack_time * timeout)
        with timed(timings, "crown-ibp"):
            cases = self._cheap_stage(cases, note)
        if not cases:
            return SolveResult(Status.VERIFIED, stage="crown-ibp")
        draws = {i: torch.Generator().manual_seed(self.config.seed) for i, _, _ in cases}
        with timed(timings, "attack"):
            decided = self._attack_stage(cases, deadline, note, draws)
        if decided is not None:
            return decided
        decided, open_cases, root_stage = self._root_stage(cases, deadline, note, timings)
        if decided is not None:
            return decided
        if not open_cases:
            return SolveResult(Status.VERIFIED, stage=root_stage)
        rest = (budget - timings.get("attack", 0.0)) / len(open_cases)
        if rest > 0:
            with timed(timings, "attack"):
                decided = self._attack_stage([c[:3] for c in open_cases], deadline, note, draws, rest)
            if decided is not None:
                return decided
        with timed(timings, "bab"):
            return self._bab_stage(open_cases, root_stage, deadline, note)

    def _cheap_stage(self, cases: list[tuple[int, Case, Spec]], note: Callable[[str], None]
                     ) -> list[tuple[int, Case, Spec]]:
        """The cases CROWN-IBP does not refute (a refuted case has no counterexample)."""
        left = []
        for i, case, spec in cases:
            lo, up = self._box(case)
            with torch.no_grad():
                m, _, _ = margins(self.bm, spec, self.bm.intervals(lo, up, "ibp"), lo, up)
            if bool((m > 0).all()):
                note(f"case {i}: refuted by crown-ibp")
            else:
                left.append((i, case, spec))
        return left

    def _attack_stage(self, cases: list[tuple[int, Case, Spec]], deadline: Deadline, note: Callable[[str], None],
                      draws: dict[int, torch.Generator], budget: float | None = None) -> SolveResult | None:
        """PGD on every case: one round each (``budget`` None), or more rounds for ``budget``
        seconds each, continuing each case's draws. An answer, or None to go on."""
        for i, case, spec in cases:
            found = self.attack(case, spec, deadline, budget or 0.0, draws[i], centre=budget is None)
            if found is not None:
                note(f"case {i}: counterexample from PGD")
                return SolveResult(Status.FALSIFIED, *found, stage="attack")
            if deadline.expired():
                return SolveResult(Status.TIMEOUT)
        return None

    def _root_stage(self, cases: list[tuple[int, Case, Spec]], deadline: Deadline, note: Callable[[str], None],
                    timings: dict[str, float] | None = None
                    ) -> tuple[SolveResult | None, list[tuple[int, Case, Spec, dict]], str]:
        """CROWN / α-CROWN on every case's whole box, and PGD from CROWN's minimisers where a
        polytope is left: (an answer or None, the cases left open with their intervals, the
        method that refuted the others); each stage's seconds added to ``timings``."""
        open_cases, root_stage = [], "crown"
        for i, case, spec in cases:
            refuted, method, bounds, starts = self.root_bounds(case, spec, deadline, timings)
            if refuted:
                note(f"case {i}: refuted by {method}")
                root_stage = method if method == "alpha-crown" else root_stage
            else:
                # the corners minimising CROWN's bound lie where the relaxation sees the unsafe set:
                # collins #20's output is flat on every random start, 14.7 of the 18 needed there
                lo, up = self._box(case)
                with timed(timings, "pgd-corners"):
                    found = self.pgd(starts, lo, up, spec, self.config.attack_steps, self._confirm(case, spec),
                                     deadline.expired)
                if found is not None:
                    note(f"case {i}: counterexample from PGD started at CROWN's minimisers")
                    return SolveResult(Status.FALSIFIED, *found, stage="attack"), [], root_stage
                open_cases.append((i, case, spec, bounds))
            if deadline.expired():
                return SolveResult(Status.TIMEOUT), [], root_stage
        return None, open_cases, root_stage

    def _bab_stage(self, open_cases: list[tuple[int, Case, Spec, dict]], root_stage: str, deadline: Deadline,
                   note: Callable[[str], None]) -> SolveResult:
        """Branch and bound on each open case in turn: sat as soon as one case has a
        counterexample, unsat when all are refuted."""
        stage, unresolved = "alpha-crown", False
        for i, case, spec, bounds in open_cases:
            outcome = self.branch_and_bound(case, spec, bounds, deadline, lambda m, i=i: note(f"case {i}: {m}"))
            stage = outcome.stage
            note(f"case {i}: {outcome.status.vnncomp} by {stage} after {outcome.domains} domains "
                 f"(at most {outcome.max_open} open){'; ' + outcome.detail if outcome.detail else ''}")
            if outcome.status is Status.FALSIFIED:
                return SolveResult(Status.FALSIFIED, *outcome.counterexample, stage=stage)
            if outcome.status is Status.TIMEOUT:
                return SolveResult(Status.TIMEOUT)
            unresolved |= outcome.status is not Status.VERIFIED
        if unresolved:
            return SolveResult(Status.UNKNOWN)
        return SolveResult(Status.VERIFIED, stage=stage if open_cases else root_stage)

    def branch_and_bound(self, case: Case, spec: Spec, bounds: dict, deadline: Deadline,
                         note: Callable[[str], None] = lambda m: None) -> BabOutcome:
        """Input splitting for networks with few inputs, ReLU splitting otherwise. Where MILP
        applies, ReLU splitting first gets ``milp_after`` of the time left from α-CROWN's
        intervals (mnist_fc #25, #38 and #67 and eran #9 need 7–14 s that way); if it has
        not finished, the intervals are refined by MILP for ``milp_time`` of the time left
        before that first try (less left #45 open: the second layer of its 256×4 network
        needs all of the ~73 s of a 300 s limit) and splitting starts again from them
        (mnist_fc #45, #55, #56 and #59 need that)."""
        lo, up = self._box(case)
        confirm = self._confirm(case, spec)
        if self.splits_inputs():
            def search(starts: Tensor, lo_: Tensor, up_: Tensor) -> tuple | None:
                return self.pgd(starts.reshape(-1, *self.input_shape), lo_.reshape(-1, *self.input_shape),
                                up_.reshape(-1, *self.input_shape), spec, self.config.box_attack_steps, confirm,
                                deadline.expired)

            return input_split(self.bm, spec, lo, up, confirm, deadline.expired,
                               candidates=self.config.split_candidates, search=search,
                               reuse_parent=self.config.reuse_parent_bounds,
                               search_every=self.config.box_attack_every,
                               min_relative_width=self.config.split_min_width)
        fast = torch.float32 if self.config.float32_steps else None
        if self.milp_applies():
            left = deadline.left()
            stop = time.monotonic() + self.config.milp_after * left
            first = relu_split(self.bm, spec, lo, up, bounds, confirm,
                               lambda: deadline.expired() or time.monotonic() > stop, fast_dtype=fast,
                               iterations=self.config.bab_iterations)
            if first.status is not Status.TIMEOUT or deadline.expired():
                return first
            note(f"relu-split open after {first.domains} domains; refining the root's intervals")
            refuted, bounds = self.milp_bounds(case, spec, bounds, deadline, self.config.milp_time * left, note)
            if refuted:
                return BabOutcome("milp-alpha-crown", Status.VERIFIED, domains=first.domains, max_open=first.max_open)
            if deadline.expired():
                return BabOutcome("relu-split", Status.TIMEOUT, domains=first.domains, max_open=first.max_open)
        return relu_split(self.bm, spec, lo, up, bounds, confirm, deadline.expired, fast_dtype=fast,
                          iterations=self.config.bab_iterations)
