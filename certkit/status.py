"""What certkit knows about one property: one sample's robustness, or one VNN-COMP instance.

Every command speaks :class:`Status`; strings appear only where a file is read or written.
The words differ by file: certkit's HDF5 results say ``verified``/``falsified`` (the
property holds / a counterexample was confirmed), VNN-COMP's result files and CSVs say
``unsat``/``sat`` (the unsafe set is empty / reached), as the competition defines them.
"""

from __future__ import annotations

from enum import Enum


class Status(Enum):
    VERIFIED = "verified"  # holds everywhere in the input set (VNN-COMP: unsat)
    FALSIFIED = "falsified"  # a counterexample confirmed by onnxruntime (VNN-COMP: sat)
    UNKNOWN = "unknown"  # neither, within the methods run
    MISCLASSIFIED = "misclassified"  # verify: the clean input is already misclassified
    TIMEOUT = "timeout"  # the time limit came first
    ERROR = "error"  # the solver failed (VNN-COMP's harness records this)

    @property
    def vnncomp(self) -> str:
        """The word of VNN-COMP's result files for this status."""
        return _TO_VNNCOMP.get(self, self.value)

    @staticmethod
    def from_vnncomp(word: str) -> Status | None:
        """The status a VNN-COMP result word (sat, unsat, unknown, timeout, error; also
        ``violated``/``holds``, which some ground-truth files use) stands for; None for any
        other text."""
        return _FROM_VNNCOMP.get(word.strip().lower())


_TO_VNNCOMP = {Status.VERIFIED: "unsat", Status.FALSIFIED: "sat"}
_FROM_VNNCOMP = {"unsat": Status.VERIFIED, "holds": Status.VERIFIED, "sat": Status.FALSIFIED,
                 "violated": Status.FALSIFIED, "unknown": Status.UNKNOWN, "timeout": Status.TIMEOUT,
                 "error": Status.ERROR}

# The integer codes of the HDF5 results' ``status`` dataset (docs/results-format.md), in order. ERROR
# (code 4, added last so that older files keep their codes) marks the samples of a sharded run whose
# worker kept dying (certkit.scale_out); a run in one process never writes it.
HDF5_CODES: tuple[Status, ...] = (Status.VERIFIED, Status.FALSIFIED, Status.UNKNOWN, Status.MISCLASSIFIED,
                                  Status.ERROR)
