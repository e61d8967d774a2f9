"""Wall time of public VNN-COMP instances decided at the root, stage by stage, against α,β-CROWN.

    OMP_NUM_THREADS=1 python benchmarks/root_speed.py [--instances FAMILY:INDEX ...]
        [--vnncomp ../shared/vnncomp] [--repeats 5] [--no-ratios]

First the networks are converted into a fresh graph cache (``certkit cache``), as VNN-COMP's
untimed prepare_instance.sh does (``--no-cache``: each child converts its network). Each
instance then runs in its own child process, as ``certkit run-instance``'s worker runs it
(same imports, the property read and the network loaded, then ``Solver.solve`` with the
instance's published time limit less the worker's margin), so that Python's start-up and the
imports are paid per instance, as in the competition. Printed per instance: the answer and
the stage that decided it, the child's whole wall time (measured by this process), and its
parts:

- imports: torch, ``certkit.complete.solver``, ``certkit.vnnlib`` and onnxruntime (imported
  lazily on the solve path), and onnx2torch with ``--no-cache`` (onnxsim, needed only for
  networks to fold, is not imported here, so it counts in load where it is used);
- load: the property read and the network loaded (``Solver.load_seconds``: the graph read
  from the cache, or converted with ``--no-cache``; onnxruntime session);
- crown-ibp, attack, crown, alpha-crown: ``SolveResult.timings`` (IBP's intervals with one
  CROWN pass from the property's rows; the first PGD; CROWN on the whole box with its
  margins; α-CROWN with the intermediate α-CROWN intervals);
- exit: the wall time outside the child's own clock: the interpreter's start and the
  process's end (the child ends with ``os._exit`` after its result, as the worker does; the
  interpreter's shutdown, tearing torch and onnx2torch down, would add about a second);
- other: the rest (PGD from CROWN's minimiser corners, branch and bound when the root
  leaves a case open, the solver's own bookkeeping).

Then the sums, α,β-CROWN's published runtime of each instance (``abcrown_runtime_s`` of the
family's ground_truth.csv: a GPU cloud machine, including its ~6 s start-up) with its sum and
the ratio of the sums; and, per distinct network, the cost of IBP and CROWN bounds of the
property's rows on the instance's box (float64, as the solver bounds) as ratios to a forward
pass: medians of ``--repeats`` timings after one warm-up call.

The default instances are decided at the root on one CPU thread (the attack for sat, CROWN
or α-CROWN for unsat), a few per family: see DEFAULT.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from instances import add_instance_arguments, instance_paths  # benchmarks/instances.py

from certkit.vnncomp.instance import SOLVE_MARGIN  # what the worker leaves before the limit (no torch import)

ROOT = Path(__file__).resolve().parents[1]

DEFAULT = [  # stage at 1 thread: attack (sat), crown-ibp, crown or alpha-crown (unsat)
    "acasxu:60",  # sat, attack
    "cifar10_resnet_2021:12",  # unsat, crown (ResNet-2b: CROWN ~1.2 s)
    "collins_rul_cnn_2022:4",  # unsat, crown
    "collins_rul_cnn_2022:9",  # sat, attack
    "eran_2021:0",  # unsat, crown (ReLU 9x200)
    "eran_2021:36",  # unsat, alpha-crown (sigmoid 6x200: CROWN leaves −31)
    "mnist_fc_2022:3",  # unsat, crown
    "mnist_fc_2022:21",  # sat, attack
    "oval21_2022:18",  # unsat, crown
    "oval21_2022:14",  # sat, attack
    "reach_prob_density_2022:15",  # sat, attack
    "rl_benchmarks_2022:0",  # unsat, crown
    "rl_benchmarks_2022:69",  # sat, attack
    "tllverifybench_2022:0",  # sat, attack
    "verivital_2021:7",  # unsat, crown
]

CHILD = r"""
import json, os, sys, time
start = time.perf_counter()
import onnxruntime, torch  # noqa: F401  (imported lazily on the solve path)
from certkit.memory import reuse_freed_memory
reuse_freed_memory()  # as the worker does
if os.environ.get("CERTKIT_CACHE") == "off":
    import onnx2torch  # noqa: F401  (converting: imported on the load path)
from certkit.complete.solver import Solver
from certkit.vnnlib import read_vnnlib
imported = time.perf_counter()
onnx, vnnlib, end = sys.argv[1], sys.argv[2], float(sys.argv[3])
prop = read_vnnlib(vnnlib)
read = time.perf_counter() - imported
solver = Solver(onnx)
t = time.perf_counter()
result = solver.solve(prop, end - time.time())
print(json.dumps({"answer": result.status.vnncomp, "stage": result.stage, "imports": imported - start,
                  "read": read, "load": solver.load_seconds, "cached": solver.from_cache,
                  "solve": time.perf_counter() - t, "timings": result.timings,
                  "total": time.perf_counter() - start}), flush=True)
os._exit(0)  # as the worker ends: no interpreter shutdown
"""

STAGES = ("crown-ibp", "attack", "crown", "alpha-crown")


def parse_child(stdout: str) -> dict:
    """The child's JSON line (the last line of its stdout that starts with ``{``)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError(f"no JSON line in the child's output: {stdout[-500:]!r}")
    return json.loads(lines[-1])


def published_timeout(vnncomp: Path, item: str) -> float:
    family, index = item.split(":")
    return float(list(csv.reader(open(vnncomp / family / "instances.csv")))[int(index)][2])


def ground_truth(vnncomp: Path, item: str) -> dict:
    """The instance's row of its family's ground_truth.csv (same order as instances.csv)."""
    family, index = item.split(":")
    return list(csv.DictReader(open(vnncomp / family / "ground_truth.csv")))[int(index)]


def prepare(vnncomp: Path, items: list[str], cache: str) -> None:
    """Convert the instances' networks into the graph cache, as VNN-COMP's untimed
    prepare_instance.sh does (``certkit cache``)."""
    if cache == "off":
        return
    networks = sorted({str(instance_paths(vnncomp, item)[0]) for item in items})
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "certkit.cli", "cache", *networks], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "CERTKIT_CACHE": cache})
    print(f"prepare (untimed, as VNN-COMP's prepare_instance.sh): {len(networks)} networks converted into the "
          f"graph cache in {time.perf_counter() - t:.1f} s")


def measure(vnncomp: Path, item: str, cache: str) -> dict:
    """Solve ``FAMILY:INDEX`` in a child process: its JSON, with ``wall`` (the child's whole
    run, measured here), ``start+exit`` (the wall time outside the child's own clock) and
    ``other`` (the child's time not in imports, load and the root stages)."""
    onnx, vnnlib = instance_paths(vnncomp, item)
    t = time.perf_counter()
    end = time.time() + published_timeout(vnncomp, item) - SOLVE_MARGIN
    out = subprocess.run([sys.executable, "-c", CHILD, str(onnx), str(vnnlib), repr(end)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CERTKIT_CACHE": cache})
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"{item}: the child failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    r = parse_child(out.stdout)
    r["wall"] = wall
    r["load"] += r["read"]
    r["start+exit"] = wall - r["total"]
    r["other"] = r["total"] - r["imports"] - r["load"] - sum(r["timings"].get(s, 0.0) for s in STAGES)
    return r


COLUMNS = ("wall", "imports", "load", *STAGES, "start+exit", "other")
HEADERS = {"alpha-crown": "α-crown", "start+exit": "exit"}


def print_table(vnncomp: Path, items: list[str], results: list[dict]) -> None:
    head = f"{'instance':26s} {'answer':7s} {'stage':11s}" + "".join(f" {HEADERS.get(c, c):>8s}" for c in COLUMNS)
    print(head + f" {'αβ-CROWN':>9s}")
    sums = dict.fromkeys(COLUMNS, 0.0)
    ab_sum, ab_wall = 0.0, 0.0
    for item, r in zip(items, results):
        values = {c: r[c] if c in r else r["timings"].get(c, 0.0) for c in COLUMNS}
        for c in COLUMNS:
            sums[c] += values[c]
        gt = ground_truth(vnncomp, item)
        ab = gt.get("abcrown_runtime_s", "")
        if ab and gt.get("abcrown_result") in ("sat", "unsat"):
            ab_sum += float(ab)
            ab_wall += values["wall"]
        truth = gt["ground_truth"]
        wrong = " (≠ ground truth)" if truth in ("sat", "unsat") and r["answer"] != truth else ""
        print(f"{item:26s} {r['answer']:7s} {r['stage'] or '-':11s}" + "".join(f" {values[c]:8.2f}" for c in COLUMNS)
              + f" {ab or '-':>9s}{wrong}")
    print(f"{'sum':46s}" + "".join(f" {sums[c]:8.2f}" for c in COLUMNS) + f" {ab_sum:9.2f}")
    if ab_sum > 0:
        print(f"certkit / α,β-CROWN (summed wall, instances it decided): {ab_wall:.2f} / {ab_sum:.2f} s "
              f"= {ab_wall / ab_sum:.2f}×  (its times include its ~6 s start-up, on a GPU)")


def bound_ratios(vnncomp: Path, items: list[str], repeats: int) -> None:
    """Per distinct network: forward, IBP and CROWN of the property's rows on its first box."""
    import torch
    from timing import timeit  # benchmarks/timing.py

    from certkit.complete.solver import Solver
    from certkit.complete.spec import Spec
    from certkit.vnnlib import read_vnnlib

    cpu = torch.device("cpu")
    print(f"\n{'network':62s} {'forward ms':>10s} {'IBP/fwd':>8s} {'CROWN/fwd':>10s} {'CROWN/IBP':>10s}")
    seen = set()
    for item in items:
        onnx, vnnlib = instance_paths(vnncomp, item)
        if onnx in seen:
            continue
        seen.add(onnx)
        solver = Solver(onnx)
        case = read_vnnlib(vnnlib).cases[0]
        lo, up = solver._box(case)
        C = Spec.from_case(case).batch_C(1)
        bm = solver.bm
        with torch.no_grad():
            fwd = timeit(lambda bm=bm, x=(lo + up) / 2: bm.forward(x), repeats, cpu, warmup=1)
            ibp = timeit(lambda bm=bm, lo=lo, up=up, C=C: bm.compute_bounds(lo, up, "ibp", C=C, bound_upper=False),
                         repeats, cpu, warmup=1)
            crown = timeit(lambda bm=bm, lo=lo, up=up, C=C: bm.compute_bounds(lo, up, "crown", C=C,
                                                                              bound_upper=False),
                           repeats, cpu, warmup=1)
        name = f"{item.split(':')[0]}/{onnx.name}"
        print(f"{name:62s} {fwd * 1e3:10.2f} {ibp / fwd:8.1f} {crown / fwd:10.1f} {crown / ibp:10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_instance_arguments(ap, DEFAULT)
    ap.add_argument("--repeats", type=int, default=5, help="timings per bound method (median)")
    ap.add_argument("--no-ratios", action="store_true", help="skip the CROWN / IBP / forward ratios")
    ap.add_argument("--no-cache", action="store_true",
                    help="convert every network in its child (no graph cache, no prepare step)")
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"one child process per instance, graph cache {'off' if args.no_cache else 'on'}; seconds")
    with tempfile.TemporaryDirectory(prefix="certkit-root-speed-") as tmp:
        cache = "off" if args.no_cache else tmp
        prepare(args.vnncomp, args.instances, cache)
        results = [measure(args.vnncomp, item, cache) for item in args.instances]
    print_table(args.vnncomp, args.instances, results)
    if not args.no_ratios:
        bound_ratios(args.vnncomp, args.instances, args.repeats)


if __name__ == "__main__":
    main()
