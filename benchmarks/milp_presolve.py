"""How much of an intermediate interval the MILP refinement closes per second of HiGHS, with
HiGHS's default presolve ("choose") against none ("off", what certkit.complete.milp uses).

    python benchmarks/milp_presolve.py [--instances mnist_fc_2022:69 eran_2021:1]
        [--neurons 10] [--seconds 1.0] [--vnncomp ../shared/vnncomp]

For each instance: α-CROWN's intervals on the property's box, the second layer by branch and
bound over the first layer's phases (as the solver's refinement does, up to 40 s), α-CROWN
again from them; then the third layer's most balanced unstable neurons, both bounds each,
with ``--seconds`` of HiGHS per bound under either setting (the same programs, one after
the other, in this process). Printed: the summed widths before and after, and the ratio of
the width each setting removes (off / choose).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from instances import add_instance_arguments, instance_paths  # benchmarks/instances.py

from certkit.complete import milp
from certkit.complete.solver import Deadline, Solver
from certkit.complete.spec import Spec
from certkit.vnnlib import read_vnnlib

DEFAULT = ["mnist_fc_2022:69", "eran_2021:1"]


def third_layer_program(onnx: Path, vnnlib: Path):
    """(solver, ReLU layers, the intervals after the second layer's branching, box) for the property's first case."""
    solver = Solver(onnx)
    case = read_vnnlib(vnnlib).cases[0]
    spec = Spec.from_case(case)
    deadline = Deadline(600)
    _, _, bounds, _ = solver.root_bounds(case, spec, deadline)
    lo, up = solver._box(case)
    refined = {"layers": 0}

    def repropagate(known):
        refined["layers"] += 1
        return solver._alpha_intervals(lo, up, known, deadline)

    stop = time.monotonic() + 40
    with torch.no_grad():
        bounds, _ = milp.refine(solver.bm, lo, up, bounds, lambda: refined["layers"] >= 1, repropagate,
                                branch_expired=lambda: time.monotonic() > stop)
    layers = milp.relu_layers(solver.bm, bounds)
    box = (lo.reshape(-1).double().numpy(), up.reshape(-1).double().numpy())
    return solver, layers, bounds, box


def widths(solver, layers, bounds, box, neurons: int, seconds: float, presolve: str) -> tuple[float, float, float]:
    """(width before, width after, solver seconds) summed over the chosen third-layer neurons."""
    k = 2
    intervals = milp.layer_intervals(bounds, layers[:k + 1])
    lo, up = intervals[layers[k].pre]
    unstable = np.nonzero((lo < 0) & (up > 0))[0]
    chosen = unstable[np.argsort(-np.minimum(-lo[unstable], up[unstable]), kind="stable")][:neurons]
    program = milp._Program(layers, k, solver.bm.graph.input.name, *box, intervals)
    program.h.setOptionValue("presolve", presolve)
    new_lo, new_up = lo[chosen].copy(), up[chosen].copy()
    start = time.perf_counter()
    for j, i in enumerate(chosen):
        for sign in (1.0, -1.0):
            bound = program.bound(layers[k], int(i), sign, seconds)  # ±inf where nothing was proven
            if sign > 0:
                new_lo[j] = max(new_lo[j], bound)
            else:
                new_up[j] = min(new_up[j], bound)
    return float((up[chosen] - lo[chosen]).sum()), float((new_up - new_lo).sum()), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_instance_arguments(ap, DEFAULT)
    ap.add_argument("--neurons", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'instance':<22} {'width before':>12} {'choose':>9} {'off':>9} {'removed off/choose':>19} {'s':>6}")
    for item in args.instances:
        solver, layers, bounds, box = third_layer_program(*instance_paths(args.vnncomp, item))
        before, after_choose, t1 = widths(solver, layers, bounds, box, args.neurons, args.seconds, "choose")
        _, after_off, t2 = widths(solver, layers, bounds, box, args.neurons, args.seconds, "off")
        ratio = (before - after_off) / max(before - after_choose, 1e-12)
        print(f"{item:<22} {before:>12.2f} {after_choose:>9.2f} {after_off:>9.2f} {ratio:>19.2f} {t1 + t2:>6.0f}")


if __name__ == "__main__":
    main()
