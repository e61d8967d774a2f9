"""Input boxes: ε strings, arrays from files, batching to the model's input shape."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from certkit.errors import InvalidInput

_NUMBER = r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?"


def parse_eps(text: str | float) -> float:
    """Parse a perturbation radius: ``8/255``, ``0.031``, ``2e-3``. Must be finite and >= 0."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        m = re.fullmatch(rf"({_NUMBER})\s*/\s*({_NUMBER})", s)
        if m:
            num, den = float(m.group(1)), float(m.group(5))
            if den == 0:
                raise InvalidInput(f"bad epsilon {text!r}: division by zero")
            value = num / den
        elif re.fullmatch(_NUMBER, s):
            value = float(s)
        else:
            raise InvalidInput(f"bad epsilon {text!r}: expected a number like 0.03, 2e-3 or 8/255")
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"bad epsilon {text!r}: must be a finite number >= 0")
    return value


def load_array(path: str | Path) -> np.ndarray:
    """A numpy array from a ``.npy`` file (or the single array of a ``.npz``)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InvalidInput(f"{path}: not a numpy array file ({e})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        if len(arr.files) != 1:
            raise InvalidInput(f"{path}: expected one array, found {', '.join(arr.files)}")
        arr = arr[arr.files[0]]
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
