"""Samples per second of `certkit verify` per method on the shipped models, and what each stage decides.

    python benchmarks/verify_speed.py [-n 100] [--models models/*.onnx] [--device cpu|cuda]

For every shipped model (ε and dataset from its metadata) and every method (ibp, crown-ibp,
crown, auto), runs the verification of the first n test samples in one process and prints
samples/s, verified accuracy and, for auto, the fraction of samples decided by each stage.
"""

from __future__ import annotations

import argparse
import glob
import tempfile
import time
from pathlib import Path

from certkit.export import pixel_range_of, read_metadata
from certkit.onnx_io import graph_input, read_proto
from certkit.results import STATUS, read_results, summarize
from certkit.verify import VerifyConfig, load_verify_data, run_verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--models", nargs="*", default=sorted(glob.glob("models/*_eps*.onnx")))
    ap.add_argument("--methods", default="ibp,crown-ibp,crown,auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    for model in args.models:
        meta = read_metadata(model)
        eps = float(meta["eps"])
        _, shape = graph_input(read_proto(model))
        x, y, idx = load_verify_data(meta["dataset"], args.data_dir, 0, args.n, shape)
        print(f"\n{Path(model).name}: {meta['dataset']}, eps {eps:.4g}, first {len(x)} test samples")
        header = f"  {'method':12s} {'samples/s':>10s} {'verified':>9s} {'falsified':>9s} {'unknown':>8s}"
        print(header + "  decided by stage")
        with tempfile.TemporaryDirectory() as tmp:  # untimed warm-up: first-call costs of torch and onnxruntime
            run_verify(model, x[:8], y[:8], idx[:8], VerifyConfig(eps=eps, method="ibp", attack=False,
                                                                   device=args.device), meta["dataset"], 0)
        for method in args.methods.split(","):
            cfg = VerifyConfig(eps=eps, method=method, attack=method == "auto", device=args.device,
                               pixel_range=pixel_range_of(meta))
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.h5"
                t0 = time.perf_counter()
                run_verify(model, x, y, idx, cfg, meta["dataset"], 0, out=out)
                wall = time.perf_counter() - t0
                attrs, data = read_results(out)
            s = summarize(attrs, data)
            decided = ""
            if method == "auto":
                parts = []
                for i, stage in enumerate(attrs["stages"]):
                    k = int(((data["stage"] == i) & (data["status"] != STATUS.index("unknown"))).sum())
                    parts.append(f"{stage} {100 * k / len(x):.0f}%")
                decided = ", ".join(parts)
            print(f"  {method:12s} {len(x) / wall:10.1f} {s['verified_accuracy']:8.1f}% {s['falsified']:8.1f}% "
                  f"{s['unknown']:7.1f}%  {decided}")


if __name__ == "__main__":
    main()
