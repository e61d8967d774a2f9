"""Cactus plots and per-family tables of a ``certkit vnncomp`` run, beside the published winner.

The winner is α,β-CROWN: each family's ground_truth.csv holds its published answer and
wall-clock time per instance (``abcrown_result``, ``abcrown_runtime_s``, as VNN-COMP measured
them, tool start-up included). The comparison uses the instances of the results file only,
and each instance's timeout *in this run*: a run with ``--timeout-scale 0.05`` gives the
winner the same 5 % of the published timeout, so a winner's time above it counts as
unsolved.

A cactus plot shows, per tool, its solved instances' times sorted ascending against their
count (VNN-COMP's "accumulated" plots): the line that reaches further right solved more, the
lower one solved them faster. Solved means a ``sat``/``unsat`` answer equal to a
``sat``/``unsat`` ground truth; a wrong answer is not solved.

The score is VNN-COMP 2023's (ChristopherBrix/vnncomp2023_results, SCORING/process_results.py
``get_score`` with ``add_time_bonus = False`` and settings.py ``PENALTY_INCORRECT = -150``):
+10 per correct ``sat``/``unsat``, −150 per wrong one, 0 otherwise. The points are
:mod:`certkit.vnncomp.runner`'s.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certkit.errors import InvalidInput
from certkit.figures import new_figure, save_figures
from certkit.status import Status
from certkit.vnncomp.runner import ANSWERS, CORRECT_POINTS, WRONG_POINTS, Instance, Outcome, discover, read_outcomes

if TYPE_CHECKING:
    from rich.table import Table

WINNER = "α,β-CROWN"
SCORE_FORMULA = (f"score (VNN-COMP 2023): {CORRECT_POINTS:+d} per correct sat/unsat, {WRONG_POINTS:+d} per wrong "
                 "answer, 0 otherwise (no time bonus)")
TABLE_COLUMNS = ("instances", "truth_sat_unsat", "solved_sat", "solved_unsat", "wrong", "unchecked", "timeout",
                 "unknown", "error", "score", "winner_solved", "winner_wrong", "winner_score", "total_s", "median_s")

# the terminal table's columns and short headers, to fit 80 characters (the caption's legend spells
# them out); the other columns are in the JSON (the winner's wrong answers would be errors of the
# ground truth, the times are in the plot)
SHOWN = ("instances", "solved_sat", "solved_unsat", "wrong", "timeout", "unknown", "error", "score", "winner_solved",
         "winner_score")
HEADERS = {"instances": "inst", "solved_sat": "sat", "solved_unsat": "unsat", "timeout": "t/o", "unknown": "unk",
           "error": "err", "winner_solved": "α,β\nsolved", "winner_score": "α,β\nscore"}
LEGEND = ("sat, unsat: solved (correct) answers (one where the ground truth is unknown counts in none); "
          "α,β: the winner's")


@dataclass
class _Row:
    """One instance of the results file, as the table and the plot count it."""

    family: str
    outcome: Outcome
    truth: Status | None
    winner: Status | None  # None: no ground-truth file, or it has no answer of the winner
    winner_time: float

    @property
    def solved_time(self) -> float | None:
        """certkit's time when it answered sat/unsat correctly, else None."""
        return self.outcome.seconds if self.outcome.verdict == "correct" else None

    def _winner_answered(self) -> bool:
        """The winner answered sat/unsat within this run's timeout of the instance."""
        return self.winner in ANSWERS and self.winner_time <= self.outcome.timeout

    @property
    def winner_solved_time(self) -> float | None:
        """The winner's published time when it answered correctly within this run's timeout."""
        return self.winner_time if self._winner_answered() and self.winner is self.truth else None

    @property
    def winner_wrong(self) -> bool:
        return self._winner_answered() and self.truth in ANSWERS and self.winner is not self.truth


def _read_results(results_csv: str | Path) -> list[Outcome]:
    """The rows of a results CSV; one readable error for a missing, foreign or empty file."""
    path = Path(results_csv)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file (a `certkit vnncomp --out` results CSV)")
    outcomes = read_outcomes(path)
    if not outcomes:
        raise InvalidInput(f"{path}: no instances in it (an empty results file)")
    return outcomes


def _benchmark_dir(ground_truth: str | Path) -> Path:
    """The benchmark directory ``ground_truth`` names: a family directory or a directory of
    families, or a ground-truth file inside one (its ground_truth.csv, all_ground_truth.csv)."""
    path = Path(ground_truth)
    if path.is_file():
        return path.parent
    if not path.is_dir():
        raise InvalidInput(f"{path}: no such benchmark directory or ground-truth file")
    return path


def _match(outcomes: list[Outcome], instances: list[Instance], bench: Path) -> list[Instance]:
    """The benchmark's instance of each outcome: the one at its index when that names the same
    files (a run of the whole family), else the first with its family and files (a run of an
    ``--instances`` list)."""
    by_index = {(i.family, i.index): i for i in instances}
    by_files: dict[tuple[str, str, str], Instance] = {}
    for i in instances:
        by_files.setdefault((i.family, i.onnx, i.vnnlib), i)
    out = []
    for o in outcomes:
        inst = by_index.get((o.family, o.index))
        if inst is None or (inst.onnx, inst.vnnlib) != (o.onnx, o.vnnlib):
            inst = by_files.get((o.family, o.onnx, o.vnnlib))
        if inst is None:
            raise InvalidInput(f"{bench}: has no instance {o.family} {o.onnx} {o.vnnlib} of the results file; "
                               "give the benchmark directory the run used")
        out.append(inst)
    return out


def _rows(outcomes: list[Outcome], instances: list[Instance] | None) -> list[_Row]:
    """Pair each outcome with its instance's ground truth and the winner's answer (none
    without ``instances``: the results file's ground truth alone)."""
    if instances is None:
        return [_Row(o.family, o, o.ground_truth, None, math.nan) for o in outcomes]
    return [_Row(o.family, o, i.ground_truth, i.winner, i.winner_time) for o, i in zip(outcomes, instances)]


def _table(rows: list[_Row]) -> dict[str, int | float | None]:
    """The counts and scores of ``rows``: instances whose ground truth is sat/unsat, solved
    sat/unsat, wrong, unchecked (an answer where the ground truth is unknown), timeout,
    unknown, error, the winner's under the same timeouts, and certkit's total and median time."""
    def count(test) -> int:
        return sum(bool(test(r)) for r in rows)

    correct = count(lambda r: r.solved_time is not None)
    wrong = count(lambda r: r.outcome.verdict == "wrong")
    winner_solved = count(lambda r: r.winner_solved_time is not None)
    winner_wrong = count(lambda r: r.winner_wrong)
    seconds = [r.outcome.seconds for r in rows]
    return {
        "instances": len(rows), "truth_sat_unsat": count(lambda r: r.truth in ANSWERS),
        "solved_sat": count(lambda r: r.solved_time is not None and r.outcome.status is Status.FALSIFIED),
        "solved_unsat": count(lambda r: r.solved_time is not None and r.outcome.status is Status.VERIFIED),
        "wrong": wrong, "unchecked": count(lambda r: r.outcome.verdict == "unchecked"),
        "timeout": count(lambda r: r.outcome.status is Status.TIMEOUT),
        "unknown": count(lambda r: r.outcome.status is Status.UNKNOWN),
        "error": count(lambda r: r.outcome.status is Status.ERROR),
        "score": CORRECT_POINTS * correct + WRONG_POINTS * wrong,
        "winner_solved": winner_solved, "winner_wrong": winner_wrong,
        "winner_score": CORRECT_POINTS * winner_solved + WRONG_POINTS * winner_wrong,
        "total_s": round(sum(seconds), 3), "median_s": round(statistics.median(seconds), 3) if seconds else None,
    }


def _panel(rows: list[_Row], with_winner: bool) -> dict[str, Any]:
    """One family's (or all) cactus lines and table: sorted solved times of certkit and of the
    winner (None without a ground-truth file)."""
    winner = sorted(t for r in rows if (t := r.winner_solved_time) is not None) if with_winner else None
    return {"certkit": sorted(t for r in rows if (t := r.solved_time) is not None), "winner": winner,
            "table": _table(rows)}


def _timeout_scale(outcomes: list[Outcome], instances: list[Instance]) -> float | None:
    """The factor between this run's timeouts and the published ones; None when it varies."""
    scales = {round(o.timeout / i.timeout, 6) for o, i in zip(outcomes, instances) if i.timeout > 0}
    return scales.pop() if len(scales) == 1 else None


def _caption(with_winner: bool, scale: float | None) -> str:
    """What the lines compare, and how the winner's times were made comparable."""
    if not with_winner:
        return f"certkit's solved instances (no {WINNER} line: no ground truth with its answers was given)"
    timeouts = "the published timeouts" if scale == 1 else (
        f"the published timeouts × {scale:g} (--timeout-scale)" if scale is not None else "this run's timeouts")
    return (f"certkit vs {WINNER} (published VNN-COMP times) on the same instances, both under {timeouts}: "
            f"{WINNER}'s times above an instance's timeout in this run count as unsolved")


def series_from(outcomes: list[Outcome], instances: list[Instance] | None) -> dict[str, Any]:
    """The cactus lines and tables (JSON-able) of ``outcomes``; ``instances``, one per outcome,
    carry the ground truth and the winner's answer and time (None: no winner line)."""
    rows = _rows(outcomes, instances)
    with_winner = instances is not None and any(i.winner is not None for i in instances)
    scale = _timeout_scale(outcomes, instances) if instances is not None else None
    names = dict.fromkeys(r.family for r in rows)
    families = {f: _panel([r for r in rows if r.family == f], with_winner) for f in names}
    return {"winner": WINNER if with_winner else None, "timeout_scale": scale, "score_formula": SCORE_FORMULA,
            "caption": _caption(with_winner, scale), "families": families, "overall": _panel(rows, with_winner)}


def run_series(instances: list[Instance], outcomes: list[Outcome]) -> dict[str, Any]:
    """The series of a run that just ended (``certkit vnncomp --plots``): its outcomes of
    ``instances`` (the CSV may hold rows of other families from earlier runs; left out, as
    the runner's table leaves them out)."""
    by = {(i.family, i.index): i for i in instances}
    ran = [o for o in outcomes if (o.family, o.index) in by]
    return series_from(ran, [by[(o.family, o.index)] for o in ran])


def vnncomp_series(results_csv: str | Path, ground_truth: str | Path | None = None) -> dict[str, Any]:
    """The cactus lines and per-family tables of a results CSV (JSON-able), with the winner's
    line when ``ground_truth`` names the benchmark the run used (its directory, a family's
    directory, or a ground-truth file in one), read as ``certkit vnncomp`` reads it."""
    outcomes = _read_results(results_csv)
    instances = None
    if ground_truth is not None:
        bench = _benchmark_dir(ground_truth)
        known = discover(bench, families=sorted({o.family for o in outcomes}))
        instances = _match(outcomes, known, bench)
    series = series_from(outcomes, instances)
    series["results"] = str(results_csv)
    return series


def _draw_panel(ax, title: str, panel: dict[str, Any]) -> None:
    """One cactus panel: certkit's and the winner's sorted times against their count, log time."""
    from matplotlib.ticker import FuncFormatter

    lines = [("certkit", panel["certkit"], "tab:blue")]
    if panel["winner"] is not None:
        lines.append((WINNER, panel["winner"], "tab:orange"))
    n = panel["table"]["instances"]
    for name, times, color in lines:
        ax.plot(range(1, len(times) + 1), times, marker="o", markersize=3, color=color,
                label=f"{name} ({len(times)}/{n})")
    if any(times for _, times, _ in lines):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 5, not 5×10⁰
        # between decades only 2× and 5× are labelled: every minor tick's label overlaps its neighbours
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlim(0, max(n, 1) + 0.5)
    ax.set(title=title, xlabel="instances solved", ylabel="time (s)")
    ax.legend(fontsize=7)


def write_vnncomp_plots(series: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw the cactus plot (one panel per family, and one of all when there are several) into
    ``out_dir``/cactus.png and cactus.svg; returns the paths."""
    panels = list(series["families"].items())
    if len(panels) > 1:
        panels.append(("all families", series["overall"]))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = new_figure(max(4.2 * cols, 7.5), 3.4 * rows + 0.8, rows, cols, layout="tight")
    for ax, (title, panel) in zip(axes.flat, panels):
        _draw_panel(ax, title, panel)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{series['caption']}\n{series['score_formula']}", fontsize=9, wrap=True)
    return save_figures({"cactus": fig}, out_dir)  # each file atomically


def summary_table(series: dict[str, Any]) -> Table:
    """The per-family table of :func:`vnncomp_series` (and a row of all), the score formula
    and the comparison's terms as its caption."""
    from rich import box
    from rich.table import Table

    t = Table(title="VNN-COMP benchmark", title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True,
              pad_edge=False, caption_justify="left", caption=f"{series['score_formula']}. {series['caption']}. "
              f"{LEGEND}.")
    t.add_column("family", overflow="fold", min_width=10)
    for col in SHOWN:
        t.add_column(HEADERS.get(col, col), justify="right", no_wrap=True)
    rows = list(series["families"].items())
    if len(rows) > 1:
        rows.append(("all", series["overall"]))
    for name, panel in rows:
        cells = panel["table"]
        shown = [str(cells[c]) if series["winner"] or not c.startswith("winner") else "-" for c in SHOWN]
        t.add_row(name, *shown, style="bold red" if cells["wrong"] else None)
    return t


def report_csv(results_csv: str | Path, plots_dir: str | Path | None = None,
               ground_truth: str | Path | None = None) -> dict[str, Any]:
    """``certkit report results.csv``: the series and tables of :func:`vnncomp_series`, and
    with ``plots_dir`` the cactus plot there (its paths under ``plots``)."""
    series = vnncomp_series(results_csv, ground_truth)
    if plots_dir is not None:
        series["plots"] = [str(p) for p in write_vnncomp_plots(series, plots_dir)]
    return series
