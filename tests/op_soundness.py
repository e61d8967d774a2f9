"""Sampled soundness of one operator rule: the check every operator's test runs.

``check_op(op, boxes)`` samples points inside the input boxes (corners included) and asserts
that no sample escapes the operator's IBP interval, nor its CROWN linear bounds for random
coefficient tensors A (lower and upper, i.e. A and -A), nor, for tunable relaxations, its
α-CROWN bounds under random α. It also asserts CROWN's bounds are finite wherever IBP's are.
"""

from __future__ import annotations

import math

import torch

from certkit.bounds.engine import concretize
from certkit.bounds.ops import Activation, Op

Box = tuple[torch.Tensor, torch.Tensor]


def sample_box(box: Box, k: int, gen: torch.Generator) -> torch.Tensor:
    """(B, k, *shape) points of each of the B boxes: the two ends, then uniform points; every
    fourth uniform point has each coordinate snapped to an end (the corners of the box)."""
    lo, up = box
    u = torch.rand(lo.shape[0], k, *lo.shape[1:], generator=gen, dtype=torch.float64)
    snap = torch.rand(lo.shape[0], k, *lo.shape[1:], generator=gen, dtype=torch.float64) < 0.5
    corner = (torch.arange(k) % 4 == 3).reshape(1, k, *([1] * (lo.dim() - 1)))
    u = torch.where(corner, snap.to(u.dtype), u)
    u[:, 0], u[:, 1] = 0, 1
    lo64, up64 = lo.double().unsqueeze(1), up.double().unsqueeze(1)
    pts = (lo64 + u * (up64 - lo64)).to(lo.dtype)
    return torch.minimum(torch.maximum(pts, lo.unsqueeze(1)), up.unsqueeze(1))


def _forward_samples(op: Op, samples: list[torch.Tensor]) -> torch.Tensor:
    B, k = samples[0].shape[:2]
    out = op.forward(*(s.reshape(B * k, *s.shape[2:]) for s in samples))
    return out.reshape(B, k, *out.shape[1:])


def _lower(op: Op, A: torch.Tensor, boxes: list[Box], alpha=None) -> torch.Tensor:
    kw = {} if alpha is None else {"alpha": alpha}
    A_ins, bias = op.backward(A, boxes, **kw)
    lb = torch.zeros(A.shape[:2], dtype=A.dtype) if bias is None else bias
    for A_i, box in zip(A_ins, boxes):
        lb = lb + concretize(A_i, box)
    return lb


def check_op(op: Op, boxes: list[Box], points: int = 10_000, specs: int = 4, seed: int = 0,
             tol: float | None = None) -> dict:
    """Assert the IBP and CROWN (and α-CROWN) rules of ``op`` hold on ``points`` samples in
    total over the boxes (each input box (B, *shape); all inputs share B). Returns the
    intervals and bounds for further checks."""
    gen = torch.Generator().manual_seed(seed)
    B = boxes[0][0].shape[0]
    k = max(2, math.ceil(points / B))
    dtype = boxes[0][0].dtype
    tol = (1e-5 if dtype == torch.float32 else 1e-10) if tol is None else tol
    samples = [sample_box(b, k, gen) for b in boxes]
    with torch.no_grad():
        y = _forward_samples(op, samples)  # (B, k, *out)
        lo, up = op.interval(*boxes)
        scale = 1 + y.abs()
        lo_k, up_k = lo.unsqueeze(1).expand_as(y), up.unsqueeze(1).expand_as(y)
        assert ((y != torch.inf) | (up_k == torch.inf)).all() and ((y != -torch.inf) | (lo_k == -torch.inf)).all(), \
            "a sample overflows where the IBP interval is finite"
        # an overflowing sample (exp → inf) equals its interval end: compare that instead of inf
        y = torch.where(torch.isinf(y), torch.where(y > 0, up_k, lo_k), y)
        assert (y >= lo.unsqueeze(1) - tol * scale).all(), f"IBP lower violated by {(lo.unsqueeze(1) - y).max():.3g}"
        assert (y <= up.unsqueeze(1) + tol * scale).all(), f"IBP upper violated by {(y - up.unsqueeze(1)).max():.3g}"
        out_shape = y.shape[2:]
        A = torch.randn(B, specs, *out_shape, generator=gen, dtype=dtype)
        A[:, 0] = 1  # the sum of all outputs, and single outputs
        if specs > 1:
            A[:, 1] = 0
            A[:, 1].reshape(B, -1)[:, 0] = 1
        alphas = [None]
        if isinstance(op, Activation) and op.tunable:
            base = op.default_alpha(*(t for box in boxes for t in box))
            expand = lambda a: a.unsqueeze(1).expand(B, specs, *a.shape[1:]).clone()  # noqa: E731
            alphas += [expand(base), expand(torch.rand(base.shape, generator=gen, dtype=dtype) * 2 - 0.5),
                       expand(torch.zeros_like(base)), expand(torch.ones_like(base))]
        ibp_finite = torch.isfinite(lo).all() and torch.isfinite(up).all()
        flat_y = y.reshape(B, k, -1).transpose(1, 2)  # (B, n_out, k)
        result = {"ibp": (lo, up)}
        for alpha in alphas:
            for sign in (1, -1):
                lb = _lower(op, sign * A, boxes, alpha)
                vals = torch.bmm((sign * A).reshape(B, specs, -1), flat_y.to(dtype))  # (B, specs, k)
                if ibp_finite:
                    assert torch.isfinite(lb).all(), "CROWN bound not finite where IBP's is"
                gap = lb.unsqueeze(-1) - vals
                slack = tol * (1 + vals.abs() + (A.abs().reshape(B, specs, -1).sum(-1, keepdim=True)))
                # a float32 sample past exp's range is inf; A·y mixing +inf and −inf outputs is NaN, a
                # value the dtype cannot hold (no claim to check), and a bound of −inf claims nothing
                claimless = vals.isnan() | (lb.unsqueeze(-1) == -torch.inf)
                which = "set" if alpha is not None else "none"
                assert ((gap <= slack) | claimless).all(), f"CROWN bound (alpha={which}, " \
                                             f"sign {sign}) violated by {gap.max():.3g}"
                if alpha is None:
                    result["crown_lower" if sign == 1 else "crown_upper"] = (lb if sign == 1 else -lb)
        result["A"] = A
        result["samples"] = y
        return result


def random_boxes(shape: tuple[int, ...], batch: int, gen: torch.Generator, scale: float = 3.0,
                 dtype=torch.float32) -> Box:
    """``batch`` boxes of per-sample ``shape``: centres ~ N(0, scale²), radii of mixed sizes
    (including degenerate boxes)."""
    c = torch.randn(batch, *shape, generator=gen, dtype=dtype) * scale
    r = torch.rand(batch, *shape, generator=gen, dtype=dtype) * torch.tensor([0.0, 0.01, 0.5, 2.0, 5.0])[
        torch.randint(0, 5, (batch, *shape), generator=gen)].to(dtype)
    return c - r, c + r
