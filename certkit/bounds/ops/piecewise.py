"""LeakyReLU, PReLU, Clip, HardSigmoid, HardSwish, Abs, Neg, Sign, element-wise Max / Min.

Piecewise-linear and sign-like element-wise operators; Clip covers ReLU6, Hardtanh and clamp.

The continuous ones share one relaxation (:class:`Kinked`). For a continuous function that is
linear between its kinks (and, for HardSwish, convex between them), the maximum and minimum of
``f(h) - a·h`` over ``[l, u]`` are attained at a few known points: the ends, the kinks inside,
and for HardSwish the parabola's stationary point. So for *any* slope ``a`` the lines
``a·h + max_p (f(p) - a·p)`` and ``a·h + min_p (f(p) - a·p)`` are sound (they touch f's
hull): soundness never depends on how the slope was chosen. CROWN's slope is the one of least
area between line and f (the tangent of f's concave / convex envelope at the interval's
midpoint: the chord for the convex side, ReLU's adaptive 0/1 choice for the other), α-CROWN's
moves each slope over the range of f's slopes on ``[l, u]``. Max / Min of two bounded tensors
are built from a ReLU of their difference (``max(x, y) = y + relu(x - y)``), which gives them
CROWN bounds on the difference and α for free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from certkit.bounds.ops.activation import ReLU
from certkit.bounds.ops.arithmetic import Add, Sub
from certkit.bounds.ops.base import Activation, clamp01, relax_elementwise, short
from certkit.bounds.ops.linear import ElementwiseAffine
from certkit.bounds.ops.registry import Alias, Ctx, register

Lines = tuple[Tensor, Tensor, Tensor, Tensor]


def nan_kept(v: Tensor, *bounds: Tensor) -> Tensor:
    """``v`` with NaN wherever a bound is NaN (torch.sign(nan) is 0, clamp's min/max may drop it)."""
    bad = torch.zeros_like(v, dtype=torch.bool)
    for b in bounds:
        bad = bad | torch.isnan(b)
    return torch.where(bad, torch.full_like(v, float("nan")), v)


def clamp_into(k: Tensor, lo: Tensor, up: Tensor) -> Tensor:
    """``k`` clamped into ``[lo, up]`` (broadcast; NaN bounds propagate)."""
    return torch.minimum(torch.maximum(k, lo), up)


def as_t(v: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


def representable(a: Tensor, dtype: torch.dtype, up: Tensor, down: Tensor) -> Tensor:
    """The float64 slopes ``a`` rounded to values of ``dtype``: upwards where ``up``, downwards
    where ``down``, to nearest elsewhere (the gradient passes straight through). Intercepts are
    then computed for the rounded slope, so casting the lines back moves no slope."""
    near = a.to(dtype)
    step_up = torch.where(up & (near.double() < a), torch.nextafter(near, torch.full_like(near, float("inf"))), near)
    rounded = torch.where(down & (step_up.double() > a), torch.nextafter(step_up, torch.full_like(near, -float("inf"))),
                          step_up)
    return a + (rounded.double() - a).detach()


class Kinked(Activation):
    """A continuous element-wise function, linear on each piece between its kinks
    ``k_1 <= ... <= k_K`` (slopes ``s_0 .. s_K``, per element or shared), relaxed by lines
    through its hull.

    Relaxation, per neuron on [l, u]: for a slope a, the upper line is
    ``a·h + max_p (f(p) - a·p)`` and the lower ``a·h + min_p (f(p) - a·p)`` with p over the
    end points and the kinks clamped into [l, u]. Sound for every a, because ``f(h) - a·h``
    is continuous and linear between those points, so its extremes on [l, u] are among
    them. CROWN's slopes minimise the area between line and f: the chord of the two vertices
    around the midpoint on the envelope (chord of a convex f for the upper line; ReLU's
    adaptive 0/1 for the lower). α = (t_upper, t_lower) in [0, 1] sets each slope to
    ``s_lo + t (s_hi - s_lo)``, the range of f's slopes on [l, u]. Infinite ends: the
    offset at ``±inf`` is the asymptote's intercept when a equals the outer slope, ±inf
    otherwise (a loose but sound line); CROWN picks the outer slope there. Degenerate
    intervals are exact. Lines are computed in float64 and loosened for the caller's dtype.
    IBP: min and max of f over the same points, in the caller's dtype (exact).
    """

    tunable = True

    # -------------------------------------------------------- the function

    def kinks(self, like: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def slopes(self, like: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        """``K + 1`` piece slopes (broadcastable to one sample)."""
        raise NotImplementedError

    def tails(self, like: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(slope, intercept) of the lines f equals near -inf and near +inf."""
        ks, ss = self.kinks(like), self.slopes(like)
        if not ks:
            zero = torch.zeros((), dtype=like.dtype, device=like.device)
            c = self.fn(zero)
            return (ss[0], c), (ss[0], c)
        return (ss[0], self.fn(ks[0]) - ss[0] * ks[0]), (ss[-1], self.fn(ks[-1]) - ss[-1] * ks[-1])

    def slope_range(self, lo: Tensor, up: Tensor, pts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The least and greatest slope of f on [lo, up] (the slope at lo when lo == up)."""
        ss = self.slopes(lo)
        s_lo = torch.full_like(lo, float("inf"))
        s_hi = torch.full_like(lo, -float("inf"))
        at_lo = torch.zeros_like(lo) + ss[0]
        for j, (s, k) in enumerate(zip(ss, [None, *self.kinks(lo)])):
            present = pts[j + 1] > pts[j]
            s_lo = torch.where(present, torch.minimum(s_lo, s + 0 * lo), s_lo)
            s_hi = torch.where(present, torch.maximum(s_hi, s + 0 * lo), s_hi)
            if k is not None:
                at_lo = torch.where(lo >= k, s + 0 * lo, at_lo)
        none = s_lo > s_hi
        return torch.where(none, at_lo, s_lo), torch.where(none, at_lo, s_hi)

    def extra_points(self, lo: Tensor, up: Tensor, a: Tensor, upper: bool) -> list[Tensor]:
        """Points of [lo, up] besides the vertices where ``f(h) - a·h`` may be extreme."""
        return []

    def extra_slopes(self, lo: Tensor, up: Tensor, upper: bool) -> list[Tensor]:
        """Candidate slopes for CROWN's choice besides the chords between vertices."""
        return []

    # -------------------------------------------------------- relaxation

    def vertices(self, lo: Tensor, up: Tensor) -> list[Tensor]:
        return [lo, *(clamp_into(k, lo, up) for k in self.kinks(lo)), up]

    def _value(self, p: Tensor, tails) -> Tensor:
        """f(p), with its limit where p is infinite (the forward may give NaN there: inf·0)."""
        inf = torch.isinf(p)
        (s_m, c_m), (s_p, c_p) = tails
        s = torch.where(p > 0, s_p, s_m)
        limit = torch.where(s == 0, torch.where(p > 0, c_p, c_m), s * p)
        return torch.where(inf, limit, self.fn(torch.where(inf, torch.zeros_like(p), p)))

    def interval(self, b_in):
        lo, up = b_in
        tails = self.tails(lo)
        vals = torch.stack(torch.broadcast_tensors(*(self._value(p, tails) for p in self.vertices(lo, up))))
        return nan_kept(vals.amin(0), lo, up), nan_kept(vals.amax(0), lo, up)

    def _offset(self, p: Tensor, a: Tensor, tails) -> Tensor:
        """``f(p) - a·p``, with its limit where p is infinite (no inf - inf, no NaN gradient)."""
        inf = torch.isinf(p)
        p0 = torch.where(inf, torch.zeros_like(p), p)  # NaN stays NaN
        finite = self.fn(p0) - a * p0
        (s_m, c_m), (s_p, c_p) = tails
        s = torch.where(p > 0, s_p, s_m)
        c = torch.where(p > 0, c_p, c_m)
        with torch.no_grad():
            away = torch.where((s - a) * torch.sign(p) > 0, float("inf"), -float("inf"))
        limit = torch.where(s == a, c + 0 * a, away)
        return torch.where(inf, limit, finite)

    def _intercept(self, lo, up, pts, a, upper: bool, tails) -> Tensor:
        offs = [self._offset(p, a, tails) for p in pts + self.extra_points(lo, up, a, upper)]
        stacked = torch.stack(torch.broadcast_tensors(*offs))
        return stacked.amax(0) if upper else stacked.amin(0)

    def _crown_slopes(self, lo: Tensor, up: Tensor, pts: list[Tensor], s_lo: Tensor, tails) -> tuple[Tensor, Tensor]:
        """CROWN's (upper, lower) slopes: of the candidates, the line lowest (highest) at the
        midpoint; at an infinite end the asymptote's slope."""
        with torch.no_grad():
            finite = torch.isfinite(lo) & torch.isfinite(up)
            zero = torch.zeros_like(lo)
            lo_f, up_f = torch.where(finite, lo, zero), torch.where(finite, up, zero)
            pts_f = self.vertices(lo_f, up_f)
            vals = [self.fn(p) for p in pts_f]
            cands = []
            for i in range(len(pts_f)):
                for j in range(i + 1, len(pts_f)):
                    den = pts_f[j] - pts_f[i]
                    ok = den > 0
                    cands.append(torch.where(ok, (vals[j] - vals[i]) / torch.where(ok, den, 1 + zero), s_lo))
            mid = lo_f / 2 + up_f / 2
            s_lo_f, s_hi_f = self.slope_range(lo_f, up_f, pts_f)
            result = []
            for upper in (True, False):
                c = torch.stack(torch.broadcast_tensors(*cands, *self.extra_slopes(lo_f, up_f, upper)))
                c = torch.minimum(torch.maximum(c, s_lo_f), s_hi_f)  # useful slopes only (any is sound)
                b = self._intercept(lo_f, up_f, pts_f, c, upper, tails)
                score = c * mid + b if upper else -(c * mid + b)
                best = score.amin(0)
                # ties (ReLU on a symmetric interval): the steepest, as ReLU's rule
                ok = score <= best + 1e-12 * (1 + best.abs())
                a = torch.where(ok, c, -float("inf")).amax(0)
                (s_m, _), (s_p, _) = tails
                a = torch.where(finite, a, torch.where(torch.isinf(lo), s_m + zero, s_p + zero))
                result.append(a)
            return result[0], result[1]

    def _lines(self, lo: Tensor, up: Tensor, alpha: Tensor | None, dtype: torch.dtype) -> Lines:
        tails = self.tails(lo)
        pts = self.vertices(lo, up)
        s_lo, s_hi = self.slope_range(lo, up, pts)
        if alpha is None:
            a_u, a_l = self._crown_slopes(lo, up, pts, s_lo, tails)
        else:
            t_u, t_l = clamp01(alpha).unbind(-1)
            a_u, a_l = s_lo + t_u * (s_hi - s_lo), s_lo + t_l * (s_hi - s_lo)
        # slopes of the caller's dtype, rounded towards the asymptote's safe side at infinite ends
        left, right = torch.isinf(lo), torch.isinf(up)
        a_u = representable(a_u, dtype, right, left)
        a_l = representable(a_l, dtype, left, right)
        b_u = self._intercept(lo, up, pts, a_u, True, tails)
        b_l = self._intercept(lo, up, pts, a_l, False, tails)
        return a_l, b_l, a_u, b_u

    def relax(self, lo, up, alpha=None):
        return relax_elementwise(lambda l64, u64, a64: self._lines(l64, u64, a64, lo.dtype), lo, up, alpha)

    def default_alpha(self, lo: Tensor, up: Tensor) -> Tensor:
        """The α giving CROWN's slopes (t_upper, t_lower) on the last axis."""
        with torch.no_grad():
            lo64, up64 = lo.double(), up.double()
            pts = self.vertices(lo64, up64)
            s_lo, s_hi = self.slope_range(lo64, up64, pts)
            a_u, a_l = self._crown_slopes(lo64, up64, pts, s_lo, self.tails(lo64))
            width = s_hi - s_lo
            wide = width > 0
            t = [torch.where(wide, (a - s_lo) / torch.where(wide, width, 1 + 0 * width), 0 * width).clamp(0, 1)
                 for a in (a_u, a_l)]
            t = torch.stack(torch.broadcast_tensors(*t), -1)
            return t.nan_to_num(0.0).to(lo.dtype)


# ------------------------------------------------------------------ the functions


class LeakyReLU(Kinked):
    """max(h, 0) + s·min(h, 0): one kink at 0, slopes (s, 1); convex for s <= 1 (upper line the
    chord, lower line any slope in [s, 1]), concave for s > 1 (roles swapped)."""

    kind = "leaky_relu"

    def __init__(self, negative_slope: float):
        self.negative_slope = float(negative_slope)

    def fn(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def kinks(self, like):
        return [torch.zeros((), dtype=like.dtype, device=like.device)]

    def slopes(self, like):
        return [as_t(self.negative_slope, like), as_t(1.0, like)]

    def describe(self):
        return f"slope {self.negative_slope:.4g}"


class PReLU(Kinked):
    """h for h >= 0, w·h otherwise, with a slope tensor w (per channel or element, read live
    from its module) broadcast over one sample: LeakyReLU's relaxation per element, for
    slopes of any sign (convex where w <= 1, concave where w > 1)."""

    kind = "prelu"

    def __init__(self, weight: Callable[[], Tensor]):
        self.weight = weight

    def _w(self, like: Tensor) -> Tensor:
        return self.weight().to(dtype=like.dtype, device=like.device)

    def fn(self, x):
        return torch.where(x >= 0, x, self._w(x) * x)

    def kinks(self, like):
        return [torch.zeros((), dtype=like.dtype, device=like.device)]

    def slopes(self, like):
        return [self._w(like), as_t(1.0, like)]

    def describe(self):
        return f"slope {short(self.weight().detach())}"

    def num_params(self):
        return self.weight().numel()


class Clip(Kinked):
    """min(max(h, lo), hi) (either side optional; constants broadcast over one sample): kinks at
    lo and hi, slopes (0, 1, 0); lo > hi is the constant hi (torch.clamp's and ONNX's rule).
    Convex then concave: both lines tunable where the interval straddles a kink."""

    kind = "clip"

    def __init__(self, lo: Tensor | None, hi: Tensor | None):
        self.lo, self.hi = lo, hi

    def fn(self, x):
        lo = None if self.lo is None else self.lo.to(x.dtype)
        hi = None if self.hi is None else self.hi.to(x.dtype)
        return torch.clamp(x, lo, hi)

    def kinks(self, like):
        return [k.to(like.dtype) for k in (self.lo, self.hi) if k is not None]

    def slopes(self, like):
        zero, one = as_t(0.0, like), as_t(1.0, like)
        if self.lo is not None and self.hi is not None:
            middle = (self.lo <= self.hi).to(like.dtype)  # lo > hi: constant
            return [zero, middle, zero]
        return [zero, one] if self.lo is not None else [one, zero]

    def describe(self):
        show = lambda t: "-" if t is None else short(t)  # noqa: E731
        return f"[{show(self.lo)}, {show(self.hi)}]"


class HardSigmoid(Kinked):
    """clip(α·h + β, 0, 1): kinks at -β/α and (1-β)/α, slopes (0, α, 0) (decreasing for α < 0,
    constant for α = 0); the IBP rule takes the vertices, so any sign of α is fine."""

    kind = "hardsigmoid"

    def __init__(self, alpha: float = 0.2, beta: float = 0.5, torch_default: bool = False):
        self.alpha, self.beta = float(alpha), float(beta)
        self.torch_default = torch_default  # torch's Hardsigmoid: relu6(h + 3) / 6

    def fn(self, x):
        if self.torch_default:
            return F.hardsigmoid(x)
        return torch.clamp(x * self.alpha + self.beta, 0.0, 1.0)

    def kinks(self, like):
        if self.torch_default:
            return [as_t(-3.0, like), as_t(3.0, like)]
        if self.alpha == 0:
            return []
        ks = sorted([-self.beta / self.alpha, (1 - self.beta) / self.alpha])
        return [as_t(k, like) for k in ks]

    def slopes(self, like):
        zero = as_t(0.0, like)
        return [zero] if self.alpha == 0 else [zero, as_t(self.alpha, like), zero]

    def describe(self):
        return f"α {self.alpha:.4g} β {self.beta:.4g}"


class Abs(Kinked):
    """|h|: convex, kink at 0 with slopes (-1, 1); upper line the chord, lower line any slope
    in [-1, 1] through the hull (CROWN: the sign of the midpoint)."""

    kind = "abs"

    def fn(self, x):
        return torch.abs(x)

    def kinks(self, like):
        return [torch.zeros((), dtype=like.dtype, device=like.device)]

    def slopes(self, like):
        return [as_t(-1.0, like), as_t(1.0, like)]


class HardSwish(Kinked):
    """h·relu6(h + 3)/6: 0 for h <= -3, the convex parabola q(h) = h(h + 3)/6 on [-3, 3], h for
    h >= 3 (concave kinks at ±3; minimum -3/8 at h = -3/2).

    Lines as :class:`Kinked`, adding for the lower line the parabola's point where
    ``q(h) - a·h`` is least (h = 3a - 3/2 clamped into [max(l, -3), min(u, 3)]): f - a·h is
    linear on the outer pieces and convex on the parabola, so its minimum is there or at a
    vertex, its maximum at a vertex. Slopes range over f' on [l, u]; CROWN's candidates add
    f'(midpoint) and the tangents to the parabola from (l, f(l)) and (u, f(u)). IBP: max of
    f(l), f(u); min also over f(-3/2) when inside; widened by a few ulps for rounding.
    """

    kind = "hardswish"

    def fn(self, x):
        return F.hardswish(x)

    def kinks(self, like):
        return [as_t(-3.0, like), as_t(3.0, like)]

    def tails(self, like):
        zero, one = as_t(0.0, like), as_t(1.0, like)
        return (zero, zero), (one, zero)

    @staticmethod
    def _deriv(x: Tensor) -> Tensor:
        return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), x / 3 + 0.5))

    def slope_range(self, lo, up, pts):
        quad = (lo <= 3) & (up >= -3)
        q_lo, q_hi = lo.clamp(-3, 3) / 3 + 0.5, up.clamp(-3, 3) / 3 + 0.5
        inf = torch.full_like(lo, float("inf"))
        s_lo = torch.where(quad, q_lo, inf)
        s_hi = torch.where(quad, q_hi, -inf)
        left, right = lo < -3, up > 3
        s_lo = torch.where(left, torch.minimum(s_lo, 0 * lo), s_lo)
        s_hi = torch.where(left, torch.maximum(s_hi, 0 * lo), s_hi)
        s_lo = torch.where(right, torch.minimum(s_lo, 1 + 0 * lo), s_lo)
        s_hi = torch.where(right, torch.maximum(s_hi, 1 + 0 * lo), s_hi)
        none = s_lo > s_hi  # NaN bounds
        return torch.where(none, 0 * lo, s_lo), torch.where(none, 0 * lo, s_hi)

    def extra_points(self, lo, up, a, upper):
        if upper:
            return []
        stationary = clamp_into(3 * a - 1.5, lo.clamp(min=-3), up.clamp(max=3))
        return [clamp_into(stationary, lo, up)]

    def extra_slopes(self, lo, up, upper):
        if upper:
            return []
        cands = [self._deriv(lo / 2 + up / 2)]
        for p in (lo, up):
            disc = (p * p + 3 * p - 6 * self.fn(p)).clamp(min=0).sqrt()
            cands += [(p + sgn * disc).clamp(-3, 3) / 3 + 0.5 for sgn in (-1, 1)]
        return cands

    def interval(self, b_in):
        lo, up = b_in
        f_lo, f_up = self.fn(lo.clamp(min=-3)), self.fn(up.clamp(min=-3))  # f(h) = f(max(h, -3)); f(-inf) = 0
        f_min = self.fn(clamp_into(as_t(-1.5, lo), lo, up))
        low = torch.minimum(torch.minimum(f_lo, f_up), f_min)
        high = torch.maximum(f_lo, f_up)
        eps = 4 * torch.finfo(lo.dtype).eps
        return nan_kept(low - eps * low.abs(), lo, up), nan_kept(high + eps * high.abs(), lo, up)


class Sign(Activation):
    """sign(h) in {-1, 0, 1} (sign(0) = 0): a non-decreasing step.

    Upper line on [l, u]: the constant sign(u) when sign is constant on [l, u] (u < 0, or
    l > 0); for l < 0 < u the line ``a·h + 1`` with a in [0, 2/(-l)] (>= 1 on h > 0, >= 0 at
    0, >= -1 down to l); for l < 0 = u the line ``a·h`` with a in [0, 1/(-l)] (the chord at
    a = 1/(-l)). α picks a in that range (CROWN: the largest when the midpoint is negative,
    else 0: least area). The lower line is the reflected upper line (sign is odd). Infinite
    ends give slope 0 and finite constants; NaN bounds give NaN.
    """

    kind = "sign"

    def fn(self, x):
        return torch.sign(x)

    def interval(self, b_in):
        lo, up = b_in
        return nan_kept(torch.sign(lo), lo, up), nan_kept(torch.sign(up), lo, up)

    @staticmethod
    def _upper(lo: Tensor, up: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor]:
        zero, one = torch.zeros_like(lo), torch.ones_like(lo)
        neg = lo < 0
        safe = torch.where(neg, -lo, one)
        steepest = torch.where(neg & (up > 0), 2 / safe, torch.where(neg & (up == 0), 1 / safe, zero))
        if t is None:
            t = (lo / 2 + up / 2 < 0).to(lo.dtype)
        slope = t * steepest
        icpt = torch.where(up > 0, one, torch.where(up == 0, zero, -one))
        return slope, icpt + 0 * slope

    def _lines(self, lo, up, alpha):
        t_u = t_l = None
        if alpha is not None:
            t_u, t_l = clamp01(alpha).unbind(-1)
        a_u, b_u = self._upper(lo, up, t_u)
        a_l, b_l = self._upper(-up, -lo, t_l)  # sign(h) = -sign(-h) >= -(a·(-h) + b)
        return a_l, -b_l, a_u, b_u

    def relax(self, lo, up, alpha=None):
        return relax_elementwise(self._lines, lo, up, alpha)

    def default_alpha(self, lo, up):
        t_u = (lo / 2 + up / 2 < 0).to(lo.dtype)
        t_l = (-up / 2 - lo / 2 < 0).to(lo.dtype)
        return torch.stack([t_u, t_l], -1)


# ------------------------------------------------------------------ rules


def _arg(ctx: Ctx, i: int, name: str, default):
    """Argument ``name`` (position ``i``) of a function or method call, evaluated."""
    if name in ctx.kwargs:
        return ctx.kwargs[name]
    return ctx.args[i] if len(ctx.args) > i else default


def _fx_arg(ctx: Ctx, i: int, name: str):
    """The fx argument ``name`` (position ``i``), for checking whether it is input-dependent."""
    if name in ctx.node.kwargs:
        return ctx.node.kwargs[name]
    return ctx.node.args[i] if len(ctx.node.args) > i else None


def _elementwise_constant(ctx: Ctx, value, x: fx.Node, what: str) -> Tensor:
    """A constant broadcast element-wise over ``x``'s sample without changing its shape."""
    c = ctx.constant(value, like=x)
    shape = ctx.shape(x)
    try:
        ok = tuple(torch.broadcast_shapes(tuple(c.shape), shape)) == tuple(shape)
    except RuntimeError:
        ok = False
    if not ok:
        ctx.unsupported(f"a {what} of shape {tuple(c.shape)} that does not broadcast to the input's {shape}")
    return c


@register(onnx=["LeakyRelu"], fx=["LeakyReLU", "leaky_relu"])
def _leaky_relu(ctx: Ctx):
    if ctx.name == "LeakyReLU":
        slope = ctx.target.negative_slope
    else:
        if ctx.dynamic(_fx_arg(ctx, 1, "negative_slope")):
            ctx.unsupported("an input-dependent slope")
        slope = _arg(ctx, 1, "negative_slope", 0.01)
    return LeakyReLU(float(slope)), [ctx.x]


@register(onnx=["PRelu"], fx=["OnnxPReLU", "PReLU", "prelu"])
def _prelu(ctx: Ctx):
    x = ctx.node.args[0]
    if not ctx.dynamic(x) or ctx.dynamic(ctx.node.args[1:]) or ctx.dynamic(ctx.node.kwargs):
        ctx.unsupported("an input-dependent slope")
    if ctx.name == "PReLU":  # a trainable weight, read live: (C,) on axis 1 of the full shape, or (1,)
        mod, rank = ctx.target, len(ctx.shape(x))
        if mod.weight.numel() == 1:
            view = (1,) * rank
        else:
            axis = ctx.axis(1, x) - 1
            view = tuple(mod.weight.numel() if d == axis else 1 for d in range(rank))
        return PReLU(lambda m=mod, v=view: m.weight.reshape(v)), [x]
    # a constant slope (ONNX's or F.prelu's): its element-wise value, read off the operator itself
    val = ctx.value(x)
    with torch.no_grad():
        probe = -ctx.target(-torch.ones_like(val), *ctx.args[1:], **ctx.kwargs)
    w = _elementwise_constant(ctx, probe, x, "slope")
    return PReLU(lambda w=w: w), [x]


def _clip_bounds(ctx: Ctx) -> tuple[object, object]:
    """(min, max) of a clip-like node (None where absent)."""
    name, mod = ctx.name, ctx.target
    if name == "OnnxClip":
        return mod.min_val, mod.max_val
    if name in ("ReLU6", "Hardtanh"):
        return mod.min_val, mod.max_val
    if name == "relu6":
        return 0.0, 6.0
    if name == "hardtanh":
        return _arg(ctx, 1, "min_val", -1.0), _arg(ctx, 2, "max_val", 1.0)
    if name == "clamp_min":
        return _arg(ctx, 1, "min", None), None
    if name == "clamp_max":
        return None, _arg(ctx, 1, "max", None)
    return _arg(ctx, 1, "min", None), _arg(ctx, 2, "max", None)  # clamp, clip


@register(onnx=["Clip"], fx=["OnnxClip", "ReLU6", "relu6", "Hardtanh", "hardtanh", "clamp", "clip", "clamp_min",
                             "clamp_max"])
def _clip(ctx: Ctx):
    x = ctx.node.args[0]
    if not ctx.dynamic(x) or ctx.dynamic(ctx.node.args[1:]) or ctx.dynamic(ctx.node.kwargs):
        ctx.unsupported("input-dependent bounds (use Max / Min)")
    lo, hi = _clip_bounds(ctx)
    if lo is None and hi is None:
        return Alias(x)
    lo_t = None if lo is None else _elementwise_constant(ctx, lo, x, "bound")
    hi_t = None if hi is None else _elementwise_constant(ctx, hi, x, "bound")
    for t in (lo_t, hi_t):
        if t is not None and torch.isnan(t).any():
            ctx.unsupported("a NaN bound")
    return Clip(lo_t, hi_t), [x]


@register(onnx=["HardSigmoid"], fx=["OnnxHardSigmoid", "Hardsigmoid", "hardsigmoid"])
def _hardsigmoid(ctx: Ctx):
    if ctx.name == "OnnxHardSigmoid":
        return HardSigmoid(ctx.target.alpha, ctx.target.beta), [ctx.x]
    return HardSigmoid(1 / 6, 0.5, torch_default=True), [ctx.x]


@register(onnx=["HardSwish"], fx=["Hardswish", "hardswish"])
def _hardswish(ctx: Ctx):
    return HardSwish(), [ctx.x]


@register(onnx=["Abs"], fx=["abs"])
def _abs(ctx: Ctx):
    return Abs(), [ctx.x]


@register(onnx=["Neg"], fx=["OnnxNeg", "neg"])
def _neg(ctx: Ctx):
    return ElementwiseAffine(ctx.constant(-1.0), None, ctx.shape(ctx.x)), [ctx.x]


@register(onnx=["Sign"], fx=["sign"])
def _sign(ctx: Ctx):
    return Sign(), [ctx.x]


def _two_bounded(ctx: Ctx, a: fx.Node, b: fx.Node, is_max: bool):
    """max(a, b) = b + relu(a - b), min(a, b) = a - relu(a - b), through graph nodes."""
    out = ctx.shape()
    sa, sb = ctx.shape(a), ctx.shape(b)
    if not len(sa) == len(sb) == len(out):
        ctx.unsupported(f"operands of per-sample shapes {sa} and {sb} (only equal ranks)")
    diff = ctx.emit(Sub([sa, sb]), [a, b], out)
    relu = ctx.emit(ReLU(), [diff], out)
    if is_max:
        return Add([out, sb]), [relu, b]
    return Sub([sa, out]), [a, relu]


def _with_constant(ctx: Ctx, x: fx.Node, value, is_max: bool):
    """max(x, c) = clip(x, c, -) and min(x, c) = clip(x, -, c); when c broadcasts x to a larger
    shape, c + relu(x - c) and c - relu(c - x)."""
    c = ctx.constant(value, like=x)
    sx, out = ctx.shape(x), ctx.shape()
    if tuple(out) == tuple(sx) and tuple(torch.broadcast_shapes(tuple(c.shape), sx)) == tuple(sx):
        return (Clip(c, None) if is_max else Clip(None, c)), [x]
    if len(out) != len(sx) or c.dim() > len(out):
        ctx.unsupported(f"a constant of shape {tuple(c.shape)} broadcasting the input to a higher rank")
    if is_max:
        diff = ctx.emit(ElementwiseAffine(None, -c, sx), [x], out)
        return ElementwiseAffine(None, c, out), [ctx.emit(ReLU(), [diff], out)]
    minus = -torch.ones_like(c)
    diff = ctx.emit(ElementwiseAffine(minus, c, sx), [x], out)
    return ElementwiseAffine(minus, c, out), [ctx.emit(ReLU(), [diff], out)]


@register(onnx=["Max", "Min"], fx=["OnnxMinMax", "maximum", "minimum"])
def _min_max(ctx: Ctx):
    if ctx.name == "OnnxMinMax":
        is_max = getattr(ctx.target, "_op_type", None) == "Max"
        if getattr(ctx.target, "_op_type", None) not in ("Max", "Min"):
            ctx.unsupported("an unknown OnnxMinMax kind")
    else:
        is_max = ctx.name == "maximum"
    args: Sequence = ctx.node.args
    if len(args) == 1:
        return Alias(args[0])
    if len(args) != 2 or ctx.node.kwargs:
        ctx.unsupported(f"{len(args)} operands (only 1 or 2)")
    a, b = args
    da, db = ctx.dynamic(a), ctx.dynamic(b)
    if da and db:
        return _two_bounded(ctx, a, b, is_max)
    return _with_constant(ctx, a if da else b, ctx.args[1] if da else ctx.args[0], is_max)

