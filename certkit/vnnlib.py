"""VNN-LIB 1.0 properties as the competitions use them (writing; reading comes with VNN-COMP support).

A property describes the *unsafe* set: ``unsat`` means no input in the box reaches it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from certkit.files import write_atomically


def robustness_property(lo: np.ndarray, up: np.ndarray, label: int, num_outputs: int, comment: str = "") -> str:
    """Input box over X_i (row-major order) and the unsafe set "some class j ≠ label scores
    at least as high as the label", as a disjunction over Y_j."""
    lo, up = np.asarray(lo, np.float64).reshape(-1), np.asarray(up, np.float64).reshape(-1)
    lines = [f"; {line}" for line in comment.splitlines()] if comment else []
    lines += [f"(declare-const X_{i} Real)" for i in range(lo.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_outputs)]
    lines.append("")
    for i, (a, b) in enumerate(zip(lo, up)):
        lines.append(f"(assert (<= X_{i} {b!r}))")
        lines.append(f"(assert (>= X_{i} {a!r}))")
    lines.append("")
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(num_outputs) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def write_property(path: str | Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def write_instances(path: str | Path, rows: list[tuple[str, str, float]]) -> None:
    """instances.csv: onnx path, vnnlib path, timeout (seconds), no header."""
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(f"{o},{v},{t:g}\n" for o, v, t in rows)))
