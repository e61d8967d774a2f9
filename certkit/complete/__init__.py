"""The complete solver: attack, incomplete bounds, then branch and bound, for one property.

Modules, in the order a solve runs them: :mod:`~certkit.complete.solver` (the driver and
its time slicing), :mod:`~certkit.complete.spec` (a property case as tensors),
:mod:`~certkit.complete.margins` (CROWN passes turned into polytope margins),
:mod:`~certkit.complete.input_split` and :mod:`~certkit.complete.relu_split` (the two
branch-and-bound searches, over :mod:`~certkit.complete.domains`' typed batches),
:mod:`~certkit.complete.branching` (where to split), :mod:`~certkit.complete.alpha_beta`
(α-β-CROWN), :mod:`~certkit.complete.milp` and :mod:`~certkit.complete.layer2`
(intermediate bounds refined exactly), :mod:`~certkit.complete.config` (every setting).
"""

from certkit.complete.config import SolverConfig

__all__ = ["Deadline", "SolveResult", "Solver", "SolverConfig"]


def __getattr__(name: str):
    """The solver on first use, not on import: reading the settings (``certkit.complete.config``)
    must not import torch, so that run-instance's parent process starts fast."""
    if name in ("Deadline", "SolveResult", "Solver"):
        from certkit.complete import solver

        return getattr(solver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
