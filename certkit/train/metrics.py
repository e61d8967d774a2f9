"""Per-epoch training metrics in RUN_DIR/metrics.h5, appended after every epoch.

Each scalar metric is a 1-D dataset (one entry per epoch); per-layer ReLU ratios
(``active``, ``inactive``, ``unstable``) are (epochs × ReLU layers) datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np


class MetricsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        with h5py.File(self.path, "a") as f:
            for key, value in row.items():
                arr = np.asarray(value, dtype=np.float64)
                if key not in f:
                    f.create_dataset(key, shape=(0, *arr.shape), maxshape=(None, *arr.shape), dtype="f8")
                ds = f[key]
                ds.resize(ds.shape[0] + 1, axis=0)
                ds[-1] = arr
            f.attrs["epochs"] = f["epoch"].shape[0]

    def truncate(self, epochs: int) -> None:
        """Drop entries after ``epochs`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        with h5py.File(self.path, "a") as f:
            for key in f:
                if f[key].shape[0] > epochs:
                    f[key].resize(epochs, axis=0)
            f.attrs["epochs"] = epochs

    def read(self) -> dict[str, np.ndarray]:
        with h5py.File(self.path, "r") as f:
            return {k: f[k][()] for k in f}

    def summary(self) -> dict[str, float]:
        """Test errors (%) after the last epoch and at the epoch the validation split picks (the
        lowest validation verified error, the first if tied, as ``best.pt``), and training minutes."""
        m = self.read()
        best = int(np.argmin(m["val_verified_err"]))
        return {"clean": float(m["test_clean_err"][-1]), "verified": float(m["test_verified_err"][-1]),
                "picked_clean": float(m["test_clean_err"][best]),
                "picked_verified": float(m["test_verified_err"][best]),
                "picked_epoch": int(m["epoch"][best]), "train_min": float(m["train_time"].sum()) / 60}
