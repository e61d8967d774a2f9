"""Verification results in HDF5, written incrementally (schema: docs/results-format.md).

Rows are appended after every batch, so an interrupted run keeps what it finished;
``complete`` is set only when the last sample is written. ``--resume`` reopens the file,
checks that it belongs to the same model, ε, method and data slice, and continues after
the last committed row.

Every change is atomic, so a process killed at any moment (``kill -9``) leaves either the
file before the change or the file after it: the new content is written to a copy beside
the file, flushed to disk and renamed over it. The attribute ``rows_committed``, written
last, counts the rows of every dataset; a file whose datasets disagree with it (a torn
append by an older certkit) is read and resumed only up to the committed rows, and never
counts as complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from certkit.errors import InvalidInput
from certkit.files import remove_stale_temporaries, write_atomically
from certkit.status import HDF5_CODES

STATUS = tuple(s.value for s in HDF5_CODES)  # the status dataset's codes, as named in the file
IDENTITY_ATTRS = ("model_sha256", "eps", "method", "dataset", "start", "n")
# how the last run that wrote the file ran (sharded runs only: certkit.scale_out); not identity: the
# rows do not depend on them, so a resumed run may change them and records its own
RUN_ATTRS = ("workers", "cluster_address")


class ResultsFile:
    """An HDF5 results file for ``n`` samples with the given stages."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], stages: list[str], num_specs: int,
                 input_size: int, resume: bool = False):
        self.path = Path(path)
        self.stages = stages
        if resume and self.path.exists():
            self.done = self._reopen(attrs)
            return
        if self.path.exists() and not resume:
            raise InvalidInput(f"{self.path} exists: pass --resume to continue it, or choose another --out")
        write_atomically(self.path, lambda tmp: self._create(tmp, attrs, stages, num_specs, input_size))
        self.done = 0

    def _reopen(self, attrs: dict[str, Any]) -> int:
        """Check that the file on disk belongs to this run; the number of committed rows.

        Rows past the committed count (a torn append of an older certkit) are cut off first."""
        remove_stale_temporaries(self.path)
        try:
            with h5py.File(self.path, "r") as f:
                for k in IDENTITY_ATTRS:
                    if _plain(f.attrs.get(k)) != _plain(attrs[k]):
                        raise InvalidInput(f"{self.path}: cannot resume, it was written for {k}="
                                           f"{_plain(f.attrs.get(k))!r}, not {attrs[k]!r}")
                done, lengths = committed_rows(f)
                stale = {k: attrs.get(k) for k in RUN_ATTRS if _plain(f.attrs.get(k)) != _plain(attrs.get(k))}
                names = f.attrs.get("status_names")
        except OSError as e:
            raise InvalidInput(f"{self.path}: cannot resume, not a readable results file ({e})") from None
        if names != json.dumps(STATUS):  # an older certkit's, without the codes added since
            stale["status_names"] = json.dumps(STATUS)
        torn = any(n != done for n in lengths.values())
        if torn or stale:
            self._rewrite(lambda f: _update(f, done if torn else None, stale))
        return done

    def _rewrite(self, change: Callable[[h5py.File], None]) -> None:
        """Apply ``change`` to a copy of the file and rename it over the file (atomic)."""
        def write(tmp: str) -> None:
            shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "r+") as f:
                change(f)

        write_atomically(self.path, write)

    @staticmethod
    def _create(tmp: str, attrs: dict[str, Any], stages: list[str], num_specs: int, input_size: int) -> None:
        with h5py.File(tmp, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v if isinstance(v, (int, float, str, bool, np.number)) else json.dumps(v)
            f.attrs["stages"] = json.dumps(stages)
            f.attrs["status_names"] = json.dumps(STATUS)
            f.attrs["complete"] = False
            S = len(stages)
            for name, dtype, shape in (("index", "i8", ()), ("label", "i8", ()), ("prediction", "i8", ()),
                                       ("status", "i1", ()), ("stage", "i1", ()),
                                       ("margins", "f4", (S, num_specs)), ("times", "f4", (S,)),
                                       ("counterexample", "f4", (input_size,)),
                                       ("reason", h5py.string_dtype(), ())):
                f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                 chunks=(64, *shape), compression="gzip" if name == "counterexample" else None)
            f.attrs["rows_committed"] = 0

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Append a batch of rows, one value per row for every dataset of the file, atomically."""
        n = len(rows["index"])

        def change(f: h5py.File) -> None:
            missing = sorted(set(f) - set(rows))
            if missing or any(len(v) != n for v in rows.values()):
                raise ValueError(f"a batch of results needs {n} rows of every dataset; missing: {missing}, "
                                 f"lengths: { {k: len(v) for k, v in rows.items()} }")
            for name, values in rows.items():
                ds = f[name]
                ds.resize(self.done + n, axis=0)
                ds[self.done:] = values
            f.attrs["rows_committed"] = self.done + n  # last: the rows count only once this is written

        self._rewrite(change)
        self.done += n

    def mark_complete(self) -> None:
        """Set ``complete`` (atomically), after the last row."""
        def change(f: h5py.File) -> None:
            f.attrs["complete"] = True

        self._rewrite(change)


def committed_rows(f: h5py.File) -> tuple[int, dict[str, int]]:
    """(rows committed, length of every dataset) of an open results file. Files written before
    ``rows_committed`` existed count the rows every dataset has."""
    lengths = {k: int(f[k].shape[0]) for k in f if isinstance(f[k], h5py.Dataset)}
    shortest = min(lengths.values(), default=0)
    committed = f.attrs.get("rows_committed")
    return (shortest if committed is None else min(int(committed), shortest)), lengths


def _truncate(f: h5py.File, rows: int) -> None:
    for name in f:
        f[name].resize(rows, axis=0)
    f.attrs["rows_committed"] = rows


def _update(f: h5py.File, rows: int | None, attrs: dict[str, Any]) -> None:
    """Cut the datasets to ``rows`` (None: leave them) and set ``attrs`` (None: delete)."""
    if rows is not None:
        _truncate(f, rows)
    for k, v in attrs.items():
        if v is None:
            f.attrs.pop(k, None)
        else:
            f.attrs[k] = v


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
            rows, lengths = committed_rows(f)
            data = {k: f[k][:rows] for k in lengths}
            if "reason" in data:  # variable-length UTF-8: read back as str, not bytes
                data["reason"] = np.array([r.decode() if isinstance(r, bytes) else r for r in data["reason"]],
                                          dtype=object)
    except OSError as e:
        raise InvalidInput(f"{path}: not a certkit results file ({e})") from None
    if "index" not in data or "complete" not in attrs:
        raise InvalidInput(f"{path}: not a certkit results file (no index dataset or complete attribute)")
    # a torn or short file never counts as complete, whatever its flag says
    attrs["complete"] = bool(attrs["complete"]) and all(n == rows for n in lengths.values()) \
        and rows == int(attrs.get("n", rows))
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
    error = status == STATUS.index("error")  # a sharded run's samples whose worker kept dying: no prediction
    out["clean_accuracy"] = pct(((status != STATUS.index("misclassified")) & ~error).sum())
    verified = status == STATUS.index("verified")
    out["verified_accuracy"] = pct(verified.sum())
    out["verified_by_stage"] = {s: pct((verified & (data["stage"] <= i)).sum()) for i, s in enumerate(stages)
                                if s != "attack"}
    out["falsified"] = pct((status == STATUS.index("falsified")).sum())
    out["unknown"] = pct((status == STATUS.index("unknown")).sum())
    if error.any():
        out["error"] = pct(error.sum())
    out["pgd_robust_accuracy"] = out["clean_accuracy"] - out["falsified"]
    out["time_total"] = float(np.nansum(data["times"]))
    out["time_by_stage"] = {s: float(np.nansum(data["times"][:, i])) for i, s in enumerate(stages)}
    return out
