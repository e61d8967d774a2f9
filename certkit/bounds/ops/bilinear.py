"""Products of two bounded tensors: Mul, Div and MatMul of two activations, and W @ x with a
constant W on the left.

The nonlinear products are bounded with the bilinear (McCormick) planes. For x in [xl, xu]
and y in [yl, yu], (x - xl)(y - yl) >= 0 and (xu - x)(yu - y) >= 0 give the lower planes

    x·y >= yl·x + xl·y - xl·yl,        x·y >= yu·x + xu·y - xu·yu,

and (xu - x)(y - yl) >= 0 and (x - xl)(yu - y) >= 0 the upper planes

    x·y <= yl·x + xu·y - xu·yl,        x·y <= yu·x + xl·y - xl·yu.

A convex combination (weight t on the first of each pair) of valid lower (upper) planes is a
valid lower (upper) plane, so every t in [0, 1] is sound ("Robustness Verification for
Transformers", Shi et al. 2020; the auto_LiRPA paper, Xu et al. 2020). α-CROWN tunes
α = (t for the lower mix, t for the upper mix) per output element and specification row (a
trailing axis of 2); an element takes the first where its coefficient in A is >= 0 (the lower
planes), the second elsewhere. CROWN's choice (``alpha=None``) is, per output element, the t
whose plane, concretised over the operands' own box, bounds that output best (exact for one
product; for a matrix product the best of a few t, t = 1/2 giving the centred planes
A·xy >= (A·cy)·x + (A·cx)·y - A·cx·cy - |A|·rx·ry, i.e. centre/radius interval arithmetic).
α-CROWN starts from 1/2 where the engine gives ``default_alpha`` the first operand's bounds
only, from CROWN's choice when it gives both.

Soundness in floating point: the planes are computed in float64 from the caller's bounds
(exact for float32 bounds up to a relative 1e-16) and their intercepts loosened by a few
units of rounding of the caller's dtype times the magnitude of the products, which covers
the rounding of the product itself in the forward pass, of the coefficients when cast back,
and of the float64 sums. Elements with an infinite or NaN bound (or whose planes overflow
the caller's dtype) get the trivial bound: a specification row that touches them with a
nonzero coefficient gets a -inf bias, never a finite number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import Tensor

from certkit.bounds.ops.base import Activation, Op, center_radius, clamp01, dims, sum_to
from certkit.bounds.ops.registry import Ctx, register

Shape = tuple[int, ...]
_EPS64 = torch.finfo(torch.float64).eps


def _left_pad(shape: Sequence[int], rank: int) -> Shape:
    """``shape`` with leading 1s up to ``rank`` axes (how it broadcasts against a larger rank)."""
    return (1,) * (rank - len(shape)) + tuple(shape)


def _mul_bound(a: Tensor, b: Tensor) -> Tensor:
    """a·b of two interval ends, with 0·inf = 0: every real point of the box is finite, so a
    factor that is exactly 0 makes the product 0 whatever the other end's (infinite) value.
    NaN stays NaN."""
    p = a * b
    zero_inf = ((a == 0) & b.isinf()) | ((b == 0) & a.isinf())
    return torch.where(zero_inf, torch.zeros_like(p), p)


def _finite(*ts: Tensor) -> Tensor:
    """Element-wise: every tensor is finite there (broadcast)."""
    ok = torch.isfinite(ts[0])
    for t in ts[1:]:
        ok = ok & torch.isfinite(t)
    return ok


def _rounding(dtype: torch.dtype, terms: int, sums: int = 0) -> float:
    """Relative allowance for the rounding of a sum of ``terms`` products evaluated in ``dtype``
    (the forward pass), and of the relaxation computed in float64 (a few such sums, and a sum of
    ``sums`` terms more), with margin."""
    return (terms + 8) * torch.finfo(dtype).eps + 8 * (terms + sums + 8) * _EPS64


def _trivial_rows(A: Tensor, bad: Tensor, bias: Tensor) -> Tensor:
    """``bias`` (B, S) set to -inf in every row whose coefficient tensor A touches an element
    marked ``bad`` (no finite relaxation there)."""
    hit = ((A != 0) & bad).flatten(2).any(-1)
    return torch.where(hit, torch.full_like(bias, -math.inf), bias)


_GRID = (0.5, 0.0, 1.0, 0.25, 0.75)  # the t a matrix product's CROWN choice and IBP try (first best wins)


def _plane_bounds(xl: Tensor, xu: Tensor, yl: Tensor, yu: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Bounds of every output of X @ Y over the operands' box from its lower and upper planes
    with weight t (the same for all terms), concretised there: with t fixed, each is (x-coef
    over X) + (y-coef over Y) + intercept, each a product of matrices (the x-coefficient of a
    term does not depend on X's row, the y-coefficient not on Y's column). Sound bounds of XY."""
    cx, rx = center_radius((xl, xu))
    cy, ry = center_radius((yl, yu))
    a_x = t * yl + (1 - t) * yu
    over_x, spread_x = cx @ a_x, rx @ a_x.abs()
    ay_l, ay_u = t * xl + (1 - t) * xu, t * xu + (1 - t) * xl
    low = over_x - spread_x + ay_l @ cy - ay_l.abs() @ ry - t * (xl @ yl) - (1 - t) * (xu @ yu)
    high = over_x + spread_x + ay_u @ cy + ay_u.abs() @ ry - t * (xu @ yl) - (1 - t) * (xl @ yu)
    return low, high


def _best_planes(xl: Tensor, xu: Tensor, yl: Tensor, yu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per output of X @ Y, the t in ``_GRID`` whose lower (upper) planes bound it best over the
    operands' box, and those bounds: (t_lower, t_upper, lower, upper). t = 1/2 gives the
    centre/radius interval cx·cy ± (|cx|·ry + rx·|cy| + rx·ry), so the best is never looser."""
    best_l = best_u = t_l = t_u = None
    for t in _GRID:
        low, high = _plane_bounds(xl, xu, yl, yu, t)
        if best_l is None:
            best_l, best_u = low, high
            t_l, t_u = torch.full_like(low, t), torch.full_like(high, t)
            continue
        better_l, better_u = low > best_l, high < best_u
        best_l, t_l = torch.where(better_l, low, best_l), torch.where(better_l, t, t_l)
        best_u, t_u = torch.where(better_u, high, best_u), torch.where(better_u, t, t_u)
    return t_l, t_u, best_l, best_u


def _best_t_single(xl: Tensor, xu: Tensor, yl: Tensor, yu: Tensor) -> tuple[Tensor, Tensor]:
    """For one product x·y, the t of the lower and of the upper mix whose plane is tightest over
    the box (W = (xu - xl)(yu - yl)): the lower mix is exact at (xl, yu) and (xu, yl), and
    W·(1 - t) resp. W·t below x·y at (xl, yl) and (xu, yu); balancing the two,
    t = (xu·yu - xl·yl + W) / 2W clamped to [0, 1], makes its minimum over the box the exact
    minimum of x·y (likewise t = (xu·yl - xl·yu + W) / 2W for the upper mix)."""
    W = (xu - xl) * (yu - yl)
    pos = W > 0
    safe = torch.where(pos, 2 * W, torch.ones_like(W))
    half = torch.full_like(W, 0.5)
    t_l = torch.where(pos, ((xu * yu - xl * yl + W) / safe).clamp(0, 1), half)
    t_u = torch.where(pos, ((xu * yl - xl * yu + W) / safe).clamp(0, 1), half)
    return t_l, t_u


def _pick(A: Tensor, alpha: Tensor | None, default: tuple[Tensor, Tensor] | None, shape: Sequence[int]) -> Tensor:
    """t per element of A (B, S, *shape), float64: alpha (B, S, *, 2) clamped to [0, 1], its
    first entry where A >= 0 and its second elsewhere; without alpha the ``default`` pair."""
    B, S = A.shape[:2]
    if alpha is None:
        t_l, t_u = default
    else:
        a = clamp01(alpha.double()).reshape(B, S, *shape, 2)
        t_l, t_u = a[..., 0], a[..., 1]
    return torch.where(A.reshape(B, S, *shape) >= 0, t_l, t_u)


# ------------------------------------------------------------------ element-wise product


class Product(Activation):
    """Element-wise x·y of two bounded tensors, broadcast against each other (per-sample shapes
    left-padded to one rank, like :class:`~certkit.bounds.ops.arithmetic.Add`).

    IBP: the minimum and maximum of the four products of interval ends (exact: a bilinear
    function takes its extremes on the corners of a box; rounding to nearest is monotone,
    so the rounded products of the corners bound every rounded product inside).
    CROWN: the t-mixed McCormick planes of the module docstring, α (B, S, *out, 2) per output
    element and specification row (``tunable``). Exact when either factor's interval is a
    single point.

    ``same``: both inputs are the same node (x·x). Then IBP is [0 or min(l², u²), max(l², u²)]
    and the lines are those of the convex square: below, the tangent at l + t(u − l) (every
    tangent of a convex function lies below it; CROWN's t puts it at the point of [l, u]
    nearest 0, which makes the lower bound over the box exact; α-CROWN starts there too);
    above, the chord (l + u)·x − l·u (a convex function lies below its chord on [l, u]). All
    the coefficients go to the first input (the engine sums the two, which are the same node).
    """

    kind = "mul"
    tunable = True

    def __init__(self, a_shape: Sequence[int], b_shape: Sequence[int], same: bool = False):
        self.in_shapes = (tuple(a_shape), tuple(b_shape))
        if same and self.in_shapes[0] != self.in_shapes[1]:
            raise ValueError("a product of a node with itself has one shape")
        rank = max(len(a_shape), len(b_shape))
        self.padded = tuple(_left_pad(s, rank) for s in self.in_shapes)
        try:
            self.out_shape: Shape = tuple(torch.broadcast_shapes(*self.padded))
        except RuntimeError as e:
            raise ValueError(f"shapes {self.in_shapes} do not broadcast") from e
        self.same = same

    def _views(self, x: Tensor, y: Tensor, lead: int = 1) -> tuple[Tensor, Tensor]:
        """x, y (lead axes, *shape) viewed with their padded shapes."""
        if len(self.in_shapes[0]) == len(self.in_shapes[1]):
            return x, y
        return x.reshape(*x.shape[:lead], *self.padded[0]), y.reshape(*y.shape[:lead], *self.padded[1])

    def forward(self, x, y):
        x, y = self._views(x, y)
        return x * y

    def default_alpha(self, lo: Tensor, up: Tensor, y_lo: Tensor | None = None,
                      y_up: Tensor | None = None) -> Tensor:
        """α (B, *out, 2): CROWN's choice when both operands' bounds are known (x·x: always),
        else 1/2 (the centred planes)."""
        if self.same:
            y_lo, y_up = lo, up
        if y_lo is None or y_up is None:
            return torch.full((lo.shape[0], *self.out_shape, 2), 0.5, dtype=lo.dtype, device=lo.device)
        bounds = [v.double() for v in (*self._views(lo, y_lo), *self._views(up, y_up))]
        t_l, t_u = self._default_t(bounds[0], bounds[2], bounds[1], bounds[3])
        shape = (lo.shape[0], *self.out_shape)
        return torch.stack([t_l.expand(shape), t_u.expand(shape)], -1).to(lo.dtype)

    def _default_t(self, xl: Tensor, xu: Tensor, yl: Tensor, yu: Tensor) -> tuple[Tensor, Tensor]:
        """CROWN's t for the lower and the upper lines (see the class docstring)."""
        if self.same:  # tangent at the point of [l, u] nearest 0
            width = xu - xl
            t = torch.where(width > 0, -xl / torch.where(width > 0, width, torch.ones_like(width)), 0.5)
            return t.clamp(0, 1), torch.full_like(t, 0.5)
        return _best_t_single(xl, xu, yl, yu)

    def interval(self, bx, by):
        if self.same:
            lo, up = bx
            sq_l, sq_u = lo * lo, up * up
            low = torch.where(lo > 0, sq_l, torch.where(up < 0, sq_u, torch.zeros_like(sq_l)))
            return low, torch.maximum(sq_l, sq_u)
        (xl, yl), (xu, yu) = self._views(bx[0], by[0]), self._views(bx[1], by[1])
        corners = [_mul_bound(a, b) for a in (xl, xu) for b in (yl, yu)]
        low = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(corners[2], corners[3]))
        high = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
        return low, high

    def _lines(self, xl: Tensor, xu: Tensor, yl: Tensor, yu: Tensor, t: Tensor):
        """(x-coef, y-coef, intercept) of the lower and upper planes (float64, weight t)."""
        s = 1 - t
        if self.same:
            p = xl + t * (xu - xl)  # tangent point
            zero = torch.zeros_like(p)
            return (2 * p, zero, -p * p), (xl + xu, zero, -xl * xu)
        a_x = t * yl + s * yu  # the same for the lower and the upper mix
        lower = (a_x, t * xl + s * xu, -(t * xl * yl + s * xu * yu))
        upper = (a_x, t * xu + s * xl, -(t * xu * yl + s * xl * yu))
        return lower, upper

    def backward(self, A, in_bounds, alpha: Tensor | None = None, **kw):
        B, S = A.shape[:2]
        (bx, by) = in_bounds
        (xl, yl), (xu, yu) = self._views(bx[0], by[0]), self._views(bx[1], by[1])
        xl, xu, yl, yu = (v.unsqueeze(1).double() for v in (xl, xu, yl, yu))
        ok = _finite(xl, xu, yl, yu)
        xl, xu, yl, yu = (torch.where(ok, v, torch.zeros_like(v)) for v in (xl, xu, yl, yu))
        t = _pick(A, alpha, self._default_t(xl, xu, yl, yu) if alpha is None else None, self.out_shape)
        lower, upper = self._lines(xl, xu, yl, yu, t)
        reach = torch.maximum(xl.abs(), xu.abs()) * torch.maximum(yl.abs(), yu.abs())
        slack = _rounding(A.dtype, 0, math.prod(self.out_shape)) * (1 + 3 * reach)
        pos = A >= 0
        a_x = torch.where(pos, lower[0], upper[0])
        a_y = torch.where(pos, lower[1], upper[1])
        icpt = torch.where(pos, lower[2] - slack, upper[2] + slack)
        too_big = torch.finfo(A.dtype).max
        ok = ok & (a_x.abs() <= too_big) & (a_y.abs() <= too_big) & (icpt.abs() <= too_big)
        A64 = torch.where(ok, A.double(), torch.zeros((), dtype=torch.float64, device=A.device))
        A_x, A_y = (A64 * a_x).to(A.dtype), (A64 * a_y).to(A.dtype)
        bias = _trivial_rows(A, ~ok, (A64 * icpt).flatten(2).sum(-1).to(A.dtype))
        if self.same:
            return [A_x, torch.zeros_like(A_x)], bias
        return [sum_to(coef, padded).reshape(B, S, *shape)
                for coef, padded, shape in zip((A_x, A_y), self.padded, self.in_shapes)], bias

    def describe(self):
        if self.same:
            return f"square {dims(self.out_shape)}"
        return f"{dims(self.in_shapes[0])} * {dims(self.in_shapes[1])}"


# ------------------------------------------------------------------ matrix products


def _matmul_shape(a_view: Shape, b_view: Shape) -> Shape:
    """The shape of a_view @ b_view (both with at least 2 axes and one rank)."""
    return (*torch.broadcast_shapes(a_view[:-2], b_view[:-2]), a_view[-2], b_view[-1])


class MatMulBounded(Activation):
    """X @ Y of two bounded tensors (attention's Q·Kᵀ and weights·V): X (..., n, k), Y (..., k, m),
    the leading axes broadcast.

    ``a_view`` / ``b_view``: each operand's matrix shape (its full one-sample shape, left-padded
    to one rank); ``a_shape`` / ``b_shape`` / ``out_shape``: the per-sample shapes of the engine's
    tensors (default: the views), reshaped to and from the views.

    IBP: per output, the best of the planes' bounds over the operands' box for a few weights t
    (see ``_best_planes``; t = 1/2 is centre/radius interval arithmetic, XY ∈ cx·cy ± (|cx|·ry +
    rx·|cy| + rx·ry)), in float64, widened by the rounding allowance of a k-term dot product in
    the caller's dtype. An output whose row of X or column of Y has an infinite or NaN bound
    gets (-inf, inf).
    CROWN: every product term X[i,p]·Y[p,j] takes the McCormick planes of the module docstring
    with the t of its output element (i, j) and row (α (B, S, *out, 2) as for
    :class:`Product`; CROWN's t is chosen by bounding each output over the operands' box);
    summed over p this is batched matrix work: with P = A·t, Q = A·(1 − t),

        coef(X) = P·ylᵀ + Q·yuᵀ,   coef(Y) = xlᵀ·(P⁺ + Q⁻) + xuᵀ·(Q⁺ + P⁻),
        bias = −Σ P⁺∘(xl·yl) + Q⁺∘(xu·yu) + P⁻∘(xu·yl) + Q⁻∘(xl·yu),

    loosened by the rounding allowance times Σ|A|∘(1 + |X|max·|Y|max).
    """

    kind = "matmul"
    tunable = True

    def __init__(self, a_view: Sequence[int], b_view: Sequence[int], a_shape: Sequence[int] | None = None,
                 b_shape: Sequence[int] | None = None, out_shape: Sequence[int] | None = None):
        a_view, b_view = tuple(a_view), tuple(b_view)
        if len(a_view) < 2 or len(b_view) < 2 or a_view[-1] != b_view[-2]:
            raise ValueError(f"cannot multiply matrices of shapes {a_view} and {b_view}")
        rank = max(len(a_view), len(b_view))
        self.a_view, self.b_view = _left_pad(a_view, rank), _left_pad(b_view, rank)
        self.out_view = _matmul_shape(self.a_view, self.b_view)
        self.a_shape = self.a_view if a_shape is None else tuple(a_shape)
        self.b_shape = self.b_view if b_shape is None else tuple(b_shape)
        self.out_shape = self.out_view if out_shape is None else tuple(out_shape)
        if math.prod(self.out_shape) != math.prod(self.out_view):
            raise ValueError(f"output shape {self.out_shape} does not hold {self.out_view}")
        self.k = self.a_view[-1]

    def _views(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], *self.a_view), y.reshape(y.shape[0], *self.b_view)

    def forward(self, x, y):
        x, y = self._views(x, y)
        return torch.matmul(x, y).reshape(x.shape[0], *self.out_shape)

    def default_alpha(self, lo: Tensor, up: Tensor, y_lo: Tensor | None = None,
                      y_up: Tensor | None = None) -> Tensor:
        """α (B, *out, 2): CROWN's choice when both operands' bounds are known, else 1/2."""
        if y_lo is None or y_up is None:
            return torch.full((lo.shape[0], *self.out_shape, 2), 0.5, dtype=lo.dtype, device=lo.device)
        (xl, yl), (xu, yu) = self._views(lo.double(), y_lo.double()), self._views(up.double(), y_up.double())
        t_l, t_u = _best_planes(xl, xu, yl, yu)[:2]
        return torch.stack([t_l, t_u], -1).reshape(lo.shape[0], *self.out_shape, 2).to(lo.dtype)

    @staticmethod
    def _bad_outputs(xl, xu, yl, yu) -> Tensor:
        """Outputs whose row of X or column of Y has a non-finite bound."""
        bad_x = ~_finite(xl, xu)
        bad_y = ~_finite(yl, yu)
        return bad_x.any(-1, keepdim=True) | bad_y.any(-2, keepdim=True)

    def interval(self, bx, by):
        dtype = bx[0].dtype
        B = bx[0].shape[0]
        (xl, yl), (xu, yu) = self._views(bx[0].double(), by[0].double()), self._views(bx[1].double(),
                                                                                       by[1].double())
        bad = self._bad_outputs(xl, xu, yl, yu)
        xl, xu, yl, yu = (torch.where(torch.isfinite(v), v, torch.zeros_like(v)) for v in (xl, xu, yl, yu))
        low, high = _best_planes(xl, xu, yl, yu)[2:]
        mag = torch.maximum(xl.abs(), xu.abs()) @ torch.maximum(yl.abs(), yu.abs())
        slack = _rounding(dtype, self.k) * mag + self.k * torch.finfo(dtype).tiny
        inf = torch.full_like(low, math.inf)
        lo = torch.where(bad, -inf, low - slack).reshape(B, *self.out_shape)
        up = torch.where(bad, inf, high + slack).reshape(B, *self.out_shape)
        return lo.to(dtype), up.to(dtype)

    def backward(self, A, in_bounds, alpha: Tensor | None = None, **kw):
        B, S = A.shape[:2]
        (bx, by) = in_bounds
        (xl, yl), (xu, yu) = self._views(bx[0], by[0]), self._views(bx[1], by[1])
        xl, xu, yl, yu = (v.unsqueeze(1).double() for v in (xl, xu, yl, yu))
        bad = self._bad_outputs(xl, xu, yl, yu)  # (B, 1, *out_view)
        xl, xu, yl, yu = (torch.where(torch.isfinite(v), v, torch.zeros_like(v)) for v in (xl, xu, yl, yu))
        Av = A.reshape(B, S, *self.out_view).double()
        t = _pick(Av, alpha, _best_planes(xl, xu, yl, yu)[:2] if alpha is None else None, self.out_view)
        P, Q = Av * t, Av * (1 - t)
        Pp, Pn, Qp, Qn = P.clamp(min=0), P.clamp(max=0), Q.clamp(min=0), Q.clamp(max=0)
        tr = lambda m: m.transpose(-1, -2)  # noqa: E731
        coef_x = P @ tr(yl) + Q @ tr(yu)
        coef_y = tr(xl) @ (Pp + Qn) + tr(xu) @ (Qp + Pn)
        bias = -(Pp * (xl @ yl) + Qp * (xu @ yu) + Pn * (xu @ yl) + Qn * (xl @ yu))
        reach = torch.maximum(xl.abs(), xu.abs()) @ torch.maximum(yl.abs(), yu.abs())
        n_out = math.prod(self.out_view)
        slack = _rounding(A.dtype, self.k, n_out) * Av.abs() * (1 + reach)
        bias = (bias - slack).flatten(2).sum(-1)
        ok = torch.isfinite(bias) & (bias.abs() <= torch.finfo(A.dtype).max)
        bias = torch.where(ok, bias, torch.full_like(bias, -math.inf)).to(A.dtype)
        bias = _trivial_rows(Av, bad, bias)
        A_x = sum_to(coef_x, self.a_view).reshape(B, S, *self.a_shape).to(A.dtype)
        A_y = sum_to(coef_y, self.b_view).reshape(B, S, *self.b_shape).to(A.dtype)
        return [A_x, A_y], bias

    def describe(self):
        return f"{dims(self.a_view)} @ {dims(self.b_view)}"


class ConstantMatMul(Op):
    """W @ x with a constant W (..., n, k) and a bounded x (..., k, m): affine and exact.

    ``x_view``: x's matrix shape (its full one-sample shape, left-padded to W's rank or more);
    ``x_shape`` / ``out_shape``: the per-sample shapes of the engine's tensors.
    IBP: W·c ± |W|·r. CROWN: coef(x) = Wᵀ·A (summed over broadcast axes), no bias.
    """

    kind = "matmul_const"
    affine = True
    mixing = True

    def __init__(self, w: Tensor, x_view: Sequence[int], x_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None):
        x_view = tuple(x_view)
        if w.dim() < 2 or len(x_view) < 2 or w.shape[-1] != x_view[-2]:
            raise ValueError(f"cannot multiply matrices of shapes {tuple(w.shape)} and {x_view}")
        rank = max(w.dim(), len(x_view))
        self.raw = w  # kept as given (a live parameter stays live)
        self.w_view = _left_pad(w.shape, rank)
        self.x_view = _left_pad(x_view, rank)
        self.out_view = _matmul_shape(self.w_view, self.x_view)
        self.x_shape = self.x_view if x_shape is None else tuple(x_shape)
        self.out_shape = self.out_view if out_shape is None else tuple(out_shape)
        if math.prod(self.out_shape) != math.prod(self.out_view):
            raise ValueError(f"output shape {self.out_shape} does not hold {self.out_view}")

    @property
    def w(self) -> Tensor:
        return self.raw.reshape(self.w_view)

    def forward(self, x):
        B = x.shape[0]
        return torch.matmul(self.w, x.reshape(B, *self.x_view)).reshape(B, *self.out_shape)

    def interval(self, b_in):
        B = b_in[0].shape[0]
        c, r = center_radius(b_in)
        mid = torch.matmul(self.w, c.reshape(B, *self.x_view))
        rad = torch.matmul(self.w.abs(), r.reshape(B, *self.x_view))
        return (mid - rad).reshape(B, *self.out_shape), (mid + rad).reshape(B, *self.out_shape)

    def backward(self, A, in_bounds, **kw):
        B, S = A.shape[:2]
        coef = self.w.transpose(-1, -2) @ A.reshape(B, S, *self.out_view)
        return [sum_to(coef, self.x_view).reshape(B, S, *self.x_shape)], None

    def describe(self):
        return f"{dims(self.w.shape)} @ {dims(self.x_view)}"

    def num_params(self):
        return self.w.numel()


# ------------------------------------------------------------------ rules (called by arithmetic.py)


def _same_node(ctx: Ctx, a: fx.Node, b: fx.Node) -> bool:
    return a is b or (ctx.bounded.get(a) is not None and ctx.bounded.get(a) == ctx.bounded.get(b))


def product(ctx: Ctx, a: fx.Node, b: fx.Node):
    """Element-wise a * b of two bounded tensors (a node with itself: its square)."""
    sa, sb = ctx.shape(a), ctx.shape(b)
    same = _same_node(ctx, a, b)
    try:
        op = Product(sa, sb, same=same)
    except (RuntimeError, ValueError) as e:
        ctx.unsupported(f"product of per-sample shapes {sa} and {sb}: {e}")
    if op.out_shape != ctx.shape():
        ctx.unsupported(f"product of per-sample shapes {sa} and {sb} broadcasts to {op.out_shape}, "
                        f"not to the output's {ctx.shape()}")
    return op, [a, b]


def quotient(ctx: Ctx, a: fx.Node, b: fx.Node):
    """Element-wise a / b of two bounded tensors: a · (1 / b), the reciprocal a node of its own."""
    try:
        from certkit.bounds.ops.smooth import Reciprocal
    except ImportError:
        ctx.unsupported("quotient of two non-constant tensors (no Reciprocal rule)")
    sa, sb = ctx.shape(a), ctx.shape(b)
    try:
        op = Product(sa, sb)
    except (RuntimeError, ValueError) as e:
        ctx.unsupported(f"quotient of per-sample shapes {sa} and {sb}: {e}")
    if op.out_shape != ctx.shape():
        ctx.unsupported(f"quotient of per-sample shapes {sa} and {sb} broadcasts to {op.out_shape}, "
                        f"not to the output's {ctx.shape()}")
    return op, [a, ctx.emit(Reciprocal(), [b], sb)]


def _views(ctx: Ctx, fa: Sequence[int], fb: Sequence[int], what: str) -> tuple[Shape, Shape]:
    """The two operands' full shapes left-padded to one rank (matrix operands only)."""
    if len(fa) < 2 or len(fb) < 2:
        ctx.unsupported(f"{what} with a vector operand (full shapes {tuple(fa)}, {tuple(fb)})")
    rank = max(len(fa), len(fb))
    return _left_pad(fa, rank), _left_pad(fb, rank)


def matmul(ctx: Ctx, a: fx.Node, b: fx.Node):
    """a @ b of two bounded tensors."""
    av, bv = _views(ctx, ctx.full(a), ctx.full(b), "product of two non-constant matrices")
    try:
        op = MatMulBounded(av, bv, ctx.shape(a), ctx.shape(b), ctx.shape())
    except (RuntimeError, ValueError) as e:
        ctx.unsupported(f"product of non-constant matrices of full shapes {av} and {bv}: {e}")
    return op, [a, b]


def constant_matmul(ctx: Ctx, w, x: fx.Node):
    """W @ x with a constant W."""
    ref = ctx.value(x)
    w = torch.as_tensor(w, dtype=ref.dtype, device=ref.device)
    wv, xv = _views(ctx, tuple(w.shape), ctx.full(x), "a constant matrix times a bounded one")
    try:
        op = ConstantMatMul(w, xv, ctx.shape(x), ctx.shape())
    except (RuntimeError, ValueError) as e:
        ctx.unsupported(f"constant matrix of shape {wv} times a bounded one of full shape {xv}: {e}")
    return op, [x]


@register(fx=["bmm"])
def _bmm(ctx: Ctx):
    """torch.bmm (3-D matrix products of a traced torch module)."""
    a, b = ctx.node.args[:2]
    if ctx.dynamic(a) and ctx.dynamic(b):
        return matmul(ctx, a, b)
    if ctx.dynamic(b):
        return constant_matmul(ctx, ctx.args[0], b)
    ctx.unsupported("bmm by a constant right operand")
