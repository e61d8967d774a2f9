"""One `certkit verify --eps` sweep against separate single-ε runs: time, rows carried over, statuses.

    python benchmarks/eps_sweep.py [--eps 0.1,0.2,0.3] [-n 100] [--repeat 2] [--threads 1]

Verifies the first n samples of ``--data`` (default: the shipped MNIST model on
data/mnist_test_100.npz, default settings) at every radius twice, in this process and after an
untimed warm-up: once as a sweep (:func:`certkit.verify.run_sweep`, one results file) and once
as a separate run per radius (:func:`certkit.verify.run_verify`, a file each, loading the model
each time as separate commands would; Python's start is not counted). Each is timed ``--repeat``
times and the best is kept. Prints both times, the ratio and, per ε, how many rows the sweep
carried over from another ε, then compares every status with the separate run's:

* a carried answer must never contradict the separate run's verified or falsified (asserted),
  and the sweep never says verified where the separate run says falsified or the reverse
  (asserted); a carried answer may decide what the separate run left unknown;
* a row the sweep computed may differ otherwise (falsified against unknown): the sweep bounds
  and attacks the samples it computes in batches of their own, so the attack starts from other
  random points (counted and printed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from certkit.boxes import parse_eps_list
from certkit.export import pixel_range_of, read_metadata
from certkit.onnx_io import graph_input, read_proto
from certkit.results import STATUS, read_results, read_sweep
from certkit.verify import VerifyConfig, load_verify_data, run_sweep, run_verify

VERIFIED, FALSIFIED, UNKNOWN = (STATUS.index(s) for s in ("verified", "falsified", "unknown"))


def timed(fn) -> tuple[float, object]:
    """(seconds, result) of ``fn()``."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def run_both(args: argparse.Namespace, cfg: VerifyConfig, data: tuple, tmp: Path, rep: int
             ) -> tuple[float, float, dict[float, np.ndarray], list]:
    """(sweep seconds, separate seconds, the separate runs' statuses per ε, the sweep's levels)."""
    sweep_file = tmp / f"sweep{rep}.h5"
    t_sweep, _ = timed(lambda: run_sweep(args.model, *data, cfg, args.data, 0, out=sweep_file))
    separate = {}

    def singles() -> None:
        for e in cfg.radii():
            out = tmp / f"single{rep}_{e}.h5"
            run_verify(args.model, *data, replace(cfg, eps=e), args.data, 0, out=out)
            separate[e] = read_results(out)[1]["status"]

    t_separate, _ = timed(singles)
    return t_sweep, t_separate, separate, read_sweep(sweep_file)


def compare(levels: list, separate: dict[float, np.ndarray]) -> dict[str, int]:
    """Print, per ε, the rows carried over and how the statuses compare; assert no contradiction."""
    total = {"rows": 0, "carried": 0, "decided_more": 0, "attack_differs": 0}
    print(f"  {'ε':>6s} {'carried':>8s} {'verified':>9s} {'falsified':>10s} {'unknown':>8s}   "
          "carried answers deciding a separate-run unknown / computed rows that differ (attack)")
    for attrs, data in levels:
        mine, theirs = data["status"], separate[attrs["eps"]]
        carried = np.isfinite(data["reused_from"])
        assert not ((mine == VERIFIED) & (theirs == FALSIFIED)).any(), "verified where a separate run falsified"
        assert not ((mine == FALSIFIED) & (theirs == VERIFIED)).any(), "falsified where a separate run verified"
        assert ((mine == theirs) | (theirs == UNKNOWN))[carried].all(), "a carried answer contradicts a separate run"
        decided_more = int((carried & (mine != theirs)).sum())
        differs = ~carried & (mine != theirs)
        counts = [int((mine == s).sum()) for s in (VERIFIED, FALSIFIED, UNKNOWN)]
        their_counts = [int((theirs == s).sum()) for s in (VERIFIED, FALSIFIED, UNKNOWN)]
        cells = [f"{m} ({t})" for m, t in zip(counts, their_counts)]
        print(f"  {attrs['eps']:6.4g} {int(carried.sum()):8d} {cells[0]:>9s} {cells[1]:>10s} {cells[2]:>8s}   "
              f"{decided_more} / {int(differs.sum())}")
        total["rows"] += len(mine)
        total["carried"] += int(carried.sum())
        total["decided_more"] += decided_more
        total["attack_differs"] += int(differs.sum())
    print("  (sweep count (separate run's count))")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/mnist_cnn_small_eps0.3.onnx")
    ap.add_argument("--data", default="npz:data/mnist_test_100.npz", help="a dataset as verify's --dataset takes it")
    ap.add_argument("--data-dir")
    ap.add_argument("--eps", default="0.1,0.2,0.3", help="the sweep, as verify's --eps takes it")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each; the best is kept")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads (1: steady times on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    radii = parse_eps_list(args.eps)
    _, shape = graph_input(read_proto(args.model))
    data = load_verify_data(args.data, args.data_dir, 0, args.n, shape)
    cfg = VerifyConfig(eps=radii, pixel_range=pixel_range_of(read_metadata(args.model)))
    print(f"{Path(args.model).name} on {len(data[0])} samples of {args.data}, ε {', '.join(f'{e:g}' for e in radii)}, "
          f"default settings (method {cfg.method}, attack {cfg.attack}), {args.threads} thread(s), "
          f"best of {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        run_verify(args.model, *(a[:8] for a in data), VerifyConfig(eps=radii[0]), args.data, 0)  # untimed warm-up
        runs = [run_both(args, cfg, data, Path(tmp), rep) for rep in range(args.repeat)]
    t_sweep, t_separate = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"\nseparate runs: {t_separate:.2f} s   sweep: {t_sweep:.2f} s   "
          f"sweep / separate: {t_sweep / t_separate:.2f}")
    print("\nstatuses of the last sweep against the last separate runs:")
    total = compare(runs[-1][3], runs[-1][2])
    print(f"\nrows carried over: {total['carried']} of {total['rows']} (computed: {total['rows'] - total['carried']}); "
          f"carried answers deciding what a separate run left unknown: {total['decided_more']}; computed rows whose "
          f"attack outcome differs: {total['attack_differs']}; contradictions: 0 (asserted)")


if __name__ == "__main__":
    main()
