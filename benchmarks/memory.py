"""Peak memory against ``--max-memory``: a large export bounded whole and in chunks.

    python benchmarks/memory.py [--model resnet18] [--size 224] [--method crown-ibp]
                                [--budgets default,64M,16M]

torchvision's resnet18 (seeded random weights, 10 classes, exported by tests/zoo.py's
exporter) at 3×size×size, one random input at ε = 1/255, margins of the predicted class:
per budget a fresh process bounds it and reports its peak resident set size (VmHWM), the
time, the budget and the engine's estimate of the smallest budget that fits
(``BoundedModel.min_memory``). CROWN-IBP is the default method: full CROWN refines every
unstable neuron of every layer (millions at 224×224) and takes hours on two cores; its
final backward pass, which holds the largest coefficient tensors (9 margins × 64×112×112
values per node), is the same one full CROWN ends with. Budgets under the smallest one end
in the one-line ``MemoryBudgetExceeded`` message, which the table shows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/zoo.py


def export_model(name: str, size: int, folder: Path) -> Path:
    """tests/zoo.py's export of ``name`` at 3×size×size (cached in ``folder``)."""
    from tests.zoo import ZOO, export

    key = f"{name}_{size}"
    ZOO[key] = (ZOO[name][0], (3, size, size))
    return export(key, folder)


def one_run(path: Path, method: str, budget: str) -> dict:
    """Bound ``path`` once within ``budget`` (``default`` or a size); the measurements."""
    import torch

    from certkit.bounds import BoundedModel, margin_matrix
    from certkit.errors import CertkitError
    from certkit.memory import default_budget, format_size, parse_size, peak_rss

    torch.manual_seed(0)
    bm = BoundedModel(path)
    bm.max_memory = None if budget == "default" else parse_size(budget)
    x = torch.rand(1, *bm.graph.input_shape)
    with torch.no_grad():
        label = bm(x).reshape(1, -1).argmax(1)
    C = margin_matrix(label, 10)
    before = peak_rss()
    t0 = time.perf_counter()
    row = {"budget": budget if budget != "default" else f"default ({format_size(default_budget('cpu'))})",
           "min_memory": format_size(bm.min_memory(0) if method == "crown" else bm._row_cost(bm.graph.output, 0) * 4),
           "rss_before": format_size(before)}
    try:
        with torch.no_grad():
            lb, _ = bm.compute_bounds((x - 1 / 255).clamp(0, 1), (x + 1 / 255).clamp(0, 1), method=method, C=C)
        row["result"] = f"min margin lb {float(lb.min()):.3g}"
    except CertkitError as e:
        row["result"] = f"error: {e}"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["peak_rss"] = format_size(peak_rss())
    row["peak_growth"] = format_size(peak_rss() - before)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--method", default="crown-ibp", choices=["ibp", "crown-ibp", "crown"])
    ap.add_argument("--budgets", default="default,64M,16M")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: MODEL_PATH,BUDGET in a fresh process
    args = ap.parse_args()
    if args.one:
        path, budget = args.one.rsplit(",", 1)
        print(json.dumps(one_run(Path(path), args.method, budget)))
        return
    folder = Path(tempfile.gettempdir()) / "certkit_memory_bench"
    path = export_model(args.model, args.size, folder)
    print(f"{args.model} at 3×{args.size}×{args.size}, {args.method}, batch 1 ({path})")
    cols = ("budget", "min_memory", "rss_before", "peak_rss", "peak_growth", "seconds", "result")
    print(" | ".join(cols))
    for budget in args.budgets.split(","):
        out = subprocess.run([sys.executable, __file__, "--method", args.method, "--one", f"{path},{budget}"],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(" | ".join(str(row[c]) for c in cols), flush=True)


if __name__ == "__main__":
    main()
