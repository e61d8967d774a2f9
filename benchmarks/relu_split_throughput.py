"""Domains per second of ReLU-splitting branch and bound: this tree against an earlier commit.

    python benchmarks/relu_split_throughput.py [--baseline REV] [--batches 40] [--repeats 2]
        [--instances mnist_fc_2022:56 oval21_2022:8 eran_2021:9] [--vnncomp ../shared/vnncomp]

Per instance: CROWN then α-CROWN intervals at the root (as ``Solver.root_bounds`` computes
them), then ``relu_split`` for a fixed number of batches. The same search runs in both trees
when the change is a pure speed-up, so the domain counts printed should agree. Each tree
runs in its own child process (``git archive REV certkit`` for the baseline), one at a
time, ``--repeats`` times each, interleaved; the fastest run of each counts. Printed:
domains, seconds and domains/s per tree, and the ratio this tree / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["mnist_fc_2022:56", "oval21_2022:8", "eran_2021:9"]

CHILD = r"""
import csv, json, sys, time
from pathlib import Path
import torch
import certkit
print(json.dumps({"certkit": certkit.__file__}))
try:
    from certkit.complete import Deadline, Solver, SolverConfig
    from certkit.complete.relu_split import relu_split
    from certkit.complete.spec import Spec
except ImportError:  # a tree from before certkit/complete/
    from certkit.vnncomp.bab import relu_split
    from certkit.vnncomp.solver import Deadline, Solver, SolverConfig
    from certkit.vnncomp.spec import Spec
from certkit.vnnlib import read_vnnlib

root, index, batches = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
onnx, vnnlib, _ = list(csv.reader(open(root / "instances.csv")))[index]
solver = Solver(root / onnx, SolverConfig())
case = read_vnnlib(root / vnnlib).cases[0]
spec = Spec.from_case(case)
_, _, bounds, _ = solver.root_bounds(case, spec, Deadline(600))
lo, up = solver._box(case)
calls = [0]

def expired():
    calls[0] += 1
    return calls[0] > batches

t = time.perf_counter()
out = relu_split(solver.bm, spec, lo, up, bounds, solver._confirm(case, spec), expired, fast_dtype=torch.float32)
status = getattr(out.status, "vnncomp", out.status)  # a Status, or a string in trees before certkit.status
print(json.dumps({"domains": out.domains, "seconds": time.perf_counter() - t, "status": status}))
"""


def measure(tree: Path, family_dir: Path, index: int, batches: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # run in the tree: ``python -c`` imports from its cwd first
    out = subprocess.run([sys.executable, "-c", CHILD, str(family_dir.resolve()), str(index), str(batches)],
                         env=env, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{family_dir.name} #{index} in {tree}: the child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["certkit"] == str(tree / "certkit" / "__init__.py"), lines[0]  # the tree asked for
    return lines[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="12f70fe~1", help="commit to compare with (default: before pair bounding)")
    ap.add_argument("--instances", nargs="*", default=DEFAULT, help="FAMILY:INDEX (row of instances.csv)")
    ap.add_argument("--batches", type=int, default=40, help="batches of ReLU splitting per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vnncomp", type=Path, default=ROOT.parent / "shared" / "vnncomp")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "baseline.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), args.baseline, "certkit"], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(Path(tmp) / "baseline", filter="data")
        trees = {"baseline": Path(tmp) / "baseline", "this tree": ROOT}
        print(f"{'instance':20s} {'tree':10s} {'domains':>8s} {'s':>7s} {'dom/s':>7s}")
        for item in args.instances:
            family, index = item.split(":")
            best: dict[str, dict] = {}
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    r = measure(tree, args.vnncomp / family, int(index), args.batches)
                    if name not in best or r["seconds"] < best[name]["seconds"]:
                        best[name] = r
            for name, r in best.items():
                print(f"{item:20s} {name:10s} {r['domains']:8d} {r['seconds']:7.1f} {r['domains'] / r['seconds']:7.1f}")
            b, t = best["baseline"], best["this tree"]
            ratio = (t["domains"] / t["seconds"]) / (b["domains"] / b["seconds"])
            same = "" if t["domains"] == b["domains"] else " (different searches: domain counts differ)"
            print(f"{'':20s} ratio this tree / baseline: {ratio:.2f}× domains/s{same}")


if __name__ == "__main__":
    main()
