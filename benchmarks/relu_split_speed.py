"""ReLU-splitting branch and bound with α-β steps in float64 against float32 steps (the kept
α and β always evaluated in float64), on real VNN-COMP instances.

    python benchmarks/relu_split_speed.py [--instances mnist_fc_2022:25 oval21_2022:0 ...]
        [--timeout 120] [--vnncomp ../shared/vnncomp]

Each instance is solved twice in this process (one thread), once per setting, with the same
time limit; printed: answer, seconds in all and in branch and bound, domains bounded,
domains per second of branch and bound, and the ratios float64 / float32 of branch-and-bound
time (both solved) and of domains per second.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from instances import add_instance_arguments, instance_paths  # benchmarks/instances.py

from certkit.complete import Solver, SolverConfig
from certkit.vnnlib import read_vnnlib

DEFAULT = ["mnist_fc_2022:25", "mnist_fc_2022:38", "oval21_2022:0", "oval21_2022:4"]


def solve(onnx: Path, prop, timeout: float, float32_steps: bool) -> tuple[str, float, float, int]:
    """(answer, total seconds, seconds in branch and bound, domains bounded)."""
    solver = Solver(onnx, SolverConfig(float32_steps=float32_steps))
    bab_seconds = [0.0]
    inner = solver.branch_and_bound

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            bab_seconds[0] += time.perf_counter() - t

    solver.branch_and_bound = timed
    t = time.perf_counter()
    res = solver.solve(prop, timeout)
    seconds = time.perf_counter() - t
    domains = sum(int(m.group(1)) for line in res.log if (m := re.search(r"after (\d+) domains", line)))
    return res.status, seconds, bab_seconds[0], domains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_instance_arguments(ap, DEFAULT)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'instance':20s} {'steps':8s} {'answer':8s} {'s':>7s} {'BaB s':>7s} {'domains':>8s} {'dom/s':>7s}")
    for item in args.instances:
        onnx, vnnlib = instance_paths(args.vnncomp, item)
        prop = read_vnnlib(vnnlib)
        runs = {}
        for name, f32 in (("float64", False), ("float32", True)):
            status, seconds, bab, domains = runs[name] = solve(onnx, prop, args.timeout, f32)
            print(f"{item:20s} {name:8s} {status:8s} {seconds:7.1f} {bab:7.1f} {domains:8d} "
                  f"{domains / max(bab, 1e-9):7.1f}")
        (s64, _, b64, d64), (s32, _, b32, d32) = runs["float64"], runs["float32"]
        if d64 and d32:
            ratio = f"BaB time {b64 / b32:.2f}×" if s64 == s32 and s64 in ("sat", "unsat") else "BaB time n/a"
            print(f"{'':20s} ratio 64/32: {ratio}, domains/s {(d32 / b32) / (d64 / b64):.2f}×")


if __name__ == "__main__":
    main()
