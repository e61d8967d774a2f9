"""Where the time of one training step goes: natural, vanilla IBP and fast, under torch.profiler.

    python benchmarks/step_profile.py [--model cnn7] [--dataset cifar10] [--batch-size 128]
                                      [--device auto|cpu|cuda] [--steps 10] [--rows 12] [--compile]

For each kind of step prints the wall time per step, the kernel launches per step (on a
GPU) and the profiler's tables of the operators with the most device time and the most
CPU time. A GPU step that launches many small kernels is bound by the CPU that launches
them; the tables say which operators to fuse or remove. Measure before and after a change.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import natural_step  # benchmarks/timing.py
from torch.profiler import ProfilerActivity, profile

from certkit.train.loop import Splits, Trainer, config_from
from certkit.train.models import DATASETS

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn7")
    ap.add_argument("--dataset", default="cifar10", choices=["mnist", "cifar10"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--compile", action="store_true", help="profile the torch.compile'd steps")
    args = ap.parse_args()
    info = DATASETS[args.dataset]
    torch.manual_seed(0)
    n = args.batch_size * 2
    fake = (torch.randint(0, 256, (n, *info.shape), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    eps = 8 / 255 if args.dataset == "cifar10" else 0.4
    trainers = {m: Trainer(config_from(None, dataset=args.dataset, model=args.model, method=m, eps=eps,
                                       batch_size=args.batch_size, device=args.device, compile=args.compile),
                        Splits(fake, fake, fake))
                for m in ("vanilla", "fast")}
    device = trainers["fast"].device
    x, y = trainers["fast"].batch(torch.arange(args.batch_size))
    natural = natural_step(trainers["vanilla"], x, y, compile=args.compile)

    steps = {"natural": natural,
             "vanilla IBP": lambda: trainers["vanilla"].step(x, y, eps / 2, epoch=1),
             "fast (warmup)": lambda: trainers["fast"].step(x, y, eps / 2, epoch=1)}
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"torch {torch.__version__}, {device}, {args.model} on {args.dataset}-shaped batches of {args.batch_size}")
    for name, fn in steps.items():
        for _ in range(3):
            fn()
        sync()
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            wall = (time.perf_counter() - t) / args.steps
        table = prof.key_averages()
        launches = sum(e.count for e in table if e.key in LAUNCHES) / args.steps
        print(f"\n== {name}: {wall * 1e3:.1f} ms/step under the profiler"
              + (f", {launches:.0f} kernel launches/step" if cuda else ""))
        if cuda:
            print(table.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=45))
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))


if __name__ == "__main__":
    main()
