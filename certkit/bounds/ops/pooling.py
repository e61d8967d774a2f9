"""AveragePool and MaxPool over (C, H, W) samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from certkit.bounds.ops.base import Monotone, adjoint
from certkit.bounds.ops.registry import Ctx, register


class AvgPool2d(Monotone):
    """Average pooling: a linear map with non-negative weights (monotone)."""

    kind = "avgpool"
    affine = True
    mixing = True

    def __init__(self, kernel_size, stride, padding, ceil_mode, count_include_pad, in_shape):
        self.args = (kernel_size, stride, padding, ceil_mode, count_include_pad)
        self.in_shape = tuple(in_shape)

    def forward(self, x):
        return F.avg_pool2d(x, *self.args)

    def backward(self, A, in_bounds, **kw):
        B, S = A.shape[:2]
        A_in = adjoint(self.forward, A.reshape(B * S, *A.shape[2:]), self.in_shape)
        return [A_in.reshape(B, S, *self.in_shape)], None

    def describe(self):
        return f"k{self.args[0]} s{self.args[1]} p{self.args[2]}"




class MaxPool2d(Monotone):
    """2-D max pooling (any kernel, stride, padding, dilation, ceil mode), optionally after a
    constant -inf padding ``pre_pad`` (left, right, top, bottom) as onnx2torch makes for
    asymmetric pads. IBP pools both ends (max is monotone).

    CROWN: per window, with j the element of largest lower bound, y >= x_j (the max is at
    least any element); y <= x_j too when l_j >= u_k for every other k (then y = x_j),
    otherwise y <= the window's largest upper bound (a constant). Windows are read through
    a fixed table of input positions (padding points at an extra -inf slot), so the rules
    are gathers and one scatter-add, with no loop over positions.
    """

    kind = "maxpool"

    def __init__(self, kernel_size, stride, padding, dilation, ceil_mode, in_shape: Sequence[int],
                 pre_pad: Sequence[int] = (0, 0, 0, 0)):
        pair = torch.nn.modules.utils._pair
        self.kernel, self.stride = pair(kernel_size), pair(stride if stride else kernel_size)
        self.padding, self.dilation, self.ceil_mode = pair(padding), pair(dilation), bool(ceil_mode)
        self.pre_pad = tuple(int(p) for p in pre_pad)
        self.in_shape = tuple(in_shape)
        C, H, W = self.in_shape
        # table (K, L): flat input position read by window element k of output l; H*W for padding
        pos = torch.arange(H * W, dtype=torch.float64).reshape(1, 1, H, W)
        pos = F.pad(pos, self.pre_pad, value=-1.0)
        out_h, out_w = self.forward(torch.zeros(1, *self.in_shape)).shape[-2:]
        pads = []
        for d, out in ((1, out_w), (0, out_h)):  # F.pad order: last dimension first
            size = pos.shape[2 + d]
            needed = (out - 1) * self.stride[d] + self.dilation[d] * (self.kernel[d] - 1) + 1
            pads += [self.padding[d], needed - size - self.padding[d]]  # negative crops unused rows
        pos = F.pad(pos, pads, value=-1.0)
        table = F.unfold(pos, self.kernel, self.dilation, 0, self.stride)[0]
        self.table = torch.where(table < 0, H * W, table).long()
        self.out_hw = (int(out_h), int(out_w))

    def forward(self, x):
        if any(self.pre_pad):
            x = F.pad(x, self.pre_pad, value=-math.inf)
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def _windows(self, v: Tensor) -> Tensor:
        """(N, C, K, L): the window elements of v (N, C, H, W), -inf at padding."""
        flat = v.flatten(2)
        flat = torch.cat([flat, flat.new_full((*flat.shape[:2], 1), -math.inf)], 2)
        return flat[:, :, self.table.to(v.device)]

    def backward(self, A, in_bounds, **kw):
        lo, up = in_bounds[0]
        B, S = A.shape[:2]
        C, H, W = self.in_shape
        table = self.table.to(A.device)
        lo_w, up_w = self._windows(lo), self._windows(up)
        lo_j, j = lo_w.max(2)  # (B, C, L)
        top = up_w.topk(min(2, up_w.shape[2]), dim=2)
        best_up = top.values[:, :, 0]
        if up_w.shape[2] > 1:  # largest upper bound among the elements other than j
            others = torch.where(top.indices[:, :, 0] == j, top.values[:, :, 1], best_up)
        else:
            others = torch.full_like(best_up, -math.inf)
        exact = lo_j >= others
        A = A.reshape(B, S, C, -1)
        neg = A.clamp(max=0)
        coef = torch.where(exact.unsqueeze(1), A, A.clamp(min=0))
        bias = (neg * torch.where(exact, 0, best_up).unsqueeze(1)).flatten(2).sum(-1)
        where = table[j, torch.arange(table.shape[1], device=A.device)].unsqueeze(1).expand(B, S, C, -1)
        A_in = A.new_zeros(B, S, C, H * W + 1).scatter_add_(3, where, coef)
        return [A_in[..., :H * W].reshape(B, S, *self.in_shape)], bias

    def describe(self):
        pair = lambda t: f"{t[0]}" if t[0] == t[1] else f"{t[0]}x{t[1]}"  # noqa: E731
        return (f"k{pair(self.kernel)} s{pair(self.stride)} p{pair(self.padding)}"
                + (f" d{pair(self.dilation)}" if self.dilation != (1, 1) else "")
                + (f" pre-pad {self.pre_pad}" if any(self.pre_pad) else "") + (" ceil" if self.ceil_mode else ""))




# ------------------------------------------------------------------ rules


def _is_onnx_padded_maxpool(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Sequential) and len(mod) == 2 and type(mod[0]).__name__ == "OnnxPadStatic"
            and isinstance(mod[1], nn.MaxPool2d) and mod[0].mode == "constant"
            and mod[0].constant_value == -math.inf and len(mod[0].pads) <= 4)


def _maxpool(ctx: Ctx, kernel_size, stride, padding, dilation, ceil_mode, return_indices, x: fx.Node,
             pre_pad=(0, 0, 0, 0)):
    """MaxPool2d on (channels, height, width) samples; pooling indices are not a bounded value."""
    if return_indices:
        ctx.unsupported("return_indices")
    in_shape = ctx.shape(x)
    if len(in_shape) != 3 or not ctx.implicit(x):
        ctx.unsupported(f"input of per-sample shape {in_shape}; expected (C, H, W)")
    pre_pad = (list(pre_pad) + [0, 0, 0, 0])[:4]
    op = MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode, in_shape, pre_pad)
    if (op.table == in_shape[1] * in_shape[2]).all(0).any():
        ctx.unsupported("a pooling window lies entirely in the padding (output -inf)")
    return op, [x]


@register(onnx=["MaxPool"], fx=["MaxPool2d", "Sequential", "max_pool2d"])
def _maxpool_rule(ctx: Ctx):
    mod = ctx.target
    if isinstance(mod, nn.MaxPool2d):
        return _maxpool(ctx, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
                        mod.return_indices, ctx.x)
    if _is_onnx_padded_maxpool(mod):
        pad, pool = mod  # onnx2torch's asymmetric MaxPool padding: -inf Pad, then MaxPool2d
        return _maxpool(ctx, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                        pool.return_indices, ctx.x, pre_pad=pad.pads)
    if mod is F.max_pool2d:
        sig = dict(zip(["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
                       ctx.args[1:]), **ctx.kwargs)
        return _maxpool(ctx, sig["kernel_size"], sig.get("stride"), sig.get("padding", 0), sig.get("dilation", 1),
                        sig.get("ceil_mode", False), sig.get("return_indices", False), ctx.node.args[0])
    ctx.unsupported()


@register(onnx=["AveragePool"], fx=["AvgPool2d", "avg_pool2d"])
def _avgpool(ctx: Ctx):
    if isinstance(ctx.target, nn.AvgPool2d):
        mod = ctx.target
        if mod.divisor_override is not None:
            ctx.unsupported("divisor_override")
        return AvgPool2d(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                         ctx.shape(ctx.x)), ctx.dyn
    if ctx.target is not F.avg_pool2d:
        ctx.unsupported()
    x = ctx.node.args[0]
    sig = dict(zip(["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"], ctx.args[1:]),
               **ctx.kwargs)
    k = sig["kernel_size"]
    return AvgPool2d(k, sig.get("stride") or k, sig.get("padding", 0), sig.get("ceil_mode", False),
                     sig.get("count_include_pad", True), ctx.shape(x)), [x]
