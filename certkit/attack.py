"""PGD with random restarts inside a box, towards violating a linear specification.

The attack looks for x in [lo, up] with some row of C·f(x) below zero (for margins
e_y − e_j: another class scores higher than the label). Every restart of every sample
runs in one batch; the best point per sample is kept. Candidates are only reported as
counterexamples by the caller after onnxruntime confirms them on the original file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def pgd_attack(model: Callable[[Tensor], Tensor], lo: Tensor, up: Tensor, C: Tensor, steps: int = 50,
               restarts: int = 5, step_size: float | None = None, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]:
    """Minimise min_j (C·f(x))_j over the box with ℓ∞ PGD (sign steps) from ``restarts``
    starting points per sample (the centre and random points).

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
    width = up_r - lo_r
    best_val = torch.full((R * B,), float("inf"), device=lo.device, dtype=lo.dtype)
    best_x = x.clone()
    for i in range(steps + 1):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            spec = torch.einsum("bsk,bk->bs", C_r, model(x).reshape(R * B, -1))
            worst = spec.min(1).values
            grad, = torch.autograd.grad(worst.sum(), x)
        with torch.no_grad():
            better = worst < best_val
            best_val = torch.where(better, worst.detach(), best_val)
            best_x[better] = x.detach()[better]
            if i == steps:
                break
            # step size decays from a quarter of the box width (or the given size) to a tenth of it
            frac = 0.25 * (1 - i / steps) + 0.025
            step = width * frac if step_size is None else torch.full_like(width, step_size)
            x = torch.minimum(torch.maximum(x - step * grad.sign(), lo_r), up_r)
    vals = best_val.reshape(R, B)
    pick = vals.argmin(0)
    xs = best_x.reshape(R, B, *shape)[pick, torch.arange(B, device=lo.device)]
    return xs, vals.min(0).values
