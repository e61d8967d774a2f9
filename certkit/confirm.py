"""onnxruntime on the original ONNX file: the only judge of counterexamples.

A candidate from an attack or from branch and bound (computed in PyTorch, often in
float64) becomes a counterexample (``falsified`` in verify, ``sat`` in VNN-COMP) only if,
once snapped to the float32 inputs of its box (:func:`float32_box`), onnxruntime's output
lies strictly inside one of the unsafe polytopes. ``certkit verify`` states robustness as
such a polytope set too (:func:`certkit.vnnlib.robustness_case`), so both commands confirm
the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from torch import Tensor

from certkit.ort_session import OrtSession
from certkit.vnnlib import Case


class Confirm(Protocol):
    """Candidate points (N, *shape), with their violations (N,) when the caller has them already
    → a confirmed counterexample (x, y) or None."""

    def __call__(self, points: Tensor, violation: Tensor | None = None) -> tuple | None: ...


def float32_box(lo: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 inputs of the box [lo, up] (float64 bounds): the smallest float32 ≥ lo and the
    largest ≤ up. Where no float32 lies inside (a fixed input such as ``lo = up = 0.1``, which
    float32 cannot hold), both are the float32 nearest to the interval: the network, which takes
    float32, cannot be fed anything closer (half a float32 ulp off, far inside the
    competition's tolerance of 1e-6 relative)."""
    lo, up = np.asarray(lo, dtype=np.float64), np.asarray(up, dtype=np.float64)
    lo32, up32 = lo.astype(np.float32), up.astype(np.float32)
    lo32 = np.where(lo32 < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
    up32 = np.where(up32 > up, np.nextafter(up32, np.float32(-np.inf)), up32)
    nearest = ((lo + up) / 2).astype(np.float32)
    empty = lo32 > up32
    return np.where(empty, nearest, lo32), np.where(empty, nearest, up32)


def snap_into_box(x: np.ndarray, lo: np.ndarray, up: np.ndarray) -> np.ndarray:
    """float32 points of the box [lo, up] (see :func:`float32_box`) as close to ``x`` as float32 allows."""
    lo32, up32 = float32_box(lo, up)
    return np.clip(np.asarray(x, dtype=np.float64).astype(np.float32), lo32, up32)


def in_unsafe_set(case: Case, y: np.ndarray) -> bool:
    """Whether y meets every row of some polytope strictly (a·y − b < 0, in float64)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    return any(bool(np.all(A @ y - b < 0)) for A, b in case.polytopes)


class Oracle:
    """An onnxruntime session for one network, fed flat input vectors."""

    def __init__(self, path: str | Path, input_shape: tuple[int, ...], checked: bool = False):
        self.session = OrtSession(path, threads=1, checked=checked)  # checked: see OrtSession
        self.input_shape = tuple(input_shape)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """Flat outputs (N, K) for flat float32 inputs (N, D), inputs read in row-major order."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, *self.input_shape)
        y = self.session.run(x)
        return np.asarray(y, dtype=np.float64).reshape(len(x), -1)

    def confirm(self, case: Case, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The first candidate (flat, any float dtype) that is a real counterexample, as (x, y)."""
        found = self.confirm_each([case] * len(candidates), candidates)
        return next((hit for hit in found if hit is not None), None)

    def confirm_each(self, cases: list[Case], candidates: np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per candidate (flat, any float dtype) and its own case, in one onnxruntime run:
        (x, y) where it is a real counterexample of its case, else None."""
        if len(candidates) == 0:
            return []
        flat = np.asarray(candidates).reshape(len(candidates), -1)
        same = all(c is cases[0] for c in cases)
        lo = cases[0].lower if same else np.stack([c.lower for c in cases])
        up = cases[0].upper if same else np.stack([c.upper for c in cases])
        x32 = snap_into_box(flat, lo, up)
        ys = self.outputs(x32)
        return [(x, y) if np.all(np.isfinite(y)) and in_unsafe_set(case, y) else None
                for x, y, case in zip(x32, ys, cases)]
