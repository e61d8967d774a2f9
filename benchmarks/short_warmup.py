"""Vanilla IBP vs the fast method on the same short budget: real MNIST, cnn-small, ε = 0.3 (train 0.4).

    python benchmarks/short_warmup.py [--epochs 30] [--schedule 1,10] [--milestones 20,25] [--seeds 0,1,2]
                                      [--out runs/short_warmup]

Both methods train with the same budget (epochs, ε ramp, lr schedule, seeds, data), each run
about 15 minutes on a 2-core CPU at 30 epochs. Prints clean and IBP-verified test errors (%)
side by side per seed, at the last epoch and at the epoch the validation split picks, and
their means over the seeds: on this small model one seed can differ from the next by 10
points of verified error, so single runs decide nothing. Runs (OUT/METHOD-sSEED) are
resumable: rerunning the command continues unfinished runs and reuses finished ones, so
seeds can also run at once as separate commands (``--seeds 1``) before one that prints all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from certkit.train.loop import config_from, train
from certkit.train.metrics import MetricsFile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--schedule", default="1,10")
    ap.add_argument("--milestones", default="20,25")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default="runs/short_warmup")
    args = ap.parse_args()
    start, length = (int(v) for v in args.schedule.split(","))
    milestones = tuple(int(v) for v in args.milestones.split(","))
    seeds = [int(v) for v in args.seeds.split(",")]
    results = {}
    for seed in seeds:
        for method in ("vanilla", "fast"):
            cfg = config_from("mnist", model="cnn-small", method=method, eps=0.4, eps_eval=0.3, epochs=args.epochs,
                              schedule_start=start, schedule_length=length, milestones=milestones, seed=seed,
                              data_dir=args.data_dir)
            run = Path(args.out) / f"{method}-s{seed}"
            resume = (run / "last.pt").exists()
            train(cfg, run, resume=resume, log=lambda line, m=method, s=seed: print(f"[{m} s{s}] {line}", flush=True))
            r = MetricsFile(run / "metrics.h5").summary()
            results[method, seed] = tuple(r[k] for k in ("clean", "verified", "picked_clean", "picked_verified",
                                                         "picked_epoch", "train_min"))
    print(f"\nMNIST, cnn-small, eps 0.3 (train 0.4), {args.epochs} epochs, ramp start {start} length {length}, "
          f"lr x0.2 at {milestones}; errors in % on the 10,000 test images")
    print(f"{'method':8s} {'seed':>5s} {'clean (last)':>13s} {'verified (last)':>16s} {'clean (best)':>13s} "
          f"{'verified (best)':>16s} {'best epoch':>10s} {'train min':>10s}")
    for method in ("vanilla", "fast"):
        rows = [results[method, seed] for seed in seeds]
        for seed, r in zip(seeds, rows):
            print(f"{method:8s} {seed:5d} {r[0]:13.2f} {r[1]:16.2f} {r[2]:13.2f} {r[3]:16.2f} {int(r[4]):10d} "
                  f"{r[5]:10.1f}")
        mean = np.mean(np.array(rows), 0)
        print(f"{method:8s} {'mean':>5s} {mean[0]:13.2f} {mean[1]:16.2f} {mean[2]:13.2f} {mean[3]:16.2f}")


if __name__ == "__main__":
    main()
