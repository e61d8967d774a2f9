"""Input boxes: ε strings, arrays from files, batching to the model's input shape."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from certkit.errors import InvalidInput
from certkit.files import check_array_file_size

_NUMBER = r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?"


def _shown(text: object, limit: int = 40) -> str:
    """``text`` for an error message: repr'd and cut short (a pasted 10,000-digit string stays one short line)."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit] + "..."


def parse_eps(text: str | float) -> float:
    """Parse a perturbation radius: ``8/255``, ``0.031``, ``2e-3``. Must be finite and >= 0.

    Only ASCII numbers are read (no ``nan``, ``inf``, ``1_0`` or other scripts' digits), and a
    positive value that underflows to 0 (``1e-400``) is refused rather than silently certified at 0."""
    if isinstance(text, (int, float)):
        value = float(text)
        nonzero = value != 0
    else:
        s = str(text).strip()
        m = re.fullmatch(rf"({_NUMBER})\s*/\s*({_NUMBER})", s, re.ASCII)
        if m:
            num, den = float(m.group(1)), float(m.group(5))
            if den == 0:
                raise InvalidInput(f"bad epsilon {_shown(text)}: division by zero")
            value = num / den
            nonzero = bool(re.search("[1-9]", m.group(1).split("e")[0].split("E")[0]))
        elif re.fullmatch(_NUMBER, s, re.ASCII):
            value = float(s)
            nonzero = bool(re.search("[1-9]", s.split("e")[0].split("E")[0]))
        else:
            raise InvalidInput(f"bad epsilon {_shown(text)}: expected a number like 0.03, 2e-3 or 8/255")
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"bad epsilon {_shown(text)}: must be a finite number >= 0")
    if value == 0 and nonzero:
        raise InvalidInput(f"bad epsilon {_shown(text)}: too small to represent (it rounds to 0)")
    return value + 0.0  # -0.0 → 0.0


MAX_RADII = 1000  # a sweep longer than this is a typo in a range (a step far too small), not a plan


def parse_eps_list(text: str | float | Sequence[str | float]) -> tuple[float, ...]:
    """The radii of ``--eps``, ascending: one radius (``8/255``), a comma-separated list
    (``0.1,0.2,0.3``), ranges ``START:STOP:STEP`` (``1/255:8/255:1/255``: START, START + STEP, ...
    up to STOP, which is included when a whole number of steps reaches it within rounding), or a
    mix (``0.1,2/255:4/255:1/255``); a YAML list of such items too. Every number follows
    :func:`parse_eps`. A radius given twice, an empty item and an empty or one-radius range are
    refused: each would be a typo that a sweep silently absorbs."""
    items = [text] if isinstance(text, (int, float, str)) else list(text)
    if not items or (isinstance(text, str) and not text.strip()):
        raise InvalidInput("no epsilon given: expected a radius, a list 0.1,0.2 or a range START:STOP:STEP")
    given: dict[float, str] = {}
    for item in items:
        parts = [item] if isinstance(item, (int, float)) else str(item).split(",")
        for part in parts:
            for value in _eps_item(part, text):
                if value in given:
                    raise InvalidInput(f"bad epsilon list {_shown(text)}: radius {value!r} is given twice "
                                       f"({given[value]!r} and {str(part).strip()!r})")
                given[value] = str(part).strip()
    return tuple(sorted(given))


def _eps_item(part: str | float, whole: object) -> list[float]:
    """The radii of one item of an ε list: a number, or a range START:STOP:STEP."""
    if isinstance(part, (int, float)):
        return [parse_eps(part)]
    if not part.strip():
        raise InvalidInput(f"bad epsilon list {_shown(whole)}: an empty item (two commas, or one at an end)")
    if ":" not in part:
        return [parse_eps(part)]
    fields = part.split(":")
    if len(fields) != 3:
        raise InvalidInput(f"bad epsilon range {_shown(part.strip())}: expected START:STOP:STEP, "
                           "e.g. 1/255:8/255:1/255")
    start, stop, step = (_exact(f) for f in fields)
    if step == 0:
        raise InvalidInput(f"bad epsilon range {_shown(part.strip())}: STEP must be > 0")
    if stop <= start:
        what = "a single radius: write it without a range" if stop == start else "empty: STOP is below START"
        raise InvalidInput(f"bad epsilon range {_shown(part.strip())}: {what}")
    slack = step / 10**9  # rounding: STOP counts when a whole number of steps reaches it within this
    count = math.floor((stop - start + slack) / step) + 1
    if count > MAX_RADII:
        raise InvalidInput(f"bad epsilon range {_shown(part.strip())}: {count:,} radii; a sweep may have at "
                           f"most {MAX_RADII}")
    values = [start + k * step for k in range(count)]
    if stop - values[-1] <= slack:
        values[-1] = stop
    return [float(v) + 0.0 for v in values]


def _exact(text: str) -> Fraction:
    """A number of :func:`parse_eps`'s syntax as an exact fraction (checked by parse_eps first), so
    that a range's radii are START + k·STEP rounded once: 0.1:0.3:0.1 gives 0.3 itself, not
    0.30000000000000004, and 1/255:8/255:1/255 gives the same floats as 3/255, 4/255, ..."""
    parse_eps(text)
    num, _, den = text.strip().partition("/")
    return Fraction(num.strip()) / Fraction(den.strip() or 1)


def load_array(path: str | Path) -> np.ndarray:
    """A numpy array from a ``.npy`` file (or the single array of a ``.npz``)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    check_array_file_size(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InvalidInput(f"{path}: not a numpy array file ({e})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        if len(arr.files) != 1:
            raise InvalidInput(f"{path}: expected one array, found {', '.join(arr.files)}")
        try:
            arr = arr[arr.files[0]]
        except ValueError as e:  # an object array: reading it would need pickle
            raise InvalidInput(f"{path}: not a numpy array file ({e})") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidInput(f"{path}: array of {arr.dtype} is not numeric")
    return arr


def as_batch(arr: np.ndarray | Tensor, input_shape: Sequence[int], what: str = "input") -> Tensor:
    """Shape an array as (B, *input_shape): accepts one sample, a batch, or flat vectors
    in row-major order (as VNN-LIB numbers the inputs)."""
    t = torch.as_tensor(np.asarray(arr), dtype=torch.float32)
    shape = tuple(input_shape)
    n = math.prod(shape)
    if tuple(t.shape) == shape:
        return t.unsqueeze(0)
    if tuple(t.shape[1:]) == shape:
        return t
    if t.numel() == n:
        return t.reshape(1, *shape)
    if t.dim() == 2 and t.shape[1] == n:
        return t.reshape(t.shape[0], *shape)
    raise InvalidInput(f"{what} of shape {tuple(t.shape)} does not fit the model input {shape} "
                       f"(give {shape}, (B, {', '.join(map(str, shape))}) or {n} values per sample)")


def eps_box(center: Tensor, eps: float, clip: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
    """The ℓ∞ box [x − ε, x + ε], clipped to ``clip`` (e.g. the pixel range) when given."""
    lo, up = center - eps, center + eps
    if clip is not None:
        lo, up = lo.clamp(*clip), up.clamp(*clip)
    return lo, up
