"""Where tensors go: the one place every command resolves ``--device``."""

from __future__ import annotations

import torch

from certkit.errors import InvalidInput


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear
    error when CUDA is asked for and absent, before any work or output file."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"--device {name}: no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidInput(f"--device {name!r}: choose auto, cpu or cuda") from None
