"""Vanilla IBP vs the fast method on the same short budget: real MNIST, cnn-small, ε = 0.3 (train 0.4).

    python benchmarks/short_warmup.py [--epochs 30] [--schedule 1,10] [--milestones 20,25] [--out runs/short_warmup]

Both methods train with the same budget (epochs, ε ramp, lr schedule, seed, data), each about
15 minutes on a 2-core CPU. Prints clean and IBP-verified test errors (%) side by side, at the
last epoch and at the epoch the validation split picks. Runs are resumable: rerunning the
command continues unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from certkit.train.loop import config_from, train
from certkit.train.metrics import MetricsFile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--schedule", default="1,10")
    ap.add_argument("--milestones", default="20,25")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default="runs/short_warmup")
    args = ap.parse_args()
    start, length = (int(v) for v in args.schedule.split(","))
    milestones = tuple(int(v) for v in args.milestones.split(","))
    results = {}
    for method in ("vanilla", "fast"):
        cfg = config_from("mnist", model="cnn-small", method=method, eps=0.4, eps_eval=0.3, epochs=args.epochs,
                          schedule_start=start, schedule_length=length, milestones=milestones, seed=args.seed,
                          data_dir=args.data_dir)
        run = Path(args.out) / method
        t0 = time.perf_counter()
        resume = (run / "last.pt").exists()
        train(cfg, run, resume=resume, log=lambda line, m=method: print(f"[{m}] {line}", flush=True))
        m = MetricsFile(run / "metrics.h5").read()
        best = int(np.argmin(m["val_verified_err"]))
        results[method] = {"last": (m["test_clean_err"][-1], m["test_verified_err"][-1]),
                           "best": (m["test_clean_err"][best], m["test_verified_err"][best], int(m["epoch"][best])),
                           "time": float(m["train_time"].sum()), "wall": time.perf_counter() - t0}
    print(f"\nMNIST, cnn-small, eps 0.3 (train 0.4), {args.epochs} epochs, ramp start {start} length {length}, "
          f"lr x0.2 at {milestones}, seed {args.seed}; errors in % on the 10,000 test images")
    print(f"{'method':10s} {'clean (last)':>13s} {'verified (last)':>16s} {'clean (best)':>13s} "
          f"{'verified (best)':>16s} {'best epoch':>10s} {'train time':>11s}")
    for method, r in results.items():
        print(f"{method:10s} {r['last'][0]:13.2f} {r['last'][1]:16.2f} {r['best'][0]:13.2f} {r['best'][1]:16.2f} "
              f"{r['best'][2]:10d} {r['time'] / 60:9.1f} m")


if __name__ == "__main__":
    main()
