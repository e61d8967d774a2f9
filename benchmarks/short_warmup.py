"""Vanilla IBP vs the fast method (or CROWN-IBP with vs without loss fusion) on the same short
budget, seed by seed, on real MNIST.

    python benchmarks/short_warmup.py [--protocol cnn-small|cnn7-cpu] [--compare methods|fusion]
                                      [--model M] [--width W] [--depth D] [--hidden H] [--epochs N]
                                      [--schedule START,LENGTH] [--milestones A,B] [--eps E]
                                      [--eps-eval E] [--ibp-init] [--seeds 0,1,2] [--limit N]
                                      [--eval-limit N] [--out DIR] [--plots DIR]

Protocols (every option overrides its value):

- ``cnn-small`` (default): cnn-small, ε 0.4 for training and 0.3 for the test, 30 epochs,
  ramp 1,10, lr ×0.2 at 20 and 25 (about 15 minutes a run on a 2-core CPU);
- ``cnn7-cpu``: the GPU CNN-7 protocol of docs/benchmarks.md scaled to a CPU: CNN-7 at
  ``--width 8`` (channels 8, 8, 16, 16, 16, a 128-unit linear layer, 410k parameters),
  ε 0.4 for training and test, 15 epochs, ramp 1,8 (ε reaches 0.4 at the end of epoch 8),
  lr ×0.2 at 11 and 13.

Comparisons (``--compare``): ``methods`` (default) trains vanilla IBP against the fast method;
``fusion`` trains CROWN-IBP without loss fusion (``unfused``, K−1 bound rows a sample) against
CROWN-IBP with it (``fused``, one row), the check that the cheaper path trains as well;
``--ibp-init`` starts every arm from the fast method's IBP initialisation.

Both arms train with the same budget (epochs, ε ramp, lr schedule, seeds, data). Prints,
per seed and as mean ± std over the seeds: clean and IBP-verified test error (%) after the
last epoch and at the epoch the validation split picks; the paired per-seed difference
second arm − first (fast − vanilla, fused − unfused), its mean ± std and the 95% interval of
its mean (Student's t over the seeds; the seeds share data order and initial draw, so the
difference is the comparison with the smaller spread) with what it shows;
L_tightness and L_relu in the ramp's last epoch (metrics.h5; logged for every method, in the
loss of the fast one only); minutes of training and wall time (training and evaluation) per
run; and per ReLU layer the mean IBP interval width of its input relative to the input box's,
before training and after the ramp (metrics.h5's notes): the widths the fast method's
initialisation and L_tightness keep small. Runs (OUT/ARM-sSEED) are resumable: rerunning the
command continues unfinished runs and reuses finished ones (a run directory of another
configuration is refused), so seeds can run at once as separate commands (``--seeds 1``)
before one that prints all. ``--plots DIR`` also draws those widths (DIR/relu_widths.png and
.svg): per arm, before training and after the ramp, mean over the seeds with their range.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from certkit.train.loop import TrainConfig, config_from, train
from certkit.train.metrics import MetricsFile
from certkit.train.models import model_label
from certkit.train.widths import widths_of

# per comparison, its two arms: name, training settings; the paired difference is second − first
COMPARISONS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "methods": (("vanilla", dict(method="vanilla")), ("fast", dict(method="fast"))),
    "fusion": (("unfused", dict(method="crown-ibp", loss_fusion=False)),
               ("fused", dict(method="crown-ibp", loss_fusion=True))),
}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "cnn-small": dict(model="cnn-small", eps=0.4, eps_eval=0.3, epochs=30, schedule_start=1, schedule_length=10,
                      milestones=(20, 25)),
    "cnn7-cpu": dict(model="cnn7", width=8, eps=0.4, eps_eval=0.4, epochs=15, schedule_start=1, schedule_length=8,
                     milestones=(11, 13)),
}
# the table's error columns: summary key, heading
ERRORS = (("clean", "clean (last)"), ("verified", "verified (last)"), ("picked_clean", "clean (picked)"),
          ("picked_verified", "verified (picked)"))


def run_config(protocol: str, seed: int, method: str, **overrides: Any) -> TrainConfig:
    """The configuration of one run: the protocol's values, ``overrides`` (None: not given; an
    arm's ``loss_fusion`` goes here too); another model than the protocol's drops the protocol's
    sizes (``--width`` 8 is CNN-7's)."""
    base = dict(PROTOCOLS[protocol])
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("model", base["model"]) != base["model"]:
        base = {k: v for k, v in base.items() if k not in ("width", "depth", "hidden")}
    return config_from("mnist", method=method, seed=seed, **{**base, **given})


def train_run(cfg: TrainConfig, run: Path) -> None:
    """Train (or continue, or reuse) the run in ``run``, refusing one of another configuration."""
    saved = run / "config.json"
    if saved.exists():
        theirs = TrainConfig.from_dict(json.loads(saved.read_text()))
        ignore = dict(data_dir=cfg.data_dir, device=cfg.device, compile=cfg.compile, epochs=cfg.epochs)
        if dataclasses.replace(theirs, **ignore) != cfg:
            raise SystemExit(f"{run} holds a run of another configuration: pass another --out")
    train(cfg, run, resume=(run / "last.pt").exists(),
          log=lambda line: print(f"[{run.name}] {line}", flush=True))


def summarize_run(run: str | Path) -> dict[str, Any]:
    """One run's numbers for the table: :meth:`MetricsFile.summary`, the wall time, L_tightness
    and L_relu in the ramp's last epoch (NaN before it) and the ReLU layers' relative interval
    widths (``widths_init``, ``widths_ramp``; None where not recorded)."""
    run = Path(run)
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    metrics = MetricsFile(run / "metrics.h5")
    m = metrics.read()
    ramp_end = cfg.schedule_start + cfg.schedule_length - 1
    at_ramp_end = np.flatnonzero(m["epoch"] == ramp_end)
    out: dict[str, Any] = dict(metrics.summary())
    wall = metrics.notes().get("wall_time", {})  # runs from before wall times were noted: NaN
    out["wall_min"] = sum(wall.values()) / 60 if len(wall) == len(m["epoch"]) else math.nan
    for key in ("tightness", "relu"):
        out[key] = float(m[key][at_ramp_end[0]]) if len(at_ramp_end) else math.nan
    widths = widths_of(run)
    out["widths_init"] = widths[0].relative if 0 in widths else None
    out["widths_ramp"] = widths[ramp_end].relative if ramp_end in widths else None
    out["ramp_end"] = ramp_end
    return out


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± std' (sample std, over the seeds), or the value alone for one seed."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f}" + ("" if len(v) == 1 else f" ± {v.std(ddof=1):.{digits}f}")


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the value at 30,
# slightly wider than the true one)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(diffs: Sequence[float]) -> tuple[float, float]:
    """The 95% confidence interval of the mean of per-seed paired differences (Student's t over
    the seeds; NaN for fewer than two seeds)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    half = T95[min(len(d) - 1, len(T95)) - 1] * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def verdict(diffs: Sequence[float], first: str, second: str) -> str:
    """What the seeds say about a paired difference second − first (lower is better)."""
    lo, up = paired_interval(diffs)
    if math.isnan(lo):
        return "one seed: no interval"
    if up < 0:
        return f"{second} better (the interval excludes 0)"
    if lo > 0:
        return f"{first} better (the interval excludes 0)"
    return "no difference shown (the interval includes 0)"


def _row(label: str, cells: Sequence[str], widths: Sequence[int]) -> str:
    return f"{label:14s}" + "".join(f" {c:>{w}s}" for c, w in zip(cells, widths))


def error_table(results: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int],
                arms: Sequence[str]) -> list[str]:
    """Per arm: a row per seed and the mean ± std of errors (%), the ramp's L terms and times;
    then the paired differences second arm − first per seed and their mean ± std."""
    columns = [(k, h, 2) for k, h in ERRORS] + [("tightness", "L_tight", 3), ("relu", "L_relu", 3),
                                                  ("train_min", "train min", 1), ("wall_min", "wall min", 1)]
    widths = [max(len(h), 15) for _, h, _ in columns]
    first, second = arms
    lines = [_row("arm     seed", [h for _, h, _ in columns], widths)]
    for arm in arms:
        rows = [results[arm, s] for s in seeds]
        for seed, r in zip(seeds, rows):
            lines.append(_row(f"{arm:8s} {seed:5d}", [f"{r[k]:.{d}f}" for k, _, d in columns], widths))
        lines.append(_row(f"{arm:8s}  mean", [mean_std([r[k] for r in rows], d) for k, _, d in columns], widths))
    lines += ["", f"paired difference {second} − {first} (points; negative: {second} is better)"]
    lines.append(_row("seed", [h for _, h in ERRORS], widths))
    diffs = {k: [results[second, s][k] - results[first, s][k] for s in seeds] for k, _ in ERRORS}
    for i, seed in enumerate(seeds):
        lines.append(_row(f"{seed}", [f"{diffs[k][i]:+.2f}" for k, _ in ERRORS], widths))
    lines.append(_row("mean", [mean_std(diffs[k]) for k, _ in ERRORS], widths))
    intervals = [paired_interval(diffs[k]) for k, _ in ERRORS]
    lines.append(_row("95% interval", [f"[{lo:+.2f}, {up:+.2f}]" for lo, up in intervals], widths))
    lines.append(f"verified error (last epoch), {len(seeds)} seeds: {verdict(diffs['verified'], first, second)}")
    return lines


def seed_widths(results: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int],
                arms: Sequence[str]) -> list[tuple[str, str, np.ndarray]]:
    """Per arm, before training ("init") and after the ramp ("epoch N"): the ReLU layers' relative
    IBP interval widths of the seeds that recorded them, (seeds, layers); moments no seed
    recorded are left out."""
    out = []
    for arm in arms:
        for key, when in (("widths_init", "init"), ("widths_ramp", f"epoch {results[arm, seeds[0]]['ramp_end']}")):
            got = [results[arm, s][key] for s in seeds if results[arm, s][key] is not None]
            if got:
                out.append((arm, when, np.array(got)))
    return out


def width_table(results: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int],
                arms: Sequence[str]) -> list[str]:
    """Per arm, before training and after the ramp: every ReLU layer's mean IBP interval
    width relative to the input box's (mean over the seeds that recorded it)."""
    widths = seed_widths(results, seeds, arms)
    if not widths:
        return []
    layers = widths[0][2].shape[1]
    return [f"{'arm':8s} {'when':9s} " + " ".join(f"{'ReLU ' + str(i + 1):>9s}" for i in range(layers)),
            *(f"{arm:8s} {when:9s} " + " ".join(f"{w:9.3g}" for w in got.mean(0)) for arm, when, got in widths)]


def draw_widths(results: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int], arms: Sequence[str],
                eps: float) -> Any:
    """The widths of :func:`width_table` as a figure: relative interval width per ReLU layer (log
    scale), a colour per arm, dashed with open markers before training and solid after the ramp,
    the seeds' range shaded; None where no run recorded widths."""
    from certkit.figures import new_figure

    widths = seed_widths(results, seeds, arms)
    if not widths:
        return None
    fig, ((ax,),) = new_figure(6.0, 3.8)
    colours = dict(zip(arms, ("C0", "C3", "C2", "C1")))
    for arm, when, got in widths:
        colour, before = colours[arm], when == "init"
        layers = np.arange(1, got.shape[1] + 1)
        ax.plot(layers, got.mean(0), "--" if before else "-", marker="o", mfc="none" if before else colour,
                color=colour, label=f"{arm}, {when}")
        if len(got) > 1:
            ax.fill_between(layers, got.min(0), got.max(0), color=colour, alpha=0.15)
    ax.set(yscale="log", xlabel="ReLU layer", ylabel="input interval width / input box width",
           title=f"IBP interval widths at ε = {eps:g} (mean over {len(seeds)} seeds, range shaded)")
    ax.title.set_fontsize(9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def report(results: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int], cfg: TrainConfig,
           arms: Sequence[str] = ("vanilla", "fast")) -> str:
    """The whole printout for runs of configuration ``cfg`` (any seed's) of the two ``arms``."""
    title = (f"MNIST, {model_label(cfg.model, **cfg.arch)}, eps {cfg.eps_test:g} (train {cfg.eps:g}), "
             f"{cfg.epochs} epochs, ramp start {cfg.schedule_start} length {cfg.schedule_length}, "
             f"lr x{cfg.lr_decay:g} at {', '.join(map(str, cfg.milestones))}; errors in % on the test images; "
             f"L_tight and L_relu in the ramp's last epoch (epoch {cfg.schedule_start + cfg.schedule_length - 1})")
    lines = [title, *error_table(results, seeds, arms)]
    widths = width_table(results, seeds, arms)
    if widths:
        lines += ["", f"ReLU input interval width / input box width (IBP at eps {cfg.eps:g}, mean over seeds)",
                  *widths]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default="cnn-small")
    ap.add_argument("--compare", choices=list(COMPARISONS), default="methods")
    ap.add_argument("--model")
    for name in ("width", "depth", "hidden", "epochs", "limit", "eval_limit"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int)
    ap.add_argument("--ibp-init", action="store_true",
                    help="every arm starts from the fast method's IBP initialisation (the fusion comparison from it)")
    ap.add_argument("--eps", type=float)
    ap.add_argument("--eps-eval", type=float)
    ap.add_argument("--schedule", help="START,LENGTH")
    ap.add_argument("--milestones", help="A,B")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-dir")
    ap.add_argument("--plots", help="draw the ReLU widths figure into this folder")
    ap.add_argument("--out", help="default: runs/short_warmup (cnn-small), runs/short_warmup-PROTOCOL; "
                                  "--compare fusion: runs/short_warmup-fusion-PROTOCOL")
    args = ap.parse_args()
    start, length = (int(v) for v in args.schedule.split(",")) if args.schedule else (None, None)
    overrides = dict(model=args.model, width=args.width, depth=args.depth, hidden=args.hidden, epochs=args.epochs,
                     eps=args.eps, eps_eval=args.eps_eval, schedule_start=start, schedule_length=length,
                     milestones=tuple(int(v) for v in args.milestones.split(",")) if args.milestones else None,
                     limit=args.limit, eval_limit=args.eval_limit, data_dir=args.data_dir,
                     ibp_init=True if args.ibp_init else None)
    seeds = [int(v) for v in args.seeds.split(",")]
    if args.compare == "fusion":
        default_out = f"runs/short_warmup-fusion-{args.protocol}"
    else:
        default_out = "runs/short_warmup" if args.protocol == "cnn-small" else f"runs/short_warmup-{args.protocol}"
    out = Path(args.out or default_out)
    arms = COMPARISONS[args.compare]
    results = {}
    for seed in seeds:
        for arm, settings in arms:
            cfg = run_config(args.protocol, seed, **settings, **overrides)
            train_run(cfg, out / f"{arm}-s{seed}")
            results[arm, seed] = summarize_run(out / f"{arm}-s{seed}")
    names = [name for name, _ in arms]
    print("\n" + report(results, seeds, cfg, names))
    if args.plots:
        from certkit.figures import save_figures

        fig = draw_widths(results, seeds, names, cfg.eps)
        print("no widths recorded: no figure" if fig is None else
              f"wrote {', '.join(map(str, save_figures({'relu_widths': fig}, args.plots)))}")


if __name__ == "__main__":
    main()
