"""``certkit report ... --html REPORT.html``: one self-contained HTML page of verification results.

Everything is inside the one file, so that it can be mailed or archived and still opens
offline: the figures as PNG data URIs, the styles and the few lines of script that sort the
per-sample tables. Nothing is fetched from anywhere. Per results file: its provenance (the
attributes that say which model, data and options produced it), its summary per ε, its
counterexamples with the model's scores, and a table of every sample.
"""

from __future__ import annotations

import base64
import json
import math
import time
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from certkit import __version__
from certkit.figures import Run, best_margins, figure_bytes
from certkit.files import write_atomically
from certkit.results import STATUS

# the provenance rows shown first, in this order; any other attribute follows
PROVENANCE = ("model_path", "model_sha256", "eps", "method", "dataset", "start", "n", "created", "certkit_version",
              "torch_version", "device", "bounded_output", "options", "complete")
HIDDEN_ATTRS = ("status_names", "rows_committed")  # bookkeeping

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; background: #f3f3f3; }
table.sortable th[data-order="asc"]::after { content: " \\25B2"; }
table.sortable th[data-order="desc"]::after { content: " \\25BC"; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; }
figure img { max-width: 100%; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; }
code { font-size: 0.85em; word-break: break-all; }
"""

# click a header: sort the table's rows by that column (numbers by value, text alphabetically,
# empty cells last), again: the other way
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], col = th.cellIndex;
    var asc = th.dataset.order !== "asc";
    th.closest("tr").querySelectorAll("th").forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = asc ? "asc" : "desc";
    var key = function (row) {
      var c = row.cells[col];
      return c.dataset.v !== undefined ? c.dataset.v : c.textContent;
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def write_html(path: str | Path, runs: list[Run], series: dict[str, Any], figures: dict[str, Any],
               notes: list[str]) -> None:
    """Render the report and write it atomically: no half-written page is left if anything fails."""
    page = render_html(runs, series, {name: figure_bytes(fig, "png") for name, fig in figures.items()}, notes)
    write_atomically(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def render_html(runs: list[Run], series: dict[str, Any], images: dict[str, bytes], notes: list[str]) -> str:
    """The page: notes, every figure (PNG bytes by name) inline, then one section per file."""
    counterexamples = {panel["file"]: panel for panel in series["counterexamples"]}
    parts = [f"<h1>certkit verification report</h1><p>certkit {escape(__version__)}, "
             f"{escape(time.strftime('%Y-%m-%d %H:%M:%S'))}: {len(runs)} results file(s)</p>"]
    parts += [f'<p class="note">{escape(n)}</p>' for n in notes]
    parts.append("<h2>Figures</h2>" + "".join(_figure(name, png) for name, png in images.items()))
    parts += [_file_section(run, counterexamples.get(str(run.path))) for run in runs]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>certkit report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")


def _figure(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="figure-{escape(name)}"><img alt="{escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(name)}</figcaption></figure>")


def _file_section(run: Run, counterexamples: dict[str, Any] | None) -> str:
    """A file's provenance, summary per ε, counterexamples and per-sample table."""
    parts = [f"<section><h2>{escape(run.name)}</h2><p>results file <code>{escape(str(run.path))}</code></p>",
             "<h3>Provenance</h3>", _provenance_table(run), "<h3>Summary</h3>", _summary_table(run)]
    if counterexamples and (counterexamples["examples"] or counterexamples["note"]):
        parts += ["<h3>Counterexamples</h3>", _counterexample_table(counterexamples)]
    parts += ["<h3>Samples</h3><p>Click a column header to sort.</p>", _sample_table(run), "</section>"]
    return "\n".join(parts)


def _provenance_table(run: Run) -> str:
    """Each attribute of the file, with its distinct values over the file's ε joined by '; '."""
    keys = [k for k in PROVENANCE if any(k in attrs for attrs, _ in run.levels)]
    keys += sorted({k for attrs, _ in run.levels for k in attrs} - set(keys) - set(HIDDEN_ATTRS))
    rows = []
    for k in keys:
        values = list(dict.fromkeys(_text(attrs.get(k)) for attrs, _ in run.levels if k in attrs))
        rows.append(f"<tr><th>{escape(k)}</th><td><code>{escape('; '.join(values))}</code></td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _summary_table(run: Run) -> str:
    """Measures (rows) against ε (columns), from :func:`certkit.results.summarize`."""
    summaries = run.summaries()
    measures: dict[str, list[str]] = {}
    for i, s in enumerate(summaries):
        for name, value in _summary_rows(s):
            measures.setdefault(name, [""] * len(summaries))[i] = value
    head = "".join(f"<th>ε = {e:.6g}</th>" for e in run.eps)
    body = "".join(f"<tr><th>{escape(m)}</th>" + "".join(f'<td class="num">{escape(v)}</td>' for v in values)
                   + "</tr>" for m, values in measures.items())
    return f"<table><thead><tr><th>measure</th>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, formatted value) of one summary, in the terminal table's order."""
    rows = [("samples", f"{s['samples']} of {s['requested']}" + ("" if s["complete"] else " (incomplete)"))]
    if "clean_accuracy" not in s:
        return rows
    rows.append(("clean accuracy", f"{s['clean_accuracy']:.2f}%"))
    rows += [(f"verified after {stage}", f"{acc:.2f}%") for stage, acc in s["verified_by_stage"].items()]
    rows += [("verified accuracy", f"{s['verified_accuracy']:.2f}%"),
             ("PGD-robust accuracy", f"{s['pgd_robust_accuracy']:.2f}%"), ("falsified", f"{s['falsified']:.2f}%"),
             ("unknown", f"{s['unknown']:.2f}%")]
    if "error" in s:
        rows.append(("error", f"{s['error']:.2f}%"))
    rows += [(f"time in {stage}", f"{sec:.2f} s") for stage, sec in s["time_by_stage"].items()]
    return rows + [("total time", f"{s['time_total']:.2f} s")]


def _counterexample_table(panel: dict[str, Any]) -> str:
    """The note, if any, and per counterexample of the grid: label, the class it gets, the scores."""
    note = f'<p class="note">{escape(panel["note"])}</p>' if panel["note"] else ""
    if not panel["examples"]:
        return note
    head = "".join(f"<th>{h}</th>" for h in ("index", "ε", "label", "class of the counterexample",
                                             "scores of the original", "scores of the counterexample"))
    rows = "".join(
        f'<tr><td class="num">{e["index"]}</td><td class="num">{e["eps"]:.6g}</td><td class="num">{e["label"]}</td>'
        f'<td class="num">{"" if e["predicted"] is None else e["predicted"]}</td>'
        f"<td><code>{_scores(e['scores_original'])}</code></td>"
        f"<td><code>{_scores(e['scores_counterexample'])}</code></td></tr>" for e in panel["examples"])
    return f'{note}<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _scores(scores: list[float | None] | None) -> str:
    return "" if scores is None else escape(", ".join("?" if v is None else f"{v:.4g}" for v in scores))


def _sample_table(run: Run) -> str:
    """One row per sample (by dataset index) and, per ε, its status, deciding stage, best margin and time."""
    columns = ["index", "label", "prediction"]
    for e in run.eps:
        columns += [f"{c} ε={e:.4g}" for c in ("status", "stage", "best margin", "time (s)")]
    per_eps = [_sample_cells(attrs, data) for attrs, data in run.levels]
    indices = list(dict.fromkeys(i for cells in per_eps for i in cells))
    known = {}  # index → (label, prediction), from the smallest ε that has the sample
    for _, data in reversed(run.levels):
        known.update({int(i): (int(y), int(p)) for i, y, p in zip(data["index"], data["label"], data["prediction"])})
    rows = []
    for i in indices:
        label, prediction = known[i]
        cells = [_cell(i), _cell(label), _cell(prediction)]
        for level in per_eps:
            cells += level.get(i, ['<td data-v=""></td>'] * 4)
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    return f'<table class="sortable samples"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _sample_cells(attrs: dict[str, Any], data: dict[str, np.ndarray]) -> dict[int, list[str]]:
    """Per sample index: the cells status, stage, best margin and time of one ε."""
    stages = list(attrs["stages"])
    names = list(attrs.get("status_names", STATUS))
    margins = best_margins(data)
    times = np.nansum(np.asarray(data["times"], dtype=np.float64), axis=1)
    out = {}
    for row, i in enumerate(data["index"]):
        status, stage = int(data["status"][row]), int(data["stage"][row])
        reused = "reused_from" in data and math.isfinite(float(data["reused_from"][row]))
        stage_text = stages[stage] if 0 <= stage < len(stages) else ""
        if reused:
            stage_text += f" (reused from ε={float(data['reused_from'][row]):.4g})"
        out[int(i)] = [_cell(names[status] if 0 <= status < len(names) else str(status), text=True),
                       _cell(stage_text, text=True), _cell(float(margins[row])), _cell(float(times[row]))]
    return out


def _cell(value: Any, text: bool = False) -> str:
    """A table cell; numbers right-aligned with their exact value as the sort key, NaN empty."""
    if text:
        return f"<td>{escape(str(value))}</td>"
    if isinstance(value, float):
        if not math.isfinite(value):
            return '<td class="num" data-v=""></td>'
        return f'<td class="num" data-v="{value!r}">{value:.4g}</td>'
    return f'<td class="num">{escape(str(value))}</td>'
