"""How far α-CROWN and one whole-network MILP get on the polytopes α-CROWN leaves open.

    python benchmarks/whole_network_milp.py [--instances oval21_2022:22 oval21_2022:26]
        [--seconds 120] [--alpha-steps 20 150] [--vnncomp ../shared/vnncomp]

For each instance (the property's first case): α-CROWN's root intervals (as the solver
computes them, with each ``--alpha-steps`` count per intermediate bound), the unstable ReLUs
per layer, and α-CROWN's margin (lower bound of a·y − b) of every open single-row polytope;
then the network up to its output as one HiGHS program (big-M, one binary per unstable ReLU,
the intervals of the last ``--alpha-steps`` count), minimising each open row for at most
``--seconds``. Printed per open row: α-CROWN's margins, the program's proven margin, the
solver's status and seconds. A proven margin above 0 refutes that polytope. One HiGHS
thread; programs one after the other.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from instances import add_instance_arguments, instance_paths  # benchmarks/instances.py

from certkit.complete import Deadline, Solver, SolverConfig, milp
from certkit.complete.spec import Spec
from certkit.vnnlib import read_vnnlib

DEFAULT = ["oval21_2022:22", "oval21_2022:26"]


def root(onnx, case, spec: Spec, steps: int):
    """(solver, intervals, α-CROWN margins (S,), seconds) with ``steps`` α steps per intermediate bound."""
    solver = Solver(onnx, SolverConfig(intermediate_alpha_iterations=steps, intermediate_alpha_time=0.9))
    start = time.perf_counter()
    _, _, bounds, _ = solver.root_bounds(case, spec, Deadline(3600))
    lb, _ = solver.bm.alpha_crown(bounds, spec.batch_C(1), bound_upper=False, iterations=100)
    return solver, bounds, (lb[0] - spec.b).detach(), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_instance_arguments(ap, DEFAULT)
    ap.add_argument("--seconds", type=float, default=120.0, help="HiGHS time per open row")
    ap.add_argument("--alpha-steps", type=int, nargs="+", default=[20, 150],
                    help="α-CROWN steps per intermediate bound to compare (the last one's intervals feed the MILP)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    for item in args.instances:
        onnx, vnnlib = instance_paths(args.vnncomp, item)
        case = read_vnnlib(vnnlib).cases[0]
        spec = Spec.from_case(case)
        margins = []
        for steps in args.alpha_steps:
            solver, bounds, m, seconds = root(onnx, case, spec, steps)
            margins.append(m)
            unstable = [int(((bounds[r.inputs[0]][0] < 0) & (bounds[r.inputs[0]][1] > 0)).sum())
                        for r in solver.bm.graph.relus]
            print(f"{item}: {steps} α steps per intermediate bound, {seconds:.0f} s; unstable ReLUs {unstable}")
        layers = milp.relu_layers(solver.bm, bounds)
        if layers is None:
            print(f"{item}: not a ReLU network; no program")
            continue
        lo, up = (t.reshape(-1).double().numpy() for t in solver._box(case))
        program = milp._Program(layers, len(layers), solver.bm.graph.input.name, lo, up,
                                milp.layer_intervals(bounds, layers))
        rows = milp.affine_layer(solver.bm, bounds, solver.bm.graph.output, spec.C)
        single = np.bincount(spec.group.numpy(), minlength=spec.num_groups) == 1
        print(f"{'row':>4} " + " ".join(f"{f'α-CROWN ({s})':>14}" for s in args.alpha_steps)
              + f" {'MILP':>9} {'status':>10} {'s':>6}")
        for i in range(spec.num_rows):
            if not single[int(spec.group[i])] or float(margins[-1][i]) > 0:
                continue
            start = time.perf_counter()
            proven = program.bound(rows, i, 1.0, args.seconds) - float(spec.b[i])
            status = str(program.h.getModelStatus()).split(".")[-1].removeprefix("k")
            print(f"{i:>4} " + " ".join(f"{float(m[i]):>14.4f}" for m in margins)
                  + f" {proven:>9.4f} {status:>10} {time.perf_counter() - start:>6.0f}")


if __name__ == "__main__":
    main()
