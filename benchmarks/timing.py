"""Shared by the benchmark scripts: median wall time of a callable, CUDA-synchronised."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after ``warmup`` runs."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))
