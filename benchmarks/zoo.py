"""The exported-architecture zoo: what bounding a network people actually export costs.

    python benchmarks/zoo.py [--batch 8] [--names vit,resnet18,...] [--crown-ibp-only NAME,...]

Per architecture of tests/zoo.py (torch.onnx.export, seeded weights, small inputs, 10
classes): ONNX load time (folding, conversion, graph), then on a batch of random inputs at
ε = 1/255: IBP and CROWN time as a multiple of one forward pass through the same graph, and
the mean width of the margin bounds (f_y − f_j, y the predicted class) for IBP and CROWN.
Networks named in --crown-ibp-only get CROWN-IBP (IBP intermediate bounds) instead of full
CROWN, which on two cores takes minutes for the larger CNNs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import timeit  # benchmarks/timing.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/zoo.py

from certkit.bounds import BoundedModel, margin_matrix  # noqa: E402
from tests.zoo import ZOO, export  # noqa: E402


def bench(name: str, folder: Path, batch: int, crown: str, repeats: int) -> str:
    path = export(name, folder)
    t0 = time.perf_counter()
    bm = BoundedModel(path)
    t_load = time.perf_counter() - t0
    x = torch.rand(batch, *bm.graph.input_shape, generator=torch.Generator().manual_seed(0))
    eps = 1 / 255
    lo, up = x - eps, x + eps
    with torch.no_grad():
        pred = bm(x).reshape(batch, -1).argmax(1)
        K = int(torch.tensor(bm.graph.output_shape).prod())
        C = margin_matrix(pred, K)
        t_fwd = timeit(lambda: bm(x), repeats, torch.device("cpu"))
        t_ibp = timeit(lambda: bm.compute_bounds(lo, up, "ibp", C=C), repeats, torch.device("cpu"))
        lb_i, ub_i = bm.compute_bounds(lo, up, "ibp", C=C)
        t0 = time.perf_counter()
        lb_c, ub_c = bm.compute_bounds(lo, up, crown, C=C)
        t_crown = time.perf_counter() - t0
    w_ibp = float((ub_i - lb_i).mean())
    w_crown = float((ub_c - lb_c).mean())
    return (f"| {name} | {len(bm.graph.nodes)} | {t_load:.2f} s | {t_fwd * 1e3:.1f} ms | {t_ibp / t_fwd:.1f}× | "
            f"{crown} {t_crown / t_fwd:.0f}× ({t_crown:.1f} s) | {w_ibp:.4g} | {w_crown:.4g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--names", default=",".join(ZOO))
    ap.add_argument("--crown-ibp-only",
                    default="resnet18,mobilenet_v2,mobilenet_v3_small,squeezenet1_1,efficientnet_b0")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cheap = set(filter(None, args.crown_ibp_only.split(",")))
    print(f"batch {args.batch}, ε = 1/255, {torch.get_num_threads()} threads")
    print("| network | graph nodes | load | forward | IBP / fwd | CROWN / fwd | margin width IBP "
          "| margin width CROWN |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names.split(","):
            print(bench(name, Path(tmp), args.batch, "crown-ibp" if name in cheap else "crown", args.repeats),
                  flush=True)


if __name__ == "__main__":
    main()
