"""Scale-out on this machine: verify samples/s and vnncomp instances/s in one process, on 1 worker and on
2 workers of a local Ray cluster (``--workers``), and training steps/s in 1 and 2 data-parallel
processes, with the ratio of 2 to 1, in one run.

    python benchmarks/scale_out.py [--sections verify,vnncomp,train] [-n 256] [--instances 8] [--workers 1,2]

Threads: each worker gets the machine's cores divided among the workers (workers × threads = cores); the
single process uses every core. The script clears $OMP_NUM_THREADS, which would cap the workers' threads.

Two rates per run: end to end (the wall time of the whole run: Ray's start, the workers' start and
model loading, the work, the shutdown) and the work alone (from the moment the process or the workers
are ready to the last rows/instance written: the rate at which a long run proceeds).

verify: the first ``-n`` CIFAR-10 test images (from ``--data-dir``, default ../shared/data) on the
shipped CIFAR-10 model at its ε, the whole cascade. vnncomp: the first ``--instances``
rl_benchmarks_2022 instances of ../shared/vnncomp at their published timeouts.

train: training steps/s of the fast method's warmup step (IBP bounds, robust loss, both regularisers)
at the same global batch in one process and in ``--nproc`` data-parallel processes
(:func:`certkit.train.distributed.steps_per_second`: processes × threads = cores, random images);
``--train-model`` and ``--train-batch`` choose the network and the global batch.

    python benchmarks/scale_out.py --sections train --train-model cnn7 --train-batch 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1


class _WorkClock:
    """When the work of a run starts: the first step of the one-process loop (``here``, a generator
    function or a function of its module) or of the workers' job loop (scale_out's pool, once every
    worker has started and loaded the model)."""

    def __init__(self, module: object, here: str):
        from certkit import scale_out

        self.start: float | None = None
        self.patched = [(module, here, getattr(module, here)), (scale_out._Pool, "run", scale_out._Pool.run)]
        for owner, name, original in self.patched:
            setattr(owner, name, self._timed(original))

    def _timed(self, original: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.start is None:
                self.start = time.perf_counter()
            return original(*args, **kwargs)
        return timed

    def close(self) -> None:
        for owner, name, original in self.patched:
            setattr(owner, name, original)


def _rates(clock: _WorkClock, last: float, total: int, wall: float) -> tuple[float, float]:
    """(end-to-end items/s, work items/s)."""
    return total / wall, total / (last - clock.start)


def bench_verify(args: argparse.Namespace) -> list[tuple]:
    """certkit verify on the first ``args.n`` CIFAR-10 test images: one process, then each worker count."""
    import torch

    from certkit.export import pixel_range_of, read_metadata
    from certkit.onnx_io import graph_input, read_proto
    from certkit.results import read_results
    from certkit.verify import Verifier, VerifyConfig, load_verify_data, run_verify

    model = REPO / "models" / "cifar10_cnn_small_eps2_255.onnx"
    meta = read_metadata(model)
    _, shape = graph_input(read_proto(model))
    x, y, idx = load_verify_data("cifar10", args.data_dir, 0, args.n, shape)
    cfg = VerifyConfig(eps=float(meta["eps"]), batch_size=args.batch_size, device="cpu",
                       pixel_range=pixel_range_of(meta))
    rows, statuses = [], {}
    for workers in [None, *args.workers]:
        torch.set_num_threads(CORES)
        clock = _WorkClock(Verifier, "batches")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.h5"
            last = [0.0]
            t0 = time.perf_counter()
            try:
                run_verify(model, x, y, idx, cfg, "cifar10", 0, out=out, workers=workers,
                           progress=lambda st: last.__setitem__(0, time.perf_counter()))  # noqa: B023
            finally:
                clock.close()
            wall = time.perf_counter() - t0
            statuses[workers] = read_results(out)[1]["status"]
        rows.append(("verify", "one process" if workers is None else f"{workers} worker(s)",
                     CORES if workers is None else max(1, CORES // workers), len(x), wall,
                     *_rates(clock, last[0], len(x), wall)))
    same = all((s == statuses[None]).all() for s in statuses.values())
    print(f"verify: {len(x)} CIFAR-10 images, ε {cfg.eps:.4g}, batch {cfg.batch_size}; statuses identical in "
          f"every run: {same}")
    return rows


def bench_vnncomp(args: argparse.Namespace) -> list[tuple]:
    """certkit vnncomp on the first ``args.instances`` rl_benchmarks_2022 instances: one process, then
    each worker count."""
    from certkit.vnncomp import runner
    from certkit.vnncomp.runner import discover, run_benchmark

    family = Path(args.vnncomp_dir) / "rl_benchmarks_2022"
    insts = discover(family)[:args.instances]
    rows, statuses = [], {}
    for workers in [None, *args.workers]:
        clock = _WorkClock(runner, "_run_here")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results.csv"
            last = [0.0]
            t0 = time.perf_counter()
            try:
                outcomes = run_benchmark(insts, out, out.parent, workers=workers,
                                         on_done=lambda i, o, r: last.__setitem__(0, time.perf_counter()))  # noqa: B023
            finally:
                clock.close()
            wall = time.perf_counter() - t0
            statuses[workers] = [o.status for o in outcomes]
        rows.append(("vnncomp", "one process" if workers is None else f"{workers} worker(s)",
                     CORES if workers is None else max(1, CORES // workers), len(insts), wall,
                     *_rates(clock, last[0], len(insts), wall)))
    same = all(s == statuses[None] for s in statuses.values())
    print(f"vnncomp: {len(insts)} rl_benchmarks_2022 instances at their timeouts; statuses identical in every "
          f"run: {same}")
    return rows


def bench_train(args: argparse.Namespace) -> list[tuple]:
    """Training steps/s in one process and in each of ``args.workers`` data-parallel processes
    (``certkit train --nproc``), at the same global batch. There is no model loading or cluster to
    start, so the end-to-end and work rates are the same (process start-up is not timed)."""
    from certkit.train.distributed import steps_per_second

    counts = sorted({1, *args.workers})
    rates = steps_per_second(procs=counts, model=args.train_model, batch_size=args.train_batch,
                             steps=args.train_steps)
    print(f"train: {args.train_model}, global batch {args.train_batch}, {args.train_steps} timed steps "
          "(fast method, warmup step)")
    return [("train", f"{n} worker(s)", max(1, CORES // n), args.train_steps, args.train_steps / rates[n],
             rates[n], rates[n]) for n in counts]


SECTIONS: dict[str, Callable[[argparse.Namespace], list[tuple]]] = {
    "verify": bench_verify,
    "vnncomp": bench_vnncomp,
    "train": bench_train,  # "worker(s)" are data-parallel processes (certkit train --nproc)
}


def _table(rows: list[tuple]) -> str:
    lines = [f"{'section':8s} {'run':12s} {'threads':>7s} {'items':>6s} {'wall s':>7s} {'items/s':>8s} "
             f"{'work items/s':>12s} {'work ratio':>10s}"]
    one_worker = {r[0]: r[6] for r in rows if r[1] == "1 worker(s)"}
    for section, run, threads, items, wall, rate, work in rows:
        ratio = work / one_worker[section] if section in one_worker and run.endswith("worker(s)") else float("nan")
        lines.append(f"{section:8s} {run:12s} {threads:7d} {items:6d} {wall:7.1f} {rate:8.2f} {work:12.2f} "
                     f"{ratio:10.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="verify,vnncomp,train", help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--workers", default="1,2", help="worker counts to run (besides one process)")
    ap.add_argument("-n", type=int, default=256, help="verify: CIFAR-10 test images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--instances", type=int, default=8, help="vnncomp: rl_benchmarks_2022 instances")
    ap.add_argument("--vnncomp-dir", default=str(REPO.parent / "shared" / "vnncomp"))
    ap.add_argument("--train-model", default="cnn-small", help="train: the network (cnn-small, cnn7, ...)")
    ap.add_argument("--train-batch", type=int, default=256, help="train: the global batch")
    ap.add_argument("--train-steps", type=int, default=20, help="train: timed steps per process count")
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # would cap each worker's threads
        os.environ.pop(k, None)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose among {', '.join(SECTIONS)}")
    load = os.getloadavg()[0]
    rows = [row for s in args.sections.split(",") for row in SECTIONS[s](args)]
    print(f"\nload average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after: other processes on these cores "
          "slow multi-threaded runs most")
    print(f"{CORES} cores; work items/s: from the moment the process or workers are ready to the last "
          "write; ratio: work items/s over 1 worker's\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
