"""Shared by the benchmark scripts: median wall time of a callable, CUDA-synchronised."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from certkit.train.loop import compiled


def timeit(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2, inner: int = 1) -> float:
    """Median wall time of one call of ``fn`` over ``repeats`` timings, after ``warmup`` calls.

    Each timing runs ``inner`` consecutive calls between two device synchronisations, as a
    training epoch does (a GPU overlaps one step's work with the launch of the next)."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / inner

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def natural_step(trainer, x: torch.Tensor, y: torch.Tensor, compile: bool = False) -> Callable[[], None]:
    """One step of plain (natural) training of ``trainer``'s model and optimiser on (x, y)
    (with ``compile``, the model's forward compiled as the trainer compiles its steps)."""
    forward = compiled(trainer.model, trainer.device) if compile else trainer.model

    def step() -> None:
        trainer.model.train()
        loss = F.cross_entropy(forward(x), y)
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt.step()

    return step
