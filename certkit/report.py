"""Rich terminal output: graph tables and bound tables."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from torch import Tensor

from certkit.bounds.graph import Graph
from certkit.onnx_io import OnnxSummary

console = Console()
err_console = Console(stderr=True)


def graph_table(graph: Graph, title: str) -> Table:
    """One row per normalised node: kind, source operator, per-sample shape, parameters."""
    t = Table(title=title, title_justify="left")
    for col in ("#", "node", "kind", "from", "inputs", "shape", "params", "details"):
        t.add_column(col, justify="right" if col in ("#", "params") else "left")
    for i, n in enumerate(graph.nodes):
        kind = "input" if n.op is None else n.op.kind
        params = 0 if n.op is None else n.op.num_params()
        details = "" if n.op is None else n.op.describe()
        t.add_row(str(i), n.name, kind, n.source, ", ".join(n.inputs), "×".join(map(str, n.shape)),
                  f"{params:,}" if params else "", details)
    return t


def onnx_table(summary: OnnxSummary) -> Table:
    """The raw ONNX node list (used when the file cannot be normalised)."""
    bad = {name for name, _ in summary.unsupported}
    t = Table(title=f"{summary.path.name}: ONNX nodes (opset {summary.opset})", title_justify="left")
    for col in ("#", "node", "op type", "output shape"):
        t.add_column(col)
    for i, (name, op, shape) in enumerate(summary.nodes):
        style = "bold red" if name in bad else None
        t.add_row(str(i), name, op, shape, style=style)
    return t


def bounds_table(lb: Tensor, ub: Tensor | None, row_names: list[str], max_samples: int = 8) -> Table:
    """Lower / upper bounds per sample and output (or specification row)."""
    t = Table(title="bounds", title_justify="left")
    for col in ("sample", "output", "lower", "upper", "width"):
        t.add_column(col, justify="left" if col == "output" else "right")
    B = lb.shape[0]
    for b in range(min(B, max_samples)):
        for j, name in enumerate(row_names):
            lo = float(lb[b, j])
            up = float(ub[b, j]) if ub is not None else math.nan
            style = "green" if lo > 0 else None
            t.add_row(str(b), name, f"{lo:.6g}", f"{up:.6g}", f"{up - lo:.4g}", style=style)
        if b + 1 < min(B, max_samples):
            t.add_section()
    if B > max_samples:
        t.caption = f"{B - max_samples} more samples in the output file"
    return t


class TrainProgress:
    """A rich progress bar per epoch showing loss, ε, clean / IBP-verified error and speed."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TextColumn("{task.fields[speed]}"),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.sums: dict[str, float] = {}
        self.count = 0

    def start_epoch(self, epoch: int, total: int) -> None:
        import time

        self.progress.start()
        self.task = self.progress.add_task("", total=total, epoch=epoch, info="", speed="")
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()

    def advance(self, stats: dict) -> None:
        import time

        self.count += 1
        for k in ("loss", "clean_err", "ibp_err"):
            v = stats[k]
            if v == v:  # not NaN
                self.sums[k] = self.sums.get(k, 0.0) + v
        avg = {k: v / self.count for k, v in self.sums.items()}
        info = (f"loss {avg.get('loss', 0):.4f}  ε {stats['eps']:.4g}  clean err {100 * avg.get('clean_err', 0):.1f}%"
                + (f"  IBP err {100 * avg['ibp_err']:.1f}%" if "ibp_err" in avg else ""))
        rate = self.count / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(self.task, advance=1, info=info, speed=f"{rate:.2f} it/s")

    def end_epoch(self) -> None:
        self.progress.stop()


def _measures(s: dict) -> dict[str, tuple[str, str | None]]:
    """The summary's accuracies and shares, label → (value, row style), in display order (none
    for a file without rows)."""
    if s["samples"] == 0:
        return {}
    rows: dict[str, tuple[str, str | None]] = {"clean accuracy": (f"{s['clean_accuracy']:.2f}%", None)}
    for stage, acc in s["verified_by_stage"].items():
        rows[f"verified accuracy after {stage}"] = (f"{acc:.2f}%", "green")
    rows["PGD-robust accuracy (upper bound)"] = (f"{s['pgd_robust_accuracy']:.2f}%", None)
    rows["falsified (confirmed by onnxruntime)"] = (f"{s['falsified']:.2f}%", "red")
    rows["unknown"] = (f"{s['unknown']:.2f}%", None)
    if "error" in s:
        rows["error (the worker kept dying; see `reason`)"] = (f"{s['error']:.2f}%", "bold red")
    if "reused" in s:
        rows["answer carried over from another ε"] = (f"{s['reused']:.2f}%", None)
    return rows


def results_table(summaries: list[dict]) -> Table:
    """The table of one results file: :func:`summary_table` for one ε, :func:`sweep_table` for several."""
    return sweep_table(summaries) if len(summaries) > 1 else summary_table(summaries[0])


def summary_table(s: dict) -> Table:
    """The verification summary: accuracies per stage, PGD-robust accuracy, unknown, time."""
    t = Table(title=f"certkit verify: ε = {s['eps']:.6g}, method {s['method']}, "
                    f"{s['samples']} of {s['requested']} samples" + ("" if s["complete"] else " (incomplete)"),
              title_justify="left")
    t.add_column("measure")
    t.add_column("value", justify="right")
    if s["samples"] == 0:
        t.add_row("samples", "0")
        return t
    if s.get("bounded_output", "outputs") != "outputs":
        t.add_row("margins bounded on", s["bounded_output"])
    for label, (value, style) in _measures(s).items():
        t.add_row(label, value, style=style)
    for stage, sec in s["time_by_stage"].items():
        t.add_row(f"time in {stage}", f"{sec:.2f} s")
    t.add_row("total time", f"{s['time_total']:.2f} s ({s['time_total'] / s['samples']:.3f} s/sample)")
    return t


def sweep_table(summaries: list[dict]) -> Table:
    """A sweep's summaries (:func:`certkit.results.summarize` per ε, ascending) as one table, a column per ε."""
    first = summaries[0]
    incomplete = [f"{s['eps']:.6g}" for s in summaries if not s["complete"]]
    t = Table(title=f"certkit verify: ε sweep, method {first['method']}, {first['requested']} samples"
                    + (f" (incomplete at ε {', '.join(incomplete)})" if incomplete else ""), title_justify="left")
    t.add_column("measure")
    for s in summaries:
        t.add_column(f"ε = {s['eps']:.4g}", justify="right")
    if first.get("bounded_output", "outputs") != "outputs":
        t.caption = f"margins bounded on the {first['bounded_output']}"
    columns = [_measures(s) for s in summaries]
    t.add_row("samples", *(str(s["samples"]) for s in summaries))
    for label in dict.fromkeys(label for c in columns for label in c):  # every radius's rows, first seen first
        style = next(c[label][1] for c in columns if label in c)
        t.add_row(label, *(c[label][0] if label in c else "" for c in columns), style=style)
    t.add_row("total time", *(f"{s['time_total']:.2f} s" if "time_total" in s else "" for s in summaries))
    return t


def vnncomp_table(summary: list) -> Table:
    """Per family: answers, wrong answers against the ground truth, VNN-COMP score and times."""
    t = Table(title="VNN-COMP benchmark", title_justify="left")
    cols = ("family", "run", "sat", "unsat", "unknown", "timeout", "error", "correct", "wrong", "score",
            "solved / truth", "winner", "total s", "median s")
    for col in cols:
        t.add_column(col, justify="left" if col == "family" else "right")
    for s in summary:
        t.add_row(s.family, f"{s.run}/{s.instances}", str(s.sat), str(s.unsat), str(s.unknown), str(s.timeout),
                  str(s.error), str(s.correct), str(s.wrong), str(s.score), f"{s.correct}/{s.truth_solved}",
                  str(s.winner_solved), f"{s.total_seconds:.0f}", f"{s.median_seconds:.1f}",
                  style="bold red" if s.wrong else None)
    return t
