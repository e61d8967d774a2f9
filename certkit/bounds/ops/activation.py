"""ReLU, Sigmoid and Tanh, with their α-CROWN relaxations (and SiLU built on Sigmoid)."""

from __future__ import annotations

import torch
from torch import Tensor

from certkit.bounds.ops.base import Activation, clamp01
from certkit.bounds.ops.registry import Ctx, register


def triangle_upper(lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """The ReLU's upper line on [l, u], slope and intercept: for an unstable neuron (l < 0 < u)
    the triangle relaxation's u/(u − l) and −l·u/(u − l) (the intercept is the relaxation's
    largest gap, which branching and the MILP refinement weigh); for a stable one the exact
    line (1, 0 active; 0, 0 inactive)."""
    return _upper_line(lo, up, (lo < 0) & (up > 0), ReLU.default_alpha(lo, up))


def _upper_line(lo: Tensor, up: Tensor, unstable: Tensor, adaptive: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`triangle_upper` with the masks the caller already holds (the ReLU rule's hot path);
    ``adaptive`` (:meth:`ReLU.default_alpha`) is a stable neuron's exact slope. The ratio divides
    by 1 where unused: a 0/0 there would give NaN gradients through the ``where``."""
    slope = torch.where(unstable, up / torch.where(unstable, up - lo, 1.0), adaptive)
    return slope, torch.where(unstable, -(slope * lo), 0.0)


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
        """CROWN's adaptive lower slope (1 if u >= -l else 0), which is also the exact slope of a
        stable neuron: 1 when l >= 0, 0 when u <= 0 < -l (and 0 for NaN bounds)."""
        return (up >= -lo).to(lo.dtype)

    def relax(self, lo, up, alpha=None):
        unstable = (lo < 0) & (up > 0)
        adaptive = self.default_alpha(lo, up)
        a_u, b_u = _upper_line(lo, up, unstable, adaptive)
        a_l = adaptive if alpha is None else torch.where(unstable, clamp01(alpha), adaptive)
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
            t_u, t_l = clamp01(alpha.double()).unbind(-1)
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




# ------------------------------------------------------------------ rules


@register(onnx=["Relu"], fx=["ReLU", "relu"])
def _relu(ctx: Ctx):
    return ReLU(), ctx.dyn


@register(onnx=["Sigmoid"], fx=["Sigmoid", "sigmoid"])
def _sigmoid(ctx: Ctx):
    return Sigmoid(), ctx.dyn


@register(onnx=["Tanh"], fx=["Tanh", "tanh"])
def _tanh(ctx: Ctx):
    return Tanh(), ctx.dyn


@register(fx=["SiLU", "silu"])
def _silu(ctx: Ctx):
    """SiLU / swish, x · σ(x): a Sigmoid node, then the product of x with it (ONNX exports
    already spell it Sigmoid and Mul)."""
    from certkit.bounds.ops.bilinear import Product

    x = ctx.node.args[0]
    shape = ctx.shape(x)
    return Product(shape, shape), [x, ctx.emit(Sigmoid(), [x], shape)]
