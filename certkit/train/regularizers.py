"""Warmup regularisers L_tightness and L_relu (ALGORITHMS.md §6) and the robust loss (§4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Interval = tuple[Tensor, Tensor]


def robust_loss(lb: Tensor, reduction: str = "mean") -> Tensor:
    """mean over the batch of log(1 + Σ_j exp(−lb_j)) for margin lower bounds lb (B, K−1)
    (``reduction="sum"``: the sum, for a replica holding part of a batch)."""
    logits = torch.cat([torch.zeros_like(lb[:, :1]), -lb], 1)
    return F.cross_entropy(logits, torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device), reduction=reduction)


def _balance(num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """(r', defined) for r = num/den elementwise, num, den >= 0: r' = min(r, 1/max(r, 1e-12)).

    Written as smaller/larger, which has the same value, so that a layer where one sum is 0
    (r = 0 or ∞, r' = 0) gets a finite gradient instead of 0·∞ = NaN; r is undefined (0/0)
    when both sums are 0."""
    swap = num > den
    big, small = torch.where(swap, num, den), torch.where(swap, den, num)
    return small / big.clamp(min=torch.finfo(big.dtype).tiny), big > 0


@dataclass
class RegularizerTerms:
    tightness: Tensor
    relu: Tensor
    fractions: Tensor  # (ReLU layers, 3): active, inactive, unstable fractions of batch × neurons


def warmup_regularizers(input_box: Interval, relu_inputs: list[Interval], tau: float = 0.5) -> RegularizerTerms:
    """L_tightness and L_relu from the IBP bounds of the input and of every ReLU's input.

    L_tightness = (1/m) Σ_i ReLU(τ − Δ̂_0/Δ̂_i)/τ with Δ̂ the mean half-width; L_relu averages
    per layer [ReLU(τ − α') + ReLU(τ − β')]/τ, α and β the active/inactive balance of the
    centres' sums and spreads, r' = min(r, 1/r); layers whose term is NaN/Inf are skipped.
    Nothing here waits for the device (no Python branch on a tensor value): a training step
    on a GPU stays asynchronous.
    """
    m = len(relu_inputs)
    if m == 0:
        zero = input_box[0].new_zeros(())
        return RegularizerTerms(zero, zero, input_box[0].new_zeros((0, 3)))
    delta0 = ((input_box[1] - input_box[0]) / 2).mean()
    widths, sums, counts = [], [], []
    for lo, up in relu_inputs:
        c, d = (up + lo) / 2, (up - lo) / 2
        widths.append(d.mean())
        active, inactive = lo > 0, up < 0
        zero = c.new_zeros(())
        spread = (c - c.mean()) ** 2
        sums.append(torch.stack([torch.where(active, c, zero).sum(), torch.where(inactive, -c, zero).sum(),
                                 torch.where(active, spread, zero).sum(), torch.where(inactive, spread, zero).sum()]))
        counts.append(torch.stack([active.sum(), inactive.sum()]) / lo.numel())
    return _terms(delta0, torch.stack(widths), torch.stack(sums), torch.stack(counts).to(input_box[0].dtype), tau)


def _terms(delta0: Tensor, widths: Tensor, sums: Tensor, act_inact: Tensor, tau: float) -> RegularizerTerms:
    """The terms from the batch statistics, once for all m layers: the input's mean half-width,
    the ReLU inputs' (m,), the active/inactive sums of centres and spreads (m, 4) and the
    active/inactive fractions (m, 2)."""
    m = len(widths)
    tight = (F.relu(tau - delta0 / widths.clamp(min=1e-12)) / tau).sum()
    ratio, defined = _balance(sums[:, 0::2], sums[:, 1::2])  # columns α and β
    terms = F.relu(tau - ratio).sum(1) / tau
    # an undefined ratio (or NaN/Inf bounds) skips the layer; with finite bounds every value reaching
    # the where is finite, so the masked branch leaks no NaN gradient
    relu = torch.where(defined.all(1) & torch.isfinite(terms), terms, terms.new_zeros(())).sum()
    fractions = torch.cat([act_inact, 1 - act_inact.sum(1, keepdim=True)], 1)
    return RegularizerTerms(tight / m, relu / m, fractions.detach())


def sharded_warmup_regularizers(input_box: Interval, relu_inputs: list[Interval], tau: float,
                                total: Callable[[Tensor], Tensor]) -> RegularizerTerms:
    """:func:`warmup_regularizers` of a batch split across data-parallel replicas, each holding
    the bounds of its rows: the same terms as one process computes on the whole batch.

    Both terms are nonlinear in batch-level sums and means (Δ̂ is a mean over the batch, α and β
    ratios of sums over it), so averaging per-replica terms would differ from the single-process
    value. Instead every batch reduction is a local sum passed through ``total`` (a sum over the
    replicas that gradients flow back through, :meth:`certkit.train.distributed.Replica.total`),
    divided by the global element count, which travels in the same sum: two reductions per
    step, the second for the spreads around the global centre mean. Every replica then holds
    the identical global terms."""
    m = len(relu_inputs)
    if m == 0:
        return warmup_regularizers(input_box, relu_inputs, tau)
    lo0, up0 = input_box
    first = [((up0 - lo0) / 2).sum(), lo0.new_tensor(float(lo0.numel()))]
    centres = []
    for lo, up in relu_inputs:
        c, d = (up + lo) / 2, (up - lo) / 2
        centres.append(c)
        first += [d.sum(), c.sum(), c.new_tensor(float(c.numel()))]
    g = total(torch.stack(first))
    delta0 = g[0] / g[1]
    per_layer = g[2:].reshape(m, 3)
    widths, c_means, numel = per_layer[:, 0] / per_layer[:, 2], per_layer[:, 1] / per_layer[:, 2], per_layer[:, 2]
    second = []
    for (lo, up), c, c_mean in zip(relu_inputs, centres, c_means):
        active, inactive = lo > 0, up < 0
        zero = c.new_zeros(())
        spread = (c - c_mean) ** 2
        second.append(torch.stack([torch.where(active, c, zero).sum(), torch.where(inactive, -c, zero).sum(),
                                   torch.where(active, spread, zero).sum(), torch.where(inactive, spread, zero).sum(),
                                   active.sum().to(c.dtype), inactive.sum().to(c.dtype)]))
    G = total(torch.stack(second))
    return _terms(delta0, widths, G[:, :4], (G[:, 4:] / numel[:, None]).to(lo0.dtype), tau)
