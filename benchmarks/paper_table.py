"""One row of the paper's tables (ALGORITHMS.md §10) at its full budget: train vanilla IBP,
CROWN-IBP and the fast method, print their errors beside the published ones.

    python benchmarks/paper_table.py --preset mnist [--model cnn7] [--methods vanilla,crown-ibp,fast]
                                     [--seed 0] [--parallel] [--data-dir DIR] [--out runs/paper]
                                     [--epochs N --limit N]   # smoke tests only

Each method is one ``certkit train --preset PRESET --method M`` run in OUT/PRESET-MODEL-M-sSEED
(its log in train.log there). With ``--parallel`` the runs share the device at once (on one
H100 three MNIST CNN-7 runs fit easily); otherwise they run one after the other. Rerunning the
command resumes unfinished runs and reuses finished ones. Errors are on the full test set at
the preset's ε, after the last epoch and at the epoch the validation split picks; the paper
reports the last epoch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from certkit.train.loop import PRESETS
from certkit.train.metrics import MetricsFile

# ALGORITHMS.md §10: (clean error, verified error) in % per (preset, model) and method
PUBLISHED = {
    ("mnist", "cnn7"): {"vanilla": (2.59, 12.03), "crown-ibp": (2.75, 12.04), "fast": (2.33, 11.03)},
    ("cifar10-short", "cnn7"): {"vanilla": (58.72, 69.88), "crown-ibp": (63.19, 71.29), "fast": (56.64, 68.81)},
    ("cifar10", "cnn7"): {"vanilla": (53.80, 67.01), "crown-ibp": (58.76, 69.67), "fast": (51.72, 65.58)},
    ("cifar10", "wide-resnet"): {"vanilla": (54.31, 67.45), "crown-ibp": (60.39, 70.07), "fast": (51.95, 65.91)},
    ("cifar10", "resnext"): {"vanilla": (55.23, 68.28), "crown-ibp": (61.08, 71.26), "fast": (53.68, 66.91)},
    ("tinyimagenet", "cnn7"): {"vanilla": (74.68, 82.84), "crown-ibp": (76.27, 83.35), "fast": (74.29, 82.36)},
}


def command(args: argparse.Namespace, method: str, run: Path) -> list[str]:
    """The ``certkit train`` command line of one method's run (``--resume`` when it has begun)."""
    base = [sys.executable, "-m", "certkit.cli", "train"]
    if (run / "last.pt").exists():
        cmd = base + ["--resume", str(run)]
        return cmd + (["--epochs", str(args.epochs)] if args.epochs else [])
    cmd = base + ["--preset", args.preset, "--model", args.model, "--method", method, "--seed", str(args.seed),
                  "--out", str(run)]
    for flag, value in (("--data-dir", args.data_dir), ("--epochs", args.epochs), ("--limit", args.limit)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--model", default="cnn7")
    ap.add_argument("--methods", default="vanilla,crown-ibp,fast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", action="store_true", help="run the methods at the same time")
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default="runs/paper")
    ap.add_argument("--epochs", type=int, help="smoke tests only: fewer epochs than the paper")
    ap.add_argument("--limit", type=int, help="smoke tests only: the first N training images")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = {m: Path(args.out) / f"{args.preset}-{args.model}-{m}-s{args.seed}" for m in methods}
    procs = {}
    for m, run in runs.items():
        run.mkdir(parents=True, exist_ok=True)
        with open(run / "train.log", "a") as log:  # the child keeps its own copy of the handle
            procs[m] = subprocess.Popen(command(args, m, run), stdout=log, stderr=subprocess.STDOUT)
        print(f"[{m}] {' '.join(procs[m].args)}  (log: {run / 'train.log'})", flush=True)
        if not args.parallel:
            procs[m].wait()
    failed = [m for m, p in procs.items() if p.wait() != 0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see their train.log)")

    published = PUBLISHED.get((args.preset, args.model), {})
    budget = "the paper's budget" if not (args.epochs or args.limit) else "a SMOKE-TEST budget (not comparable)"
    print(f"\n{args.preset}, {args.model}, seed {args.seed}, {budget}; test errors in %, clean / verified")
    print(f"{'method':10s} {'last epoch':>15s} {'picked epoch':>19s} {'paper (mean)':>15s} {'train time':>11s}")
    for m, run in runs.items():
        r = MetricsFile(run / "metrics.h5").summary()
        paper = published.get(m)
        print(f"{m:10s} {r['clean']:6.2f} / {r['verified']:6.2f} "
              f"{r['picked_clean']:6.2f} / {r['picked_verified']:6.2f} (#{r['picked_epoch']}) "
              f"{'' if paper is None else f'{paper[0]:6.2f} / {paper[1]:6.2f}':>15s} "
              f"{r['train_min']:9.1f} m")


if __name__ == "__main__":
    main()
