"""The ``certkit`` command line: parse options, call the library, print. No bound math here."""

from __future__ import annotations

import functools
import sys
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


def friendly_errors(fn):
    """Turn certkit's input errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CertkitError as e:
            _fail(str(e).replace("[", r"\["))
        except KeyboardInterrupt:
            _fail("interrupted")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="certkit")
def main() -> None:
    """certkit: certified robust training and sound verification of neural networks.

    \b
    Examples:
      certkit inspect model.onnx
      certkit bounds model.onnx --center x.npy --eps 8/255 --method crown --label 3
    """


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
    if summary.unsupported:
        console.print(onnx_table(summary))
        ops = sorted({op for _, op in summary.unsupported})
        names = ", ".join(f"{name} ({op})" for name, op in summary.unsupported[:5])
        more = f" and {len(summary.unsupported) - 5} more" if len(summary.unsupported) > 5 else ""
        _fail(f"unsupported operator(s) {', '.join(ops)}: {names}{more}")
    bm = BoundedModel(model)
    console.print(graph_table(bm.graph, f"certkit graph ({len(bm.graph.nodes)} nodes)"))
    console.print(f"output shape {bm.graph.output_shape}; all operators supported", style="green")


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
@friendly_errors
def bounds(model, lower, upper, center, eps, clip, method, label, out, device) -> None:
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
    bm = BoundedModel(model)
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
    dev = _device(device)
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


def _device(name: str):
    import torch

    from certkit.errors import InvalidInput

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: no CUDA device is available")
    return torch.device(name)


if __name__ == "__main__":  # pragma: no cover
    main()
