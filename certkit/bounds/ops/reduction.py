"""ReduceSum, ReduceMean, GlobalAveragePool, ReduceMax, ReduceMin, and n-ary Sum / Mean.

Adaptive average pooling maps to ReduceMean or AveragePool; Sum / Mean add several tensors.

Axes given to the operators are axes of the batched ``(B, *shape)`` engine tensor (>= 1);
the rules map ONNX / torch axes of the full one-sample tensor onto them with
:meth:`~certkit.bounds.ops.registry.Ctx.axis`, skip the dropped size-1 leading axis (a
reduction over a size-1 axis changes no value), and reshape the result when the per-sample
shape the graph expects differs from the reduced shape (only the placement of size-1 axes
can differ). Every rule checks its operator against the converted network's own output on
the example sample before it is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from certkit.bounds.ops.arithmetic import Add, left_pad
from certkit.bounds.ops.base import Monotone, dims, sum_to
from certkit.bounds.ops.registry import Alias, Ctx, register


def _norm_axes(axes: Iterable[int]) -> tuple[int, ...]:
    axes = tuple(sorted({int(a) for a in axes}))
    if any(a < 1 for a in axes):
        raise ValueError(f"engine axes must be >= 1 (axis 0 is the batch of boxes), got {axes}")
    return axes


class ReduceSum(Monotone):
    """Sum over engine axes ``axes`` (of the batched tensor, >= 1), keeping them as size 1 with
    ``keepdim``. Affine with non-negative weights, so IBP (sum of the lower ends, sum of the
    upper ends) and CROWN (the coefficients broadcast back over the reduced axes) are exact."""

    kind = "reducesum"
    affine = True
    mixing = True

    def __init__(self, axes: Sequence[int], keepdim: bool, in_shape: Sequence[int]):
        self.axes = _norm_axes(axes)
        self.keepdim = bool(keepdim)
        self.in_shape = tuple(int(s) for s in in_shape)
        if any(a > len(self.in_shape) for a in self.axes):
            raise ValueError(f"axes {self.axes} out of range for per-sample shape {self.in_shape}")
        self.count = math.prod(self.in_shape[a - 1] for a in self.axes)

    def forward(self, x):
        if not self.axes:  # torch would reduce over every axis for an empty dim list
            return x
        return x.sum(dim=self.axes, keepdim=self.keepdim)

    def _scale(self, A: Tensor) -> Tensor:
        return A

    def backward(self, A, in_bounds, **kw):
        A = self._scale(A)
        if not self.keepdim:
            for a in self.axes:  # engine axis a is axis a + 1 of A (B, S, ...)
                A = A.unsqueeze(a + 1)
        return [A.expand(A.shape[0], A.shape[1], *self.in_shape)], None

    def describe(self):
        return f"axes {self.axes}{' keepdim' if self.keepdim else ''} of {dims(self.in_shape)}"


class ReduceMean(ReduceSum):
    """Mean over engine axes: the sum divided by the number of reduced elements (weights
    1/count > 0: affine and monotone, IBP and CROWN exact)."""

    kind = "reducemean"

    def forward(self, x):
        if not self.axes:
            return x
        return x.mean(dim=self.axes, keepdim=self.keepdim)

    def _scale(self, A):
        return A / self.count


class ReduceMax(Monotone):
    """Maximum over engine axes. IBP: the max of the lower ends and of the upper ends (max is
    non-decreasing in every element).

    CROWN, per output (as certkit's MaxPool rule): with j the reduced element of largest
    lower bound, y >= x_j holds always (the max is at least any element); when l_j >= u_k for
    every other element k, x_j is the maximum on the whole box, so y <= x_j too (y = x_j);
    otherwise y <= max_k u_k, a constant. Positive coefficients take the lower line, negative
    ones the upper line. These are exact inequalities between the float values (no rounding
    is involved), and a zero coefficient never multiplies an infinite constant.
    """

    kind = "reducemax"
    sign = 1.0

    def __init__(self, axes: Sequence[int], keepdim: bool, in_shape: Sequence[int]):
        self.axes = _norm_axes(axes)
        self.keepdim = bool(keepdim)
        self.in_shape = tuple(int(s) for s in in_shape)
        if not self.axes or any(a > len(self.in_shape) for a in self.axes):
            raise ValueError(f"axes {self.axes} invalid for per-sample shape {self.in_shape}")
        self.kept = tuple(s for i, s in enumerate(self.in_shape, 1) if i not in self.axes)
        self.reduced = tuple(self.in_shape[a - 1] for a in self.axes)

    def forward(self, x):
        return x.amax(dim=self.axes, keepdim=self.keepdim)

    def _group(self, t: Tensor) -> Tensor:
        """(N, *in_shape) -> (N, *kept, R): the reduced axes moved last and flattened."""
        n = len(self.axes)
        moved = t.movedim(self.axes, tuple(range(t.dim() - n, t.dim())))
        return moved.flatten(-n) if n > 1 else moved

    def _ungroup(self, t: Tensor) -> Tensor:
        """(B, S, *kept, R) -> (B, S, *in_shape), the inverse of :meth:`_group` (shifted by S)."""
        n = len(self.axes)
        t = t.unflatten(-1, self.reduced) if n > 1 else t
        return t.movedim(tuple(range(t.dim() - n, t.dim())), tuple(a + 1 for a in self.axes))

    def backward(self, A, in_bounds, **kw):
        lo, up = in_bounds[0]
        if self.sign < 0:  # min(x) = -max(-x): bound (-A)·max(z) over z in [-u, -l]
            lo, up, A = -up, -lo, -A
        B, S = A.shape[:2]
        lo_g, up_g = self._group(lo), self._group(up)  # (B, *kept, R)
        lo_j, j = lo_g.max(-1)
        if up_g.shape[-1] > 1:
            top = up_g.topk(2, dim=-1)
            best_up = top.values[..., 0]
            others = torch.where(top.indices[..., 0] == j, top.values[..., 1], best_up)
        else:
            best_up = up_g[..., 0]
            others = torch.full_like(best_up, -math.inf)
        exact = (lo_j >= others).unsqueeze(1)  # (B, 1, *kept)
        A = A.reshape(B, S, *self.kept)  # kept reduced axes have size 1
        neg = A.clamp(max=0)
        coef = torch.where(exact, A, A.clamp(min=0))
        const = torch.where(exact | (neg == 0), 0, neg * best_up.unsqueeze(1))
        bias = const.reshape(B, S, -1).sum(-1)
        index = j.unsqueeze(1).expand(B, S, *self.kept).unsqueeze(-1)
        A_in = A.new_zeros(B, S, *self.kept, up_g.shape[-1]).scatter(-1, index, coef.unsqueeze(-1))
        A_in = self._ungroup(A_in)
        return [-A_in if self.sign < 0 else A_in], bias

    def describe(self):
        return f"axes {self.axes}{' keepdim' if self.keepdim else ''} of {dims(self.in_shape)}"


class ReduceMin(ReduceMax):
    """Minimum over engine axes, bounded as min(x) = -max(-x) with :class:`ReduceMax`'s rule:
    y <= x_j for the element j of smallest upper bound; y >= x_j when u_j <= l_k for every
    other k, otherwise y >= min_k l_k."""

    kind = "reducemin"
    sign = -1.0

    def forward(self, x):
        return x.amin(dim=self.axes, keepdim=self.keepdim)


class SumOf(Add):
    """ONNX Sum / Mean: ``scale`` times the element-wise sum of several bounded tensors and
    constants, all broadcast to the output shape. Affine with positive weights: IBP sums the
    lower and the upper ends, CROWN hands each input the coefficients summed over the axes it
    was broadcast along, and the constants' contribution goes into the bias (both exact).
    (A subclass of :class:`Add` so the graph treats it as a sum of paths, never as IBP-exact.)

    ``parts`` lists, in order, None for each bounded input and the constant (one sample's
    value, broadcastable to ``out_shape``) for each constant operand."""

    kind = "sum"

    def __init__(self, in_shapes: Sequence[Sequence[int]], parts: Sequence[Tensor | None], out_shape: Sequence[int],
                 scale: float = 1.0):
        self.out_shape = tuple(out_shape)
        rank = len(self.out_shape)
        self.in_shapes = [tuple(s) for s in in_shapes]
        self.padded = [left_pad(s, rank) for s in self.in_shapes]
        self.parts = list(parts)
        self.scale = float(scale)
        consts = [p for p in self.parts if p is not None]
        self.const = None
        if consts:
            total = torch.zeros(self.out_shape, dtype=torch.float64)
            for c in consts:
                total = total + c.double()
            self.const = total

    def _combine(self, xs: Sequence[Tensor]) -> Tensor:
        B = xs[0].shape[0]
        total = None
        for x, padded in zip(xs, self.padded):
            x = x.reshape(B, *padded)
            total = x if total is None else total + x
        total = total.expand(B, *self.out_shape)
        if self.const is not None:
            total = total + self.const.to(total)
        return total * self.scale if self.scale != 1.0 else total

    def forward(self, *xs):
        return self._combine(xs)

    def interval(self, *bs):
        return self._combine([b[0] for b in bs]), self._combine([b[1] for b in bs])

    def backward(self, A, in_bounds, **kw):
        B, S = A.shape[:2]
        A = A * self.scale if self.scale != 1.0 else A
        A_ins = [sum_to(A, padded).reshape(B, S, *shape) for padded, shape in zip(self.padded, self.in_shapes)]
        bias = None if self.const is None else (A * self.const.to(A)).reshape(B, S, -1).sum(-1)
        return A_ins, bias

    def describe(self):
        n = sum(p is None for p in self.parts)
        return f"{n} input(s)" + (f", scale {self.scale:g}" if self.scale != 1.0 else "")


# ------------------------------------------------------------------ rules


def _verify(ctx: Ctx, op, inputs: Sequence[fx.Node]) -> None:
    """Refuse the node unless ``op`` reproduces its value on the example sample."""
    xs = [ctx.value(a).reshape(1, *ctx.shape(a)) for a in inputs]
    with torch.no_grad():
        got = op.forward(*xs)
    want = ctx.value(ctx.node)
    if not isinstance(want, Tensor) or got.numel() != want.numel():
        ctx.unsupported("internal check failed: the bound operator's output does not match the node's")
    if want.numel() == 0:
        return
    atol = 1e-6 * (1 + float(want.abs().nan_to_num(0.0, 0.0, 0.0).max()))
    if not torch.allclose(got.reshape(want.shape).to(want), want, rtol=1e-5, atol=atol, equal_nan=True):
        ctx.unsupported("internal check failed: the bound operator does not reproduce the node on an example")


def _engine_axes(ctx: Ctx, axes: Iterable[int] | None, x: fx.Node) -> tuple[int, ...]:
    """The engine axes for ONNX/torch ``axes`` of ``x``'s full shape (None or empty: all axes);
    the dropped size-1 leading axis is skipped (reducing over it changes nothing)."""
    rank = len(ctx.full(x))
    axes = [] if axes is None else [int(a) for a in axes]
    axes = axes or list(range(rank))
    out = set()
    for a in axes:
        a = a + rank if a < 0 else a
        if ctx.implicit(x) and a == 0:
            continue
        out.add(ctx.axis(a, x))
    return tuple(sorted(out))


def _reduce(ctx: Ctx, cls: type, axes: Iterable[int] | None, keepdim: bool, x: fx.Node):
    """A reduction of kind ``cls`` over ONNX/torch ``axes`` of ``x`` (None or empty: all), with
    a Reshape after it where the graph's per-sample output shape places size-1 axes differently."""
    from certkit.bounds.ops.shape import Reshape

    in_shape = ctx.shape(x)
    eaxes = _engine_axes(ctx, axes, x)
    if not eaxes:
        op = None
        out_shape = in_shape
    else:
        op = cls(eaxes, keepdim, in_shape)
        with torch.no_grad():
            out_shape = tuple(op.forward(torch.zeros(1, *in_shape)).shape[1:])
    want = ctx.shape()
    if math.prod(out_shape) != math.prod(want):
        ctx.unsupported(f"the node's output shape {want} differs from that of a {cls.__name__} over its axes "
                        f"{out_shape} (onnx2torch's ReduceMax/ReduceMin with negative axes and keepdims=0 does this)")
    if op is None:
        return Alias(x) if out_shape == want else (Reshape(in_shape, want), [x])
    _verify(ctx, op, [x])
    if out_shape == want:
        return op, [x]
    return Reshape(out_shape, want), [ctx.emit(op, [x], out_shape)]


_KIND = {"ReduceSum": ReduceSum, "ReduceMean": ReduceMean, "ReduceMax": ReduceMax, "ReduceMin": ReduceMin}


def _onnx_kind(ctx: Ctx, op_type: str) -> type:
    if op_type not in _KIND:
        ctx.unsupported(f"{op_type} (only ReduceSum, ReduceMean, ReduceMax and ReduceMin are supported)")
    return _KIND[op_type]


@register(onnx=["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin"],
          fx=["OnnxReduceStaticAxes", "OnnxReduceSumStaticAxes", "OnnxReduceSumDynamicAxes"])
def _onnx_reduce(ctx: Ctx):
    mod = ctx.target
    if ctx.name == "OnnxReduceStaticAxes":
        return _reduce(ctx, _onnx_kind(ctx, mod.operation_type), mod.axes, mod.keepdims, ctx.x)
    if ctx.dynamic(ctx.node.args[1:]):
        ctx.unsupported("reduction axes that depend on the input")
    if ctx.name == "OnnxReduceSumStaticAxes":
        axes = mod._axes
    else:
        axes = ctx.args[1] if len(ctx.args) > 1 else None
        axes = None if axes is None else [int(a) for a in torch.as_tensor(axes).reshape(-1).tolist()]
    if not axes and mod._noop_with_empty_axes:
        return Alias(ctx.x)
    return _reduce(ctx, ReduceSum, axes, bool(mod._keepdims), ctx.x)


def _torch_dims(ctx: Ctx, names: Sequence[str]) -> tuple[list[int] | None, bool]:
    """(dim, keepdim) of a torch reduction call ``f(x, dim, keepdim)``, whichever way passed."""
    sig = dict(zip(names, ctx.args[1:]), **ctx.kwargs)
    if ctx.dynamic(list(ctx.node.args[1:])) or ctx.dynamic(dict(ctx.node.kwargs)):
        ctx.unsupported("reduction arguments that depend on the input")
    if sig.get("dtype") is not None and sig["dtype"] != ctx.value(ctx.node.args[0]).dtype:
        ctx.unsupported("a reduction that changes the dtype")
    dim = sig.get("dim", sig.get("axis"))
    if dim is not None and not isinstance(dim, (list, tuple)):
        dim = [dim]
    return dim, bool(sig.get("keepdim", False))


@register(fx=["sum", "mean"])
def _torch_sum_mean(ctx: Ctx):
    x = ctx.node.args[0]
    if not isinstance(x, fx.Node) or x not in ctx.bounded or not isinstance(ctx.value(x), Tensor):
        ctx.unsupported("a sum or mean of something other than one bounded tensor")
    dim, keepdim = _torch_dims(ctx, ["dim", "keepdim", "dtype"])
    return _reduce(ctx, ReduceSum if ctx.name == "sum" else ReduceMean, dim, keepdim, x)


@register(onnx=[], fx=["amax", "amin"])
def _torch_amax(ctx: Ctx):
    x = ctx.node.args[0]
    dim, keepdim = _torch_dims(ctx, ["dim", "keepdim"])
    return _reduce(ctx, ReduceMax if ctx.name == "amax" else ReduceMin, dim, keepdim, x)


@register(onnx=["GlobalAveragePool"],
          fx=["OnnxGlobalAveragePool", "OnnxGlobalAveragePoolWithKnownInputShape", "AdaptiveAvgPool2d",
              "adaptive_avg_pool2d"])
def _global_avgpool(ctx: Ctx):
    x = ctx.x if ctx.name.startswith("Onnx") else ctx.node.args[0]
    rank = len(ctx.full(x))
    if ctx.name.startswith("Onnx"):
        return _reduce(ctx, ReduceMean, range(2, rank), True, x)
    if ctx.dynamic(ctx.node.args[1:]):
        ctx.unsupported("an output size that depends on the input")
    if rank < 3:
        ctx.unsupported(f"input of full shape {ctx.full(x)}; expected (N, C, H, W) or (C, H, W)")
    H, W = ctx.full(x)[-2:]
    oh, ow = ctx.full()[-2:]
    if (oh, ow) == (1, 1):
        return _reduce(ctx, ReduceMean, (rank - 2, rank - 1), True, x)
    if H % oh or W % ow:
        ctx.unsupported(f"adaptive average pooling from {H}x{W} to {oh}x{ow} (sizes must divide)")
    from certkit.bounds.ops.pooling import AvgPool2d

    in_shape = ctx.shape(x)
    if len(in_shape) != 3:
        ctx.unsupported(f"input of per-sample shape {in_shape}; expected (C, H, W)")
    k = (H // oh, W // ow)
    op = AvgPool2d(k, k, 0, False, True, in_shape)
    _verify(ctx, op, [x])
    return op, [x]


@register(onnx=["Sum", "Mean"], fx=["OnnxSum", "OnnxMean"])
def _nary_sum(ctx: Ctx):
    out_shape = ctx.shape()
    rank = len(out_shape)
    in_shapes, parts, inputs = [], [], []
    for a, v in zip(ctx.node.args, ctx.args):
        if isinstance(a, fx.Node) and a in ctx.bounded:
            shape = ctx.shape(a)
            if len(shape) > rank:
                ctx.unsupported(f"an operand of per-sample shape {shape} above the output's rank")
            in_shapes.append(shape)
            parts.append(None)
            inputs.append(a)
        else:
            c = ctx.constant(v)
            if c.dim() > rank:
                ctx.unsupported(f"a constant operand of shape {tuple(torch.as_tensor(v).shape)}")
            if not torch.isfinite(c).all():
                ctx.unsupported("a non-finite constant operand")
            parts.append(c.reshape(left_pad(c.shape, rank)))
    scale = 1.0 / len(ctx.node.args) if ctx.name == "OnnxMean" else 1.0
    op = SumOf(in_shapes, parts, out_shape, scale)
    _verify(ctx, op, inputs)
    return op, inputs

