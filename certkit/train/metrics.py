"""Per-epoch training metrics in RUN_DIR/metrics.h5, appended after every epoch.

Each scalar metric is a 1-D dataset (one entry per epoch); per-layer ReLU ratios
(``active``, ``inactive``, ``unstable``) are (epochs × ReLU layers) datasets. The attribute
``epochs``, written last, counts the entries of every dataset. The attribute ``notes`` holds,
as JSON ``{name: {epoch: value}}``, what is not one value per epoch (the ReLU layers'
interval widths before training and after the ε ramp) or differs between two runs of the
same configuration (the wall time of each epoch): the datasets of a resumed run equal an
uninterrupted one's, the notes need not.

Every change is atomic (a copy beside the file, changed, flushed and renamed over it), so a
run killed at any moment (``kill -9``) leaves the file of the last finished epoch or of the
one before, never a half-written one; ``--resume`` truncates it to its checkpoint's epoch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from certkit.files import remove_stale_temporaries, write_atomically


class MetricsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _rewrite(self, change: Callable[[h5py.File], None]) -> None:
        """Apply ``change`` to a copy of the file (a new file if there is none) and rename it over
        the file."""
        def write(tmp: str) -> None:
            exists = self.path.exists()
            if exists:
                shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "r+" if exists else "w") as f:
                change(f)

        write_atomically(self.path, write)

    def append(self, row: dict[str, Any], notes: dict[str, dict[int, Any]] | None = None) -> None:
        """Add one epoch's entries and ``notes`` ({name: {epoch: JSON value}}, merged into those
        already there), atomically."""
        def change(f: h5py.File) -> None:
            self._append(f, row)
            if notes:
                merged = _read_notes(f)
                for name, by_epoch in notes.items():
                    merged.setdefault(name, {}).update(by_epoch)
                _write_notes(f, merged)

        self._rewrite(change)

    @staticmethod
    def _append(f: h5py.File, row: dict[str, Any]) -> None:
        for key, value in row.items():
            arr = np.asarray(value, dtype=np.float64)
            if key not in f:
                f.create_dataset(key, shape=(0, *arr.shape), maxshape=(None, *arr.shape), dtype="f8")
            ds = f[key]
            ds.resize(ds.shape[0] + 1, axis=0)
            ds[-1] = arr
        f.attrs["epochs"] = f["epoch"].shape[0]

    def truncate(self, epochs: int) -> None:
        """Drop entries after ``epochs`` (a resumed run rewrites them), and the temporaries of a
        killed run."""
        remove_stale_temporaries(self.path)
        if not self.path.exists():
            return

        def change(f: h5py.File) -> None:
            for key in f:
                if f[key].shape[0] > epochs:
                    f[key].resize(epochs, axis=0)
            _write_notes(f, {name: {e: v for e, v in by_epoch.items() if e <= epochs}
                             for name, by_epoch in _read_notes(f).items()})
            f.attrs["epochs"] = epochs

        self._rewrite(change)

    def read(self) -> dict[str, np.ndarray]:
        """Every metric, one entry per epoch (the first ``epochs`` entries where a dataset has more)."""
        with h5py.File(self.path, "r") as f:
            n = f.attrs.get("epochs")
            return {k: f[k][()] if n is None else f[k][:int(n)] for k in f}

    def notes(self) -> dict[str, dict[int, Any]]:
        """The notes by name and epoch (see the module's docstring; empty for files without)."""
        with h5py.File(self.path, "r") as f:
            return _read_notes(f)

    def summary(self) -> dict[str, float]:
        """Test errors (%) after the last epoch and at the epoch the validation split picks (the
        lowest validation verified error, the first if tied, as ``best.pt``), and training minutes."""
        m = self.read()
        best = int(np.argmin(m["val_verified_err"]))
        return {"clean": float(m["test_clean_err"][-1]), "verified": float(m["test_verified_err"][-1]),
                "picked_clean": float(m["test_clean_err"][best]),
                "picked_verified": float(m["test_verified_err"][best]),
                "picked_epoch": int(m["epoch"][best]), "train_min": float(m["train_time"].sum()) / 60}


def _read_notes(f: h5py.File) -> dict[str, dict[int, Any]]:
    raw = json.loads(f.attrs["notes"]) if "notes" in f.attrs else {}
    return {name: {int(e): v for e, v in by_epoch.items()} for name, by_epoch in raw.items()}


def _write_notes(f: h5py.File, notes: dict[str, dict[int, Any]]) -> None:
    f.attrs["notes"] = json.dumps({name: {str(e): v for e, v in sorted(by_epoch.items())}
                                   for name, by_epoch in notes.items()})
