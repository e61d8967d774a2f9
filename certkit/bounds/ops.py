"""Per-operator bound rules: one class per node kind, each in one place.

Every operator knows three things about itself:

- ``forward(*xs)``: the concrete computation (batched, first dimension is the batch);
- ``interval(*bounds)``: the IBP rule, mapping input intervals ``(l, u)`` to an output
  interval that contains every output reachable from inputs inside the boxes;
- ``backward(A, in_bounds, ...)``: the CROWN rule. Given a linear function ``A · out``
  (``A`` of shape ``(B, S, *out_shape)``, S the number of specifications), return the
  coefficient tensors on each bounded input and a bias ``(B, S)`` such that
  ``A · out >= sum_i A_i · in_i + bias`` for every input inside its box (a sound *lower*
  bound; upper bounds are lower bounds of ``-A``).

Affine operators (``affine = True``) satisfy the backward inequality with equality.
``mixing`` marks affine operators that combine several input coordinates into one
output (Linear, Conv, AvgPool); chains with at most one of them are bounded exactly by
IBP, which lets full CROWN skip them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Interval = tuple[Tensor, Tensor]


def _center_radius(b: Interval) -> tuple[Tensor, Tensor]:
    lo, up = b
    return torch.lerp(lo, up, 0.5), (up - lo) * 0.5


def _sum_to(A: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum ``A`` (B, S, *broadcast_shape) down to (B, S, *shape) (undo broadcasting)."""
    target = (A.shape[0], A.shape[1], *shape)
    if tuple(A.shape) == target:
        return A
    return A.sum_to_size(target)


def _batched_dot(A: Tensor, v: Tensor) -> Tensor:
    """Σ over one sample's elements of A (B, S, *shape) times v (B or 1, 1 or S, *shape): (B, S)
    (v has S rows when α-CROWN gives each row its own relaxation)."""
    B, S = A.shape[:2]
    if v.shape[1] != 1:
        return (A * v).flatten(2).sum(-1)
    v = v.expand(B, 1, *v.shape[2:]).reshape(B, -1, 1)
    return torch.bmm(A.reshape(B, S, -1), v).squeeze(-1)


def _bias_sum(A: Tensor, t: Tensor) -> Tensor:
    """sum over all non-(B, S) dims of ``A * t`` with t broadcast to one sample."""
    return (A * t).flatten(2).sum(-1)


class Op:
    """Base class of the node kinds."""

    kind = "op"
    affine = False
    mixing = False

    def forward(self, *xs: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def interval(self, *bounds: Interval) -> Interval:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, A: Tensor, in_bounds: Sequence[Interval], **kw) -> tuple[list[Tensor], Tensor | None]:
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> str:
        return ""

    def num_params(self) -> int:
        return 0


# --------------------------------------------------------------------------- affine


class _Weighted(Op):
    """Shared by Linear and Conv2d: an affine map with weights read live from a module, and
    optionally a BatchNorm folded in (``bn``), so bounding costs no extra pass for BN."""

    affine = True
    mixing = True

    def __init__(self, params: Callable[[], tuple[Tensor, Tensor | None]], module: torch.nn.Module | None = None):
        self.raw = params  # live: reads the module's current weights
        self.module = module
        self.bn: BatchNorm | None = None
        self._abs_cache: tuple[tuple, Tensor] | None = None

    def _apply(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _abs(self, w: Tensor) -> Tensor:
        """|W|, cached while the weights are unchanged and no gradient is needed (verification)."""
        if torch.is_grad_enabled():
            return w.abs()
        key = (w.data_ptr(), w._version, w.shape, w.device)
        if self._abs_cache is None or self._abs_cache[0] != key:
            self._abs_cache = (key, w.abs())
        return self._abs_cache[1]

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
        c, r = _center_radius(b_in)
        c2, r2 = F.linear(c, w), F.linear(r, self._abs(w))
        if s is not None:
            c2, r2 = c2 * s, r2 * s.abs()
        if bias is not None:
            c2 = c2 + bias
        return c2 - r2, c2 + r2

    def backward(self, A, in_bounds, **kw):
        w, _ = self.raw()
        s, bias = self._output_affine()
        bias_term = None if bias is None else A.matmul(bias).reshape(A.shape[0], A.shape[1], -1).sum(-1)
        return [(A if s is None else A * s).matmul(w)], bias_term

    def describe(self):
        w, _ = self.raw()
        return f"{w.shape[1]}→{w.shape[0]}" + (" +BN" if self.bn is not None else "")


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
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _params(self) -> tuple[Tensor, Tensor | None]:
        w, b = self.raw()
        if self.bn is None:
            return w, b
        s, t = self.bn.channel_scale_shift()
        return w * s.reshape(-1, 1, 1, 1), (t if b is None else torch.addcmul(t, b, s))

    def interval(self, b_in):
        w, b = self._params()
        c, r = _center_radius(b_in)
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
        A_in = F.conv_transpose2d(out, w, None, self.stride, self.padding, pad, self.groups, self.dilation)
        A_in = A_in.reshape(B, S, *A_in.shape[1:])
        bias = None if b is None else A.sum((-2, -1)).matmul(b)
        return [A_in], bias

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
        c, r = _center_radius(b_in)
        c2 = self.forward(c)
        r2 = r * self.scale.abs()
        return c2 - r2, c2 + r2

    def backward(self, A, in_bounds, **kw):
        A_in = A if self.scale is None else A * self.scale
        bias = None if self.shift is None else _bias_sum(A, self.shift)
        return [_sum_to(A_in, self.in_shape)], bias

    def describe(self):
        parts = []
        if self.scale is not None:
            parts.append(f"* {_short(self.scale)}")
        if self.shift is not None:
            parts.append(f"+ {_short(self.shift)}")
        return " ".join(parts)


def _dims(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


def _short(t: Tensor) -> str:
    return f"{t.item():.4g}" if t.numel() == 1 else f"tensor{tuple(t.shape)}"


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
        c, r = _center_radius(b_in)
        c2 = c * s + t
        r2 = r * s.abs()
        return c2 - r2, c2 + r2

    def backward(self, A, in_bounds, **kw):
        s, t = self.scale_shift(A.dim() - 1)
        return [A * s], _bias_sum(A, t)

    def describe(self):
        return f"{self.module.num_features} ch" + (" (train stats)" if self.module.training else "")

    def num_params(self):
        return sum(p.numel() for p in self.module.parameters())


class Monotone(Op):
    """An operator that is monotone in its input: its IBP rule applies it to both ends."""

    def interval(self, b_in):
        return self.forward(b_in[0]), self.forward(b_in[1])


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
        return f"{_dims(self.in_shape)}→{_dims(self.out_shape)}"


class Permute(Monotone):
    """Transpose / Permute of the per-sample dimensions (the batch dimension stays first)."""

    kind = "permute"
    affine = True

    def __init__(self, perm: Sequence[int]):
        self.perm = tuple(perm)  # includes the batch dim, perm[0] == 0
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        self.inv = tuple(inv)

    def forward(self, x):
        return x.permute(self.perm)

    def backward(self, A, in_bounds, **kw):
        return [A.permute(0, 1, *(i + 1 for i in self.inv[1:]))], None

    def describe(self):
        return f"perm {self.perm}"


class Concat(Op):
    """Concatenation of bounded tensors along a per-sample dimension."""

    kind = "concat"
    affine = True

    def __init__(self, dim: int, sizes: Sequence[int]):
        self.dim = dim  # >= 1, in batched coordinates
        self.sizes = list(sizes)

    def forward(self, *xs):
        return torch.cat(xs, self.dim)

    def interval(self, *bs):
        return torch.cat([b[0] for b in bs], self.dim), torch.cat([b[1] for b in bs], self.dim)

    def backward(self, A, in_bounds, **kw):
        return list(torch.split(A, self.sizes, self.dim + 1)), None

    def describe(self):
        return f"dim {self.dim}"


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
        flat = A.reshape(B * S, *A.shape[2:])
        zeros = flat.new_zeros(B * S, *self.in_shape)
        _, vjp = torch.func.vjp(self.forward, zeros)
        (A_in,) = vjp(flat)
        return [A_in.reshape(B, S, *self.in_shape)], None

    def describe(self):
        return f"k{self.args[0]} s{self.args[1]} p{self.args[2]}"


class Add(Op):
    """Sum of two bounded tensors (residual connections)."""

    kind = "add"
    affine = True

    def __init__(self, in_shapes: Sequence[Sequence[int]], sign: float = 1.0):
        self.in_shapes = [tuple(s) for s in in_shapes]
        self.sign = sign

    def forward(self, x, y):
        return x + y if self.sign > 0 else x - y

    def interval(self, bx, by):
        if self.sign > 0:
            return bx[0] + by[0], bx[1] + by[1]
        return bx[0] - by[1], bx[1] - by[0]

    def backward(self, A, in_bounds, **kw):
        Ay = A if self.sign > 0 else -A
        return [_sum_to(A, self.in_shapes[0]), _sum_to(Ay, self.in_shapes[1])], None


class Sub(Add):
    """Difference of two bounded tensors."""

    kind = "sub"

    def __init__(self, in_shapes):
        super().__init__(in_shapes, sign=-1.0)


# ----------------------------------------------------------------------- nonlinear


def _clamp01(alpha: Tensor) -> Tensor:
    """α clamped to [0, 1] (sound) with the gradient passed straight through (clamp's is 0 at
    0 and 1, where an optimiser would stick)."""
    return alpha + (alpha.clamp(0, 1) - alpha).detach()


class Activation(Monotone):
    """An element-wise nonlinearity bounded by two lines per neuron.

    Subclasses give a monotone ``fn`` and ``relax(l, u, alpha) -> (a_l, b_l, a_u, b_u)`` with
    ``a_l h + b_l <= fn(h) <= a_u h + b_u`` for all h in [l, u]. ``alpha`` (any values: they are
    clamped to [0, 1]) chooses among sound lines, per neuron and specification row; α-CROWN
    optimises it, starting from ``default_alpha(l, u)``, CROWN's choice.
    """

    def fn(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        return self.fn(x)

    @staticmethod
    def default_alpha(lo: Tensor, up: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def relax(self, lo: Tensor, up: Tensor, alpha: Tensor | None = None):
        raise NotImplementedError  # pragma: no cover - abstract

    def backward(self, A, in_bounds, alpha: Tensor | None = None, **kw):
        lo, up = in_bounds[0]
        a_l, b_l, a_u, b_u = self.relax(lo.unsqueeze(1), up.unsqueeze(1), alpha)
        positive = A >= 0  # positive coefficients take the lower line, negative the upper line
        A_in = A * torch.where(positive, a_l, a_u)
        bias = _batched_dot(A.clamp(max=0), b_u)
        if b_l is not None:
            bias = bias + _batched_dot(A.clamp(min=0), b_l)
        return [A_in], bias


class ReLU(Activation):
    """ReLU with CROWN's triangle relaxation.

    Unstable neurons (l < 0 < u): upper line u/(u-l)·(h - l); lower line a·h with a in
    [0, 1]: the adaptive choice (1 if u >= -l else 0) unless ``alpha`` gives a
    (α-CROWN optimises it). Stable neurons are exact.
    """

    kind = "relu"

    def fn(self, x):
        return torch.relu(x)

    @staticmethod
    def default_alpha(lo: Tensor, up: Tensor) -> Tensor:
        return (up >= -lo).to(lo.dtype)

    def relax(self, lo, up, alpha=None):
        active = lo >= 0
        unstable = (lo < 0) & (up > 0)
        denom = torch.where(unstable, up - lo, torch.ones_like(up))
        a_u = torch.where(unstable, up / denom, active.to(up.dtype))
        b_u = torch.where(unstable, -a_u * lo, torch.zeros_like(lo))
        slope = self.default_alpha(lo, up) if alpha is None else _clamp01(alpha)
        a_l = torch.where(unstable, slope, active.to(lo.dtype))
        return a_l, None, a_u, b_u



class SShaped(Activation):
    """An increasing S-shaped function: convex on h <= 0, concave on h >= 0, with a derivative
    that is even and decreasing in |h|, and odd about its centre (f(h) + f(-h) = ``centre_sum``).

    CROWN's rules, per neuron on [l, u]. Upper line: the chord when it lies above f (u <= 0,
    or l < 0 < u with chord slope <= f'(u)), the tangent at the midpoint when l >= 0,
    otherwise the tangent at the point d in [0, u] whose tangent passes through (l, f(l)),
    found by bisection and rounded up (a tangent at any d' >= d stays above f). The lower
    line is the upper line of the reflected function on [-u, -l]. α = (t_upper, t_lower)
    (last dimension) moves the tangent points where a tangent is used: to l + t·(u − l) when
    l >= 0 (f is concave there, every tangent lies above it) and to d + t·(u − d) when the
    interval straddles 0 (φ(x) = f(x) + f'(x)(l − x) − f(l) increases on x > 0, so the
    tangent at any point past d still passes above (l, f(l)), and above f on [l, u]). Narrow intervals
    (float rounding would dominate a chord) take the slope f'(midpoint) through the worst
    end points, sound by monotonicity alone. Lines are computed in float64 and loosened by
    a few units of rounding of the caller's dtype so they stay sound after the cast.
    """

    centre_sum = 0.0
    bisection_steps = 24

    def deriv(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def default_alpha(lo: Tensor, up: Tensor) -> Tensor:
        """CROWN's tangent points: the midpoint when l >= 0 (t = 1/2), d when l < 0 (t = 0);
        for the lower line the same on the reflected interval [-u, -l]."""
        half = torch.full_like(lo, 0.5)
        return torch.stack([torch.where(lo >= 0, half, 0 * half), torch.where(up <= 0, half, 0 * half)], -1)

    def _upper(self, lo: Tensor, up: Tensor, t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(slope, intercept) of a line above f on [lo, up] (float64 tensors, lo <= up), with
        tangent positions ``t`` in [0, 1] (see the class; None: CROWN's)."""
        f, df = self.fn, self.deriv
        f_lo, f_up = f(lo), f(up)
        width = up - lo
        narrow = width <= 1e-6 * (1 + lo.abs() + up.abs())
        chord = (f_up - f_lo) / torch.where(narrow, torch.ones_like(width), width)
        straddle = (lo < 0) & (up > 0)
        use_chord = (up <= 0) | (straddle & (chord <= df(up)))
        with torch.no_grad():  # tangent point for the straddling case: smallest d with phi(d) >= 0
            a, b = torch.zeros_like(up), up.clone()
            for _ in range(self.bisection_steps):
                mid = (a + b) / 2
                ok = f(mid) + df(mid) * (lo - mid) >= f_lo
                a, b = torch.where(ok, a, mid), torch.where(ok, mid, b)
        if t is None:
            d = torch.where(straddle, b, (lo + up) / 2)  # l >= 0: the midpoint's tangent
        else:
            d = torch.where(straddle, b + t * (up - b), lo + t * (up - lo))
        tan_slope = df(d)
        slope = torch.where(use_chord, chord, tan_slope)
        icpt = torch.where(use_chord, f_lo - chord * lo, f(d) - tan_slope * d)
        mid_slope = df((lo + up) / 2)
        slope = torch.where(narrow, mid_slope, slope)
        icpt = torch.where(narrow, f_up - mid_slope * lo, icpt)
        return slope, icpt

    def interval(self, b_in):
        # widened by a few ulps: vectorised and scalar code paths of tanh/sigmoid differ by one
        lo, up = self.fn(b_in[0]), self.fn(b_in[1])
        eps = 4 * torch.finfo(lo.dtype).eps
        return lo - eps * lo.abs(), up + eps * up.abs()

    def relax(self, lo, up, alpha=None):
        dtype = lo.dtype
        lo64, up64 = lo.double(), up.double()
        t_u = t_l = None
        if alpha is not None:
            t_u, t_l = _clamp01(alpha.double()).unbind(-1)
        a_u, b_u = self._upper(lo64, up64, t_u)
        a_l, b_l = self._upper(-up64, -lo64, t_l)  # f(h) = c - f(-h) >= c - (a·(-h) + b)
        b_l = self.centre_sum - b_l
        # rounding allowance for the cast back and for evaluating the lines in ``dtype``
        scale = 8 * torch.finfo(dtype).eps
        reach = torch.maximum(lo64.abs(), up64.abs())
        b_u = b_u + scale * (1 + b_u.abs() + a_u.abs() * reach)
        b_l = b_l - scale * (1 + b_l.abs() + a_l.abs() * reach)
        return a_l.to(dtype), b_l.to(dtype), a_u.to(dtype), b_u.to(dtype)


class Sigmoid(SShaped):
    """The logistic function 1 / (1 + e^-h)."""

    kind = "sigmoid"
    centre_sum = 1.0

    def fn(self, x):
        return torch.sigmoid(x)

    def deriv(self, x):
        s = torch.sigmoid(x)
        return s * (1 - s)


class Tanh(SShaped):
    """The hyperbolic tangent."""

    kind = "tanh"

    def fn(self, x):
        return torch.tanh(x)

    def deriv(self, x):
        return 1 - torch.tanh(x) ** 2


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
        bias = None if self.value == 0 else self.value * _bias_sum(A, self.mask.to(A))
        return [A_in], bias

    def describe(self):
        return f"pads {self.pads} value {self.value:g}"

def batchnorm_of(op: Op | None) -> BatchNorm | None:
    """The batch norm an operator applies (its own, or one folded into a Linear/Conv)."""
    if isinstance(op, BatchNorm):
        return op
    return getattr(op, "bn", None)
