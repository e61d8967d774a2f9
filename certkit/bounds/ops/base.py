"""The base of every operator rule, and the tensor helpers the rules share.

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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Interval = tuple[Tensor, Tensor]

def center_radius(b: Interval) -> tuple[Tensor, Tensor]:
    lo, up = b
    return torch.lerp(lo, up, 0.5), (up - lo) * 0.5


def sum_to(A: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum ``A`` (B, S, *broadcast_shape) down to (B, S, *shape) (undo broadcasting)."""
    target = (A.shape[0], A.shape[1], *shape)
    if tuple(A.shape) == target:
        return A
    return A.sum_to_size(target)


def batched_dot(A: Tensor, v: Tensor) -> Tensor:
    """Σ over one sample's elements of A (B, S, *shape) times v (B or 1, 1 or S, *shape): (B, S)
    (v has S rows when α-CROWN gives each row its own relaxation)."""
    B, S = A.shape[:2]
    if v.shape[1] != 1:
        return (A * v).flatten(2).sum(-1)
    v = v.expand(B, 1, *v.shape[2:]).reshape(B, -1, 1)
    return torch.bmm(A.reshape(B, S, -1), v).squeeze(-1)


def through_lines(A: Tensor, negative: Tensor, a_l: Tensor, a_u: Tensor) -> Tensor:
    """A⁺·a_l + A⁻·a_u, ``negative`` = A⁻: coefficients through an activation's relaxation, the
    positive ones along the lower line's slopes, the negative ones along the upper line's. As
    A·a_l + A⁻·(a_u − a_l) when the slopes are shared by the rows (their difference is then taken
    on the small relaxation maps: one pass over A fewer than a ``where``), else A⁺·a_l + A⁻·a_u."""
    if a_l.dim() < 2 or a_l.shape[1] == 1 or A.shape[1] == 1:
        return torch.addcmul(A * a_l, negative, a_u - a_l)
    return torch.addcmul((A - negative) * a_l, negative, a_u)


def adjoint(fn, out: Tensor, in_shape: Sequence[int]) -> Tensor:
    """The transpose of the linear map ``fn`` (batched, inputs of per-sample ``in_shape``)
    applied to ``out``: the vector-Jacobian product at 0, by autograd (differentiable when
    gradients are on). Not ``torch.func.vjp``, whose first call imports torch._dynamo (~2 s)."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        x = out.new_zeros(out.shape[0], *in_shape).requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x), x, out, create_graph=outer)
    return grad


def bias_sum(A: Tensor, t: Tensor) -> Tensor:
    """sum over all non-(B, S) dims of ``A * t`` with t broadcast to one sample."""
    return (A * t).flatten(2).sum(-1)


# attributes in which operators cache tensors derived from their weights or intervals, and their
# empty values: copies start from these (a cache may hold tensors of an autograd graph, which
# ``copy.deepcopy`` refuses, and refills on use)
EMPTY_CACHES: dict[str, Callable[[], Any]] = {"_relaxed": lambda: None, "_derived": dict, "_on": dict}


class Op:
    """Base class of the node kinds."""

    kind = "op"
    affine = False
    mixing = False

    def __getstate__(self) -> dict:
        """What a copy takes (``copy.deepcopy`` of a model): everything but the caches, emptied."""
        return {k: EMPTY_CACHES[k]() if k in EMPTY_CACHES else v for k, v in self.__dict__.items()}

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


def dims(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


def short(t: Tensor) -> str:
    return f"{t.item():.4g}" if t.numel() == 1 else f"tensor{tuple(t.shape)}"


class Monotone(Op):
    """An operator that is monotone in its input: its IBP rule applies it to both ends."""

    def interval(self, b_in):
        return self.forward(b_in[0]), self.forward(b_in[1])


# ----------------------------------------------------------------------- nonlinear


def clamp01(alpha: Tensor) -> Tensor:
    """α clamped to [0, 1] (sound) with the gradient passed straight through (clamp's is 0 at
    0 and 1, where an optimiser would stick)."""
    return alpha + (alpha.clamp(0, 1) - alpha).detach()


class Activation(Monotone):
    """An element-wise nonlinearity bounded by two lines per neuron.

    Subclasses give ``fn`` and ``relax(l, u, alpha) -> (a_l, b_l, a_u, b_u)`` with
    ``a_l h + b_l <= fn(h) <= a_u h + b_u`` for all h in [l, u] (``b_l`` may be None for 0).
    The IBP rule applies ``fn`` to both ends, which assumes ``fn`` is non-decreasing:
    others override ``interval``. With ``tunable`` set, ``alpha`` (any values: they are
    clamped to [0, 1]) chooses among sound lines, per neuron and specification row; α-CROWN
    optimises it, starting from ``default_alpha(l, u)``, CROWN's choice (shaped like l, or
    with one trailing axis of any size for several parameters per neuron).
    """

    tunable = True

    def fn(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        return self.fn(x)

    def default_alpha(self, lo: Tensor, up: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def relax(self, lo: Tensor, up: Tensor, alpha: Tensor | None = None):
        raise NotImplementedError  # pragma: no cover - abstract

    def lines(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """``relax(lo, up)``, kept for the last interval asked for while no gradient is needed:
        every backward pass of one CROWN call through this node relaxes the same (l, u) tensors
        (matched by identity and version, so not after a change in place; the cache holds them, so
        no other tensor takes their place)."""
        return self._cached(lo, up, "lines", lambda: self.relax(lo, up))

    def _cached(self, lo: Tensor, up: Tensor, what: str, make: Callable[[], Any]) -> Any:
        """``make()``, kept beside the relaxation of (lo, up) (see :meth:`lines`) under ``what``;
        recomputed on every call while gradients are on."""
        if torch.is_grad_enabled():
            return make()
        hit = getattr(self, "_relaxed", None)
        versions = (lo._version, up._version)
        if hit is None or hit[0] is not lo or hit[1] is not up or hit[2] != versions:
            hit = self._relaxed = (lo, up, versions, {})
        if what not in hit[3]:
            hit[3][what] = make()
        return hit[3][what]

    def row_lines(self, lo: Tensor, up: Tensor, alpha: Tensor | None = None) -> tuple:
        """The lines a backward pass meets, with a row axis after the batch: the (cached) lines
        shared by every row, or α-CROWN's per row."""
        if alpha is None:
            return tuple(None if t is None else t.unsqueeze(1) for t in self.lines(lo, up))
        return self.relax(lo.unsqueeze(1), up.unsqueeze(1), alpha)

    def _shared_terms(self, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """What a backward step with lines shared by every row reads, derived once per relaxation:
        the lower slopes and the slopes' gap a_u − a_l (B, 1, *shape), and the intercepts b_l, b_u
        as columns (B, n, 1) of one batched product each."""
        def make():
            a_l, b_l, a_u, b_u = self.lines(lo, up)
            column = lambda b: None if b is None else b.reshape(b.shape[0], -1, 1)  # noqa: E731
            return a_l.unsqueeze(1), (a_u - a_l).unsqueeze(1), column(b_l), column(b_u)
        return self._cached(lo, up, "shared terms", make)

    def backward(self, A, in_bounds, alpha: Tensor | None = None, **kw):
        if alpha is not None:
            a_l, b_l, a_u, b_u = self.row_lines(*in_bounds[0], alpha)
            negative = A.clamp(max=0)
            A_in = through_lines(A, negative, a_l, a_u)
            bias = batched_dot(negative, b_u)
            if b_l is not None:
                bias = bias + batched_dot(A - negative, b_l)
            return [A_in], bias
        # A⁺·a_l + A⁻·a_u = A·a_l + A⁻·(a_u − a_l); A⁻·b_u (+ A⁺·b_l) as batched products
        a_l, gap, b_l, b_u = self._shared_terms(*in_bounds[0])
        B, S = A.shape[:2]
        negative = A.clamp(max=0)
        A_in = torch.addcmul(A * a_l, negative, gap)
        bias = torch.bmm(negative.reshape(B, S, -1), b_u.expand(B, -1, -1)).squeeze(-1)
        if b_l is not None:
            bias = bias + torch.bmm((A - negative).reshape(B, S, -1), b_l.expand(B, -1, -1)).squeeze(-1)
        return [A_in], bias


def relax_elementwise(fn, lo: Tensor, up: Tensor, alpha: Tensor | None = None):
    """Apply ``fn(lo64, up64, alpha64) -> (a_l, b_l, a_u, b_u)`` in float64 and loosen the
    intercepts by a few units of rounding of the caller's dtype, so the lines stay sound
    after the cast back and when evaluated in that dtype. Safe on infinite intervals (no
    ``0·inf``); NaN bounds give NaN lines, never finite ones."""
    dtype = lo.dtype
    lo64, up64 = lo.double(), up.double()
    a_l, b_l, a_u, b_u = fn(lo64, up64, None if alpha is None else alpha.double())
    scale = 8 * torch.finfo(dtype).eps
    reach = torch.maximum(lo64.abs(), up64.abs())
    reach = torch.where(torch.isfinite(reach), reach, torch.zeros_like(reach))  # a·h is unbounded there anyway
    b_u = b_u + scale * (1 + b_u.abs() + a_u.abs() * reach)
    b_l = b_l - scale * (1 + b_l.abs() + a_l.abs() * reach)
    bad = torch.isnan(lo64) | torch.isnan(up64)
    nan = torch.full_like(reach, float("nan"))
    return tuple(torch.where(bad, nan, t).to(dtype) for t in (a_l, b_l, a_u, b_u))
