"""Full CROWN in certkit against auto_LiRPA (issue 36: target certkit ≤ 0.5× auto_LiRPA's time).

    benchmarks/setup_auto_lirpa.sh          # once: installs and patches auto_LiRPA 0.3
    OMP_NUM_THREADS=1 PYTHONPATH=$(benchmarks/setup_auto_lirpa.sh 2>/dev/null | tail -1) \\
        python benchmarks/crown_vs_auto_lirpa.py [--threads N] [--quick] [--networks a,b] [--batches 1,32]
        [--repeats 5] [--budget 60] [--intersect] [--conv-mode patches|matrix] [--vnncomp ../shared/vnncomp]

For every network and batch size, in this one process: the same random boxes (x uniform in
[0, 1], radius 2/255, clamped to [0, 1]; fixed seeds) are bounded by full CROWN with certkit
(``BoundedModel.compute_bounds(lo, up, "crown", intersect=False)``) and with auto_LiRPA
(``BoundedModule.compute_bounds(method="CROWN")``, default options: patches mode for convs,
sparse intermediate bounds; ``--conv-mode matrix`` gives it dense coefficient matrices, as
certkit has). Both bound every output from below and above, without a C matrix. Each tool
runs once as a warm-up (that call's bounds are compared), then both run alternately ``n``
times, ``n`` = ``--repeats`` or fewer so that a case takes about ``--budget`` seconds (at
least once); the table gives the medians, their ratio certkit / auto_LiRPA, and the largest
|difference| between the two tools' bounds. They implement the same relaxation (CROWN's
adaptive lower slope included), so it is float rounding, except that certkit intersects the
CROWN bounds of intermediate neurons with IBP's and auto_LiRPA 0.3 does not: certkit may be
slightly tighter on deeper networks (resnet-4b: up to 7e-5; 6e-15 in float64 without the
intersection). Under torch.no_grad for both. certkit never imports auto_LiRPA; this benchmark
alone does.

Networks (random weights, PyTorch default init, BN statistics and affine parameters randomised
near the identity so BN is not trivial, eval mode; or from VNN-COMP):
  cnn-small   the CIFAR CNN of benchmarks/bounds_speed.py (conv 16 k4 s2, conv 32 k4 s2,
              linear 100, linear 10; BN after each hidden layer; input normalisation)
  resblock    conv 3→8 k4 s2, ReLU, one residual block (conv-BN-ReLU-conv-BN + skip, ReLU),
              flatten, linear 10 (CIFAR-sized)
  resnet-2b, resnet-4b   VNN-COMP 2021 CIFAR ResNets (ONNX: certkit loads the file, auto_LiRPA
              gets its onnx2torch conversion)
  oval21-base, oval21-wide, oval21-deep   the OVAL21 CIFAR conv nets (ONNX)
  cnn7        CNN-7 (BN), only with --networks: full CROWN on it takes far too long on CPU
Not by default: resnet-4b at batch 32 (about 2 min per auto_LiRPA call on one thread; ask for it
with --networks resnet-4b --batches 32).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
EPS = 2 / 255
SETUP = "benchmarks/setup_auto_lirpa.sh"


# ------------------------------------------------------------------ networks


class ResBlockNet(nn.Module):
    """conv 3→8 k4 s2 p1, ReLU, [conv 8→8 k3 p1, BN, ReLU, conv 8→8 k3 p1, BN] + skip, ReLU,
    flatten, linear 2048→10."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width))
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 16 * 16, 10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.relu(self.body(h) + h))


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters (default ones make BN the identity)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def _zoo(name: str) -> nn.Module:
    from certkit.train.models import build_model

    return build_model(name, "cifar10")


def lirpa_copy(model: nn.Module) -> nn.Module:
    """A copy for auto_LiRPA 0.3, with every per-channel constant buffer of shape (C, 1, 1) (the
    models' input normalisation) reshaped to (1, C, 1, 1): the same function, but 0.3 treats a
    buffer's first dimension as the batch and, at batch > 1, would sum a dense A over the batch."""
    model = copy.deepcopy(model)
    for m in model.modules():
        for k, b in list(m._buffers.items()):
            if b is not None and b.dim() == 3 and b.shape[1:] == (1, 1):
                m._buffers[k] = b.reshape(1, *b.shape)
    return model


@dataclass
class Network:
    name: str
    build: Callable[[Path], tuple[object, nn.Module, tuple[int, ...]]]  # vnncomp dir -> (certkit's, torch, shape)
    batches: tuple[int, ...] = (1, 32)
    default: bool = True


def _module_net(make: Callable[[], nn.Module]) -> Callable[[Path], tuple[object, nn.Module, tuple[int, ...]]]:
    def build(_vnncomp: Path):
        torch.manual_seed(0)
        model = make().eval()
        _randomise_bn(model, torch.Generator().manual_seed(1))
        return model, model, (3, 32, 32)

    return build


def _onnx_net(rel: str) -> Callable[[Path], tuple[object, nn.Module, tuple[int, ...]]]:
    def build(vnncomp: Path):
        import onnx
        from onnx2torch import convert

        from certkit.onnx_io import load_onnx

        path = vnncomp / rel
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        shape = tuple(load_onnx(path).input_shape)
        return path, convert(onnx.load(str(path))).eval(), shape

    return build


NETWORKS = {n.name: n for n in [
    Network("cnn-small", _module_net(lambda: _zoo("cnn-small"))),
    Network("resblock", _module_net(ResBlockNet)),
    Network("resnet-2b", _onnx_net("cifar10_resnet_2021/onnx/resnet_2b.onnx")),
    Network("resnet-4b", _onnx_net("cifar10_resnet_2021/onnx/resnet_4b.onnx"), batches=(1,)),
    Network("oval21-base", _onnx_net("oval21_2022/onnx/cifar_base_kw.onnx")),
    Network("oval21-wide", _onnx_net("oval21_2022/onnx/cifar_wide_kw.onnx")),
    Network("oval21-deep", _onnx_net("oval21_2022/onnx/cifar_deep_kw.onnx")),
    Network("cnn7", _module_net(lambda: _zoo("cnn7")), default=False),
]}
QUICK = {"networks": ["cnn-small", "resblock", "oval21-base"], "batches": (1, 2), "repeats": 2, "budget": 5.0}


# ------------------------------------------------------------------ measuring


def boxes(shape: tuple[int, ...], batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's input boxes: x uniform in [0, 1], radius ``EPS``, clamped to [0, 1]."""
    gen = torch.Generator().manual_seed(1000 * seed + batch)
    x = torch.rand(batch, *shape, generator=gen)
    return (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measure(fns: dict[str, Callable[[], object]], repeats: int, budget: float
            ) -> tuple[dict[str, float], dict[str, object], int]:
    """Median seconds of each function over alternating runs (after one warm-up run of each, whose
    results are returned), and the number of timed runs: ``repeats``, or fewer (at least one) when
    the warm-up says all of them would take more than ``budget`` seconds."""
    warm = {k: _timed(f) for k, f in fns.items()}
    n = repeats_within(sum(t for t, _ in warm.values()), repeats, budget)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(n):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):  # alternate the order
            times[k].append(_timed(fns[k])[0])
    return {k: statistics.median(v) for k, v in times.items()}, {k: out for k, (_, out) in warm.items()}, n


def repeats_within(seconds_per_round: float, repeats: int, budget: float) -> int:
    """Timed rounds that fit ``budget`` seconds at ``seconds_per_round`` each: between 1 and ``repeats``."""
    if seconds_per_round <= 0:
        return max(1, repeats)
    return max(1, min(repeats, int(budget // seconds_per_round)))


def bound_difference(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """max |a − b| over the lower and the upper bounds."""
    return max(float((x.reshape(x.shape[0], -1) - y.reshape(y.shape[0], -1)).abs().max()) for x, y in zip(a, b))


@dataclass
class Row:
    network: str
    batch: int
    certkit_s: float
    lirpa_s: float
    max_diff: float
    mean_width: float
    repeats: int

    @property
    def ratio(self) -> float:
        return self.certkit_s / self.lirpa_s if self.lirpa_s > 0 else math.inf


def format_table(rows: list[Row], target: float = 0.5) -> str:
    """The results table, then a summary line: median and worst ratio, cases meeting ``target``."""
    head = (f"{'network':<13} {'batch':>5} {'certkit s':>10} {'auto_LiRPA s':>12} {'ratio':>6} "
            f"{'max|Δbound|':>11} {'mean width':>10} {'runs':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.network:<13} {r.batch:>5} {r.certkit_s:>10.4f} {r.lirpa_s:>12.4f} {r.ratio:>6.2f} "
                     f"{r.max_diff:>11.1e} {r.mean_width:>10.3g} {r.repeats:>4}")
    if rows:
        ratios = [r.ratio for r in rows]
        worst = max(rows, key=lambda r: r.ratio)
        met = sum(q <= target for q in ratios)
        lines.append(f"ratio certkit/auto_LiRPA: median {statistics.median(ratios):.2f}, worst {worst.ratio:.2f} "
                     f"({worst.network}, batch {worst.batch}); {met}/{len(rows)} cases at <= {target}")
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def import_auto_lirpa():
    """The auto_LiRPA package, quietly (it sets warnings to 'once' and its import warns about
    torch.jit.script); exits with status 2 and a one-line message when it is not importable."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on import
    show, warnings.showwarning = warnings.showwarning, lambda *a, **k: None
    try:
        import auto_LiRPA
    except ImportError:
        print(f"auto_LiRPA is not importable: run {SETUP} and put the PYTHONPATH it prints in the "
              f"environment (PYTHONPATH=$({SETUP} 2>/dev/null | tail -1) python {sys.argv[0]})", file=sys.stderr)
        sys.exit(2)
    finally:
        warnings.showwarning = show
    warnings.filterwarnings("ignore")  # its tracer's deprecation warnings, once per call site
    logging.getLogger("auto_LiRPA").setLevel(logging.ERROR)
    return auto_LiRPA


def run_case(lirpa, bm, lm, shape: tuple[int, ...], batch: int, repeats: int, budget: float, intersect: bool,
             network: str) -> Row:
    lo, up = boxes(shape, batch)
    center = (lo + up) / 2
    ptb = lirpa.PerturbationLpNorm(norm=math.inf, x_L=lo, x_U=up)

    def certkit_fn():
        with torch.no_grad():
            return bm.compute_bounds(lo, up, "crown", intersect=intersect)

    def lirpa_fn():
        with torch.no_grad():
            return lm.compute_bounds(x=(lirpa.BoundedTensor(center, ptb),), method="CROWN")

    med, outs, n = measure({"certkit": certkit_fn, "auto_LiRPA": lirpa_fn}, repeats, budget)
    ck, al = outs["certkit"], outs["auto_LiRPA"]
    width = float((ck[1] - ck[0]).mean())
    return Row(network, batch, med["certkit"], med["auto_LiRPA"], bound_difference(ck, al), width, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", help=f"comma-separated, from: {', '.join(NETWORKS)} (default: all but cnn7)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default: each network's, 1,32)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per tool and case, at most (default 5)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds a case's timed runs may take; fewer runs (at least 1) when over (default 60)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: as they are)")
    ap.add_argument("--intersect", action="store_true",
                    help="certkit also intersects its final bounds with IBP's (its default; auto_LiRPA does not)")
    ap.add_argument("--conv-mode", choices=["patches", "matrix"], default="patches",
                    help="auto_LiRPA's conv_mode (default patches, its own default; matrix: dense A like certkit's)")
    ap.add_argument("--quick", action="store_true", help="a tiny run: 3 small networks, batches 1 and 2")
    ap.add_argument("--vnncomp", type=Path, default=REPO.parent / "shared" / "vnncomp")
    args = ap.parse_args()
    lirpa = import_auto_lirpa()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = args.networks.split(",") if args.networks else (
        QUICK["networks"] if args.quick else [k for k, n in NETWORKS.items() if n.default])
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        ap.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    repeats, budget = (QUICK["repeats"], QUICK["budget"]) if args.quick else (args.repeats, args.budget)

    from certkit.bounds import BoundedModel

    print(f"full CROWN, certkit vs auto_LiRPA {getattr(lirpa, '__version__', '?')}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"1 is advised for stable timings), {os.cpu_count()} CPUs")
    print(f"boxes: x ~ U[0,1], eps {EPS:.5f}, clamped to [0,1]; lower and upper bounds of every output, no C; "
          f"certkit intersect={args.intersect}; auto_LiRPA conv_mode={args.conv_mode}; "
          f"medians of up to {repeats} alternating runs after a warm-up")
    rows: list[Row] = []
    for name in names:
        net = NETWORKS[name]
        try:
            ck_model, torch_model, shape = net.build(args.vnncomp)
        except (FileNotFoundError, ImportError) as e:
            print(f"{name}: skipped ({e})")
            continue
        bm = BoundedModel(ck_model, shape) if isinstance(ck_model, nn.Module) else BoundedModel(ck_model)
        lm = lirpa.BoundedModule(lirpa_copy(torch_model), torch.zeros(1, *shape), device="cpu",
                                 bound_opts={"conv_mode": args.conv_mode})
        for batch in (batches or (QUICK["batches"] if args.quick else net.batches)):
            row = run_case(lirpa, bm, lm, shape, batch, repeats, budget, args.intersect, name)
            rows.append(row)
            print(f"  {name} batch {batch}: certkit {row.certkit_s:.4f} s, auto_LiRPA {row.lirpa_s:.4f} s, "
                  f"ratio {row.ratio:.2f}, max|Δbound| {row.max_diff:.1e}", flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
