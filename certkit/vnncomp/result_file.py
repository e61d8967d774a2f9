"""VNN-COMP's result file: the status line, then for ``sat`` the counterexample's values."""

from __future__ import annotations

import numpy as np

from certkit.status import Status


def format_result(status: Status, x: np.ndarray | None = None, y: np.ndarray | None = None) -> str:
    """The competition's result file: the status line, then for ``sat`` the ``((X_i v) … (Y_j v))`` list."""
    if status is not Status.FALSIFIED:
        return status.vnncomp + "\n"
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(np.asarray(x, dtype=np.float32).reshape(-1))]
    pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(np.asarray(y).reshape(-1))]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


def parse_result(text: str) -> tuple[Status, dict[str, float]]:
    """Status and assignment of a result file (the inverse of :func:`format_result`); ERROR when
    its first line names no status."""
    lines = text.strip().splitlines()
    status = (Status.from_vnncomp(lines[0]) if lines else None) or Status.ERROR
    values = {}
    for tok in " ".join(lines[1:]).replace("(", " ( ").replace(")", " ) ").split("("):
        parts = tok.replace(")", " ").split()
        if len(parts) == 2:
            values[parts[0]] = float(parts[1])
    return status, values
