"""Where tensors go: the one place every command resolves ``--device``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from certkit.errors import InvalidInput

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear
    error when CUDA is asked for and absent, before any work or output file."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"--device {name}: no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidInput(f"--device {name!r}: choose auto, cpu or cuda") from None


def check_device(name: str) -> None:
    """:func:`resolve_device`'s check alone, without importing torch for ``cpu``: a process that
    only starts the solver (run-instance's parent) has no other use for torch, whose import
    takes seconds."""
    if name != "cpu":
        resolve_device(name)
