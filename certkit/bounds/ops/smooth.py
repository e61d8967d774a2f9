"""Smooth element-wise functions."""

from __future__ import annotations

import torch.fx as fx

from certkit.bounds.ops.registry import Ctx


def constant_over(ctx: Ctx, c, x: fx.Node):
    """c / x with a constant c."""
    ctx.unsupported("division by a non-constant tensor")
