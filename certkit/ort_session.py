"""onnxruntime, the reference every counterexample is confirmed with.

Kept apart from :mod:`certkit.onnx_io` so that a solver whose network came from the graph
cache needs neither onnx nor onnx2torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from certkit.errors import InvalidInput, InvalidModel


class OrtSession:
    """An onnxruntime session on the CPU, reused across calls (counterexample checks run many)."""

    def __init__(self, path: str | Path, threads: int = 0, checked: bool = False):
        """``checked``: the file's external-data locations were already checked (it was loaded
        by :func:`certkit.onnx_io.read_proto`, or its converted graph came from the cache);
        otherwise they are checked here."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        if not checked:
            from certkit.onnx_io import read_proto

            read_proto(path, load_external_data=False)  # refuses external data outside the model's folder
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InvalidModel(f"{path}: onnxruntime cannot load it ({e})") from None
        inp = self.session.get_inputs()[0]
        self.name = inp.name
        self.full_shape = [d if isinstance(d, int) else None for d in inp.shape]
        self.dtype = np.float64 if inp.type == "tensor(double)" else np.float32  # float32 → float64 is exact

    def run(self, x: np.ndarray) -> np.ndarray:
        """The output on ``x`` (batch first), one sample at a time when the file fixes the batch size to 1."""
        x = np.asarray(x, dtype=np.float32).astype(self.dtype)
        if len(self.full_shape) != x.ndim:
            raise InvalidInput(f"onnxruntime input {self.name!r} has rank {len(self.full_shape)}, got array of "
                               f"shape {x.shape}")
        if self.full_shape[0] == 1 and x.shape[0] != 1:
            return np.concatenate([self.session.run(None, {self.name: x[i:i + 1]})[0] for i in range(x.shape[0])])
        return self.session.run(None, {self.name: x})[0]


def run_onnxruntime(path: str | Path, x: np.ndarray) -> np.ndarray:
    """The network's output on ``x`` (batch first) according to onnxruntime."""
    return OrtSession(path).run(x)
