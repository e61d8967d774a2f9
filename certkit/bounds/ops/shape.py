"""Aliases, Reshape (Flatten, Squeeze, Unsqueeze), Transpose, Concat and constant Pad.

These move values without changing them (constant Pad and Concat with constants add
constants), so their CROWN rules are exact."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from certkit.bounds.ops.base import Monotone, Op, bias_sum, dims
from certkit.bounds.ops.registry import Alias, Ctx, register


class Reshape(Monotone):
    """Flatten / Reshape / Squeeze / Unsqueeze: a reshape of each sample to a fixed shape."""

    kind = "reshape"
    affine = True

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.out_shape)

    def backward(self, A, in_bounds, **kw):
        return [A.reshape(A.shape[0], A.shape[1], *self.in_shape)], None

    def describe(self):
        return f"{dims(self.in_shape)}→{dims(self.out_shape)}"




class Permute(Monotone):
    """Transpose / Permute of one sample's full-shape axes (``perm`` as in ONNX Transpose).

    ``in_implicit`` / ``out_implicit``: whether the input's / output's leading size-1 axis is
    left out of its per-sample shape (see :mod:`certkit.bounds.ops.registry`); a transformer's
    batch-first to sequence-first transpose moves that axis."""

    kind = "permute"
    affine = True

    def __init__(self, perm: Sequence[int], in_implicit: bool = True, out_implicit: bool = True):
        self.perm = tuple(int(p) for p in perm)
        self.in_implicit, self.out_implicit = in_implicit, out_implicit
        inv = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inv[p] = i
        self.inv = tuple(inv)

    def forward(self, x):
        return self._move(x, 1, self.perm, self.in_implicit, self.out_implicit)

    def backward(self, A, in_bounds, **kw):
        return [self._move(A, 2, self.inv, self.out_implicit, self.in_implicit)], None

    @staticmethod
    def _move(t, lead: int, perm, implicit_in: bool, implicit_out: bool):
        """Permute the trailing full-shape axes of t, which has ``lead`` leading axes."""
        if implicit_in:
            t = t.unsqueeze(lead)
        t = t.permute(*range(lead), *(p + lead for p in perm))
        return t.squeeze(lead) if implicit_out else t

    def describe(self):
        return f"perm {self.perm}"


class Concat(Op):
    """Concatenation along a per-sample axis of bounded tensors and constants.

    ``parts`` lists, in order, None for each bounded input and the constant tensor (one
    sample's, broadcast over the batch) for each constant operand."""

    kind = "concat"
    affine = True

    def __init__(self, dim: int, sizes: Sequence[int], parts: Sequence[torch.Tensor | None] | None = None):
        self.dim = dim  # >= 1, in batched coordinates
        self.sizes = list(sizes)
        self.parts = list(parts) if parts is not None else [None] * len(self.sizes)

    def _join(self, xs):
        it = iter(xs)
        B = xs[0].shape[0]
        return torch.cat([next(it) if p is None else p.to(xs[0]).expand(B, *p.shape) for p in self.parts], self.dim)

    def forward(self, *xs):
        return self._join(xs)

    def interval(self, *bs):
        return self._join([b[0] for b in bs]), self._join([b[1] for b in bs])

    def backward(self, A, in_bounds, **kw):
        pieces = torch.split(A, self.sizes, self.dim + 1)
        bias = None
        for p, piece in zip(self.parts, pieces):
            if p is not None:
                term = bias_sum(piece, p.to(A))
                bias = term if bias is None else bias + term
        return [piece for p, piece in zip(self.parts, pieces) if p is None], bias

    def describe(self):
        consts = sum(p is not None for p in self.parts)
        return f"dim {self.dim}" + (f", {consts} constant part(s)" if consts else "")


class Pad(Monotone):
    """Constant padding of the trailing per-sample dimensions (``F.pad`` order: last dimension
    first; negative pads crop). Affine: the backward pass crops A back to the input and adds
    the constant times the coefficients that fall on padding."""

    kind = "pad"
    affine = True

    def __init__(self, pads: Sequence[int], value: float, in_shape: Sequence[int]):
        self.pads, self.value = tuple(int(p) for p in pads), float(value)
        self.in_shape = tuple(in_shape)
        self.mask = F.pad(torch.zeros(1, *self.in_shape), self.pads, value=1.0)[0]  # 1 on padding

    def forward(self, x):
        return F.pad(x, self.pads, value=self.value)

    def backward(self, A, in_bounds, **kw):
        A_in = F.pad(A, tuple(-p for p in self.pads))
        bias = None if self.value == 0 else self.value * bias_sum(A, self.mask.to(A))
        return [A_in], bias

    def describe(self):
        return f"pads {self.pads} value {self.value:g}"



# ------------------------------------------------------------------ rules


@register(onnx=["Identity", "Dropout", "Constant"],
          fx=["Identity", "Dropout", "Dropout1d", "Dropout2d", "AlphaDropout", "OnnxCopyIdentity",
              "contiguous", "clone", "dropout", "identity", "detach"])
def _alias(ctx: Ctx):
    return Alias(ctx.x)


@register(onnx=["Cast"], fx=["OnnxCast", "float", "to", "type_as"])
def _cast(ctx: Ctx):
    out, x = ctx.value(ctx.node), ctx.value(ctx.x)
    if not (out.is_floating_point() and out.dtype == x.dtype):
        ctx.unsupported(f"a cast from {x.dtype} to {out.dtype} (only casts that keep the float type)")
    return Alias(ctx.x)


@register(onnx=["Flatten", "Reshape", "Squeeze", "Unsqueeze"],
          fx=["Flatten", "Unflatten", "OnnxReshape", "OnnxFlatten", "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes",
              "OnnxUnsqueezeStaticAxes", "OnnxUnsqueezeDynamicAxes",
              "flatten", "reshape", "view", "squeeze", "unsqueeze", "view_as", "reshape_as"])
def _reshape(ctx: Ctx):
    return Reshape(ctx.shape(ctx.x), ctx.shape()), [ctx.x]


@register(onnx=["Transpose"], fx=["OnnxTranspose", "permute", "transpose", "t"])
def _transpose(ctx: Ctx):
    x = ctx.x
    rank = len(ctx.full(x))
    if ctx.name == "OnnxTranspose":
        perm = ctx.target.perm if ctx.target.perm is not None else list(reversed(range(rank)))
    elif ctx.name == "permute":
        perm = ctx.args[1:] if not isinstance(ctx.args[1], (list, tuple)) else ctx.args[1]
    else:
        perm = list(range(rank))
        i, j = (ctx.args[1], ctx.args[2]) if ctx.name == "transpose" else (0, 1)
        perm[i], perm[j] = perm[j], perm[i]
    perm = [int(p) % rank for p in perm]
    return Permute(perm, ctx.implicit(x), ctx.implicit()), [x]


@register(onnx=["Concat"], fx=["OnnxConcat", "cat", "concat"])
def _concat(ctx: Ctx):
    if ctx.name == "OnnxConcat":
        dim, tensors, values = ctx.target.axis, ctx.node.args, ctx.args
    else:
        dim = ctx.kwargs.get("dim", ctx.args[1] if len(ctx.args) > 1 else 0)
        tensors, values = ctx.node.args[0], ctx.args[0]
    rank = len(ctx.shape())
    axis = ctx.axis(dim)
    parts, sizes, inputs = [], [], []
    for t, v in zip(tensors, values):
        if isinstance(t, fx.Node) and t in ctx.bounded:
            if len(ctx.shape(t)) != rank:
                ctx.unsupported("inputs of different per-sample ranks")
            parts.append(None)
            inputs.append(t)
        else:
            c = ctx.constant(v)
            if c.dim() != rank:
                ctx.unsupported(f"a constant part of shape {tuple(v.shape)}")
            parts.append(c)
        sizes.append(v.shape[axis - 1 + (len(v.shape) - rank)])
    return Concat(axis, sizes, parts), inputs


def pad_rule(ctx: Ctx, pads, mode, value, x: fx.Node):
    """Constant padding of per-sample dimensions (torch order: last dimension first)."""
    if mode != "constant":
        ctx.unsupported(f"{mode!r} padding (only constant padding is supported)")
    if not math.isfinite(value):
        ctx.unsupported(f"padding with the non-finite constant {value}")
    pads = [int(p) for p in pads]
    in_shape = ctx.shape(x)
    if len(pads) % 2 or any(pads[2 * len(in_shape):]):
        ctx.unsupported(f"pads {pads} change the batch dimension")
    return Pad(pads[:2 * len(in_shape)], value, in_shape), [x]


@register(onnx=["Pad"], fx=["OnnxPadStatic", "OnnxPadDynamic", "pad"])
def _pad(ctx: Ctx):
    mod = ctx.target
    if ctx.name == "OnnxPadStatic":
        return pad_rule(ctx, mod.pads, mod.mode, mod.constant_value, ctx.x)
    if ctx.name == "OnnxPadDynamic":
        if ctx.dynamic(ctx.node.args[1:]):
            ctx.unsupported("pads and value must be constant")
        pads = [int(p) for p in torch.as_tensor(ctx.args[1]).tolist()]  # ONNX order: all begins, then all ends
        half = len(pads) // 2
        torch_pads = [p for b, e in zip(pads[:half][::-1], pads[half:][::-1]) for p in (b, e)]
        value = ctx.args[2] if len(ctx.args) > 2 and ctx.args[2] is not None else 0.0
        return pad_rule(ctx, torch_pads, mod.mode, float(torch.as_tensor(value)), ctx.x)
    if ctx.target is not F.pad or ctx.dynamic(ctx.node.args[1:]) or ctx.dynamic(ctx.node.kwargs):
        ctx.unsupported("pads and value must be constant")
    sig = dict(zip(["pad", "mode", "value"], ctx.args[1:]), **ctx.kwargs)
    value = sig.get("value")
    return pad_rule(ctx, sig["pad"], sig.get("mode", "constant"), 0.0 if value is None else value, ctx.node.args[0])
