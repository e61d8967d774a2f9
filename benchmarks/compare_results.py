"""Compare two ``certkit vnncomp`` results CSVs: the same instances answered before and after a change.

    python benchmarks/compare_results.py BEFORE.csv AFTER.csv

Prints per family the instances in both runs, the sat / unsat answers of each and how many
answers agree, then every instance whose status differs. A contradiction (sat in one run,
unsat in the other) can only come from a wrong answer and exits with status 1; a solved
instance that times out in the other run is a matter of time (the time slices are shares of
the limit, so near-limit instances flip with machine load).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certkit.status import Status  # noqa: E402
from certkit.vnncomp.runner import ANSWERS, read_outcomes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    before = {(o.family, o.index): o for o in read_outcomes(args.before)}
    after = {(o.family, o.index): o for o in read_outcomes(args.after)}
    both = sorted(before.keys() & after.keys())
    rows: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    changed, contradictions = [], 0
    for key in both:
        b, a = before[key].status, after[key].status
        r = rows[key[0]]
        r[0] += 1
        r[1] += b is Status.FALSIFIED
        r[2] += b is Status.VERIFIED
        r[3] += a is Status.FALSIFIED
        r[4] += a is Status.VERIFIED
        r[5] += a is b
        if a is not b:
            changed.append((key, before[key], after[key]))
            contradictions += b in ANSWERS and a in ANSWERS
    print(f"{'family':26s} {'both':>5s} {'before sat/unsat':>17s} {'after sat/unsat':>16s} {'same':>5s}")
    for family, (n, bs, bu, as_, au, same) in rows.items():
        print(f"{family:26s} {n:5d} {bs:8d} / {bu:<6d} {as_:7d} / {au:<6d} {same:5d}")
    total = [sum(col) for col in zip(*rows.values())] if rows else [0] * 6
    print(f"{'all':26s} {total[0]:5d} {total[1]:8d} / {total[2]:<6d} {total[3]:7d} / {total[4]:<6d} {total[5]:5d}")
    if changed:
        print("\nstatus differs:")
    for (family, index), b, a in changed:
        print(f"  {family} #{index}: {b.status.vnncomp} ({b.seconds:.1f} s) → {a.status.vnncomp} ({a.seconds:.1f} s)"
              f" of {a.timeout:.1f} s; ground truth {b.ground_truth.vnncomp if b.ground_truth else '-'}")
    print(f"\n{len(both) - len(changed)} of {len(both)} the same; {contradictions} contradiction(s)")
    return 1 if contradictions else 0


if __name__ == "__main__":
    sys.exit(main())
