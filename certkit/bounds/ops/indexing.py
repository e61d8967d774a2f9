"""Gather, Slice, Split, Expand and Tile: each output element is one input element.

Covered forms: Gather with constant indices, Slice and tensor ``getitem``, Split (``split``,
``chunk``, ``unbind``), Expand and Tile (``repeat``).

They all become one operator, :class:`Select`, reading the flattened sample through a fixed
table of input positions. The rule finds the table by running the converted network's own
node on a probe (the numbers 0, 1, 2, ... in the input's full shape, in float64, exact up
to 2^53 elements), so every indexing convention of ONNX and torch (negative indices and
steps, scalar or tensor indices, None / Ellipsis, axes of values whose size-1 leading axis
moved, broadcasting) is handled by the very code that defines it, and the table is checked
against the node's value on the example sample. Tables that only reshape become Reshape,
the identity an alias.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import Tensor

from certkit.bounds.ops.base import Monotone, dims
from certkit.bounds.ops.registry import Alias, Ctx, Tuple, per_sample, register


class Select(Monotone):
    """y[i] = x.flatten()[table[i]] per sample, for a constant table of flat input positions
    (entries may repeat: Expand, Tile; or be left out: Slice, Gather). Affine and exact: IBP
    selects from both ends (each output is one input, so the interval is exact); CROWN sends
    each output's coefficient to the input it reads, summing over repeated reads (an
    index_add over the flattened input, no loop over elements).

    A table that reads some input twice (Expand, Tile) is marked ``mixing``: a weighted sum
    after it can combine the copies, so IBP through such a chain is no longer exact."""

    kind = "select"
    affine = True

    def __init__(self, in_shape: Sequence[int], table: Tensor):
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(table.shape)
        self.n_in = math.prod(self.in_shape)
        self.flat = table.reshape(-1).long().cpu()
        if self.flat.numel() and not (0 <= int(self.flat.min()) and int(self.flat.max()) < self.n_in):
            raise ValueError("table entries out of range")
        self.mixing = bool(self.flat.numel() and torch.unique(self.flat).numel() < self.flat.numel())
        self._on: dict[torch.device, Tensor] = {}

    def _index(self, device: torch.device) -> Tensor:
        if device not in self._on:
            self._on[device] = self.flat.to(device)
        return self._on[device]

    def forward(self, x):
        B = x.shape[0]
        return x.reshape(B, self.n_in).index_select(1, self._index(x.device)).reshape(B, *self.out_shape)

    def backward(self, A, in_bounds, **kw):
        B, S = A.shape[:2]
        A_in = A.new_zeros(B, S, self.n_in).index_add(2, self._index(A.device), A.reshape(B, S, -1))
        return [A_in.reshape(B, S, *self.in_shape)], None

    def describe(self):
        return f"{dims(self.in_shape)}→{dims(self.out_shape)}"


# ------------------------------------------------------------------ rules


def _probe(ctx: Ctx, x: fx.Node):
    """Run this node with ``x`` replaced by its flat positions 0, 1, 2, ... (float64, in x's
    full shape); returns what the node returns on it."""
    ref = ctx.value(x)
    if ref.numel() >= 2 ** 53:
        ctx.unsupported("a tensor too large to index exactly")
    probe = torch.arange(ref.numel(), dtype=torch.float64, device=ref.device).reshape(ref.shape)
    args = fx.node.map_arg(ctx.node.args, lambda a: probe if a is x else ctx.values[a])
    kwargs = fx.node.map_arg(ctx.node.kwargs, lambda a: probe if a is x else ctx.values[a])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the node already warned when the graph builder ran it
            if ctx.node.op == "call_method":
                return getattr(args[0], ctx.node.target)(*args[1:], **kwargs)
            return ctx.target(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        ctx.unsupported(f"cannot trace its indexing ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def _table(ctx: Ctx, x: fx.Node, out: Tensor, value: Tensor) -> Tensor:
    """The long table of flat input positions for one output: ``out`` is the probe's output,
    ``value`` the node's output on the example; checked against x's example value."""
    if not isinstance(out, Tensor) or out.dtype != torch.float64 or tuple(out.shape) != tuple(value.shape):
        ctx.unsupported("its indexing could not be traced")
    table = out.long()
    n_in = ctx.value(x).numel()
    if not (torch.equal(table.to(out), out) and (table.numel() == 0 or (table.min() >= 0 and table.max() < n_in))):
        ctx.unsupported("it does not only select elements of its input")
    if not torch.equal(ctx.value(x).reshape(-1)[table.reshape(-1)].reshape(value.shape), value):
        ctx.unsupported("internal check failed: the selection does not reproduce the node on an example")
    return table


def _select(ctx: Ctx, x: fx.Node, table: Tensor, out_shape: Sequence[int]):
    """Select (or Reshape / alias when the table is the identity) from x to ``out_shape``."""
    from certkit.bounds.ops.shape import Reshape

    in_shape = ctx.shape(x)
    out_shape = tuple(out_shape)
    flat = table.reshape(-1)
    if flat.numel() == math.prod(in_shape) and torch.equal(flat.cpu(), torch.arange(flat.numel())):
        return Alias(x) if out_shape == in_shape else (Reshape(in_shape, out_shape), [x])
    return Select(in_shape, table.reshape(out_shape)), [x]


def _data(ctx: Ctx, exempt: Sequence[int] = ()) -> fx.Node:
    """The bounded tensor being indexed (the first argument); refuses input-dependent indices,
    sizes or axes (positional arguments in ``exempt`` only lend their shape)."""
    x = ctx.node.args[0] if ctx.node.args else None
    if not isinstance(x, fx.Node) or x not in ctx.bounded or not isinstance(ctx.value(x), Tensor):
        ctx.unsupported("indexing a constant with input-dependent indices (only constant indices into a "
                        "bounded tensor are supported)")
    rest = [a for i, a in enumerate(ctx.node.args[1:], 1) if i not in exempt]
    if ctx.dynamic(rest) or ctx.dynamic(dict(ctx.node.kwargs)):
        ctx.unsupported("indices, sizes or axes that depend on the input")
    if not ctx.value(x).is_floating_point():
        ctx.unsupported("indexing a non-floating-point tensor")
    return x


@register(onnx=["Gather", "GatherElements", "Slice", "Expand", "Tile"],
          fx=["OnnxGather", "OnnxGatherElements", "OnnxSlice", "OnnxSliceV9", "OnnxExpand", "OnnxTile",
              "getitem", "expand", "expand_as", "repeat", "tile", "narrow", "select", "index_select", "gather"])
def _selection(ctx: Ctx):
    x = _data(ctx, exempt=(1,) if ctx.name == "expand_as" else ())
    value = ctx.value(ctx.node)
    if not isinstance(value, Tensor):
        ctx.unsupported("a multi-output indexing")
    table = _table(ctx, x, _probe(ctx, x), value)
    return _select(ctx, x, table, ctx.shape())


@register(onnx=["Split"], fx=["OnnxSplit", "OnnxSplit13", "split", "chunk", "unbind", "tensor_split"])
def _split(ctx: Ctx):
    x = _data(ctx)
    values = ctx.value(ctx.node)
    outs = _probe(ctx, x)
    if not isinstance(values, (tuple, list)) or not isinstance(outs, (tuple, list)) or len(outs) != len(values):
        ctx.unsupported("its outputs could not be traced")
    tables = [_table(ctx, x, o, v) for o, v in zip(outs, values)]

    def item(ctx_i: Ctx, i: int):
        if not -len(tables) <= i < len(tables):
            ctx_i.unsupported(f"output {i} of {len(tables)}")
        if per_sample(tuple(tables[i].shape)) != ctx_i.shape():
            ctx_i.unsupported(f"output {i}'s shape changed")
        return _select(ctx_i, x, tables[i], ctx_i.shape())

    return Tuple(item)
