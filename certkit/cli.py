"""The ``certkit`` command line: parse options, call the library, print. No bound math here."""

from __future__ import annotations

import functools
import os
import sys
import time
from inspect import cleandoc
from pathlib import Path

import click
import numpy as np

from certkit import __version__
from certkit.errors import CertkitError
from certkit.files import write_atomically


def _fail(message: str) -> None:
    from certkit.report import err_console

    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _os_error(e: OSError) -> str:
    """An OSError as one short line: the path (cut to 80 characters) and the system's reason."""
    name = "" if e.filename is None else str(e.filename)
    name = name if len(name) <= 80 else name[:77] + "..."
    return f"{name}: {e.strerror}" if name and e.strerror else str(e)[:300]


def friendly_errors(fn):
    """Turn certkit's input errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CertkitError as e:
            _fail(str(e).replace("[", r"\["))
        except OSError as e:  # the file system's verdict on a path the user gave: too long, no permission, disk full
            _fail(_os_error(e).replace("[", r"\["))
        except KeyboardInterrupt:
            _fail("interrupted")

    return wrapper


class SettingsCommand(click.Command):
    """A command configured by a section of the configuration (:mod:`certkit.settings`): its
    docstring may quote the section's defaults as ``{name}`` placeholders (with a format spec,
    ``{milp_max_neurons:,}``), and its help ends with every setting and its default. Both are
    filled in only when the help is shown, so that the command line starts without importing
    the solver."""

    def __init__(self, *args, section: str, **kwargs):
        self.section = section
        super().__init__(*args, **kwargs)

    def _defaults(self) -> dict:
        from certkit.settings import Resolved

        return Resolved.defaults(self.section).values

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        template = self.help
        if template is not None:
            self.help = cleandoc(template).format(**self._defaults())
        try:
            super().format_help_text(ctx, formatter)
        finally:
            self.help = template

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from certkit.settings import setting_text

        listing = ", ".join(f"{k}={setting_text(v)}" for k, v in self._defaults().items())
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(f"Settings (defaults; set them in the {self.section}: section of --config FILE or "
                                 f"with --set KEY=VALUE; `certkit config show` explains each): {listing}.")


def config_options(section: str):
    """--config FILE and --set KEY=VALUE (repeatable) for a command configured by ``section``."""

    def decorate(fn):
        fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help=f"One {section} setting, e.g. --set seed=1 (repeatable; wins over --config; "
                               "the settings are listed below).")(fn)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help=f"YAML configuration file: its {section}: section sets the {section} settings "
                                 "(docs/cli.md; `certkit config show` prints one to start from).")(fn)

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="certkit")
def main() -> None:
    """certkit: certified robust training and sound verification of neural networks.

    \b
    Examples:
      certkit inspect model.onnx
      certkit bounds model.onnx --center x.npy --eps 8/255 --method crown --label 3
    """
    from certkit.memory import reuse_freed_memory

    reuse_freed_memory()


@main.command()
@click.option("--markdown", is_flag=True, help="Print the list as the README's markdown table.")
def operators(markdown: bool) -> None:
    """List the ONNX operators certkit bounds, by operator family (the registry's table).

    Every operator has an IBP and a CROWN rule; element-wise nonlinearities with a choice
    of relaxation lines also have α-CROWN's. Constant and shape subgraphs (Shape, Gather of
    shapes, ConstantOfShape, Range, ...) are folded to constants before the check, so they
    need no rule.
    """
    from certkit.bounds.ops.registry import families

    rows = families()
    if markdown:
        click.echo("| family | what | ONNX operators |\n|---|---|---|")
        for family, summary, onnx_ops in rows:
            click.echo(f"| {family} | {summary} | {', '.join(onnx_ops)} |")
        return
    from rich.table import Table

    from certkit.report import console

    t = Table(title=f"{sum(len(o) for _, _, o in rows)} ONNX operators", title_justify="left")
    for col in ("family", "what", "ONNX operators"):
        t.add_column(col)
    for family, summary, onnx_ops in rows:
        t.add_row(family, summary, ", ".join(onnx_ops))
    console.print(t)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@friendly_errors
def inspect(model: str) -> None:
    """Print MODEL's graph: nodes, op types, shapes, parameter count, unsupported operators.

    Exits with code 2 when the model has operators certkit cannot bound.
    """
    from certkit.bounds import BoundedModel
    from certkit.onnx_io import summarize_onnx
    from certkit.report import console, graph_table, onnx_table

    summary = summarize_onnx(model)
    console.print(f"[bold]{summary.path.name}[/]  opset {summary.opset}  input [cyan]{summary.input_name}[/] "
                  f"per-sample shape {summary.input_shape}  {summary.num_params:,} parameters", highlight=False)
    _warn_nonfinite(model)
    if summary.folded_from is not None:
        console.print(f"constant and shape subgraphs folded: {summary.folded_from} → {len(summary.nodes)} ONNX nodes",
                      highlight=False)
    if summary.unsupported:
        console.print(onnx_table(summary))
        ops = sorted({op for _, op in summary.unsupported})
        names = ", ".join(f"{name} ({op})" for name, op in summary.unsupported[:5])
        more = f" and {len(summary.unsupported) - 5} more" if len(summary.unsupported) > 5 else ""
        _fail(f"unsupported operator(s) {', '.join(ops)}: {names}{more}")
    bm = BoundedModel(model)
    console.print(graph_table(bm.graph, f"certkit graph ({len(bm.graph.nodes)} nodes)"))
    console.print(f"output shape {bm.graph.output_shape}; all operators supported", style="green")


@main.command("cache")
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--clear", is_flag=True, help="Delete every stored graph first.")
@friendly_errors
def cache_cmd(models: tuple[str, ...], clear: bool) -> None:
    """Convert ONNX MODELS once and keep their bound graphs for later runs.

    run-instance and vnncomp read a network's graph from this cache when the same file (byte
    for byte, with the same certkit) was converted before: no conversion and no onnx or
    onnx2torch import (seconds per instance). VNN-COMP's prepare_instance.sh runs this. The
    cache is $CERTKIT_CACHE (`off` disables it), else ~/.cache/certkit/graphs; deleting it is
    always safe. Exits with code 2 when a model cannot be bounded (unsupported operator,
    malformed file).

    \b
    certkit cache net.onnx       # convert and store (or find it stored)
    certkit cache --clear        # empty the cache
    """
    import torch

    from certkit import graph_cache
    from certkit.report import console

    directory = graph_cache.cache_dir()
    if clear:
        console.print(f"removed {graph_cache.clear(directory)} stored graph(s) from {directory}", highlight=False)
    if models and directory is None:
        _fail(f"the graph cache is off (${graph_cache.CACHE_ENV} is {os.environ[graph_cache.CACHE_ENV]!r})")
    for model in models:
        loaded = graph_cache.load_bounded(model, torch.float64, directory)
        if loaded.cached:
            state = "already stored"
        elif loaded.stored:
            state = "converted and stored"
        else:
            state = "converted, not storable (its graph holds what the format cannot; each run converts it)"
        console.print(f"{model}: {state} ({len(loaded.model.graph.nodes)} nodes)", highlight=False)
    if models:
        console.print(f"cache: {directory}", highlight=False)


def _warn_nonfinite(model: str) -> None:
    """One yellow line on stderr when MODEL's weights hold NaN/Inf (verify and run-instance then answer unknown)."""
    from rich.markup import escape

    from certkit.onnx_io import nonfinite_initializers, read_proto
    from certkit.report import err_console

    bad = nonfinite_initializers(read_proto(model))
    if bad:
        total = sum(count for _, count in bad)
        names = ", ".join(f"{escape(name)} ({count})" for name, count in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        err_console.print(f"[bold yellow]warning:[/] [yellow]{total} NaN/Inf weight value(s) in {len(bad)} "
                          f"initializer(s): {names}{more}; verify and run-instance answer unknown for this model[/]",
                          highlight=False, soft_wrap=True, markup=True)


MAX_MEMORY_HELP = ("Memory for the largest linear-coefficient tensor of a bound pass, e.g. 2G or 512M; passes are "
                   "split into chunks that fit (same bounds), and a stage whose smallest chunk does not fit is "
                   "skipped (default: half the memory free now, or the GPU's free memory).")
ADDRESS_OPTION = click.option(
    "--address", metavar="ADDRESS", help="Join the running Ray cluster at this address (auto, or "
    "ray://HOST:10001) instead of starting a local one; use with --workers.")


def _max_memory(text: str | None) -> int | None:
    from certkit.memory import parse_size

    return None if text is None else parse_size(text)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--lower", type=click.Path(dir_okay=False), help="Lower corner of the input box (.npy).")
@click.option("--upper", type=click.Path(dir_okay=False), help="Upper corner of the input box (.npy).")
@click.option("--center", type=click.Path(dir_okay=False), help="Box centre (.npy); use with --eps.")
@click.option("--eps", help="ℓ∞ radius around --center: 0.03, 2e-3 or 8/255.")
@click.option("--clip", help="Clip the --center/--eps box to MIN,MAX (e.g. 0,1 for pixels).")
@click.option("--method", type=click.Choice(["ibp", "crown-ibp", "crown"]), default="crown", show_default=True,
              help="ibp: interval propagation; crown-ibp: IBP intermediates, CROWN output; crown: full CROWN.")
@click.option("--label", type=int, help="Bound the margins f_label − f_j instead of the raw outputs.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write lb, ub to this .npz file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-memory", help=MAX_MEMORY_HELP)
@friendly_errors
def bounds(model, lower, upper, center, eps, clip, method, label, out, device, max_memory) -> None:
    """Bound MODEL's outputs over an input box.

    The box is either --lower/--upper or --center with --eps. Arrays may be one sample,
    a batch, or flat vectors (VNN-LIB order). With --label the rows are margins, and a
    positive lower bound proves the label is kept everywhere in the box.
    """
    import torch

    from certkit.bounds import BoundedModel, margin_matrix
    from certkit.boxes import as_batch, eps_box, load_array, parse_eps
    from certkit.errors import InvalidInput
    from certkit.report import bounds_table, console

    if (lower is None) != (upper is None) or (center is None) != (eps is None) or (lower is None) == (center is None):
        raise InvalidInput("give either --lower and --upper, or --center and --eps")
    budget = _max_memory(max_memory)
    bm = BoundedModel(model)
    bm.max_memory = budget
    shape = bm.graph.input_shape
    if lower is not None:
        lo = as_batch(load_array(lower), shape, "--lower")
        up = as_batch(load_array(upper), shape, "--upper")
    else:
        rng = None
        if clip is not None:
            try:
                a, b = (float(v) for v in clip.split(","))
            except ValueError:
                raise InvalidInput(f"bad --clip {clip!r}: expected MIN,MAX") from None
            rng = (a, b)
        lo, up = eps_box(as_batch(load_array(center), shape, "--center"), parse_eps(eps), rng)
    from certkit.device import resolve_device

    dev = resolve_device(device)
    lo, up = lo.to(dev), up.to(dev)
    K = int(np.prod(bm.graph.output_shape))
    C, rows = None, [f"y{j}" for j in range(K)]
    if label is not None:
        if not 0 <= label < K:
            raise InvalidInput(f"--label {label} is not an output index (the model has {K} outputs)")
        C = margin_matrix(torch.full((lo.shape[0],), label), K).to(dev)
        rows = [f"y{label} − y{j}" for j in range(K) if j != label]
    with torch.no_grad():
        lb, ub = bm.compute_bounds(lo, up, method=method, C=C)
    lb, ub = lb.cpu(), ub.cpu()
    console.print(bounds_table(lb, ub, rows))
    if label is not None:
        verified = (lb > 0).all(1) & torch.isfinite(lb).all(1)
        console.print(f"margins proved positive for {int(verified.sum())} of {len(verified)} samples ({method})")
    if out:
        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, lb=lb.numpy(), ub=ub.numpy(), method=method, rows=np.array(rows))

        write_atomically(Path(out), save)
        console.print(f"wrote {out}")


def _pair(text: str | None, name: str, kind=int) -> tuple | None:
    from certkit.errors import InvalidInput

    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise InvalidInput(f"bad {name} {text!r}: expected comma-separated numbers") from None


def _names(text: str) -> tuple[str, ...]:
    """'a,b' → ('a', 'b'); 'none' → ()."""
    return () if text.strip().lower() == "none" else tuple(t.strip() for t in text.split(",") if t.strip())


@main.command()
@click.option("--preset", type=click.Choice(["mnist", "cifar10", "cifar10-short", "tinyimagenet"]),
              help="Every hyper-parameter of a paper recipe (ALGORITHMS.md §8); options below override it.")
@click.option("--method", type=click.Choice(["fast", "vanilla", "crown-ibp"]), default="fast", show_default=True,
              help="fast: IBP init + BN + warmup regularisers; vanilla: plain IBP; crown-ibp: CROWN-IBP mixing.")
@click.option("--loss-fusion/--no-loss-fusion", default=None,
              help="crown-ibp: bound the cross-entropy with one CROWN-IBP row per sample instead of the K-1 "
                   "margins: ~3x faster ramp steps. Default: on with --ibp-init, where it trained about as well "
                   "as the margins; off from the default init, where it trained clearly worse (docs/training.md).")
@click.option("--model", help="cnn7 (preset default), wide-resnet, resnext, cnn-small, mlp.")
@click.option("--width", type=int, help="cnn7's channel multiplier: convs W, W, 2W, 2W, 2W and a linear layer of "
                                        "max(128, 8W) units (default 64, the paper's CNN-7).")
@click.option("--depth", type=int, help="mlp's number of hidden layers (default 2).")
@click.option("--hidden", type=int, help="mlp's units per hidden layer (default 256).")
@click.option("--dataset", type=click.Choice(["mnist", "cifar10", "tinyimagenet"]), help="Without a preset.")
@click.option("--bn/--no-bn", default=True, show_default=True, help="Batch norm after every hidden layer.")
@click.option("--epochs", type=int)
@click.option("--eps", help="Training ε_max in pixel units: 0.4, 8/255 …")
@click.option("--eps-eval", help="ε for evaluation and checkpoint selection (default: --eps).")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--schedule", help="START,LENGTH: ε ramp starts at epoch START (1-based) and lasts LENGTH epochs.")
@click.option("--milestones", help="Epochs where the learning rate is multiplied by 0.2, e.g. 50,60.")
@click.option("--lambda", "lam", type=float, help="Regulariser weight λ.")
@click.option("--ibp-init/--default-init", "ibp_init", default=None,
              help="Ablations: force IBP initialisation on or off (default: on for fast only).")
@click.option("--regularizers", help="Ablations: warmup regularisers to use, 'tightness,relu' (fast's default) or "
                                     "'none' (the others' default).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--compile/--no-compile", "compile_step", default=None,
              help="torch.compile the training step, with CUDA graphs on a GPU (default: on a GPU only, where "
                   "a CNN-7 step runs about 3x faster after a minute or two of compilation per phase of the "
                   "ε schedule).")
@click.option("--limit", type=int, help="Train on the first N training images only.")
@click.option("--val-size", type=int, help="Held-out training images for checkpoint selection.")
@click.option("--eval-limit", type=int, help="Evaluate on the first N test images only.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with MNIST/ or cifar-10-batches-py/.")
@click.option("--out", "run_dir", type=click.Path(file_okay=False), help="Run folder (default runs/NAME).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in this folder bit-for-bit from its last checkpoint.")
@click.option("--trust-checkpoint", is_flag=True,
              help="With --resume: read a last.pt that only Python's full unpickler reads (an older certkit's); "
                   "this runs any code the file holds, so only for files you trust (docs/security.md).")
@click.option("--nproc", type=int, default=None,
              help="Data-parallel training in N local processes (DistributedDataParallel; gloo on the CPU with "
                   "cores/N threads each, nccl with one GPU each): the run one process trains with the same "
                   "--batch-size, up to rounding. Under torchrun leave it out (docs/training.md).")
@friendly_errors
def train(preset, method, loss_fusion, model, width, depth, hidden, dataset, bn, epochs, eps, eps_eval, batch_size,
          lr, schedule, milestones, lam, ibp_init, regularizers, seed, device, compile_step, limit, val_size,
          eval_limit, data_dir, run_dir, resume_dir, trust_checkpoint, nproc) -> None:
    """Certified robust training (IBP / CROWN-IBP) with the fast short-warmup method.

    \b
    Examples:
      certkit train --preset mnist --model cnn-small          # the MNIST recipe on a CPU-sized model
      certkit train --preset cifar10 --method vanilla         # a row of the paper's table
      certkit train --preset mnist --model cnn7 --width 8     # CNN-7 at 1/8 of the channels (410k params)
      certkit train --resume runs/mnist-fast-cnn-small-s0     # continue an interrupted run
      certkit train --preset mnist --nproc 2                  # data parallel, two local processes
      torchrun --nproc-per-node 2 -m certkit train --preset mnist   # the same, started by torchrun

    Writes RUN_DIR/config.json, metrics.h5, last.pt and best.pt (best verified error at
    ε_max on a validation split carved from the training set).
    """
    import dataclasses
    import json

    from certkit.boxes import parse_eps
    from certkit.errors import InvalidInput
    from certkit.report import TrainProgress, console
    from certkit.train.distributed import processes, train_in_processes
    from certkit.train.loop import TrainConfig, config_from
    from certkit.train.models import model_label

    world, lead = processes(nproc)  # under torchrun: its world size, and whether this is rank 0
    if resume_dir is not None:
        cfg_path = Path(resume_dir) / "config.json"
        if not cfg_path.is_file():  # without last.pt (killed before its first epoch ended) it starts afresh
            raise InvalidInput(f"{resume_dir}: no run to resume (needs config.json)")
        cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        if epochs is not None:
            cfg = dataclasses.replace(cfg, epochs=epochs)
        if compile_step is not None:
            cfg = dataclasses.replace(cfg, compile=compile_step)
        run_dir = resume_dir
    else:
        sched = _pair(schedule, "--schedule")
        if sched is not None and len(sched) != 2:
            raise InvalidInput(f"bad --schedule {schedule!r}: expected START,LENGTH")
        if preset is None and dataset is None:
            raise InvalidInput("give --preset or --dataset")
        cfg = config_from(
            preset, method=method, loss_fusion=loss_fusion, model=model or ("cnn7" if preset else "cnn-small"),
            width=width, depth=depth, hidden=hidden, dataset=dataset, bn=bn,
            epochs=epochs, eps=None if eps is None else parse_eps(eps),
            eps_eval=None if eps_eval is None else parse_eps(eps_eval), batch_size=batch_size, lr=lr,
            schedule_start=sched[0] if sched else None, schedule_length=sched[1] if sched else None,
            milestones=_pair(milestones, "--milestones"), lam=lam, ibp_init=ibp_init,
            regularizers=None if regularizers is None else _names(regularizers), seed=seed, device=device,
            compile=compile_step, limit=limit, val_size=val_size, eval_limit=eval_limit, data_dir=data_dir)
        run_dir = run_dir or (f"runs/{preset or cfg.dataset}-{cfg.method}-{model_label(cfg.model, **cfg.arch)}"
                              f"-s{cfg.seed}")
        if (Path(run_dir) / "last.pt").exists():
            raise InvalidInput(f"{run_dir} already holds a run: use --resume {run_dir} or another --out")
    if lead:  # rank 0 alone prints
        console.print(f"[bold]certkit train[/] → {run_dir}: {cfg.method}"
                      f"{' (loss fusion)' if cfg.use_loss_fusion else ''} {model_label(cfg.model, **cfg.arch)} on "
                      f"{cfg.dataset}, ε {cfg.eps:.4g} (eval {cfg.eps_test:.4g}), {cfg.epochs} epochs, "
                      f"batch {cfg.batch_size}, ramp from epoch {cfg.schedule_start} for {cfg.schedule_length}"
                      + (f", {world} processes" if world > 1 else ""), highlight=False)
    last = train_in_processes(cfg, run_dir, nproc, resume=resume_dir is not None, trust_checkpoint=trust_checkpoint,
                              progress=TrainProgress() if lead else None, log=console.print)
    if last and lead:
        console.print(f"[green]done[/]: test clean error {last['test_clean_err']:.2f}%, IBP verified error "
                      f"{last['test_verified_err']:.2f}% at ε={cfg.eps_test:.4g}; checkpoints in {run_dir}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR ...]",
                type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the figures (default for one run: RUN_DIR/plots; needed for several).")
@click.option("--label", "labels", multiple=True, metavar="RUN_DIR=NAME",
              help="Name a run's line (repeatable); runs given one name make one line. Default: by setting, "
                   "seeds of one setting together.")
@click.option("--json", "as_json", is_flag=True, help="Print the overlay's data (per line and epoch) as JSON; "
                                                       "draw nothing.")
@friendly_errors
def plot(run_dirs, out_dir, labels, as_json) -> None:
    """Draw training runs' curves as PNG and SVG.

    \b
    One run: regularisers, ReLU ratios, ε and errors, into RUN_DIR/plots/.
    Several: one overlay (clean and verified error, loss, L_tightness, L_relu, ε, the ε
    ramp shaded) with a line per setting: the mean over its seeds, a band from min to max.

    \b
    Examples:
      certkit plot runs/tour
      certkit plot runs/mnist-fast-s0 runs/mnist-fast-s1 runs/mnist-vanilla-s0 --out runs/compare
    """
    from certkit.report import console
    from certkit.train.plot import parse_labels, plot_runs, training_series

    names = parse_labels(labels)
    if as_json:
        import json

        click.echo(json.dumps(training_series(run_dirs, names), indent=2))
        return
    for p in plot_runs(run_dirs, out_dir, names):
        console.print(f"wrote {p}")


@main.command()
@click.option("--onnx", "onnx_out", nargs=2, type=click.Path(dir_okay=False), required=True,
              metavar="CKPT OUT.onnx", help="Checkpoint to export and the ONNX file to write.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Real test inputs for the checks.")
@click.option("--check-samples", type=int, default=64, show_default=True)
@click.option("--trust-checkpoint", is_flag=True,
              help="Read a checkpoint that only Python's full unpickler reads (an older certkit's); this runs "
                   "any code the file holds, so only for files you trust (docs/security.md).")
@friendly_errors
def export(onnx_out, data_dir, check_samples, trust_checkpoint) -> None:
    """Export a checkpoint to ONNX with batch norm folded and normalisation inside.

    The file records dataset, input shape, pixel range, ε, class names, training method and
    certkit version. It is written only if onnxruntime matches PyTorch (max abs diff ≤ 1e-4)
    and its IBP bounds match the checkpoint's on real test inputs.
    """
    from certkit.export import export_checkpoint
    from certkit.report import console

    ckpt, out = onnx_out
    report = export_checkpoint(ckpt, out, data_dir=data_dir, check_samples=check_samples,
                               trust_checkpoint=trust_checkpoint)
    console.print(f"wrote {out}: onnxruntime vs PyTorch max abs diff {report['max_abs_diff']:.2e}, "
                  f"IBP bounds relative gap {report['ibp_rel_gap']:.2e}", highlight=False)


def _verify_settings(config_file: str | None, sets: tuple[str, ...], flags: dict, metadata_range):
    """verify's effective settings: defaults < --config's verify: section < --set < flags given on
    the command line; the pixel range nobody gave is the model's metadata's (``metadata_range()``).

    ``flags`` are verify's options that are settings (VerifyConfig fields): a flag counts only when
    given (click's parameter source), so their defaults live in VerifyConfig alone."""
    from click.core import ParameterSource

    from certkit.errors import InvalidInput
    from certkit.settings import load_config

    resolved = load_config(config_file, sets, ("verify",))["verify"]
    ctx = click.get_current_context()
    for name, value in flags.items():
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            resolved.set(name, value, "--" + name.replace("_", "-"))
    if "eps" not in resolved.values:
        raise InvalidInput("give --eps (or eps in the verify: section of --config, or --set eps=...)")
    if resolved.origin["pixel_range"] == "default":
        resolved.set("pixel_range", metadata_range(), "the model's metadata")
    lo, hi = resolved.values["pixel_range"]
    if lo >= hi:
        raise InvalidInput(f"bad pixel range {(lo, hi)}: MIN must be below MAX")
    return resolved.build()


@main.command(cls=SettingsCommand, section="verify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--eps", help="ℓ∞ radius in pixel units of [0,1]: 8/255, 0.031, 2e-3 (required, here or in the "
              "settings). Several make a sweep into one results file, a group per ε: a list 0.1,0.2,0.3, a "
              "range START:STOP:STEP such as 1/255:8/255:1/255 (STOP included), or both mixed.")
@click.option("--dataset", help="mnist, cifar10, tinyimagenet or npz:FILE (arrays x, y). Default: the "
              "model's metadata.")
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--start", type=int, default=0, show_default=True, help="First test sample.")
@click.option("-n", "count", type=int, help="Number of samples (default: all from --start).")
@click.option("--method", type=click.Choice(["auto", "ibp", "crown-ibp", "crown", "alpha-crown"]),
              help="auto runs IBP, CROWN-IBP, CROWN, α-CROWN in order, stopping per sample at the first proof "
                   "(default: the settings', auto).")
@click.option("--attack/--no-attack", default=None,
              help="PGD on undecided samples; counterexamples are confirmed with onnxruntime (default: on).")
@click.option("--batch-size", type=int, help="Samples bounded together (default: the settings', 32).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Default: the settings', auto.")
@click.option("--out", type=click.Path(dir_okay=False), help="Results file (HDF5; docs/results-format.md).")
@click.option("--emit-vnnlib", "vnnlib_dir", type=click.Path(file_okay=False),
              help="Also write one VNN-LIB property per sample (and ε) and instances.csv to this folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted --out file.")
@click.option("--timeout-per-sample", type=float, help="Seconds per sample; stages past the budget are skipped.")
@click.option("--pixel-range", help="MIN,MAX of the input pixels for models without certkit metadata.")
@click.option("--max-memory", help=MAX_MEMORY_HELP + " Skipped stages leave the reason in the results' `reason`.")
@click.option("--workers", type=int, metavar="N",
              help="Verify in N worker processes of a Ray cluster (a local one started for "
              "the run, or --address's), shards of whole batches each, with the same answers as one process "
              "(docs/scale-out.md; needs certkit[ray]). Default: this process alone.")
@ADDRESS_OPTION
@config_options("verify")
@friendly_errors
def verify(model, eps, dataset, data_dir, start, count, method, attack, batch_size, device, out, vnnlib_dir,
           resume, timeout_per_sample, pixel_range, max_memory, workers, address, config_file, sets) -> None:
    """Verify ℓ∞ robustness of an ONNX classifier on dataset samples.

    \b
    Examples:
      certkit verify models/mnist_cnn_small_eps0.3.onnx --eps 0.3 -n 100
      certkit verify model.onnx --eps 8/255 --dataset cifar10 --method crown --out results.h5
      certkit verify model.onnx --eps 0.1 --dataset npz:mydata.npz --emit-vnnlib props/
      certkit verify model.onnx --config certkit.yaml --set pgd_restarts=20
      certkit verify model.onnx --eps 8/255 --dataset cifar10 --workers 8 --out results.h5
      certkit verify models/mnist_cnn_small_eps0.3.onnx --eps 0.1,0.2,0.3 -n 100 --out sweep.h5
      certkit verify model.onnx --eps 1/255:8/255:1/255 --dataset cifar10 --out sweep.h5

    Each sample ends verified (all margin lower bounds > 0), falsified (a PGD point that
    onnxruntime confirms), misclassified, or unknown. Settings: defaults < --config's
    verify: section < --set < the flags given here; the results file records the effective
    ones (attribute `options`).

    Several radii (a sweep) carry answers between them: a sample falsified at some ε is
    falsified at every larger one (its counterexample lies in the larger box), one verified
    at some ε is verified at every smaller one, a misclassified one is so at every ε; such
    rows record the ε they come from in `reused_from` (docs/results-format.md).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from certkit.bounds import BoundedModel
    from certkit.boxes import parse_eps_list
    from certkit.errors import InvalidInput
    from certkit.export import pixel_range_of, read_metadata
    from certkit.onnx_io import graph_input, read_proto
    from certkit.report import console, results_table
    from certkit.results import read_sweep, summarize
    from certkit.scale_out import check_options
    from certkit.verify import emit_vnnlib, load_verify_data, run_sweep, run_verify

    check_options(workers, address)  # Ray missing, --address without --workers: one line before any work
    flags = {"eps": eps, "method": method, "attack": attack, "batch_size": batch_size, "device": device,
             "timeout_per_sample": timeout_per_sample, "pixel_range": pixel_range, "max_memory": max_memory}
    if eps is not None:
        parse_eps_list(eps)  # a bad --eps is reported before the model is read
    proto = read_proto(model)
    meta = read_metadata(proto)
    dataset = dataset or meta.get("dataset")
    if dataset is None:
        raise InvalidInput(f"{model} has no certkit metadata: give --dataset")
    cfg = _verify_settings(config_file, sets, flags, lambda: pixel_range_of(meta))
    if resume and out is None:
        raise InvalidInput("--resume needs --out")
    _, shape = graph_input(proto)
    cfg.stages()  # validates the method before any work
    x, y, indices = load_verify_data(dataset, data_dir, start, count, shape)
    bm = BoundedModel(model)  # converted once, for emission and verification
    _warn_nonfinite(model)
    if bm.logits_model() is not None:
        console.print(f"{Path(model).name} ends in a softmax: margins are bounded on the logits before it "
                      "(the same argmax)")
    if vnnlib_dir:
        csv = emit_vnnlib(model, vnnlib_dir, x, y, indices, cfg, int(np.prod(bm.graph.output_shape)))
        console.print(f"wrote {len(x) * len(cfg.radii())} VNN-LIB properties and {csv}")
    sweep = len(cfg.radii()) > 1
    columns = (TextColumn("[bold]verify[/]{task.fields[radius]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TextColumn("{task.fields[speed]}"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        tasks = {}  # a bar per ε of a sweep: (task, when its ε started)
        last = [time.perf_counter()]

        def progress(st):
            radius = st.get("eps")
            if radius not in tasks:
                tasks[radius] = (bar.add_task("", total=st["total"], info="", speed="",
                                              radius="" if radius is None else f" ε={radius:.4g}"), last[0])
            task, t0 = tasks[radius]
            last[0] = time.perf_counter()
            rate = st["done"] / max(last[0] - t0, 1e-9)
            bar.update(task, completed=st["done"], speed=f"{rate:.1f} samples/s",
                       info=f"[green]verified {st['verified']}[/] [red]falsified {st['falsified']}[/] "
                            f"unknown {st['unknown']} misclassified {st['misclassified']}"
                            + (f" [bold red]error {st['error']}[/]" if st["error"] else ""))  # workers that died

        run = run_sweep if sweep else run_verify
        counts = run(model, x, y, indices, cfg, dataset, start, out=out, resume=resume, progress=progress,
                     model=bm, workers=workers, address=address)
    if out:
        summaries = [summarize(attrs, data) for attrs, data in read_sweep(out)]
        console.print(results_table(summaries))
        console.print(f"results in {out}")
    else:
        for radius, c in (counts.items() if sweep else [(cfg.eps, counts)]):
            n = sum(c.values())
            console.print(f"{f'ε={radius:.4g}: ' if sweep else ''}verified {c['verified']}/{n}, falsified "
                          f"{c['falsified']}, unknown {c['unknown']}, misclassified {c['misclassified']}"
                          + (f", error {c['error']}" if c["error"] else "") + " (use --out for the full report)")


@main.command()
@click.argument("results", nargs=-1, required=True, metavar="RESULTS.h5 [MORE.h5 ...]",
                type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON (a list, one per ε, for a sweep); with several files, --plots or "
                   "--html, an object with every file's summaries, the notes and the series behind each figure.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False),
              help="Write the figures into this folder, each as PNG and SVG (docs/reports.md).")
@click.option("--html", "html_file", type=click.Path(dir_okay=False),
              help="Write one self-contained HTML page: figures inline, provenance, summaries and a sortable "
                   "table of every sample; nothing is fetched from the network.")
@click.option("--max-counterexamples", type=click.IntRange(min=0), default=8, show_default=True,
              help="Counterexamples per file in the grid (first ones, ascending ε).")
@click.option("--allow-mixed", is_flag=True,
              help="Compare files of different data slices or ε sets (with a note) instead of refusing.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Folder with MNIST/ or cifar-10-batches-py/, for the counterexamples' originals (as verify's).")
@click.option("--ground-truth", "bench_dir", type=click.Path(),
              help="For a VNN-COMP results CSV: the benchmark folder the run used (or a family's folder, or a "
                   "ground_truth.csv in one), whose published winner's times become the cactus plot's second line.")
@friendly_errors
def report(results, as_json, plots_dir, html_file, max_counterexamples, allow_mixed, data_dir, bench_dir) -> None:
    """Summarise `certkit verify --out` results files, or a `certkit vnncomp` results CSV;
    draw figures and an HTML page.

    \b
    Examples:
      certkit report results.h5                                  # the summary table
      certkit report sweep.h5 --plots plots/ --html report.html  # figures (PNG, SVG), one HTML page
      certkit report model_a.h5 model_b.h5 --plots plots/        # two models: same samples and ε
      certkit report model_a.h5 model_b.h5 --json > report.json  # summaries and every figure's numbers
      certkit report vnncomp_results/results.csv --ground-truth ../shared/vnncomp --plots plots/

    Figures: accuracies against ε, the share of samples each stage decided, the best margin
    lower bounds, time per stage, and a grid of counterexamples with the model's scores
    (onnxruntime, on the file at the results' model_path). Files are compared only when they
    cover the same samples and ε (else an error; --allow-mixed draws them anyway). For a
    VNN-COMP results CSV: the per-family table with the competition's score, and with
    --plots the cactus plot (solved instances against time, per family and overall). See
    docs/reports.md.
    """
    import json

    from rich.markup import escape

    if any(str(r).lower().endswith(".csv") for r in results):
        _report_vnncomp(results, as_json, plots_dir, html_file, bench_dir)
        return
    if bench_dir is not None:
        raise CertkitError("--ground-truth goes with a VNN-COMP results CSV, not with verify results files")

    from certkit.figures import draw_figures, load_runs, report_json, report_series, save_figures
    from certkit.report import console, results_table

    runs, notes = load_runs(results, allow_mixed)
    series = report_series(runs, max_counterexamples, data_dir) if plots_dir or html_file or len(runs) > 1 else None
    figures = draw_figures(series) if plots_dir or html_file else {}
    written = [f"{len(save_figures(figures, plots_dir))} figure files in {plots_dir}"] if plots_dir else []
    if html_file:
        from certkit.html_report import write_html

        write_html(html_file, runs, series, figures, notes)
        written.append(f"the HTML report {html_file}")
    if as_json:
        click.echo(json.dumps(report_json(runs, series, notes), indent=2))
        return
    grid_notes = [f"{p['model']}: {p['note']}" for p in (series or {}).get("counterexamples", []) if p["note"]]
    for note in notes + grid_notes:
        console.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)
    for run in runs:
        if len(runs) > 1:
            console.print(f"[bold]{escape(run.name)}[/]: {escape(str(run.path))}", highlight=False)
        summaries = run.summaries()
        console.print(results_table(summaries))
    if written:
        console.print(escape(f"wrote {' and '.join(written)}"), highlight=False)


def _report_vnncomp(results: tuple[str, ...], as_json: bool, plots_dir: str | None, html_file: str | None,
                    bench_dir: str | None) -> None:
    """`certkit report RESULTS.csv`: the per-family table and score of a VNN-COMP run, its cactus plot."""
    import json

    from certkit.report import console
    from certkit.vnncomp.figures import report_csv, summary_table

    if len(results) != 1:
        raise CertkitError("give one VNN-COMP results CSV (or verify results files, without a CSV among them)")
    if html_file:
        raise CertkitError("--html is for verify results files; for a VNN-COMP results CSV use --plots or --json")
    series = report_csv(results[0], plots_dir, bench_dir)
    if as_json:
        click.echo(json.dumps(series, indent=2))
        return
    console.print(summary_table(series))
    for path in series.get("plots", []):
        console.print(f"wrote {path}", highlight=False)


DEVICE_HELP = ("Where bounds and branch and bound run: cpu, cuda (TF32 off; the MILP refinement and "
               "onnxruntime's checks stay on the CPU) or auto (cuda where present).")


@main.command("run-instance", cls=SettingsCommand, section="solver")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("prop", metavar="PROPERTY", type=click.Path(dir_okay=False))
@click.option("--timeout", type=float, required=True, help="Hard wall-clock limit in seconds.")
@click.option("--results", "results", type=click.Path(dir_okay=False), required=True,
              help="Result file to write (competition format).")
@click.option("--category", default="", help="Benchmark name (VNN-COMP category), shown in the log.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="CPU threads for PyTorch; 0 keeps PyTorch's default (every core).")
@click.option("--pidfile", type=click.Path(dir_okay=False),
              help="Write the solver process's id here while it runs (vnncomp/prepare_instance.sh reads it "
                   "to stop a solver left over from an interrupted run, and no other).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help=DEVICE_HELP)
@click.option("--max-memory", help=MAX_MEMORY_HELP + " A stage over it answers unknown.")
@config_options("solver")
@friendly_errors
def run_instance_cmd(model, prop, timeout, results, category, threads, pidfile, device, max_memory, config_file,
                     sets) -> None:
    """Solve one VNN-COMP instance: is some input in the property's box mapped into its unsafe set?

    \b
    Writes RESULTS: first line sat, unsat, unknown, timeout or error; after sat the
    counterexample ((X_0 v) ... (Y_0 v) ...), with the outputs of onnxruntime, checked
    against the property before it is written. The limit is hard: the solver runs in a
    child process that is killed at the deadline, and `timeout` is written on time. The
    log (stderr) starts with the solver settings used, in one line.

    Strategy (the default settings' numbers): PGD attack, CROWN, alpha-CROWN, then branch
    and bound until the deadline (input splitting for networks with at most
    {input_split_max} inputs, ReLU splitting otherwise; when ReLU splitting has not
    finished within {milp_after:.0%} of the time left on a ReLU network of at most
    {milp_max_neurons:,} ReLU neurons, its intermediate bounds are refined by MILP (HiGHS)
    for {milp_time:.0%} of the time left before that try and splitting starts again from
    them).

    \b
    Example:
      certkit run-instance acasxu/onnx/ACASXU_run2a_1_1_batch_2000.onnx \\
          acasxu/vnnlib/prop_1.vnnlib --timeout 116 --results out.txt --set attack_restarts=32
    """
    from certkit.device import check_device
    from certkit.settings import solver_config
    from certkit.vnncomp.instance import run_instance

    check_device(device)  # --device cuda without one: say so here, before any result file
    config = solver_config(config_file, sets)  # a bad setting: one line, before any result file
    if timeout <= 0:
        raise CertkitError(f"--timeout must be positive; got {timeout}")
    for path in (model, prop):
        if not Path(path).is_file():
            raise CertkitError(f"{path}: no such file")
    status = run_instance(model, prop, timeout, results, category=category, threads=threads, pidfile=pidfile,
                          device=device, max_memory=_max_memory(max_memory), config=config)
    from certkit.status import Status

    click.echo(status.vnncomp)
    if status is Status.ERROR:
        sys.exit(1)


@main.command("vnncomp", cls=SettingsCommand, section="solver")
@click.argument("bench_dir", type=click.Path(file_okay=False))
@click.option("--instances", type=click.Path(dir_okay=False), help="instances.csv to run (default: BENCH_DIR's).")
@click.option("--ground-truth", type=click.Path(dir_okay=False),
              help="Ground-truth CSV (ground_truth column); default: each family's ground_truth.csv.")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False), default="vnncomp_results/results.csv",
              show_default=True, help="Results CSV, one row per instance, appended as they finish (resumable).")
@click.option("--h5", type=click.Path(dir_okay=False), help="Also write an HDF5 summary here.")
@click.option("--timeout-scale", type=float, default=1.0, show_default=True,
              help="Multiply every published timeout by this factor.")
@click.option("--families", help="Comma-separated families to run (BENCH_DIR holding several).")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False),
              help="After the run, draw the cactus plot (certkit and the published winner, α,β-CROWN, under the "
                   "same timeouts) into DIR/cactus.png and .svg, and show the table with the winner's counts.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help=DEVICE_HELP)
@click.option("--max-memory", help=MAX_MEMORY_HELP + " Per instance; a stage over it answers unknown.")
@click.option("--workers", type=int, metavar="N",
              help="Solve N instances at a time in worker processes of a Ray cluster (a "
              "local one started for the run, or --address's), each under its own deadline; the CSV and table "
              "as from one process (docs/scale-out.md; needs certkit[ray]). Default: one at a time, here.")
@ADDRESS_OPTION
@config_options("solver")
@friendly_errors
def vnncomp_cmd(bench_dir, instances, ground_truth, out_csv, h5, timeout_scale, families, plots_dir, device,
                max_memory, workers, address, config_file, sets) -> None:
    """Run a VNN-COMP benchmark and score it against the ground truth.

    \b
    BENCH_DIR is one family (instances.csv, onnx/, vnnlib/, optional ground_truth.csv)
    or a directory of families. Each instance gets its timeout (times --timeout-scale)
    and a result file next to the CSV (<out dir>/<family>/); rows already in the CSV are
    skipped, so an interrupted run resumes. The table shows per family the answers,
    wrong answers (against the ground truth), the score (+10 correct, -150 wrong),
    the solved count next to the ground truth's, and times. The solver settings used are
    written to config.yaml beside the CSV (and to the --h5 file's `config` attribute);
    resuming a CSV with other settings is refused, naming the settings that differ.
    With --plots DIR the table also counts the winner's (α,β-CROWN's) published answers
    within each instance's timeout of this run, and DIR gets the cactus plot.

    \b
    Example:
      certkit vnncomp ../shared/vnncomp --families acasxu,tllverifybench_2022 \\
          --timeout-scale 0.25 --out runs/vnncomp/results.csv --plots runs/vnncomp/plots
      certkit vnncomp ../shared/vnncomp --families acasxu --workers 4 --out runs/acasxu/results.csv
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from certkit.device import resolve_device
    from certkit.report import console, vnncomp_table
    from certkit.scale_out import check_options
    from certkit.settings import solver_config
    from certkit.vnncomp.runner import config_file as recorded_config
    from certkit.vnncomp.runner import discover, run_benchmark, summarize

    check_options(workers, address)  # Ray missing, --address without --workers: one line before any work
    if workers is None:
        resolve_device(device)  # with workers: the cluster's GPUs count, checked when it is joined
    config = solver_config(config_file, sets)
    budget = _max_memory(max_memory)
    fams = [f.strip() for f in families.split(",") if f.strip()] if families else None
    insts = discover(bench_dir, instances, ground_truth, fams)
    out_csv = Path(out_csv)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[last]}"))
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("vnncomp", total=len(insts), last="")

        def on_done(inst, outcome, resumed):
            mark = {"wrong": " [bold red]WRONG[/]", "correct": " ✓"}.get(outcome.verdict, "")
            progress.update(task, advance=1, description=inst.family,
                            last=f"#{inst.index} {outcome.status.vnncomp}{mark} ({outcome.seconds:.1f}s)")

        outcomes = run_benchmark(insts, out_csv, out_csv.parent, Path(h5) if h5 else None, timeout_scale, on_done,
                                 device=device, max_memory=budget, config=config, workers=workers,
                                 address=address)
    summary = summarize(insts, outcomes)
    if plots_dir is None:
        console.print(vnncomp_table(summary))
    else:
        from certkit.vnncomp.figures import run_series, summary_table, write_vnncomp_plots

        series = run_series(insts, outcomes)
        console.print(summary_table(series))
        console.print(f"cactus plot: {', '.join(map(str, write_vnncomp_plots(series, plots_dir)))}")
    console.print(f"results: {out_csv}" + (f", {h5}" if h5 else "") + f"; settings: {recorded_config(out_csv)}")
    if any(s.wrong for s in summary):
        sys.exit(1)


@main.group("config")
def config_group() -> None:
    """The settings of run-instance, vnncomp (solver:) and verify (verify:) in one YAML file."""


@config_group.command("show")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A configuration file to apply to the defaults (every section is checked).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="One setting (repeatable): KEY where one section has it, else SECTION.KEY (solver.seed).")
@friendly_errors
def config_show(config_file, sets) -> None:
    """Print the effective settings as a YAML configuration file, each under its help.

    \b
    Precedence: defaults < --config FILE < --set (< a command's own flags, for verify).
    Save the output, edit it and pass it to run-instance, vnncomp or verify with --config:

    \b
      certkit config show --set attack_restarts=32 > certkit.yaml
      certkit vnncomp BENCH --config certkit.yaml
    """
    from certkit import __version__
    from certkit.settings import load_config, to_yaml

    resolved = load_config(config_file, sets, ("solver", "verify"))
    header = (f"certkit {__version__} configuration (certkit config show): every setting under its help.\n"
              "Pass it with --config FILE to run-instance, vnncomp (solver:) and verify (verify:).")
    click.echo(to_yaml(resolved, header), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
