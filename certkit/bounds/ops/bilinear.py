"""Products of two bounded tensors: Mul, Div and MatMul of two activations."""

from __future__ import annotations

import torch.fx as fx

from certkit.bounds.ops.registry import Ctx


def product(ctx: Ctx, a: fx.Node, b: fx.Node):
    """Element-wise a * b of two bounded tensors."""
    ctx.unsupported("product of two non-constant tensors")


def quotient(ctx: Ctx, a: fx.Node, b: fx.Node):
    """Element-wise a / b of two bounded tensors."""
    ctx.unsupported("quotient of two non-constant tensors")


def matmul(ctx: Ctx, a: fx.Node, b: fx.Node):
    """a @ b of two bounded tensors."""
    ctx.unsupported("product of two non-constant matrices")


def constant_matmul(ctx: Ctx, w, x: fx.Node):
    """W @ x with a constant W."""
    ctx.unsupported("only x @ W with a constant matrix W is supported")
