"""``certkit plot RUN_DIR [RUN_DIR ...]``: the curves of training runs, from their metrics.h5.

One run: PNG and SVG of the curves the paper shows (regularisers, ReLU ratios, ε, errors) in
RUN_DIR/plots. Several runs: one overlay figure, a line per *group* of runs. Runs group by
their configuration (RUN_DIR/config.json) without the seed, so the seeds of one setting make
one line: the mean per epoch, with a shaded band from the lowest to the highest seed. A
group is labelled by its method, with the settings that tell it from a group of the same
method (``fast model=mlp``); ``labels`` names runs instead, and runs given the same label
make one group (which must share dataset, ε and ε ramp).

The ε ramp is shaded: ε rises during epochs ``first_epoch`` … ``last_epoch`` (1-based), so
on the epoch axis (each value plotted at the end of its epoch) from ``first_epoch - 1`` to
``last_epoch``. Runs of different datasets or ε are drawn together, with a note in the
title naming each group's; their curves are not comparable as they stand.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from certkit.errors import InvalidInput
from certkit.train.metrics import MetricsFile

if TYPE_CHECKING:
    from certkit.train.loop import TrainConfig

# the overlay's panels: metric in metrics.h5 and its title
PANELS = {"test_clean_err": "clean error (%), test", "test_verified_err": "IBP verified error (%) at ε_eval, test",
          "loss": "training loss", "tightness": "L_tightness", "relu": "L_relu", "eps": "ε at the end of each epoch"}
# settings that do not change what a run learns (or only its length): seeds of one setting share the rest
NOT_GROUPED = ("seed", "device", "data_dir", "compile", "epochs")


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``fig`` as out_dir/name.png and .svg (:func:`certkit.figures.save_figures`)."""
    from certkit.figures import save_figures

    return save_figures({name: fig}, out_dir)


def _figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Any, np.ndarray]:
    """:func:`certkit.figures.new_figure` with a tight layout (room for a suptitle)."""
    from certkit.figures import new_figure

    return new_figure(width, height, rows, cols, layout="tight")


def _read_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    """RUN_DIR/metrics.h5, with at least one finished epoch."""
    if not run_dir.is_dir():
        raise InvalidInput(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.h5"
    if not path.is_file():
        raise InvalidInput(f"{path}: no metrics file (is {run_dir} a certkit training run?)")
    m = MetricsFile(path).read()
    if len(m.get("epoch", [])) == 0:
        raise InvalidInput(f"{path}: no finished epoch yet")
    return m


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one run's loss/regulariser, ReLU-ratio, ε and error curves (PNG and SVG) into
    ``out_dir`` (default RUN_DIR/plots/)."""
    run_dir = Path(run_dir)
    m = _read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    ep = m["epoch"]
    written = []

    fig, (ax,) = _figure(10, 3.6, 1, 2)
    ax[0].plot(ep, m["tightness"], marker="o")
    ax[0].set(title="L_tightness", xlabel="epoch")
    ax[1].plot(ep, m["relu"], marker="o", color="tab:orange")
    ax[1].set(title="L_relu", xlabel="epoch")
    written += _save(fig, out_dir, "regularizers")

    fig, (ax,) = _figure(10, 3.6, 1, 2)
    for name, a in (("active", ax[0]), ("unstable", ax[1])):
        data = np.atleast_2d(m[name])
        for layer in range(data.shape[1]):
            a.plot(ep, 100 * data[:, layer], label=f"ReLU {layer + 1}")
        a.set(title=f"{name} neurons (%)", xlabel="epoch")
        a.legend(fontsize=7)
    written += _save(fig, out_dir, "relu_ratios")

    fig, ((ax,),) = _figure(5, 3.6)
    ax.plot(ep, m["eps"], marker="o")
    ax.set(title="ε at the end of each epoch", xlabel="epoch")
    written += _save(fig, out_dir, "eps_schedule")

    fig, ((ax,),) = _figure(6, 3.6)
    ax.plot(ep, m["test_clean_err"], label="clean error")
    ax.plot(ep, m["test_verified_err"], label="IBP verified error")
    ax.plot(ep, m["train_ibp_err"], label="train IBP error (current ε)", linestyle="--")
    ax.set(title="errors (%)", xlabel="epoch")
    ax.legend(fontsize=8)
    written += _save(fig, out_dir, "errors")
    return written


@dataclass
class _Run:
    path: Path
    config: TrainConfig
    metrics: dict[str, np.ndarray]

    @property
    def setting(self) -> tuple:
        """What seeds of one setting share: the configuration without :data:`NOT_GROUPED`."""
        return tuple((k, v) for k, v in asdict(self.config).items() if k not in NOT_GROUPED)


def _read_run(run_dir: str | Path) -> _Run:
    """A run directory's config.json and metrics."""
    from certkit.train.loop import TrainConfig  # imports torch: not for one run's figures

    path = Path(run_dir)
    metrics = _read_metrics(path)
    cfg_path = path / "config.json"
    try:
        config = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    except FileNotFoundError:
        raise InvalidInput(f"{cfg_path}: missing (is {path} a certkit training run?)") from None
    except (ValueError, TypeError, KeyError) as e:
        raise InvalidInput(f"{cfg_path}: not a certkit training configuration ({e})") from None
    return _Run(path, config, metrics)


def parse_labels(texts: Sequence[str]) -> dict[str, str]:
    """``--label DIR=NAME`` options as {DIR: NAME}."""
    labels = {}
    for text in texts:
        run_dir, sep, name = text.rpartition("=")
        if not sep or not run_dir or not name:
            raise InvalidInput(f"bad --label {text!r}: expected RUN_DIR=NAME")
        labels[run_dir] = name
    return labels


def _explicit_labels(runs: list[_Run], labels: dict[str, str]) -> dict[Path, str]:
    """``labels`` keyed by the resolved run directory; a label for a directory not plotted is an error."""
    known = {r.path.resolve() for r in runs}
    out = {}
    for run_dir, name in labels.items():
        key = Path(run_dir).resolve()
        if key not in known:
            raise InvalidInput(f"--label {run_dir}={name}: {run_dir} is not one of the runs plotted")
        out[key] = name
    return out


def _default_labels(settings: list[tuple]) -> dict[tuple, str]:
    """A label per distinct setting: its method, and where two settings share the method the
    settings in which they differ (``fast model=mlp``)."""
    out = {}
    for s in settings:
        d = dict(s)
        rivals = [dict(o) for o in settings if o != s and dict(o)["method"] == d["method"]]
        differ = [k for k in d if any(o[k] != d[k] for o in rivals)]
        out[s] = " ".join([d["method"], *(f"{k}={_text(d[k])}" for k in differ)])
    return out


def _text(value: Any) -> str:
    """A setting as the label shows it: 0.1, (2, 3) as 2,3, None as default."""
    if value is None:
        return "default"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _groups(runs: list[_Run], labels: dict[str, str] | None) -> dict[str, list[_Run]]:
    """The runs by label, in the order first given: explicit labels, else their setting's."""
    explicit = _explicit_labels(runs, labels or {})
    named = _default_labels(list(dict.fromkeys(r.setting for r in runs)))
    groups: dict[str, list[_Run]] = {}
    for r in runs:
        groups.setdefault(explicit.get(r.path.resolve(), named[r.setting]), []).append(r)
    return groups


def _shared(label: str, runs: list[_Run], what: str, value: Callable[[TrainConfig], Any]) -> Any:
    """``value`` of the runs' configurations, which one line's runs must share (a mean over
    different ε ramps or datasets means nothing)."""
    values = set(map(value, (r.config for r in runs)))
    if len(values) > 1:
        raise InvalidInput(f"the runs labelled {label!r} differ in {what} ({', '.join(map(str, sorted(values)))}): "
                           "label them apart (--label RUN_DIR=NAME)")
    return values.pop()


def _plain(values: np.ndarray) -> list[float | None]:
    """Floats for JSON, NaN as None."""
    return [None if math.isnan(v) else float(v) for v in values]


def _band(runs: list[_Run], key: str) -> dict[str, list[float | None]]:
    """Mean, min and max of metric ``key`` per epoch over ``runs`` (runs shorter than the
    longest count only for their epochs)."""
    length = max(len(r.metrics["epoch"]) for r in runs)
    stack = np.full((len(runs), length), np.nan)
    for i, r in enumerate(runs):
        stack[i, :len(r.metrics[key])] = r.metrics[key]
    with warnings.catch_warnings():  # an epoch where the metric is NaN in every run stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"mean": _plain(np.nanmean(stack, 0)), "min": _plain(np.nanmin(stack, 0)),
                "max": _plain(np.nanmax(stack, 0))}


def _group_series(label: str, runs: list[_Run]) -> dict[str, Any]:
    """One line of the overlay: its runs and seeds, dataset and ε, ε ramp and per-epoch bands."""
    longest = max(runs, key=lambda r: len(r.metrics["epoch"]))
    dataset, eps, eps_eval = _shared(label, runs, "dataset or ε", lambda c: (c.dataset, c.eps, c.eps_test))
    first, last = _shared(label, runs, "ε ramp (first, last epoch)",
                          lambda c: (c.schedule_start, c.schedule_start + c.schedule_length - 1))
    return {"label": label, "runs": [str(r.path) for r in runs], "seeds": [r.config.seed for r in runs],
            "dataset": dataset, "eps": eps, "eps_eval": eps_eval, "ramp": {"first_epoch": first, "last_epoch": last},
            "epoch": [int(e) for e in longest.metrics["epoch"]], "series": {key: _band(runs, key) for key in PANELS}}


def _title(groups: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The overlay's title (dataset and ε when all groups share them) and a note when they do not."""
    kinds = {(g["dataset"], g["eps"], g["eps_eval"]) for g in groups}
    if len(kinds) == 1:
        dataset, eps, eps_eval = kinds.pop()
        return f"{dataset}, training ε {eps:g}, verified at ε {eps_eval:g}", None
    note = "runs of different datasets or ε, not comparable as they stand: " + "; ".join(
        f"{g['label']}: {g['dataset']} ε {g['eps']:g} (eval {g['eps_eval']:g})" for g in groups)
    return "training runs", note


def training_series(run_dirs: Sequence[str | Path], labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The overlay's data (JSON-able): per group of runs (seeds of one setting, or runs given
    one label in ``labels``, {RUN_DIR: NAME}) the mean, min and max per epoch of each metric
    in :data:`PANELS`, and its ε ramp; a title, and a note when datasets or ε differ."""
    if not run_dirs:
        raise InvalidInput("give at least one run directory")
    runs = [_read_run(d) for d in run_dirs]
    groups = [_group_series(label, members) for label, members in _groups(runs, labels).items()]
    title, note = _title(groups)
    return {"title": title, "note": note, "panels": PANELS, "groups": groups}


def _draw_ramps(ax, groups: list[dict[str, Any]]) -> None:
    """Shade each distinct ε ramp: from the end of the epoch before it to the end of its last."""
    ramps = dict.fromkeys((g["ramp"]["first_epoch"] - 1, g["ramp"]["last_epoch"]) for g in groups)
    for i, (start, end) in enumerate(ramps):
        ax.axvspan(start, end, color="grey", alpha=0.12, label="ε ramp" if i == 0 else None)


def _none_as_nan(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values])


def write_training_plots(series: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw :func:`training_series` as one figure of six panels (errors, loss, regularisers, ε)
    into ``out_dir``/overlay.png and overlay.svg; returns the paths."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(14, 7.5, 2, 3)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, series["panels"].items()):
        _draw_ramps(ax, series["groups"])
        for i, g in enumerate(series["groups"]):
            band, color = g["series"][key], colors[i % len(colors)]
            ax.plot(g["epoch"], _none_as_nan(band["mean"]), marker="o", markersize=3, color=color,
                    label=f"{g['label']} ({len(g['runs'])} run{'s' if len(g['runs']) > 1 else ''})")
            ax.fill_between(g["epoch"], _none_as_nan(band["min"]), _none_as_nan(band["max"]), color=color,
                            alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(series["title"] + (f"\nnote: {series['note']}" if series["note"] else "")
                 + "\nlines: mean over a group's runs (seeds); bands: their min to max", fontsize=10)
    return _save(fig, Path(out_dir), "overlay")


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
              labels: dict[str, str] | None = None) -> list[Path]:
    """``certkit plot``: one run's figures (:func:`plot_run`), or the overlay of several
    (:func:`write_training_plots`, which needs ``out_dir``)."""
    if len(run_dirs) == 1:
        return plot_run(run_dirs[0], out_dir)
    if out_dir is None:
        raise InvalidInput("several runs: give --out DIR for the overlay figure")
    return write_training_plots(training_series(run_dirs, labels), out_dir)
