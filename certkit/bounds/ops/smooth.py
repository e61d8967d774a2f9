"""Exp, Log, Reciprocal, Sqrt, Pow, Softplus, Elu, Erf, GELU, Sin and Cos.

Smooth element-wise functions (Pow with a constant exponent).

Every relaxation is computed in float64 by one shared pipeline (:class:`Smooth`):

- the input interval is first clamped to the function's domain where it has one (Sqrt, Log,
  fractional powers: x < 0 is NaN in ONNX; the bounds then hold for every *valid* input, and an
  interval lying wholly outside the domain gets NaN bounds, never a finite one);
- wide finite intervals get the function's own lines (chord / tangent, see each class);
- narrow intervals (l == u, or a width at float64 rounding level) get the slope f'(midpoint)
  with intercepts from the interval bounds: ``f(h) <= f_up <= f_up + s·(h - l_s)`` with
  ``l_s`` the end minimising ``s·h``: sound for any slope, exact for a point;
- infinite input bounds, and any line that came out non-finite (overflow), fall back to the
  constant lines ``f_lo <= f(h) <= f_up`` (the IBP bounds, possibly infinite: sound);
- NaN inputs (or a NaN interval) give NaN intercepts: NaN never becomes a finite bound;
- the intercepts are then loosened by a few units of rounding of the caller's dtype (as
  ``base.relax_elementwise`` does, but safe with infinite intercepts) and the lines cast back.

α (tunable) has a trailing axis of two tangent/slope positions ``(t_upper, t_lower)`` in
[0, 1]; every value gives sound lines, the defaults are CROWN's choices. The IBP rules are
computed in float64 and widened outward by a few ulps of the caller's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from certkit.bounds.ops.activation import SShaped
from certkit.bounds.ops.base import Activation, clamp01
from certkit.bounds.ops.registry import Ctx, register

Lines = tuple[Tensor, Tensor, Tensor, Tensor]
INF = math.inf
NAN = math.nan


# ------------------------------------------------------------------ float64 helpers


def _widen(v: Tensor, dtype: torch.dtype, down: bool) -> Tensor:
    """``v`` (float64) moved outward by a few ulps of ``dtype`` and cast (infinities kept)."""
    fi = torch.finfo(dtype)
    slack = 4 * fi.eps * v.abs() + fi.tiny
    slack = torch.where(torch.isfinite(v), slack, torch.zeros_like(v))
    return (v - slack if down else v + slack).to(dtype)


def _dot_safe(A: Tensor, b: Tensor) -> Tensor:
    """Σ over one sample of A·b with 0·(±inf) taken as 0 (a neuron with coefficient 0 does not
    contribute, even where its line is infinite)."""
    prod = A * b
    return torch.where(A == 0, torch.zeros_like(prod), prod).flatten(2).sum(-1)


def _lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    return a + t * (b - a)


def _chord(f_lo: Tensor, f_up: Tensor, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """The line through (lo, f_lo) and (up, f_up) (lo < up)."""
    slope = (f_up - f_lo) / (up - lo)
    return slope, f_lo - slope * lo


def _tangent(f_d: Tensor, df_d: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    return df_d, f_d - df_d * d


def _convex(f, df, lo: Tensor, up: Tensor, d: Tensor) -> Lines:
    """A convex f on [lo, up]: the chord lies above f, the tangent at any d below it."""
    a_u, b_u = _chord(f(lo), f(up), lo, up)
    a_l, b_l = _tangent(f(d), df(d), d)
    return a_l, b_l, a_u, b_u


def _concave(f, df, lo: Tensor, up: Tensor, d: Tensor) -> Lines:
    """A concave f on [lo, up]: the chord lies below f, the tangent at any d above it."""
    a_l, b_l = _chord(f(lo), f(up), lo, up)
    a_u, b_u = _tangent(f(d), df(d), d)
    return a_l, b_l, a_u, b_u


def _reflect_odd(lines: Lines) -> Lines:
    """Lines of f(h) = -g(-h) from lines of g on the reflected interval [-u, -l]."""
    a_l, b_l, a_u, b_u = lines
    return a_u, -b_u, a_l, -b_l


def _reflect_even(lines: Lines) -> Lines:
    """Lines of f(h) = g(-h) from lines of g on the reflected interval [-u, -l]."""
    a_l, b_l, a_u, b_u = lines
    return -a_l, b_l, -a_u, b_u


def _pick(cond: Tensor, x: Lines, y: Lines) -> Lines:
    return tuple(torch.where(cond, p, q) for p, q in zip(x, y))  # type: ignore[return-value]


# ------------------------------------------------------------------ the shared pipeline


class Smooth(Activation):
    """An element-wise function bounded by the float64 pipeline of the module docstring.

    Subclasses give ``fn`` (any dtype), ``bounds64(lo, up)`` (a sound float64 interval of f on
    [lo, up]), ``deriv64`` (f', for narrow intervals), ``lines64(lo, up, t_u, t_l)`` (sound
    lines for finite lo < up inside the domain) and ``default_t(lo, up)`` (CROWN's tangent
    positions, two tensors). ``domain64`` clamps an interval to the domain.
    """

    tunable = True
    safe = (1.0, 2.0)  # a harmless interval substituted where lines64 must not look

    def bounds64(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """f non-decreasing (override otherwise)."""
        return self.fn(lo), self.fn(up)

    def deriv64(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def lines64(self, lo: Tensor, up: Tensor, t_u: Tensor, t_l: Tensor) -> Lines:  # pragma: no cover
        raise NotImplementedError

    def default_t(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        half = torch.full_like(lo, 0.5)
        return half, half

    def domain64(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        return lo, up

    # --------------------------------------------------------------- Activation interface

    def forward(self, x):
        return self.fn(x)

    def default_alpha(self, lo: Tensor, up: Tensor) -> Tensor:
        lo64, up64 = self.domain64(lo.double(), up.double())
        t_u, t_l = self.default_t(*self._sanitised(lo64, up64)[:2])
        return torch.stack([t_u, t_l], -1).clamp(0, 1).nan_to_num(0.5).to(lo.dtype)

    def interval(self, b_in):
        lo, up = b_in
        lo64, up64 = self.domain64(lo.double(), up.double())
        f_lo, f_up = self.bounds64(lo64, up64)
        bad = torch.isnan(lo64) | torch.isnan(up64) | torch.isnan(f_lo) | torch.isnan(f_up)
        f_lo, f_up = f_lo.masked_fill(bad, NAN), f_up.masked_fill(bad, NAN)
        return _widen(f_lo, lo.dtype, True), _widen(f_up, lo.dtype, False)

    def _sanitised(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(lo, up) with a harmless interval where the lines are not computed by ``lines64``, the
        mask of wide finite intervals, and that of narrow ones."""
        finite = torch.isfinite(lo) & torch.isfinite(up)
        width = torch.where(finite, up - lo, torch.zeros_like(lo))
        narrow = finite & (width <= 1e-9 * (1 + lo.abs() + up.abs()))
        wide = finite & ~narrow
        s_lo, s_up = self.safe
        return torch.where(wide, lo, s_lo), torch.where(wide, up, s_up), wide, narrow

    def relax(self, lo, up, alpha=None):
        dtype = lo.dtype
        lo64, up64 = self.domain64(lo.double(), up.double())
        f_lo, f_up = self.bounds64(lo64, up64)
        w_lo, w_up, wide, narrow = self._sanitised(lo64, up64)
        if alpha is None:
            t_u, t_l = self.default_t(w_lo, w_up)
        else:
            t_u, t_l = clamp01(alpha.double()).unbind(-1)
        a_l, b_l, a_u, b_u = self.lines64(w_lo, w_up, t_u, t_l)
        # narrow intervals: the midpoint's slope through the worst ends of the IBP bounds
        mid = torch.where(narrow, (lo64 + up64) / 2, torch.ones_like(lo64))
        s = self.deriv64(mid)
        s = torch.where(narrow & torch.isfinite(s), s, torch.zeros_like(s))
        s_lo = torch.where(narrow, lo64, torch.zeros_like(lo64))
        s_up = torch.where(narrow, up64, torch.zeros_like(up64))
        n_bu = f_up - torch.minimum(s * s_lo, s * s_up)
        n_bl = f_lo - torch.maximum(s * s_lo, s * s_up)
        a_u, b_u = torch.where(wide, a_u, s), torch.where(wide, b_u, n_bu)
        a_l, b_l = torch.where(wide, a_l, s), torch.where(wide, b_l, n_bl)
        return self._finish(dtype, lo64, up64, f_lo, f_up, wide | narrow, (a_l, b_l, a_u, b_u))

    @staticmethod
    def _finish(dtype, lo64, up64, f_lo, f_up, computed, lines: Lines) -> Lines:
        """Constant fallback for non-finite lines, NaN propagation, loosening and the cast."""
        a_l, b_l, a_u, b_u = lines
        zero = torch.zeros_like(a_l)
        ok_u = computed & torch.isfinite(a_u) & torch.isfinite(b_u)
        ok_l = computed & torch.isfinite(a_l) & torch.isfinite(b_l)
        a_u, b_u = torch.where(ok_u, a_u, zero), torch.where(ok_u, b_u, f_up)
        a_l, b_l = torch.where(ok_l, a_l, zero), torch.where(ok_l, b_l, f_lo)
        bad = torch.isnan(lo64) | torch.isnan(up64) | torch.isnan(f_lo) | torch.isnan(f_up)
        b_u, b_l = b_u.masked_fill(bad, NAN), b_l.masked_fill(bad, NAN)
        a_u, a_l = a_u.masked_fill(bad, 0.0), a_l.masked_fill(bad, 0.0)
        # rounding allowance for the cast back and for evaluating the lines in ``dtype``
        scale = 8 * torch.finfo(dtype).eps
        reach = torch.maximum(lo64.abs(), up64.abs())
        reach = torch.where(torch.isfinite(reach), reach, torch.zeros_like(reach))
        slack_u = scale * (1 + b_u.abs() + a_u.abs() * reach)
        slack_l = scale * (1 + b_l.abs() + a_l.abs() * reach)
        b_u = b_u + torch.where(torch.isfinite(b_u), slack_u, torch.zeros_like(slack_u))
        b_l = b_l - torch.where(torch.isfinite(b_l), slack_l, torch.zeros_like(slack_l))
        out = [a_l.to(dtype), b_l.to(dtype), a_u.to(dtype), b_u.to(dtype)]
        # a slope or intercept that overflowed in ``dtype``: the constant lines instead
        lo_c, up_c = _widen(f_lo, dtype, True), _widen(f_up, dtype, False)
        bad_u = ~torch.isfinite(out[2]) | ((out[3] == -INF) & (b_u > -INF))
        bad_l = ~torch.isfinite(out[0]) | ((out[1] == INF) & (b_l < INF))
        out[2], out[3] = out[2].masked_fill(bad_u, 0.0), torch.where(bad_u, up_c, out[3])
        out[0], out[1] = out[0].masked_fill(bad_l, 0.0), torch.where(bad_l, lo_c, out[1])
        return out[0], out[1], out[2], out[3]

    def backward(self, A, in_bounds, alpha: Tensor | None = None, **kw):
        """As :meth:`Activation.backward`, with 0·inf = 0 for infinite intercepts."""
        a_l, b_l, a_u, b_u = self.row_lines(*in_bounds[0], alpha)
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        return [pos * a_l + neg * a_u], _dot_safe(pos, b_l) + _dot_safe(neg, b_u)


# ------------------------------------------------------------------ Exp


class Exp(Smooth):
    """e^h: convex and increasing. Upper line: the chord through (l, e^l) and (u, e^u) (above a
    convex function on [l, u]); lower line: the tangent at d = l + t·(u − l) (below a convex
    function everywhere), d capped at 700 (exp(d) finite; any tangent is sound). CROWN's d is
    min((l + u)/2, l + 0.99). An overflowing upper bound is +inf (sound)."""

    kind = "exp"

    def fn(self, x):
        return torch.exp(x)

    def deriv64(self, x):
        return torch.exp(x)

    def default_t(self, lo, up):
        t = torch.clamp(0.99 / (up - lo).clamp(min=1e-300), max=0.5)
        return t, t

    def lines64(self, lo, up, t_u, t_l):
        d = _lerp(lo, up, t_l).clamp(max=700.0)
        return _convex(torch.exp, torch.exp, lo, up, d)


# ------------------------------------------------------------------ Log


class Log(Smooth):
    """ln h: concave and increasing on (0, inf). Upper line: the tangent at d = l + t·(u − l)
    (above a concave function everywhere; d >= u/1000 > 0 when l <= 0); lower line: the chord
    (below it on [l, u]). Where l <= 0 the lower bound is -inf (ln 0 = -inf): a constant -inf
    lower line, the upper tangent still applies on the valid inputs h > 0. An interval with
    u < 0 holds no valid input: NaN bounds (ln of a negative is NaN)."""

    kind = "log"

    def fn(self, x):
        return torch.log(x)

    def deriv64(self, x):
        return 1 / x

    def domain64(self, lo, up):
        return torch.where(up >= 0, lo.clamp(min=0), lo), up

    def bounds64(self, lo, up):
        nan = up < 0
        f_lo = torch.log(lo).masked_fill(nan, NAN)
        return f_lo, torch.log(up).masked_fill(nan, NAN)

    def lines64(self, lo, up, t_u, t_l):
        pos = lo > 0
        d_lo = torch.where(pos, lo, up * 1e-3)
        d = _lerp(d_lo, up, t_u)
        safe_lo = torch.where(pos, lo, up / 2)
        a_l, b_l, a_u, b_u = _concave(torch.log, lambda x: 1 / x, safe_lo, up, d)
        return a_l.masked_fill(~pos, 0.0), b_l.masked_fill(~pos, -INF), a_u, b_u


# ------------------------------------------------------------------ powers


def _odd_k(n: int) -> tuple[float, float]:
    """k in (0, 1) with (n-1)k^n + n k^(n-1) = 1, bracketed [k_lo, k_hi]: for h^n (n odd >= 3)
    on [l, u] with u > 0 the tangent at d* = -k·u passes through (u, u^n)."""
    a, b = 0.0, 1.0
    for _ in range(200):
        m = (a + b) / 2
        a, b = (m, b) if (n - 1) * m**n + n * m ** (n - 1) < 1 else (a, m)
    return a, min(1.0, b + 1e-12)


class Pow(Smooth):
    """h^c for a constant exponent c.

    - c = 0: the constant 1; c = 1: the identity (exact lines).
    - Positive reals h >= 0 (every non-integer c: h < 0 is NaN, the interval is clamped to
      [max(l, 0), u] and the bounds hold on the valid inputs; u < 0: NaN bounds):
      c > 1 convex increasing (upper chord, lower tangent at l + t·(u − l)); 0 < c < 1
      concave increasing (lower chord, upper tangent at max(l + t·(u − l), u·1e-6) > 0, its
      slope finite); c < 0 convex decreasing (upper chord, lower tangent at the geometric
      point l^(1−t)·u^t), +inf at 0 (an interval reaching 0 gets an infinite upper bound).
    - Even integer c > 0: convex on the whole line: chord above, tangent at l + t·(u − l)
      below; the IBP minimum is 0 when the interval straddles 0.
    - Odd integer c >= 3: increasing, concave on h <= 0 and convex on h >= 0. Upper line:
      the chord when l >= -k·u (k from :func:`_odd_k`; the chord then stays above the concave
      part), else the tangent at d = l + t·(d* − l) with d* = -k·u: a tangent of the concave
      part at d <= d* lies above f on (-inf, 0] and passes above (u, u^c), hence above the
      convex part's chord on [0, u] (for u <= 0 every tangent on [l, u] is above f). The
      lower line is the reflection (f is odd) of the upper line on [-u, -l].
    - Negative integers: h < 0 is the reflection (even: f(-h); odd: -f(-h)) of the positive
      case; an interval containing 0 gets infinite bounds (f is unbounded there; for even c
      the lower bound stays 0).
    """

    kind = "pow"

    def __init__(self, exponent: float):
        self.c = float(exponent)
        self.integer = self.c.is_integer()
        self.even = self.integer and int(self.c) % 2 == 0
        self.k = _odd_k(int(self.c)) if self.integer and not self.even and self.c >= 3 else None

    def describe(self):
        return f"^ {self.c:g}"

    def fn(self, x):
        return torch.pow(x, self.c)

    def _p(self, x: Tensor) -> Tensor:
        return torch.pow(x, self.c)

    def _dp(self, x: Tensor) -> Tensor:
        return self.c * torch.pow(x, self.c - 1)

    def deriv64(self, x):
        if self.c == 0:
            return torch.zeros_like(x)
        return self._dp(x)

    def domain64(self, lo, up):
        if self.integer:
            return lo, up
        return torch.where(up >= 0, lo.clamp(min=0), lo), up

    def bounds64(self, lo, up):
        c, p = self.c, self._p
        if c == 0:
            return torch.ones_like(lo), torch.ones_like(up)
        if not self.integer:
            nan = up < 0
            ends = (p(lo), p(up)) if c > 0 else (p(up), p(lo))
            return ends[0].masked_fill(nan, NAN), ends[1].masked_fill(nan, NAN)
        straddle = (lo <= 0) & (up >= 0)
        p_lo, p_up = p(lo), p(up)
        if c > 0 and not self.even:
            return p_lo, p_up
        if c > 0:  # even: min 0 on a straddling interval, max at an end
            low = torch.where(straddle, torch.zeros_like(lo), torch.minimum(p_lo, p_up))
            return low, torch.maximum(p_lo, p_up)
        low, high = torch.minimum(p_lo, p_up), torch.maximum(p_lo, p_up)
        if self.even:
            return torch.where(straddle, torch.zeros_like(lo), low), torch.where(straddle, INF, high)
        return torch.where(straddle, -INF, low), torch.where(straddle, INF, high)

    def default_t(self, lo, up):
        half = torch.full_like(lo, 0.5)
        if self.k is None:
            return half, half
        # odd powers: tangents at the midpoint on a concave side, through the far end when straddling
        return torch.where(up <= 0, half, half * 2), torch.where(lo >= 0, half, half * 2)

    def _positive(self, lo: Tensor, up: Tensor, t: Tensor) -> Lines:
        """Lines of h^c on [lo, up] with 0 <= lo < up."""
        c = self.c
        if c > 1:
            return _convex(self._p, self._dp, lo, up, _lerp(lo, up, t))
        if c > 0:
            d = torch.maximum(_lerp(lo, up, t), up * 1e-6)
            return _concave(self._p, self._dp, lo, up, d)
        safe_lo = torch.where(lo > 0, lo, up / 2)  # lo = 0: f(0) = inf, the upper line is replaced
        d = torch.exp(_lerp(torch.log(safe_lo), torch.log(up), t))
        a_l, b_l, a_u, b_u = _convex(self._p, self._dp, safe_lo, up, d)
        return a_l, b_l, a_u.masked_fill(lo <= 0, INF), b_u

    def _odd_upper(self, lo: Tensor, up: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        k_lo, k_hi = self.k
        a_ch, b_ch = _chord(self._p(lo), self._p(up), lo, up)
        d_star = -k_hi * up.clamp(min=0)
        d = torch.where(up <= 0, _lerp(lo, up, t), _lerp(torch.minimum(lo, d_star), d_star, t))
        a_t, b_t = _tangent(self._p(d), self._dp(d), d)
        use_chord = lo >= -k_lo * up.clamp(min=0)
        use_chord = (use_chord & (up > 0)) | (lo >= 0)
        return torch.where(use_chord, a_ch, a_t), torch.where(use_chord, b_ch, b_t)

    def lines64(self, lo, up, t_u, t_l):
        c = self.c
        if c == 0:
            z, o = torch.zeros_like(lo), torch.ones_like(lo)
            return z, o, z, o
        if c == 1:
            z, o = torch.zeros_like(lo), torch.ones_like(lo)
            return o, z, o, z
        if not self.integer:
            return self._positive(lo, up, t_l if c > 1 or c < 0 else t_u)
        if self.k is not None:
            a_u, b_u = self._odd_upper(lo, up, t_u)
            a_l, b_l = self._odd_upper(-up, -lo, t_l)
            return a_l, -b_l, a_u, b_u
        if c > 0:  # even: convex everywhere
            return _convex(self._p, self._dp, lo, up, _lerp(lo, up, t_l))
        # negative integers: each side separately; straddling intervals are infinite
        neg = up < 0
        plo, pup = torch.where(neg, -up, lo), torch.where(neg, -lo, up)
        straddle = (plo <= 0)
        plo, pup = torch.where(straddle, torch.ones_like(plo), plo), torch.where(straddle, 2.0, pup)
        pos_lines = self._positive(plo, pup, t_l)
        mirrored = _reflect_even(pos_lines) if self.even else _reflect_odd(pos_lines)
        lines = _pick(neg, mirrored, pos_lines)
        return tuple(torch.where(straddle, torch.full_like(x, NAN), x) for x in lines)  # type: ignore[return-value]


class Reciprocal(Pow):
    """1/h: convex decreasing on h > 0 (upper chord, lower tangent at the geometric point
    l^(1−t)·u^t, CROWN's t = 1/2: the tangent parallel to the chord), concave on h < 0 (the
    odd reflection). An interval containing 0 has unbounded outputs: bounds (-inf, inf) and
    constant infinite lines (sound)."""

    kind = "reciprocal"

    def __init__(self):
        super().__init__(-1.0)

    def fn(self, x):
        return torch.reciprocal(x)

    def describe(self):
        return ""


class Sqrt(Pow):
    """√h: concave increasing on [0, inf): lower chord, upper tangent at l + t·(u − l) (kept
    above u·1e-6 so its slope is finite). h < 0 is NaN in ONNX: the interval is clamped to
    [max(l, 0), u], so the bounds hold for every valid input; u < 0 gives NaN bounds."""

    kind = "sqrt"

    def __init__(self):
        super().__init__(0.5)

    def fn(self, x):
        return torch.sqrt(x)

    def _p(self, x):
        return torch.sqrt(x)

    def _dp(self, x):
        return 0.5 / torch.sqrt(x)

    def describe(self):
        return ""


# ------------------------------------------------------------------ Softplus, Elu


def _softplus64(x: Tensor, beta: float) -> Tensor:
    """The exact softplus log(1 + e^(βx))/β, overflow-free."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-(beta * x).abs())) / beta


class Softplus(Smooth):
    """log(1 + e^(βh))/β (β > 0): convex and increasing: upper chord, lower tangent at
    l + t·(u − l) (CROWN: the midpoint). torch (and onnx2torch) return h itself where βh >
    threshold, below softplus by at most δ = log(1 + e^(−threshold))/β: the lower lines and
    bounds are lowered by δ, so they hold for that function too (upper ones hold as is)."""

    kind = "softplus"

    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        if not beta > 0:
            raise ValueError(f"Softplus needs beta > 0, got {beta}")
        self.beta, self.threshold = float(beta), float(threshold)
        self.delta = math.log1p(math.exp(-self.threshold)) / self.beta if self.threshold < 700 else 0.0

    def describe(self):
        return f"beta={self.beta:g}, threshold={self.threshold:g}"

    def fn(self, x):
        return F.softplus(x, self.beta, self.threshold)

    def _sp(self, x: Tensor) -> Tensor:
        return _softplus64(x, self.beta)

    def deriv64(self, x):
        return torch.sigmoid(self.beta * x)

    def bounds64(self, lo, up):
        return self._sp(lo) - self.delta * 1.01, self._sp(up)

    def lines64(self, lo, up, t_u, t_l):
        a_l, b_l, a_u, b_u = _convex(self._sp, self.deriv64, lo, up, _lerp(lo, up, t_l))
        return a_l, b_l - self.delta * 1.01, a_u, b_u


class Elu(Smooth):
    """ELU: h for h > 0, α(e^h − 1) for h <= 0. For α in [0, 1] its derivative (α e^h, then 1)
    never decreases: convex and non-decreasing. Upper line: the chord; lower line: the
    tangent at d = l + t·(u − l) with the left derivative at d = 0 (a subgradient); CROWN's
    midpoint gives slope 1 exactly when u >= −l, like ReLU's adaptive rule. α > 1 (a concave
    kink at 0) and α < 0 (decreasing) are refused."""

    kind = "elu"

    def __init__(self, alpha: float = 1.0):
        if not 0 <= alpha <= 1:
            raise ValueError(f"ELU with alpha={alpha} is not convex (only 0 <= alpha <= 1 is supported)")
        self.alpha = float(alpha)

    def describe(self):
        return f"alpha={self.alpha:g}"

    def fn(self, x):
        return F.elu(x, self.alpha)

    def _f(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x, self.alpha * torch.expm1(x.clamp(max=0)))

    def deriv64(self, x):
        return torch.where(x > 0, torch.ones_like(x), self.alpha * torch.exp(x.clamp(max=0)))

    def bounds64(self, lo, up):
        return self._f(lo), self._f(up)

    def lines64(self, lo, up, t_u, t_l):
        return _convex(self._f, self.deriv64, lo, up, _lerp(lo, up, t_l))


# ------------------------------------------------------------------ Erf


class Erf(SShaped):
    """erf: odd, increasing, convex on h <= 0 and concave on h >= 0, with an even derivative
    (2/√π)e^(−h²) decreasing in |h|: :class:`SShaped`'s tunable chord/tangent lines. Infinite
    input bounds get the constant lines erf(l) <= f <= erf(u) (slope 0) and NaN inputs NaN
    intercepts."""

    kind = "erf"
    centre_sum = 0.0

    def fn(self, x):
        return torch.erf(x)

    def deriv(self, x):
        return (2 / math.sqrt(math.pi)) * torch.exp(-x * x)

    def relax(self, lo, up, alpha=None):
        finite = torch.isfinite(lo) & torch.isfinite(up)
        lines = super().relax(torch.where(finite, lo, -1.0), torch.where(finite, up, 1.0), alpha)
        f_lo, f_up = self.interval((lo, up))
        bad = torch.isnan(lo) | torch.isnan(up)
        a_l, b_l, a_u, b_u = (torch.where(finite, x, torch.zeros_like(x)) for x in lines)
        b_l = torch.where(finite, b_l, f_lo - 1e-6).masked_fill(bad, NAN)
        b_u = torch.where(finite, b_u, f_up + 1e-6).masked_fill(bad, NAN)
        return a_l, b_l, a_u, b_u

    def backward(self, A, in_bounds, alpha: Tensor | None = None, **kw):
        return Smooth.backward(self, A, in_bounds, alpha=alpha)


# ------------------------------------------------------------------ non-convex: GELU, Sin, Cos


class Sampled(Smooth):
    """Lines for a function of bounded curvature on any interval: slope s anywhere in the range
    of f' sampled at N points of [l, u], s = s_min + t·(s_max − s_min) (CROWN: the chord's
    slope); then the extremes of g = f − s·h over [l, u]. On each cell [h_i, h_i+1] of an
    N-point grid, g minus its chord vanishes at both ends and has g'' = f'', so
    g <= max(g_i, g_i+1) + M⁻·δ²/8 with M⁻ >= sup(−f'') and g >= min(g_i, g_i+1) − M⁺·δ²/8
    with M⁺ >= sup f'' (δ the largest cell). Each intercept is also capped by the constant
    bound f_up − min(s·l, s·u) (resp. f_lo − max(s·l, s·u)), sound for any slope."""

    points = 33

    def curvature(self, lo: Tensor, up: Tensor, f_lo: Tensor, f_up: Tensor) -> tuple[Tensor, Tensor]:
        """(M⁺ >= sup f'', M⁻ >= sup −f'') on [lo, up] (both >= 0)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _grid(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        u = torch.linspace(0, 1, self.points, dtype=lo.dtype, device=lo.device)
        h = lo.unsqueeze(-1) + (up - lo).unsqueeze(-1) * u
        h[..., 0], h[..., -1] = lo, up
        h = torch.minimum(torch.maximum(h, lo.unsqueeze(-1)), up.unsqueeze(-1))
        delta = (h[..., 1:] - h[..., :-1]).amax(-1)
        d = self.deriv64(h)
        return h, self.fn(h), d, delta

    def default_t(self, lo, up):
        h, g, d, _ = self._grid(lo, up)
        chord = (g[..., -1] - g[..., 0]) / (up - lo)
        s_min, s_max = d.amin(-1), d.amax(-1)
        span = s_max - s_min
        t = torch.where(span > 0, (chord - s_min) / torch.where(span > 0, span, 1.0), 0.5).clamp(0, 1)
        return t, t

    def lines64(self, lo, up, t_u, t_l):
        h, fh, d, delta = self._grid(lo, up)
        f_lo, f_up = self.bounds64(lo, up)
        m_plus, m_minus = self.curvature(lo, up, f_lo, f_up)
        s_min, s_max = d.amin(-1), d.amax(-1)
        s_u, s_l = _lerp(s_min, s_max, t_u), _lerp(s_min, s_max, t_l)
        g_u = (fh - s_u.unsqueeze(-1) * h).amax(-1) + m_minus * delta**2 / 8
        g_l = (fh - s_l.unsqueeze(-1) * h).amin(-1) - m_plus * delta**2 / 8
        b_u = torch.minimum(g_u, f_up - torch.minimum(s_u * lo, s_u * up))
        b_l = torch.maximum(g_l, f_lo - torch.maximum(s_l * lo, s_l * up))
        return s_l, b_l, s_u, b_u


def _contains(lo: Tensor, up: Tensor, phase: float) -> Tensor:
    """Whether [lo, up] contains a point phase + 2kπ (erring towards yes near the ends)."""
    two_pi = 2 * math.pi
    k = torch.ceil((lo - phase) / two_pi - 1e-9)
    x = phase + two_pi * k
    return x <= up + 1e-9 * (1 + up.abs())


class _Periodic(Sampled):
    """sin / cos: IBP from the end values and the extrema inside; f'' = −f, so the curvature
    bounds are M⁺ = max(0, −f_lo) and M⁻ = max(0, f_up)."""

    peak = 0.0  # a maximum of f (minima at peak + π)

    def bounds64(self, lo, up):
        f_l, f_u = self.fn(lo), self.fn(up)
        big = ~((up - lo) < 2 * math.pi) | (torch.maximum(lo.abs(), up.abs()) > 2.0**40)
        top = torch.where(_contains(lo, up, self.peak) | big, 1.0, torch.maximum(f_l, f_u))
        bottom = torch.where(_contains(lo, up, self.peak + math.pi) | big, -1.0, torch.minimum(f_l, f_u))
        nan = torch.isnan(lo) | torch.isnan(up)
        return bottom.masked_fill(nan, NAN), top.masked_fill(nan, NAN)

    def curvature(self, lo, up, f_lo, f_up):
        return (-f_lo).clamp(min=0), f_up.clamp(min=0)


class Sin(_Periodic):
    """sin h: see :class:`Sampled` (lines) and :class:`_Periodic` (IBP)."""

    kind = "sin"
    peak = math.pi / 2

    def fn(self, x):
        return torch.sin(x)

    def deriv64(self, x):
        return torch.cos(x)


class Cos(_Periodic):
    """cos h: see :class:`Sampled` (lines) and :class:`_Periodic` (IBP)."""

    kind = "cos"
    peak = 0.0

    def fn(self, x):
        return torch.cos(x)

    def deriv64(self, x):
        return -torch.sin(x)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _gelu_tanh_derivs(x: Tensor) -> tuple[Tensor, Tensor]:
    """f' and f'' of 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    c, k = _SQRT_2_OVER_PI, 0.044715
    v = c * (x + k * x**3)
    v1, v2 = c * (1 + 3 * k * x**2), 6 * c * k * x
    T = torch.tanh(v)
    s = 1 - T * T
    t1 = s * v1
    t2 = s * v2 - 2 * T * s * v1 * v1
    return 0.5 * (1 + T) + 0.5 * x * t1, t1 + 0.5 * x * t2


class Gelu(Sampled):
    """GELU h·Φ(h) (or its tanh approximation): decreasing down to its minimum at h* ≈ −0.7518,
    increasing after. IBP: the larger end value above, f(h*) below when h* is inside (else the
    smaller end value). Lines: :class:`Sampled` with f'' = φ(h)(2 − h²) in [−2φ(2), 2φ(0)]
    (M⁺ = 0.7979, M⁻ = 0.1080); for the tanh form the curvature bounds are measured on a
    dense grid with a 10% margin (f'' vanishes beyond |h| = 12)."""

    kind = "gelu"

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"unknown GELU approximation {approximate!r}")
        self.approximate = approximate
        x = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
        if approximate == "none":
            self.m_plus, self.m_minus = 0.7979, 0.1080
        else:
            f2 = _gelu_tanh_derivs(x)[1]
            self.m_plus, self.m_minus = 1.1 * f2.max().item() + 1e-6, 1.1 * (-f2).max().item() + 1e-6
        a, b = torch.tensor(-1.5, dtype=torch.float64), torch.tensor(-0.3, dtype=torch.float64)
        for _ in range(100):  # f' < 0 left of the minimum, > 0 right of it
            m = (a + b) / 2
            a, b = (m, b) if self.deriv64(m) < 0 else (a, m)
        self.x_min = float(a)
        self.f_min = float(self.fn(torch.stack([a, b])).min()) - 1e-12

    def describe(self):
        return "" if self.approximate == "none" else "tanh"

    def fn(self, x):
        return F.gelu(x, approximate=self.approximate)

    def deriv64(self, x):
        if self.approximate == "tanh":
            return _gelu_tanh_derivs(x)[0]
        return torch.special.ndtr(x) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def bounds64(self, lo, up):
        f_l = torch.where(lo == -INF, 0.0, self.fn(lo))  # the limit at -inf (f < 0 left of h*)
        f_u = torch.where(up == -INF, 0.0, self.fn(up))
        inside = (lo <= self.x_min + 1e-6) & (up >= self.x_min - 1e-6)
        return torch.where(inside, self.f_min, torch.minimum(f_l, f_u)), torch.maximum(f_l, f_u)

    def curvature(self, lo, up, f_lo, f_up):
        return torch.full_like(lo, self.m_plus), torch.full_like(lo, self.m_minus)



# ------------------------------------------------------------------ rules


@register(onnx=["Exp"], fx=["exp"])
def _exp(ctx: Ctx):
    return Exp(), ctx.dyn


@register(onnx=["Log"], fx=["log"])
def _log(ctx: Ctx):
    return Log(), ctx.dyn


@register(onnx=["Reciprocal"], fx=["OnnxReciprocal", "reciprocal"])
def _reciprocal(ctx: Ctx):
    return Reciprocal(), ctx.dyn


@register(onnx=["Sqrt"], fx=["OnnxSqrt", "sqrt"])
def _sqrt(ctx: Ctx):
    return Sqrt(), ctx.dyn


def _scalar(ctx: Ctx, value, what: str) -> float:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.numel() == 0 or not bool((t == t.flatten()[0]).all()):
        ctx.unsupported(f"{what} must be one constant (got a tensor of shape {tuple(t.shape)})")
    v = float(t.flatten()[0])
    if not math.isfinite(v):
        ctx.unsupported(f"{what} {v} is not finite")
    return v


@register(onnx=["Pow"], fx=["OnnxPow", "pow"])
def _pow(ctx: Ctx):
    base, expo = ctx.node.args[0], (ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.kwargs.get("exponent"))
    expo_value = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("exponent")
    if ctx.dynamic(base) and not ctx.dynamic(expo):
        return Pow(_scalar(ctx, expo_value, "the exponent")), [base]
    if ctx.dynamic(base):
        ctx.unsupported("a non-constant exponent")
    # c ** x with a constant base c > 0: exp(x·ln c)
    from certkit.bounds.ops.linear import ElementwiseAffine

    c = _scalar(ctx, ctx.args[0], "the base of c ** x")
    if c <= 0:
        ctx.unsupported(f"c ** x with a base c = {c} <= 0")
    scale = ctx.constant(math.log(c))
    scaled = ctx.emit(ElementwiseAffine(scale, None, ctx.shape(expo)), [expo], ctx.shape(expo))
    return Exp(), [scaled]


def _arg(ctx: Ctx, i: int, name: str, default):
    if len(ctx.args) > i:
        return ctx.args[i]
    return ctx.kwargs.get(name, default)


@register(onnx=["Softplus"], fx=["Softplus", "softplus"])
def _softplus(ctx: Ctx):
    if isinstance(ctx.target, torch.nn.Module):
        beta, threshold = ctx.target.beta, ctx.target.threshold
    else:
        beta, threshold = _arg(ctx, 1, "beta", 1.0), _arg(ctx, 2, "threshold", 20.0)
    if not float(beta) > 0:
        ctx.unsupported(f"Softplus with beta = {beta} <= 0")
    return Softplus(float(beta), float(threshold)), ctx.dyn


@register(onnx=["Elu"], fx=["ELU", "elu"])
def _elu(ctx: Ctx):
    alpha = ctx.target.alpha if isinstance(ctx.target, torch.nn.Module) else _arg(ctx, 1, "alpha", 1.0)
    if not 0 <= float(alpha) <= 1:
        ctx.unsupported(f"ELU with alpha = {alpha}: only 0 <= alpha <= 1 (convex) is supported")
    return Elu(float(alpha)), ctx.dyn


@register(onnx=["Erf"], fx=["OnnxErf", "erf"])
def _erf(ctx: Ctx):
    return Erf(), ctx.dyn


@register(onnx=["Gelu"], fx=["GELU", "gelu"])  # ONNX Gelu reaches the graph as its Erf / Tanh form (onnx_io)
def _gelu(ctx: Ctx):
    if isinstance(ctx.target, torch.nn.Module):
        approximate = ctx.target.approximate
    else:
        approximate = _arg(ctx, 1, "approximate", "none")
    if approximate not in ("none", "tanh"):
        ctx.unsupported(f"GELU approximation {approximate!r}")
    return Gelu(approximate), ctx.dyn


@register(onnx=["Sin"], fx=["sin"])
def _sin(ctx: Ctx):
    return Sin(), ctx.dyn


@register(onnx=["Cos"], fx=["cos"])
def _cos(ctx: Ctx):
    return Cos(), ctx.dyn


def constant_over(ctx: Ctx, c, x: fx.Node):
    """c / x with a constant c: c · Reciprocal(x) (a Reciprocal node, then a constant scaling)."""
    from certkit.bounds.ops.linear import ElementwiseAffine

    shape = ctx.shape(x)
    recip = ctx.emit(Reciprocal(), [x], shape)
    return ElementwiseAffine(ctx.constant(c), None, shape), [recip]
