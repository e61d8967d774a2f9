"""The smoothed per-batch ε schedule of the fast-training paper (ALGORITHMS.md §7)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SmoothedEps:
    """ε(s) for the 0-based training batch index s.

    Zero through epoch ``start - 1``, then a polynomial start (degree ``beta``) for the first
    ``mid`` fraction of the ramp, then linear up to ``eps_max`` at the end of epoch
    ``start + length - 1``; ``eps_max`` after that. A ramp too short for the polynomial part
    (fewer than 1/``mid`` steps) is linear.
    """

    eps_max: float
    start: int  # 1-based epoch where the ramp begins
    length: int  # epochs of ramp
    batches_per_epoch: int
    mid: float = 0.25
    beta: float = 4.0

    @property
    def init_step(self) -> int:
        return (self.start - 1) * self.batches_per_epoch

    @property
    def final_step(self) -> int:
        return (self.start + self.length - 1) * self.batches_per_epoch

    def __call__(self, step: int) -> float:
        init, final = self.init_step, self.final_step
        if step <= init:
            return 0.0
        if final <= init:
            return self.eps_max
        midstep = init + math.floor((final - init) * self.mid)
        if midstep == init:  # a ramp of a few steps has no room for the polynomial start: linear
            return min(self.eps_max * (step - init) / (final - init), self.eps_max)
        t = (midstep - init) ** (self.beta - 1)
        a = self.eps_max / ((final - midstep) * self.beta * t + (midstep - init) * t)
        if step < midstep:
            return a * (step - init) ** self.beta
        eps_mid = a * (midstep - init) ** self.beta
        return min(eps_mid + (self.eps_max - eps_mid) * (step - midstep) / (final - midstep), self.eps_max)

    def in_warmup(self, epoch: int) -> bool:
        """Epochs 1 … start+length−1 (1-based) are the warmup, where the regularisers apply."""
        return epoch <= self.start + self.length - 1
