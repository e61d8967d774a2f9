"""Figures of ``certkit verify`` results: the series behind each one, and the matplotlib figures.

``certkit report RESULTS.h5 [MORE.h5 ...] --plots DIR`` draws five kinds of figure
(docs/reports.md): accuracies against ε, the share of samples each stage decided, the
histogram of the best margin lower bound, the time per stage, and a grid of
counterexamples. Every figure is drawn from a JSON-able *series* dict (the x and y of each
line, bar heights, histogram counts and edges), which ``report --json`` prints as well, so
the numbers a figure shows can be checked against the ones printed.

One results file stands for one model (its ``model_path``) at one ε or, for a sweep file,
at several; files are compared only when they cover the same data slice and the same ε
set, unless ``allow_mixed`` (then the differences become notes of the report).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from certkit.errors import InvalidInput
from certkit.files import file_sha256, write_atomically
from certkit.results import STATUS, read_sweep, summarize

QUANTITIES = (("verified", "verified_accuracy", "-"), ("PGD-robust", "pgd_robust_accuracy", "--"),
              ("clean", "clean_accuracy", ":"))  # (legend word, summarize() key, line style)
DATA_ATTRS = ("dataset", "start", "n")  # what makes two files cover the same samples
FIGURE_FORMATS = ("png", "svg")


@dataclass
class Run:
    """One results file: its path, the name its lines carry (the model's), and (attrs, data) per ε."""

    path: Path
    name: str
    levels: list[tuple[dict[str, Any], dict[str, np.ndarray]]]

    @property
    def eps(self) -> list[float]:
        return [float(attrs["eps"]) for attrs, _ in self.levels]

    def summaries(self) -> list[dict[str, Any]]:
        """:func:`certkit.results.summarize` of every ε, in ascending ε order."""
        return [summarize(attrs, data) for attrs, data in self.levels]


# ---------------------------------------------------------------------------------------------------------------------
# reading and comparing files


def load_runs(paths: Iterable[str | Path], allow_mixed: bool = False) -> tuple[list[Run], list[str]]:
    """The runs of results files, and the notes of the report (their differences under ``allow_mixed``).

    Files that cover different data (``dataset``, ``start``, ``n``) or different ε sets cannot be
    compared point by point: without ``allow_mixed`` that is an :class:`InvalidInput` naming the
    difference."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if p.suffix.lower() == ".csv":
            raise InvalidInput(f"{p}: a VNN-COMP results CSV, not a verify results file (its figures: "
                               "certkit.vnncomp.figures.report_csv)")
    levels = [read_sweep(p) for p in paths]
    names = _model_names(paths, levels)
    runs = [Run(p, name, lv) for p, name, lv in zip(paths, names, levels)]
    differences = mixed_differences(runs)
    if differences and not allow_mixed:
        raise InvalidInput(f"{differences[0]}; pass --allow-mixed to compare them anyway")
    return runs, [f"mixed inputs: {d}" for d in differences]


def _model_names(paths: list[Path], levels: list[list[tuple[dict, dict]]]) -> list[str]:
    """The model file's stem per results file, followed by the results file where two files share it."""
    stems = [Path(str(lv[0][0].get("model_path", p.stem))).stem for p, lv in zip(paths, levels)]
    return [s if stems.count(s) == 1 else f"{s} ({p})" for s, p in zip(stems, paths)]


def mixed_differences(runs: list[Run]) -> list[str]:
    """One line per file that covers other data or another ε set than the first file."""
    if not runs:
        return []
    first = runs[0]
    out = []
    for run in runs[1:]:
        a, b = _data_slice(first), _data_slice(run)
        if a != b:
            out.append(f"{first.path} and {run.path} cover different data: {_slice_text(a)} vs {_slice_text(b)}")
        if _rounded(first.eps) != _rounded(run.eps):
            out.append(f"{first.path} and {run.path} have different ε: {_eps_text(first.eps)} vs "
                       f"{_eps_text(run.eps)}")
    return out


def _data_slice(run: Run) -> tuple:
    return tuple(run.levels[0][0].get(k) for k in DATA_ATTRS)


def _slice_text(values: tuple) -> str:
    dataset, start, n = values
    return f"{dataset} (start {start}, n {n})"


def _rounded(eps: list[float]) -> list[float]:
    return [round(e, 9) for e in eps]


def _eps_text(eps: list[float]) -> str:
    return ", ".join(f"{e:.6g}" for e in eps) or "none"


# ---------------------------------------------------------------------------------------------------------------------
# per-sample quantities


def best_margins(data: dict[str, np.ndarray]) -> np.ndarray:
    """Per sample, the best margin lower bound: the max over stages of the min over specs of ``margins``.

    A stage whose bounds hold a NaN or an infinity proves nothing, so only stages with finite
    bounds on every spec count; a sample without one gets NaN: no bound stage ran on it
    (misclassified, an answer a sweep carried over from another ε) or every bound was NaN/Inf."""
    margins = np.asarray(data["margins"], dtype=np.float64)
    if margins.shape[0] == 0:
        return np.zeros(0)
    with np.errstate(invalid="ignore"):
        per_stage = margins.min(axis=2) if margins.shape[2] else np.full(margins.shape[:2], np.nan)
    per_stage[~np.isfinite(per_stage)] = -np.inf
    best = per_stage.max(axis=1)
    best[~np.isfinite(best)] = np.nan
    return best


def decided_by(attrs: dict[str, Any], data: dict[str, np.ndarray]) -> np.ndarray:
    """Per sample, what decided it: a stage's name, ``reused`` (a sweep carried the verified or
    falsified answer over from another ε), or the status of an undecided sample (unknown,
    misclassified, error)."""
    stages = list(attrs["stages"])
    stage, status = np.asarray(data["stage"], dtype=np.int64), np.asarray(data["status"], dtype=np.int64)
    out = np.array([stages[s] if 0 <= s < len(stages) else STATUS[c] for s, c in zip(stage, status)], dtype=object)
    if "reused_from" in data:
        decided = np.isin(status, [STATUS.index("verified"), STATUS.index("falsified")])
        out[np.isfinite(np.asarray(data["reused_from"], dtype=np.float64)) & decided] = "reused"
    return out


# ---------------------------------------------------------------------------------------------------------------------
# series (JSON-able: lists of Python numbers, None where there is no value)


def report_series(runs: list[Run], max_counterexamples: int = 8, data_dir: str | None = None,
                  bins: int = 30) -> dict[str, Any]:
    """The data behind every figure, keyed by figure kind (see the ``*_series`` functions)."""
    return {"accuracy": accuracy_series(runs), "stages": stage_series(runs), "margins": margin_series(runs, bins),
            "times": time_series(runs),
            "counterexamples": [counterexample_series(r, max_counterexamples, data_dir) for r in runs]}


def accuracy_series(runs: list[Run]) -> dict[str, Any]:
    """One line per file and quantity (verified, PGD-robust, clean accuracy in %) against ε."""
    lines = []
    for run in runs:
        summaries = run.summaries()
        for word, key, style in QUANTITIES:
            lines.append({"model": run.name, "file": str(run.path), "quantity": word, "style": style,
                          "x": run.eps, "y": [s.get(key) for s in summaries]})
    return {"x_label": "ε (ℓ∞, pixel units)", "y_label": "accuracy (%)", "lines": lines}


def stage_series(runs: list[Run]) -> dict[str, Any]:
    """Per file, the share (%) of samples each stage decided at each ε: the heights of stacked bars.

    Every stage of the cascade has a bar segment; ``reused``, ``unknown``, ``misclassified``
    and ``error`` only where some ε has such samples."""
    panels = []
    for run in runs:
        stages = list(dict.fromkeys(s for attrs, _ in run.levels for s in attrs["stages"]))
        decided = [decided_by(attrs, data) for attrs, data in run.levels]
        extra = [c for c in ("reused", *STATUS[2:]) if any((d == c).any() for d in decided)]
        bars = {c: [_share(d == c) for d in decided] for c in stages + extra}
        panels.append({"model": run.name, "file": str(run.path), "eps": run.eps, "bars": bars})
    return {"y_label": "samples (%)", "panels": panels}


def _share(mask: np.ndarray) -> float:
    return 100.0 * float(mask.sum()) / len(mask) if len(mask) else 0.0


def margin_series(runs: list[Run], bins: int = 30) -> dict[str, Any]:
    """Per file, histograms of the best margin lower bound (:func:`best_margins`) at each ε, on bin
    edges shared by the file's ε; ``excluded`` counts the samples without a finite bound."""
    panels = []
    for run in runs:
        margins = [best_margins(data) for _, data in run.levels]
        finite = np.concatenate([m[np.isfinite(m)] for m in margins]) if margins else np.zeros(0)
        edges = np.histogram_bin_edges(finite, bins=bins) if len(finite) else np.zeros(0)
        histograms = [{"eps": eps, "counts": np.histogram(m[np.isfinite(m)], bins=edges)[0].tolist()
                       if len(edges) else [], "excluded": int((~np.isfinite(m)).sum())}
                      for eps, m in zip(run.eps, margins)]
        panels.append({"model": run.name, "file": str(run.path), "edges": edges.tolist(), "histograms": histograms})
    return {"x_label": "best margin lower bound (> 0: verified)", "y_label": "samples", "panels": panels}


def time_series(runs: list[Run]) -> dict[str, Any]:
    """Per file, the seconds each stage spent in total at each ε (summarize()'s ``time_by_stage``)."""
    panels = []
    for run in runs:
        summaries = run.summaries()
        stages = list(dict.fromkeys(s for attrs, _ in run.levels for s in attrs["stages"]))
        seconds = {s: [sm.get("time_by_stage", {}).get(s, 0.0) for sm in summaries] for s in stages}
        panels.append({"model": run.name, "file": str(run.path), "eps": run.eps, "seconds": seconds})
    return {"y_label": "time (s)", "panels": panels}


# ---------------------------------------------------------------------------------------------------------------------
# counterexamples


def counterexample_series(run: Run, limit: int, data_dir: str | None = None) -> dict[str, Any]:
    """The first ``limit`` confirmed counterexamples of a file (ascending ε, then sample order):
    each with its original, its label, the model's scores (onnxruntime) on both and the class
    the counterexample is given. ``note`` says what is missing: the model file (no scores), the
    data (no originals), or an image shape."""
    attrs = run.levels[0][0]
    out: dict[str, Any] = {"model": run.name, "file": str(run.path), "note": None, "shape": None,
                           "pixel_range": list((attrs.get("options") or {}).get("pixel_range", (0.0, 1.0))),
                           "examples": []}
    picked = _falsified_rows(run, limit)
    if not picked:
        return out
    model, input_shape, note = _model_for_scores(attrs)
    input_shape = input_shape or _square_image_shape(run.levels[0][1]["counterexample"].shape[1])
    out["shape"] = None if input_shape is None else list(input_shape)
    if input_shape is None or _image_layout(input_shape) is None:
        out["note"] = f"inputs of shape {input_shape or 'unknown'} are not images: no counterexample grid"
        return out
    try:
        originals = _originals(attrs, data_dir, input_shape)
    except (InvalidInput, OSError) as e:
        out["note"] = f"the original samples cannot be loaded ({e}): no counterexample grid"
        return out
    for eps, (_, data), row in picked:
        original = originals[int(data["index"][row]) - int(attrs["start"])]
        example = np.asarray(data["counterexample"][row], dtype=np.float32).reshape(input_shape)
        out["examples"].append({"eps": eps, "index": int(data["index"][row]), "label": int(data["label"][row]),
                                "prediction": int(data["prediction"][row]), "original": original.tolist(),
                                "counterexample": example.tolist()})
    _add_scores(out["examples"], model, input_shape)
    out["note"] = note
    return out


def _falsified_rows(run: Run, limit: int) -> list[tuple[float, tuple[dict, dict], int]]:
    """(ε, level, row) of the first ``limit`` falsified samples with a stored counterexample; one a
    sweep carried over from a smaller ε (``reused_from``) is shown there, not again."""
    picked = []
    for eps, level in zip(run.eps, run.levels):
        data = level[1]
        falsified = (data["status"] == STATUS.index("falsified")) & np.isfinite(data["counterexample"]).all(axis=1)
        if "reused_from" in data:
            falsified &= ~np.isfinite(data["reused_from"])
        picked += [(eps, level, int(r)) for r in np.flatnonzero(falsified)]
    return picked[:limit]


def _model_for_scores(attrs: dict[str, Any]) -> tuple[Path | None, tuple[int, ...] | None, str | None]:
    """(the model file to score with, its per-sample input shape, None), or (None, None, why not)."""
    from certkit.onnx_io import graph_input, read_proto

    path = Path(str(attrs.get("model_path", "")))
    if not path.is_file():
        return None, None, f"the model file {path} is not there: no scores (the images come from the dataset)"
    if attrs.get("model_sha256") and file_sha256(path) != attrs["model_sha256"]:
        return None, None, f"{path} is not the model that was verified (another SHA-256): no scores"
    return path, graph_input(read_proto(path))[1], None


def _square_image_shape(size: int) -> tuple[int, ...] | None:
    """Without the model, the shape of a square image of ``size`` values: one channel, else three."""
    for channels in (1, 3):
        side = math.isqrt(size // channels)
        if size % channels == 0 and side * side * channels == size:
            return channels, side, side
    return None


def _image_layout(shape: tuple[int, ...] | list[int]) -> str | None:
    """``gray`` for (H, W) or (1, H, W), ``rgb`` for (3, H, W), None for inputs that are no image."""
    shape = tuple(shape)
    if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1):
        return "gray"
    return "rgb" if len(shape) == 3 and shape[0] == 3 else None


def _originals(attrs: dict[str, Any], data_dir: str | None, input_shape: tuple[int, ...]) -> np.ndarray:
    """The verified samples [start, start + n) of the file's dataset, loaded as ``certkit verify`` does."""
    from certkit.verify import load_verify_data

    x, _, _ = load_verify_data(str(attrs["dataset"]), data_dir, int(attrs["start"]), int(attrs["n"]), input_shape)
    return x.numpy().astype(np.float32)


def _add_scores(examples: list[dict[str, Any]], model: Path | None, input_shape: tuple[int, ...]) -> None:
    """The model's scores (onnxruntime) on each original and counterexample, and the class the
    counterexample gets; None without the model."""
    if model is None or not examples:
        for e in examples:
            e.update(scores_original=None, scores_counterexample=None, predicted=None)
        return
    from certkit.ort_session import OrtSession

    session = OrtSession(model)
    points = np.array([e[k] for e in examples for k in ("original", "counterexample")], dtype=np.float32)
    scores = session.run(points.reshape(len(points), *input_shape)).reshape(len(points), -1)
    for e, original, counter in zip(examples, scores[0::2], scores[1::2]):
        e.update(scores_original=_floats(original), scores_counterexample=_floats(counter),
                 predicted=int(np.argmax(counter)))


def _floats(values: np.ndarray) -> list[float | None]:
    """Python floats, None for NaN and infinities (which JSON cannot hold)."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).reshape(-1)]


# ---------------------------------------------------------------------------------------------------------------------
# drawing (matplotlib's Agg canvas: no display needed)


def draw_figures(series: dict[str, Any]) -> dict[str, Any]:
    """Every figure of a report, by file name stem: accuracy, stages, margins, times, and one
    counterexample grid per file that has counterexamples to show."""
    figures = {"accuracy": draw_accuracy(series["accuracy"]), "stages": draw_stages(series["stages"]),
               "margins": draw_margins(series["margins"]), "times": draw_times(series["times"])}
    for panel in series["counterexamples"]:
        if panel["examples"]:
            figures[f"counterexamples_{_file_stem(panel['model'])}"] = draw_counterexamples(panel)
    return figures


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1, layout: str = "constrained",
               **kwargs: Any) -> tuple[Any, np.ndarray]:
    """A matplotlib figure on the Agg canvas and its ``rows`` × ``cols`` axes (always a 2-D array).

    Every figure certkit draws starts here: no pyplot, so drawing neither needs a display nor
    changes the backend or the figure list of a program (a notebook) that imports certkit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def _colours(count: int) -> list[str]:
    return [f"C{i % 10}" for i in range(count)]


def draw_accuracy(series: dict[str, Any]) -> Any:
    """Verified, PGD-robust and clean accuracy against ε: a colour per model, a line style per quantity."""
    fig, axes = new_figure(6.4, 4.0)
    ax = axes[0, 0]
    models = list(dict.fromkeys(line["model"] for line in series["lines"]))
    colour = dict(zip(models, _colours(len(models))))
    for line in series["lines"]:
        y = [math.nan if v is None else v for v in line["y"]]
        ax.plot(line["x"], y, linestyle=line["style"], marker="o", color=colour[line["model"]],
                label=f"{line['model']}: {line['quantity']}")
    ax.set(xlabel=series["x_label"], ylabel=series["y_label"], ylim=(-2, 102), title="accuracy against ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _category_colours(categories: Iterable[str]) -> dict[str, str]:
    """A fixed colour per stage or outcome, the same in every panel."""
    fixed = {"ibp": "C0", "crown-ibp": "C1", "crown": "C2", "alpha-crown": "C4", "attack": "C3", "reused": "C8",
             "unknown": "0.75", "misclassified": "0.35", "error": "k"}
    return {c: fixed.get(c, f"C{5 + i % 3}") for i, c in enumerate(categories)}


def _stacked_bars(ax: Any, eps: list[float], heights: dict[str, list[float]]) -> None:
    """Stacked bars at positions 0..len(eps)-1 labelled by ε, one segment per key of ``heights``."""
    colour = _category_colours(heights)
    bottom = np.zeros(len(eps))
    for name, values in heights.items():
        ax.bar(range(len(eps)), values, bottom=bottom, label=name, color=colour[name], width=0.6)
        bottom += np.asarray(values, dtype=np.float64)
    ax.set_xticks(range(len(eps)), [f"{e:.4g}" for e in eps])
    ax.set_xlabel("ε")


def draw_stages(series: dict[str, Any]) -> Any:
    """Per file, stacked bars per ε of the share of samples each stage decided."""
    panels = series["panels"]
    fig, axes = new_figure(max(4.0, 3.6 * len(panels)), 3.8, 1, len(panels), sharey=True)
    axes = axes[0]
    for ax, panel in zip(axes, panels):
        _stacked_bars(ax, panel["eps"], panel["bars"])
        ax.set(title=panel["model"], ylim=(0, 100))
        ax.title.set_fontsize(9)
    axes[0].set_ylabel(series["y_label"])
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def draw_margins(series: dict[str, Any]) -> Any:
    """Per file, step histograms (one per ε) of the best margin lower bound; 0 is marked."""
    from matplotlib.ticker import MaxNLocator

    panels = series["panels"]
    fig, axes = new_figure(max(4.0, 3.8 * len(panels)), 3.6, 1, len(panels))
    for ax, panel in zip(axes[0], panels):
        for colour, h in zip(_colours(len(panel["histograms"])), panel["histograms"]):
            without = f" ({h['excluded']} without a bound)" if h["excluded"] else ""
            if panel["edges"]:
                ax.stairs(h["counts"], panel["edges"], color=colour, label=f"ε = {h['eps']:.4g}{without}")
        ax.axvline(0.0, color="k", linewidth=0.8, linestyle=":")
        ax.set(title=panel["model"], xlabel=series["x_label"], ylabel=series["y_label"])
        ax.title.set_fontsize(9)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if panel["edges"]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finite bound", ha="center", transform=ax.transAxes)
    return fig


def draw_times(series: dict[str, Any]) -> Any:
    """Per file, stacked bars per ε of the seconds each stage spent."""
    panels = series["panels"]
    fig, axes = new_figure(max(4.0, 3.6 * len(panels)), 3.8, 1, len(panels))
    axes = axes[0]
    for ax, panel in zip(axes, panels):
        _stacked_bars(ax, panel["eps"], panel["seconds"])
        ax.set(title=panel["model"])
        ax.title.set_fontsize(9)
    axes[0].set_ylabel(series["y_label"])
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def draw_counterexamples(panel: dict[str, Any], per_row: int = 2) -> Any:
    """``per_row`` counterexamples per row, each as three images: the original, the counterexample,
    and their difference amplified to the full colour range (the factor in its title); the label,
    the counterexample's class and the model's scores in the titles."""
    examples = panel["examples"]
    per_row = min(per_row, len(examples))
    rows = -(-len(examples) // per_row)
    fig, grid = new_figure(4.2 * per_row + 0.3, 2.1 * rows + 0.5, rows, 3 * per_row)
    for ax in grid.flat[3 * len(examples):]:
        ax.set_axis_off()
    lo, hi = panel["pixel_range"]
    for k, e in enumerate(examples):
        axes = grid[k // per_row, 3 * (k % per_row):3 * (k % per_row) + 3]
        original, counter = np.asarray(e["original"]), np.asarray(e["counterexample"])
        factor, amplified = amplified_difference(counter - original, lo, hi)
        predicted = "?" if e["predicted"] is None else str(e["predicted"])
        _show(axes[0], original, lo, hi, f"#{e['index']} ε={e['eps']:.4g}\nlabel {e['label']}"
              + _score_text(e["scores_original"], e["label"]))
        _show(axes[1], counter, lo, hi, f"counterexample\nclass {predicted}"
              + _score_text(e["scores_counterexample"], e["predicted"], e["label"]))
        _show(axes[2], amplified, lo, hi, f"difference\n×{factor:.3g}", cmap="RdBu_r")
    fig.suptitle(panel["model"] + (f"\n{panel['note']}" if panel["note"] else ""), fontsize=9)
    return fig


def amplified_difference(difference: np.ndarray, lo: float, hi: float) -> tuple[float, np.ndarray]:
    """(factor, the pixels mid + factor × difference): the largest change reaches the end of the
    pixel range [lo, hi], no change is its middle."""
    largest = float(np.abs(difference).max()) if difference.size else 0.0
    factor = (hi - lo) / (2 * largest) if largest > 0 else 1.0
    return factor, (lo + hi) / 2 + factor * difference


def _score_text(scores: list[float | None] | None, cls: int | None, label: int | None = None) -> str:
    """'\\nscore 3.2' of class ``cls`` (and of the label, if given and different); '' without scores."""
    if scores is None or cls is None:
        return ""
    text = f"\nscore {_number(scores[cls])}"
    return text + (f", label's {_number(scores[label])}" if label is not None and label != cls else "")


def _number(v: float | None) -> str:
    return "?" if v is None else f"{v:.3g}"


def _show(ax: Any, image: np.ndarray, lo: float, hi: float, title: str, cmap: str = "gray") -> None:
    """An image in CHW or HW layout, pixels in [lo, hi]."""
    if _image_layout(image.shape) == "rgb":
        ax.imshow(np.clip((np.moveaxis(image, 0, -1) - lo) / (hi - lo), 0, 1))
    else:
        ax.imshow(image.reshape(image.shape[-2:]), cmap=cmap, vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


# ---------------------------------------------------------------------------------------------------------------------
# output


def figure_bytes(fig: Any, fmt: str) -> bytes:
    """The figure rendered as PNG or SVG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110)
    return buffer.getvalue()


def save_figures(figures: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Each figure as NAME.png and NAME.svg in ``out_dir`` (each file written atomically)."""
    out_dir = Path(out_dir)
    written = []
    for name, fig in figures.items():
        for fmt in FIGURE_FORMATS:
            path = out_dir / f"{name}.{fmt}"
            content = figure_bytes(fig, fmt)
            write_atomically(path, lambda tmp, content=content: Path(tmp).write_bytes(content))
            written.append(path)
    return written


def report_json(runs: list[Run], series: dict[str, Any] | None, notes: list[str]) -> Any:
    """What ``report --json`` prints: without ``series`` (one file, no figures) the file's summary, a
    list of one per ε for a sweep, as before figures existed; otherwise every file's summaries, the
    notes and the series behind every figure."""
    if series is None:
        (run,) = runs
        summaries = run.summaries()
        return summaries if any("sweep_eps" in attrs for attrs, _ in run.levels) else summaries[0]
    files = [{"path": str(r.path), "model": r.name, "eps": r.eps, "summaries": r.summaries()} for r in runs]
    return {"files": files, "notes": notes, "series": series}
