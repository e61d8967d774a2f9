"""Batches of branch-and-bound domains as dataclasses of tensors, and the stack that holds them.

A batch is a dataclass whose fields are tensors with one row per domain, or lists of such
tensors (one per ReLU layer), or dicts of them (one per graph node). :class:`Batch` gives
every such dataclass the row operations branch and bound needs (select, concatenate,
duplicate), so each search names its state instead of keeping string-keyed parts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from certkit.status import Status


def _map(value, fn: Callable[[Tensor], Tensor]):
    """``fn`` applied to a field's tensor, or to each tensor of its list or dict."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, list):
        return [fn(v) for v in value]
    return {k: fn(v) for k, v in value.items()}


def _zip(values: list, fn: Callable[[list[Tensor]], Tensor]):
    """``fn`` applied to one field's values across batches (tensors, or lists or dicts of them,
    combined element by element)."""
    first = values[0]
    if isinstance(first, Tensor):
        return fn(values)
    if isinstance(first, list):
        return [fn([v[i] for v in values]) for i in range(len(first))]
    return {k: fn([v[k] for v in values]) for k in first}


class Batch:
    """Row operations shared by every domain batch (a dataclass of per-domain tensors)."""

    def _first(self) -> Tensor:
        value = getattr(self, dataclasses.fields(self)[0].name)
        return value if isinstance(value, Tensor) else value[0]

    def __len__(self) -> int:
        return self._first().shape[0]

    def apply(self, fn: Callable[[Tensor], Tensor]):
        """A batch of the same kind with ``fn`` applied to every tensor."""
        return type(self)(**{f.name: _map(getattr(self, f.name), fn) for f in dataclasses.fields(self)})

    def rows(self, index: Tensor):
        """The domains ``index`` (indices or a boolean mask)."""
        return self.apply(lambda t: t[index])

    @classmethod
    def cat(cls, batches: list):
        """The batches one after another."""
        return cls(**{f.name: _zip([getattr(b, f.name) for b in batches], torch.cat)
                      for f in dataclasses.fields(cls)})

    def twice(self):
        """Every domain twice: the first len(self) rows, then the same again (a split's two children)."""
        return type(self).cat([self, self])


B = TypeVar("B", bound=Batch)


class Stack(Generic[B]):
    """Open domains as one batch, popped from the end (depth first)."""

    def __init__(self) -> None:
        self.batch: B | None = None

    def __len__(self) -> int:
        return 0 if self.batch is None else len(self.batch)

    def push(self, batch: B) -> None:
        self.batch = batch if self.batch is None or len(self.batch) == 0 else type(batch).cat([self.batch, batch])

    def pop(self, n: int) -> B:
        size = len(self)
        n = min(n, size)
        out = self.batch.apply(lambda t: t[size - n:])
        self.batch = self.batch.apply(lambda t: t[:size - n])
        return out


@dataclass
class BabOutcome:
    """What one branch-and-bound search found for one case of a property."""

    stage: str  # "input-split", "relu-split" or "milp-alpha-crown"
    status: Status  # VERIFIED (unsat), FALSIFIED (sat), TIMEOUT or UNKNOWN
    counterexample: tuple | None = None  # (x, y) confirmed by onnxruntime
    domains: int = 0  # domains bounded
    max_open: int = 0
    detail: str = ""
