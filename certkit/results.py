"""Verification results in HDF5, written incrementally (schema: docs/results.md).

Rows are appended after every batch and flushed, so an interrupted run keeps what it
finished; ``complete`` is set only when the last sample is written. ``--resume`` reopens
the file, checks that it belongs to the same model, ε, method and data slice, and
continues after the last row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from certkit.errors import InvalidInput

STATUS = ("verified", "falsified", "unknown", "misclassified")
IDENTITY_ATTRS = ("model_sha256", "eps", "method", "dataset", "start", "n")


class ResultsFile:
    """An HDF5 results file for ``n`` samples with the given stages."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], stages: list[str], num_specs: int,
                 input_size: int, resume: bool = False):
        self.path = Path(path)
        self.stages = stages
        if resume and self.path.exists():
            with h5py.File(self.path, "r") as f:
                for k in IDENTITY_ATTRS:
                    if _plain(f.attrs.get(k)) != _plain(attrs[k]):
                        raise InvalidInput(f"{self.path}: cannot resume, it was written for {k}="
                                           f"{_plain(f.attrs.get(k))!r}, not {attrs[k]!r}")
                self.done = int(f["index"].shape[0])
            return
        if self.path.exists() and not resume:
            raise InvalidInput(f"{self.path} exists: pass --resume to continue it, or choose another --out")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.path, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v if isinstance(v, (int, float, str, bool, np.number)) else json.dumps(v)
            f.attrs["stages"] = json.dumps(stages)
            f.attrs["status_names"] = json.dumps(STATUS)
            f.attrs["complete"] = False
            S = len(stages)
            for name, dtype, shape in (("index", "i8", ()), ("label", "i8", ()), ("prediction", "i8", ()),
                                       ("status", "i1", ()), ("stage", "i1", ()),
                                       ("margins", "f4", (S, num_specs)), ("times", "f4", (S,)),
                                       ("counterexample", "f4", (input_size,))):
                f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                 chunks=(64, *shape), compression="gzip" if name == "counterexample" else None)
        self.done = 0

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Append a batch of rows (every dataset, same length) and flush."""
        n = len(rows["index"])
        with h5py.File(self.path, "a") as f:
            for name, values in rows.items():
                ds = f[name]
                ds.resize(ds.shape[0] + n, axis=0)
                ds[-n:] = values
            f.flush()
        self.done += n

    def mark_complete(self) -> None:
        with h5py.File(self.path, "a") as f:
            f.attrs["complete"] = True


def _plain(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return round(float(v), 12)
    if isinstance(v, np.integer):
        return int(v)
    return v


def read_results(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(attributes, datasets) of a results file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such results file")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            data = {k: f[k][()] for k in f}
    except OSError as e:
        raise InvalidInput(f"{path}: not a certkit results file ({e})") from None
    for k in ("stages", "status_names", "options"):
        if isinstance(attrs.get(k), str):
            attrs[k] = json.loads(attrs[k])
    return attrs, data


def summarize(attrs: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracies (%) and times: clean, verified (cumulative along the cascade), PGD-robust."""
    n = len(data["status"])
    stages = attrs["stages"]
    status = data["status"]
    out: dict[str, Any] = {"samples": n, "requested": int(attrs.get("n", n)), "complete": bool(attrs["complete"]),
                           "eps": attrs["eps"], "method": attrs["method"],
                           "bounded_output": attrs.get("bounded_output", "outputs")}
    if n == 0:
        return out
    pct = lambda k: 100.0 * float(k) / n  # noqa: E731
    out["clean_accuracy"] = pct((status != STATUS.index("misclassified")).sum())
    verified = status == STATUS.index("verified")
    out["verified_accuracy"] = pct(verified.sum())
    out["verified_by_stage"] = {s: pct((verified & (data["stage"] <= i)).sum()) for i, s in enumerate(stages)
                                if s != "attack"}
    out["falsified"] = pct((status == STATUS.index("falsified")).sum())
    out["unknown"] = pct((status == STATUS.index("unknown")).sum())
    out["pgd_robust_accuracy"] = out["clean_accuracy"] - out["falsified"]
    out["time_total"] = float(np.nansum(data["times"]))
    out["time_by_stage"] = {s: float(np.nansum(data["times"][:, i])) for i, s in enumerate(stages)}
    return out
