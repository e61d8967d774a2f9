"""Softmax, LogSoftmax and LayerNormalization, built from the registry's simpler rules.

Each becomes a short chain of intermediate nodes (:meth:`Ctx.emit`), so every part keeps
its own sound rule and interval, and full CROWN tightens the parts that feed nonlinear
ones (the centred values of a LayerNorm, the exponentials of a Softmax):

- ``softmax(x)`` along an axis = ``exp(x) · 1 / Σ exp(x)``: Exp, ReduceSum (keeping the
  axis), Reciprocal, and the element-wise product of the two. Logits beyond ~88 overflow
  float32's exp: the bounds then become infinite or NaN, which is sound (never verified).
- ``log_softmax(x)`` = ``x − log Σ exp(x)``: Exp, ReduceSum, Log, Sub.
- ``layer_norm(x)`` over the trailing axes = ``(x − μ) · (σ² + ε)^(−1/2) · γ + β`` with
  μ = mean(x), σ² = mean((x − μ)²): ReduceMean, Sub, Pow 2, ReduceMean, +ε, Sqrt,
  Reciprocal, product, then the element-wise affine γ, β. The decomposition is the
  function itself, so the composition of sound rules is sound.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from certkit.bounds.ops.arithmetic import Sub
from certkit.bounds.ops.bilinear import Product
from certkit.bounds.ops.linear import ElementwiseAffine
from certkit.bounds.ops.reduction import ReduceMean, ReduceSum
from certkit.bounds.ops.registry import Ctx, register
from certkit.bounds.ops.smooth import Exp, Log, Pow, Reciprocal, Sqrt


def _kept(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` (per sample) with the engine ``axes`` reduced to size 1."""
    return tuple(1 if k + 1 in axes else s for k, s in enumerate(shape))


def softmax_rule(ctx: Ctx, x: fx.Node, dim: int, log: bool):
    """Softmax or LogSoftmax of ``x`` along its full-shape axis ``dim``."""
    shape = ctx.shape(x)
    axis = ctx.axis(dim, x)
    keep = _kept(shape, (axis,))
    e = ctx.emit(Exp(), [x], shape)
    total = ctx.emit(ReduceSum((axis,), True, shape), [e], keep)
    if log:
        op, inputs = Sub([shape, keep]), [x, ctx.emit(Log(), [total], keep)]
    else:
        op, inputs = Product(shape, keep), [e, ctx.emit(Reciprocal(), [total], keep)]
    op.softmax_axis = axis  # lets verify bound the logits before an output softmax
    return op, inputs


@register(onnx=["Softmax", "LogSoftmax"], fx=["Softmax", "softmax", "LogSoftmax", "log_softmax", "OnnxSoftmaxV1V11"])
def _softmax(ctx: Ctx):
    name, mod = ctx.name, ctx.target
    if name in ("Softmax", "LogSoftmax"):
        return softmax_rule(ctx, ctx.x, mod.dim if mod.dim is not None else -1, name == "LogSoftmax")
    if name == "OnnxSoftmaxV1V11":  # opsets 1-11: softmax over the axes from `axis` on, flattened
        full = ctx.full(ctx.x)
        axis = mod.axis % len(full)
        if any(s != 1 for s in full[axis + 1:]):
            ctx.unsupported(f"softmax over the flattened axes {axis}.. of shape {full}")
        return softmax_rule(ctx, ctx.x, axis, mod.is_log)
    dim = ctx.kwargs.get("dim", ctx.args[1] if len(ctx.args) > 1 else None)
    if dim is None:
        ctx.unsupported("softmax without an axis")
    return softmax_rule(ctx, ctx.node.args[0], int(dim), name == "log_softmax")


def layer_norm_rule(ctx: Ctx, x: fx.Node, n_axes: int, eps: float, weight, bias):
    """LayerNorm of ``x`` over its last ``n_axes`` axes, with optional constant γ (weight), β (bias)."""
    shape = ctx.shape(x)
    if n_axes > len(shape):
        ctx.unsupported(f"normalising {n_axes} axes of a per-sample shape {shape}")
    axes = tuple(range(len(shape) - n_axes + 1, len(shape) + 1))
    keep = _kept(shape, axes)
    mean = ctx.emit(ReduceMean(axes, True, shape), [x], keep)
    centred = ctx.emit(Sub([shape, keep]), [x, mean], shape)
    square = ctx.emit(Pow(2.0), [centred], shape)
    var = ctx.emit(ReduceMean(axes, True, shape), [square], keep)
    ref = ctx.value(x)
    shifted = ctx.emit(ElementwiseAffine(None, torch.tensor(float(eps), dtype=ref.dtype, device=ref.device), keep),
                       [var], keep)
    inv_std = ctx.emit(Reciprocal(), [ctx.emit(Sqrt(), [shifted], keep)], keep)
    if weight is None and bias is None:
        return Product(shape, keep), [centred, inv_std]
    normed = ctx.emit(Product(shape, keep), [centred, inv_std], shape)
    scale = None if weight is None else ctx.constant(weight).detach()
    shift = None if bias is None else ctx.constant(bias).detach()
    return ElementwiseAffine(scale, shift, shape), [normed]


@register(onnx=["LayerNormalization"], fx=["LayerNorm", "layer_norm"])
def _layer_norm(ctx: Ctx):
    if isinstance(ctx.target, nn.LayerNorm):
        mod = ctx.target
        weight = mod.weight if mod.elementwise_affine else None
        bias = mod.bias if mod.elementwise_affine else None
        return layer_norm_rule(ctx, ctx.x, len(mod.normalized_shape), mod.eps, weight, bias)
    if ctx.target is not F.layer_norm or ctx.dynamic(ctx.node.args[1:]) or ctx.dynamic(ctx.node.kwargs):
        ctx.unsupported("layer norm with non-constant parameters")
    sig = dict(zip(["normalized_shape", "weight", "bias", "eps"], ctx.args[1:]), **ctx.kwargs)
    return layer_norm_rule(ctx, ctx.node.args[0], len(sig["normalized_shape"]), sig.get("eps", 1e-5),
                           sig.get("weight"), sig.get("bias"))
