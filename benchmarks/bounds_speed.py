"""Speed of the bound engine, as ratios to a plain forward pass measured in the same run.

    python benchmarks/bounds_speed.py [--repeats 10] [--device cpu|cuda|all]

Prints, per device (CPU always; CUDA when present):
- CNN-7 (CIFAR-10, BN, eval) on a batch of 32: IBP / forward (physical limit ≈ 2, target ≤ 2.5)
  and CROWN-IBP / forward;
- full CROWN on the small CIFAR CNN (conv 16 k4 s2, conv 32 k4 s2, linear 100, linear 10) at
  batch 1 and 32, in seconds and as a ratio to its forward pass.
Weights are random (PyTorch default init), so most neurons are unstable: a worst case for CROWN.
"""

from __future__ import annotations

import argparse

import torch
from timing import timeit  # benchmarks/timing.py

from certkit.bounds import BoundedModel, margin_matrix
from certkit.export import fuse_batchnorm
from certkit.train.models import build_model


def bench_device(device: torch.device, repeats: int) -> None:
    torch.manual_seed(0)
    eps = 2 / 255
    print(f"\n== {device.type.upper()} ({torch.get_num_threads()} threads)" if device.type == "cpu"
          else f"\n== CUDA ({torch.cuda.get_device_name(device)})")

    model = build_model("cnn7", "cifar10").to(device).eval()
    bm = BoundedModel(model, (3, 32, 32))
    x = torch.rand(32, 3, 32, 32, device=device)
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    C = margin_matrix(torch.randint(0, 10, (32,)), 10).to(device)
    fused = fuse_batchnorm(model)  # the engine folds BN too: this is the like-for-like baseline
    with torch.no_grad():
        t_fwd = timeit(lambda: model(x), repeats, device)
        t_fused = timeit(lambda: fused(x), repeats, device)
        t_ibp = timeit(lambda: bm.compute_bounds(lo, up, "ibp", C=C, bound_upper=False), repeats, device)
        t_cibp = timeit(lambda: bm.compute_bounds(lo, up, "crown-ibp", C=C, bound_upper=False), repeats, device)
    print(f"CNN-7, batch 32   forward {t_fwd * 1e3:8.1f} ms   (BN folded: {t_fused * 1e3:.1f} ms)")
    print(f"  IBP             {t_ibp * 1e3:8.1f} ms   IBP / forward       = {t_ibp / t_fwd:5.2f}   (target <= 2.5); "
          f"/ BN-folded forward = {t_ibp / t_fused:5.2f}")
    print(f"  CROWN-IBP       {t_cibp * 1e3:8.1f} ms   CROWN-IBP / forward = {t_cibp / t_fwd:5.2f}; "
          f"/ BN-folded forward = {t_cibp / t_fused:5.2f}")

    small = build_model("cnn-small", "cifar10").to(device).eval()
    sb = BoundedModel(small, (3, 32, 32))
    for batch in (1, 32):
        x = torch.rand(batch, 3, 32, 32, device=device)
        lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        C = margin_matrix(torch.randint(0, 10, (batch,)), 10).to(device)
        with torch.no_grad():
            t_f = timeit(lambda x=x: small(x), repeats, device)
            t_c = timeit(lambda lo=lo, up=up, C=C: sb.compute_bounds(lo, up, "crown", C=C, bound_upper=False),
                         max(3, repeats // 3),
                         device)
            bounds = sb.intervals(lo, up, "ibp")
        unstable = sum(int(((bounds[i][0] < 0) & (bounds[i][1] > 0)).sum()) for i in sb.pre_activation) / batch
        print(f"cnn-small, batch {batch:2d}: full CROWN {t_c:7.3f} s  ({t_c / t_f:8.0f}x its forward; "
              f"{unstable:.0f} IBP-unstable neurons per sample)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = ap.parse_args()
    print(f"torch {torch.__version__}")
    if args.device in ("cpu", "all"):
        bench_device(torch.device("cpu"), args.repeats)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        bench_device(torch.device("cuda"), args.repeats)
    elif args.device == "cuda":
        print("no CUDA device present")


if __name__ == "__main__":
    main()
