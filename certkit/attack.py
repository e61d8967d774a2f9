"""PGD inside a box, towards violating a specification: the one attack of certkit.

:func:`pgd` is the projected sign-gradient descent both callers share; :func:`pgd_attack`
runs it with random restarts on a batch of samples for margins C·f(x) (``certkit
verify``), and the complete solver runs it on a property's unsafe polytopes
(:meth:`certkit.complete.solver.Solver.pgd`). Candidates are only reported as
counterexamples after onnxruntime confirms them on the original file
(:mod:`certkit.confirm`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def pgd(objective: Callable[[Tensor], Tensor], x: Tensor, lo: Tensor, up: Tensor, steps: int, floor: float,
        step_size: float | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
    """ℓ∞ PGD minimising ``objective`` (one value per point) from the points ``x``, each kept
    in its box [lo, up] (broadcast against x).

    Yields (i, xᵢ, objective(xᵢ)) for i = 0 … steps; the step to xᵢ₊₁ is the sign of the
    gradient times a size that decays from a quarter of the box width to ``floor`` of it
    (or ``step_size`` when given). The caller keeps what it needs (the best point, a
    candidate to confirm every few steps) and may stop early."""
    width = up - lo
    for i in range(steps + 1):
        if i == steps:  # the last point needs its value only
            with torch.no_grad():
                value = objective(x.detach())
            yield i, x.detach(), value
            return
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = objective(x)
            grad, = torch.autograd.grad(value.sum(), x)
        yield i, x.detach(), value.detach()
        with torch.no_grad():
            step = width * (0.25 * (1 - i / steps) + floor) if step_size is None else torch.full_like(width, step_size)
            x = torch.minimum(torch.maximum(x - step * grad.sign(), lo), up)


def pgd_attack(model: Callable[[Tensor], Tensor], lo: Tensor, up: Tensor, C: Tensor, steps: int = 50,
               restarts: int = 5, step_size: float | None = None, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]:
    """Minimise min_j (C·f(x))_j over the box from ``restarts`` starting points per sample
    (the centre and random points), with steps decaying to a fortieth of the box width.

    Returns (best x (B, *shape), its smallest specification value (B,)); a negative value
    means the specification is violated at x (a counterexample candidate).
    """
    B, shape = lo.shape[0], lo.shape[1:]
    R = max(1, restarts)
    lo_r = lo.unsqueeze(0).expand(R, *lo.shape).reshape(R * B, *shape)
    up_r = up.unsqueeze(0).expand(R, *up.shape).reshape(R * B, *shape)
    C_r = C.unsqueeze(0).expand(R, *C.shape).reshape(R * B, *C.shape[1:])
    noise = torch.rand(lo_r.shape, generator=generator, dtype=lo.dtype).to(lo.device)
    x = lo_r + (up_r - lo_r) * noise
    x[:B] = (lo + up) / 2  # the first restart starts at the centre

    def worst_row(x: Tensor) -> Tensor:
        return torch.einsum("bsk,bk->bs", C_r, model(x).reshape(R * B, -1)).min(1).values

    best_val = torch.full((R * B,), float("inf"), device=lo.device, dtype=lo.dtype)
    best_x = x.clone()
    for _, x_i, worst in pgd(worst_row, x, lo_r, up_r, steps, floor=0.025, step_size=step_size):
        better = worst < best_val
        best_val = torch.where(better, worst, best_val)
        best_x[better] = x_i[better]
    vals = best_val.reshape(R, B)
    pick = vals.argmin(0)
    xs = best_x.reshape(R, B, *shape)[pick, torch.arange(B, device=lo.device)]
    return xs, vals.min(0).values
