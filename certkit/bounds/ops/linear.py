"""Linear (Gemm, MatMul by a constant), Conv, BatchNorm, and element-wise affine maps.

The element-wise affine maps are Add/Sub/Mul/Div with one constant operand."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from certkit.bounds.ops.base import Op, bias_sum, center_radius, short, sum_to
from certkit.bounds.ops.registry import Ctx, register


class _Weighted(Op):
    """Shared by Linear and Conv2d: an affine map with weights read live from a module, and
    optionally a BatchNorm folded in (``bn``), so bounding costs no extra pass for BN."""

    affine = True
    mixing = True

    def __init__(self, params: Callable[[], tuple[Tensor, Tensor | None]], module: torch.nn.Module | None = None):
        self.raw = params  # live: reads the module's current weights
        self.module = module
        self.bn: BatchNorm | None = None
        self._derived: dict[str, tuple[Tensor, Tensor, int, object]] = {}

    def _apply(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _from_weights(self, what: str, w: Tensor, make: Callable[[Tensor], object]) -> object:
        """``make(w)``, cached under ``what`` while w is the same tensor on the same memory (``.data``
        reassigned is new memory), unchanged in place (its version), and no gradient is needed
        (verification). The cache holds that memory, so no other tensor can take its address; a
        batch norm folded into fresh weights on every call misses."""
        if torch.is_grad_enabled():
            return make(w)
        hit = self._derived.get(what)
        if hit is None or hit[0] is not w or hit[1].data_ptr() != w.data_ptr() or hit[2] != w._version:
            hit = self._derived[what] = (w, w.detach(), w._version, make(w))
        return hit[3]

    def _abs(self, w: Tensor) -> Tensor:
        """|W| (cached: :meth:`_from_weights`)."""
        return self._from_weights("abs", w, torch.abs)

    def forward(self, x):
        y = self._apply(x, *self.raw())
        return y if self.bn is None else self.bn.forward(y)  # records train-mode BN statistics

    def num_params(self):
        w, b = self.raw()
        extra = 0 if self.bn is None else self.bn.num_params()
        return w.numel() + (0 if b is None else b.numel()) + extra


class Linear(_Weighted):
    """y = x W^T + b on the last dimension (nn.Linear, Gemm, MatMul by a constant).

    A folded batch norm (scale s, shift t) is applied on the output side, y·s + t: for a
    Linear the outputs are far smaller than the weight matrix.
    """

    kind = "linear"

    def _apply(self, x, w, b):
        return F.linear(x, w, b)

    def _output_affine(self) -> tuple[Tensor | None, Tensor | None]:
        """(scale, bias) applied after x W^T: the folded BN's s and b·s + t, or (None, b)."""
        _, b = self.raw()
        if self.bn is None:
            return None, b
        s, t = self.bn.channel_scale_shift()
        return s, (t if b is None else torch.addcmul(t, b, s))

    def interval(self, b_in):
        w, _ = self.raw()
        s, bias = self._output_affine()
        c, r = center_radius(b_in)
        c2, r2 = F.linear(c, w), F.linear(r, self._abs(w))
        if s is not None:
            c2, r2 = c2 * s, r2 * s.abs()
        if bias is not None:
            c2 = c2 + bias
        return c2 - r2, c2 + r2

    def backward(self, A, in_bounds, **kw):
        w, _ = self.raw()
        s, bias = self._output_affine()
        bias_term = None if bias is None else A.matmul(bias)
        if bias_term is not None and A.dim() > 3:  # the map applied along the last of several dims
            bias_term = bias_term.reshape(A.shape[0], A.shape[1], -1).sum(-1)
        return [(A if s is None else A * s).matmul(w)], bias_term

    def describe(self):
        w, _ = self.raw()
        return f"{w.shape[1]}→{w.shape[0]}" + (" +BN" if self.bn is not None else "")


# The adjoint's output channels (the convolution's input channels) up to which a strided adjoint
# runs as one convolution of the s² phase sub-kernels whose phases are then interleaved: for a
# kernel the stride divides, and (fewer) for one padded with zero taps to a multiple of it, whose
# sub-kernels hold (k/s rounded up)²·s²/k² times the taps. That convolution has s² times the
# output channels. One thread, 20–700 rows of 3–16²: on an image's 1–3 channels it is 2–4× faster
# than oneDNN's transposed convolution; against the channels-last one, 0.6–0.9× the time into 8
# and 16 channels (4×4 kernels) or 8 channels (3×3, 5×5), 1.05–1.3× into 16 (3×3) or 32 (4×4).
_PHASE_MAX_CHANNELS = 16
_PADDED_PHASE_MAX_CHANNELS = 8
# Input channels from which a strided transposed convolution runs on channels-last copies: oneDNN's
# kernel for the default layout is the slow one (32→16 channels, 3×3 stride 2, 1,000 rows of 8×8:
# 33 → 18 ms one thread, copies included; never slower measured from 16 channels).
_CHANNELS_LAST_FROM = 16


# Convolutions on a CPU small enough for PyTorch's own kernel (im2col and one matrix product per
# sample) rather than oneDNN's, which F.conv2d picks for kernels wider than 3 or several samples and
# which costs 50–90 µs however small the work (one thread): at most this many multiply-adds in all,
# in at most _NATIVE_MAX_SAMPLES samples (one with a stride: the im2col of a strided kernel is slow).
# Measured 0.25–0.76× the time where chosen (OVAL21's 4×4 stride-2 convolutions of one box: 0.5–0.7×;
# 2–8 rows of 2×2 and 3×3 adjoints), never slower.
_NATIVE_MAX_MACS = 1 << 20
_NATIVE_MAX_SAMPLES = 8


def conv2d(x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation=(1, 1), groups: int = 1) -> Tensor:
    """``F.conv2d`` (integer padding), by PyTorch's own kernel where oneDNN's fixed cost would
    dominate (``_NATIVE_MAX_MACS``); the same sums, in another order."""
    stride, padding = _pair(stride), _pair(padding)
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and groups == 1
            and _pair(dilation) == (1, 1) and x.dim() == 4):
        N, _, H, W = x.shape
        kh, kw = w.shape[2:]
        out = ((H + 2 * padding[0] - kh) // stride[0] + 1) * ((W + 2 * padding[1] - kw) // stride[1] + 1)
        if (N <= (1 if max(stride) > 1 else _NATIVE_MAX_SAMPLES)
                and N * out * w.shape[0] * w.shape[1] * kh * kw <= _NATIVE_MAX_MACS):
            return torch._C._nn.thnn_conv2d(x, w, [kh, kw], b, list(stride), list(padding))
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def adjoint_kernel(w: Tensor, stride, groups: int, dilation) -> Tensor | None:
    """The kernel :func:`conv2d_adjoint` convolves with on a CPU, which depends on the weights
    alone (so callers may cache it): the kernel flipped with its channels swapped (no stride),
    the phase sub-kernels (a stride, into few channels: ``_PHASE_MAX_CHANNELS``), or None (the
    transposed convolution takes w itself)."""
    if groups != 1 or w.device.type != "cpu":
        return None
    if tuple(stride) == (1, 1):
        return w.transpose(0, 1).flip(2, 3)
    if tuple(dilation) == (1, 1) and stride[0] == stride[1]:
        divides = all(k % stride[0] == 0 for k in w.shape[2:])
        if w.shape[1] <= (_PHASE_MAX_CHANNELS if divides else _PADDED_PHASE_MAX_CHANNELS):
            return _phase_kernels(w, stride[0])
    return None


def _phase_kernels(w: Tensor, s: int) -> Tensor:
    """The s² phase sub-kernels of w (c_in, c_out, kh, kw) padded with zero taps to a multiple of s,
    flipped, as the output channels (out, r_h, r_w) of one convolution; phases r ≥ k (a kernel
    narrower than the stride) hold no tap and are left out."""
    c_in, c_out, kh, kw = w.shape
    Lh, Lw = -(-kh // s), -(-kw // s)
    if (Lh * s, Lw * s) != (kh, kw):
        w = F.pad(w, (0, Lw * s - kw, 0, Lh * s - kh))
    nh, nw = min(s, kh), min(s, kw)
    sub = w.reshape(c_in, c_out, Lh, s, Lw, s)[:, :, :, :nh, :, :nw].permute(1, 3, 5, 0, 2, 4).flip(4, 5)
    return sub.reshape(c_out * nh * nw, c_in, Lh, Lw)


def conv2d_adjoint(A: Tensor, w: Tensor, stride, padding, output_padding, groups: int, dilation,
                   kernel: Tensor | None = None) -> Tensor:
    """The adjoint (transpose) of ``conv2d(·, w, stride, padding, dilation, groups)`` applied to A
    (N, C_out, H, W): ``conv_transpose2d(A, w, …)``, computed by the cheapest equivalent on a CPU.

    The backward pass of CROWN runs this on every row of coefficients; PyTorch's transposed
    convolution is the slow one of its convolutions on the small channel counts of verified
    networks. Without a stride it is a convolution with the kernel flipped and its in/out channels
    swapped, padded by d·(k−1)−p (2–4× faster on 8 channels, never slower measured). With a
    stride s, output position q·s + r sums the kernel taps r, r + s, …: one convolution with the
    s² sub-kernels as output channels, then phase r goes to every s-th position (what
    ``pixel_shuffle`` does) and the padding p is cut off; a kernel the stride does not divide first gets zero taps at
    its far end (they add nothing anywhere). Used where the result has few channels
    (``_PHASE_MAX_CHANNELS``), where it is faster. The same sums in another order: equal
    up to float rounding. ``kernel``: :func:`adjoint_kernel` of w, if the caller holds it."""
    if kernel is None:
        kernel = adjoint_kernel(w, stride, groups, dilation)
    if kernel is not None and A.device.type == "cpu":
        if tuple(stride) != (1, 1):
            return _strided_adjoint(A, kernel, w.shape, stride[0], padding, output_padding)
        pad = [d * (kk - 1) - p for d, kk, p in zip(dilation, w.shape[2:], padding)]
        if min(pad) >= 0:
            return conv2d(A, kernel, None, 1, pad, dilation)
    if tuple(stride) != (1, 1) and A.shape[1] >= _CHANNELS_LAST_FROM and groups == 1 and A.device.type == "cpu":
        A = A.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(A, w, None, stride, padding, output_padding, groups, dilation).contiguous()
    return F.conv_transpose2d(A, w, None, stride, padding, output_padding, groups, dilation)


def _strided_adjoint(A: Tensor, sub: Tensor, w_shape, s: int, padding, output_padding) -> Tensor:
    """``conv_transpose2d(A, w, stride=s, …)`` for w of shape ``w_shape``: one convolution with
    its phase sub-kernels ``sub`` (:func:`_phase_kernels`), then one gather that puts each phase at
    every s-th position of the result and cuts its padding (:func:`_interleave`: 1.2–1.7× faster
    than a strided copy per phase, 3–5× faster than ``pixel_shuffle`` and a crop). A kernel
    narrower than the stride (1×1 stride 2) leaves phases without a tap: they are not computed."""
    _, c_out, kh, kw = w_shape
    Lh, Lw = sub.shape[2:]
    phases = conv2d(A, sub, None, 1, (Lh - 1, Lw - 1))  # phase (r_h, r_w) of position (q_h·s + r_h, q_w·s + r_w)
    N, _, Qh, Qw = phases.shape
    H = (A.shape[2] - 1) * s - 2 * padding[0] + kh + output_padding[0]
    W = (A.shape[3] - 1) * s - 2 * padding[1] + kw + output_padding[1]
    index, unreached = _interleave(c_out, min(s, kh), min(s, kw), Qh, Qw, s, tuple(padding), H, W, A.device)
    out = phases.reshape(N, -1).index_select(1, index)
    if unreached is not None:  # positions no tap reaches (output padding, phases without a tap) are 0
        out.masked_fill_(unreached, 0)
    return out.view(N, c_out, H, W)


@functools.lru_cache(maxsize=256)
def _interleave(c_out: int, nh: int, nw: int, Qh: int, Qw: int, s: int, padding: tuple[int, int], H: int, W: int,
                device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Where each element (c, y, x) of a strided adjoint's result lies among the flattened phases
    (c, r_h, r_w, q_h, q_w) of :func:`_strided_adjoint`: y + p = q_h·s + r_h (likewise x). Positions
    that no phase reaches (r ≥ n, q ≥ Q) point at element 0, and are marked in a mask (None when
    there are none)."""
    y = torch.arange(H) + padding[0]
    x = torch.arange(W) + padding[1]
    r_h, q_h, r_w, q_w = y % s, y // s, x % s, x // s
    ok = ((r_h < nh) & (q_h < Qh))[:, None] & ((r_w < nw) & (q_w < Qw))[None, :]
    within = ((r_h * nw)[:, None] + r_w[None, :]) * (Qh * Qw) + (q_h * Qw)[:, None] + q_w[None, :]  # (H, W)
    index = torch.arange(c_out)[:, None, None] * (nh * nw * Qh * Qw) + torch.where(ok, within, 0)
    unreached = None if bool(ok.all()) else (~ok).expand(c_out, H, W).reshape(-1).to(device)
    return index.reshape(-1).to(device), unreached


class Conv2d(_Weighted):
    """2-D convolution with zero padding (any stride, dilation, groups). A folded batch norm
    is folded into the (small) kernel: W·s and b·s + t per output channel."""

    kind = "conv"

    def __init__(self, params: Callable[[], tuple[Tensor, Tensor | None]], stride, padding, dilation, groups,
                 in_shape: Sequence[int], module: torch.nn.Module | None = None):
        super().__init__(params, module)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shape = tuple(in_shape)

    def _apply(self, x, w, b):
        return conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _params(self) -> tuple[Tensor, Tensor | None]:
        w, b = self.raw()
        if self.bn is None:
            return w, b
        s, t = self.bn.channel_scale_shift()
        return w * s.reshape(-1, 1, 1, 1), (t if b is None else torch.addcmul(t, b, s))

    def interval(self, b_in):
        w, b = self._params()
        c, r = center_radius(b_in)
        c2 = self._apply(c, w, b)
        r2 = self._apply(r, self._abs(w) if self.bn is None else w.abs(), None)
        return c2 - r2, c2 + r2

    def backward(self, A, in_bounds, **kw):
        w, b = self._params()
        B, S = A.shape[:2]
        out = A.reshape(B * S, *A.shape[2:])
        h_out, w_out = out.shape[-2:]
        # output_padding recovers the input rows/cols that the stride skipped
        pad = tuple(
            self.in_shape[1 + d] - ((size - 1) * self.stride[d] - 2 * self.padding[d]
                                    + self.dilation[d] * (w.shape[2 + d] - 1) + 1)
            for d, size in enumerate((h_out, w_out)))
        A_in = self.adjoint(out, w, self.padding, pad)
        A_in = A_in.reshape(B, S, *A_in.shape[1:])
        bias = None if b is None else A.sum((-2, -1)).matmul(b)
        return [A_in], bias

    def adjoint(self, A: Tensor, w: Tensor, padding, output_padding) -> Tensor:
        """:func:`conv2d_adjoint` of A with this convolution's weights w (from :meth:`_params`) and
        its stride, under ``padding``, with the adjoint's kernel cached per weights."""
        kernel = self._from_weights("adjoint", w, lambda w: adjoint_kernel(w, self.stride, self.groups, self.dilation))
        return conv2d_adjoint(A, w, self.stride, padding, output_padding, self.groups, self.dilation, kernel)

    def describe(self):
        w, _ = self.raw()
        pair = lambda t: f"{t[0]}" if t[0] == t[1] else f"{t[0]}x{t[1]}"  # noqa: E731
        return (f"{w.shape[1] * self.groups}→{w.shape[0]} k{pair(w.shape[-2:])} s{pair(self.stride)} "
                f"p{pair(self.padding)}" + (f" g{self.groups}" if self.groups > 1 else "")
                + (" +BN" if self.bn is not None else ""))


class ElementwiseAffine(Op):
    """y = x * s + t with constant s, t broadcast over one sample (Add/Sub/Mul/Div by constants)."""

    kind = "affine"
    affine = True

    def __init__(self, scale: Tensor | None, shift: Tensor | None, in_shape: Sequence[int]):
        self.scale, self.shift = scale, shift
        self.in_shape = tuple(in_shape)

    def forward(self, x):
        y = x if self.scale is None else x * self.scale
        return y if self.shift is None else y + self.shift

    def interval(self, b_in):
        if self.scale is None:
            return self.forward(b_in[0]), self.forward(b_in[1])
        c, r = center_radius(b_in)
        c2 = self.forward(c)
        r2 = r * self.scale.abs()
        return c2 - r2, c2 + r2

    def backward(self, A, in_bounds, **kw):
        A_in = A if self.scale is None else A * self.scale
        bias = None if self.shift is None else bias_sum(A, self.shift)
        return [sum_to(A_in, self.in_shape)], bias

    def describe(self):
        parts = []
        if self.scale is not None:
            parts.append(f"* {short(self.scale)}")
        if self.shift is not None:
            parts.append(f"+ {short(self.shift)}")
        return " ".join(parts)




class BatchNorm(Op):
    """Batch norm as a per-channel affine map (channel dimension 1).

    Eval mode uses running statistics. Train mode uses the mean and biased variance of
    the clean batch recorded by the last ``forward`` (not detached: gradients flow
    through them), as the reference implementation of the fast-training paper does.
    """

    kind = "batchnorm"
    affine = True

    def __init__(self, module: torch.nn.modules.batchnorm._BatchNorm):
        self.module = module
        self.stats: tuple[Tensor, Tensor] | None = None

    def _shape(self, ndim: int) -> list[int]:
        return [-1] + [1] * (ndim - 2)

    def forward(self, x):
        m = self.module
        if m.training:
            dims = [0] + list(range(2, x.dim()))
            self.stats = (x.mean(dims), x.var(dims, unbiased=False))
        return m(x)

    def channel_scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel (scale, shift) of the affine map this batch norm currently applies."""
        m = self.module
        if m.training:
            if self.stats is None:
                raise RuntimeError("batch norm in train mode: run a clean forward pass before bounding")
            mean, var = self.stats
        else:
            mean, var = m.running_mean, m.running_var
        w = m.weight if m.affine else torch.ones_like(mean)
        b = m.bias if m.affine else torch.zeros_like(mean)
        scale = w / torch.sqrt(var + m.eps)
        return scale, b - mean * scale

    def scale_shift(self, ndim: int) -> tuple[Tensor, Tensor]:
        scale, shift = self.channel_scale_shift()
        return scale.reshape(self._shape(ndim)), shift.reshape(self._shape(ndim))

    def interval(self, b_in):
        s, t = self.scale_shift(b_in[0].dim())
        c, r = center_radius(b_in)
        c2 = c * s + t
        r2 = r * s.abs()
        return c2 - r2, c2 + r2

    def backward(self, A, in_bounds, **kw):
        s, t = self.scale_shift(A.dim() - 1)
        return [A * s], bias_sum(A, t)

    def describe(self):
        return f"{self.module.num_features} ch" + (" (train stats)" if self.module.training else "")

    def num_params(self):
        return sum(p.numel() for p in self.module.parameters())



def batchnorm_of(op: Op | None) -> BatchNorm | None:
    """The batch norm an operator applies (its own, or one folded into a Linear/Conv)."""
    if isinstance(op, BatchNorm):
        return op
    return getattr(op, "bn", None)


# ------------------------------------------------------------------ rules


@register(onnx=["Gemm"], fx=["Linear"])
def _linear_module(ctx: Ctx):
    mod = ctx.target
    return Linear(lambda m=mod: (m.weight, m.bias), module=mod), ctx.dyn


@register(fx=["linear"])
def _linear_function(ctx: Ctx):
    args = list(ctx.args) + [ctx.kwargs.get("bias")]
    if len(ctx.args) < 2 or ctx.dynamic(ctx.node.args[1:]) or ctx.dynamic(ctx.node.kwargs):
        ctx.unsupported("weights must be constant")
    w, b = args[1], args[2]
    return Linear(lambda w=w, b=b: (w, b)), ctx.dyn[:1]


def matmul_by_constant(ctx: Ctx):
    """x @ W with a constant matrix W: a Linear on the last axis."""
    w = ctx.args[1]
    if w.dim() != 2:
        ctx.unsupported(f"constant operand of shape {tuple(w.shape)}")
    wt = w.t().contiguous()
    return Linear(lambda wt=wt: (wt, None)), [ctx.node.args[0]]


@register(onnx=["Conv"], fx=["Conv2d"])
def _conv(ctx: Ctx):
    mod = ctx.target
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        ctx.unsupported(f"padding {mod.padding!r} mode {mod.padding_mode!r}")
    return Conv2d(lambda m=mod: (m.weight, m.bias), mod.stride, mod.padding, mod.dilation, mod.groups,
                  ctx.shape(ctx.x), module=mod), ctx.dyn


@register(onnx=["BatchNormalization"], fx=["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def _batchnorm(ctx: Ctx):
    if not isinstance(ctx.target, nn.modules.batchnorm._BatchNorm):
        ctx.unsupported("not a torch batch norm")
    if ctx.target.running_mean is None:
        ctx.unsupported("batch norm without running statistics")
    return BatchNorm(ctx.target), ctx.dyn


def affine_by_constant(ctx: Ctx, kind: str, x_first: bool):
    """x + c, x - c, c - x, x * c, x / c with a constant c (``x_first``: x is the first operand)."""
    x = ctx.node.args[0] if x_first else ctx.node.args[1]
    c = ctx.constant(ctx.args[1] if x_first else ctx.args[0])
    in_shape = ctx.shape(x)
    if kind == "add":
        return ElementwiseAffine(None, c, in_shape), [x]
    if kind == "sub" and x_first:
        return ElementwiseAffine(None, -c, in_shape), [x]
    if kind in ("sub", "rsub"):  # c - x (torch.rsub(x, c) is c - x too)
        return ElementwiseAffine(-torch.ones_like(c), c, in_shape), [x]
    if kind == "mul":
        return ElementwiseAffine(c, None, in_shape), [x]
    if kind == "div" and x_first:
        return ElementwiseAffine(1.0 / c, None, in_shape), [x]
    return None  # c / x: not affine
